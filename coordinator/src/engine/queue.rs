//! One queue's state machine: the pure core of workq.
//!
//! Every item transition of PRODUCT.md's lifecycle happens here and nowhere else:
//! enqueue, lease, extend, ack, fail, release, expire, requeue, purge and retention.
//! The code is plain and synchronous over a `now` passed in by the caller, so it is
//! tested without sockets, disks or sleeps.
//!
//! Ownership: a `Queue` is owned by the engine behind one mutex; the engine is the
//! single writer. Each mutating call records which items changed in `journal`, and the
//! engine turns that journal into one atomic storage batch before it answers.
//!
//! Invariants (checked by `check_invariants` in tests):
//! - every item is in exactly one of the state indexes `ready`, `delayed`, `leased`,
//!   `done`, `dead`, matching its `state`;
//! - a LEASED item has a lease, and only LEASED items have one;
//! - `keys` maps each dedup key to the one live item that carries it.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hasher;
use std::sync::Arc;

use super::items::{Header, ItemView, Items, Keys, ReadyIndex, Stored};
use super::limits;
use crate::error::{Error, Result};

/// Queue options (PRODUCT.md "Queue options"); durations in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub lease_timeout_ms: u64,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    pub max_payload_bytes: u64,
    /// Most unfinished (READY + DELAYED + LEASED) items; 0 = unlimited.
    pub max_depth: u64,
    pub retention_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            lease_timeout_ms: 30_000,
            max_attempts: 5,
            backoff_base_ms: 1_000,
            backoff_cap_ms: 300_000,
            max_payload_bytes: 1024 * 1024,
            max_depth: 0,
            retention_ms: 3_600_000,
        }
    }
}

/// The lifecycle states of PRODUCT.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Ready,
    Delayed,
    Leased,
    Done,
    Dead,
}

impl State {
    /// The state's number where items are stored (the engine's records, the disk
    /// records): 1 ready, 2 delayed, 3 leased, 4 done, 5 dead, as in workq.proto.
    pub fn code(self) -> u8 {
        match self {
            State::Ready => 1,
            State::Delayed => 2,
            State::Leased => 3,
            State::Done => 4,
            State::Dead => 5,
        }
    }

    /// The state numbered `code`; `None` for a number no state has.
    pub fn from_code(code: u32) -> Option<State> {
        Some(match code {
            1 => State::Ready,
            2 => State::Delayed,
            3 => State::Leased,
            4 => State::Done,
            5 => State::Dead,
            _ => return None,
        })
    }
}

/// A live lease on an item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub token: u64,
    pub deadline_ms: u64,
    /// The lease length granted, reused by `extend` without an explicit length.
    pub timeout_ms: u64,
    /// Shared with the queue's worker list and the items' outcomes: a lease copies a
    /// pointer, not the id.
    pub worker: Arc<str>,
}

/// One item, owned: as recovered from storage, and as the APIs hand it out. A queue
/// stores its items more compactly ([`Items`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub id: u64,
    pub state: State,
    pub payload: Vec<u8>,
    pub priority: i32,
    pub key: String,
    /// Deliveries that counted (a release gives one back).
    pub attempts: u32,
    pub enqueued_ms: u64,
    /// When a DELAYED item becomes READY.
    pub ready_at_ms: u64,
    pub lease: Option<Box<LeaseInfo>>,
    /// `None` until the item is first leased.
    pub outcome: Option<Box<Outcome>>,
}

/// What an item's deliveries left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The worker that last held the item.
    pub worker: Arc<str>,
    /// The token of the lease that completed a DONE item, so a retried ack of the same
    /// lease is answered OK instead of "lease lost".
    pub done_token: u64,
    pub done_ms: u64,
    pub result: Vec<u8>,
    pub last_error: String,
}

impl Item {
    /// The worker that last held the item.
    pub fn worker(&self) -> &str {
        self.view().worker()
    }

    pub fn done_token(&self) -> u64 {
        self.view().done_token()
    }

    pub fn done_ms(&self) -> u64 {
        self.view().done_ms()
    }

    pub fn result(&self) -> &[u8] {
        self.view().result()
    }

    pub fn last_error(&self) -> &str {
        self.view().last_error()
    }

