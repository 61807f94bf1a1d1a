//! The worker protocol by hand: `lease`, `ack`, `fail`, `extend`, `release`, for
//! shell-script workers and debugging. Every call after `lease` must show the lease
//! token; a stale one is refused with "lease lost: …" and changes nothing.

use std::os::unix::ffi::OsStringExt;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use serde_json::json;
use workq_proto::{Client, pb};

use super::outage::Outage;
use super::{ms, opt_ms, parse_duration, parse_positive};
use crate::connect::Global;
use crate::output::{Format, Table, cell_text, lease_json, outln, print_json, state_name, until};

/// Lease items: take them for a while, then ack, fail, extend or release each one
/// with its id and token.
///
/// Long-polls up to --wait for an item; returns at once when the queue is drained.
/// Prints nothing on stdout when no item came (a note goes to stderr); the exit code
/// is 0 either way, so check `drained` in the JSON to know when to stop. A
/// coordinator that stops or restarts during the wait is waited for, within --wait
/// (a note goes to stderr); one still down when the wait ends is an error.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  queue-cli lease keygen -o json
  queue-cli lease keygen --max 10 --wait 30s --lease-timeout 5m

A shell worker (needs jq):
  while :; do
    lease=$(queue-cli lease keygen -o json --wait 10s) || exit 1
    item=$(jq -c '.leases[0] // empty' <<<\"$lease\")
    if [ -z \"$item\" ]; then
      [ \"$(jq .drained <<<\"$lease\")\" = true ] && break || continue
    fi
    id=$(jq -r .id <<<\"$item\"); token=$(jq -r .token <<<\"$item\")
    result=$(jq -r .payload <<<\"$item\" | sha256sum | cut -c1-16)
    queue-cli ack keygen \"$id\" \"$token\" --result \"$result\"
  done

JSON (-o json): {\"queue\": NAME, \"drained\": BOOL, \"sealed\": BOOL, \"leases\": [{\"id\",
\"token\", \"attempt\", \"payload\", \"priority\", \"key\", \"deadline_at_ms\",
\"enqueued_at_ms\"}...]}. token is a string: pass it back verbatim. attempt is 1 on
the first delivery. payload is a string, or null with \"payload_base64\" when not UTF-8.")]
pub struct LeaseArgs {
    /// Queue name.
    pub queue: String,

    /// Lease up to N items (1 to 1000).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max: u32,

    /// Wait up to this long for an item (0s to 60s; 0s returns at once).
    #[arg(long, default_value = "10s", value_parser = parse_wait, value_name = "DURATION")]
    pub wait: Duration,

    /// Lease length instead of the queue's lease timeout.
    #[arg(long, value_parser = parse_positive, value_name = "DURATION")]
    pub lease_timeout: Option<Duration>,

    /// Worker id shown in `workers` [default: the host name, or queue-cli].
    #[arg(long, value_name = "ID")]
    pub worker_id: Option<String>,
}

/// Acknowledge a leased item as done, optionally with a result.
#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  queue-cli ack keygen 42 1007 --result 'SHA256:...'

JSON (-o json): {\"queue\": NAME, \"id\": ID, \"state\": \"done\"}")]
pub struct AckArgs {
    /// Queue name.
    pub queue: String,
    /// Item id.
    pub id: u64,
    /// The token `lease` printed.
    #[arg(id = "lease_token", value_name = "TOKEN")]
    pub token: u64,

    /// Result text kept with the item (see `results`).
    #[arg(long, value_name = "TEXT")]
    pub result: Option<std::ffi::OsString>,
}

/// Report that a leased item failed: retried after a backoff, or DEAD with
/// --permanent or when its attempts are used up.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  queue-cli fail keygen 42 1007 --error 'disk full'
  queue-cli fail keygen 42 1007 --permanent --error 'bad input'

JSON (-o json): {\"queue\": NAME, \"id\": ID, \"state\": \"delayed\"|\"ready\"|\"dead\",
\"retry_at_ms\": MS}")]
pub struct FailArgs {
    /// Queue name.
    pub queue: String,
    /// Item id.
    pub id: u64,
    /// The token `lease` printed.
    #[arg(id = "lease_token", value_name = "TOKEN")]
    pub token: u64,

    /// Go straight to DEAD, without further attempts.
    #[arg(long)]
    pub permanent: bool,

    /// What went wrong (shown by `item`).
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub error: String,

    /// Retry after this long instead of the queue's backoff (1ms retries at once).
    #[arg(long, value_parser = parse_positive, value_name = "DURATION")]
    pub delay: Option<Duration>,
}

/// Extend a lease so a long-running item is not handed to another worker.
#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  queue-cli extend keygen 42 1007 --lease-timeout 5m

JSON (-o json): {\"queue\": NAME, \"id\": ID, \"deadline_at_ms\": MS}")]
pub struct ExtendArgs {
    /// Queue name.
    pub queue: String,
    /// Item id.
    pub id: u64,
    /// The token `lease` printed.
    #[arg(id = "lease_token", value_name = "TOKEN")]
    pub token: u64,

    /// New lease length from now [default: the lease's own timeout].
    #[arg(long, value_parser = parse_positive, value_name = "DURATION")]
    pub lease_timeout: Option<Duration>,
}

/// Give a leased item back to the queue without counting the attempt.
#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  queue-cli release keygen 42 1007

JSON (-o json): {\"queue\": NAME, \"id\": ID, \"state\": \"ready\"}")]
pub struct ReleaseArgs {
    /// Queue name.
    pub queue: String,
    /// Item id.
    pub id: u64,
    /// The token `lease` printed.
    #[arg(id = "lease_token", value_name = "TOKEN")]
    pub token: u64,
}

