//! `bench`: a closed-loop load generator against a running coordinator.
//!
//! Workloads: `enqueue` (C producers), `drain` (N items preloaded, then C consumers
//! lease and ack), `e2e` (producers and consumers together, optionally at a fixed
//! offered rate, measuring enqueue→ack latency from a timestamp in each payload).
//! Every client task has its own connection (one HTTP/2 connection per client), so
//! C clients means C connections, as C beanstalkd or Redis clients would have.
//!
//! The run checks its own work: every enqueue answered with a distinct id, every item
//! acked exactly once (acks counted per payload index), and the queue's stats moved
//! by exactly the run's items. A run that fails a check prints the report with
//! `verified: false`, names the problems and exits 1.
//!
//! The bench owns its queue: by default a fresh `bench-<random>` queue, deleted at
//! the end whatever happened. With `--queue` it uses (and creates if missing) the
//! named queue and leaves it in place.

mod calls;
mod consume;
mod latency;
mod payload;
mod produce;

use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use workq_proto::{Client, pb};

use self::consume::{Consumed, Consumer, Finish, Measure, Until};
use self::latency::Percentiles;
use self::produce::{Pace, Produced, Shape};
use crate::connect::Global;
use crate::output::{Format, print_fields, print_json};

/// Items per request when `drain` and `e2e` preload or seed a queue: large batches,
/// pipelined, so the setup takes a small fraction of the measured time.
const PRELOAD_BATCH: usize = 1_000;
const PRELOAD_PIPELINE: usize = 8;
const PRELOAD_CLIENTS: usize = 2;

/// Measure a coordinator: items/s and latency percentiles for enqueue, drain and
/// end-to-end workloads, checked for lost or duplicated items.
///
/// `enqueue`: C producers each send their share of N items, B per request, one
/// request at a time (or --pipeline at a time on a stream). Latency: per request.
///
/// `drain`: N items are preloaded (large batches, not timed), then C consumers each
/// lease up to B items and ack them (Ack for one, one Settle call for a batch), one
/// step at a time. Latency: per item, from asking for it to its confirmed ack.
///
/// `e2e`: P producers and C consumers run together; with --rate the producers offer
/// R items/s in total on a fixed schedule (open loop), otherwise as fast as answers
/// come back. Latency: per item, from its enqueue time to its confirmed ack: the
/// scheduled time, or when the producer was idle until then, the moment the timer
/// (which wakes on millisecond ticks) let the request leave. A delayed placeholder
/// item keeps the queue from reading as drained while consumers wait, so unary
/// consumers long-poll instead of spinning; it is purged at the end.
///
/// --mode stream uses the EnqueueStream and Work streaming calls instead of one call
/// per request: a consumer grants B credit, the server pushes leases, and the
/// consumer acks them and grants the same credit again in one message.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  queue-cli bench --workload enqueue --items 200000 --concurrency 32
  queue-cli bench --workload drain --items 200000 --concurrency 32 --mode stream
  queue-cli bench --workload enqueue --items 1000000 --concurrency 8 --batch 100
  queue-cli bench --workload e2e --items 20000 --producers 8 --consumers 8 --rate 2000

