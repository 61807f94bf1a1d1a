//! Storage: where queue and item records live between restarts.
//!
//! The engine keeps the working state in memory and writes every mutation here as one
//! atomic batch, then waits for [`Store::sync`] before answering the client. Two
//! backends:
//! - [`Store::memory`]: nothing on disk (kuard-like, `--in-memory`);
//! - [`Store::open_disk`]: a write-ahead log with group commit under `--data-dir`,
//!   compacted by snapshots the engine writes ([`LogStore`]).
//!
//! Ownership: the engine is the only writer. Batches from different queues may
//! interleave; each batch is atomic and holds whole records, so replaying the log
//! always yields a consistent set of queues and items.

mod import;
mod log_store;
pub mod record;
mod wal;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;
pub use log_store::{Batch, DEFAULT_CHECKPOINT_EVERY, Durability, LogStore, SnapshotWriter};
pub use record::{ItemRecord, QueueRecord, RunRecord, ScheduleRecord};

/// Everything on disk, read once at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub queues: Vec<QueueRecord>,
    pub schedules: Vec<ScheduleRecord>,
    /// Every item, already in the engine's form: (the queue's name as an index into
    /// `queue_names`, the item); each queue's items in id order, as a snapshot lists
    /// them, then those only the log holds.
    pub items: Vec<(u32, crate::engine::items::Stored)>,
    pub queue_names: Vec<String>,
    /// Item records that could not be read back (an unknown state).
    pub unreadable: u64,
}

/// A position in the write order; [`Store::sync`] waits until it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// What to do once a write is on disk, handed to [`Store::on_durable`] instead of
/// waiting for the sync: the disk store calls it on its flusher thread right after the
/// sync, before anyone waiting for the same sync is woken.
pub trait OnDurable: Send + Sync {
    /// The write is on disk (`true`), or its sync failed (`false`). Called once per
    /// hand-over, in hand-over order within one sync and in sync order across syncs;
    /// it must not block (it runs between the disk and every other waiter).
    fn durable(&self, ok: bool);
}

/// Flush and snapshot figures, for `/metrics`.
#[derive(Debug, Default)]
pub struct FlushStats {
    pub flushes: AtomicU64,
    pub total_micros: AtomicU64,
    pub max_micros: AtomicU64,
    pub snapshots: AtomicU64,
    pub snapshot_micros: AtomicU64,
    pub snapshot_bytes: AtomicU64,
    /// Log bytes synced since the last snapshot started.
    pub log_bytes: AtomicU64,
}

/// Ids handed out by one change (see [`Store::ids`]).
pub struct Ids<'a> {
    store: &'a Store,
    room: u64,
    next: u64,
    end: u64,
}

impl Ids<'_> {
    /// The next id: the block's next, reserving the block at the first call (and a
    /// new one should a change take more than it said).
    pub fn take(&mut self) -> u64 {
        if self.next == self.end {
            self.next = self.store.reserve_ids(self.room);
            self.end = self.next + self.room;
        }
        self.next += 1;
        self.next - 1
    }
}

pub enum Store {
    Memory { ids: AtomicU64 },
    Disk(LogStore),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

impl Store {
    pub fn memory() -> Store {
        Store::Memory {
            ids: AtomicU64::new(1),
        }
    }

    /// Opens (or creates) the store in `dir` and reads it back.
    pub fn open_disk(dir: &std::path::Path, durability: Durability) -> Result<Store> {
        Ok(Store::Disk(LogStore::open(dir, durability)?))
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Store::Memory { .. } => "in-memory",
            Store::Disk(s) => match s.durability() {
                Durability::Strict => "disk (strict durability)",
                Durability::Relaxed => "disk (relaxed durability)",
            },
        }
    }

    pub fn is_persistent(&self) -> bool {
        matches!(self, Store::Disk(_))
    }

    /// Reads every record (start-up only).
    pub fn load(&self) -> Result<Snapshot> {
        match self {
            Store::Memory { .. } => Ok(Snapshot::default()),
            Store::Disk(s) => Ok(s.load()),
        }
    }

    /// The first of `n` fresh ids in a row: unique and increasing for the life of the
    /// data dir. Used for item ids and lease tokens alike, so a token is never reused,
    /// even across restarts.
    fn reserve_ids(&self, n: u64) -> u64 {
        match self {
            Store::Memory { ids } => ids.fetch_add(n, Ordering::Relaxed),
            Store::Disk(s) => s.reserve_ids(n),
        }
    }