    pub fn view(&self) -> ItemView<'_> {
        ItemView {
            id: self.id,
            state: self.state,
            priority: self.priority,
            attempts: self.attempts,
            enqueued_ms: self.enqueued_ms,
            ready_at_ms: self.ready_at_ms,
            payload: &self.payload,
            key: &self.key,
            lease: self.lease.as_deref(),
            outcome: self.outcome.as_deref(),
        }
    }
}

/// Totals since the queue was created.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub enqueued: u64,
    pub deliveries: u64,
    pub completed: u64,
    pub failed: u64,
    pub expired: u64,
    pub dead: u64,
    pub purged: u64,
    pub deduplicated: u64,
}

/// A new item as a producer sends it.
#[derive(Clone, Debug, Default)]
pub struct NewItem<P = bytes::Bytes> {
    /// A slice of the request it came in, where it came over the API: the item's
    /// record is the one copy the engine keeps. Shared (`Bytes`) where the request was
    /// decoded into owned values, borrowed (`&[u8]`) where it is read in place.
    pub payload: P,
    pub priority: i32,
    pub delay_ms: u64,
    pub key: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueued {
    pub id: u64,
    pub deduplicated: bool,
    pub enqueued_ms: u64,
}

/// A lease as handed to a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Granted {
    pub id: u64,
    pub token: u64,
    pub attempt: u32,
    pub payload: Vec<u8>,
    pub priority: i32,
    pub deadline_ms: u64,
    pub key: String,
    pub enqueued_ms: u64,
}

/// What `fail` did with the item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOutcome {
    /// Retried: DELAYED until this time.
    Retry {
        at_ms: u64,
    },
    Dead,
}

/// A change to persist, recorded by every mutation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Put(u64),
    Delete(u64),
}

#[derive(Clone, Debug, Default)]
pub struct WorkerInfo {
    pub last_seen_ms: u64,
    pub in_flight: u64,
    pub completed: u64,
}

/// Point-in-time numbers for stats and the watch stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub ready: u64,
    pub delayed: u64,
    pub leased: u64,
    pub done: u64,
    pub dead: u64,
    pub sealed: bool,
    pub drained: bool,
    pub counters: Counters,
    pub oldest_ready_age_ms: u64,
    pub rate_10s: f64,
    pub rate_1m: f64,
    pub eta_ms: u64,
    pub workers: u32,
}

/// Workers not seen for this long drop out of the worker list (unless they hold leases).
const WORKER_FORGET_MS: u64 = 10 * 60_000;
/// A worker counts as "connected" in stats when seen this recently.
const WORKER_ACTIVE_MS: u64 = 60_000;
/// Completion-rate window: one bucket per second for a minute.
const RATE_BUCKETS: usize = 60;

pub struct Queue {
    pub name: String,
    pub options: Options,
    pub sealed: bool,
    pub created_ms: u64,
    pub counters: Counters,
    /// Set when the queue is deleted, so calls racing the delete change nothing.
    pub deleted: bool,
    items: Items,
    ready: ReadyIndex,
    /// (ready_at, id)
    delayed: BTreeSet<(u64, u64)>,
    /// (deadline, id)
    leased: BTreeSet<(u64, u64)>,
    /// (done_at, id)
    done: BTreeSet<(u64, u64)>,
    dead: BTreeSet<u64>,
    keys: Keys,
    workers: HashMap<Arc<str>, WorkerInfo>,
    /// Completions per second: (unix second, count), a ring of RATE_BUCKETS.
    completions: [(u64, u32); RATE_BUCKETS],
    /// Items changed since the engine last took the journal.
    journal: Vec<Change>,
}

impl Queue {
    pub fn new(name: String, options: Options, now: u64) -> Queue {
        Queue {
            name,
            options,
            sealed: false,
            created_ms: now,
            counters: Counters::default(),
            deleted: false,
            items: Items::default(),
            ready: ReadyIndex::default(),
            delayed: BTreeSet::new(),
            leased: BTreeSet::new(),
            done: BTreeSet::new(),
            dead: BTreeSet::new(),
            keys: Keys::default(),
            workers: HashMap::new(),
            completions: [(0, 0); RATE_BUCKETS],
            journal: Vec::new(),
        }
    }

    /// Puts a recovered item back in place (start-up only; journals nothing).
    pub fn restore(&mut self, item: Stored) {
        let view = item.view();
        if let Some(lease) = view.lease {
            self.workers
                .entry(lease.worker.clone())
                .or_default()
                .in_flight += 1;
        }
        self.index(view);
        self.items.insert_stored(item);
    }