JSON (-o json): {\"workload\", \"mode\", \"items\", \"concurrency\", \"batch\",
\"payload_size\", \"seconds\", \"items_per_sec\", \"latency_us\": {\"p50\", \"p99\",
\"p999\", \"max\"}, \"latency_of\": \"request\"|\"lease_to_ack\"|\"enqueue_to_ack\",
\"verified\": BOOL, \"problems\": [TEXT...], \"queue\", \"pipeline\", \"keyed\",
\"lost_leases\"},
plus \"producers\", \"consumers\" and \"rate\" for e2e (where concurrency is
producers + consumers).")]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Workload::Enqueue)]
    pub workload: Workload,

    /// Items in the run.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    #[arg(value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub items: u64,

    /// Concurrent clients, each with its own connection (e2e: the default for
    /// --producers and --consumers).
    #[arg(short = 'c', long, value_name = "C", default_value_t = 32)]
    #[arg(value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,

    /// Items per request: per enqueue call, per lease call (acked with one Settle),
    /// or credit per stream step. 1 = one item per operation.
    #[arg(long, value_name = "B", default_value_t = 1)]
    #[arg(value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub batch: u32,

    /// Bytes per payload (at least 16: the item's index and timestamp).
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    #[arg(value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub payload_size: u32,

    /// unary: one gRPC call per request; stream: the EnqueueStream and Work streams;
    /// wire: the same two streams over the wire protocol (no HTTP/2).
    #[arg(long, value_enum, default_value_t = Mode::Unary)]
    pub mode: Mode,

    /// Enqueue requests outstanding at once per stream (--mode stream or wire, closed
    /// loop).
    #[arg(long, value_name = "W", default_value_t = 1)]
    #[arg(value_parser = clap::value_parser!(u32).range(1..=64))]
    pub pipeline: u32,

    /// e2e: producer clients [default: --concurrency].
    #[arg(long, value_name = "P")]
    #[arg(value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub producers: Option<u32>,

    /// e2e: consumer clients [default: --concurrency].
    #[arg(long, value_name = "C")]
    #[arg(value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub consumers: Option<u32>,

    /// e2e: offered load in items/s across all producers (open loop); without it
    /// producers send as fast as answers come back.
    #[arg(long, value_name = "ITEMS_PER_SEC")]
    pub rate: Option<f64>,

    /// Give every item a dedup key of its own (unique in the run), so that the
    /// coordinator's key index is part of what is measured.
    #[arg(long)]
    pub keyed: bool,

    /// Use this queue (created if missing, left in place) instead of a fresh
    /// `bench-<random>` queue that is deleted afterwards. drain and e2e need it empty.
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// C producers, one request at a time each.
    Enqueue,
    /// N preloaded items, C consumers leasing and acking.
    Drain,
    /// Producers and consumers together; enqueue→ack latency.
    E2e,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// One gRPC call per request (Enqueue, Lease, Ack or Settle).
    Unary,
    /// EnqueueStream for producers, a Work session for consumers.
    Stream,
    /// The same streams over the wire protocol: frames on TCP, no HTTP/2.
    Wire,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Enqueue => "enqueue",
            Workload::Drain => "drain",
            Workload::E2e => "e2e",
        }
    }
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Unary => "unary",
            Mode::Stream => "stream",
            Mode::Wire => "wire",
        }
    }
}

/// What a workload measured, before verification.
#[derive(Debug, Default)]
struct Outcome {
    seconds: f64,
    latencies: Vec<u32>,
    produced: Produced,
    consumed: Option<Consumed>,
    /// Items the run added besides its N (the e2e placeholder).
    extra_enqueued: u64,
    extra_purged: u64,
}

pub async fn run(global: &Global, args: BenchArgs) -> Result<()> {
    if let Some(rate) = args.rate {
        if args.workload != Workload::E2e {
            bail!("--rate goes with --workload e2e only");
        }
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--rate must be a positive number of items per second, got {rate}");
        }
    }
    if (args.producers.is_some() || args.consumers.is_some()) && args.workload != Workload::E2e {
        bail!("--producers and --consumers go with --workload e2e; use --concurrency");
    }
    // Before the bench queue is made (or preloaded): the run could not use it.
    if args.mode == Mode::Wire && global.server.starts_with("https://") {
        bail!(
            "--mode wire speaks the wire protocol, which has no TLS, and this coordinator \
             serves TLS (https://): use --mode stream, the same streams over gRPC"
        );
    }
    payload::now_us(); // start the run clock before anything is stamped
    let mut admin = global.connect().await?;
    let fresh = args.queue.is_none();
    let queue = args
        .queue
        .clone()
        .unwrap_or_else(|| format!("bench-{:016x}", rand::random::<u64>()));
    admin
        .create_queue(pb::CreateQueueRequest {
            queue: queue.clone(),
            options: None,
            if_not_exists: !fresh,
        })
        .await
        .with_context(|| format!("create queue {queue}"))?;
    let result = measure(global, &mut admin, &queue, &args).await;
    if fresh {
        let deleted = admin
            .delete_queue(pb::DeleteQueueRequest {
                queue: queue.clone(),
            })
            .await;
        if let (Err(status), Ok(_)) = (&deleted, &result) {
            bail!("delete bench queue {queue}: {}", status.message());
        }
    }
    let report = result?;
    match global.output {
        Format::Json => print_json(&report.json),
        Format::Table => print_fields(&report.fields),
    }
    if !report.problems.is_empty() {
        bail!("verification failed: {}", report.problems.join("; "));
    }
    Ok(())
}

