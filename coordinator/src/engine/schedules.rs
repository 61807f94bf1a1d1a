//! Schedules: a CronJob for queues (PRODUCT.md "Schedules").
//!
//! At each tick of its cron a schedule enqueues its batch (`count` items of its
//! payload) into its queue. The rules are Kubernetes' CronJob rules (k8s-jobs.md §11),
//! with items in place of Jobs:
//! - **Concurrency policy.** Allow enqueues regardless. Forbid skips the tick while any
//!   item of the last enqueued tick is READY, DELAYED or LEASED (an item gone by
//!   retention or purge counts as finished). Replace purges the last tick's READY and
//!   DELAYED items first; its LEASED items finish.
//! - **Missed ticks.** A schedule remembers the last tick it handled. Whenever the
//!   scheduler looks (at each tick, at start-up, on resume), only the most recent due
//!   tick runs; the ones before it are never back-filled. A tick more than the starting
//!   deadline late is recorded as missed instead. So after a restart the most recent
//!   tick missed while the coordinator was down runs once, if it is within the
//!   deadline; ticks while suspended count as missed, and resuming runs the most
//!   recent one under the same rule. Every tick passed over counts as missed (up to
//!   10,000 at one look), and more than 100 at once draw a warning, as Kubernetes'
//!   `TooManyMissedTimes` does.
//! - **A tick's items once.** A tick that enqueues writes its items and its
//!   schedule's record saying it ran in one atomic batch, so a crash leaves both or
//!   neither: the items never come back without the record that Forbid and Replace
//!   find them through, and a restart never runs their tick again. Each item also
//!   carries the dedup key `schedule/<name>/<tick ms>/<i>` (as Kubernetes names a
//!   CronJob's Job after its scheduled time), so should a tick run twice all the
//!   same, the keys would turn the second enqueue into the first one's items, as long
//!   as the queue keeps them (DONE items go after its retention).
//!
//! The scheduler is one task, like the reaper: it sleeps until the earliest next tick
//! of any schedule and is woken when schedules change. Ticks run one at a time, each
//! through the queue's ordinary enqueue (limits, sealing, max depth, group commit).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{Mutex, Notify};

use super::Engine;
use super::cron::{self, CronSpec};
use super::limits;
use super::queue::{NewItem, State};
use crate::error::{Error, Result};
use crate::store::{RunRecord, ScheduleRecord, Ticket};

/// Runs kept per schedule (`schedule list` shows them, most recent first).
pub const RUNS_KEPT: usize = 10;

/// More ticks passed over than this at one look draw a warning, as Kubernetes warns
/// `TooManyMissedTimes` past 100.
const TOO_MANY_MISSED: u64 = 100;

/// Passed-over ticks counted at one look, at most: a per-second schedule suspended
/// for a month is not walked tick by tick under the schedules' lock.
const MISSED_COUNTED: u64 = 10_000;

/// What a tick does while the previous tick's items are unfinished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Allow,
    Forbid,
    Replace,
}

impl Policy {
    /// The code in records and in workq.proto; 0 (unset) is Allow.
    pub fn from_code(code: u32) -> Option<Policy> {
        match code {
            0 | 1 => Some(Policy::Allow),
            2 => Some(Policy::Forbid),
            3 => Some(Policy::Replace),
            _ => None,
        }
    }

    /// Kubernetes' spelling.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Allow => "Allow",
            Policy::Forbid => "Forbid",
            Policy::Replace => "Replace",
        }
    }

    pub fn code(self) -> u32 {
        match self {
            Policy::Allow => 1,
            Policy::Forbid => 2,
            Policy::Replace => 3,
        }
    }
}

/// How a tick went (`RunOutcome` in workq.proto).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Enqueued = 1,
    Skipped = 2,
    Missed = 3,
    Failed = 4,
}

