//! The disk store's snapshots, through the engine: a snapshot taken while writers run
//! loses nothing, a clean shutdown leaves one snapshot to read, an interrupted one is
//! ignored, a damaged one stops the start-up instead of losing data quietly, and one
//! the disk refuses fails alone.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use support::open_store;
use workq_coordinator::Engine;
use workq_coordinator::clock::Clock;
use workq_coordinator::engine::queue::Counters;
use workq_coordinator::engine::{Item, LeaseRequest, NewItem, OptionsPatch, State as ItemState};
use workq_coordinator::store::{Durability, Store};

async fn open(dir: &Path) -> Arc<Engine> {
    open_with(dir, Durability::Strict).await
}

async fn open_with(dir: &Path, durability: Durability) -> Arc<Engine> {
    match open_store(dir, durability).await {
        Ok(store) => Engine::open(store, Clock::system()).unwrap(),
        Err(e) => panic!("cannot open {}: {e}", dir.display()),
    }
}

async fn create(engine: &Engine, name: &str) {
    engine
        .create_queue(name, &OptionsPatch::default(), false)
        .await
        .unwrap();
}

/// Everything a restart must bring back: every queue's counters, its items by state
/// (READY and DELAYED together: a delayed retry turns ready on the clock, restart or
/// not) and every item.
type State = BTreeMap<String, (Counters, [u64; 4], Vec<Item>)>;

fn state(engine: &Engine) -> State {
    let mut state = State::new();
    for name in engine.queue_names() {
        let stats = engine.stats(&name).unwrap();
        let by_state = [
            stats.ready + stats.delayed,
            stats.leased,
            stats.done,
            stats.dead,
        ];
        let mut items = Vec::new();
        let mut after = 0;
        loop {
            let (page, next) = engine.list_items(&name, None, after, 1000, true).unwrap();
            // A delayed retry turns ready on the clock, restart or not.
            items.extend(page.into_iter().map(|mut item| {
                if item.state == ItemState::Delayed {
                    item.state = ItemState::Ready;
                }
                item
            }));
            if next == 0 {
                break;
            }
            after = next;
        }
        state.insert(name, (stats.counters, by_state, items));
    }
    state
}

fn files(dir: &Path, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(suffix))
        .collect();
    names.sort();
    names
}

fn worker(name: &str) -> LeaseRequest {
    LeaseRequest {
        worker: name.into(),
        max_items: 3,
        lease_timeout_ms: 60_000,
        wait_ms: 0,
    }
}

/// Leases up to three items of `queue` and acks the first.
async fn lease_and_ack_one(engine: &Engine, queue: &str) {
    let leased = engine.lease(queue, worker("w")).await.unwrap();
    let first = &leased.granted[0];
    engine
        .ack(queue, first.id, first.token, vec![])
        .await
        .unwrap();
}

/// Producers, consumers and a queue being created and deleted, all while snapshots are
/// taken back to back; then a crash. Every change was acknowledged (strict mode), so the
/// reopened state must be exactly the state before the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_taken_while_writers_run_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    for q in ["a", "b"] {
        create(&engine, q).await;
    }
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let q = if t % 2 == 0 { "a" } else { "b" };
            for i in 0..150u32 {
                let items = (0..3)
                    .map(|k| NewItem {
                        payload: format!("{t}-{i}-{k}").into_bytes().into(),
                        ..NewItem::default()
                    })
                    .collect();
                engine.enqueue(q, items, false).await.unwrap();
                let leased = engine.lease(q, worker(&format!("w{t}"))).await.unwrap();
                for (n, g) in leased.granted.iter().enumerate() {
                    // Ack some, fail some (back to ready), keep some leased.
                    match n {
                        0 => engine.ack(q, g.id, g.token, vec![1]).await.unwrap(),
                        1 => engine
                            .fail(q, g.id, g.token, "x".into(), false, 0)
                            .await
                            .map(|_| ())
                            .unwrap(),
                        _ => {}
                    }
                }
                if i % 50 == 0 {
                    // A short-lived queue: created and deleted between snapshots.
                    let name = format!("tmp{t}");
                    create(&engine, &name).await;
                    engine
                        .enqueue(&name, vec![NewItem::default()], false)
                        .await
                        .unwrap();
                    engine.delete_queue(&name).await.unwrap();
                }
            }
        }));
    }
    let snapshotter = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut taken = 0;
            for _ in 0..200 {
                if engine.checkpoint().await.unwrap().is_some() {
                    taken += 1;
                }
                tokio::task::yield_now().await;
            }
            taken
        })
    };
    for task in tasks {
        task.await.unwrap();
    }
    assert!(
        snapshotter.await.unwrap() > 10,
        "snapshots raced the writers"
    );
    // Changes after a last snapshot, so recovery must apply the log to items the
    // snapshot holds: lease, complete, retry, and delete them (purge), and add one.
    let three = (0..3).map(|_| NewItem::default()).collect();
    engine.enqueue("a", three, false).await.unwrap();
    let items_before_purge = state(&engine);
    engine.checkpoint().await.unwrap();
    let leased = engine.lease("a", worker("late")).await.unwrap().granted;
    assert_eq!(leased.len(), 3);
    engine
        .ack("a", leased[0].id, leased[0].token, vec![])
        .await
        .unwrap();
    engine
        .fail("a", leased[1].id, leased[1].token, "y".into(), false, 0)
        .await
        .unwrap();
    let purged = engine.purge("b").await.unwrap();
    assert!(purged > 0);
    engine
        .enqueue("a", vec![NewItem::default()], false)
        .await
        .unwrap();
    let before = state(&engine);
    assert_eq!(before.len(), 2);
    let count = |s: &State| s["a"].2.len() + s["b"].2.len();
    assert_eq!(count(&items_before_purge), 4 * 150 * 3 + 3);
    assert_eq!(count(&before), 4 * 150 * 3 + 3 + 1 - purged as usize);
    drop(engine); // a crash: no close

    assert_eq!(files(dir.path(), ".snap").len(), 1, "older snapshots go");
    let engine = open(dir.path()).await;
    assert_same(&state(&engine), &before);
}

