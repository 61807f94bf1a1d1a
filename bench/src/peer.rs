//! The same closed-loop workloads as `queue-cli bench`, driven against a peer
//! (beanstalkd, Redis or NATS JetStream) through one connection per client.
//!
//! - enqueue: C clients each put their share of N items, B per request (a pipelined
//!   round trip for beanstalkd and NATS, one `LPUSH` of B values for Redis). Latency
//!   per request. Stops early at the time budget; the items put so far are the
//!   drain's.
//! - drain: the items of the enqueue run, C clients each leasing up to B and
//!   completing them one step at a time, until the queue is empty. Latency per item
//!   from the lease request to the completed delete.
//! - e2e: P producers at a fixed offered rate (each request stamped with its
//!   scheduled time, or with when it left if the producer was idle until then, see
//!   `sample::pace`) and C consumers that block on reserve; latency per item from
//!   the stamped time to the completed delete.
//!
//! Every acked item's index is counted, so a run shows items lost or done twice.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::task::JoinSet;

use crate::beanstalk::Beanstalk;
use crate::nats::{Nats, Storage};
use crate::redis::Redis;
use crate::sample::{self, Percentiles, check_acks, micros};

/// Which peer and where.
#[derive(Clone, Copy, Debug)]
pub enum Peer {
    Beanstalkd(SocketAddr),
    Redis(SocketAddr),
    /// nats-server with JetStream; the run's stream is kept in this storage.
    Nats(SocketAddr, Storage),
}

/// One client connection to a peer, on the run's tube, lists or stream.
enum Conn {
    Beanstalkd(Beanstalk),
    Redis(Redis),
    Nats(Nats),
}

/// A leased item: the handle to complete it with and its payload.
struct Leased {
    /// beanstalkd's job id (0 for the others).
    job: u64,
    /// NATS's ack subject (empty for the others).
    ack: String,
    payload: Vec<u8>,
}

/// How long a consumer blocks on an empty queue in e2e before checking whether the
/// run is over.
const E2E_WAIT_SECS: u32 = 1;

impl Conn {
    async fn connect(peer: Peer, namespace: &str, client: usize) -> Result<Conn> {
        Ok(match peer {
            Peer::Beanstalkd(addr) => Conn::Beanstalkd(Beanstalk::connect(addr, namespace).await?),
            Peer::Redis(addr) => {
                let mut redis =
                    Redis::connect(addr, namespace, &format!("client-{client}")).await?;
                redis.ping().await?;
                Conn::Redis(redis)
            }
            Peer::Nats(addr, storage) => {
                let mut nats = Nats::connect(addr, namespace).await?;
                // Clients connect one after another (connect_all), so client 0 has
                // created the stream and consumer before any client uses them.
                if client == 0 {
                    nats.setup(storage).await?;
                }
                Conn::Nats(nats)
            }
        })
    }

    async fn enqueue(&mut self, payloads: &[Vec<u8>]) -> Result<()> {
        match self {
            Conn::Beanstalkd(b) => b.put(payloads).await,
            Conn::Redis(r) => r.enqueue(payloads).await,
            Conn::Nats(n) => n.enqueue(payloads).await,
        }
    }

    async fn lease(&mut self, max: usize, wait_secs: u32) -> Result<Vec<Leased>> {
        Ok(match self {
            Conn::Beanstalkd(b) => b
                .reserve(max, wait_secs)
                .await?
                .into_iter()
                .map(|(job, payload)| Leased {
                    job,
                    ack: String::new(),
                    payload,
                })
                .collect(),
            Conn::Redis(r) => r
                .lease(max, wait_secs)
                .await?
                .into_iter()
                .map(|payload| Leased {
                    job: 0,
                    ack: String::new(),
                    payload,
                })
                .collect(),
            Conn::Nats(n) => n
                .lease(max, wait_secs)
                .await?
                .into_iter()
                .map(|(ack, payload)| Leased {
                    job: 0,
                    ack,
                    payload,
                })
                .collect(),
        })
    }

    async fn complete(&mut self, leased: &[Leased]) -> Result<()> {
        match self {
            Conn::Beanstalkd(b) => {
                let ids: Vec<u64> = leased.iter().map(|l| l.job).collect();
                b.delete(&ids).await
            }
            Conn::Redis(r) => {
                let items: Vec<Vec<u8>> = leased.iter().map(|l| l.payload.clone()).collect();
                r.complete(&items).await
            }
            Conn::Nats(n) => {
                let subjects: Vec<String> = leased.iter().map(|l| l.ack.clone()).collect();
                n.ack(&subjects).await
            }
        }
    }
}

