//! `schedule create|list|delete|suspend|resume`: CronJobs for queues.

use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use workq_proto::pb;

use super::{opt_ms, parse_duration};
use crate::connect::Global;
use crate::output::{
    Format, Table, age, cell_text, insert_bytes, millis, outln, print_fields, print_json, until,
    yes_no,
};

#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    Create(CreateArgs),
    List(ListArgs),
    /// Delete a schedule; the items it enqueued stay.
    Delete(NameArgs),
    /// Stop a schedule's ticks; the items it enqueued stay.
    Suspend(NameArgs),
    /// Start a suspended schedule's ticks again. The most recent tick missed while it
    /// was suspended runs at once, unless it is past the starting deadline.
    Resume(NameArgs),
}

/// Enqueue a batch into a queue at each tick of a cron schedule (a CronJob for
/// queues).
///
/// The cron is Kubernetes' (five fields: minute hour day-of-month month day-of-week;
/// @hourly, @daily, @weekly, @monthly, @yearly), or six fields with seconds first. It
/// is read in --time-zone (UTC by default). Each tick enqueues --count items of
/// --payload, where `{i}` becomes the item's index in the tick and `{tick}` the tick's
/// time (RFC 3339, UTC).
///
/// While the previous tick's items are unfinished, --concurrency-policy decides: Allow
/// enqueues anyway, Forbid skips the tick, Replace purges the previous tick's READY and
/// DELAYED items first (its LEASED ones finish). After the coordinator was down, the
/// most recent missed tick runs once if it is within --starting-deadline; earlier ones
/// are not made up.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  queue-cli schedule create nightly --queue keygen --cron '0 2 * * *' \\
      --time-zone Europe/Stockholm --count 100 --payload 'key-{i}' \\
      --concurrency-policy Forbid --starting-deadline 10m
  queue-cli schedule create every-10s --queue q --cron '*/10 * * * * *'

JSON (-o json): the schedule, as `schedule list NAME -o json` prints it.")]
pub struct CreateArgs {
    /// Schedule name: 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit.
    pub name: String,

    /// The queue each tick enqueues into (it must exist).
    #[arg(long)]
    pub queue: String,

    /// When to tick, e.g. '*/5 * * * *' or @hourly.
    #[arg(long, value_name = "EXPR")]
    pub cron: String,

    /// IANA time zone the cron is read in, e.g. Europe/Stockholm.
    #[arg(long, value_name = "TZ", default_value = "UTC")]
    pub time_zone: String,

    /// Each item's payload ({i}: index in the tick, {tick}: the tick's time).
    #[arg(long, default_value = "")]
    pub payload: String,

    /// Items per tick.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub count: u32,

    /// What a tick does while the previous tick's items are unfinished.
    #[arg(long, value_enum, default_value_t = Policy::Allow)]
    pub concurrency_policy: Policy,

    /// A tick that cannot run within this long of its time is missed (default: no
    /// deadline).
    #[arg(long, value_parser = parse_deadline, value_name = "DURATION")]
    pub starting_deadline: Option<Duration>,

    /// Create it suspended (resume it to start).
    #[arg(long)]
    pub suspend: bool,
}

/// A starting deadline of at least a millisecond: the API's 0 means "none", and a
/// deadline of nothing would miss every tick, since a tick always runs a little late.
fn parse_deadline(text: &str) -> Result<Duration, String> {
    let deadline = parse_duration(text)?;
    if deadline < Duration::from_millis(1) {
        return Err(format!(
            "a starting deadline must be at least 1ms, not '{text}' (leave it out for none)"
        ));
    }
    Ok(deadline)
}

/// Kubernetes' `concurrencyPolicy` values.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    #[value(name = "Allow")]
    Allow,
    #[value(name = "Forbid")]
    Forbid,
    #[value(name = "Replace")]
    Replace,
}

impl Policy {
    fn to_pb(self) -> pb::ConcurrencyPolicy {
        match self {
            Policy::Allow => pb::ConcurrencyPolicy::Allow,
            Policy::Forbid => pb::ConcurrencyPolicy::Forbid,
            Policy::Replace => pb::ConcurrencyPolicy::Replace,
        }
    }
}

/// List schedules with their last run and next tick, or one schedule with its last
/// runs.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  queue-cli schedule list
  NAME      QUEUE    CRON        TIMEZONE           POLICY   SUSPEND   LAST   RESULT         NEXT
  nightly   keygen   0 2 * * *   Europe/Stockholm   Forbid   no        21h    enqueued 100   in 2h59m

LAST is the time since the last tick, RESULT what it did.

  queue-cli schedule list nightly      (its fields and its last ten runs)

