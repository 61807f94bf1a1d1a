//! The sled backend, with group commit.
//!
//! Writers apply their batch to sled (in memory until flushed, crates.md §4) and get a
//! ticket; they then wait on a `watch` of the highest durable ticket. One flusher task
//! owns making tickets durable: it takes everything written so far, makes it durable
//! with one sync on a blocking thread, and publishes the covered ticket. Every writer
//! that arrived before the sync started shares it, so under load the syncs run back to
//! back, each covering all the writes queued meanwhile: one sync per burst, not one per
//! request.
//!
//! - **Strict**: each batch goes to the write-ahead log ([`super::wal`]); the
//!   flusher's sync is one `write` + `fdatasync` of the log, which releases the
//!   waiters. Only then is the batch handed to the applier thread, which applies it
//!   to sled in ticket order, off the critical path; sled is flushed at checkpoints.
//!   A sled flush costs about ten times an `fdatasync` and applying to sled more than
//!   the sync itself, so this is what makes strict mode fast.
//! - **Relaxed**: answers at once; the flusher flushes sled every 500 ms.
//!
//! Layout under the data dir: `sled/` (one tree; keys `q<name>` for queue records and
//! `i<id: u64 BE>` for items, so a batch touching both is one atomic `apply_batch`) and
//! `wal/` (log files `wal-<n>.log`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::{Notify, watch};

use super::wal::{self, Segment};
use super::{FlushStats, ItemRecord, Op, QueueRecord, Snapshot, Ticket};
use crate::error::{Error, Result};

/// How long relaxed mode may hold unflushed writes.
const RELAXED_FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Synced groups of batches that may wait for the sled applier before the flusher
/// blocks.
const APPLY_BACKLOG: usize = 65_536;
/// Most yields the flusher spends waiting for more writers to join a sync.
const COMMIT_YIELDS: usize = 8;
/// Checkpoint (flush sled, drop the old log) when the log grows past this…
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// …or, by default, when this long has passed since the last checkpoint, so restarts
/// replay little (`--checkpoint-every`).
pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Acknowledge only after the write is on disk (write-ahead log, group commit).
    Strict,
    /// Acknowledge at once; flush at least every 500 ms.
    Relaxed,
}

pub struct SledStore {
    inner: Arc<Inner>,
}

/// Strict mode's log: the buffer writers append to, and the file the flusher owns.
struct Log {
    dir: PathBuf,
    /// Batches not yet durable. Writers hold this lock only to copy bytes in; the
    /// flusher only to swap it out.
    pending: Mutex<Pending>,
    /// Written and synced by the flusher only (on a blocking thread).
    segment: Mutex<Segment>,
    last_checkpoint: Mutex<Instant>,
    checkpointing: AtomicBool,
    checkpoint_every_ms: AtomicU64,
    applier: Applier,
}

/// Applies durable batches to sled in ticket order on its own thread. Batches reach
/// sled only after their log bytes are synced, so sled never holds anything the log
/// does not (after a crash, replaying the log over sled is exact).
struct Applier {
    /// Bounded: when sled falls behind, the flusher waits (backpressure) instead of
    /// memory growing.
    queue: std::sync::mpsc::SyncSender<(u64, Vec<sled::Batch>)>,
    /// The highest ticket applied to sled, for checkpoints to wait on.
    applied: Arc<(Mutex<u64>, std::sync::Condvar)>,
    failed: Arc<AtomicBool>,
}

impl Applier {
    fn spawn(tree: sled::Tree) -> std::io::Result<Applier> {
        let (queue, batches) =
            std::sync::mpsc::sync_channel::<(u64, Vec<sled::Batch>)>(APPLY_BACKLOG);
        let applied = Arc::new((Mutex::new(0u64), std::sync::Condvar::new()));
        let failed = Arc::new(AtomicBool::new(false));
        let (done, broke) = (applied.clone(), failed.clone());
        std::thread::Builder::new()
            .name("workq-sled-apply".into())
            .spawn(move || {
                // Ends when the store (the sender) is dropped.
                for (ticket, group) in batches {
                    for batch in group {
                        if let Err(e) = tree.apply_batch(batch) {
                            tracing::error!(error = %e, "applying to sled failed; the log keeps the data");
                            broke.store(true, Ordering::SeqCst);
                        }
                    }
                    let (lock, ready) = &*done;
                    *lock.lock().unwrap_or_else(|e| e.into_inner()) = ticket;
                    ready.notify_all();
                }
            })?;
        Ok(Applier {
            queue,
            applied,
            failed,
        })
    }