    /// Fresh ids for one change that needs up to `room` of them: the first one taken
    /// reserves all `room` with one add to the shared counter, so a change costs one
    /// atomic add, not one per item. Ids reserved and not taken are skipped: ids
    /// increase, they are not dense.
    pub fn ids(&self, room: usize) -> Ids<'_> {
        Ids {
            store: self,
            room: (room as u64).max(1),
            next: 0,
            end: 0,
        }
    }

    /// Queues a batch for the log, atomic on replay, whose changes `fill` encodes in
    /// place (see [`LogStore::write`]); the memory store writes nothing.
    pub fn write(&self, fill: impl FnOnce(&mut Batch<'_>)) -> Result<Ticket> {
        match self {
            Store::Memory { .. } => Ok(Ticket(0)),
            Store::Disk(s) => s.write(fill),
        }
    }

    /// The ticket of the last write so far.
    pub fn last_ticket(&self) -> Ticket {
        match self {
            Store::Memory { .. } => Ticket(0),
            Store::Disk(s) => s.last_ticket(),
        }
    }

    /// Waits until the write `ticket` (and every earlier one) is as durable as the
    /// durability mode promises. Concurrent callers share one flush.
    pub async fn sync(&self, ticket: Ticket) -> Result<()> {
        match self {
            Store::Memory { .. } => Ok(()),
            Store::Disk(s) => s.sync(ticket).await,
        }
    }

    /// Hands `call` to the store, to be called once `ticket` is durable, so that the
    /// caller need not wait (or be woken) for the sync. Strict disk store only: false
    /// means the call was not taken (no flusher to run it: the memory or relaxed store,
    /// start-up, a failed log; or the ticket's sync is already done or finishing), and
    /// the caller waits with [`Store::sync`] as usual. Once `sync(ticket)` returns, every
    /// call handed over for `ticket` or earlier has been made.
    pub fn on_durable(&self, ticket: Ticket, call: &std::sync::Arc<dyn OnDurable>) -> bool {
        match self {
            Store::Memory { .. } => false,
            Store::Disk(s) => s.on_durable(ticket, call),
        }
    }

    /// Whether [`Store::sync`] of `ticket` would return at once.
    /// Whether the disk is not keeping up with the writes (see [`LogStore::behind`]);
    /// never for the memory store.
    pub fn behind(&self) -> bool {
        match self {
            Store::Memory { .. } => false,
            Store::Disk(s) => s.behind(),
        }
    }

    pub fn is_synced(&self, ticket: Ticket) -> bool {
        match self {
            Store::Memory { .. } => true,
            Store::Disk(s) => s.is_synced(ticket),
        }
    }

    /// Waits until `ticket` is on disk, even in relaxed mode.
    pub async fn wait_durable(&self, ticket: Ticket) -> Result<()> {
        match self {
            Store::Memory { .. } => Ok(()),
            Store::Disk(s) => s.wait_durable(ticket).await,
        }
    }

    /// Whether anything was logged since the last snapshot.
    pub fn log_grew(&self) -> bool {
        match self {
            Store::Memory { .. } => false,
            Store::Disk(s) => s.log_grew(),
        }
    }

    /// Notified when a snapshot is due (`None`: nothing on disk to compact).
    pub fn checkpoint_wanted(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        match self {
            Store::Memory { .. } => None,
            Store::Disk(s) => Some(s.checkpoint_wanted()),
        }
    }

    /// Whether a snapshot of the items `live_items` counts would pay now (see
    /// [`LogStore::snapshot_pays`]); never in memory.
    pub fn snapshot_pays(&self, live_items: impl FnOnce() -> u64) -> bool {
        match self {
            Store::Memory { .. } => false,
            Store::Disk(s) => s.snapshot_pays(live_items),
        }
    }

    /// Starts a snapshot (see [`LogStore::begin_checkpoint`]); `None` in memory or
    /// while another one runs.
    pub fn begin_checkpoint(&self) -> Result<Option<SnapshotWriter>> {
        match self {
            Store::Memory { .. } => Ok(None),
            Store::Disk(s) => s.begin_checkpoint(),
        }
    }

    /// Puts a filled snapshot in place (see [`LogStore::finish_checkpoint`]).
    pub fn finish_checkpoint(&self, writer: SnapshotWriter) -> Result<u64> {
        match self {
            Store::Memory { .. } => Err(crate::error::Error::Storage(
                "no snapshots in memory".into(),
            )),
            Store::Disk(s) => s.finish_checkpoint(writer),
        }
    }

    /// Asks for a flush without waiting for it (background changes such as expiry).
    pub fn request_flush(&self) {
        if let Store::Disk(s) = self {
            s.request_flush();
        }
    }

    /// Starts the background flusher; call once from inside the runtime.
    pub fn start(&self) {
        if let Store::Disk(s) = self {
            s.start();
        }
    }

    /// Final flush at shutdown.
    pub async fn close(&self) -> Result<()> {
        match self {
            Store::Memory { .. } => Ok(()),
            Store::Disk(s) => s.close().await,
        }
    }

    /// False once a write or flush has failed: the store can no longer promise durability.
    pub fn healthy(&self) -> bool {
        match self {
            Store::Memory { .. } => true,
            Store::Disk(s) => s.healthy(),
        }
    }

    /// Returns once the disk store's log has failed (never for the memory store); see
    /// [`LogStore::failed`].
    pub async fn failed(&self) {
        match self {
            Store::Memory { .. } => std::future::pending().await,
            Store::Disk(s) => s.failed().await,
        }
    }

    pub fn flush_stats(&self) -> Option<&FlushStats> {
        match self {
            Store::Memory { .. } => None,
            Store::Disk(s) => Some(s.flush_stats()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_reserves_its_ids_in_one_block_that_no_other_change_shares() {
        let store = Store::memory();
        let mut a = store.ids(3);
        let a1 = a.take();
        // The first take reserved all three: the next change starts after them.
        let mut b = store.ids(2);
        let b1 = b.take();
        assert_eq!(b1, a1 + 3);
        let (a2, a3) = (a.take(), a.take());
        assert_eq!((a2, a3), (a1 + 1, a1 + 2));
        // A change that takes more than it said reserves another block.
        let (b2, b3) = (b.take(), b.take());
        assert_eq!(b2, b1 + 1);
        let a4 = a.take();
        assert!(b3 > b2 && a4 > a3);
        let mut all = vec![a1, a2, a3, a4, b1, b2, b3];
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 7, "no id handed out twice");
        // Ids reserved and never taken are skipped, not handed out again.
        assert!(store.ids(1).take() > a4.max(b3));
        // A change that takes none reserves none.
        let before = store.ids(1).take();
        let _unused = store.ids(1000);
        assert_eq!(store.ids(1).take(), before + 1);
    }
}