/// A schedule to create.
#[derive(Clone, Debug)]
pub struct NewSchedule {
    pub name: String,
    pub queue: String,
    pub cron: String,
    /// Empty: UTC.
    pub time_zone: String,
    pub payload: Vec<u8>,
    /// 0: one item.
    pub count: u32,
    pub policy: Policy,
    /// 0: no deadline.
    pub starting_deadline_ms: u64,
    pub suspend: bool,
}

impl NewSchedule {
    /// One item a tick with an empty payload, in UTC, Allow, no deadline, running.
    pub fn new(
        name: impl Into<String>,
        queue: impl Into<String>,
        cron: impl Into<String>,
    ) -> NewSchedule {
        NewSchedule {
            name: name.into(),
            queue: queue.into(),
            cron: cron.into(),
            time_zone: String::new(),
            payload: Vec::new(),
            count: 1,
            policy: Policy::Allow,
            starting_deadline_ms: 0,
            suspend: false,
        }
    }
}

/// A schedule as clients see it.
#[derive(Clone, Debug)]
pub struct ScheduleView {
    pub record: ScheduleRecord,
    /// The next tick; `None` while suspended.
    pub next_run_ms: Option<u64>,
}

struct Entry {
    record: ScheduleRecord,
    spec: CronSpec,
}

impl Entry {
    fn view(&self, now: u64) -> ScheduleView {
        ScheduleView {
            record: self.record.clone(),
            next_run_ms: self.next_run(now),
        }
    }

    /// The next tick after both `now` and the last one handled; `None` while
    /// suspended.
    fn next_run(&self, now: u64) -> Option<u64> {
        if self.record.suspended {
            return None;
        }
        self.spec.next_after(now.max(self.record.last_tick_ms))
    }
}

/// Every schedule, behind one async lock: changes are rare, and a tick holds it while
/// its enqueue is made durable, so an admin call never sees a half-handled tick.
pub(super) struct Schedules {
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Wakes the scheduler when a schedule changes.
    wake: Arc<Notify>,
}

