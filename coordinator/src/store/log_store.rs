//! The disk store: a write-ahead log with group commit, compacted by snapshots.
//!
//! **Writes.** Each batch is framed into a shared buffer and gets a ticket. One flusher
//! thread owns the log file: it takes everything buffered so far, appends it,
//! `fdatasync`s it and publishes the covered ticket. Every writer that arrived before
//! the sync started shares it, so under load the syncs run back to back, each covering
//! all the writes queued meanwhile: one sync per burst, not one per request. Before a
//! sync the flusher waits briefly for half as many waiters as the last sync had (see
//! [`gather_target`], [`gather_window`]): the writers it just answered are about to
//! come back, and a sync that leaves without them makes them wait for the whole next
//! one.
//! - **Strict**: a writer waits for its ticket before the engine answers.
//! - **Relaxed**: answers at once; the flusher syncs every 500 ms. Past
//!   [`RELAXED_MAX_UNSYNCED`] bytes waiting for the disk, or once the log has failed, a
//!   writer waits for its ticket as in strict mode.
//!
//! **Snapshots.** The log only grows, so when it has grown enough (see
//! [`LogStore::checkpoint_due`]) and enough of it is garbage that a snapshot pays
//! ([`LogStore::snapshot_pays`]), the engine writes its whole state to a snapshot file
//! and the log files before it go. The snapshot is *fuzzy* (as in ARIES): the store
//! first starts a new log file `n` ([`LogStore::begin_checkpoint`]), then the engine
//! dumps one queue at a time under that queue's lock while writes go on. A record in
//! the snapshot is therefore at least as new as anything in log files before `n`, and
//! anything that changed after it was dumped is in log files `n`, `n + 1`, …. Every
//! batch holds whole records, so replaying those files over the snapshot ends with each
//! key at its last logged value: recovery is exact. Before the snapshot is put in place
//! ([`LogStore::finish_checkpoint`]) the log is synced past everything the dump saw, so
//! a snapshot never holds a change the log might lose in a crash. It is written to a
//! temporary file, `fdatasync`ed and renamed: a crash leaves either the old snapshot
//! and its log files or the new one.
//!
//! Layout under `<data-dir>/wal/`: `wal-<n>.log` (log files) and `snapshot-<n>.snap`
//! (the state as of the start of log file `n`). Recovery loads the newest snapshot and
//! replays log files `n` and later. Keys: `q<name>` for queue records, `i<id: u64 BE>`
//! for items, `s<name>` for schedules, `m…` for the store's own records.
//!
//! Why not sled (the first store): its flush costs ~10× an `fdatasync` of the same
//! bytes, it syncs with `sync_file_range` (not power-loss safe, spacejam/sled#1452),
//! its cache holds a second copy of the state the engine already has in memory, and
//! 0.34.7 deadlocks under sustained heavy writes (spacejam/sled#1412). A data dir
//! written by that store is imported on first start ([`super::import`]).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::File;
use std::hash::BuildHasherDefault;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::Notify;

use super::record::encode_item;
use super::wal::{self, Ending, Segment};
use super::{FlushStats, ItemRecord, OnDurable, QueueRecord, ScheduleRecord, Snapshot, Ticket};
use crate::engine::items::{ItemView, Stored};
use crate::engine::queue::IdHasher;
use crate::error::{Error, Result};

/// How long relaxed mode may hold unsynced writes.
const RELAXED_FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Relaxed mode answers before the log is on disk, so a crash can lose ids and lease
/// tokens already handed out. It logs the id counter this far ahead of its value, and
/// recovery starts past the highest value logged, so nothing handed out and lost is
/// handed out again: a lease token stays unique, and a worker holding one from before
/// the crash is refused. No run can hand out 2^32 ids between two syncs (their log
/// records would be hundreds of GiB). The price: a relaxed coordinator's ids jump by
/// this much at each start.
const RELAXED_ID_MARGIN: u64 = 1 << 32;
/// How many logged bytes relaxed mode lets wait for the disk before it waits for the
/// disk itself: past this, every write is answered only once it is on disk, as in
/// strict mode, until a sync catches up. A stalled disk then slows the writers
/// instead of growing the coordinator's memory until it is killed.
const RELAXED_MAX_UNSYNCED: u64 = 64 << 20;
/// How far relaxed mode lets its answers run ahead of the disk in time: once the
/// oldest write not yet on disk is older than this (a sync that has not returned in
/// time, a stalled disk), every write is answered only once it is on disk, until a
/// sync catches up. So a crash loses at most this much time's worth of acknowledged
/// writes (and at most [`RELAXED_MAX_UNSYNCED`] bytes of them), however long the disk
/// stalled before it. Twice the sync interval: a timed sync that finds writes half a
/// second old does not hold the writers up while it runs.
const RELAXED_MAX_LAG: Duration = Duration::from_millis(1_000);
/// Longest the flusher waits for the writers of the last sync to come back before it
/// syncs without them (see [`gather_window`]).
const MAX_GATHER: Duration = Duration::from_micros(250);
thread_local! {
    /// Where [`LogStore::write`] frames a batch before copying it to the pending
    /// buffer.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Largest scratch buffer a thread keeps between batches.
const MAX_SCRATCH_BYTES: usize = 1 << 20;
/// Largest pending-bytes buffer kept for reuse after a flush (a burst of big payloads
/// should not pin its buffer for the process's life).
const MAX_SPARE_BYTES: usize = 4 << 20;
/// Snapshot when the log since the last snapshot is at least this big and at least as
/// big as that snapshot (snapshot work stays proportional to write volume), if the
/// snapshot pays (see [`SNAPSHOT_PAYS_AT`]).
const CHECKPOINT_MIN_BYTES: u64 = 64 * 1024 * 1024;
/// A snapshot pays once what a restart would read (the last snapshot and the log
/// since) is at least this many times what a snapshot would write now (the state):
/// a third of what a restart reads is then garbage that the snapshot drops. A log
/// that only grew (every item still queued) holds little else than the state, so a
/// snapshot would write it all again to save a restart nothing.
const SNAPSHOT_PAYS_AT: f64 = 1.5;
/// By default, also snapshot when this long has passed and the log has reached half
/// the snapshot's size (`--checkpoint-every`).
pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// Records per snapshot frame.
const SNAPSHOT_FRAME_RECORDS: usize = 512;
/// The snapshot writer hands its buffer to the file past this many bytes…
const SNAPSHOT_SPILL_BYTES: usize = 1 << 20;
/// …and syncs the file every this many.
const SNAPSHOT_SYNC_BYTES: u64 = 4 << 20;

/// Key of the id counter's record ('m' for meta: neither a queue nor an item key).
pub(super) const NEXT_ID_KEY: &[u8] = b"mnext_id";
/// First record of a snapshot (value: format version).
const SNAPSHOT_HEADER_KEY: &[u8] = b"msnapshot";
/// Last record of a snapshot (value: records before it, u64 LE).
const SNAPSHOT_END_KEY: &[u8] = b"mend";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Acknowledge only after the write is on disk (write-ahead log, group commit).
    Strict,
    /// Acknowledge at once; sync at least every 500 ms.
    Relaxed,
}

pub struct LogStore {
    inner: Arc<Inner>,
    /// The flusher thread, joined when the store is dropped.
    flusher: Mutex<Option<JoinHandle<()>>>,
}

/// Batches not yet handed to the log file, and what the flusher needs to know about
/// them. Writers hold this lock only to copy bytes in; the flusher only to swap them
/// out.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// The ticket of the last batch written.
    ticket: u64,
    /// The last ticket a flush has taken (on its way to disk, or there).
    taken: u64,
    /// Sync waiters whose tickets no flush has taken yet.
    waiters: u32,
    /// A sync was asked for since the last flush took the bytes.
    wanted: bool,
    flusher: Flusher,
    /// The waiters of the next sync (tickets after `taken`)…
    next: Arc<Commit>,
    /// …and of the last one taken (tickets up to `taken`).
    taken_commit: Arc<Commit>,
    /// The store is gone: the flusher thread ends.
    stop: bool,
    /// Item records written since the store opened (with those recovered), for the
    /// size of a record in a snapshot.
    items: ItemRecords,
    /// When the first batch of `bytes` was written (µs since [`Inner::opened`], plus
    /// one), or 0 when none is.
    first_written: u64,
}

/// A count of item records and their bytes in the log's format.
#[derive(Clone, Copy, Default)]
struct ItemRecords {
    records: u64,
    bytes: u64,
}

impl ItemRecords {
    fn add(&mut self, other: ItemRecords) {
        self.records += other.records;
        self.bytes += other.bytes;
    }

    /// Bytes of `items` records of the average size.
    fn bytes_of(&self, items: u64) -> f64 {
        if self.records == 0 {
            return 0.0;
        }
        items as f64 * (self.bytes as f64 / self.records as f64)
    }
}

/// One sync's waiters, woken together when it is done. A sync wakes only the writers
/// it covers; the ones that arrived while it ran wait for the next.
#[derive(Default)]
struct Commit {
    done: AtomicBool,
    notify: Notify,
    /// The calls handed over to run once the sync is done (see [`LogStore::on_durable`]);
    /// `closed` once they have been taken to run, after which no more are accepted.
    calls: Mutex<Calls>,
}

#[derive(Default)]
struct Calls {
    list: Vec<Arc<dyn OnDurable>>,
    closed: bool,
}

impl Commit {
    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.done.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// Makes the handed-over calls: the sync is on disk (`ok`) or it failed. Runs before
    /// the covered ticket is published, so whoever sees the ticket durable knows that
    /// every call for it has been made.
    fn call(&self, ok: bool) {
        let calls = {
            let mut calls = lock(&self.calls);
            calls.closed = true;
            std::mem::take(&mut calls.list)
        };
        for call in calls {
            call.durable(ok);
        }
    }