struct Report {
    json: Value,
    fields: Vec<(&'static str, String)>,
    problems: Vec<String>,
}

async fn measure(
    global: &Global,
    admin: &mut Client,
    queue: &str,
    args: &BenchArgs,
) -> Result<Report> {
    let before = stats(admin, queue).await?;
    if args.workload != Workload::Enqueue && before.ready + before.delayed + before.leased > 0 {
        bail!(
            "queue {queue} holds {} unfinished items; bench {} needs an empty queue \
             (purge it or leave out --queue)",
            before.ready + before.delayed + before.leased,
            args.workload.name()
        );
    }
    let outcome = match args.workload {
        Workload::Enqueue => enqueue(global, queue, args).await?,
        Workload::Drain => drain(global, admin, queue, args).await?,
        Workload::E2e => e2e(global, admin, queue, args).await?,
    };
    let after = stats(admin, queue).await?;
    let problems = verify(args, &outcome, &before, &after);
    Ok(report(args, queue, outcome, problems))
}

async fn stats(client: &mut Client, queue: &str) -> Result<pb::QueueStats> {
    Ok(client
        .get_queue(pb::GetQueueRequest {
            queue: queue.to_string(),
        })
        .await
        .with_context(|| format!("stats of {queue}"))?
        .into_inner()
        .stats
        .unwrap_or_default())
}

/// One connection per client, all made before the clock starts.
async fn connect_all(global: &Global, n: usize) -> Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(global.connect().await?);
    }
    Ok(clients)
}

/// The `i`-th of `n` nearly equal contiguous shares of `0..total`.
fn share(total: u64, n: usize, i: usize) -> Range<u64> {
    let n = n as u64;
    let i = i as u64;
    (total * i / n)..(total * (i + 1) / n)
}

fn shape(args: &BenchArgs) -> Shape {
    Shape {
        batch: args.batch as usize,
        payload_size: args.payload_size as usize,
        mode: args.mode,
        pipeline: args.pipeline as usize,
        keys: args.keyed.then(run_number),
    }
}

/// A number for this run: the wall clock in nanoseconds.
fn run_number() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

async fn join_produced(mut tasks: JoinSet<Result<Produced>>) -> Result<Produced> {
    let mut all = Produced::default();
    while let Some(done) = tasks.join_next().await {
        all.merge(done.context("producer task")??);
    }
    Ok(all)
}

async fn join_consumed(mut tasks: JoinSet<Result<Consumed>>) -> Result<Consumed> {
    let mut all = Consumed::default();
    while let Some(done) = tasks.join_next().await {
        all.merge(done.context("consumer task")??);
    }
    Ok(all)
}

async fn enqueue(global: &Global, queue: &str, args: &BenchArgs) -> Result<Outcome> {
    let n = args.concurrency as usize;
    let clients = connect_all(global, n).await?;
    let shape = shape(args);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, client) in clients.into_iter().enumerate() {
        let queue = queue.to_string();
        let items = share(args.items, n, i);
        tasks.spawn(async move { produce::closed(client, &queue, items, shape).await });
    }
    let produced = join_produced(tasks).await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Outcome {
        seconds,
        latencies: produced.latencies.clone(),
        produced,
        ..Default::default()
    })
}

/// Fills the queue with the run's items in large pipelined batches (not timed).
async fn preload(global: &Global, queue: &str, args: &BenchArgs) -> Result<Produced> {
    let clients = connect_all(global, PRELOAD_CLIENTS).await?;
    let shape = Shape {
        batch: PRELOAD_BATCH,
        payload_size: args.payload_size as usize,
        mode: Mode::Stream,
        pipeline: PRELOAD_PIPELINE,
        ..shape(args)
    };
    let mut tasks = JoinSet::new();
    for (i, client) in clients.into_iter().enumerate() {
        let queue = queue.to_string();
        let items = share(args.items, PRELOAD_CLIENTS, i);
        tasks.spawn(async move { produce::closed(client, &queue, items, shape).await });
    }
    join_produced(tasks).await
}

fn consumer(queue: &str, i: usize, args: &BenchArgs, measure: Measure, until: Until) -> Consumer {
    Consumer {
        queue: queue.to_string(),
        worker_id: format!("bench-consumer-{i}"),
        batch: args.batch,
        mode: args.mode,
        measure,
        until,
    }
}

async fn drain(
    global: &Global,
    admin: &mut Client,
    queue: &str,
    args: &BenchArgs,
) -> Result<Outcome> {
    let produced = preload(global, queue, args).await?;
    let loaded = stats(admin, queue).await?;
    if loaded.ready < args.items {
        bail!(
            "preload left {} of {} items ready in {queue}",
            loaded.ready,
            args.items
        );
    }
    let n = args.concurrency as usize;
    let clients = connect_all(global, n).await?;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, client) in clients.into_iter().enumerate() {
        let consumer = consumer(queue, i, args, Measure::LeaseToAck, Until::Drained);
        tasks.spawn(consumer.run(client));
    }
    let consumed = join_consumed(tasks).await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Outcome {
        seconds,
        latencies: consumed.latencies.clone(),
        produced,
        consumed: Some(consumed),
        ..Default::default()
    })
}

