//! The queue engine: the single writer of queue and item state.
//!
//! Handlers (gRPC, HTTP) never touch a [`Queue`] directly; they ask the engine for a
//! transition. For each call the engine
//! 1. validates the input against [`limits`],
//! 2. locks that one queue (a sync mutex: the critical section is short, CPU-only,
//!    and never held across an `.await`),
//! 3. runs the transition in the pure core, turns the changed items into one atomic
//!    storage batch and writes it (into the log buffer; cheap),
//! 4. unlocks, then waits for [`Store::sync`] — the group-committed flush — before
//!    answering. Only then is the change acknowledged.
//!
//! Different queues never share a lock. A reply waits for every earlier write, so a
//! worker can never hold a durable lease on an item whose enqueue was not durable.
//!
//! Timers: the [`reaper`] task sleeps until the earliest deadline of any queue (lease
//! expiry, delayed item due, retention) and is woken when an earlier one appears.
//! Long-polling leases wait on a per-queue [`Notify`]: a change wakes one waiter per
//! item it made ready (a waiter that leaves items behind wakes the next), and every
//! waiter when the queue becomes drained or goes away, so a hundred idle workers do
//! not all wake for each item. Watch streams wait on a version channel that every
//! change bumps.

pub mod cron;
#[cfg(test)]
mod delete_tests;
pub mod items;
pub mod limits;
pub mod queue;
#[cfg(test)]
mod queue_tests;
mod reaper;
pub mod schedules;
mod split;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::store::record::encode_item;
use crate::store::{QueueRecord, ScheduleRecord, SnapshotWriter, Store, Ticket};
pub use limits::OptionsPatch;
pub use queue::{
    Enqueued, FailOutcome, Granted, Item, NewItem, Options, Queue, State, Stats, WorkerInfo,
};

/// A queue as clients see it.
#[derive(Clone, Debug)]
pub struct QueueView {
    pub name: String,
    pub options: Options,
    pub created_ms: u64,
    pub stats: Stats,
}

/// What a lease call got.
#[derive(Clone, Debug, Default)]
pub struct LeaseOutcome {
    pub granted: Vec<Granted>,
    pub drained: bool,
    pub sealed: bool,
}

/// A lease request after validation.
#[derive(Clone, Debug)]
pub struct LeaseRequest {
    pub worker: String,
    pub max_items: u32,
    /// 0 = the queue's lease timeout.
    pub lease_timeout_ms: u64,
    pub wait_ms: u64,
}

/// One settlement in a batch: what to do with one leased item.
#[derive(Clone, Debug)]
pub enum SettleAction {
    Ack {
        result: Vec<u8>,
    },
    Fail {
        error: String,
        permanent: bool,
        delay_ms: u64,
    },
    Release,
    Extend {
        lease_timeout_ms: u64,
    },
    /// An action the client left unspecified (0) or one this coordinator does not
    /// know (its code); refused for that item alone.
    Invalid(i32),
}

#[derive(Clone, Debug)]
pub struct Settlement {
    pub id: u64,
    pub token: u64,
    pub action: SettleAction,
}

/// The outcome of one settlement: for EXTEND the new deadline, for FAIL the retry
/// time (0 = dead), otherwise 0.
#[derive(Clone, Debug)]
pub struct Settled {
    pub id: u64,
    pub token: u64,
    pub outcome: Result<u64>,
}

/// A worker row for `workers` listings.
#[derive(Clone, Debug)]
pub struct WorkerRow {
    pub queue: String,
    pub id: String,
    pub info: WorkerInfo,
}

struct Slot {
    queue: Mutex<Queue>,
    /// Bumped on every change; watch streams and drained sessions wait on it.
    version: watch::Sender<u64>,
    /// Long-polling leases wait on this (see [`Slot::announce`]).
    work: Notify,
}

/// Most lease waiters one change wakes at once; each of them that leaves items ready
/// wakes another, so a big batch still reaches every waiter.
const WAKE_AT_ONCE: usize = 16;

/// What [`Slot::announce`] compares against: the queue before a change.
#[derive(Clone, Copy)]
struct Before {
    ready: usize,
    drained: bool,
}

impl Before {
    fn of(queue: &Queue) -> Before {
        Before {
            ready: queue.ready_len(),
            drained: queue.drained(),
        }
    }
}

impl Slot {
    fn new(queue: Queue) -> Arc<Slot> {
        let (version, _) = watch::channel(0);
        Arc::new(Slot {
            queue: Mutex::new(queue),
            version,
            work: Notify::new(),
        })
    }