/// A workload's shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub clients: usize,
    pub batch: usize,
    pub payload_size: usize,
}

/// What a peer run measured.
#[derive(Clone, Debug)]
pub struct Measured {
    pub items: u64,
    pub seconds: f64,
    pub latency: Percentiles,
    /// Stopped at the time budget before every item was done.
    pub cut_short: bool,
    pub problems: Vec<String>,
}

impl Measured {
    pub fn items_per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            self.items as f64 / self.seconds
        } else {
            0.0
        }
    }
}

fn share(total: u64, n: usize, i: usize) -> Range<u64> {
    let (n, i) = (n as u64, i as u64);
    (total * i / n)..(total * (i + 1) / n)
}

async fn connect_all(peer: Peer, namespace: &str, n: usize) -> Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(Conn::connect(peer, namespace, i).await?);
    }
    Ok(conns)
}

/// Enqueues `n` items; returns the measurement and how many items each client put
/// (client i put the first `counts[i]` of its share).
pub async fn enqueue(
    peer: Peer,
    namespace: &str,
    n: u64,
    shape: Shape,
    budget: Duration,
) -> Result<(Measured, Vec<u64>)> {
    let conns = connect_all(peer, namespace, shape.clients).await?;
    let started = Instant::now();
    let deadline = started + budget;
    let mut tasks = JoinSet::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let range = share(n, shape.clients, i);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut next = range.start;
            while next < range.end && Instant::now() < deadline {
                let end = (next + shape.batch as u64).min(range.end);
                let now = sample::now_us();
                let payloads: Vec<Vec<u8>> = (next..end)
                    .map(|index| sample::encode(index, now, shape.payload_size))
                    .collect();
                let sent = Instant::now();
                conn.enqueue(&payloads).await?;
                latencies.push(micros(sent.elapsed().as_micros() as u64));
                next = end;
            }
            Ok::<_, anyhow::Error>((i, next - range.start, latencies))
        });
    }
    let mut counts = vec![0; shape.clients];
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (i, count, mut l) = done.context("enqueue task")??;
        counts[i] = count;
        latencies.append(&mut l);
    }
    let seconds = started.elapsed().as_secs_f64();
    let items: u64 = counts.iter().sum();
    Ok((
        Measured {
            items,
            seconds,
            latency: Percentiles::of(&mut latencies),
            cut_short: items < n,
            problems: Vec::new(),
        },
        counts,
    ))
}

/// Drains what [`enqueue`] put (`counts` from it, over `n` items in `clients` shares).
pub async fn drain(
    peer: Peer,
    namespace: &str,
    n: u64,
    enqueue_clients: usize,
    counts: &[u64],
    shape: Shape,
    budget: Duration,
) -> Result<Measured> {
    let conns = connect_all(peer, namespace, shape.clients).await?;
    let started = Instant::now();
    let deadline = started + budget;
    let mut tasks = JoinSet::new();
    for mut conn in conns {
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut acked = Vec::new();
            let mut cut_short = false;
            loop {
                if Instant::now() >= deadline {
                    cut_short = true;
                    break;
                }
                let asked = Instant::now();
                let leased = conn.lease(shape.batch, 0).await?;
                if leased.is_empty() {
                    break;
                }
                conn.complete(&leased).await?;
                let took = micros(asked.elapsed().as_micros() as u64);
                for item in &leased {
                    latencies.push(took);
                    acked.push(sample::decode(&item.payload).map_or(u64::MAX, |(i, _)| i));
                }
            }
            Ok::<_, anyhow::Error>((acked, latencies, cut_short))
        });
    }
    let mut acked = Vec::new();
    let mut latencies = Vec::new();
    let mut cut_short = false;
    while let Some(done) = tasks.join_next().await {
        let (mut a, mut l, cut) = done.context("drain task")??;
        acked.append(&mut a);
        latencies.append(&mut l);
        cut_short |= cut;
    }
    let seconds = started.elapsed().as_secs_f64();
    // The items enqueue put: the first counts[i] of each client's share.
    let expected: Vec<u64> = (0..enqueue_clients)
        .flat_map(|i| {
            let range = share(n, enqueue_clients, i);
            range.start..range.start + counts[i]
        })
        .collect();
    let problems = verify_subset(n, &expected, &acked, cut_short);
    Ok(Measured {
        items: acked.len() as u64,
        seconds,
        latency: Percentiles::of(&mut latencies),
        cut_short,
        problems,
    })
}