async fn e2e(
    global: &Global,
    admin: &mut Client,
    queue: &str,
    args: &BenchArgs,
) -> Result<Outcome> {
    let producers = args.producers.unwrap_or(args.concurrency) as usize;
    let consumers = args.consumers.unwrap_or(args.concurrency) as usize;
    // The placeholder: DELAYED for far longer than any run, so the queue never reads
    // as drained and unary consumers long-poll; purged at the end.
    admin
        .enqueue(pb::EnqueueRequest {
            queue: queue.to_string(),
            items: vec![pb::NewItem {
                payload: b"bench placeholder".to_vec().into(),
                delay_ms: 24 * 3_600_000,
                ..Default::default()
            }],
            seal: false,
        })
        .await
        .context("enqueue the placeholder item")?;
    let producer_clients = connect_all(global, producers).await?;
    let consumer_clients = connect_all(global, consumers).await?;
    let finish = Finish::new(args.items);
    let shape = shape(args);
    let started = Instant::now();
    let mut consuming = JoinSet::new();
    for (i, client) in consumer_clients.into_iter().enumerate() {
        let consumer = consumer(
            queue,
            i,
            args,
            Measure::EnqueueToAck,
            Until::AllAcked(finish.clone()),
        );
        consuming.spawn(consumer.run(client));
    }
    let mut producing = JoinSet::new();
    for (i, client) in producer_clients.into_iter().enumerate() {
        let queue = queue.to_string();
        let items = share(args.items, producers, i);
        let pace = args.rate.map(|rate| {
            // Request j of producer i leaves at (j·P + i)·B/R: the producers' requests
            // interleave evenly and together offer R items/s.
            let per_request = Duration::from_secs_f64(args.batch as f64 / rate);
            Pace {
                start: started,
                offset: per_request.mul_f64(i as f64),
                interval: per_request.mul_f64(producers as f64),
            }
        });
        producing.spawn(async move {
            match pace {
                Some(pace) => produce::paced(client, &queue, items, shape, pace).await,
                None => produce::closed(client, &queue, items, shape).await,
            }
        });
    }
    let produced = join_produced(producing).await?;
    let consumed = join_consumed(consuming).await?;
    let seconds = started.elapsed().as_secs_f64();
    admin
        .purge_queue(pb::PurgeQueueRequest {
            queue: queue.to_string(),
        })
        .await
        .context("purge the placeholder item")?;
    Ok(Outcome {
        seconds,
        latencies: consumed.latencies.clone(),
        produced,
        consumed: Some(consumed),
        extra_enqueued: 1,
        extra_purged: 1,
    })
}

/// Everything that shows an item lost, duplicated or unaccounted for.
fn verify(
    args: &BenchArgs,
    outcome: &Outcome,
    before: &pb::QueueStats,
    after: &pb::QueueStats,
) -> Vec<String> {
    let n = args.items;
    let mut problems = Vec::new();
    let mut ids = outcome.produced.ids.clone();
    ids.sort_unstable();
    ids.dedup();
    if outcome.produced.ids.len() as u64 != n || ids.len() as u64 != n {
        problems.push(format!(
            "enqueue returned {} ids ({} distinct) for {n} items",
            outcome.produced.ids.len(),
            ids.len()
        ));
    }
    let enqueued = after.total_enqueued - before.total_enqueued;
    if enqueued != n + outcome.extra_enqueued {
        problems.push(format!(
            "queue stats count {enqueued} enqueued, expected {}",
            n + outcome.extra_enqueued
        ));
    }
    match &outcome.consumed {
        None => {
            if after.ready != before.ready + n {
                problems.push(format!(
                    "queue stats show {} ready, expected {}",
                    after.ready,
                    before.ready + n
                ));
            }
        }
        Some(consumed) => {
            let mut acks = vec![0u32; n as usize];
            let mut out_of_range = 0u64;
            for &index in &consumed.acked {
                match acks.get_mut(index as usize) {
                    Some(count) => *count += 1,
                    None => out_of_range += 1,
                }
            }
            let missing = acks.iter().filter(|&&c| c == 0).count();
            let twice = acks.iter().filter(|&&c| c > 1).count();
            if missing > 0 {
                problems.push(format!("{missing} items never acked"));
            }
            if twice > 0 {
                problems.push(format!("{twice} items acked more than once"));
            }
            if out_of_range + consumed.foreign > 0 {
                problems.push(format!(
                    "{} leased items were not this run's",
                    out_of_range + consumed.foreign
                ));
            }
            let completed = after.total_completed - before.total_completed;
            if completed != n {
                problems.push(format!(
                    "queue stats count {completed} completed, expected {n}"
                ));
            }
            let purged = after.total_purged - before.total_purged;
            if purged != outcome.extra_purged {
                problems.push(format!(
                    "queue stats count {purged} purged, expected {}",
                    outcome.extra_purged
                ));
            }
            let unfinished = after.ready + after.delayed + after.leased;
            if unfinished > 0 {
                problems.push(format!("{unfinished} items left unfinished in the queue"));
            }
        }
    }
    problems
}

