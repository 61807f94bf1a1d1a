//! `watch`: follows the coordinator's Watch stream (no polling) with a live progress
//! bar, and exits 0 once the queue is drained (and sealed, with `--until sealed`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use workq_proto::pb;

use super::outage::Outage;
use super::parse_duration;
use crate::connect::Global;
use crate::output::{Format, millis, outln, rate, stats_json};

/// Without a terminal, a plain progress line is printed at most this often.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// Without --timeout, how long the coordinator may stay away (a restart, a pod
/// rescheduled) before `watch` gives up.
const OUTAGE_LIMIT: Duration = Duration::from_secs(5 * 60);

/// Follow a queue live until it is drained: a progress bar of finished/total items
/// with the completion rate, ETA and dead count.
///
/// Exits 0 once no READY, DELAYED or LEASED items remain (dead items do not keep a
/// queue from draining); with `--until sealed`, once the queue is also sealed, so a
/// producer that is still enqueueing is waited for. Uses the coordinator's watch
/// stream, so updates arrive as they happen. A coordinator that stops or restarts is
/// waited for, within --timeout or else 5 minutes (a note goes to stderr).
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  queue-cli watch keygen
  queue-cli watch keygen --until sealed --timeout 1h && echo 'batch finished'

Without a terminal (or with --no-progress) a plain line is printed every 10s and a
summary at the end. JSON (-o json): one line per update, each the \"stats\" object
of `stats -o json`; the last line is the one that met --until.")]
pub struct WatchArgs {
    /// Queue name.
    pub queue: String,

    /// When to exit: `drained`, or `sealed` for drained and sealed.
    #[arg(long, value_enum, default_value_t = Until::Drained)]
    pub until: Until,

    /// Give up with exit code 1 after this long.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,

    /// Print plain lines instead of a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Until {
    /// No READY, DELAYED or LEASED items remain.
    Drained,
    /// Drained, and sealed so no more items can come.
    Sealed,
}

impl Until {
    fn reached(self, stats: &pb::QueueStats) -> bool {
        stats.drained && (self == Until::Drained || stats.sealed)
    }

    fn describe(self) -> &'static str {
        match self {
            Until::Drained => "drained",
            Until::Sealed => "drained and sealed",
        }
    }
}

pub async fn run(global: &Global, args: WatchArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    let bar =
        if global.output == Format::Table && !args.no_progress && std::io::stdout().is_terminal() {
            Some(progress_bar())
        } else {
            None
        };
    let give_up = |error: anyhow::Error| {
        if let Some(bar) = &bar {
            bar.abandon();
        }
        error
    };
    let timed_out = || {
        give_up(anyhow!(
            "timed out after {} waiting for queue '{}' to be {}",
            workq_proto::duration::format(args.timeout.unwrap_or_default()),
            args.queue,
            args.until.describe()
        ))
    };
    let mut outage = Outage::new(&client);
    let mut down_since = None;
    let mut stream = None;
    let mut last_plain: Option<Instant> = None;

    loop {
        let next = match &mut stream {
            None => {
                let request = pb::WatchRequest {
                    queue: args.queue.clone(),
                    min_interval_ms: 200,
                };
                match within(deadline, client.watch(request))
                    .await
                    .ok_or_else(timed_out)?
                {
                    Ok(opened) => {
                        stream = Some(opened.into_inner());
                        continue;
                    }
                    Err(status) => Err(status),
                }
            }
            Some(open) => match within(deadline, open.message())
                .await
                .ok_or_else(timed_out)?
            {
                Ok(Some(stats)) => Ok(stats),
                // A coordinator that stops ends its streams.
                Ok(None) => Err(tonic::Status::unavailable(
                    "the coordinator closed the watch stream",
                )),
                Err(status) => Err(status),
            },
        };
        let stats = match next {
            Ok(stats) => stats,
            Err(status) => {
                // Another stream, after a pause, while a try may mend it.
                stream = None;
                if !outage.may_mend(&status) {
                    return Err(give_up(status.into()));
                }
                let pause = outage.pause();
                let since = *down_since.get_or_insert_with(Instant::now);
                let left = match deadline {
                    Some(deadline) => deadline
                        .into_std()
                        .saturating_duration_since(Instant::now()),
                    None => OUTAGE_LIMIT.saturating_sub(since.elapsed()),
                };
                if pause >= left {
                    return Err(give_up(anyhow::Error::new(status).context(format!(
                        "the coordinator stayed away for {}",
                        workq_proto::duration::format(since.elapsed())
                    ))));
                }
                if outage.failures() == 1 {
                    let note = format!(
                        "the coordinator at {} went away; waiting for it for up to {}",
                        client.url(),
                        workq_proto::duration::format(left)
                    );
                    match &bar {
                        Some(bar) => bar.suspend(|| eprintln!("{note}")),
                        None => eprintln!("{note}"),
                    }
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        outage.over();
        down_since = None;
        let reached = args.until.reached(&stats);
        match (global.output, &bar) {
            (Format::Json, _) => outln!("{}", stats_json(&stats)),
            (Format::Table, Some(bar)) => update(bar, &stats, args.until),
            (Format::Table, None) => {
                if !reached && last_plain.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
                    outln!("{}", plain_line(&stats));
                    last_plain = Some(Instant::now());
                }
            }
        }
        if reached {
            if let Some(bar) = &bar {
                bar.finish();
            }
            if global.output == Format::Table {
                outln!(
                    "queue '{}' {}: {} done, {} dead",
                    args.queue,
                    args.until.describe(),
                    stats.done,
                    stats.dead
                );
            }
            return Ok(());
        }
    }
}

/// `call`, unless `deadline` (--timeout) comes first: then `None`.
async fn within<F: Future>(deadline: Option<tokio::time::Instant>, call: F) -> Option<F::Output> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, call).await.ok(),
        None => Some(call.await),
    }
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{wide_bar} {pos}/{len} finished  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// Finished = done + dead; total = finished + ready + delayed + leased.
fn counts(stats: &pb::QueueStats) -> (u64, u64) {
    let finished = stats.done + stats.dead;
    let total = finished + stats.ready + stats.delayed + stats.leased;
    (finished, total)
}

fn update(bar: &ProgressBar, stats: &pb::QueueStats, until: Until) {
    let (finished, total) = counts(stats);
    bar.set_length(total);
    bar.set_position(finished);
    let mut message = format!(
        "({} done, {} dead)  {}  ETA {}",
        stats.done,
        stats.dead,
        rate(stats.rate_10s),
        millis(stats.eta_ms)
    );
    if until == Until::Sealed && !stats.sealed {
        message.push_str(if stats.drained {
            "  waiting for seal"
        } else {
            "  not sealed"
        });
    }
    bar.set_message(message);
}

fn plain_line(stats: &pb::QueueStats) -> String {
    let (finished, total) = counts(stats);
    format!(
        "queue '{}': {finished}/{total} finished ({} done, {} dead), {}, ETA {}{}",
        stats.queue,
        stats.done,
        stats.dead,
        rate(stats.rate_10s),
        millis(stats.eta_ms),
        if stats.sealed { ", sealed" } else { "" }
    )
}