    /// Wakes the waiters: the sync is on disk, or it failed (they check `healthy`).
    /// Calls not yet made are told it failed: a successful sync makes them first.
    fn finish(&self) {
        self.call(false);
        self.done.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// What the flusher thread is waiting for, so that writers wake it only when it
/// matters (a futex wake is a system call).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Flusher {
    /// Writing, syncing, or about to look at `Pending` again.
    #[default]
    Busy,
    /// Waiting for a sync to be asked for.
    Idle,
    /// Waiting for this many waiters before it syncs.
    Gathering(u32),
}

struct Inner {
    /// Held for the store's life: one coordinator per data dir.
    _lock: File,
    /// The sync marker every flush's bytes start with ([`wal::sync_marker`]), its
    /// number drawn at random when the store opened.
    marker: Vec<u8>,
    dir: PathBuf,
    durability: Durability,
    pending: Mutex<Pending>,
    /// Wakes the flusher thread (see [`Flusher`]).
    wake: Condvar,
    /// Written and synced by the flusher only; swapped for a fresh file when a
    /// snapshot starts.
    segment: Mutex<Segment>,
    /// Held by a flush from taking the pending bytes until it has published them as
    /// durable: the flusher thread and a direct flush (start-up, shutdown) never run
    /// at once, so batches reach the log in write order and `durable` never runs
    /// ahead of the disk.
    flushing: Mutex<()>,
    /// The buffer the last flush wrote, cleared: the next flush hands it to the
    /// writers, so that appending to the pending bytes does not grow a fresh buffer
    /// after every sync.
    spare: Mutex<Vec<u8>>,
    /// Highest ticket known to be durable.
    durable: AtomicU64,
    /// Bytes written and not yet on disk (see [`RELAXED_MAX_UNSYNCED`]).
    unsynced: AtomicU64,
    /// [`RELAXED_MAX_UNSYNCED`], lowered by tests.
    max_unsynced: AtomicU64,
    /// When the oldest write not yet on disk was written (µs since `opened`, plus
    /// one), or 0 when every write is on disk (see [`RELAXED_MAX_LAG`]).
    oldest_unsynced: AtomicU64,
    /// [`RELAXED_MAX_LAG`] in µs, lowered by tests.
    max_lag_us: AtomicU64,
    /// [`RELAXED_FLUSH_EVERY`] in ms, raised by tests.
    relaxed_every_ms: AtomicU64,
    /// The clock of `oldest_unsynced`.
    opened: Instant,
    healthy: AtomicBool,
    /// Notified once, when the log fails (see [`LogStore::failed`])…
    failure: Notify,
    /// …with the error that failed it.
    failed_with: Mutex<Option<String>>,
    /// The last ticket of the batch whose write or sync failed, when part of it may
    /// have reached the disk anyway (relaxed mode, or cutting it off failed too; see
    /// [`Segment::cut_back`]); 0 when none may have. Its callers are told so.
    in_doubt_to: AtomicU64,
    started: AtomicBool,
    stats: FlushStats,
    /// The next item id / lease token. Each batch carries the counter's value (see
    /// `write`), and recovery takes the highest of those and of every id and token on
    /// disk, so ids keep increasing across restarts.
    next_id: AtomicU64,
    /// What `open` read, until the engine takes it.
    recovered: Mutex<Option<Snapshot>>,
    checkpoints: Checkpoints,
}

struct Checkpoints {
    /// Notified when a snapshot is due; the engine's checkpointer waits on it.
    wanted: Arc<Notify>,
    running: AtomicBool,
    last: Mutex<Instant>,
    every_ms: AtomicU64,
    /// [`CHECKPOINT_MIN_BYTES`], lowered by tests.
    min_bytes: AtomicU64,
    /// The log's size when the last snapshot that came due did not pay
    /// ([`LogStore::snapshot_pays`]); 0 when none has been declined since the last
    /// snapshot. None is due again until the log has doubled or `every_ms` has passed
    /// since (`last` is when it was declined).
    declined_at: AtomicU64,
}

fn storage_error(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("{context}: {e}"))
}

/// A set of item ids, as bits in blocks of 4,096 ids (512 bytes a block). Ids come
/// from one counter, so the ids a data dir holds are dense in a few ranges: a million
/// take a few hundred blocks, where a map from id to position takes ~36 MB.
#[derive(Default)]
struct IdSet {
    blocks: HashMap<u64, Box<[u64; 64]>, BuildHasherDefault<IdHasher>>,
}

impl IdSet {
    /// `id`'s block, word in the block and bit in the word.
    fn place(id: u64) -> (u64, usize, u64) {
        (id >> 12, (id >> 6) as usize & 63, 1 << (id & 63))
    }

    /// Adds `id`; false when it was there already.
    fn insert(&mut self, id: u64) -> bool {
        let (block, word, bit) = Self::place(id);
        let block = self
            .blocks
            .entry(block)
            .or_insert_with(|| Box::new([0; 64]));
        let new = block[word] & bit == 0;
        block[word] |= bit;
        new
    }

    fn contains(&self, id: u64) -> bool {
        let (block, word, bit) = Self::place(id);
        self.blocks
            .get(&block)
            .is_some_and(|block| block[word] & bit != 0)
    }
}

/// The state read back at start-up, key by key. Items are turned into the engine's
/// stored form as they are read: the allocations are the ones the engine keeps. What
/// recovery needs on top is the list, a bit per id read, and (only once a record names
/// an id read before) a map from id to place in the list; the allocator hands them
/// back to the system once the engine has taken the items, so a restarted
/// coordinator is no bigger than the state it holds.
#[derive(Default)]
pub(super) struct Recovered {
    pub queues: HashMap<String, QueueRecord>,
    pub schedules: HashMap<String, ScheduleRecord>,
    /// In the order first read, with `None` where an item was deleted later. Snapshots
    /// list each queue's items by id, so the engine builds its indexes in id order
    /// (much faster than at random).
    items: Vec<Option<(u32, Stored)>>,
    /// Where each item of `items[..indexed]` is. Items are listed without a position
    /// while their ids are new (a snapshot's ids are distinct, and a log of items
    /// that only arrived names each id once), and indexed only once a record names
    /// an id read before.
    positions: HashMap<u64, usize, BuildHasherDefault<IdHasher>>,
    indexed: usize,
    /// Every item id read: whether a record's id is new, without `positions`.
    seen: IdSet,
    /// Names of the queues items belong to (items hold an index into this).
    pub names: Vec<String>,
    name_index: HashMap<String, u32>,
    pub unreadable: u64,
    /// The highest id or token seen anywhere.
    pub highest: u64,
    items_read: ItemRecords,
}

impl Recovered {
    /// Applies one logged or snapshotted change.
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        match key.split_first() {
            Some((b'q', name)) => {
                let name =
                    std::str::from_utf8(name).map_err(|e| storage_error("corrupt queue key", e))?;
                match value {
                    Some(value) => {
                        let record = QueueRecord::decode(value)
                            .map_err(|e| storage_error("corrupt queue record", e))?;
                        self.queues.insert(name.to_string(), record);
                    }
                    None => {
                        self.queues.remove(name);
                    }
                }
            }
            Some((b's', name)) => {
                let name = std::str::from_utf8(name)
                    .map_err(|e| storage_error("corrupt schedule key", e))?;
                match value {
                    Some(value) => {
                        let record = ScheduleRecord::decode(value)
                            .map_err(|e| storage_error("corrupt schedule record", e))?;
                        self.schedules.insert(name.to_string(), record);
                    }
                    None => {
                        self.schedules.remove(name);
                    }
                }
            }
            Some((b'i', id)) => {
                let id = u64::from_be_bytes(
                    id.try_into()
                        .map_err(|_| storage_error("corrupt item key", "not 8 bytes"))?,
                );
                match value {
                    Some(value) => {
                        self.items_read.add(ItemRecords {
                            records: 1,
                            bytes: (key.len() + value.len() + wal::PUT_OVERHEAD) as u64,
                        });
                        let record = ItemRecord::decode(value)
                            .map_err(|e| storage_error("corrupt item record", e))?;
                        self.highest = self
                            .highest
                            .max(record.id)
                            .max(record.lease_token)
                            .max(record.done_token);
                        let queue = self.name_of(&record.queue);
                        match record.into_item() {
                            Some(item) => {
                                self.put_item(id, queue, Stored::new(item));
                            }
                            None => {
                                self.delete_item(id);
                                self.unreadable += 1;
                            }
                        }
                    }
                    None => self.delete_item(id),
                }
            }
            _ if key == NEXT_ID_KEY => {
                let bytes: [u8; 8] = value
                    .unwrap_or_default()
                    .try_into()
                    .map_err(|_| storage_error("corrupt id counter", "not 8 bytes"))?;
                self.highest = self.highest.max(u64::from_le_bytes(bytes));
            }
            // Snapshot framing and keys of later versions.
            _ => {}
        }
        Ok(())
    }

    /// Applies every intact batch of a log or snapshot file. Returns how the file
    /// ended and whether its last record was a snapshot's end mark.
    fn replay_file(&mut self, path: &Path) -> Result<(Ending, bool)> {
        let (mut failed, mut ended) = (None, false);
        let ending = wal::replay(path, |ops| {
            for (key, value) in ops {
                ended = *key == SNAPSHOT_END_KEY;
                if failed.is_none()
                    && let Err(e) = self.apply(key, *value)
                {
                    failed = Some(e);
                }
            }
        })
        .map_err(|e| storage_error(&format!("cannot read {}", path.display()), e))?;
        match failed {
            Some(e) => Err(e),
            None => Ok((ending, ended)),
        }
    }

    /// Replays one log file; a torn tail (a crash mid-write, never acknowledged) ends
    /// it. Returns how many of its bytes hold intact frames.
    pub fn replay_log(&mut self, path: &Path) -> Result<u64> {
        let (ending, _) = self.replay_file(path)?;
        match ending {
            Ending::Damaged { offset } => {
                tracing::warn!(file = %path.display(), offset, "log ends in a torn or corrupt record; ignoring the rest of this file")
            }
            Ending::Corrupt { offset, synced } => {
                return Err(Error::Storage(format!(
                    "log file {} is damaged at byte {offset}, and records synced after \
                     it follow (byte {synced}): the disk changed what was written. \
                     Refusing to start rather than lose them; nothing was changed",
                    path.display()
                )));
            }
            Ending::Clean | Ending::Zeroed { .. } => {}
        }
        Ok(ending.frames_len(file_len(path)))
    }

    /// Loads a snapshot, which must be whole: it was synced before it got its name.
    fn load_snapshot(&mut self, path: &Path) -> Result<()> {
        let (ending, ended) = self.replay_file(path)?;
        if ending != Ending::Clean || !ended {
            return Err(Error::Storage(format!(
                "snapshot {} is damaged (it was complete when written; the disk changed it). \
                 Restore the data dir from a backup",
                path.display()
            )));
        }
        Ok(())
    }

    fn name_of(&mut self, queue: &str) -> u32 {
        if let Some(index) = self.name_index.get(queue) {
            return *index;
        }
        let index = self.names.len() as u32;
        self.names.push(queue.to_string());
        self.name_index.insert(queue.to_string(), index);
        index
    }

    fn put_item(&mut self, id: u64, queue: u32, item: Stored) {
        if self.seen.insert(id) {
            self.items.push(Some((queue, item)));
            return;
        }
        self.index_listed();
        match self.positions.entry(id) {
            Entry::Occupied(at) => self.items[*at.get()] = Some((queue, item)),
            Entry::Vacant(at) => {
                at.insert(self.items.len());
                self.items.push(Some((queue, item)));
                self.indexed = self.items.len();
            }
        }
    }

    fn delete_item(&mut self, id: u64) {
        if !self.seen.contains(id) {
            return;
        }
        self.index_listed();
        if let Some(at) = self.positions.remove(&id) {
            self.items[at] = None;
        }
    }

    /// Adds the items listed without a position to `positions`.
    fn index_listed(&mut self) {
        let listed = &self.items[self.indexed..];
        self.positions.reserve(listed.len());
        for (at, entry) in listed.iter().enumerate() {
            if let Some((_, item)) = entry {
                self.positions.insert(item.id(), self.indexed + at);
            }
        }
        self.indexed = self.items.len();
    }

    /// Every item read, with its queue's index into `names`.
    pub fn items(&self) -> impl Iterator<Item = &(u32, Stored)> {
        self.items.iter().flatten()
    }

    pub fn item_count(&self) -> usize {
        self.items().count()
    }

    pub fn into_snapshot(self) -> Snapshot {
        Snapshot {
            queues: self.queues.into_values().collect(),
            schedules: self.schedules.into_values().collect(),
            items: self.items.into_iter().flatten().collect(),
            queue_names: self.names,
            unreadable: self.unreadable,
        }
    }
}