    /// Room for `additional` more items without growing the id map (recovery).
    pub fn reserve(&mut self, additional: usize) {
        self.items.reserve(additional);
    }

    /// Takes the changes recorded since the last call.
    pub fn take_journal(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.journal)
    }

    /// Hands a taken journal back once it is written, so the next call records into
    /// its room instead of growing a new one from empty (a big batch's room is not
    /// kept).
    pub fn return_journal(&mut self, mut journal: Vec<Change>) {
        const KEEP: usize = 1024;
        if self.journal.is_empty() && journal.capacity() <= KEEP {
            journal.clear();
            self.journal = journal;
        }
    }

    pub fn item(&self, id: u64) -> Option<ItemView<'_>> {
        self.items.get(id)
    }

    pub fn item_count(&self) -> usize {
        self.items.len()
    }

    /// Unfinished work: READY + DELAYED + LEASED.
    pub fn unfinished(&self) -> u64 {
        (self.ready.len() + self.delayed.len() + self.leased.len()) as u64
    }

    /// Items a lease could take right now.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// PRODUCT.md: no READY, DELAYED or LEASED items remain.
    pub fn drained(&self) -> bool {
        self.unfinished() == 0
    }

    // ---- transitions ----------------------------------------------------------

    /// Whether `enqueue` would take `batch` once `freed` unfinished items are gone
    /// (a schedule's Replace checks before it purges): the queue is not sealed, every
    /// payload fits, and what is new stays within the max depth. Changes nothing.
    pub fn check_batch(&self, batch: &[NewItem<impl AsRef<[u8]>>], freed: u64) -> Result<()> {
        if self.sealed {
            return Err(Error::Sealed(self.name.clone()));
        }
        for (i, item) in batch.iter().enumerate() {
            if item.payload.as_ref().len() as u64 > self.options.max_payload_bytes {
                return Err(Error::invalid(format!(
                    "item {i}: payload of {} bytes is over queue '{}''s max payload of {} bytes",
                    item.payload.as_ref().len(),
                    self.name,
                    self.options.max_payload_bytes
                )));
            }
        }
        // Count what would be new (not deduplicated), including duplicates inside the batch.
        if self.options.max_depth > 0 {
            let mut seen = std::collections::HashSet::new();
            let new = batch
                .iter()
                .filter(|i| {
                    i.key.is_empty()
                        || (self.keys.get(&i.key, &self.items).is_none()
                            && seen.insert(i.key.as_str()))
                })
                .count() as u64;
            let unfinished = self.unfinished().saturating_sub(freed);
            if unfinished + new > self.options.max_depth {
                return Err(Error::ResourceExhausted(format!(
                    "queue '{}' is full: {} unfinished items, {} more would pass its max depth of {}",
                    self.name, unfinished, new, self.options.max_depth
                )));
            }
        }
        Ok(())
    }

    /// Adds a batch atomically: it is validated whole before anything changes.
    /// `ids` hands out fresh item ids.
    pub fn enqueue(
        &mut self,
        now: u64,
        batch: Vec<NewItem<impl AsRef<[u8]>>>,
        seal: bool,
        mut ids: impl FnMut() -> u64,
    ) -> Result<Vec<Enqueued>> {
        self.check_batch(&batch, 0)?;
        let mut results = Vec::with_capacity(batch.len());
        for new in batch {
            let found = (!new.key.is_empty()).then(|| self.keys.find(&new.key, &self.items));
            if let Some(Ok(existing)) = found {
                self.counters.deduplicated += 1;
                let enqueued_ms = self.items.header(existing).map_or(0, |h| h.enqueued_ms);
                results.push(Enqueued {
                    id: existing,
                    deduplicated: true,
                    enqueued_ms,
                });
                continue;
            }
            let id = ids();
            let (state, ready_at_ms) = if new.delay_ms > 0 {
                (State::Delayed, now + new.delay_ms)
            } else {
                (State::Ready, now)
            };
            let header = Header {
                state,
                priority: new.priority,
                attempts: 0,
                enqueued_ms: now,
                ready_at_ms,
            };
            if state == State::Delayed {
                self.delayed.insert((ready_at_ms, id));
            } else {
                self.ready.insert(new.priority, id);
            }
            if let Some(Err(free)) = found {
                self.keys.add(free, id);
            }
            self.items
                .insert_new(id, header, &new.key, new.payload.as_ref());
            self.journal.push(Change::Put(id));
            self.counters.enqueued += 1;
            results.push(Enqueued {
                id,
                deduplicated: false,
                enqueued_ms: now,
            });
        }
        if seal {
            self.sealed = true;
        }
        Ok(results)
    }

    /// Leases up to `max` READY items (highest priority, then oldest) to `worker`.
    /// `tokens` hands out fresh lease tokens.
    pub fn lease(
        &mut self,
        now: u64,
        worker: &str,
        max: usize,
        timeout_ms: u64,
        mut tokens: impl FnMut() -> u64,
    ) -> Vec<Granted> {
        self.promote_due(now);
        let timeout_ms = if timeout_ms == 0 {
            self.options.lease_timeout_ms
        } else {
            timeout_ms
        };
        let worker_id: Arc<str> = match self.workers.get_key_value(worker) {
            Some((id, _)) => id.clone(),
            None => Arc::from(worker),
        };
        let mut granted = Vec::new();
        let mut bytes = 0;
        while granted.len() < max {
            let Some(id) = self.ready.pop_first() else {
                break;
            };
            let mut item = self.items.get_mut(id).expect("indexed item exists");
            bytes += item.payload().len();
            if bytes > limits::MAX_LEASE_BYTES && !granted.is_empty() {
                // The answer is full: this one waits for the next lease.
                let priority = item.header().priority;
                self.ready.insert(priority, id);
                break;
            }
            let deadline_ms = now + timeout_ms;
            let token = tokens();
            let header = item.update(|h| {
                h.state = State::Leased;
                h.attempts += 1;
            });
            let key = item.key().to_string();
            let extras = item.extras_mut();
            let outcome = extras.outcome_mut();
            if *outcome.worker != *worker {
                outcome.worker = worker_id.clone();
            }
            extras.lease = Some(LeaseInfo {
                token,
                deadline_ms,
                timeout_ms,
                worker: worker_id.clone(),
            });
            granted.push(Granted {
                id,
                token,
                attempt: header.attempts,
                payload: item.payload().to_vec(),
                priority: header.priority,
                deadline_ms,
                key,
                enqueued_ms: header.enqueued_ms,
            });
            self.leased.insert((deadline_ms, id));
            self.counters.deliveries += 1;
            self.journal.push(Change::Put(id));
        }
        // One lookup for both: the worker was seen now, and holds what it got.
        let (seen, held) = ((!worker.is_empty()).then_some(now), granted.len() as u64);
        match self.workers.get_mut(worker) {
            Some(w) => {
                w.last_seen_ms = seen.unwrap_or(w.last_seen_ms);
                w.in_flight += held;
            }
            None if seen.is_some() || held > 0 => {
                self.workers.insert(
                    worker_id,
                    WorkerInfo {
                        last_seen_ms: seen.unwrap_or(0),
                        in_flight: held,
                        completed: 0,
                    },
                );
            }
            None => {}
        }
        granted
    }

    /// Pushes a lease's deadline out; returns the new deadline.
    pub fn extend(&mut self, now: u64, id: u64, token: u64, timeout_ms: u64) -> Result<u64> {
        self.check_lease(id, token)?;
        let mut item = self.items.get_mut(id).expect("checked");
        let lease = item.extras_mut().lease.as_mut().expect("checked");
        let timeout_ms = if timeout_ms == 0 {
            lease.timeout_ms
        } else {
            timeout_ms
        };
        self.leased.remove(&(lease.deadline_ms, id));
        lease.deadline_ms = now + timeout_ms;
        lease.timeout_ms = timeout_ms;
        let deadline = lease.deadline_ms;
        let worker = lease.worker.clone();
        self.leased.insert((deadline, id));
        self.journal.push(Change::Put(id));
        self.touch_worker(&worker, now);
        Ok(deadline)
    }

    /// Completes a leased item. A retried ack of the lease that already completed it
    /// succeeds without counting again.
    pub fn ack(&mut self, now: u64, id: u64, token: u64, result: Vec<u8>) -> Result<()> {
        // The hottest settle: one lookup of the item and one of its worker.
        let Some(mut item) = self.items.get_mut(id) else {
            return Err(self.not_found(id));
        };
        let view = item.view();
        if view.state == State::Done && view.done_token() == token && token != 0 {
            return Ok(());
        }
        lease_matches(view, token)?;
        item.update(|h| h.state = State::Done);
        let extras = item.extras_mut();
        let lease = extras.lease.take().expect("checked");
        let outcome = extras.outcome_mut();
        outcome.done_token = token;
        outcome.done_ms = now;
        outcome.result = result;
        self.leased.remove(&(lease.deadline_ms, id));
        self.done.insert((now, id));
        self.counters.completed += 1;
        self.journal.push(Change::Put(id));
        self.record_completion(now);
        match self.workers.get_mut(&*lease.worker) {
            Some(w) => {
                w.in_flight = w.in_flight.saturating_sub(1);
                w.completed += 1;
                w.last_seen_ms = now;
            }
            None => {
                self.workers.insert(
                    lease.worker,
                    WorkerInfo {
                        last_seen_ms: now,
                        in_flight: 0,
                        completed: 1,
                    },
                );
            }
        }
        Ok(())
    }

    /// Fails a leased item: retried after a backoff (or `retry_delay_ms`), or DEAD when
    /// `permanent` or out of attempts.
    pub fn fail(
        &mut self,
        now: u64,
        id: u64,
        token: u64,
        error: String,
        permanent: bool,
        retry_delay_ms: u64,
    ) -> Result<FailOutcome> {
        let worker = self.end_lease(id, token)?;
        self.touch_worker(&worker, now);
        self.counters.failed += 1;
        let max_attempts = self.options.max_attempts;
        let mut item = self.items.get_mut(id).expect("checked");
        item.extras_mut().outcome_mut().last_error = error;
        let attempts = item.header().attempts;
        let outcome = if permanent || attempts >= max_attempts {
            FailOutcome::Dead
        } else {
            let delay = if retry_delay_ms > 0 {
                retry_delay_ms
            } else {
                backoff(&self.options, attempts)
            };
            FailOutcome::Retry { at_ms: now + delay }
        };
        match outcome {
            FailOutcome::Dead => self.bury(id),
            FailOutcome::Retry { at_ms } => {
                item.update(|h| {
                    h.state = State::Delayed;
                    h.ready_at_ms = at_ms;
                });
                self.delayed.insert((at_ms, id));
            }
        }
        self.journal.push(Change::Put(id));
        Ok(outcome)
    }

    /// Gives a leased item back without counting the attempt.
    pub fn release(&mut self, now: u64, id: u64, token: u64) -> Result<()> {
        let worker = self.end_lease(id, token)?;
        self.touch_worker(&worker, now);
        let header = self.items.get_mut(id).expect("checked").update(|h| {
            h.attempts = h.attempts.saturating_sub(1);
            h.state = State::Ready;
            h.ready_at_ms = now;
        });
        self.ready.insert(header.priority, id);
        self.journal.push(Change::Put(id));
        Ok(())
    }

    /// Moves DEAD items back to READY with attempts reset. `ids` empty = every DEAD
    /// item. Named items must all be DEAD, or nothing changes.
    pub fn requeue(&mut self, now: u64, ids: &[u64]) -> Result<u64> {
        let targets: Vec<u64> = if ids.is_empty() {
            self.dead.iter().copied().collect()
        } else {
            for &id in ids {
                match self.items.header(id) {
                    None => {
                        return Err(Error::ItemNotFound {
                            queue: self.name.clone(),
                            id,
                        });
                    }
                    Some(item) if item.state != State::Dead => {
                        return Err(Error::FailedPrecondition(format!(
                            "item {id} is {}, not dead: only dead items can be requeued",
                            state_name(item.state)
                        )));
                    }
                    Some(_) => {}
                }
            }
            let mut unique = ids.to_vec();
            unique.sort_unstable();
            unique.dedup();
            unique
        };
        for &id in &targets {
            self.dead.remove(&id);
            let header = self
                .items
                .get_mut(id)
                .expect("dead item exists")
                .update(|h| {
                    h.state = State::Ready;
                    h.attempts = 0;
                    h.ready_at_ms = now;
                });
            self.ready.insert(header.priority, id);
            self.journal.push(Change::Put(id));
        }
        Ok(targets.len() as u64)
    }

    /// Discards every READY and DELAYED item (kuard's "drain"); returns how many.
    pub fn purge(&mut self) -> u64 {
        let ids: Vec<u64> = self
            .ready
            .iter()
            .chain(self.delayed.iter().map(|&(_, id)| id))
            .collect();
        self.ready.clear();
        self.delayed.clear();
        for &id in &ids {
            self.forget(id);
        }
        self.counters.purged += ids.len() as u64;
        ids.len() as u64
    }

    /// Purges those of `ids` that are READY or DELAYED (a schedule's Replace policy);
    /// the others are left as they are. Returns how many went.
    pub fn purge_ids(&mut self, ids: &[u64]) -> u64 {
        let mut purged = 0;
        for &id in ids {
            let Some(item) = self.items.header(id) else {
                continue;
            };
            let gone = match item.state {
                State::Ready => self.ready.remove(item.priority, id),
                State::Delayed => self.delayed.remove(&(item.ready_at_ms, id)),
                _ => false,
            };
            if gone {
                self.forget(id);
                purged += 1;
            }
        }
        self.counters.purged += purged;
        purged
    }

    /// Every item id, for deleting the queue.
    pub fn all_ids(&self) -> Vec<u64> {
        self.items.ids().collect()
    }

    /// Runs the timers due at `now`: DELAYED → READY, expired leases → READY or DEAD,
    /// DONE past retention → deleted. Returns true when anything changed.
    pub fn tick(&mut self, now: u64) -> bool {
        let mut changed = self.promote_due(now);
        while let Some(&(deadline, id)) = self.leased.first() {
            if deadline > now {
                break;
            }
            changed = true;
            self.leased.remove(&(deadline, id));
            self.counters.expired += 1;
            let mut item = self.items.get_mut(id).expect("leased item exists");
            let extras = item.extras_mut();
            let lease = extras.lease.take().expect("leased item has a lease");
            extras.outcome_mut().last_error = format!(
                "lease expired (worker '{}' held it past its deadline)",
                lease.worker
            );
            if item.header().attempts >= self.options.max_attempts {
                self.bury(id);
            } else {
                let header = item.update(|h| {
                    h.state = State::Ready;
                    h.ready_at_ms = now;
                });
                self.ready.insert(header.priority, id);
            }
            if let Some(w) = self.workers.get_mut(&*lease.worker) {
                w.in_flight = w.in_flight.saturating_sub(1);
            }
            self.journal.push(Change::Put(id));
        }
        let retention = self.options.retention_ms;
        while let Some(&(done_ms, id)) = self.done.first() {
            if done_ms.saturating_add(retention) > now {
                break;
            }
            changed = true;
            self.done.remove(&(done_ms, id));
            self.forget(id);
        }
        changed
    }

    /// The earliest time `tick` has work to do.
    pub fn next_deadline(&self) -> Option<u64> {
        let delayed = self.delayed.first().map(|&(t, _)| t);
        let leased = self.leased.first().map(|&(t, _)| t);
        let done = self
            .done
            .first()
            .map(|&(t, _)| t.saturating_add(self.options.retention_ms));
        [delayed, leased, done].into_iter().flatten().min()
    }

    // ---- reads -----------------------------------------------------------------

    pub fn stats(&self, now: u64) -> Stats {
        let oldest_ready_age_ms = self
            .ready
            .oldest()
            .and_then(|id| self.items.header(id))
            .map_or(0, |h| now.saturating_sub(h.enqueued_ms));
        let rate_10s = self.completions_since(now, 10) as f64 / 10.0;
        let rate_1m = self.completions_since(now, 60) as f64 / 60.0;
        let unfinished = self.unfinished();
        let rate = if rate_10s > 0.0 { rate_10s } else { rate_1m };
        let eta_ms = if unfinished > 0 && rate > 0.0 {
            (unfinished as f64 / rate * 1000.0) as u64
        } else {
            0
        };
        Stats {
            ready: self.ready.len() as u64,
            delayed: self.delayed.len() as u64,
            leased: self.leased.len() as u64,
            done: self.done.len() as u64,
            dead: self.dead.len() as u64,
            sealed: self.sealed,
            drained: self.drained(),
            counters: self.counters.clone(),
            oldest_ready_age_ms,
            rate_10s,
            rate_1m,
            eta_ms,
            workers: self
                .workers
                .values()
                .filter(|w| {
                    w.in_flight > 0 || now.saturating_sub(w.last_seen_ms) < WORKER_ACTIVE_MS
                })
                .count() as u32,
        }
    }

    /// Items in id order after `after_id`, optionally of one state.
    pub fn list(&self, state: Option<State>, after_id: u64, limit: usize) -> Vec<ItemView<'_>> {
        let mut ids: Vec<u64> = match state {
            Some(State::Ready) => self.ready.iter().filter(|&id| id > after_id).collect(),
            Some(State::Delayed) => self
                .delayed
                .iter()
                .map(|&(_, id)| id)
                .filter(|&id| id > after_id)
                .collect(),
            Some(State::Leased) => self
                .leased
                .iter()
                .map(|&(_, id)| id)
                .filter(|&id| id > after_id)
                .collect(),
            Some(State::Done) => self
                .done
                .iter()
                .map(|&(_, id)| id)
                .filter(|&id| id > after_id)
                .collect(),
            Some(State::Dead) => self
                .dead
                .range(after_id.saturating_add(1)..)
                .copied()
                .collect(),
            None => self.items.ids().filter(|&id| id > after_id).collect(),
        };
        if ids.len() > limit {
            ids.select_nth_unstable(limit);
            ids.truncate(limit);
        }
        ids.sort_unstable();
        ids.iter().filter_map(|&id| self.items.get(id)).collect()
    }

    /// Workers seen recently or holding leases, forgetting long-idle ones.
    pub fn workers(&mut self, now: u64) -> Vec<(String, WorkerInfo)> {
        self.workers.retain(|_, w| {
            w.in_flight > 0 || now.saturating_sub(w.last_seen_ms) < WORKER_FORGET_MS
        });
        let mut list: Vec<_> = self
            .workers
            .iter()
            .map(|(id, w)| (id.to_string(), w.clone()))
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list
    }

    /// Records that a worker called in (a lease attempt), without any state change.
    pub fn touch_worker(&mut self, worker: &str, now: u64) {
        if worker.is_empty() {
            return;
        }
        match self.workers.get_mut(worker) {
            Some(w) => w.last_seen_ms = now,
            None => {
                self.workers.insert(
                    Arc::from(worker),
                    WorkerInfo {
                        last_seen_ms: now,
                        ..WorkerInfo::default()
                    },
                );
            }
        }
    }

    // ---- internals -------------------------------------------------------------

    fn index(&mut self, item: ItemView<'_>) {
        match item.state {
            State::Ready => {
                self.ready.insert(item.priority, item.id);
            }
            State::Delayed => {
                self.delayed.insert((item.ready_at_ms, item.id));
            }
            State::Leased => {
                let deadline = item.lease.map_or(0, |l| l.deadline_ms);
                self.leased.insert((deadline, item.id));
            }
            State::Done => {
                self.done.insert((item.done_ms(), item.id));
            }
            State::Dead => {
                self.dead.insert(item.id);
            }
        }
        if !item.key.is_empty() {
            self.keys.insert(item.key, item.id, &self.items);
        }
    }

    /// DELAYED items whose time has come become READY.
    fn promote_due(&mut self, now: u64) -> bool {
        let mut changed = false;
        while let Some(&(at, id)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.remove(&(at, id));
            let header = self
                .items
                .get_mut(id)
                .expect("delayed item exists")
                .update(|h| h.state = State::Ready);
            self.ready.insert(header.priority, id);
            self.journal.push(Change::Put(id));
            changed = true;
        }
        changed
    }

    /// Verifies `token` is the item's current lease.
    fn check_lease(&self, id: u64, token: u64) -> Result<()> {
        let item = self.items.get(id).ok_or_else(|| self.not_found(id))?;
        lease_matches(item, token)
    }

    fn not_found(&self, id: u64) -> Error {
        Error::ItemNotFound {
            queue: self.name.clone(),
            id,
        }
    }

    /// Ends the current lease after checking the token; returns the worker that held it.
    /// The item is left out of every index; the caller puts it in its next state.
    fn end_lease(&mut self, id: u64, token: u64) -> Result<Arc<str>> {
        self.check_lease(id, token)?;
        let mut item = self.items.get_mut(id).expect("checked");
        let lease = item.extras_mut().lease.take().expect("checked");
        self.leased.remove(&(lease.deadline_ms, id));
        if let Some(w) = self.workers.get_mut(&lease.worker) {
            w.in_flight = w.in_flight.saturating_sub(1);
        }
        Ok(lease.worker)
    }

    fn bury(&mut self, id: u64) {
        let mut item = self.items.get_mut(id).expect("exists");
        item.update(|h| h.state = State::Dead);
        self.dead.insert(id);
        self.counters.dead += 1;
    }

    /// Deletes an item that is already out of the state indexes.
    fn forget(&mut self, id: u64) {
        if let Some(removed) = self.items.remove(id) {
            let key = removed.view().key;
            if !key.is_empty() {
                self.keys.remove(key, id);
            }
            self.journal.push(Change::Delete(id));
        }
    }

    fn record_completion(&mut self, now: u64) {
        let second = now / 1000;
        let slot = &mut self.completions[(second as usize) % RATE_BUCKETS];
        if slot.0 != second {
            *slot = (second, 0);
        }
        slot.1 += 1;
    }

    /// Completions in the last `seconds` full seconds plus the current one, scaled.
    fn completions_since(&self, now: u64, seconds: u64) -> u64 {
        let current = now / 1000;
        self.completions
            .iter()
            .filter(|(sec, _)| *sec + seconds > current && *sec <= current)
            .map(|&(_, n)| n as u64)
            .sum()
    }

    #[cfg(test)]
    pub fn check_invariants(&self) {
        self.items.check();
        let mut counted = 0;
        for item in self.items.iter() {
            let indexed = match item.state {
                State::Ready => self.ready.contains(item.priority, item.id),
                State::Delayed => self.delayed.contains(&(item.ready_at_ms, item.id)),
                State::Leased => {
                    let lease = item.lease.expect("leased item has a lease");
                    self.leased.contains(&(lease.deadline_ms, item.id))
                }
                State::Done => self.done.contains(&(item.done_ms(), item.id)),
                State::Dead => self.dead.contains(&item.id),
            };
            assert!(indexed, "item {} not indexed as {:?}", item.id, item.state);
            assert_eq!(
                item.lease.is_some(),
                item.state == State::Leased,
                "item {}",
                item.id
            );
            counted += 1;
        }
        let indexed = self.ready.len()
            + self.delayed.len()
            + self.leased.len()
            + self.done.len()
            + self.dead.len();
        assert_eq!(counted, indexed, "items and indexes disagree");
        self.keys.check(&self.items);
    }
}