impl Schedules {
    /// The schedules read back at start-up.
    pub(super) fn recover(records: Vec<ScheduleRecord>) -> Schedules {
        let mut entries = BTreeMap::new();
        for record in records {
            match CronSpec::parse(&record.cron, &record.time_zone) {
                Ok(spec) => {
                    entries.insert(record.name.clone(), Entry { record, spec });
                }
                Err(e) => tracing::error!(
                    schedule = %record.name,
                    error = %e,
                    "a stored schedule's cron no longer parses; it will not run"
                ),
            }
        }
        if !entries.is_empty() {
            tracing::info!(schedules = entries.len(), "schedules recovered");
        }
        Schedules {
            entries: Mutex::new(entries),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Every schedule's record, for a snapshot. Call from a thread outside the runtime.
    pub(super) fn records_blocking(&self) -> Vec<ScheduleRecord> {
        self.entries
            .blocking_lock()
            .values()
            .map(|entry| entry.record.clone())
            .collect()
    }
}

impl Engine {
    pub async fn create_schedule(&self, new: NewSchedule) -> Result<ScheduleView> {
        limits::check_schedule_name(&new.name)?;
        let spec = CronSpec::parse(&new.cron, &new.time_zone)?;
        let count = new.count.max(1);
        if count as usize > limits::MAX_BATCH_ITEMS {
            return Err(Error::invalid(format!(
                "a schedule enqueues at most {} items a tick, not {count}",
                limits::MAX_BATCH_ITEMS
            )));
        }
        let queue = self.get_queue(&new.queue)?;
        // The longest payload a tick makes: the last index, a time stamp's 20 bytes.
        let widest = expand(&new.payload, count - 1, "0000-00-00T00:00:00Z").len() as u64;
        if widest > queue.options.max_payload_bytes {
            return Err(Error::invalid(format!(
                "payload of up to {widest} bytes ({{i}} and {{tick}} filled in) is over \
                 queue '{}''s max payload of {} bytes",
                new.queue, queue.options.max_payload_bytes
            )));
        }
        if widest * u64::from(count) > limits::MAX_TICK_BYTES {
            return Err(Error::invalid(format!(
                "a tick would enqueue up to {} bytes ({count} items of up to {widest}), \
                 over the {} MiB one tick may hold: lower the count or the payload",
                widest * u64::from(count),
                limits::MAX_TICK_BYTES >> 20
            )));
        }
        let now = self.clock.now_ms();
        let record = ScheduleRecord {
            name: new.name.clone(),
            queue: new.queue,
            cron: new.cron.trim().to_string(),
            time_zone: spec.zone_name().to_string(),
            payload: new.payload,
            count,
            policy: new.policy.code(),
            starting_deadline_ms: new.starting_deadline_ms,
            suspended: new.suspend,
            created_ms: now,
            last_tick_ms: now,
            ..ScheduleRecord::default()
        };
        let view = {
            let mut entries = self.schedules.entries.lock().await;
            if entries.contains_key(&new.name) {
                return Err(Error::ScheduleExists(new.name));
            }
            let ticket = self.store.write(|batch| batch.put_schedule(&record))?;
            let entry = Entry { record, spec };
            let view = entry.view(now);
            entries.insert(new.name.clone(), entry);
            self.store.sync(ticket).await?;
            view
        };
        self.schedules.wake.notify_one();
        tracing::info!(schedule = %new.name, queue = %view.record.queue, cron = %view.record.cron, "schedule created");
        Ok(view)
    }

    /// Every schedule, by name.
    pub async fn all_schedules(&self) -> Vec<ScheduleView> {
        self.schedules_of(None).await
    }

    /// Every schedule (only those enqueueing into `queue`, when given), by name. A
    /// name no queue could have is refused; one no queue has now may still have
    /// schedules (their queue was deleted), so it is not.
    pub async fn list_schedules(&self, queue: Option<&str>) -> Result<Vec<ScheduleView>> {
        if let Some(queue) = queue {
            limits::check_queue_name(queue)?;
        }
        Ok(self.schedules_of(queue).await)
    }

    async fn schedules_of(&self, queue: Option<&str>) -> Vec<ScheduleView> {
        let now = self.clock.now_ms();
        let entries = self.schedules.entries.lock().await;
        entries
            .values()
            .filter(|entry| queue.is_none_or(|q| entry.record.queue == q))
            .map(|entry| entry.view(now))
            .collect()
    }

    /// Deletes a schedule; the items its ticks enqueued stay.
    pub async fn delete_schedule(&self, name: &str) -> Result<()> {
        let mut entries = self.schedules.entries.lock().await;
        if !entries.contains_key(name) {
            return Err(Error::ScheduleNotFound(name.to_string()));
        }
        let ticket = self.store.write(|batch| batch.delete_schedule(name))?;
        entries.remove(name);
        self.store.sync(ticket).await?;
        drop(entries);
        self.schedules.wake.notify_one();
        tracing::info!(schedule = name, "schedule deleted");
        Ok(())
    }

    pub async fn set_schedule_suspended(
        &self,
        name: &str,
        suspended: bool,
    ) -> Result<ScheduleView> {
        let mut entries = self.schedules.entries.lock().await;
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| Error::ScheduleNotFound(name.to_string()))?;
        let mut due = None;
        if entry.record.suspended != suspended {
            let mut record = entry.record.clone();
            record.suspended = suspended;
            let ticket = self.store.write(|batch| batch.put_schedule(&record))?;
            entry.record = record;
            self.store.sync(ticket).await?;
            tracing::info!(schedule = name, suspended, "schedule suspension changed");
            if !suspended {
                let now = self.clock.now_ms();
                due = entry
                    .spec
                    .latest_at_or_before(now)
                    .filter(|&tick| tick > entry.record.last_tick_ms)
                    .map(|tick| self.run_tick(entry, tick, now));
            }
        }
        // Resumed: the most recent tick missed while suspended is handled before the
        // answer, so the answer's runs show what it did.
        if let Some(ran) = due {
            self.log_runs(&mut entries, vec![ran]).await;
        }
        let view = entries
            .get(name)
            .ok_or_else(|| Error::ScheduleNotFound(name.to_string()))?
            .view(self.clock.now_ms());
        drop(entries);
        self.schedules.wake.notify_one();
        Ok(view)
    }

    /// Handles every schedule's due tick; returns the earliest next tick (`u64::MAX`:
    /// none). Ticks due together share their sync: each tick that enqueues writes its
    /// items and its schedule's new record in one batch, the other ticks' records go
    /// in one more batch, and one sync covers them all. So a thousand schedules on the
    /// same minute cost one sync, not a thousand.
    async fn run_due_schedules(&self) -> u64 {
        let mut entries = self.schedules.entries.lock().await;
        let mut ran = Vec::new();
        for entry in entries.values() {
            if entry.record.suspended {
                continue;
            }
            let now = self.clock.now_ms();
            if let Some(tick) = entry
                .spec
                .latest_at_or_before(now)
                .filter(|&tick| tick > entry.record.last_tick_ms)
            {
                ran.push(self.run_tick(entry, tick, now));
            }
        }
        if !ran.is_empty() {
            self.log_runs(&mut entries, ran).await;
        }
        let now = self.clock.now_ms();
        entries
            .values()
            .filter_map(|entry| entry.next_run(now))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Logs the new records of the ticks that did not enqueue, waits until every
    /// record is durable, and only then takes them. A failure leaves the old records:
    /// the ticks run again at the next look, and their items' dedup keys make that
    /// the same items.
    async fn log_runs(&self, entries: &mut BTreeMap<String, Entry>, ran: Vec<Ran>) {
        let mut last = ran.iter().filter_map(|ran| ran.logged).max();
        let unlogged: Vec<&ScheduleRecord> = ran
            .iter()
            .filter(|ran| ran.logged.is_none())
            .map(|ran| &ran.record)
            .collect();
        if !unlogged.is_empty() {
            let logged = self.store.write(|batch| {
                for record in &unlogged {
                    batch.put_schedule(record);
                }
            });
            match logged {
                Ok(ticket) => last = last.max(Some(ticket)),
                Err(e) => {
                    tracing::error!(error = %e, "logging schedule ticks failed; they run again");
                    return;
                }
            }
        }
        if let Some(ticket) = last
            && let Err(e) = self.store.sync(ticket).await
        {
            tracing::error!(error = %e, "logging schedule ticks failed; they run again");
            return;
        }
        for Ran { record, .. } in ran {
            let last = &record.runs[0];
            tracing::info!(
                schedule = %record.name,
                queue = %record.queue,
                tick = %cron::rfc3339(last.scheduled_ms),
                outcome = Outcome::from_code(last.outcome).map_or("unknown", Outcome::name),
                items = last.items,
                detail = %last.detail,
                "schedule tick"
            );
            if let Some(entry) = entries.get_mut(&record.name) {
                entry.record = record;
            }
        }
    }

    /// Runs (or records as missed) the tick at `tick`. Waits for nothing.
    /// The ticks it passes over (after the last one handled, before `tick`) are
    /// not back-filled: they count as missed, and the run's detail says how many.
    fn run_tick(&self, entry: &Entry, tick: u64, now: u64) -> Ran {
        let passed_over = entry
            .spec
            .ticks_between(entry.record.last_tick_ms, tick, MISSED_COUNTED);
        let counted;
        let record = if passed_over == 0 {
            &entry.record
        } else {
            let mut record = entry.record.clone();
            record.missed_runs += passed_over;
            counted = record;
            &counted
        };
        if passed_over > TOO_MANY_MISSED {
            tracing::warn!(
                schedule = %record.name,
                missed = passed_over,
                "too many missed ticks (more than {TOO_MANY_MISSED}) since the last one \
                 handled; only the most recent runs. Is the coordinator's clock right, or \
                 was the schedule suspended?"
            );
        }
        let passed_note = match passed_over {
            0 => String::new(),
            MISSED_COUNTED => format!("{MISSED_COUNTED} or more earlier ticks missed"),
            1 => "1 earlier tick missed".to_string(),
            n => format!("{n} earlier ticks missed"),
        };
        let late = now.saturating_sub(tick);
        let run = |outcome: Outcome, detail: String| RunRecord {
            scheduled_ms: tick,
            ran_ms: now,
            outcome: outcome as u32,
            detail: [detail, passed_note.clone()]
                .into_iter()
                .filter(|part| !part.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
            ..RunRecord::default()
        };
        let unlogged = |record: ScheduleRecord| Ran {
            record,
            logged: None,
        };
        if record.starting_deadline_ms > 0 && late > record.starting_deadline_ms {
            let detail = format!(
                "{} late, past the starting deadline of {}",
                human_ms(late),
                human_ms(record.starting_deadline_ms)
            );
            return unlogged(after(record, run(Outcome::Missed, detail)));
        }
        let detail = if late >= 1_000 {
            format!("{} late", human_ms(late))
        } else {
            String::new()
        };
        match self.enqueue_tick(record, tick, run(Outcome::Enqueued, detail)) {
            Ok((Tick::Enqueued(record), ticket)) => Ran {
                record: *record,
                logged: Some(ticket),
            },
            Ok((Tick::Skipped { unfinished }, _)) => {
                let detail = format!(
                    "Forbid: {unfinished} item(s) of the previous run are not done or dead"
                );
                unlogged(after(record, run(Outcome::Skipped, detail)))
            }
            Err(e) => unlogged(after(record, run(Outcome::Failed, e.to_string()))),
        }
    }

    /// The tick's enqueue, under the queue's lock with its policy's check or purge.
    /// When it enqueues, the schedule's record after `run` goes in the same batch as
    /// the items, so a restart finds the tick's items only with the record that says
    /// the tick ran (and Forbid and Replace find them through it).
    fn enqueue_tick(
        &self,
        record: &ScheduleRecord,
        tick: u64,
        run: RunRecord,
    ) -> Result<(Tick, Ticket)> {
        let policy = Policy::from_code(record.policy).unwrap_or(Policy::Allow);
        let stamp = cron::rfc3339(tick);
        let items: Vec<NewItem<Vec<u8>>> = (0..record.count)
            .map(|i| NewItem {
                payload: expand(&record.payload, i, &stamp),
                priority: 0,
                delay_ms: 0,
                key: format!("schedule/{}/{tick}/{i}", record.name),
            })
            .collect();
        let slot = self.slot(&record.queue)?;
        let room = items.len();
        let last = &record.last_items;
        self.apply_and_log(
            &slot,
            &record.queue,
            |q, now, store| {
                let in_state = |states: &[State]| {
                    last.iter()
                        .filter(|&&id| q.item(id).is_some_and(|item| states.contains(&item.state)))
                        .count()
                };
                let unfinished = in_state(&[State::Ready, State::Delayed, State::Leased]);
                if policy == Policy::Forbid && unfinished > 0 {
                    return Ok(Tick::Skipped { unfinished });
                }
                let replaced = if policy == Policy::Replace {
                    // Checked before the purge, counting the room it makes: a tick
                    // the queue refuses changes nothing.
                    let purgeable = in_state(&[State::Ready, State::Delayed]);
                    q.check_batch(&items, purgeable as u64)?;
                    q.purge_ids(last)
                } else {
                    0
                };
                let mut ids = store.ids(room);
                let enqueued = q.enqueue(now, items, false, || ids.take())?;
                let ids: Vec<u64> = enqueued.into_iter().map(|e| e.id).collect();
                let mut record = after(
                    record,
                    RunRecord {
                        items: ids.len() as u32,
                        replaced: replaced as u32,
                        ..run
                    },
                );
                record.last_items = ids;
                Ok(Tick::Enqueued(Box::new(record)))
            },
            |tick| match tick {
                Tick::Enqueued(record) => Some(record),
                Tick::Skipped { .. } => None,
            },
        )
    }
}

/// A tick handled: the schedule's new record, and the write that logged it with
/// the tick's items (`None`: not logged yet).
struct Ran {
    record: ScheduleRecord,
    logged: Option<Ticket>,
}

/// `record` once the tick of `run` is handled: its outcome counted, its run first.
fn after(record: &ScheduleRecord, run: RunRecord) -> ScheduleRecord {
    let mut record = record.clone();
    match Outcome::from_code(run.outcome) {
        Some(Outcome::Enqueued) => record.enqueued_runs += 1,
        Some(Outcome::Skipped) => record.skipped_runs += 1,
        Some(Outcome::Missed) => record.missed_runs += 1,
        Some(Outcome::Failed) | None => record.failed_runs += 1,
    }
    record.last_tick_ms = run.scheduled_ms;
    record.runs.insert(0, run);
    record.runs.truncate(RUNS_KEPT);
    record
}

enum Tick {
    /// The schedule's record after the tick, with the new items as its last ones.
    Enqueued(Box<ScheduleRecord>),
    Skipped {
        unfinished: usize,
    },
}

impl Outcome {
    /// The code in records and in workq.proto.
    pub fn from_code(code: u32) -> Option<Outcome> {
        match code {
            1 => Some(Outcome::Enqueued),
            2 => Some(Outcome::Skipped),
            3 => Some(Outcome::Missed),
            4 => Some(Outcome::Failed),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Enqueued => "enqueued",
            Outcome::Skipped => "skipped",
            Outcome::Missed => "missed",
            Outcome::Failed => "failed",
        }
    }
}

/// The payload with `{i}` replaced by the item's index and `{tick}` by the tick's time.
fn expand(payload: &[u8], i: u32, tick: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    let mut rest = payload;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix(b"{i}") {
            out.extend_from_slice(i.to_string().as_bytes());
            rest = after;
        } else if let Some(after) = rest.strip_prefix(b"{tick}") {
            out.extend_from_slice(tick.as_bytes());
            rest = after;
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

/// A duration for a run's detail: "850ms", "1.5s", "3m20s", "2h05m".
fn human_ms(ms: u64) -> String {
    workq_proto::duration::format(std::time::Duration::from_millis(ms))
}

/// Runs due ticks until shutdown, sleeping until the next one in between.
pub(super) fn spawn(engine: &Arc<Engine>) {
    // Hold the engine only during a pass, so dropping the engine ends the task.
    let weak = Arc::downgrade(engine);
    let wake = engine.schedules.wake.clone();
    let clock = engine.clock;
    let mut shutdown = engine.shutdown.subscribe();
    tokio::spawn(async move {
        loop {
            let next = {
                let Some(engine) = weak.upgrade() else { break };
                if *shutdown.borrow_and_update() {
                    break;
                }
                engine.run_due_schedules().await
            };
            // A change during the pass left a permit (`notify_one`), so it is not lost.
            super::sleep_until_due(clock, next, &wake, &mut shutdown).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_get_the_index_and_the_tick() {
        assert_eq!(
            expand(b"key-{i} at {tick} {x} {i}", 7, "2026-11-28T16:00:00Z"),
            b"key-7 at 2026-11-28T16:00:00Z {x} 7"
        );
        assert_eq!(expand(b"", 1, "t"), b"");
        assert_eq!(expand(b"{i", 1, "t"), b"{i");
        assert_eq!(expand(&[0xff, b'{', b'i', b'}'], 3, "t"), [0xff, b'3']);
    }
}
