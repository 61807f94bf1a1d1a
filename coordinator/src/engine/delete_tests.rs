//! A queue deletion racing a snapshot, on a log that fails under it.

use std::sync::Arc;
use std::time::Duration;

use super::{Engine, NewItem, OptionsPatch};
use crate::clock::Clock;
use crate::store::{Durability, Store};

async fn open(dir: &std::path::Path) -> Arc<Engine> {
    let store = Store::open_disk(dir, Durability::Strict).unwrap();
    Engine::open(store, Clock::system()).unwrap()
}

/// A deletion that waits for its queue's lock while a snapshot runs, and is then
/// refused because the log fails, leaves the queue and all its items as they were
/// after a restart: the snapshot cannot have left the queue out and dropped the log
/// that held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_deletion_racing_a_snapshot_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    for name in ["q", "other"] {
        engine
            .create_queue(name, &OptionsPatch::default(), false)
            .await
            .unwrap();
    }
    let items = (0..3)
        .map(|i| NewItem {
            payload: bytes::Bytes::from(format!("item-{i}")),
            ..Default::default()
        })
        .collect();
    engine.enqueue("q", items, false).await.unwrap();

    // Another call on q holds its lock (as a writer may) while the deletion comes.
    // The test's own thread blocks while it holds it; the runtime's workers go on.
    let slot = engine.slot("q").unwrap();
    let held = slot.lock();
    let deleting = tokio::spawn({
        let engine = engine.clone();
        async move { engine.delete_queue("q").await }
    });
    std::thread::sleep(Duration::from_millis(100));
    let snapshot = tokio::spawn({
        let engine = engine.clone();
        async move { engine.checkpoint().await }
    });
    std::thread::sleep(Duration::from_millis(300));
    let Store::Disk(log) = engine.store() else {
        unreachable!("a strict engine")
    };
    log.fail_writes();
    drop(held);

    let deleted = tokio::time::timeout(Duration::from_secs(30), deleting)
        .await
        .expect("the deletion was answered")
        .unwrap();
    assert!(deleted.is_err(), "a deletion was confirmed on a failed log");
    let _ = tokio::time::timeout(Duration::from_secs(30), snapshot)
        .await
        .expect("the snapshot ended");
    drop(slot);
    drop(engine); // a crash: the log has failed

    let engine = open(dir.path()).await;
    let stats = engine.stats("q").expect("the queue whose deletion failed");
    assert_eq!(stats.ready, 3);
    assert!(engine.stats("other").is_ok());
}