/// Retry delay after `attempts` deliveries: base doubling per attempt, capped.
pub fn backoff(options: &Options, attempts: u32) -> u64 {
    let exponent = attempts.saturating_sub(1).min(40);
    options
        .backoff_base_ms
        .saturating_mul(1u64 << exponent)
        .min(options.backoff_cap_ms)
}

pub fn state_name(state: State) -> &'static str {
    match state {
        State::Ready => "ready",
        State::Delayed => "delayed",
        State::Leased => "leased",
        State::Done => "done",
        State::Dead => "dead",
    }
}

/// Whether `token` is `item`'s current lease, with the reason when it is not.
fn lease_matches(item: ItemView<'_>, token: u64) -> Result<()> {
    let id = item.id;
    match (&item.state, &item.lease) {
        (State::Leased, Some(lease)) if lease.token == token => Ok(()),
        // Tokens only grow: one past the current lease's was never this item's.
        (State::Leased, Some(lease)) if token > lease.token => Err(Error::LeaseLost(format!(
            "token {token} was never issued for item {id}; it is leased under another token"
        ))),
        (State::Leased, Some(_)) => Err(Error::LeaseLost(format!(
            "item {id} was re-leased (attempt {}); token {token} is no longer valid",
            item.attempts
        ))),
        (State::Done, _) if item.done_token() == token => Err(Error::LeaseLost(format!(
            "item {id} was already completed under this lease"
        ))),
        (State::Done, _) => Err(Error::LeaseLost(format!(
            "item {id} was already completed under another lease"
        ))),
        (State::Dead, _) => Err(Error::LeaseLost(format!("item {id} is dead"))),
        _ => Err(Error::LeaseLost(format!(
            "item {id} went back to the queue (its lease expired or was released)"
        ))),
    }
}

/// Hashes item ids for the id map: one folded multiplication instead of SipHash.
/// Folding the high half of the 128-bit product into the low half makes every bit of
/// the hash depend on every bit of the id, so ids with a common stride (one queue's
/// share of the id sequence) still spread over the buckets. Ids are handed out by the
/// server, so nobody can choose colliding keys.
#[derive(Default)]
pub struct IdHasher(u64);

impl IdHasher {
    fn mix(value: u64) -> u64 {
        let product = u128::from(value) * 0x9E37_79B9_7F4A_7C15;
        (product as u64) ^ ((product >> 64) as u64)
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = Self::mix(self.0.rotate_left(8) ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = Self::mix(self.0 ^ id);
    }
}