fn report(args: &BenchArgs, queue: &str, mut outcome: Outcome, problems: Vec<String>) -> Report {
    let percentiles = Percentiles::of(&mut outcome.latencies);
    let items_per_sec = if outcome.seconds > 0.0 {
        args.items as f64 / outcome.seconds
    } else {
        0.0
    };
    let (latency_of, latency_label) = match args.workload {
        Workload::Enqueue => ("request", "latency per request"),
        Workload::Drain => ("lease_to_ack", "latency lease→ack"),
        Workload::E2e => ("enqueue_to_ack", "latency enqueue→ack"),
    };
    let lost = outcome.consumed.as_ref().map_or(0, |c| c.lost);
    let verified = problems.is_empty();
    let (producers, consumers) = (
        args.producers.unwrap_or(args.concurrency),
        args.consumers.unwrap_or(args.concurrency),
    );
    let concurrency = match args.workload {
        Workload::E2e => producers + consumers,
        _ => args.concurrency,
    };
    let mut json = json!({
        "workload": args.workload.name(),
        "mode": args.mode.name(),
        "items": args.items,
        "concurrency": concurrency,
        "batch": args.batch,
        "payload_size": args.payload_size,
        "seconds": round3(outcome.seconds),
        "items_per_sec": items_per_sec.round(),
        "latency_us": percentiles.json(),
        "latency_of": latency_of,
        "verified": verified,
        "problems": problems,
        "queue": queue,
        "pipeline": args.pipeline,
        "keyed": args.keyed,
        "lost_leases": lost,
    });
    let clients = match args.workload {
        Workload::Enqueue => format!("{} producers", args.concurrency),
        Workload::Drain => format!("{} consumers", args.concurrency),
        Workload::E2e => {
            json["producers"] = json!(producers);
            json["consumers"] = json!(consumers);
            json["rate"] = json!(args.rate);
            let offered = args.rate.map_or_else(
                || "closed loop".to_string(),
                |r| format!("{r} items/s offered"),
            );
            format!("{producers} producers, {consumers} consumers, {offered}")
        }
    };
    let pipeline = if args.mode != Mode::Unary && args.pipeline > 1 {
        format!(", pipeline {}", args.pipeline)
    } else {
        String::new()
    };
    let fields = vec![
        (
            "workload",
            format!(
                "{} ({}, batch {}{pipeline}, {}-byte payloads{}, {clients})",
                args.workload.name(),
                args.mode.name(),
                args.batch,
                args.payload_size,
                if args.keyed { ", keyed" } else { "" }
            ),
        ),
        ("queue", queue.to_string()),
        (
            "items",
            format!("{} in {:.2}s", args.items, outcome.seconds),
        ),
        ("throughput", format!("{items_per_sec:.0} items/s")),
        (latency_label, percentiles.human()),
        (
            "verified",
            if verified {
                match args.workload {
                    Workload::Enqueue => "yes: every item got its own id; queue stats agree".into(),
                    _ => "yes: every item acked exactly once; queue stats agree".into(),
                }
            } else {
                format!("NO: {}", problems.join("; "))
            },
        ),
    ];
    Report {
        json,
        fields,
        problems,
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_split_the_items_without_gaps() {
        let shares: Vec<Range<u64>> = (0..3).map(|i| share(10, 3, i)).collect();
        assert_eq!(shares, vec![0..3, 3..6, 6..10]);
        assert_eq!(share(2, 4, 0), 0..0);
        assert_eq!(share(2, 4, 3), 1..2);
    }
}