JSON (-o json): {\"schedules\": [SCHEDULE...]}; with NAME, the SCHEDULE alone: name,
queue, cron, time_zone, payload, count, concurrency_policy, starting_deadline_ms,
suspended, created_at_ms, next_run_at_ms (0 while suspended), enqueued_runs,
skipped_runs, missed_runs, failed_runs, and runs (most recent first: scheduled_at_ms,
ran_at_ms, outcome enqueued|skipped|missed|failed, items, replaced, detail).")]
pub struct ListArgs {
    /// Show this schedule and its last runs.
    pub name: Option<String>,

    /// Only schedules that enqueue into this queue.
    #[arg(long)]
    pub queue: Option<String>,
}

#[derive(Args, Debug)]
pub struct NameArgs {
    /// Schedule name.
    pub name: String,
}

pub async fn run(global: &Global, command: ScheduleCommand) -> Result<()> {
    match command {
        ScheduleCommand::Create(args) => create(global, args).await,
        ScheduleCommand::List(args) => list(global, args).await,
        ScheduleCommand::Delete(args) => delete(global, args).await,
        ScheduleCommand::Suspend(args) => set_suspended(global, args, true).await,
        ScheduleCommand::Resume(args) => set_suspended(global, args, false).await,
    }
}

async fn create(global: &Global, args: CreateArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let schedule = client
        .create_schedule(pb::CreateScheduleRequest {
            name: args.name,
            queue: args.queue,
            cron: args.cron,
            time_zone: args.time_zone,
            payload: args.payload.into_bytes(),
            count: args.count,
            concurrency_policy: args.concurrency_policy.to_pb() as i32,
            starting_deadline_ms: opt_ms(args.starting_deadline),
            suspend: args.suspend,
        })
        .await?
        .into_inner();
    match global.output {
        Format::Json => print_json(&schedule_json(&schedule)),
        Format::Table if schedule.suspended => {
            outln!("schedule '{}' created, suspended", schedule.name)
        }
        Format::Table => outln!(
            "schedule '{}' created; next run {}",
            schedule.name,
            until(schedule.next_run_at_ms)
        ),
    }
    Ok(())
}

async fn list(global: &Global, args: ListArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let schedules = client
        .list_schedules(pb::ListSchedulesRequest {
            queue: args.queue.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .schedules;
    if let Some(name) = args.name {
        let schedule = schedules
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                anyhow::anyhow!("schedule '{name}' not found (see queue-cli schedule list)")
            })?;
        return show(global, &schedule);
    }
    match global.output {
        Format::Json => print_json(&json!({
            "schedules": schedules.iter().map(schedule_json).collect::<Vec<_>>(),
        })),
        Format::Table if schedules.is_empty() => eprintln!("no schedules"),
        Format::Table => {
            let mut table = Table::new(&[
                "NAME", "QUEUE", "CRON", "TIMEZONE", "POLICY", "SUSPEND", "LAST", "RESULT", "NEXT",
            ]);
            for s in &schedules {
                let last = s.runs.first();
                table.row(vec![
                    s.name.clone(),
                    s.queue.clone(),
                    s.cron.clone(),
                    s.time_zone.clone(),
                    policy_name(s.concurrency_policy).into(),
                    yes_no(s.suspended),
                    last.map_or_else(|| "-".into(), |run| age(run.scheduled_at_ms)),
                    last.map_or_else(|| "-".into(), |run| cell_text(result(run).as_bytes(), 40)),
                    until(s.next_run_at_ms),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}

/// One schedule: its fields, then its last runs.
fn show(global: &Global, s: &pb::Schedule) -> Result<()> {
    if global.output == Format::Json {
        print_json(&schedule_json(s));
        return Ok(());
    }
    print_fields(&[
        ("name", s.name.clone()),
        ("queue", s.queue.clone()),
        ("cron", format!("{} ({})", s.cron, s.time_zone)),
        ("payload", cell_text(&s.payload, 60)),
        ("count", s.count.to_string()),
        ("policy", policy_name(s.concurrency_policy).into()),
        ("starting deadline", millis(s.starting_deadline_ms)),
        ("suspended", yes_no(s.suspended)),
        ("next run", until(s.next_run_at_ms)),
        (
            "runs",
            format!(
                "{} enqueued, {} skipped, {} missed, {} failed",
                s.enqueued_runs, s.skipped_runs, s.missed_runs, s.failed_runs
            ),
        ),
    ]);
    if s.runs.is_empty() {
        outln!("\nno runs yet");
        return Ok(());
    }
    outln!();
    let mut table = Table::new(&["SCHEDULED", "RAN", "OUTCOME", "ITEMS", "DETAIL"]);
    for run in &s.runs {
        table.row(vec![
            format!("{} ago", age(run.scheduled_at_ms)),
            format!("{} ago", age(run.ran_at_ms)),
            outcome_name(run.outcome).into(),
            run.items.to_string(),
            cell_text(detail(run).as_bytes(), 80),
        ]);
    }
    table.print();
    Ok(())
}

async fn delete(global: &Global, args: NameArgs) -> Result<()> {
    let mut client = global.connect().await?;
    client
        .delete_schedule(pb::DeleteScheduleRequest {
            name: args.name.clone(),
        })
        .await?;
    match global.output {
        Format::Json => print_json(&json!({ "schedule": args.name, "deleted": true })),
        Format::Table => outln!("schedule '{}' deleted", args.name),
    }
    Ok(())
}

async fn set_suspended(global: &Global, args: NameArgs, suspend: bool) -> Result<()> {
    let mut client = global.connect().await?;
    let schedule = if suspend {
        client
            .suspend_schedule(pb::SuspendScheduleRequest { name: args.name })
            .await?
            .into_inner()
    } else {
        // The runs so far, to tell the tick the resume handled (if any) from older
        // ones; a schedule that was not suspended handles none.
        let before = client
            .list_schedules(pb::ListSchedulesRequest::default())
            .await?
            .into_inner()
            .schedules
            .iter()
            .find(|s| s.name == args.name)
            .map_or(
                u64::MAX,
                |s| if s.suspended { total_runs(s) } else { u64::MAX },
            );
        let schedule = client
            .resume_schedule(pb::ResumeScheduleRequest { name: args.name })
            .await?
            .into_inner();
        if global.output == Format::Table {
            let caught_up = match schedule.runs.first() {
                Some(run) if total_runs(&schedule) > before => {
                    let detail = match detail(run).as_str() {
                        _ if run.outcome == pb::RunOutcome::Failed as i32 => String::new(),
                        "-" => String::new(),
                        detail => format!(" ({detail})"),
                    };
                    format!(
                        "; the tick of {} ago, missed while suspended: {}{detail}",
                        age(run.scheduled_at_ms),
                        result(run)
                    )
                }
                _ => String::new(),
            };
            outln!(
                "schedule '{}' resumed{caught_up}; next run {}",
                schedule.name,
                until(schedule.next_run_at_ms)
            );
            return Ok(());
        }
        schedule
    };
    match global.output {
        Format::Json => print_json(&schedule_json(&schedule)),
        Format::Table => outln!("schedule '{}' suspended", schedule.name),
    }
    Ok(())
}

/// Every tick the schedule has handled.
fn total_runs(s: &pb::Schedule) -> u64 {
    s.enqueued_runs + s.skipped_runs + s.missed_runs + s.failed_runs
}

fn policy_name(code: i32) -> &'static str {
    match pb::ConcurrencyPolicy::try_from(code) {
        Ok(pb::ConcurrencyPolicy::Forbid) => "Forbid",
        Ok(pb::ConcurrencyPolicy::Replace) => "Replace",
        _ => "Allow",
    }
}

fn outcome_name(code: i32) -> &'static str {
    match pb::RunOutcome::try_from(code) {
        Ok(pb::RunOutcome::Enqueued) => "enqueued",
        Ok(pb::RunOutcome::Skipped) => "skipped",
        Ok(pb::RunOutcome::Missed) => "missed",
        Ok(pb::RunOutcome::Failed) => "failed",
        _ => "unknown",
    }
}

/// What a run did, in a few words: "enqueued 100", "skipped", "failed: …".
fn result(run: &pb::ScheduleRun) -> String {
    match pb::RunOutcome::try_from(run.outcome) {
        Ok(pb::RunOutcome::Enqueued) => format!("enqueued {}", run.items),
        Ok(pb::RunOutcome::Failed) => format!("failed: {}", run.detail),
        _ => outcome_name(run.outcome).into(),
    }
}

/// A run's detail, with Replace's purge in front.
fn detail(run: &pb::ScheduleRun) -> String {
    match (run.replaced, run.detail.is_empty()) {
        (0, true) => "-".into(),
        (0, false) => run.detail.clone(),
        (n, true) => format!("replaced {n}"),
        (n, false) => format!("replaced {n}; {}", run.detail),
    }
}

fn schedule_json(s: &pb::Schedule) -> Value {
    let mut value = json!({
        "name": s.name,
        "queue": s.queue,
        "cron": s.cron,
        "time_zone": s.time_zone,
        "count": s.count,
        "concurrency_policy": policy_name(s.concurrency_policy),
        "starting_deadline_ms": s.starting_deadline_ms,
        "suspended": s.suspended,
        "created_at_ms": s.created_at_ms,
        "next_run_at_ms": s.next_run_at_ms,
        "enqueued_runs": s.enqueued_runs,
        "skipped_runs": s.skipped_runs,
        "missed_runs": s.missed_runs,
        "failed_runs": s.failed_runs,
        "runs": s.runs.iter().map(|run| json!({
            "scheduled_at_ms": run.scheduled_at_ms,
            "ran_at_ms": run.ran_at_ms,
            "outcome": outcome_name(run.outcome),
            "items": run.items,
            "replaced": run.replaced,
            "detail": run.detail,
        })).collect::<Vec<_>>(),
    });
    insert_bytes(&mut value, "payload", &s.payload);
    value
}
