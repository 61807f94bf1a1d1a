//! Queue administration: `create`, `delete`, `list`, `stats`, `purge`, `seal`,
//! `unseal`.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use workq_proto::pb;

use super::{opt_ms, parse_positive};
use crate::connect::Global;
use crate::output::{
    Format, Table, age, count, millis, outln, print_fields, print_json, queue_json, rate, yes_no,
};

/// Create a queue, optionally with its options.
///
/// Unset options take the coordinator's defaults: lease timeout 30s, 5 attempts,
/// backoff 1s doubling to 5m, payloads up to 1 MiB, unlimited depth, DONE items kept
/// for 1h.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  queue-cli create keygen
  queue-cli create keygen --lease-timeout 5m --max-attempts 3 --if-not-exists

JSON (-o json): the queue, as `stats -o json` prints it.")]
pub struct CreateArgs {
    /// Queue name: 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit.
    pub queue: String,

    #[command(flatten)]
    pub options: OptionArgs,

    /// Succeed without changes when the queue already exists.
    #[arg(long)]
    pub if_not_exists: bool,
}

/// Queue options, shared by `create` and `update`; unset ones keep their value.
#[derive(Args, Debug)]
pub struct OptionArgs {
    /// How long a lease lasts before the item goes back to the queue.
    #[arg(long, value_parser = parse_positive, value_name = "DURATION")]
    pub lease_timeout: Option<Duration>,

    /// Deliveries before an item goes DEAD.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: Option<u32>,

    /// First retry delay after a failure; doubles per attempt.
    #[arg(long, value_parser = parse_positive, value_name = "DURATION")]
    pub backoff_base: Option<Duration>,

    /// Longest retry delay.
    #[arg(long, value_parser = parse_positive, value_name = "DURATION")]
    pub backoff_cap: Option<Duration>,

    /// Largest payload accepted, in bytes.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_payload: Option<u64>,

    /// Most unfinished (ready + delayed + leased) items; enqueue past it is refused.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_depth: Option<u64>,

    /// How long DONE items and their results are kept.
    #[arg(long, value_parser = parse_positive, value_name = "DURATION")]
    pub retention: Option<Duration>,
}

impl OptionArgs {
    fn to_pb(&self) -> pb::QueueOptions {
        pb::QueueOptions {
            lease_timeout_ms: opt_ms(self.lease_timeout),
            max_attempts: self.max_attempts.unwrap_or(0),
            backoff_base_ms: opt_ms(self.backoff_base),
            backoff_cap_ms: opt_ms(self.backoff_cap),
            max_payload_bytes: self.max_payload.unwrap_or(0),
            max_depth: self.max_depth.unwrap_or(0),
            retention_ms: opt_ms(self.retention),
        }
    }
}

/// Change a queue's options; the ones not given keep their value.
///
/// New lease timeouts apply to leases granted from now on; a lower max depth does not
/// remove items, it only refuses enqueues until the queue is below it.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  queue-cli update keygen --lease-timeout 10m --max-attempts 10
  queue-cli update keygen --unlimited-depth

JSON (-o json): the queue, as `stats -o json` prints it.")]
pub struct UpdateArgs {
    /// Queue name.
    pub queue: String,

    #[command(flatten)]
    pub options: OptionArgs,

    /// Remove the max depth limit.
    #[arg(long, conflicts_with = "max_depth")]
    pub unlimited_depth: bool,
}

/// Delete a queue and every item in it.
#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  queue-cli delete keygen

JSON (-o json): {\"queue\": NAME, \"items_deleted\": N}")]
pub struct DeleteArgs {
    /// Queue name.
    pub queue: String,
}

/// List queues with their item counts, rate and ETA.
#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  queue-cli list
  NAME     READY   DELAYED   LEASED   DONE   DEAD   SEALED   DRAINED   RATE     ETA   WORKERS
  keygen   90      0         2        8      0      no       no        1.6/s    56s   2

RATE is completions per second over the last 10s; ETA is the time until drained at
the 1-minute rate.

JSON (-o json): {\"queues\": [QUEUE...]}, each QUEUE as `stats -o json` prints it.")]
pub struct ListArgs {}

/// Show one queue's options, item counts, totals, rate and ETA.
#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  queue-cli stats keygen -o json