impl LogStore {
    /// Opens (or creates) the store under `data_dir`: imports a sled data dir left by
    /// an older version, loads the newest snapshot and replays the log after it.
    pub fn open(data_dir: &Path, durability: Durability) -> Result<LogStore> {
        let lock = lock_data_dir(data_dir)?;
        let dir = data_dir.join("wal");
        std::fs::create_dir_all(&dir).map_err(|e| storage_error("cannot create the log dir", e))?;
        super::import::import_sled(data_dir, &dir)?;
        // A snapshot interrupted by a crash.
        for entry in std::fs::read_dir(&dir).map_err(|e| storage_error("cannot list the log", e))? {
            let path = entry
                .map_err(|e| storage_error("cannot list the log", e))?
                .path();
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(&path);
            }
        }
        let snapshots =
            wal::list_snapshots(&dir).map_err(|e| storage_error("cannot list the log", e))?;
        let logs = wal::list(&dir).map_err(|e| storage_error("cannot list the log", e))?;
        let mut recovered = Recovered::default();
        let (mut base, mut snapshot_bytes) = (0u64, 0u64);
        if let Some((number, path)) = snapshots.last() {
            recovered.load_snapshot(path)?;
            base = *number;
            snapshot_bytes = file_len(path);
        }
        let mut log_bytes = 0u64;
        for (number, path) in &logs {
            if *number >= base {
                log_bytes += recovered.replay_log(path)?;
            }
        }
        // Files the newest snapshot covers (a crash between its rename and their
        // removal).
        for (number, path) in snapshots.iter().chain(&logs) {
            if *number < base {
                let _ = std::fs::remove_file(path);
            }
        }
        tracing::info!(
            snapshot = base,
            log_files = logs.iter().filter(|(n, _)| *n >= base).count(),
            log_bytes,
            "recovered from disk"
        );
        // Never append to a replayed file: its tail may be torn.
        let next = logs.last().map_or(0, |(n, _)| *n).max(base) + 1;
        let segment =
            Segment::create(&dir, next).map_err(|e| storage_error("cannot create the log", e))?;
        let next_id = recovered.highest + 1;
        let items_read = recovered.items_read;
        let mut marker = Vec::with_capacity(wal::SYNC_MARKER_LEN);
        wal::sync_marker(random_number(), &mut marker);
        let store = LogStore {
            inner: Arc::new(Inner {
                _lock: lock,
                marker: marker.clone(),
                dir,
                durability,
                pending: Mutex::new(Pending {
                    bytes: marker,
                    items: items_read,
                    ..Pending::default()
                }),
                wake: Condvar::new(),
                segment: Mutex::new(segment),
                flushing: Mutex::new(()),
                spare: Mutex::new(Vec::new()),
                durable: AtomicU64::new(0),
                unsynced: AtomicU64::new(0),
                max_unsynced: AtomicU64::new(RELAXED_MAX_UNSYNCED),
                oldest_unsynced: AtomicU64::new(0),
                max_lag_us: AtomicU64::new(RELAXED_MAX_LAG.as_micros() as u64),
                relaxed_every_ms: AtomicU64::new(RELAXED_FLUSH_EVERY.as_millis() as u64),
                opened: Instant::now(),
                healthy: AtomicBool::new(true),
                failure: Notify::new(),
                failed_with: Mutex::new(None),
                in_doubt_to: AtomicU64::new(0),
                started: AtomicBool::new(false),
                stats: FlushStats {
                    log_bytes: AtomicU64::new(log_bytes),
                    snapshot_bytes: AtomicU64::new(snapshot_bytes),
                    ..FlushStats::default()
                },
                next_id: AtomicU64::new(next_id),
                recovered: Mutex::new(Some(recovered.into_snapshot())),
                checkpoints: Checkpoints {
                    wanted: Arc::new(Notify::new()),
                    running: AtomicBool::new(false),
                    last: Mutex::new(Instant::now()),
                    every_ms: AtomicU64::new(DEFAULT_CHECKPOINT_EVERY.as_millis() as u64),
                    min_bytes: AtomicU64::new(CHECKPOINT_MIN_BYTES),
                    declined_at: AtomicU64::new(0),
                },
            }),
            flusher: Mutex::new(None),
        };
        if durability == Durability::Relaxed {
            // Claim the margin on disk before the first id is handed out: a crash
            // before the first timed flush must not reuse this run's ids either.
            store.write(|_| {})?;
            flush_now(&store.inner)?;
        }
        Ok(store)
    }

    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    /// The state read at open; empty on later calls.
    pub fn load(&self) -> Snapshot {
        lock(&self.inner.recovered).take().unwrap_or_default()
    }

    /// How often to snapshot while writes keep coming (see [`Self::checkpoint_due`]).
    pub fn set_checkpoint_every(&self, every: Duration) {
        self.inner
            .checkpoints
            .every_ms
            .store(every.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// The first of `n` fresh ids in a row (see `Store::ids`).
    pub fn reserve_ids(&self, n: u64) -> u64 {
        self.inner.next_id.fetch_add(n, Ordering::SeqCst)
    }

    /// Writes one batch whose records `fill` encodes in place: into this thread's
    /// scratch buffer (no record or frame of its own to allocate), which is then
    /// copied to the pending buffer in one piece under its lock. A `fill` that panics
    /// leaves only the scratch buffer half written, and it is cleared before each use.
    /// The id counter rides along: it is read after every id in this batch was handed
    /// out, and recovery takes the highest value it finds, so ids never repeat after a
    /// restart.
    pub fn write(&self, fill: impl FnOnce(&mut Batch<'_>)) -> Result<Ticket> {
        SCRATCH.with_borrow_mut(|frame| {
            frame.clear();
            let start = wal::begin_frame(frame);
            let mut batch = Batch {
                frame: &mut *frame,
                items: ItemRecords::default(),
            };
            fill(&mut batch);
            let items = batch.items;
            let counter = self.inner.logged_counter().to_le_bytes();
            wal::push_op(frame, NEXT_ID_KEY, Some(&counter));
            wal::end_frame(frame, start);
            let ticket = {
                let mut pending = lock(&self.inner.pending);
                pending.bytes.extend_from_slice(frame);
                pending.ticket += 1;
                pending.items.add(items);
                if pending.first_written == 0 {
                    pending.first_written = self.inner.clock_us();
                    // Nothing older waits (a flush in progress set its own).
                    let _ = self.inner.oldest_unsynced.compare_exchange(
                        0,
                        pending.first_written,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                // Under the lock, so the flush that takes these bytes counts them off
                // after they were counted on.
                self.inner
                    .unsynced
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                Ticket(pending.ticket)
            };
            if frame.capacity() > MAX_SCRATCH_BYTES {
                *frame = Vec::new(); // a burst of big payloads: do not keep its buffer
            }
            Ok(ticket)
        })
    }

    pub fn last_ticket(&self) -> Ticket {
        Ticket(current_ticket(&self.inner))
    }

    /// Strict: waits until `ticket` is durable. Relaxed: returns at once, unless more
    /// than [`RELAXED_MAX_UNSYNCED`] bytes wait for the disk or the log has failed (then
    /// it reports the failure, as strict mode does).
    pub async fn sync(&self, ticket: Ticket) -> Result<()> {
        if self.is_synced(ticket) {
            return Ok(());
        }
        self.wait_durable(ticket).await
    }

    /// Whether the disk is not keeping up: more than [`RELAXED_MAX_UNSYNCED`] bytes
    /// wait for it, or the oldest write not on it is older than [`RELAXED_MAX_LAG`]
    /// (a stalled volume). Relaxed writes then wait for the disk, and streaming
    /// sessions take in one request at a time, as unary callers do.
    pub fn behind(&self) -> bool {
        self.inner.unsynced.load(Ordering::Relaxed)
            > self.inner.max_unsynced.load(Ordering::Relaxed)
            || !self.inner.lag_within_bounds()
    }

    /// Whether [`LogStore::sync`] of `ticket` would return at once.
    pub fn is_synced(&self, ticket: Ticket) -> bool {
        let relaxed_and_keeping_up =
            self.inner.durability == Durability::Relaxed && !self.behind() && self.healthy();
        relaxed_and_keeping_up || self.inner.durable.load(Ordering::SeqCst) >= ticket.0
    }

    /// Waits until `ticket` is on disk, in either mode.
    pub async fn wait_durable(&self, ticket: Ticket) -> Result<()> {
        if self.inner.durable.load(Ordering::SeqCst) >= ticket.0 {
            return Ok(());
        }
        if !self.inner.started.load(Ordering::SeqCst) {
            // No flusher yet (start-up): sync here.
            return self.flush_here().await;
        }
        if self.healthy()
            && let Some(commit) = self.inner.join_commit(ticket.0)
        {
            commit.wait().await;
        }
        // Only whether its own sync was done counts: a later batch may have failed
        // since (the log is unhealthy now), and this change is on disk all the same.
        if self.inner.durable.load(Ordering::SeqCst) < ticket.0 {
            return Err(not_written(&self.inner, ticket.0));
        }
        Ok(())
    }

    /// Strict mode: hands `call` to the flusher, to be made right after the sync that
    /// covers `ticket` (see [`super::Store::on_durable`]). False when the call was not
    /// taken: not strict, no flusher yet, a failed log, or that sync is already done
    /// or being published.
    pub fn on_durable(&self, ticket: Ticket, call: &Arc<dyn OnDurable>) -> bool {
        if self.inner.durability != Durability::Strict
            || !self.inner.started.load(Ordering::SeqCst)
            || !self.healthy()
        {
            return false;
        }
        let Some(commit) = self.inner.join_commit(ticket.0) else {
            return false;
        };
        let mut calls = lock(&commit.calls);
        if calls.closed {
            return false;
        }
        calls.list.push(call.clone());
        true
    }

    /// The last ticket a flush has taken to write (tests).
    #[cfg(test)]
    pub(crate) fn taken(&self) -> Ticket {
        Ticket(lock(&self.inner.pending).taken)
    }

    /// From now on every log write fails, as on a disk gone bad (tests). Returns the
    /// working log file, for a test whose disk comes back.
    #[cfg(test)]
    pub(crate) fn fail_writes(&self) -> Segment {
        let failing = Segment::failing(&self.inner.dir, u64::MAX >> 1).expect("a failing log file");
        std::mem::replace(&mut *lock(&self.inner.segment), failing)
    }

    /// Stalls the log, as a disk that stopped answering would: no flush gets past
    /// its write until the returned sender is dropped (tests).
    #[cfg(test)]
    pub(crate) fn stall(&self) -> std::sync::mpsc::Sender<()> {
        self.stall_then(false)
    }

    /// A stall ([`Self::stall`]) after which the disk has gone bad
    /// ([`Self::fail_writes`]): the flush it held fails, and so does cutting that
    /// flush's batch off the log (tests).
    #[cfg(test)]
    pub(crate) fn stall_then_fail(&self) -> std::sync::mpsc::Sender<()> {
        self.stall_then(true)
    }

    #[cfg(test)]
    fn stall_then(&self, fail: bool) -> std::sync::mpsc::Sender<()> {
        let inner = self.inner.clone();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held_tx, held) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut segment = lock(&inner.segment);
            held_tx.send(()).expect("the test waits for the stall");
            let _ = released.recv();
            if fail {
                *segment = Segment::failing(&inner.dir, u64::MAX >> 1).expect("a failing log file");
            }
        });
        held.recv().expect("the stall holds the log");
        release
    }

    /// Lowers the bytes that may wait for the disk before it counts as behind (tests).
    #[cfg(test)]
    pub(crate) fn set_max_unsynced(&self, bytes: u64) {
        self.inner.max_unsynced.store(bytes, Ordering::Relaxed);
    }

    /// Strict mode: asks for a sync without waiting for it (background changes such as
    /// expiry). Relaxed mode syncs on its timer.
    pub fn request_flush(&self) {
        if self.inner.durability == Durability::Strict {
            self.inner.ask_flush();
        }
    }

    pub fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::SeqCst)
    }

    /// Returns once a log write or sync has failed. From then on the store writes
    /// nothing more: no later batch, and no snapshot of a state in memory that holds
    /// changes the log refused. The log ends with what was synced before the failure:
    /// in strict mode what reached the file of the batch whose write or sync failed is
    /// cut off before its callers are told it failed ([`Segment::cut_back`]), so a
    /// restart recovers every acknowledged change and none that was refused. The
    /// coordinator stops when this returns (see `server::run`).
    pub async fn failed(&self) {
        loop {
            let failure = self.inner.failure.notified();
            tokio::pin!(failure);
            failure.as_mut().enable();
            if !self.healthy() {
                return;
            }
            failure.await;
        }
    }

    pub fn flush_stats(&self) -> &FlushStats {
        &self.inner.stats
    }

    /// Starts the flusher thread (strict: on demand; relaxed: every 500 ms or on
    /// demand).
    pub fn start(&self) {
        if self.inner.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = self.inner.clone();
        let thread = std::thread::Builder::new()
            .name("workq-flusher".into())
            .spawn(move || run_flusher(&inner))
            .expect("cannot start the flusher thread");
        *lock(&self.flusher) = Some(thread);
    }

    /// Final sync at shutdown.
    pub async fn close(&self) -> Result<()> {
        self.flush_here().await
    }

    /// Flushes on a blocking thread of the runtime, not the flusher's.
    async fn flush_here(&self) -> Result<()> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || flush_now(&inner).map(drop))
            .await
            .map_err(|e| storage_error("log task", e))?
    }

    // ---- snapshots --------------------------------------------------------------

    /// Notified when the log has grown enough that a snapshot is due.
    pub fn checkpoint_wanted(&self) -> Arc<Notify> {
        self.inner.checkpoints.wanted.clone()
    }

    /// Whether anything was logged since the last snapshot started.
    pub fn log_grew(&self) -> bool {
        self.inner.stats.log_bytes.load(Ordering::SeqCst) > 0
    }

    /// Whether the log has grown enough since the last snapshot to write a new one.
    pub fn checkpoint_due(&self) -> bool {
        checkpoint_due(&self.inner)
    }

    /// Whether a snapshot now, of the state `live_items` counts in items, would pay
    /// (see [`SNAPSHOT_PAYS_AT`]). When it would not, no snapshot is due again until
    /// the log has doubled or the checkpoint interval has passed
    /// ([`Self::set_checkpoint_every`]).
    ///
    /// The log is measured before the items are counted. An item is in its queue
    /// before its record is written, so every item the log counts is counted too;
    /// counted the other way round, writers that ran in between would leave log
    /// bytes without their items and make a growing log look like garbage.
    pub fn snapshot_pays(&self, live_items: impl FnOnce() -> u64) -> bool {
        let inner = &self.inner;
        let log = inner.stats.log_bytes.load(Ordering::SeqCst);
        let reads = inner.stats.snapshot_bytes.load(Ordering::SeqCst) + log;
        // Counted before taking the lock: writers take it under their queue's lock.
        let live_items = live_items();
        let state = lock(&inner.pending).items.bytes_of(live_items);
        if reads as f64 >= SNAPSHOT_PAYS_AT * state {
            return true;
        }
        let checkpoints = &inner.checkpoints;
        *lock(&checkpoints.last) = Instant::now();
        checkpoints.declined_at.store(log.max(1), Ordering::SeqCst);
        false
    }

    /// Starts a snapshot: switches to a new log file and opens the snapshot's temporary
    /// file. `None` while another snapshot is being written. Blocking (file IO).
    pub fn begin_checkpoint(&self) -> Result<Option<SnapshotWriter>> {
        if !self.healthy() {
            // The state in memory holds changes the log refused; keep them off disk.
            return Err(failed_earlier(&self.inner));
        }
        let checkpoints = &self.inner.checkpoints;
        if checkpoints.running.swap(true, Ordering::SeqCst) {
            return Ok(None);
        }
        // From here on the writer's Drop clears `running` if anything fails.
        let running = Running(self.inner.clone());
        let number = {
            let mut segment = lock(&self.inner.segment);
            let fresh = Segment::create(&self.inner.dir, segment.number + 1)
                .map_err(|e| storage_error("cannot start a new log file", e))?;
            *segment = fresh;
            self.inner.stats.log_bytes.store(0, Ordering::SeqCst);
            checkpoints.declined_at.store(0, Ordering::SeqCst);
            segment.number
        };
        Ok(Some(SnapshotWriter {
            file: SnapshotFile::create(&self.inner.dir, number)?,
            _running: running,
        }))
    }

    /// Puts a finished dump in place once the log holds everything it saw (`seen`:
    /// the last ticket when the dump ended), and removes the files it replaces.
    /// Returns the snapshot's size. Blocking (file IO); the caller waits for `seen`
    /// to be durable first ([`Self::wait_durable`]).
    pub fn finish_checkpoint(&self, writer: SnapshotWriter) -> Result<u64> {
        let SnapshotWriter { file, _running } = writer;
        let number = file.number;
        let bytes = file.finish(self.inner.logged_counter())?;
        // What the new snapshot replaces. A failure here only leaves files the next
        // start removes.
        remove_before(&self.inner.dir, number);
        self.inner
            .stats
            .snapshot_bytes
            .store(bytes, Ordering::SeqCst);
        *lock(&self.inner.checkpoints.last) = Instant::now();
        Ok(bytes)
    }
}