    /// Tells waiters the queue changed. Lease waiters: every one when the queue became
    /// drained or was deleted (they answer that), otherwise one per item made ready,
    /// and at least one while any item is ready (the baton: a waiter that took some
    /// and left some wakes the next).
    fn announce(&self, queue: &Queue, before: Before) {
        // Nobody watching (a queue fed by producers alone): skip waking the channel's
        // waiter lists. A receiver subscribing later starts from the state as it is.
        let watched = self.version.receiver_count() > 0;
        self.version.send_if_modified(|v| {
            *v += 1;
            watched
        });
        if queue.deleted || queue.drained() != before.drained {
            self.work.notify_waiters();
            return;
        }
        let ready = queue.ready_len();
        if ready > 0 {
            for _ in 0..ready.saturating_sub(before.ready).clamp(1, WAKE_AT_ONCE) {
                self.work.notify_one();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding the lock is a bug; the state is still consistent enough
        // to keep serving other calls, so recover the guard rather than poison forever.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Engine {
    queues: RwLock<HashMap<String, Arc<Slot>>>,
    store: Store,
    clock: Clock,
    /// The deadline the reaper currently sleeps toward (u64::MAX: none).
    next_wake: AtomicU64,
    reaper_wake: Arc<Notify>,
    schedules: schedules::Schedules,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("store", &self.store)
            .finish()
    }
}

impl Engine {
    /// Recovers every queue and item from `store` and starts the reaper.
    pub fn open(store: Store, clock: Clock) -> Result<Arc<Engine>> {
        let snapshot = store.load()?;
        let mut queues = HashMap::new();
        for record in snapshot.queues {
            let mut queue = Queue::new(record.name.clone(), record.options(), record.created_ms);
            queue.sealed = record.sealed;
            queue.counters = record.counters();
            queues.insert(record.name.clone(), queue);
        }
        // Items name their queue by an index into `queue_names`.
        let mut counts = vec![0usize; snapshot.queue_names.len()];
        for (queue, _) in &snapshot.items {
            counts[*queue as usize] += 1;
        }
        for (name, count) in snapshot.queue_names.iter().zip(counts) {
            if let Some(queue) = queues.get_mut(name) {
                queue.reserve(count);
            }
        }
        let (mut items, mut orphans) = (0u64, snapshot.unreadable);
        for (queue, item) in snapshot.items {
            match queues.get_mut(&snapshot.queue_names[queue as usize]) {
                Some(queue) => {
                    queue.restore(item);
                    items += 1;
                }
                None => orphans += 1,
            }
        }
        if orphans > 0 {
            tracing::warn!(
                orphans,
                "ignored item records without a queue or with an unknown state"
            );
        }
        tracing::info!(
            queues = queues.len(),
            items,
            store = store.describe(),
            "state recovered"
        );
        let (shutdown, _) = watch::channel(false);
        let engine = Arc::new(Engine {
            queues: RwLock::new(
                queues
                    .into_iter()
                    .map(|(name, queue)| (name, Slot::new(queue)))
                    .collect(),
            ),
            store,
            clock,
            next_wake: AtomicU64::new(u64::MAX),
            reaper_wake: Arc::new(Notify::new()),
            schedules: schedules::Schedules::recover(snapshot.schedules),
            shutdown,
        });
        engine.store.start();
        reaper::spawn(engine.clone());
        schedules::spawn(&engine);
        spawn_checkpointer(&engine);
        Ok(engine)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Stops long polls and the reaper; in-flight mutations still complete.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        self.reaper_wake.notify_one();
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Final flush, then a snapshot if the log grew, so the next start reads little.
    pub async fn close(self: &Arc<Self>) -> Result<()> {
        self.begin_shutdown();
        self.store.close().await?;
        if self.store.log_grew() {
            self.checkpoint().await?;
        }
        Ok(())
    }

    // ---- snapshots ---------------------------------------------------------------

    /// Items in all queues: what a snapshot would write.
    fn live_items(&self) -> u64 {
        self.slots()
            .iter()
            .map(|slot| slot.lock().item_count() as u64)
            .sum()
    }

    /// Writes every queue and item to a snapshot so the log before it can go (see
    /// `store::log_store`). Returns the snapshot's size; `None` when the store has no
    /// log or a snapshot is already being written.
    pub async fn checkpoint(self: &Arc<Self>) -> Result<Option<u64>> {
        let started = std::time::Instant::now();
        // On its own thread at a lower CPU priority: a snapshot of a million items takes
        // about a second of CPU, which on a small machine would otherwise come out of
        // request latency.
        let engine = self.clone();
        let (done, dumped) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("workq-snapshot".into())
            .spawn(move || {
                lower_this_threads_priority();
                let _ = done.send(engine.dump());
            })
            .map_err(|e| Error::Storage(format!("cannot start the snapshot thread: {e}")))?;
        let dumped = dumped
            .await
            .map_err(|_| Error::Storage("the snapshot thread died".into()))??;
        let Some((writer, seen)) = dumped else {
            return Ok(None);
        };
        // The snapshot must not hold anything the log could still lose in a crash.
        self.store.wait_durable(seen).await?;
        let engine = self.clone();
        let bytes = tokio::task::spawn_blocking(move || engine.store.finish_checkpoint(writer))
            .await
            .map_err(|e| Error::Storage(format!("snapshot task: {e}")))??;
        if let Some(stats) = self.store.flush_stats() {
            stats.snapshots.fetch_add(1, Ordering::Relaxed);
            stats
                .snapshot_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        Ok(Some(bytes))
    }

    /// The blocking half of a checkpoint: dumps one queue at a time, each in chunks
    /// under its lock, so writers wait for a chunk at most. Returns the writer and the
    /// last ticket written when the dump ended.
    fn dump(&self) -> Result<Option<(SnapshotWriter, Ticket)>> {
        /// Items copied per hold of a queue's lock.
        const CHUNK: usize = 1024;
        let Some(mut writer) = self.store.begin_checkpoint()? else {
            return Ok(None);
        };
        for record in self.schedules.records_blocking() {
            writer.put_schedule(&record);
        }
        for slot in self.slots() {
            let mut ids = {
                let queue = slot.lock();
                if queue.deleted {
                    continue;
                }
                writer.put_queue(&queue_record(&queue));
                queue.all_ids()
            };
            // In id order, so a restart loads and indexes them fast.
            ids.sort_unstable();
            for chunk in ids.chunks(CHUNK) {
                {
                    let queue = slot.lock();
                    if queue.deleted {
                        break;
                    }
                    for id in chunk {
                        if let Some(item) = queue.item(*id) {
                            writer.put_item(&queue.name, item);
                        }
                    }
                }
                writer.spill_if_full()?;
            }
        }
        Ok(Some((writer, self.store.last_ticket())))
    }

    // ---- queues ----------------------------------------------------------------

    pub async fn create_queue(
        &self,
        name: &str,
        patch: &OptionsPatch,
        if_not_exists: bool,
    ) -> Result<QueueView> {
        limits::check_queue_name(name)?;
        let options = patch.apply(&Options::default())?;
        let created = {
            let mut queues = self.queues.write().unwrap_or_else(|e| e.into_inner());
            match queues.get(name) {
                Some(_) if if_not_exists => None,
                Some(_) => return Err(Error::QueueExists(name.to_string())),
                None => {
                    let queue = Queue::new(name.to_string(), options, self.clock.now_ms());
                    let record = queue_record(&queue);
                    let ticket = self.store.write(|batch| batch.put_queue(&record))?;
                    queues.insert(name.to_string(), Slot::new(queue));
                    Some(ticket)
                }
            }
        };
        let Some(ticket) = created else {
            self.store.sync(self.store.last_ticket()).await?;
            return self.get_queue(name);
        };
        self.store.sync(ticket).await?;
        tracing::info!(queue = name, "queue created");
        self.get_queue(name)
    }

    pub async fn update_queue(&self, name: &str, patch: &OptionsPatch) -> Result<QueueView> {
        self.mutate(name, |q, _now, _| {
            q.options = patch.apply(&q.options)?;
            Ok(())
        })
        .await?;
        self.get_queue(name)
    }

    /// Deletes a queue with all its items; returns how many items went with it.
    ///
    /// The queue is marked deleted and its deletion written under its lock before it
    /// leaves the queue map. A snapshot that no longer finds it in the map then waits
    /// for the deletion to be on disk before it replaces the log that holds the queue:
    /// were the queue taken out of the map first, a snapshot in between would leave it
    /// out and drop that log, and a deletion that then failed (its caller told so)
    /// would come back from a restart with the queue or its older items gone.
    pub async fn delete_queue(&self, name: &str) -> Result<u64> {
        let slot = self.slot(name)?;
        let (ticket, count) = {
            let mut queue = slot.lock();
            if queue.deleted {
                // Another deletion got there first.
                return Err(Error::QueueNotFound(name.to_string()));
            }
            let ids = queue.all_ids();
            let count = ids.len() as u64;
            let ticket = self.store.write(|batch| {
                for id in ids {
                    batch.delete_item(id);
                }
                batch.delete_queue(name);
            })?;
            queue.deleted = true;
            let _ = queue.take_journal();
            (ticket, count)
        };
        {
            let mut queues = self.queues.write().unwrap_or_else(|e| e.into_inner());
            if queues.get(name).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                queues.remove(name);
            }
        }
        slot.version.send_modify(|v| *v += 1);
        slot.work.notify_waiters();
        self.store.sync(ticket).await?;
        tracing::info!(queue = name, items = count, "queue deleted");
        Ok(count)
    }

    pub fn list_queues(&self) -> Vec<QueueView> {
        let mut views: Vec<QueueView> = self.slots().iter().map(|s| self.view(&s.lock())).collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    pub fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    pub fn get_queue(&self, name: &str) -> Result<QueueView> {
        let slot = self.slot(name)?;
        let queue = slot.lock();
        Ok(self.view(&queue))
    }

    pub fn stats(&self, name: &str) -> Result<Stats> {
        Ok(self.get_queue(name)?.stats)
    }

    pub async fn purge(&self, name: &str) -> Result<u64> {
        self.mutate(name, |q, _, _| Ok(q.purge())).await
    }

    pub async fn set_sealed(&self, name: &str, sealed: bool) -> Result<QueueView> {
        self.mutate(name, |q, _, _| {
            q.sealed = sealed;
            Ok(())
        })
        .await?;
        tracing::info!(queue = name, sealed, "seal changed");
        self.get_queue(name)
    }

    /// A receiver that changes whenever the queue does (watch streams).
    pub fn subscribe(&self, name: &str) -> Result<watch::Receiver<u64>> {
        Ok(self.slot(name)?.version.subscribe())
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    // ---- items -----------------------------------------------------------------

    pub async fn enqueue(
        &self,
        name: &str,
        items: Vec<NewItem>,
        seal: bool,
    ) -> Result<Vec<Enqueued>> {
        let (results, ticket) = self.enqueue_unsynced(name, items, seal)?;
        self.store.sync(ticket).await?;
        Ok(results)
    }

    /// The first half of [`Engine::enqueue`]: checks and applies the batch and returns
    /// the ticket to wait for ([`Engine::sync`]) before answering. For pipelines that
    /// must apply requests strictly in order, so nothing after a refused request is
    /// applied, while still sharing group commits.
    pub fn enqueue_unsynced(
        &self,
        name: &str,
        items: Vec<NewItem<impl AsRef<[u8]>>>,
        seal: bool,
    ) -> Result<(Vec<Enqueued>, crate::store::Ticket)> {
        if items.is_empty() && !seal {
            return Err(Error::invalid("an enqueue needs at least one item"));
        }
        if items.len() > limits::MAX_BATCH_ITEMS {
            return Err(Error::invalid(format!(
                "a batch holds at most {} items, got {} (split it)",
                limits::MAX_BATCH_ITEMS,
                items.len()
            )));
        }
        for (i, item) in items.iter().enumerate() {
            if item.delay_ms > limits::MAX_DELAY_MS {
                // Named only when refused: the check runs for every item.
                limits::check_delay_ms(&format!("item {i}: delay"), item.delay_ms)?;
            }
            if item.key.len() > limits::MAX_KEY_BYTES {
                return Err(Error::invalid(format!(
                    "item {i}: key is longer than {} bytes",
                    limits::MAX_KEY_BYTES
                )));
            }
        }
        let slot = self.slot(name)?;
        let room = items.len();
        self.apply(&slot, name, |q, now, store| {
            let mut ids = store.ids(room);
            q.enqueue(now, items, seal, || ids.take())
        })
    }

    /// Waits until the write behind `ticket` is durable (strict mode; at once
    /// otherwise).
    pub async fn sync(&self, ticket: crate::store::Ticket) -> Result<()> {
        self.store.sync(ticket).await
    }

    /// Whether [`Engine::sync`] of `ticket` would return at once.
    pub fn is_durable(&self, ticket: crate::store::Ticket) -> bool {
        self.store.is_synced(ticket)
    }

    /// Leases items, long-polling up to `wait_ms` until some are available or the
    /// queue is drained.
    pub async fn lease(&self, name: &str, request: LeaseRequest) -> Result<LeaseOutcome> {
        self.lease_until(name, request, std::future::pending())
            .await
    }

    /// [`Engine::lease`] that also stops waiting, with nothing granted, once `cancel`
    /// resolves (a worker session whose worker went away). Leases already granted are
    /// never dropped: `cancel` is only heeded while waiting.
    pub async fn lease_until(
        &self,
        name: &str,
        request: LeaseRequest,
        cancel: impl Future<Output = ()>,
    ) -> Result<LeaseOutcome> {
        limits::check_worker_id(&request.worker)?;
        let max = match request.max_items {
            0 => 1,
            n if n > limits::MAX_LEASE_ITEMS => {
                return Err(Error::invalid(format!(
                    "max items must be at most {}, got {n}",
                    limits::MAX_LEASE_ITEMS
                )));
            }
            n => n,
        } as usize;
        if request.lease_timeout_ms != 0 {
            limits::check_lease_ms("lease timeout", request.lease_timeout_ms)?;
        }
        if request.wait_ms > limits::MAX_WAIT_MS {
            return Err(Error::invalid(format!(
                "wait must be at most 60s, got {}ms",
                request.wait_ms
            )));
        }
        let slot = self.slot(name)?;
        let mut shutdown = self.shutdown.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(request.wait_ms);
        let woken = slot.work.notified();
        tokio::pin!(woken);
        tokio::pin!(cancel);
        loop {
            // Registered before looking, so a change right after the look still wakes
            // this poll.
            woken.as_mut().enable();
            let (outcome, ticket) = self.apply(&slot, name, |q, now, store| {
                let mut tokens = store.ids(max);
                let granted = q.lease(now, &request.worker, max, request.lease_timeout_ms, || {
                    tokens.take()
                });
                Ok(LeaseOutcome {
                    drained: q.drained(),
                    sealed: q.sealed,
                    granted,
                })
            })?;
            let answered = !outcome.granted.is_empty() || outcome.drained;
            let due = tokio::time::Instant::now() >= deadline;
            let stopping = *shutdown.borrow_and_update();
            // Only an answer waits for durability; an empty poll that keeps waiting
            // does not cost a flush.
            if answered || due || stopping {
                self.store.sync(ticket).await?;
                if !answered && !due {
                    // An empty answer would say the wait ran out with nothing to
                    // lease; the truth is that the coordinator is going away.
                    return Err(Error::ShuttingDown);
                }
                return Ok(outcome);
            }
            tokio::select! {
                () = woken.as_mut() => woken.set(slot.work.notified()),
                _ = tokio::time::sleep_until(deadline) => return Ok(outcome),
                _ = shutdown.changed() => {}
                () = cancel.as_mut() => return Ok(outcome),
            }
        }
    }

    /// Pushes a lease's deadline out; returns the new deadline.
    pub async fn extend(
        &self,
        name: &str,
        id: u64,
        token: u64,
        lease_timeout_ms: u64,
    ) -> Result<u64> {
        self.settle_single(name, id, token, SettleAction::Extend { lease_timeout_ms })
            .await
    }

    pub async fn ack(&self, name: &str, id: u64, token: u64, result: Vec<u8>) -> Result<()> {
        self.settle_single(name, id, token, SettleAction::Ack { result })
            .await
            .map(drop)
    }

    pub async fn fail(
        &self,
        name: &str,
        id: u64,
        token: u64,
        error: String,
        permanent: bool,
        retry_delay_ms: u64,
    ) -> Result<FailOutcome> {
        let action = SettleAction::Fail {
            error,
            permanent,
            delay_ms: retry_delay_ms,
        };
        match self.settle_single(name, id, token, action).await? {
            0 => Ok(FailOutcome::Dead),
            at_ms => Ok(FailOutcome::Retry { at_ms }),
        }
    }

    /// Gives a leased item back without counting the attempt.
    pub async fn release(&self, name: &str, id: u64, token: u64) -> Result<()> {
        self.settle_single(name, id, token, SettleAction::Release)
            .await
            .map(drop)
    }

    /// One settlement: the same validation and transition as a batch of one.
    async fn settle_single(
        &self,
        name: &str,
        id: u64,
        token: u64,
        action: SettleAction,
    ) -> Result<u64> {
        self.mutate(name, |q, now, _| settle_one(q, now, id, token, action))
            .await
    }

    /// Settles many leases under one lock, one storage batch and one flush. Each
    /// settlement succeeds or fails on its own (a stale token fails only that one).
    pub async fn settle(&self, name: &str, settlements: Vec<Settlement>) -> Result<Vec<Settled>> {
        if settlements.is_empty() {
            return Err(Error::invalid(
                "a settle call needs at least one settlement",
            ));
        }
        if settlements.len() > limits::MAX_BATCH_ITEMS {
            return Err(Error::invalid(format!(
                "at most {} settlements per call, got {}",
                limits::MAX_BATCH_ITEMS,
                settlements.len()
            )));
        }
        self.mutate(name, |q, now, _| {
            Ok(settlements
                .into_iter()
                .map(|s| {
                    let outcome = settle_one(q, now, s.id, s.token, s.action);
                    Settled {
                        id: s.id,
                        token: s.token,
                        outcome,
                    }
                })
                .collect())
        })
        .await
    }

    /// A worker session's step: settle what it finished and lease up to `max` more
    /// (without waiting), under one lock and one storage batch. Returns the outcome
    /// and the ticket to wait for ([`Engine::sync`]) before telling anyone.
    pub fn settle_and_lease_unsynced(
        &self,
        name: &str,
        settlements: Vec<Settlement>,
        worker: &str,
        max: u32,
        lease_timeout_ms: u64,
    ) -> Result<((Vec<Settled>, LeaseOutcome), crate::store::Ticket)> {
        limits::check_worker_id(worker)?;
        if settlements.len() > limits::MAX_BATCH_ITEMS {
            return Err(Error::invalid(format!(
                "at most {} settlements per call, got {}",
                limits::MAX_BATCH_ITEMS,
                settlements.len()
            )));
        }
        if lease_timeout_ms != 0 {
            limits::check_lease_ms("lease timeout", lease_timeout_ms)?;
        }
        let max = max.min(limits::MAX_LEASE_ITEMS) as usize;
        let slot = self.slot(name)?;
        self.apply(&slot, name, |q, now, store| {
            let settled = settlements
                .into_iter()
                .map(|s| Settled {
                    id: s.id,
                    token: s.token,
                    outcome: settle_one(q, now, s.id, s.token, s.action),
                })
                .collect();
            let granted = if max > 0 {
                let mut tokens = store.ids(max);
                q.lease(now, worker, max, lease_timeout_ms, || tokens.take())
            } else {
                Vec::new()
            };
            let outcome = LeaseOutcome {
                drained: q.drained(),
                sealed: q.sealed,
                granted,
            };
            Ok((settled, outcome))
        })
    }

    pub async fn requeue(&self, name: &str, ids: &[u64], all_dead: bool) -> Result<u64> {
        if ids.is_empty() && !all_dead {
            return Err(Error::invalid(
                "name the dead items to requeue, or ask for all dead items",
            ));
        }
        if !ids.is_empty() && all_dead {
            return Err(Error::invalid("give either item ids or all dead, not both"));
        }
        if ids.len() > limits::MAX_REQUEUE_IDS {
            return Err(Error::invalid(format!(
                "at most {} ids per requeue",
                limits::MAX_REQUEUE_IDS
            )));
        }
        self.mutate(name, |q, now, _| q.requeue(now, ids)).await
    }

    pub fn get_item(&self, name: &str, id: u64) -> Result<Item> {
        let slot = self.slot(name)?;
        let queue = slot.lock();
        queue
            .item(id)
            .map(|item| item.to_item())
            .ok_or_else(|| Error::ItemNotFound {
                queue: name.to_string(),
                id,
            })
    }

    /// A page of items in id order; returns the items and the id to continue after.
    pub fn list_items(
        &self,
        name: &str,
        state: Option<State>,
        after_id: u64,
        limit: u32,
        with_payloads: bool,
    ) -> Result<(Vec<Item>, u64)> {
        let limit = match limit {
            0 => 100,
            n if n > limits::MAX_LIST_LIMIT => {
                return Err(Error::invalid(format!(
                    "limit must be at most {}, got {n}",
                    limits::MAX_LIST_LIMIT
                )));
            }
            n => n,
        } as usize;
        let slot = self.slot(name)?;
        let queue = slot.lock();
        // One extra tells whether another page exists.
        let page = queue.list(state, after_id, limit + 1);
        let mut more = page.len() > limit;
        let mut items: Vec<Item> = Vec::with_capacity(page.len().min(limit));
        let mut bytes = 0;
        for view in page.into_iter().take(limit) {
            if with_payloads {
                bytes += view.payload.len() + view.result().len() + view.last_error().len();
                if bytes > limits::MAX_LIST_BYTES && !items.is_empty() {
                    // The answer is full: the rest is on the next page.
                    more = true;
                    break;
                }
            }
            items.push(if with_payloads {
                view.to_item()
            } else {
                view.to_item_without_payloads()
            });
        }
        let next = if more {
            items.last().map_or(0, |i| i.id)
        } else {
            0
        };
        Ok((items, next))
    }

    pub fn workers(&self, name: Option<&str>) -> Result<Vec<WorkerRow>> {
        let slots: Vec<(String, Arc<Slot>)> = match name {
            Some(name) => vec![(name.to_string(), self.slot(name)?)],
            None => {
                let queues = self.queues.read().unwrap_or_else(|e| e.into_inner());
                queues.iter().map(|(n, s)| (n.clone(), s.clone())).collect()
            }
        };
        let now = self.clock.now_ms();
        let mut rows = Vec::new();
        for (queue_name, slot) in slots {
            for (id, info) in slot.lock().workers(now) {
                rows.push(WorkerRow {
                    queue: queue_name.clone(),
                    id,
                    info,
                });
            }
        }
        rows.sort_by(|a, b| (&a.queue, &a.id).cmp(&(&b.queue, &b.id)));
        Ok(rows)
    }

    // ---- internals ---------------------------------------------------------------

    fn slot(&self, name: &str) -> Result<Arc<Slot>> {
        self.queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| {
                // A name no queue could have gets the name's problem, not "not found".
                limits::check_queue_name(name)
                    .err()
                    .unwrap_or_else(|| Error::QueueNotFound(name.to_string()))
            })
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        self.queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn view(&self, queue: &Queue) -> QueueView {
        QueueView {
            name: queue.name.clone(),
            options: queue.options.clone(),
            created_ms: queue.created_ms,
            stats: queue.stats(self.clock.now_ms()),
        }
    }

    async fn mutate<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Queue, u64, &Store) -> Result<T>,
    ) -> Result<T> {
        let slot = self.slot(name)?;
        self.mutate_slot(&slot, name, f).await
    }

    /// Runs one transition under the queue's lock, persists what changed as one batch,
    /// and waits for durability before returning.
    async fn mutate_slot<T>(
        &self,
        slot: &Slot,
        name: &str,
        f: impl FnOnce(&mut Queue, u64, &Store) -> Result<T>,
    ) -> Result<T> {
        let (value, ticket) = self.apply(slot, name, f)?;
        self.store.sync(ticket).await?;
        Ok(value)
    }

    /// The locked half of a mutation: runs the transition and writes what changed.
    /// Returns the ticket to wait for before answering: the batch's own, or — for a
    /// call that changed nothing — the last write so far, since the answer may rest on
    /// state not yet durable (e.g. a retried ack answered from a completion still
    /// being flushed).
    fn apply<T>(
        &self,
        slot: &Slot,
        name: &str,
        f: impl FnOnce(&mut Queue, u64, &Store) -> Result<T>,
    ) -> Result<(T, crate::store::Ticket)> {
        self.apply_and_log(slot, name, f, |_| None)
    }

    /// [`Engine::apply`], with the schedule record `schedule` makes of the change's
    /// value (when it makes one) written in the same atomic batch as the queue's
    /// changes: a restart finds both or neither.
    fn apply_and_log<T>(
        &self,
        slot: &Slot,
        name: &str,
        f: impl FnOnce(&mut Queue, u64, &Store) -> Result<T>,
        schedule: impl for<'a> FnOnce(&'a T) -> Option<&'a ScheduleRecord>,
    ) -> Result<(T, crate::store::Ticket)> {
        let mut queue = slot.lock();
        if queue.deleted {
            return Err(Error::QueueNotFound(name.to_string()));
        }
        let before = (queue.counters.clone(), queue.sealed, queue.options.clone());
        let waiters_before = Before::of(&queue);
        let now = self.clock.now_ms();
        let result = f(&mut queue, now, &self.store);
        let record = result.as_ref().ok().and_then(schedule);
        let meta_changed = before != (queue.counters.clone(), queue.sealed, queue.options.clone());
        let ticket = self.persist(&mut queue, meta_changed, record)?;
        if ticket.is_some() {
            slot.announce(&queue, waiters_before);
            self.schedule(queue.next_deadline());
        }
        drop(queue);
        let value = result?;
        Ok((value, ticket.unwrap_or_else(|| self.store.last_ticket())))
    }

    /// Writes the queue's journal (and its record, when counters or options changed),
    /// with `schedule`'s record in the same batch.
    fn persist(
        &self,
        queue: &mut Queue,
        meta_changed: bool,
        schedule: Option<&ScheduleRecord>,
    ) -> Result<Option<crate::store::Ticket>> {
        let journal = queue.take_journal();
        if journal.is_empty() && !meta_changed && schedule.is_none() {
            queue.return_journal(journal);
            return Ok(None);
        }
        if !self.store.is_persistent() {
            // Nothing to write: skip encoding records (the in-memory hot path).
            queue.return_journal(journal);
            return Ok(Some(self.store.last_ticket()));
        }
        let record = queue_record(queue);
        let written = {
            let queue = &*queue;
            self.store.write(|batch| {
                for &change in &journal {
                    match change {
                        queue::Change::Put(id) => {
                            if let Some(item) = queue.item(id) {
                                batch.put_item(id, |buf| encode_item(&queue.name, item, buf));
                            }
                        }
                        queue::Change::Delete(id) => batch.delete_item(id),
                    }
                }
                batch.put_queue(&record);
                if let Some(schedule) = schedule {
                    batch.put_schedule(schedule);
                }
            })
        };
        queue.return_journal(journal);
        Ok(Some(written?))
    }

    /// Wakes the reaper if `deadline` is earlier than what it sleeps toward.
    fn schedule(&self, deadline: Option<u64>) {
        if let Some(deadline) = deadline
            && deadline < self.next_wake.load(Ordering::SeqCst)
        {
            self.reaper_wake.notify_one();
        }
    }
}

/// Nice 10 for the calling thread (Linux applies `setpriority` per thread): it then
/// gets about a tenth of a core when request threads want the CPU, all of it when idle.
#[allow(unsafe_code)] // the one place: std and nix have no per-thread `setpriority`
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread's own id; no memory is passed.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// The timer tasks' wait (reaper, scheduler): until `deadline` (Unix ms; `u64::MAX`:
/// none), a wake-up, or a change of the shutdown flag, whichever comes first.
async fn sleep_until_due(
    clock: Clock,
    deadline: u64,
    wake: &Notify,
    shutdown: &mut watch::Receiver<bool>,
) {
    let sleep = async {
        if deadline == u64::MAX {
            std::future::pending::<()>().await;
        } else {
            tokio::time::sleep_until(clock.instant_at(deadline)).await;
        }
    };
    tokio::select! {
        _ = wake.notified() => {}
        _ = sleep => {}
        _ = shutdown.changed() => {}
    }
}

/// Writes a snapshot whenever the store says the log has grown enough.
fn spawn_checkpointer(engine: &Arc<Engine>) {
    let Some(wanted) = engine.store.checkpoint_wanted() else {
        return;
    };
    let weak = Arc::downgrade(engine);
    let mut shutdown = engine.shutdown.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = wanted.notified() => {}
                _ = shutdown.wait_for(|stopping| *stopping) => break,
            }
            let Some(engine) = weak.upgrade() else { break };
            if !engine.store.snapshot_pays(|| engine.live_items()) {
                continue;
            }
            let started = std::time::Instant::now();
            match engine.checkpoint().await {
                Ok(Some(bytes)) => tracing::info!(
                    bytes,
                    millis = started.elapsed().as_millis() as u64,
                    "snapshot written"
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "snapshot failed; the log keeps everything"),
            }
        }
    });
}