JSON (-o json): {\"name\", \"created_at_ms\", \"options\": {\"lease_timeout_ms\",
\"max_attempts\", \"backoff_base_ms\", \"backoff_cap_ms\", \"max_payload_bytes\",
\"max_depth\", \"retention_ms\"}, \"stats\": {\"queue\", \"ready\", \"delayed\", \"leased\",
\"done\", \"dead\", \"sealed\", \"drained\", \"total_enqueued\", \"total_deliveries\",
\"total_completed\", \"total_failed\", \"total_expired\", \"total_dead\", \"total_purged\",
\"total_deduplicated\", \"oldest_ready_age_ms\", \"rate_10s\", \"rate_1m\", \"eta_ms\",
\"workers\", \"at_ms\"}}")]
pub struct StatsArgs {
    /// Queue name.
    pub queue: String,
}

/// Discard every READY and DELAYED item (kuard's "drain"); leased items stay.
#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  queue-cli purge keygen

JSON (-o json): {\"queue\": NAME, \"purged\": N}")]
pub struct PurgeArgs {
    /// Queue name.
    pub queue: String,
}

/// Seal a queue: no more items will come.
///
/// Enqueue into a sealed queue is refused, and workers and `watch --until sealed`
/// can tell "drained and sealed" (finished) from merely empty.
#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  queue-cli seal keygen

JSON (-o json): the queue, as `stats -o json` prints it.")]
pub struct SealArgs {
    /// Queue name.
    pub queue: String,
}

/// Unseal a queue so it accepts items again.
#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  queue-cli unseal keygen

JSON (-o json): the queue, as `stats -o json` prints it.")]
pub struct UnsealArgs {
    /// Queue name.
    pub queue: String,
}

pub async fn create(global: &Global, args: CreateArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let options = args.options.to_pb();
    // Ask for a plain create first so the CLI can say truthfully whether it created
    // the queue; with --if-not-exists, ALREADY_EXISTS then means "fine, unchanged".
    let request = pb::CreateQueueRequest {
        queue: args.queue.clone(),
        options: Some(options),
        if_not_exists: false,
    };
    let (info, created) = match client.create_queue(request).await {
        Ok(response) => (response.into_inner(), true),
        Err(status) if args.if_not_exists && status.code() == tonic::Code::AlreadyExists => {
            let info = client
                .get_queue(pb::GetQueueRequest {
                    queue: args.queue.clone(),
                })
                .await?
                .into_inner();
            (info, false)
        }
        Err(status) => return Err(status.into()),
    };
    match global.output {
        Format::Json => print_json(&queue_json(&info)),
        Format::Table if created => outln!("queue '{}' created", info.name),
        Format::Table => outln!("queue '{}' already exists (unchanged)", info.name),
    }
    Ok(())
}

pub async fn update(global: &Global, args: UpdateArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let info = client
        .update_queue(pb::UpdateQueueRequest {
            queue: args.queue.clone(),
            options: Some(args.options.to_pb()),
            clear_max_depth: args.unlimited_depth,
        })
        .await?
        .into_inner();
    match global.output {
        Format::Json => print_json(&queue_json(&info)),
        Format::Table => outln!("queue '{}' updated", info.name),
    }
    Ok(())
}

pub async fn delete(global: &Global, args: DeleteArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let response = client
        .delete_queue(pb::DeleteQueueRequest {
            queue: args.queue.clone(),
        })
        .await?
        .into_inner();
    match global.output {
        Format::Json => print_json(&json!({
            "queue": args.queue,
            "items_deleted": response.items_deleted,
        })),
        Format::Table => outln!(
            "queue '{}' deleted ({})",
            args.queue,
            count(response.items_deleted, "item")
        ),
    }
    Ok(())
}