/// Removes the log files and snapshots numbered below `number`.
pub(super) fn remove_before(dir: &Path, number: u64) {
    let stale = wal::list(dir)
        .into_iter()
        .chain(wal::list_snapshots(dir))
        .flatten()
        .filter(|(n, _)| *n < number);
    for (_, old) in stale {
        if let Err(e) = shrink_then_remove(&old) {
            tracing::warn!(error = %e, file = %old.display(), "cannot remove a file a snapshot replaces");
        }
    }
}

/// Removes a file that may be hundreds of MB. Unlinking it at once frees all its blocks
/// in one filesystem journal transaction, which stalls the log's `fdatasync` for tens
/// of milliseconds (strict p99 21 ms instead of 5 ms in an e2e run right after a
/// million-item queue went); truncating it a few MiB at a time, with a pause between
/// steps, spreads that work out.
fn shrink_then_remove(path: &Path) -> std::io::Result<()> {
    const STEP: u64 = 4 << 20;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut len = file.metadata()?.len();
    while len > STEP {
        len -= STEP;
        file.set_len(len)?;
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(file);
    std::fs::remove_file(path)
}

impl Drop for LogStore {
    fn drop(&mut self) {
        lock(&self.inner.pending).stop = true;
        self.inner.wake.notify_one();
        if let Some(thread) = lock(&self.flusher).take() {
            let _ = thread.join();
        }
    }
}

/// One batch being framed into the log ([`LogStore::write`]).
pub struct Batch<'a> {
    frame: &'a mut Vec<u8>,
    items: ItemRecords,
}

impl Batch<'_> {
    pub fn put_queue(&mut self, record: &QueueRecord) {
        wal::push_put_with(self.frame, &queue_key(&record.name), |buf| {
            record.encode_raw(buf)
        })
    }

    pub fn delete_queue(&mut self, name: &str) {
        wal::push_op(self.frame, &queue_key(name), None)
    }

    pub fn put_schedule(&mut self, record: &ScheduleRecord) {
        wal::push_put_with(self.frame, &schedule_key(&record.name), |buf| {
            record.encode_raw(buf)
        })
    }

    pub fn delete_schedule(&mut self, name: &str) {
        wal::push_op(self.frame, &schedule_key(name), None)
    }

    /// An item record that `encode` appends.
    pub fn put_item(&mut self, id: u64, encode: impl FnOnce(&mut Vec<u8>)) {
        let before = self.frame.len();
        wal::push_put_with(self.frame, &item_key(id), encode);
        self.items.add(ItemRecords {
            records: 1,
            bytes: (self.frame.len() - before) as u64,
        });
    }

    pub fn delete_item(&mut self, id: u64) {
        wal::push_op(self.frame, &item_key(id), None)
    }
}

/// A snapshot being taken; the engine fills it ([`Self::put_queue`],
/// [`Self::put_item`]) and hands it back to [`LogStore::finish_checkpoint`].
pub struct SnapshotWriter {
    file: SnapshotFile,
    _running: Running,
}

impl SnapshotWriter {
    pub fn put_queue(&mut self, record: &QueueRecord) {
        self.file.put_queue(record);
    }

    pub fn put_schedule(&mut self, record: &ScheduleRecord) {
        self.file
            .put(&schedule_key(&record.name), &record.encode_to_vec());
    }

    /// Appends `item` of `queue`, encoded straight into the snapshot's buffer.
    pub fn put_item(&mut self, queue: &str, item: ItemView<'_>) {
        self.file.put_item(queue, item);
    }

    /// Writes what is buffered to the file once there is enough of it. Call outside
    /// any queue lock.
    pub fn spill_if_full(&mut self) -> Result<()> {
        self.file.spill(SNAPSHOT_SPILL_BYTES)
    }
}