    /// Blocks until every batch up to `ticket` is in sled.
    fn wait_applied(&self, ticket: u64) {
        let (lock, ready) = &*self.applied;
        let mut applied = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *applied < ticket && !self.failed.load(Ordering::SeqCst) {
            applied = ready.wait(applied).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Strict mode's unsynced batches: their log bytes, the same batches for sled (applied
/// only once the bytes are synced), and the ticket of the last one.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    batches: Vec<sled::Batch>,
    ticket: u64,
}

struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    durability: Durability,
    log: Option<Log>,
    /// Tickets handed out (relaxed mode; strict mode counts inside `Log::pending`).
    written: AtomicU64,
    /// Highest ticket known to be durable.
    durable: watch::Sender<u64>,
    kick: Arc<Notify>,
    healthy: AtomicBool,
    started: AtomicBool,
    stats: FlushStats,
    /// The next item id / lease token. Not sled's `generate_id`: that one blocks on a
    /// full sled flush every millionth id, in the caller (under a queue lock). Each
    /// batch carries the counter's value (see `write`), and recovery takes the highest
    /// of that record and every id and token on disk, so ids keep increasing across
    /// restarts.
    next_id: AtomicU64,
    /// Relaxed mode: orders the counter record with the batch it rides in.
    relaxed_order: Mutex<()>,
}

/// Key of the id counter's record ('m' for meta: neither a queue nor an item key).
const NEXT_ID_KEY: &[u8] = b"mnext_id";

fn storage_error(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("{context}: {e}"))
}

impl SledStore {
    pub fn open(dir: &Path, durability: Durability, cache_bytes: u64) -> Result<SledStore> {
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(cache_bytes)
            // We flush ourselves: at checkpoints (strict) or on our own timer (relaxed).
            .flush_every_ms(None)
            .open()
            .map_err(|e| storage_error(&format!("cannot open data dir {}", dir.display()), e))?;
        let tree = db
            .open_tree("workq")
            .map_err(|e| storage_error("cannot open the workq tree", e))?;
        let wal_dir = dir.join("wal");
        std::fs::create_dir_all(&wal_dir)
            .map_err(|e| storage_error("cannot create the log dir", e))?;
        // Replay whatever the log holds (a crash, or a relaxed run after a strict one),
        // make it part of sled, then start a fresh log.
        let files = wal::list(&wal_dir).map_err(|e| storage_error("cannot list the log", e))?;
        let mut replayed = 0usize;
        for (_, path) in &files {
            let batches =
                wal::read_batches(path).map_err(|e| storage_error("cannot read the log", e))?;
            for batch in batches {
                let mut sled_batch = sled::Batch::default();
                for op in batch.ops {
                    match op.value {
                        Some(value) => sled_batch.insert(op.key, value),
                        None => sled_batch.remove(op.key),
                    }
                }
                tree.apply_batch(sled_batch)
                    .map_err(|e| storage_error("replaying the log", e))?;
                replayed += 1;
            }
        }
        if !files.is_empty() {
            db.flush()
                .map_err(|e| storage_error("flushing the replayed log", e))?;
            for (_, path) in &files {
                std::fs::remove_file(path)
                    .map_err(|e| storage_error("removing a replayed log", e))?;
            }
            tracing::info!(
                batches = replayed,
                files = files.len(),
                "replayed the write-ahead log"
            );
        }
        let log = match durability {
            Durability::Relaxed => None,
            Durability::Strict => {
                let next = files.last().map_or(1, |(n, _)| n + 1);
                let segment = Segment::create(&wal_dir, next)
                    .map_err(|e| storage_error("cannot create the log", e))?;
                Some(Log {
                    dir: wal_dir,
                    pending: Mutex::new(Pending::default()),
                    segment: Mutex::new(segment),
                    last_checkpoint: Mutex::new(Instant::now()),
                    checkpointing: AtomicBool::new(false),
                    checkpoint_every_ms: AtomicU64::new(DEFAULT_CHECKPOINT_EVERY.as_millis() as u64),
                    applier: Applier::spawn(tree.clone())
                        .map_err(|e| storage_error("cannot start the sled applier", e))?,
                })
            }
        };
        let (durable, _) = watch::channel(0);
        Ok(SledStore {
            inner: Arc::new(Inner {
                db,
                tree,
                durability,
                log,
                written: AtomicU64::new(0),
                durable,
                kick: Arc::new(Notify::new()),
                healthy: AtomicBool::new(true),
                started: AtomicBool::new(false),
                stats: FlushStats::default(),
                next_id: AtomicU64::new(1),
                relaxed_order: Mutex::new(()),
            }),
        })
    }

    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    /// How often strict mode checkpoints the log into sled when writes keep coming.
    pub fn set_checkpoint_every(&self, every: Duration) {
        if let Some(log) = &self.inner.log {
            log.checkpoint_every_ms
                .store(every.as_millis().max(1) as u64, Ordering::Relaxed);
        }
    }