/// Each expected item acked once (only "at most once" when the run was cut short),
/// nothing else acked.
fn verify_subset(n: u64, expected: &[u64], acked: &[u64], cut_short: bool) -> Vec<String> {
    let mut wanted = vec![false; n as usize];
    for &i in expected {
        wanted[i as usize] = true;
    }
    let mut problems: Vec<String> = check_acks(n, acked)
        .into_iter()
        .filter(|p| !p.contains("never acked"))
        .collect();
    let mut seen = vec![false; n as usize];
    for &i in acked {
        if let Some(s) = seen.get_mut(i as usize) {
            *s = true;
        }
    }
    let missing = (0..n as usize).filter(|&i| wanted[i] && !seen[i]).count();
    let unexpected = (0..n as usize).filter(|&i| !wanted[i] && seen[i]).count();
    if missing > 0 && !cut_short {
        problems.push(format!("{missing} items never acked"));
    }
    if unexpected > 0 {
        problems.push(format!("{unexpected} items acked that were never enqueued"));
    }
    problems
}

/// Producers at `rate` items/s in total and consumers together until all `n` items
/// are acked (or the budget runs out).
pub async fn e2e(
    peer: Peer,
    namespace: &str,
    n: u64,
    producers: usize,
    consumers: Shape,
    rate: f64,
    budget: Duration,
) -> Result<Measured> {
    let producer_conns = connect_all(peer, namespace, producers).await?;
    let consumer_conns = connect_all(peer, namespace, consumers.clients).await?;
    let started = Instant::now();
    let deadline = started + budget;
    let acked_count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let finished_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let mut consuming = JoinSet::new();
    for mut conn in consumer_conns {
        let (acked_count, stop, finished_at) =
            (acked_count.clone(), stop.clone(), finished_at.clone());
        consuming.spawn(async move {
            let mut latencies = Vec::new();
            let mut acked = Vec::new();
            while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                let leased = conn.lease(consumers.batch, E2E_WAIT_SECS).await?;
                if leased.is_empty() {
                    continue;
                }
                conn.complete(&leased).await?;
                let now = sample::now_us();
                for item in &leased {
                    let decoded = sample::decode(&item.payload);
                    let stamped = decoded.map_or(now, |(_, at)| at);
                    latencies.push(micros(now.saturating_sub(stamped)));
                    acked.push(decoded.map_or(u64::MAX, |(i, _)| i));
                }
                let total = acked_count.fetch_add(leased.len() as u64, Ordering::AcqRel)
                    + leased.len() as u64;
                if total >= n {
                    stop.store(true, Ordering::Release);
                    finished_at
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert_with(Instant::now);
                }
            }
            Ok::<_, anyhow::Error>((acked, latencies))
        });
    }
    let per_request = Duration::from_secs_f64(consumers.batch as f64 / rate);
    let mut producing = JoinSet::new();
    for (i, mut conn) in producer_conns.into_iter().enumerate() {
        let range = share(n, producers, i);
        producing.spawn(async move {
            let offset = per_request.mul_f64(i as f64);
            let interval = per_request.mul_f64(producers as f64);
            let mut next = range.start;
            let mut j = 0u32;
            let (mut free_at, mut woke) = (started, started);
            while next < range.end && Instant::now() < deadline {
                let at = sample::pace(started + offset + interval * j, free_at, &mut woke).await;
                let end = (next + consumers.batch as u64).min(range.end);
                let stamp = sample::us_at(at);
                let payloads: Vec<Vec<u8>> = (next..end)
                    .map(|index| sample::encode(index, stamp, consumers.payload_size))
                    .collect();
                conn.enqueue(&payloads).await?;
                free_at = Instant::now();
                next = end;
                j += 1;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = producing.join_next().await {
        done.context("producer task")??;
    }
    let mut acked = Vec::new();
    let mut latencies = Vec::new();
    while let Some(done) = consuming.join_next().await {
        let (mut a, mut l) = done.context("consumer task")??;
        acked.append(&mut a);
        latencies.append(&mut l);
    }
    let finished = finished_at.lock().unwrap_or_else(|e| e.into_inner()).take();
    let cut_short = finished.is_none();
    let seconds = finished
        .unwrap_or_else(Instant::now)
        .duration_since(started)
        .as_secs_f64();
    let mut problems = check_acks(n, &acked);
    if cut_short {
        problems.retain(|p| !p.contains("never acked"));
    }
    Ok(Measured {
        items: acked.len() as u64,
        seconds,
        latency: Percentiles::of(&mut latencies),
        cut_short,
        problems,
    })
}