/// Marks a snapshot in progress until dropped.
struct Running(Arc<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.checkpoints.running.store(false, Ordering::SeqCst);
    }
}

/// A snapshot file being written: records are framed into a buffer (cheap, done under
/// a queue's lock) and handed to the temporary file by `spill` (done outside it).
/// Dropped unfinished, it removes the temporary file.
pub(super) struct SnapshotFile {
    number: u64,
    dir: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    buf: Vec<u8>,
    /// Start of the open frame in `buf`, and its record count.
    frame: Option<(usize, usize)>,
    records: u64,
    bytes: u64,
    /// Bytes written since the last sync.
    unsynced: u64,
}

impl SnapshotFile {
    /// Starts `snapshot-<number>.snap` in `dir` (as a temporary file until `finish`).
    pub fn create(dir: &Path, number: u64) -> Result<SnapshotFile> {
        let tmp = wal::snapshot_path(dir, number).with_extension("snap.tmp");
        let file =
            File::create(&tmp).map_err(|e| storage_error("cannot create a snapshot file", e))?;
        let mut snapshot = SnapshotFile {
            number,
            dir: dir.to_path_buf(),
            tmp,
            file: Some(file),
            buf: Vec::new(),
            frame: None,
            records: 0,
            bytes: 0,
            unsynced: 0,
        };
        snapshot.put(SNAPSHOT_HEADER_KEY, b"1");
        Ok(snapshot)
    }

    pub fn put_queue(&mut self, record: &QueueRecord) {
        self.put(&queue_key(&record.name), &record.encode_to_vec());
    }

    pub fn put_item(&mut self, queue: &str, item: ItemView<'_>) {
        self.put_with(&item_key(item.id), |buf| encode_item(queue, item, buf));
    }

    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.put_with(key, |buf| buf.extend_from_slice(value));
    }

    fn put_with(&mut self, key: &[u8], encode: impl FnOnce(&mut Vec<u8>)) {
        let (start, count) = match self.frame {
            Some(open) => open,
            None => (wal::begin_frame(&mut self.buf), 0),
        };
        wal::push_put_with(&mut self.buf, key, encode);
        self.records += 1;
        self.frame = Some((start, count + 1));
        if count + 1 >= SNAPSHOT_FRAME_RECORDS {
            self.close_frame();
        }
    }

    fn close_frame(&mut self) {
        if let Some((start, _)) = self.frame.take() {
            wal::end_frame(&mut self.buf, start);
        }
    }

    /// Writes the closed frames to the file once more than `above` bytes are waiting.
    fn spill(&mut self, above: usize) -> Result<()> {
        let closed = match self.frame {
            Some((start, _)) => start,
            None => self.buf.len(),
        };
        if closed == 0 || closed <= above {
            return Ok(());
        }
        let file = self.file.as_mut().expect("an open snapshot file");
        file.write_all(&self.buf[..closed])
            .map_err(|e| storage_error("cannot write the snapshot", e))?;
        self.bytes += closed as u64;
        self.unsynced += closed as u64;
        if self.unsynced >= SNAPSHOT_SYNC_BYTES {
            // Write back as we go: one sync of the whole file at the end would queue
            // every log `fdatasync` behind it for as long as it takes.
            file.sync_data()
                .map_err(|e| storage_error("cannot sync the snapshot", e))?;
            self.unsynced = 0;
        }
        self.buf.drain(..closed);
        if let Some((start, _)) = &mut self.frame {
            *start -= closed;
        }
        Ok(())
    }

    /// Ends the snapshot with the id counter and an end mark, syncs it and gives it
    /// its name. Returns its size.
    pub fn finish(mut self, next_id: u64) -> Result<u64> {
        self.put(NEXT_ID_KEY, &next_id.to_le_bytes());
        let records = self.records;
        self.put(SNAPSHOT_END_KEY, &records.to_le_bytes());
        self.close_frame();
        self.spill(0)?;
        let file = self.file.take().expect("an open snapshot file");
        file.sync_all()
            .map_err(|e| storage_error("cannot sync the snapshot", e))?;
        drop(file);
        std::fs::rename(&self.tmp, wal::snapshot_path(&self.dir, self.number))
            .map_err(|e| storage_error("cannot put the snapshot in place", e))?;
        wal::sync_dir(&self.dir).map_err(|e| storage_error("cannot sync the log dir", e))?;
        self.tmp = PathBuf::new();
        Ok(self.bytes)
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn checkpoint_due(inner: &Inner) -> bool {
    let c = &inner.checkpoints;
    if c.running.load(Ordering::SeqCst) {
        return false;
    }
    let (log, snapshot) = (
        inner.stats.log_bytes.load(Ordering::SeqCst),
        inner.stats.snapshot_bytes.load(Ordering::SeqCst),
    );
    let every = Duration::from_millis(c.every_ms.load(Ordering::Relaxed));
    let elapsed = lock(&c.last).elapsed();
    let declined_at = c.declined_at.load(Ordering::SeqCst);
    if declined_at > 0 && log < declined_at.saturating_mul(2) && elapsed < every {
        return false;
    }
    log >= c.min_bytes.load(Ordering::Relaxed).max(snapshot)
        || (log > 0 && log >= snapshot / 2 && elapsed >= every)
}

impl Inner {
    /// Microseconds since the store opened, plus one (0 means "none").
    fn clock_us(&self) -> u64 {
        self.opened.elapsed().as_micros() as u64 + 1
    }

    /// Whether the oldest write not yet on disk is recent enough for relaxed mode to
    /// answer before the disk (see [`RELAXED_MAX_LAG`]).
    fn lag_within_bounds(&self) -> bool {
        let oldest = self.oldest_unsynced.load(Ordering::Relaxed);
        oldest == 0
            || self.clock_us().saturating_sub(oldest) <= self.max_lag_us.load(Ordering::Relaxed)
    }

    /// A flush is done: the oldest write not on disk is now the first of those
    /// written since it took its bytes, if any.
    fn caught_up(&self) {
        let pending = lock(&self.pending);
        self.oldest_unsynced
            .store(pending.first_written, Ordering::Relaxed);
    }

    /// The id counter as a batch or snapshot records it (see [`RELAXED_ID_MARGIN`]).
    fn logged_counter(&self) -> u64 {
        let next = self.next_id.load(Ordering::SeqCst);
        match self.durability {
            Durability::Strict => next,
            Durability::Relaxed => next.saturating_add(RELAXED_ID_MARGIN),
        }
    }

    /// Asks the flusher for a sync of background changes (no one waits for it).
    fn ask_flush(&self) {
        let mut pending = lock(&self.pending);
        pending.wanted = true;
        self.wake_flusher(pending);
    }

    /// The sync a waiter on `ticket` waits for: the one on its way to disk if that
    /// took the ticket, else the next one, whose waiters the flusher gathers. `None`
    /// when the ticket became durable meanwhile.
    fn join_commit(&self, ticket: u64) -> Option<Arc<Commit>> {
        let mut pending = lock(&self.pending);
        if ticket <= pending.taken {
            if self.durable.load(Ordering::SeqCst) >= ticket {
                return None; // its sync is done (and a later one may be in flight)
            }
            return Some(pending.taken_commit.clone());
        }
        let commit = pending.next.clone();
        pending.waiters += 1;
        pending.wanted = true;
        self.wake_flusher(pending);
        Some(commit)
    }

    /// Wakes the flusher if it waits for what just changed.
    fn wake_flusher(&self, mut pending: MutexGuard<'_, Pending>) {
        let wake = match pending.flusher {
            Flusher::Busy => false,
            Flusher::Idle => true,
            Flusher::Gathering(target) => pending.waiters >= target,
        };
        if wake {
            pending.flusher = Flusher::Busy;
            drop(pending);
            self.wake.notify_one();
        }
    }
}

/// The flusher thread: waits until a sync is wanted, gathers the writers expected
/// back, syncs, and again, until the store is dropped.
fn run_flusher(inner: &Inner) {
    // The waiters a sync waits for (see `gather_target`).
    let mut expected = 0u32;
    // Moving average of a sync's duration.
    let mut sync_time = Duration::from_micros(200);
    loop {
        let mut pending = lock(&inner.pending);
        while !pending.wanted && !pending.stop {
            pending.flusher = Flusher::Idle;
            match inner.durability {
                Durability::Strict => pending = wait(&inner.wake, pending),
                Durability::Relaxed => {
                    let every = inner.relaxed_every_ms.load(Ordering::Relaxed);
                    let (guard, timeout) =
                        wait_timeout(&inner.wake, pending, Duration::from_millis(every));
                    pending = guard;
                    if timeout {
                        break;
                    }
                }
            }
        }
        if inner.durability == Durability::Strict {
            let deadline = Instant::now() + gather_window(sync_time);
            while pending.waiters < expected && !pending.stop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                pending.flusher = Flusher::Gathering(expected);
                pending = wait_timeout(&inner.wake, pending, left).0;
            }
        }
        pending.flusher = Flusher::Busy;
        if pending.stop {
            return; // `close` made the last sync, or the store was dropped without one
        }
        drop(pending);
        let was_healthy = inner.healthy.load(Ordering::SeqCst);
        match flush_now(inner) {
            Ok(flushed) => {
                expected = gather_target(flushed.covered);
                if let Some(took) = flushed.took {
                    sync_time = (sync_time * 7 + took) / 8;
                }
            }
            Err(e) if was_healthy => {
                tracing::error!(error = %e, "the write-ahead log failed: writes are refused from now on")
            }
            Err(_) => {} // refused, as every flush after the failure is
        }
        if checkpoint_due(inner) {
            inner.checkpoints.wanted.notify_one();
        }
    }
}

/// How many waiters the flusher waits for before a sync, when the last sync covered
/// `covered`: half of them. They were just answered and are on their way back, but
/// waiting for all of them let the syncs' groups merge: once one sync covered every
/// client, the next waited for every client again, and the clients and the disk took
/// turns instead of overlapping (a sixth of the syncs covered all 32 writers, and the
/// flusher spent more time waiting for writers than syncing). Alternating runs against
/// waiting for all of them, strict wire, 11 rounds (BENCHMARKS.md): single-item
/// enqueue +7–11%, drain +7–8%, batches of 100 +13% (5 rounds), with less CPU per
/// item.
fn gather_target(covered: u32) -> u32 {
    covered / 2
}

/// How long the flusher waits for the writers it expects before syncing without
/// them: half a sync's time, at most [`MAX_GATHER`]. A writer that misses a sync
/// waits for it and the whole next one, so a short wait for it pays; a long one
/// holds up everyone who is already there. Measured on the strict wire rows (see
/// BENCHMARKS.md): no wait, half a sync and a whole sync's time gave 70k / 69k / 64k
/// enqueues and 47k / 53k / 53k drained items per second, two syncs' time less.
fn gather_window(sync_time: Duration) -> Duration {
    (sync_time / 2).min(MAX_GATHER)
}