pub async fn list(global: &Global, _args: ListArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let mut queues = client
        .list_queues(pb::ListQueuesRequest {})
        .await?
        .into_inner()
        .queues;
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    match global.output {
        Format::Json => print_json(&json!({
            "queues": queues.iter().map(queue_json).collect::<Vec<_>>(),
        })),
        Format::Table if queues.is_empty() => eprintln!("no queues"),
        Format::Table => {
            let mut table = Table::new(&[
                "NAME", "READY", "DELAYED", "LEASED", "DONE", "DEAD", "SEALED", "DRAINED", "RATE",
                "ETA", "WORKERS",
            ]);
            for queue in &queues {
                let s = queue.stats.clone().unwrap_or_default();
                table.row(vec![
                    queue.name.clone(),
                    s.ready.to_string(),
                    s.delayed.to_string(),
                    s.leased.to_string(),
                    s.done.to_string(),
                    s.dead.to_string(),
                    yes_no(s.sealed),
                    yes_no(s.drained),
                    rate(s.rate_10s),
                    millis(s.eta_ms),
                    s.workers.to_string(),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}

pub async fn stats(global: &Global, args: StatsArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let info = client
        .get_queue(pb::GetQueueRequest { queue: args.queue })
        .await?
        .into_inner();
    match global.output {
        Format::Json => print_json(&queue_json(&info)),
        Format::Table => print_queue(&info),
    }
    Ok(())
}

/// The `stats` view: counts first (what people look for), then totals and options.
fn print_queue(info: &pb::QueueInfo) {
    let s = info.stats.clone().unwrap_or_default();
    let o = info.options.unwrap_or_default();
    let depth = if o.max_depth == 0 {
        "unlimited".to_string()
    } else {
        o.max_depth.to_string()
    };
    print_fields(&[
        ("Queue", info.name.clone()),
        ("Created", format!("{} ago", age(info.created_at_ms))),
        ("Sealed", yes_no(s.sealed)),
        ("Drained", yes_no(s.drained)),
        ("Ready", s.ready.to_string()),
        ("Delayed", s.delayed.to_string()),
        ("Leased", s.leased.to_string()),
        ("Done", s.done.to_string()),
        ("Dead", s.dead.to_string()),
        ("Oldest ready", millis(s.oldest_ready_age_ms)),
        (
            "Rate",
            format!("{} (10s), {} (1m)", rate(s.rate_10s), rate(s.rate_1m)),
        ),
        ("ETA", millis(s.eta_ms)),
        ("Workers", s.workers.to_string()),
        ("Enqueued", s.total_enqueued.to_string()),
        ("Deduplicated", s.total_deduplicated.to_string()),
        ("Deliveries", s.total_deliveries.to_string()),
        ("Completed", s.total_completed.to_string()),
        ("Failed", s.total_failed.to_string()),
        ("Expired", s.total_expired.to_string()),
        ("Went dead", s.total_dead.to_string()),
        ("Purged", s.total_purged.to_string()),
        ("Lease timeout", millis(o.lease_timeout_ms)),
        ("Max attempts", o.max_attempts.to_string()),
        (
            "Backoff",
            format!(
                "{} doubling to {}",
                millis(o.backoff_base_ms),
                millis(o.backoff_cap_ms)
            ),
        ),
        ("Max payload", format!("{} bytes", o.max_payload_bytes)),
        ("Max depth", depth),
        ("Retention", millis(o.retention_ms)),
    ]);
}

pub async fn purge(global: &Global, args: PurgeArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let response = client
        .purge_queue(pb::PurgeQueueRequest {
            queue: args.queue.clone(),
        })
        .await?
        .into_inner();
    match global.output {
        Format::Json => print_json(&json!({"queue": args.queue, "purged": response.purged})),
        Format::Table => outln!(
            "purged {} from queue '{}'",
            count(response.purged, "item"),
            args.queue
        ),
    }
    Ok(())
}

pub async fn seal(global: &Global, args: SealArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let info = client
        .seal_queue(pb::SealQueueRequest { queue: args.queue })
        .await?
        .into_inner();
    print_sealed(global, &info, "sealed");
    Ok(())
}

pub async fn unseal(global: &Global, args: UnsealArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let info = client
        .unseal_queue(pb::UnsealQueueRequest { queue: args.queue })
        .await?
        .into_inner();
    print_sealed(global, &info, "unsealed");
    Ok(())
}

fn print_sealed(global: &Global, info: &pb::QueueInfo, verb: &str) {
    match global.output {
        Format::Json => print_json(&queue_json(info)),
        Format::Table => outln!("queue '{}' {verb}", info.name),
    }
}
