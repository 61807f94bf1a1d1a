//! One-time import of a data dir written by workq's first store: a sled database in
//! `<data-dir>/sled` plus the write-ahead log in `<data-dir>/wal` (same log format,
//! same keys).
//!
//! The sled tree holds every batch up to its last checkpoint; the log files hold the
//! batches after it (and possibly some before: replay is idempotent). Both are read,
//! written out as the first snapshot, and only then is `sled/` renamed to
//! `sled.imported` (kept for the operator to delete). A crash in between is safe:
//! once a snapshot exists, a leftover `sled/` is only renamed.

use std::path::Path;

use super::log_store::{Recovered, SnapshotFile, remove_before};
use super::wal;
use crate::error::{Error, Result};

pub(super) fn import_sled(data_dir: &Path, wal_dir: &Path) -> Result<()> {
    let sled_dir = data_dir.join("sled");
    if !sled_dir.is_dir() {
        return Ok(());
    }
    let failed = |context: &str, e: &dyn std::fmt::Display| {
        Error::Storage(format!("importing {}: {context}: {e}", sled_dir.display()))
    };
    let snapshots = wal::list_snapshots(wal_dir).map_err(|e| failed("listing the log", &e))?;
    if snapshots.is_empty() {
        let mut state = Recovered::default();
        {
            let db = sled::Config::new()
                .path(&sled_dir)
                .open()
                .map_err(|e| failed("cannot open it", &e))?;
            let tree = db
                .open_tree("workq")
                .map_err(|e| failed("cannot open the workq tree", &e))?;
            for entry in tree.iter() {
                let (key, value) = entry.map_err(|e| failed("reading", &e))?;
                state.apply(&key, Some(&value))?;
            }
        }
        let logs = wal::list(wal_dir).map_err(|e| failed("listing the log", &e))?;
        for (_, path) in &logs {
            state.replay_log(path)?;
        }
        let number = logs.last().map_or(0, |(n, _)| *n) + 1;
        let mut snapshot = SnapshotFile::create(wal_dir, number)?;
        for record in state.queues.values() {
            snapshot.put_queue(record);
        }
        for (queue, item) in state.items() {
            snapshot.put_item(&state.names[*queue as usize], item.view());
        }
        snapshot.finish(state.highest + 1)?;
        remove_before(wal_dir, number);
        tracing::info!(
            queues = state.queues.len(),
            items = state.item_count(),
            "imported the sled data dir of an earlier workq"
        );
    }
    let kept = data_dir.join("sled.imported");
    std::fs::rename(&sled_dir, &kept).map_err(|e| failed("cannot rename it", &e))?;
    wal::sync_dir(data_dir).map_err(|e| failed("syncing the data dir", &e))?;
    tracing::info!(kept = %kept.display(), "the old sled database is no longer used; delete it when convenient");
    Ok(())
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::super::{Durability, ItemRecord, LogStore, QueueRecord};
    use super::*;

    fn item(id: u64, attempts: u32) -> ItemRecord {
        ItemRecord {
            queue: "q".into(),
            id,
            state: 1,
            attempts,
            payload: format!("item {id}").into_bytes(),
            ..ItemRecord::default()
        }
    }

    fn item_key(id: u64) -> Vec<u8> {
        let mut key = vec![b'i'];
        key.extend_from_slice(&id.to_be_bytes());
        key
    }

    /// What the first store left: sled up to its last checkpoint, the log after it.
    fn old_data_dir(dir: &Path) {
        {
            let db = sled::Config::new().path(dir.join("sled")).open().unwrap();
            let tree = db.open_tree("workq").unwrap();
            let queue = QueueRecord {
                name: "q".into(),
                enqueued: 3,
                ..QueueRecord::default()
            };
            tree.insert(b"qq", queue.encode_to_vec()).unwrap();
            for id in 1..=3 {
                tree.insert(item_key(id), item(id, 0).encode_to_vec())
                    .unwrap();
            }
            tree.insert(b"mnext_id", &40u64.to_le_bytes()).unwrap();
            db.flush().unwrap();
        }
        // sled's background threads let go of its file lock a moment after the handle
        // is dropped; the import would find the database still locked.
        let lock = std::fs::File::open(dir.join("sled").join("db")).unwrap();
        let start = std::time::Instant::now();
        while lock.try_lock().is_err() {
            assert!(start.elapsed().as_secs() < 20, "sled keeps its lock");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(lock);
        let wal_dir = dir.join("wal");
        std::fs::create_dir_all(&wal_dir).unwrap();
        let mut buf = Vec::new();
        let (updated, gone) = (item(2, 5).encode_to_vec(), item_key(3));
        let added = item(4, 0).encode_to_vec();
        wal::frame(
            [
                (&item_key(2)[..], Some(&updated[..])),
                (&gone[..], None),
                (&item_key(4)[..], Some(&added[..])),
            ]
            .into_iter(),
            &mut buf,
        );
        std::fs::write(wal::path_of(&wal_dir, 7), buf).unwrap();
    }

    fn items(store: &LogStore) -> Vec<(u64, u32)> {
        let mut items: Vec<(u64, u32)> = store
            .load()
            .items
            .iter()
            .map(|(_, i)| (i.view().id, i.view().attempts))
            .collect();
        items.sort();
        items
    }

    #[test]
    fn a_sled_data_dir_is_imported_once_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        old_data_dir(dir.path());
        let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
        assert_eq!(items(&store), vec![(1, 0), (2, 5), (4, 0)]);
        assert!(
            store.reserve_ids(1) >= 41,
            "ids continue after the old counter"
        );
        drop(store);
        assert!(!dir.path().join("sled").exists());
        assert!(dir.path().join("sled.imported").is_dir());
        let wal_dir = dir.path().join("wal");
        assert!(wal::list(&wal_dir).unwrap().iter().all(|(n, _)| *n > 7));

        // The next start reads the snapshot; nothing is imported twice.
        let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
        assert_eq!(items(&store), vec![(1, 0), (2, 5), (4, 0)]);
        assert_eq!(
            store.load().queues.len(),
            0,
            "load hands the state out once"
        );
    }

    #[test]
    fn a_crash_after_the_import_only_renames_the_leftover() {
        let dir = tempfile::tempdir().unwrap();
        old_data_dir(dir.path());
        drop(LogStore::open(dir.path(), Durability::Strict).unwrap());
        // As if the rename had not happened: a sled dir next to a snapshot.
        std::fs::rename(dir.path().join("sled.imported"), dir.path().join("sled")).unwrap();
        let wal_dir = dir.path().join("wal");
        let snapshots = wal::list_snapshots(&wal_dir).unwrap();
        let store = LogStore::open(dir.path(), Durability::Strict).unwrap();
        assert_eq!(items(&store), vec![(1, 0), (2, 5), (4, 0)]);
        assert_eq!(wal::list_snapshots(&wal_dir).unwrap(), snapshots);
        assert!(dir.path().join("sled.imported").is_dir());
    }
}