/// What one flush did.
struct Flushed {
    /// Sync waiters it answered.
    covered: u32,
    /// How long its write and sync took; `None` when there was nothing to write.
    took: Option<Duration>,
}

/// Makes everything written so far durable and publishes the covered ticket. Blocking.
fn flush_now(inner: &Inner) -> Result<Flushed> {
    let _flushing = lock(&inner.flushing);
    let started = Instant::now();
    let mut spare = std::mem::take(&mut *lock(&inner.spare));
    spare.extend_from_slice(&inner.marker);
    let (bytes, target, covered, commit) = {
        let mut pending = lock(&inner.pending);
        pending.wanted = false;
        pending.taken = pending.ticket;
        // `oldest_unsynced` stays this batch's until its sync is done.
        pending.first_written = 0;
        let commit = std::mem::take(&mut pending.next);
        pending.taken_commit = commit.clone();
        let covered = std::mem::take(&mut pending.waiters);
        (
            std::mem::replace(&mut pending.bytes, spare),
            pending.ticket,
            covered,
            commit,
        )
    };
    if target <= inner.durable.load(Ordering::SeqCst) {
        inner.caught_up();
        commit.call(true);
        commit.finish();
        recycle(inner, bytes);
        return Ok(Flushed {
            covered,
            took: None,
        });
    }
    if !inner.healthy.load(Ordering::SeqCst) {
        // Nothing written after a failed write reaches the log, even if the disk
        // works again: no later batch lands after the one that was lost.
        commit.finish();
        return Err(failed_earlier(inner));
    }
    let written = {
        let mut segment = lock(&inner.segment);
        segment.append_durably(&bytes).map_err(|e| {
            cut_back_failed(inner, &mut segment, target);
            storage_error("log write failed", e)
        })
    };
    if let Err(e) = written {
        let error = fail(inner, e);
        commit.finish();
        return Err(error);
    }
    inner
        .stats
        .log_bytes
        .fetch_add(bytes.len() as u64, Ordering::SeqCst);
    // Writers counted their frames on, not the marker.
    inner.unsynced.fetch_sub(
        bytes.len().saturating_sub(wal::SYNC_MARKER_LEN) as u64,
        Ordering::Relaxed,
    );
    let took = started.elapsed();
    let micros = took.as_micros() as u64;
    inner.stats.flushes.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .total_micros
        .fetch_add(micros, Ordering::Relaxed);
    inner.stats.max_micros.fetch_max(micros, Ordering::Relaxed);
    commit.call(true);
    inner.durable.fetch_max(target, Ordering::SeqCst);
    inner.caught_up();
    commit.finish();
    recycle(inner, bytes);
    Ok(Flushed {
        covered,
        took: Some(took),
    })
}

/// Keeps a written buffer for the next flush to hand to the writers.
fn recycle(inner: &Inner, mut bytes: Vec<u8>) {
    if bytes.capacity() <= MAX_SPARE_BYTES {
        bytes.clear();
        *lock(&inner.spare) = bytes;
    }
}

/// Locks a mutex, taking over from a thread that panicked while holding it (the data
/// behind these locks stays consistent across a panic: plain buffers and counters).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait<'a>(condvar: &Condvar, guard: MutexGuard<'a, Pending>) -> MutexGuard<'a, Pending> {
    condvar.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// Waits for a wake-up or `timeout`; true when it timed out.
fn wait_timeout<'a>(
    condvar: &Condvar,
    guard: MutexGuard<'a, Pending>,
    timeout: Duration,
) -> (MutexGuard<'a, Pending>, bool) {
    let (guard, result) = condvar
        .wait_timeout(guard, timeout)
        .unwrap_or_else(|e| e.into_inner());
    (guard, result.timed_out())
}

fn current_ticket(inner: &Inner) -> u64 {
    lock(&inner.pending).ticket
}

/// A number nobody outside this process can know (a sync marker's; see
/// [`wal::sync_marker`]): std's per-process random hash keys, with the time and pid.
fn random_number() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Marks the store failed and wakes waiters so they report it instead of hanging.
fn fail(inner: &Inner, error: Error) -> Error {
    lock(&inner.failed_with).get_or_insert_with(|| match &error {
        Error::Storage(message) => message.clone(),
        other => other.to_string(),
    });
    inner.healthy.store(false, Ordering::SeqCst);
    lock(&inner.pending).next.finish();
    inner.failure.notify_waiters();
    error
}

/// What a flush or snapshot says once the log has failed: it writes nothing more
/// (see [`LogStore::failed`]).
fn failed_earlier(inner: &Inner) -> Error {
    let cause = lock(&inner.failed_with).clone().unwrap_or_default();
    Error::Storage(format!(
        "the write-ahead log failed ({cause}); nothing more is written to it"
    ))
}

/// After a failed write or sync of the batch up to `target`: strict callers are about
/// to be told their changes failed, so whatever part of the batch reached the file is
/// cut off first, and a restart cannot replay it. Relaxed mode keeps it: those changes
/// were acknowledged already, and may yet be on disk. Where the batch stays (relaxed,
/// or a disk that refuses the cut too), its callers are told their change is in doubt.
fn cut_back_failed(inner: &Inner, segment: &mut Segment, target: u64) {
    if inner.durability == Durability::Strict {
        match segment.cut_back() {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(error = %e, "could not cut the failed batch off the write-ahead log")
            }
        }
    }
    inner.in_doubt_to.fetch_max(target, Ordering::SeqCst);
}

/// What a writer whose `ticket` did not become durable is told. The coordinator stops
/// once its log has failed, so the change is to be retried once it is back (the error
/// is `UNAVAILABLE`): as it is, when the log surely does not have it; after a look,
/// when part of its batch may have reached the disk.
fn not_written(inner: &Inner, ticket: u64) -> Error {
    let cause = lock(&inner.failed_with)
        .clone()
        .unwrap_or_else(|| "see the coordinator log".into());
    let outcome = if ticket <= inner.in_doubt_to.load(Ordering::SeqCst) {
        "this change may or may not be on disk, and the coordinator is stopping: once it is back, look before retrying it (a retried ack is safe)"
    } else {
        "this change is not on disk, and the coordinator is stopping: retry it once the coordinator is back"
    };
    Error::Storage(format!("the write-ahead log failed ({cause}); {outcome}"))
}