/// The coordinator long-polls for at most a minute; saying so here makes a longer
/// `--wait` a usage error instead of a round trip.
fn parse_wait(text: &str) -> Result<Duration, String> {
    let wait = parse_duration(text)?;
    if wait > Duration::from_secs(60) {
        return Err("the longest wait is 60s".into());
    }
    Ok(wait)
}

/// The pod name in Kubernetes (`HOSTNAME`), else the kernel's host name.
fn default_worker_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "queue-cli".into())
}

pub async fn lease(global: &Global, args: LeaseArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let request = pb::LeaseRequest {
        queue: args.queue.clone(),
        worker_id: args.worker_id.clone().unwrap_or_else(default_worker_id),
        max_items: args.max,
        lease_timeout_ms: opt_ms(args.lease_timeout),
        wait_ms: ms(args.wait),
    };
    let response = long_poll(&mut client, request, args.wait).await?;
    match global.output {
        Format::Json => print_json(&json!({
            "queue": args.queue,
            "drained": response.drained,
            "sealed": response.sealed,
            "leases": response.leases.iter().map(lease_json).collect::<Vec<_>>(),
        })),
        Format::Table if response.leases.is_empty() => {
            if response.drained {
                let sealed = if response.sealed { " and sealed" } else { "" };
                eprintln!("no items: queue '{}' is drained{sealed}", args.queue);
            } else {
                eprintln!(
                    "no items became available within {}",
                    workq_proto::duration::format(args.wait)
                );
            }
        }
        Format::Table => {
            let mut table = Table::new(&["ID", "TOKEN", "ATTEMPT", "EXPIRES", "PAYLOAD"]);
            for lease in &response.leases {
                table.row(vec![
                    lease.id.to_string(),
                    lease.token.to_string(),
                    lease.attempt.to_string(),
                    until(lease.deadline_at_ms),
                    cell_text(&lease.payload, 4096),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}

/// Shortest rest of a wait worth polling again for.
const POLL_AGAIN_MIN: Duration = Duration::from_millis(100);

/// The lease call, waiting out a coordinator restart within `wait`: a long poll
/// the coordinator ended early with nothing (it was stopping), and every failure
/// [`Outage::may_mend`] would retry, are polled again after a pause while the wait
/// lasts. What is left is the last failure.
async fn long_poll(
    client: &mut Client,
    mut request: pb::LeaseRequest,
    wait: Duration,
) -> Result<pb::LeaseResponse> {
    let deadline = Instant::now() + wait;
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut outage = Outage::new(client);
    let mut last_answer = None;
    loop {
        request.wait_ms = ms(left());
        let failure = match client.lease(request.clone()).await {
            Ok(response) => {
                let response = response.into_inner();
                if !response.leases.is_empty() || response.drained || left() < POLL_AGAIN_MIN {
                    return Ok(response);
                }
                // Ended early with nothing: the coordinator is stopping.
                outage.answered();
                last_answer = Some(response);
                None
            }
            Err(status) if outage.may_mend(&status) => Some(status),
            Err(status) => return Err(status.into()),
        };
        let pause = outage.pause();
        if pause >= left() {
            return match failure {
                Some(status) => Err(status.into()),
                // Polled again until the wait ran out: nothing came.
                None => Ok(last_answer.unwrap_or_default()),
            };
        }
        if outage.failures() == 1 {
            eprintln!(
                "the coordinator at {} went away during the wait; waiting for it for up to {}",
                client.url(),
                workq_proto::duration::format(left())
            );
        }
        tokio::time::sleep(pause).await;
    }
}

pub async fn ack(global: &Global, args: AckArgs) -> Result<()> {
    let mut client = global.connect().await?;
    client
        .ack(pb::AckRequest {
            queue: args.queue.clone(),
            id: args.id,
            token: args.token,
            result: args.result.map(OsStringExt::into_vec).unwrap_or_default(),
        })
        .await?;
    match global.output {
        Format::Json => print_json(&json!({"queue": args.queue, "id": args.id, "state": "done"})),
        Format::Table => outln!("item {} done", args.id),
    }
    Ok(())
}

pub async fn fail(global: &Global, args: FailArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let response = client
        .fail(pb::FailRequest {
            queue: args.queue.clone(),
            id: args.id,
            token: args.token,
            error: args.error,
            permanent: args.permanent,
            retry_delay_ms: opt_ms(args.delay),
        })
        .await?
        .into_inner();
    let state = state_name(response.state);
    match global.output {
        Format::Json => print_json(&json!({
            "queue": args.queue,
            "id": args.id,
            "state": state,
            "retry_at_ms": response.retry_at_ms,
        })),
        Format::Table => match pb::ItemState::try_from(response.state) {
            Ok(pb::ItemState::Dead) => outln!("item {} is dead", args.id),
            Ok(pb::ItemState::Delayed) => outln!(
                "item {} will be retried {}",
                args.id,
                until(response.retry_at_ms)
            ),
            _ => outln!("item {} is {state}", args.id),
        },
    }
    Ok(())
}

pub async fn extend(global: &Global, args: ExtendArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let response = client
        .extend(pb::ExtendRequest {
            queue: args.queue.clone(),
            id: args.id,
            token: args.token,
            lease_timeout_ms: opt_ms(args.lease_timeout),
        })
        .await?
        .into_inner();
    match global.output {
        Format::Json => print_json(&json!({
            "queue": args.queue,
            "id": args.id,
            "deadline_at_ms": response.deadline_at_ms,
        })),
        Format::Table => outln!(
            "lease on item {} extended: expires {}",
            args.id,
            until(response.deadline_at_ms)
        ),
    }
    Ok(())
}

pub async fn release(global: &Global, args: ReleaseArgs) -> Result<()> {
    let mut client = global.connect().await?;
    client
        .release(pb::ReleaseRequest {
            queue: args.queue.clone(),
            id: args.id,
            token: args.token,
        })
        .await?;
    match global.output {
        Format::Json => print_json(&json!({"queue": args.queue, "id": args.id, "state": "ready"})),
        Format::Table => outln!("item {} released (attempt not counted)", args.id),
    }
    Ok(())
}