/// Compares two states, naming the first difference (the whole state is too big to
/// print).
fn assert_same(after: &State, before: &State) {
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (name, (counters, by_state, items)) in before {
        let (counters_after, by_state_after, items_after) = &after[name];
        assert_eq!(counters_after, counters, "queue {name}'s counters");
        assert_eq!(by_state_after, by_state, "queue {name}'s items by state");
        assert_eq!(items_after.len(), items.len(), "queue {name}'s item count");
        for (a, b) in items_after.iter().zip(items) {
            assert_eq!(a, b, "queue {name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_leaves_one_snapshot_and_an_empty_log() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    create(&engine, "q").await;
    let items = (0..5000)
        .map(|i| NewItem {
            payload: format!("item {i}").into_bytes().into(),
            ..NewItem::default()
        })
        .collect();
    engine.enqueue("q", items, false).await.unwrap();
    lease_and_ack_one(&engine, "q").await;
    let before = state(&engine);
    engine.close().await.unwrap();
    drop(engine);

    let snapshots = files(dir.path(), ".snap");
    assert_eq!(snapshots.len(), 1);
    // The only log files left come after the snapshot, and they are empty.
    let snapshot_number = &snapshots[0]["snapshot-".len()..][..10];
    for log in files(dir.path(), ".log") {
        assert!(&log["wal-".len()..][..10] >= snapshot_number, "{log}");
        assert_eq!(
            std::fs::metadata(dir.path().join("wal").join(&log))
                .unwrap()
                .len(),
            0
        );
    }
    let engine = open(dir.path()).await;
    assert_same(&state(&engine), &before);
    // A second clean stop with nothing new writes no new snapshot.
    engine.close().await.unwrap();
    drop(engine);
    assert_eq!(files(dir.path(), ".snap"), snapshots);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_snapshot_is_ignored_and_a_damaged_one_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    create(&engine, "q").await;
    engine
        .enqueue("q", vec![NewItem::default()], false)
        .await
        .unwrap();
    engine.close().await.unwrap();
    let before = state(&engine);
    drop(engine);

    // A crash while a snapshot was being written leaves its temporary file.
    let wal = dir.path().join("wal");
    let tmp = wal.join("snapshot-0000000099.snap.tmp");
    std::fs::write(&tmp, b"half a snapshot").unwrap();
    let engine = open(dir.path()).await;
    assert_same(&state(&engine), &before);
    assert!(!tmp.exists());
    drop(engine);

    // A snapshot the disk changed afterwards: refuse to start, change nothing.
    let snapshot = wal.join(&files(dir.path(), ".snap")[0]);
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&snapshot, &bytes).unwrap();
    let listing = (files(dir.path(), ".snap"), files(dir.path(), ".log"));
    let err = open_store(dir.path(), Durability::Strict)
        .await
        .expect_err("a damaged snapshot must not open");
    assert!(err.to_string().contains("damaged"), "{err}");
    assert_eq!(
        (files(dir.path(), ".snap"), files(dir.path(), ".log")),
        listing
    );
    assert_eq!(std::fs::read(&snapshot).unwrap(), bytes);
}

/// A snapshot the disk refuses (here its file cannot be created) fails alone: it is
/// not a failed log, so the store stays healthy and the coordinator keeps serving,
/// writes go on, nothing is lost, and the next snapshot is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_the_disk_refuses_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    create(&engine, "q").await;
    let items = |from: u32| {
        (from..from + 100)
            .map(|i| NewItem {
                payload: format!("item {i}").into_bytes().into(),
                ..NewItem::default()
            })
            .collect()
    };
    engine.enqueue("q", items(0), false).await.unwrap();

    // The next snapshot starts log file n + 1; a directory takes its file's place.
    let logs = files(dir.path(), ".log");
    let n: u64 = logs.last().unwrap()["wal-".len()..][..10].parse().unwrap();
    let squatter = dir
        .path()
        .join("wal")
        .join(format!("snapshot-{:010}.snap.tmp", n + 1));
    std::fs::create_dir(&squatter).unwrap();
    let err = engine
        .checkpoint()
        .await
        .expect_err("the snapshot was written");
    assert!(err.to_string().contains("snapshot"), "{err}");
    assert!(
        engine.store().healthy(),
        "a failed snapshot failed the store"
    );

    engine.enqueue("q", items(100), false).await.unwrap();
    lease_and_ack_one(&engine, "q").await;
    let before = state(&engine);
    // The last snapshot, at close, starts the log file after: it is written.
    engine.close().await.unwrap();
    drop(engine);
    assert_eq!(files(dir.path(), ".snap").len(), 1);

    std::fs::remove_dir(&squatter).unwrap();
    let engine = open(dir.path()).await;
    assert_same(&state(&engine), &before);
    assert_eq!(engine.stats("q").unwrap().counters.enqueued, 200);
}

/// Relaxed mode answers before the sync; the log is synced on a 500 ms timer (nothing
/// else asks for a sync here). What the timer's sync covered survives a crash, and a
/// clean stop loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_mode_syncs_on_its_timer_and_at_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_with(dir.path(), Durability::Relaxed).await;
    create(&engine, "q").await;
    // Everything so far on disk; then the next sync that writes anything is the one
    // that carries the enqueue (a sync with nothing new is not counted).
    let store = engine.store();
    store.wait_durable(store.last_ticket()).await.unwrap();
    let flushes = || {
        store
            .flush_stats()
            .unwrap()
            .flushes
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let seen = flushes();
    engine
        .enqueue("q", vec![NewItem::default(); 10], false)
        .await
        .unwrap();
    let synced = async {
        while flushes() == seen {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), synced)
        .await
        .expect("the 500 ms timer syncs the log");
    let before = state(&engine);
    drop(engine); // a crash
    let engine = open_with(dir.path(), Durability::Relaxed).await;
    assert_same(&state(&engine), &before);

    engine
        .enqueue("q", vec![NewItem::default(); 5], false)
        .await
        .unwrap();
    let before = state(&engine);
    engine.close().await.unwrap();
    drop(engine);
    let engine = open_with(dir.path(), Durability::Relaxed).await;
    assert_same(&state(&engine), &before);
    assert_eq!(before["q"].2.len(), 15);
}

/// One data dir serves one coordinator: a second store on it is refused, names the
/// holder, and changes nothing; once the first is gone it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coordinator_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    create(&engine, "q").await;
    let listing = (files(dir.path(), ".snap"), files(dir.path(), ".log"));
    let err = Store::open_disk(dir.path(), Durability::Strict).expect_err("the data dir is taken");
    let message = err.to_string();
    assert!(
        message.contains("in use by another coordinator"),
        "{message}"
    );
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    assert_eq!(
        (files(dir.path(), ".snap"), files(dir.path(), ".log")),
        listing
    );
    engine.close().await.unwrap();
    drop(engine);
    let engine = open(dir.path()).await;
    assert_eq!(engine.queue_names(), vec!["q".to_string()]);
}