/// Takes `<data-dir>/LOCK` (an advisory lock the kernel drops when the process dies),
/// so a second coordinator on the same data dir (say, two pods of a StatefulSet during
/// a botched rollout) stops at start-up instead of interleaving its log with ours.
fn lock_data_dir(data_dir: &Path) -> Result<File> {
    let path = data_dir.join("LOCK");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| storage_error(&format!("cannot open {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::Storage(format!(
                "data dir {} is in use by another coordinator ({}); \
                 one data dir serves one coordinator",
                data_dir.display(),
                match holder.trim() {
                    "" => "pid unknown".to_string(),
                    pid => format!("pid {pid}"),
                }
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(storage_error(&format!("cannot lock {}", path.display()), e));
        }
    }
    // Who holds it, for the message above.
    file.set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(|e| storage_error(&format!("cannot write {}", path.display()), e))?;
    Ok(file)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn queue_key(name: &str) -> Vec<u8> {
    named_key(b'q', name)
}

fn schedule_key(name: &str) -> Vec<u8> {
    named_key(b's', name)
}

fn named_key(kind: u8, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 1);
    key.push(kind);
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

    /// A batch that writes queue "q"'s record with `lease_timeout_ms` as its value.
    fn put_queue(lease_timeout_ms: u64) -> impl FnOnce(&mut Batch<'_>) {
        move |batch| {
            batch.put_queue(&QueueRecord {
                name: "q".into(),
                lease_timeout_ms,
                ..Default::default()
            })
        }
    }

    /// The flusher and direct flushes (shutdown's last sync) running at once must
    /// still put batches in the log in the order they were written: replay applies
    /// them in file order, and a later batch must not be reported durable before an
    /// earlier one reached the disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_keep_the_log_in_write_order() {
        for _ in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
            store.start();
            for value in 1..=30 {
                store.write(put_queue(value)).unwrap();
                store.request_flush();
                // Three direct flushes and the flusher, each taking what is pending
                // when it gets there.
                let write_next = async {
                    tokio::task::yield_now().await;
                    store.write(put_queue(value)).unwrap();
                    Ok(())
                };
                let (a, b, c, d) =
                    tokio::join!(store.close(), write_next, store.close(), store.close());
                a.and(b).and(c).and(d).unwrap();
            }
            store.close().await.unwrap();
            // Every value, in log order, must be the order they were written in.
            let seen = logged_values(dir.path());
            assert_eq!(seen.len(), 60);
            assert!(
                seen.is_sorted(),
                "batches reached the log out of write order: {seen:?}"
            );
        }
    }

    /// Every value of queue "q" in the log, in log order.
    fn logged_values(dir: &Path) -> Vec<u64> {
        let mut seen = Vec::new();
        for (_, path) in wal::list(&dir.join("wal")).unwrap() {
            wal::replay(&path, |ops| {
                for (key, value) in ops {
                    if **key == queue_key("q")[..] {
                        seen.push(
                            QueueRecord::decode(value.unwrap())
                                .unwrap()
                                .lease_timeout_ms,
                        );
                    }
                }
            })
            .unwrap();
        }
        seen
    }

    /// Many writers waiting at once, arriving while syncs run and while the flusher
    /// gathers: each one is answered, and only once its batch is in the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_waiter_is_answered_once_its_batch_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LogStore::open(dir.path(), Durability::Strict).unwrap());
        store.start();
        let writers = (0..32u64).map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..50u64 {
                    let ticket = store.write(put_queue(writer * 1000 + n)).unwrap();
                    store.wait_durable(ticket).await.unwrap();
                    assert!(store.is_synced(ticket));
                }
            })
        });
        // A liveness guard, not a speed check: a lost wake-up hangs a writer forever.
        let all = futures_util::future::join_all(writers);
        let done = tokio::time::timeout(Duration::from_secs(120), all)
            .await
            .expect("a writer was never told its batch was durable");
        assert!(done.into_iter().all(|r| r.is_ok()));
        // All in the log already, with no `close`: each waiter was answered by a sync.
        let mut logged = logged_values(dir.path());
        assert_eq!(logged.len(), 32 * 50);
        logged.sort_unstable();
        logged.dedup();
        assert_eq!(logged.len(), 32 * 50);
    }

    /// Dropping the store ends its flusher thread before the drop returns, so the data
    /// dir is free at once and a new store on it recovers every synced write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_store_ends_the_flusher_and_frees_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        for round in 1..=5u64 {
            let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
            store.start();
            let ticket = store.write(put_queue(round)).unwrap();
            store.wait_durable(ticket).await.unwrap();
            // Asked for but not waited on: the flusher may be syncing it right now.
            store.write(put_queue(round)).unwrap();
            store.request_flush();
            drop(store);
        }
        let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
        let recovered = store.load();
        let queue = recovered.queues.iter().find(|q| q.name == "q").unwrap();
        assert_eq!(queue.lease_timeout_ms, 5);
    }

    /// Relaxed mode answers at once and syncs on the flusher's own timer, with no
    /// waiter asking.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relaxed_writes_reach_the_disk_without_anyone_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), Durability::Relaxed).unwrap();
        store.start();
        // Opening synced once already: the id counter's claim (see the next test).
        let opened = store.flush_stats().flushes.load(Ordering::SeqCst);
        let ticket = store.write(put_queue(7)).unwrap();
        assert!(store.is_synced(ticket), "relaxed mode answers at once");
        // A liveness guard: the timer fires every 500 ms.
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.flush_stats().flushes.load(Ordering::SeqCst) == opened {
            assert!(
                Instant::now() < deadline,
                "the relaxed flusher never synced"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(logged_values(dir.path()), vec![7]);
    }

    /// Relaxed mode hands out ids and tokens before the batches carrying them are on
    /// disk. Lost in a crash, they must not be handed out again: not after a start
    /// that wrote nothing yet, and not after a snapshot replaced the log.
    #[test]
    fn relaxed_mode_never_reuses_ids_handed_out_before_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let mut handed_out = Vec::new();
        for round in 0..3 {
            let store = LogStore::open(dir.path(), Durability::Relaxed).unwrap();
            if round == 2 {
                let writer = store
                    .begin_checkpoint()
                    .unwrap()
                    .expect("no snapshot running");
                store.finish_checkpoint(writer).unwrap();
            }
            let first = store.reserve_ids(1);
            assert!(
                handed_out.iter().all(|&id| id < first),
                "round {round}: {first} was handed out before"
            );
            handed_out.extend([first, store.reserve_ids(1), store.reserve_ids(1)]);
            // The batches carrying those ids never reach the log: a crash.
            drop(store);
        }
        // Strict mode logs the counter as it is: an id reaches a client only once its
        // batch is on disk, so one whose batch never got there may come again.
        let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
        let next = store.reserve_ids(1);
        assert!(handed_out.iter().all(|&id| id < next));
        drop(store);
        let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
        assert_eq!(store.reserve_ids(1), next, "no margin in strict mode");
    }

    /// Relaxed mode answers at once while the disk keeps up; once more than its limit
    /// of logged bytes waits for the disk, a write is answered only when it is on
    /// disk, and relaxed answers resume when a sync has caught up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relaxed_mode_waits_for_the_disk_once_too_much_is_unsynced() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), Durability::Relaxed).unwrap();
        store.inner.max_unsynced.store(4096, Ordering::Relaxed);
        store.start();
        let first = store.write(put_queue(1)).unwrap();
        assert!(store.is_synced(first), "under the limit: answered at once");
        store.sync(first).await.unwrap();
        let mut last = first;
        while store.inner.unsynced.load(Ordering::Relaxed) <= 4096 {
            last = store.write(put_queue(2)).unwrap();
        }
        assert!(
            !store.is_synced(last),
            "over the limit: not before the disk"
        );
        store.sync(last).await.unwrap();
        assert!(store.inner.durable.load(Ordering::SeqCst) >= last.0);
        assert_eq!(store.inner.unsynced.load(Ordering::Relaxed), 0);
        let after = store.write(put_queue(3)).unwrap();
        assert!(store.is_synced(after), "caught up: relaxed again");
    }

    /// Relaxed mode answers before the disk only while the oldest write not yet on
    /// disk is recent: once it is older than the lag limit (a sync that has not come
    /// in time), writes wait for the disk, so a crash cannot lose acknowledged writes
    /// from long before it. A sync that catches up makes relaxed answers resume.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relaxed_mode_waits_for_the_disk_once_its_oldest_unsynced_write_is_too_old() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), Durability::Relaxed).unwrap();
        store.inner.max_lag_us.store(20_000, Ordering::Relaxed);
        // No timed sync during the test.
        store
            .inner
            .relaxed_every_ms
            .store(3_600_000, Ordering::Relaxed);
        store.start();
        let first = store.write(put_queue(1)).unwrap();
        assert!(store.is_synced(first), "fresh: answered at once");
        std::thread::sleep(Duration::from_millis(60));
        let late = store.write(put_queue(2)).unwrap();
        assert!(store.inner.durable.load(Ordering::SeqCst) < first.0);
        assert!(!store.is_synced(late), "lagging: not before the disk");
        store.sync(late).await.unwrap();
        assert!(store.inner.durable.load(Ordering::SeqCst) >= late.0);
        assert_eq!(store.inner.oldest_unsynced.load(Ordering::Relaxed), 0);
        let after = store.write(put_queue(3)).unwrap();
        assert!(store.is_synced(after), "caught up: relaxed again");
    }

    /// A log write that fails wakes every writer waiting for it or for a later sync
    /// with an error (none hangs, none is told its write is durable), and the store
    /// reports itself unhealthy from then on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_answers_every_waiter_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LogStore::open(dir.path(), Durability::Strict).unwrap());
        store.start();
        let ticket = store.write(put_queue(1)).unwrap();
        store.wait_durable(ticket).await.unwrap();
        store.fail_writes();
        let writers = (0..16u64).map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let ticket = store.write(put_queue(n + 2)).unwrap();
                store.wait_durable(ticket).await
            })
        });
        // A liveness guard: a waiter the failure did not wake hangs forever.
        let answers = tokio::time::timeout(
            Duration::from_secs(120),
            futures_util::future::join_all(writers),
        )
        .await
        .expect("a waiter was never answered after the failed sync");
        for answer in answers {
            assert!(answer.unwrap().is_err(), "a write was reported durable");
        }
        assert!(!store.healthy());
        let later = store.write(put_queue(50)).unwrap();
        assert!(store.wait_durable(later).await.is_err());
        assert!(!store.is_synced(later));
    }

    /// A writer whose sync was done, but who looks only after a later batch failed,
    /// is told its change is durable, which it is (a restart finds it): not that it
    /// is not on disk, which made a producer enqueue it again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_sync_done_before_a_later_failure_is_answered_as_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LogStore::open(dir.path(), Durability::Strict).unwrap());
        store.start();
        let stall = store.stall();
        let ticket = store.write(put_queue(1)).unwrap();
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.wait_durable(ticket).await }
        });
        // The waiter joins the sync's commit and sleeps there.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        // Its sync is done, and the next batch fails, all before the waiter (on this
        // runtime's only thread) runs again: this thread blocks meanwhile.
        drop(stall);
        let syncing = Instant::now();
        while !store.is_synced(ticket) {
            assert!(
                syncing.elapsed() < Duration::from_secs(60),
                "the sync never came"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let working = store.fail_writes();
        let lost = store.write(put_queue(2)).unwrap();
        store.request_flush();
        let failing = Instant::now();
        while store.healthy() {
            assert!(
                failing.elapsed() < Duration::from_secs(60),
                "the flush never failed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        waiter.await.unwrap().expect("the change is on disk");
        assert!(store.wait_durable(lost).await.is_err());

        *lock(&store.inner.segment) = working;
        drop(store);
        assert_eq!(logged_values(dir.path()), vec![1]);
    }

    /// A disk that fails once and then works again: nothing written after the lost
    /// batch reaches the log (no later batch, no snapshot of the state in memory, no
    /// last sync at shutdown), and `failed` says so, so that the coordinator stops and
    /// its restart finds the log as it was before the failure.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_failed_write_nothing_more_reaches_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
        store.start();
        let synced = store.write(put_queue(1)).unwrap();
        store.wait_durable(synced).await.unwrap();

        let working = store.fail_writes();
        let lost = store.write(put_queue(2)).unwrap();
        assert!(store.wait_durable(lost).await.is_err());
        tokio::time::timeout(Duration::from_secs(10), store.failed())
            .await
            .expect("failed() returns once the log has failed");

        *lock(&store.inner.segment) = working;
        let later = store.write(put_queue(3)).unwrap();
        store.request_flush();
        assert!(store.wait_durable(later).await.is_err());
        assert!(store.begin_checkpoint().is_err(), "a snapshot was begun");
        assert!(store.close().await.is_err(), "the last sync wrote");
        drop(store);
        assert_eq!(logged_values(dir.path()), vec![1]);
    }

    /// The log as a store writes it, each sync's bytes after its marker. A damaged
    /// last sync is a torn write: the store opens without it. A damaged earlier sync
    /// would drop the synced records after it: the store refuses to open, says where,
    /// and changes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_damaged_before_a_later_sync_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
        store.start();
        for value in 1..=3 {
            let ticket = store.write(put_queue(value)).unwrap();
            store.wait_durable(ticket).await.unwrap();
        }
        let marker = store.inner.marker.clone();
        drop(store);
        let wal_dir = dir.path().join("wal");
        let (_, path) = wal::list(&wal_dir).unwrap().pop().unwrap();
        let synced = std::fs::read(&path).unwrap();
        let syncs: Vec<usize> = synced
            .windows(marker.len())
            .enumerate()
            .filter(|(_, bytes)| *bytes == marker)
            .map(|(at, _)| at)
            .collect();
        assert_eq!(syncs.len(), 3, "one marker per sync");
        let recovered = |dir: &Path| {
            let store = LogStore::open(dir, Durability::Strict)?;
            let lease_timeouts: Vec<u64> = store
                .load()
                .queues
                .iter()
                .map(|q| q.lease_timeout_ms)
                .collect();
            Ok::<_, Error>(lease_timeouts)
        };

        let mut bytes = synced.clone();
        bytes[syncs[2] + marker.len() + 10] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(recovered(dir.path()).unwrap(), vec![2]);

        let mut bytes = synced.clone();
        bytes[syncs[1] + marker.len() + 10] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let listing = wal::list(&wal_dir).unwrap();
        let err = recovered(dir.path()).expect_err("a log damaged before a later sync opened");
        let message = err.to_string();
        assert!(
            message.contains(&format!("damaged at byte {}", syncs[1] + marker.len())),
            "{message}"
        );
        assert_eq!(wal::list(&wal_dir).unwrap(), listing);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    /// Records each call it gets: (its number, the sync's outcome, the durable ticket
    /// as the call saw it).
    struct Recorder {
        number: u64,
        store: Arc<LogStore>,
        calls: Arc<Mutex<Vec<(u64, bool, u64)>>>,
    }

    impl OnDurable for Recorder {
        fn durable(&self, ok: bool) {
            let durable = self.store.inner.durable.load(Ordering::SeqCst);
            lock(&self.calls).push((self.number, ok, durable));
        }
    }

    /// Calls handed over with `on_durable` are made once each, in hand-over order, after
    /// their sync and before the ticket is published (whoever sees it durable knows its
    /// calls were made); a sync already done takes no call, and a failed sync makes its
    /// calls with `false` and takes none after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_handed_over_are_made_after_their_sync_before_it_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LogStore::open(dir.path(), Durability::Strict).unwrap());
        store.start();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let recorder = |number| -> Arc<dyn OnDurable> {
            Arc::new(Recorder {
                number,
                store: store.clone(),
                calls: calls.clone(),
            })
        };
        let mut tickets = Vec::new();
        for number in 0..200 {
            let ticket = store.write(put_queue(number)).unwrap();
            if store.on_durable(ticket, &recorder(number)) {
                tickets.push((number, ticket));
            }
            if number % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        assert!(!tickets.is_empty(), "no call was taken");
        let (_, last) = *tickets.last().unwrap();
        store.wait_durable(last).await.unwrap();
        let made = lock(&calls).clone();
        let numbers: Vec<u64> = made.iter().map(|&(number, _, _)| number).collect();
        let taken: Vec<u64> = tickets.iter().map(|&(number, _)| number).collect();
        assert_eq!(numbers, taken, "each call made once, in hand-over order");
        for (&(_, ok, durable_seen), &(_, ticket)) in made.iter().zip(&tickets) {
            assert!(ok);
            assert!(
                durable_seen < ticket.0,
                "a call made after its ticket was published"
            );
        }
        assert!(
            !store.on_durable(last, &recorder(999)),
            "a call taken for a ticket already durable"
        );

        lock(&calls).clear();
        store.fail_writes();
        let ticket = store.write(put_queue(500)).unwrap();
        // The flusher may fail the write before the hand-over, which then takes no
        // call; a call it took is made once, told of the failure.
        let taken = store.on_durable(ticket, &recorder(500));
        assert!(store.wait_durable(ticket).await.is_err());
        let expected: &[(u64, bool)] = if taken { &[(500, false)] } else { &[] };
        assert_eq!(
            lock(&calls).iter().map(|c| (c.0, c.1)).collect::<Vec<_>>(),
            expected
        );
        let later = store.write(put_queue(501)).unwrap();
        assert!(
            !store.on_durable(later, &recorder(501)),
            "a failed log took a call"
        );
    }

    /// Once the log has failed, relaxed mode stops answering writes as if they were
    /// safe: they get the storage error, as in strict mode.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relaxed_mode_reports_a_failed_log_instead_of_answering() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), Durability::Relaxed).unwrap();
        store.start();
        let before = store.write(put_queue(1)).unwrap();
        store.sync(before).await.unwrap();
        store.fail_writes();
        let lost = store.write(put_queue(2)).unwrap();
        assert!(store.is_synced(lost), "relaxed: answered before the disk");
        // The next timed flush fails (a liveness guard: it runs every 500 ms).
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.healthy() {
            assert!(Instant::now() < deadline, "the failing flush never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = store.write(put_queue(3)).unwrap();
        assert!(!store.is_synced(after));
        assert!(store.sync(after).await.is_err());
    }

    /// After a restart the log's size counts its frames, not the zeros a log file keeps
    /// ahead of them: the size decides when a snapshot is due.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reopened_log_counts_its_frames_not_its_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let logged = {
            let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
            store.start();
            for timeout in 1..=3 {
                let ticket = store.write(put_queue(timeout)).unwrap();
                store.wait_durable(ticket).await.unwrap();
            }
            store.flush_stats().log_bytes.load(Ordering::SeqCst)
        };
        let files: u64 = wal::list(&dir.path().join("wal"))
            .unwrap()
            .iter()
            .map(|(_, path)| file_len(path))
            .sum();
        assert!(
            logged > 0 && files > logged,
            "{logged} bytes logged in {files}"
        );
        let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
        assert_eq!(store.flush_stats().log_bytes.load(Ordering::SeqCst), logged);
        assert_eq!(logged_values(dir.path()), vec![1, 2, 3]);
    }

    fn ready_item(id: u64, payload: Vec<u8>) -> crate::engine::Item {
        crate::engine::Item {
            id,
            state: crate::engine::State::Ready,
            payload,
            priority: 0,
            key: String::new(),
            attempts: 0,
            enqueued_ms: 1,
            ready_at_ms: 0,
            lease: None,
            outcome: None,
        }
    }

    /// Writes `ids` as READY items of queue "q" with 64-byte payloads, in batches of
    /// 100, and waits for them.
    async fn put_items(store: &LogStore, ids: std::ops::Range<u64>) {
        let ids: Vec<u64> = ids.collect();
        for chunk in ids.chunks(100) {
            let ticket = store
                .write(|batch| {
                    for &id in chunk {
                        let item = ready_item(id, vec![7; 64]);
                        batch.put_item(id, |buf| encode_item("q", item.view(), buf));
                    }
                })
                .unwrap();
            store.wait_durable(ticket).await.unwrap();
        }
    }

    /// A log that only grew holds the state and little else: a snapshot would write it
    /// all again and spare a restart nothing, so it does not pay, and none is due
    /// again until the log has doubled or the interval has passed. Once deletes have
    /// made a third of what a restart reads garbage, it pays; a reopened store judges
    /// it the same way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_pays_once_the_log_holds_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
        store.start();
        store
            .inner
            .checkpoints
            .min_bytes
            .store(64 << 10, Ordering::Relaxed);
        store.set_checkpoint_every(Duration::from_secs(3600));
        put_items(&store, 0..2_000).await;
        assert!(store.checkpoint_due(), "past the minimum size");
        assert!(!store.snapshot_pays(|| 2_000));
        assert!(
            !store.checkpoint_due(),
            "not again before the log has doubled"
        );
        put_items(&store, 2_000..3_900).await;
        assert!(!store.checkpoint_due());
        put_items(&store, 3_900..4_200).await;
        assert!(store.checkpoint_due(), "doubled");
        assert!(!store.snapshot_pays(|| 4_200));
        // By the clock as well.
        store.set_checkpoint_every(Duration::from_millis(100));
        assert!(!store.checkpoint_due());
        std::thread::sleep(Duration::from_millis(100));
        assert!(store.checkpoint_due());

        // Delete 1,500 of them: the log barely grows, the state shrinks by over a third.
        let ticket = store
            .write(|batch| (0..1_500).for_each(|id| batch.delete_item(id)))
            .unwrap();
        store.wait_durable(ticket).await.unwrap();
        assert!(store.snapshot_pays(|| 2_700));
        drop(store);

        let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
        assert!(!store.snapshot_pays(|| 4_200));
        assert!(store.snapshot_pays(|| 2_700));
        // What it wrote comes back as the state: no garbage, nothing to gain.
        let mut writer = store.begin_checkpoint().unwrap().unwrap();
        let snapshot = store.load();
        assert_eq!(snapshot.items.len(), 2_700);
        for (_, item) in &snapshot.items {
            writer.put_item("q", item.view());
        }
        store.finish_checkpoint(writer).unwrap();
        assert!(!store.snapshot_pays(|| 2_700));
    }

    /// Writers keep running while the checkpointer counts the queues' items, and the
    /// log is measured before the count: a log that only grew never looks like
    /// garbage, however many writes land after the count. (Measured after, the 2,000
    /// items written here would be in the log and not in the count. Counting under
    /// the store's lock would stop the writers dead: a writer takes it under its
    /// queue's lock, which the count takes too.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writers_run_while_the_items_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LogStore::open(dir.path(), Durability::Strict).unwrap());
        store.start();
        put_items(&store, 0..1_000).await;
        let runtime = tokio::runtime::Handle::current();
        let pays = store.snapshot_pays(|| {
            let counted = 1_000;
            let (done, wait) = std::sync::mpsc::channel();
            let writer = store.clone();
            // Not joined if it hangs: the test fails instead of hanging with it.
            std::thread::spawn(move || {
                runtime.block_on(put_items(&writer, 1_000..3_000));
                done.send(()).unwrap();
            });
            wait.recv_timeout(Duration::from_secs(30))
                .expect("a writer could not write while the items were counted");
            counted
        });
        assert!(!pays, "a log that only grew");
    }

    /// Recovery ends with each item at its last logged value whatever order the ids
    /// come in: a new id is listed without a lookup, one read before is replaced or
    /// deleted, over a snapshot or not. Checked against a map, over random logs whose
    /// ids fall in two ranges far apart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovery_ends_with_each_items_last_value() {
        let mut random = crate::engine::test_random();
        for round in 0..6 {
            let dir = tempfile::tempdir().unwrap();
            let mut model = std::collections::BTreeMap::new();
            {
                let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
                store.start();
                for step in 0..200u64 {
                    if round % 2 == 1 && step == 100 {
                        // A snapshot of everything so far; the log goes on after it.
                        let mut writer = store.begin_checkpoint().unwrap().unwrap();
                        for (&id, payload) in &model {
                            writer.put_item("q", ready_item(id, Vec::clone(payload)).view());
                        }
                        store.finish_checkpoint(writer).unwrap();
                    }
                    let ticket = store
                        .write(|batch| {
                            for op in 0..=random(40) {
                                let base = if random(4) == 0 { 1 << 40 } else { 1 };
                                let id = base + random(3_000);
                                if random(5) < 3 {
                                    let payload = format!("{round}-{step}-{op}").into_bytes();
                                    let item = ready_item(id, payload.clone());
                                    batch.put_item(id, |buf| encode_item("q", item.view(), buf));
                                    model.insert(id, payload);
                                } else {
                                    batch.delete_item(id);
                                    model.remove(&id);
                                }
                            }
                        })
                        .unwrap();
                    store.wait_durable(ticket).await.unwrap();
                }
            }
            let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
            let items = store.load().items;
            assert_eq!(items.len(), model.len(), "round {round}: one item each");
            let recovered: std::collections::BTreeMap<u64, Vec<u8>> = items
                .iter()
                .map(|(_, item)| (item.id(), item.view().payload.to_vec()))
                .collect();
            assert!(recovered == model, "round {round}: the items differ");
        }
    }

    /// A batch whose encoding panics half way leaves nothing in the log: the batches
    /// before and after it replay whole, and the frames end cleanly where the file's
    /// zeros start (half a frame would end the replay there and lose everything after
    /// it), on the thread that panicked as well.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_that_panics_while_encoding_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
        store.start();
        store.write(put_queue(1)).unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.write(|batch| {
                batch.put_item(7, |buf| buf.extend_from_slice(b"half a record"));
                panic!("encoding failed");
            })
        }));
        assert!(panicked.is_err());
        let ticket = store.write(put_queue(2)).unwrap();
        store.wait_durable(ticket).await.unwrap();
        let ticket = std::thread::scope(|s| {
            s.spawn(|| {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    store.write(|batch| {
                        batch.delete_item(9);
                        panic!("encoding failed");
                    })
                }));
                store.write(put_queue(3)).unwrap()
            })
            .join()
            .unwrap()
        });
        store.wait_durable(ticket).await.unwrap();
        assert_eq!(logged_values(dir.path()), vec![1, 2, 3]);
        for (_, path) in wal::list(&dir.path().join("wal")).unwrap() {
            let ending = wal::replay(&path, |_| {}).unwrap();
            assert!(matches!(ending, Ending::Zeroed { .. }), "{ending:?}");
        }
    }
}