    pub fn load(&self) -> Result<Snapshot> {
        let mut snapshot = Snapshot::default();
        let mut highest = 0u64;
        for entry in self.inner.tree.iter() {
            let (key, value) = entry.map_err(|e| storage_error("reading the data dir", e))?;
            match key.first() {
                Some(b'q') => snapshot.queues.push(
                    QueueRecord::decode(&*value)
                        .map_err(|e| storage_error("corrupt queue record", e))?,
                ),
                Some(b'i') => {
                    let item = ItemRecord::decode(&*value)
                        .map_err(|e| storage_error("corrupt item record", e))?;
                    highest = highest
                        .max(item.id)
                        .max(item.lease_token)
                        .max(item.done_token);
                    snapshot.items.push(item);
                }
                Some(b'm') if &*key == NEXT_ID_KEY => {
                    let bytes: [u8; 8] = (*value)
                        .try_into()
                        .map_err(|_| storage_error("corrupt id counter", "not 8 bytes"))?;
                    highest = highest.max(u64::from_le_bytes(bytes));
                }
                _ => {}
            }
        }
        self.inner.next_id.store(highest + 1, Ordering::SeqCst);
        Ok(snapshot)
    }

    pub fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::SeqCst)
    }

    pub fn write(&self, ops: Vec<Op>) -> Result<Ticket> {
        let pairs: Vec<(Vec<u8>, Option<Vec<u8>>)> = ops
            .into_iter()
            .map(|op| match op {
                Op::PutQueue(record) => (queue_key(&record.name), Some(record.encode_to_vec())),
                Op::DeleteQueue(name) => (queue_key(&name), None),
                Op::PutItem(record) => (item_key(record.id).to_vec(), Some(record.encode_to_vec())),
                Op::DeleteItem(id) => (item_key(id).to_vec(), None),
            })
            .collect();
        let mut pairs = pairs;
        let mut batch = sled::Batch::default();
        let Some(log) = &self.inner.log else {
            // The counter record is read and applied under one lock, so the values
            // reach sled in increasing order.
            let _order = self
                .inner
                .relaxed_order
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            pairs.push(self.counter_record());
            for (key, value) in pairs {
                match value {
                    Some(value) => batch.insert(key, value),
                    None => batch.remove(key),
                }
            }
            if let Err(e) = self.inner.tree.apply_batch(batch) {
                return Err(fail(&self.inner, storage_error("write failed", e)));
            }
            // Bumped only after the batch is applied: a flush that starts after a
            // ticket is read covers every batch with that ticket or lower.
            return Ok(Ticket(
                self.inner.written.fetch_add(1, Ordering::SeqCst) + 1,
            ));
        };
        // Strict: the batch goes to the log buffer now and into sled only after its
        // log bytes are synced (see `flush_once`). sled flushes its own buffers when
        // it likes, so applying earlier could leave sled ahead of the log after a
        // crash, and replay would then mix old and new records.
        let mut pending = log.pending.lock().unwrap_or_else(|e| e.into_inner());
        // Read under the log lock: frames are ordered by it, so the counter values in
        // the log only increase; each is at least every id handed out before it.
        pairs.push(self.counter_record());
        wal::frame(
            pairs.iter().map(|(k, v)| (k.as_slice(), v.as_deref())),
            &mut pending.bytes,
        );
        for (key, value) in pairs {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        pending.batches.push(batch);
        pending.ticket += 1;
        Ok(Ticket(pending.ticket))
    }

    fn counter_record(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        let value = self.inner.next_id.load(Ordering::SeqCst);
        (NEXT_ID_KEY.to_vec(), Some(value.to_le_bytes().to_vec()))
    }

    pub fn last_ticket(&self) -> Ticket {
        Ticket(current_ticket(&self.inner))
    }

    pub async fn sync(&self, ticket: Ticket) -> Result<()> {
        if self.inner.durability == Durability::Relaxed {
            return Ok(());
        }
        if *self.inner.durable.borrow() >= ticket.0 {
            return Ok(());
        }
        if !self.inner.started.load(Ordering::SeqCst) {
            // No flusher yet (start-up): sync inline.
            return flush_once(&self.inner).await;
        }
        let mut rx = self.inner.durable.subscribe();
        self.inner.kick.notify_one();
        let inner = &self.inner;
        let result = rx
            .wait_for(|durable| *durable >= ticket.0 || !inner.healthy.load(Ordering::SeqCst))
            .await;
        if result.is_err() || !self.healthy() {
            return Err(Error::Storage(
                "flush failed; see the coordinator log".into(),
            ));
        }
        Ok(())
    }

    pub fn request_flush(&self) {
        self.inner.kick.notify_one();
    }

    pub fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::SeqCst)
            && !self
                .inner
                .log
                .as_ref()
                .is_some_and(|log| log.applier.failed.load(Ordering::SeqCst))
    }

    pub fn flush_stats(&self) -> &FlushStats {
        &self.inner.stats
    }

    /// Starts the flusher task (strict: on demand; relaxed: every 500 ms).
    pub fn start(&self) {
        if self.inner.started.swap(true, Ordering::SeqCst) {
            return;
        }
        // The task holds the store weakly, so dropping the store closes the database.
        let weak = Arc::downgrade(&self.inner);
        let kick = self.inner.kick.clone();
        let durability = self.inner.durability;
        tokio::spawn(async move {
            loop {
                match durability {
                    Durability::Strict => kick.notified().await,
                    Durability::Relaxed => tokio::time::sleep(RELAXED_FLUSH_EVERY).await,
                }
                let Some(inner) = weak.upgrade() else { break };
                if let Err(e) = flush_once(&inner).await {
                    tracing::error!(error = %e, "flush failed: acknowledged writes may not be durable");
                }
                maybe_checkpoint(&inner);
            }
        });
    }

    /// Final sync, then a full checkpoint so the next start replays nothing.
    pub async fn close(&self) -> Result<()> {
        flush_once(&self.inner).await?;
        if let Some(log) = &self.inner.log {
            let durable = *self.inner.durable.borrow();
            let owner = self.inner.clone();
            tokio::task::spawn_blocking(move || {
                owner
                    .log
                    .as_ref()
                    .expect("strict mode has a log")
                    .applier
                    .wait_applied(durable);
                owner.db.flush()
            })
            .await
            .map_err(|e| storage_error("flush task", e))?
            .map_err(|e| storage_error("final flush", e))?;
            let current = log.segment.lock().unwrap_or_else(|e| e.into_inner()).number;
            for (number, path) in
                wal::list(&log.dir).map_err(|e| storage_error("listing the log", e))?
            {
                if number < current {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        Ok(())
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Let the flusher notice the store is gone and end.
        self.inner.kick.notify_one();
    }
}

/// Makes everything written so far durable and publishes the covered ticket.
async fn flush_once(inner: &Arc<Inner>) -> Result<()> {
    // Group-commit window: the callers woken by the previous sync are runnable right
    // now and about to write again. Yielding a few times lets them join this sync
    // instead of each starting the next one (Postgres's commit_delay, without a timer:
    // a yield costs microseconds, a sync far more).
    let mut seen = current_ticket(inner);
    for _ in 0..COMMIT_YIELDS {
        tokio::task::yield_now().await;
        let now = current_ticket(inner);
        if now == seen {
            break;
        }
        seen = now;
    }
    let started = Instant::now();
    let target = match &inner.log {
        Some(log) => {
            let pending = {
                let mut guard = log.pending.lock().unwrap_or_else(|e| e.into_inner());
                let ticket = guard.ticket;
                std::mem::replace(
                    &mut *guard,
                    Pending {
                        ticket,
                        ..Pending::default()
                    },
                )
            };
            let target = pending.ticket;
            if target <= *inner.durable.borrow() {
                return Ok(());
            }
            let owner = inner.clone();
            let written = tokio::task::spawn_blocking(move || {
                let log = owner.log.as_ref().expect("strict mode has a log");
                {
                    let mut segment = log.segment.lock().unwrap_or_else(|e| e.into_inner());
                    segment
                        .append_durably(&pending.bytes)
                        .map_err(|e| storage_error("log write failed", e))?;
                    segment.last_ticket = target;
                }
                // Durable now; sled gets the batches in ticket order (only this task
                // sends, one group at a time).
                log.applier
                    .queue
                    .send((target, pending.batches))
                    .map_err(|_| storage_error("sled applier", "stopped"))?;
                Ok::<(), Error>(())
            })
            .await
            .map_err(|e| storage_error("log task", e))?;
            if let Err(e) = written {
                return Err(fail(inner, e));
            }
            target
        }
        None => {
            let target = inner.written.load(Ordering::SeqCst);
            if target <= *inner.durable.borrow() {
                return Ok(());
            }
            let db = inner.db.clone();
            let flushed = tokio::task::spawn_blocking(move || db.flush())
                .await
                .map_err(|e| storage_error("flush task", e))?;
            if let Err(e) = flushed {
                return Err(fail(inner, storage_error("flush failed", e)));
            }
            target
        }
    };
    let micros = started.elapsed().as_micros() as u64;
    inner.stats.flushes.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .total_micros
        .fetch_add(micros, Ordering::Relaxed);
    inner.stats.max_micros.fetch_max(micros, Ordering::Relaxed);
    inner.durable.send_if_modified(|durable| {
        if target > *durable {
            *durable = target;
            true
        } else {
            false
        }
    });
    Ok(())
}

fn current_ticket(inner: &Inner) -> u64 {
    match &inner.log {
        Some(log) => log.pending.lock().unwrap_or_else(|e| e.into_inner()).ticket,
        None => inner.written.load(Ordering::SeqCst),
    }
}

/// Marks the store failed and wakes waiters so they report it instead of hanging.
fn fail(inner: &Inner, error: Error) -> Error {
    inner.healthy.store(false, Ordering::SeqCst);
    inner.durable.send_modify(|_| {});
    error
}

/// Starts a checkpoint when the log is big or old enough: new log file now, sled
/// flush in the background, then the old file goes.
fn maybe_checkpoint(inner: &Arc<Inner>) {
    let Some(log) = &inner.log else { return };
    let due = {
        let segment = log.segment.lock().unwrap_or_else(|e| e.into_inner());
        let last = *log
            .last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let every = Duration::from_millis(log.checkpoint_every_ms.load(Ordering::Relaxed));
        segment.bytes >= CHECKPOINT_BYTES || (segment.bytes > 0 && last.elapsed() >= every)
    };
    if !due || log.checkpointing.swap(true, Ordering::SeqCst) {
        return;
    }
    let inner = inner.clone();
    tokio::task::spawn_blocking(move || {
        let log = inner.log.as_ref().expect("strict mode has a log");
        let old = {
            let mut segment = log.segment.lock().unwrap_or_else(|e| e.into_inner());
            match Segment::create(&log.dir, segment.number + 1) {
                Ok(fresh) => std::mem::replace(&mut *segment, fresh),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a new log file; checkpoint skipped");
                    log.checkpointing.store(false, Ordering::SeqCst);
                    return;
                }
            }
        };
        // Once the applier has caught up with the last batch of `old`, this flush makes
        // every batch of it durable in sled, and the file can go.
        log.applier.wait_applied(old.last_ticket);
        match inner.db.flush() {
            Ok(_) => {
                if let Err(e) = std::fs::remove_file(&old.path) {
                    tracing::warn!(error = %e, file = %old.path.display(), "cannot remove a checkpointed log");
                }
            }
            Err(e) => tracing::warn!(error = %e, "checkpoint flush failed; the log is kept"),
        }
        *log.last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        log.checkpointing.store(false, Ordering::SeqCst);
    });
}

fn queue_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 1);
    key.push(b'q');
    key.extend_from_slice(name.as_bytes());
    key
}