/// Enqueues `n` items into `queue`, 100 per call.
async fn fill(engine: &Engine, queue: &str, n: u32) {
    for start in (0..n).step_by(100) {
        let items = (start..(start + 100).min(n))
            .map(|i| NewItem {
                payload: format!("{queue} item {i:08}").into_bytes().into(),
                ..NewItem::default()
            })
            .collect();
        engine.enqueue(queue, items, false).await.unwrap();
    }
}

fn snapshots_taken(engine: &Engine) -> u64 {
    let stats = engine.store().flush_stats().expect("a disk store");
    stats.snapshots.load(std::sync::atomic::Ordering::SeqCst)
}

/// The checkpointer writes a snapshot only when it pays: queues that only grew are
/// all state, and a snapshot would write them again for nothing. Once a deleted
/// queue has left most of the log garbage, one follows, and a restart reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_wait_until_the_log_holds_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    for queue in ["keep", "gone"] {
        create(&engine, queue).await;
    }
    // From here on, one is due by the clock after every sync.
    if let Store::Disk(disk) = engine.store() {
        disk.set_checkpoint_every(std::time::Duration::from_millis(1));
    }
    fill(&engine, "keep", 1_000).await;
    fill(&engine, "gone", 2_000).await;
    // None paid.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(snapshots_taken(&engine), 0);
    assert!(files(dir.path(), ".snap").is_empty());

    engine.delete_queue("gone").await.unwrap();
    let start = std::time::Instant::now();
    while snapshots_taken(&engine) == 0 {
        assert!(
            start.elapsed().as_secs() < 60,
            "no snapshot after the delete"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let before = state(&engine);
    assert_eq!(before["keep"].2.len(), 1_000);
    drop(engine);
    let engine = open(dir.path()).await;
    assert_same(&state(&engine), &before);
}