fn settle_one(q: &mut Queue, now: u64, id: u64, token: u64, action: SettleAction) -> Result<u64> {
    match action {
        SettleAction::Ack { result } => {
            if result.len() > limits::MAX_RESULT_BYTES {
                return Err(Error::invalid(format!(
                    "result of {} bytes is over the limit of {} bytes",
                    result.len(),
                    limits::MAX_RESULT_BYTES
                )));
            }
            q.ack(now, id, token, result).map(|_| 0)
        }
        SettleAction::Fail {
            error,
            permanent,
            delay_ms,
        } => {
            limits::check_delay_ms("retry delay", delay_ms)?;
            match q.fail(
                now,
                id,
                token,
                limits::truncate_error(error),
                permanent,
                delay_ms,
            )? {
                FailOutcome::Dead => Ok(0),
                FailOutcome::Retry { at_ms } => Ok(at_ms),
            }
        }
        SettleAction::Release => q.release(now, id, token).map(|_| 0),
        SettleAction::Invalid(0) => Err(Error::invalid(format!(
            "item {id}: settlement action is missing (ack, fail, fail_permanent, release or extend)"
        ))),
        SettleAction::Invalid(code) => Err(Error::invalid(format!(
            "item {id}: settlement action {code} is unknown (ack, fail, fail_permanent, \
             release or extend)"
        ))),
        SettleAction::Extend { lease_timeout_ms } => {
            if lease_timeout_ms != 0 {
                limits::check_lease_ms("lease timeout", lease_timeout_ms)?;
            }
            q.extend(now, id, token, lease_timeout_ms)
        }
    }
}

fn queue_record(queue: &Queue) -> QueueRecord {
    QueueRecord::new(
        &queue.name,
        &queue.options,
        queue.sealed,
        queue.created_ms,
        &queue.counters,
    )
}

/// A small repeatable random source for the engine's model tests (xorshift): each call
/// returns a number below its argument.
#[cfg(test)]
pub(crate) fn test_random() -> impl FnMut(u64) -> u64 {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    move |below| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    }
}