fn item_key(id: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'i';
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: u64, attempts: u32) -> Op {
        Op::PutItem(ItemRecord {
            queue: "q".into(),
            id,
            attempts,
            ..ItemRecord::default()
        })
    }

    async fn reopen(dir: &Path) -> SledStore {
        // sled holds a file lock until its threads let go of the old handle.
        for _ in 0..250 {
            if let Ok(store) = SledStore::open(dir, Durability::Strict, 8 << 20) {
                return store;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot reopen {}", dir.display());
    }

    fn attempts_by_id(store: &SledStore) -> std::collections::BTreeMap<u64, u32> {
        let snapshot = store.load().unwrap();
        snapshot.items.iter().map(|i| (i.id, i.attempts)).collect()
    }

    fn log_files(dir: &Path) -> usize {
        wal::list(&dir.join("wal")).unwrap().len()
    }

    /// A checkpoint must leave sled holding the latest value of each key, so that the
    /// log can go, and what came after it must come back from the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoints_keep_the_latest_value_of_each_key_and_the_log_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), Durability::Strict, 8 << 20).unwrap();
            store.start();
            store.set_checkpoint_every(Duration::from_millis(1));
            // Items 1 and 2 rewritten 40 times, items 100.. written once, 120 removed
            // again.
            for n in 1..=40u32 {
                let ticket = store
                    .write(vec![item(1, n), item(2, n), item(99 + u64::from(n), 0)])
                    .unwrap();
                store.sync(ticket).await.unwrap();
            }
            let ticket = store.write(vec![Op::DeleteItem(120)]).unwrap();
            store.sync(ticket).await.unwrap();
            // Checkpoint until one has covered every write and taken its log file.
            let log = store.inner.log.as_ref().unwrap();
            let start = Instant::now();
            while log.checkpointing.load(Ordering::SeqCst)
                || *log.applier.applied.0.lock().unwrap() < ticket.0
                || log_files(dir.path()) > 1
            {
                assert!(start.elapsed() < Duration::from_secs(20), "no checkpoint");
                maybe_checkpoint(&store.inner);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // After the checkpoint: only the log has these.
            store.set_checkpoint_every(Duration::from_secs(3600));
            let ticket = store.write(vec![item(1, 77), Op::DeleteItem(100)]).unwrap();
            store.sync(ticket).await.unwrap();
            // Dropped without `close`: what a crash leaves.
        }
        let store = reopen(dir.path()).await;
        let found = attempts_by_id(&store);
        assert_eq!(found.get(&1), Some(&77), "the log's later write wins");
        assert_eq!(
            found.get(&2),
            Some(&40),
            "sled has the last write before the checkpoint"
        );
        assert!(!found.contains_key(&100) && !found.contains_key(&120));
        assert_eq!(found.len(), 2 + 38, "{found:?}");
        assert!(
            (101..=139)
                .filter(|id| *id != 120)
                .all(|id| found[&id] == 0)
        );
    }
}
