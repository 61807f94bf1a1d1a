//! The engine with its timers, on tokio's paused clock: the reaper expires leases by
//! itself, long-polling leases wake on enqueue and on drain, and every change survives
//! a reopen of the store.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::open_store;
use workq_coordinator::Engine;
use workq_coordinator::clock::Clock;
use workq_coordinator::engine::{Granted, LeaseRequest, NewItem, OptionsPatch, State};
use workq_coordinator::store::{Durability, Store};

fn open_memory() -> Arc<Engine> {
    Engine::open(Store::memory(), Clock::system()).unwrap()
}

async fn create(engine: &Engine, name: &str, lease_ms: u64) {
    let patch = OptionsPatch {
        lease_timeout_ms: Some(lease_ms),
        max_attempts: Some(2),
        ..OptionsPatch::default()
    };
    engine.create_queue(name, &patch, false).await.unwrap();
}

async fn enqueue(engine: &Engine, queue: &str, payload: &str) -> u64 {
    let item = NewItem {
        payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
        ..NewItem::default()
    };
    engine.enqueue(queue, vec![item], false).await.unwrap()[0].id
}

fn lease_req(worker: &str, wait_ms: u64) -> LeaseRequest {
    LeaseRequest {
        worker: worker.into(),
        max_items: 1,
        lease_timeout_ms: 0,
        wait_ms,
    }
}

/// Leases one ready item without waiting (panics if there is none).
async fn lease_now(engine: &Engine, worker: &str) -> Granted {
    engine
        .lease("q", lease_req(worker, 0))
        .await
        .unwrap()
        .granted
        .remove(0)
}

#[tokio::test(start_paused = true)]
async fn reaper_expires_leases_on_its_own_timer() {
    let engine = open_memory();
    create(&engine, "q", 1_000).await;
    let id = enqueue(&engine, "q", "a").await;
    let first = engine.lease("q", lease_req("w1", 0)).await.unwrap();
    assert_eq!(first.granted[0].id, id);

    // Nobody polls; time passes the deadline; the server moves the item back.
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    let item = engine.get_item("q", id).unwrap();
    assert_eq!(item.state, State::Ready, "expired by the reaper");
    assert_eq!(engine.stats("q").unwrap().counters.expired, 1);

    // Second expiry exhausts max_attempts (2) → DEAD, again without any poll.
    let second = engine.lease("q", lease_req("w2", 0)).await.unwrap();
    assert_eq!(second.granted[0].attempt, 2);
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    assert_eq!(engine.get_item("q", id).unwrap().state, State::Dead);
    engine.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn long_poll_wakes_on_enqueue() {
    let engine = open_memory();
    create(&engine, "q", 30_000).await;
    // Keep the queue from being drained so the poll has to wait: a delayed item.
    engine
        .enqueue(
            "q",
            vec![NewItem {
                payload: b"later".to_vec().into(),
                delay_ms: 600_000,
                ..NewItem::default()
            }],
            false,
        )
        .await
        .unwrap();
    let poller = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.lease("q", lease_req("w", 30_000)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!poller.is_finished(), "nothing to lease yet");
    let started = tokio::time::Instant::now();
    let id = enqueue(&engine, "q", "now").await;
    let outcome = poller.await.unwrap().unwrap();
    assert_eq!(outcome.granted[0].id, id);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "woken, not timed out"
    );
}

#[tokio::test(start_paused = true)]
async fn long_poll_answers_drained_when_the_last_lease_completes() {
    let engine = open_memory();
    create(&engine, "q", 30_000).await;
    let id = enqueue(&engine, "q", "only").await;
    let held = lease_now(&engine, "w1").await;
    // A second worker waits: the queue is empty but not drained (w1 holds a lease).
    let waiter = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.lease("q", lease_req("w2", 60_000)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiter.is_finished(),
        "must not report drained while a lease is out"
    );
    engine.ack("q", id, held.token, vec![]).await.unwrap();
    let outcome = waiter.await.unwrap().unwrap();
    assert!(outcome.granted.is_empty());
    assert!(outcome.drained);
}

/// Waiters are woken per item made ready, not all of them on every change: a batch
/// bigger than one round of wake-ups must still reach every waiter (each that leaves
/// items behind wakes the next), and the queue going drained must answer them all.
#[tokio::test(start_paused = true)]
async fn a_batch_reaches_every_waiting_poll_and_drained_answers_them_all() {
    let engine = open_memory();
    create(&engine, "q", 30_000).await;
    let wait_all = |from: usize, n: usize| {
        (from..from + n)
            .map(|w| {
                let engine = engine.clone();
                tokio::spawn(
                    async move { engine.lease("q", lease_req(&format!("w{w}"), 60_000)).await },
                )
            })
            .collect::<Vec<_>>()
    };
    // One lease out keeps the empty queue from answering "drained".
    enqueue(&engine, "q", "held").await;
    let held = lease_now(&engine, "holder").await;
    let waiters = wait_all(0, 40);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(waiters.iter().all(|w| !w.is_finished()));
    let batch = (0..40)
        .map(|i| NewItem {
            payload: format!("item-{i}").into(),
            ..NewItem::default()
        })
        .collect();
    engine.enqueue("q", batch, false).await.unwrap();
    let mut leases = Vec::new();
    for waiter in waiters {
        // A waiter left asleep would only return at its 60 s timeout, empty.
        let outcome = waiter.await.unwrap().unwrap();
        assert_eq!(outcome.granted.len(), 1, "every waiter got an item");
        leases.push(outcome.granted[0].clone());
    }
    leases.push(held);
    let mut ids: Vec<u64> = leases.iter().map(|l| l.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 41, "each item went to one waiter");

    // Nothing ready, 41 leases out: these wait until the last one completes.
    let waiters = wait_all(100, 10);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for lease in &leases {
        assert!(waiters.iter().all(|w| !w.is_finished()));
        engine
            .ack("q", lease.id, lease.token, vec![])
            .await
            .unwrap();
    }
    for waiter in waiters {
        let outcome = waiter.await.unwrap().unwrap();
        assert!(outcome.granted.is_empty() && outcome.drained);
    }
}

#[tokio::test(start_paused = true)]
async fn long_poll_gets_an_expired_lease_from_a_dead_worker() {
    let engine = open_memory();
    create(&engine, "q", 2_000).await;
    let id = enqueue(&engine, "q", "a").await;
    engine
        .lease("q", lease_req("dead-worker", 0))
        .await
        .unwrap();
    let outcome = engine
        .lease("q", lease_req("survivor", 10_000))
        .await
        .unwrap();
    assert_eq!(outcome.granted[0].id, id);
    assert_eq!(outcome.granted[0].attempt, 2);
}

#[tokio::test(start_paused = true)]
async fn long_poll_times_out_empty() {
    let engine = open_memory();
    create(&engine, "q", 30_000).await;
    enqueue(&engine, "q", "a").await;
    engine.lease("q", lease_req("w1", 0)).await.unwrap();
    let outcome = engine.lease("q", lease_req("w2", 2_000)).await.unwrap();
    assert!(outcome.granted.is_empty());
    assert!(!outcome.drained);
}

#[tokio::test]
async fn disk_store_restores_queues_items_and_live_leases() {
    let dir = tempfile::tempdir().unwrap();
    let open_store = || Store::open_disk(dir.path(), Durability::Strict);
    let (lease, done_id, dead_id) = {
        let engine = Engine::open(open_store().unwrap(), Clock::system()).unwrap();
        create(&engine, "q", 60_000).await;
        let a = enqueue(&engine, "q", "a").await;
        let b = enqueue(&engine, "q", "b").await;
        // A snapshot in the middle: the rest comes back from the log after it.
        assert!(engine.checkpoint().await.unwrap().is_some());
        let c = enqueue(&engine, "q", "c").await;
        let la = lease_now(&engine, "w").await;
        engine
            .ack("q", a, la.token, b"result".to_vec())
            .await
            .unwrap();
        let lb = lease_now(&engine, "w").await;
        engine
            .fail("q", b, lb.token, "bad".into(), true, 0)
            .await
            .unwrap();
        let lc = lease_now(&engine, "w").await;
        assert_eq!(lc.id, c);
        // No close: a crash.
        (lc, a, b)
    };
    let engine = reopen(dir.path()).await;
    let stats = engine.stats("q").unwrap();
    assert_eq!((stats.done, stats.dead, stats.leased), (1, 1, 1));
    assert_eq!(stats.counters.enqueued, 3);
    assert_eq!(stats.counters.deliveries, 3);
    assert_eq!(engine.get_item("q", done_id).unwrap().result(), b"result");
    assert_eq!(engine.get_item("q", dead_id).unwrap().last_error(), "bad");
    // The lease granted before the restart is still valid with its token.
    engine
        .ack("q", lease.id, lease.token, vec![])
        .await
        .unwrap();
    let next = enqueue(&engine, "q", "d").await;
    assert!(
        next > lease.token,
        "ids and tokens keep increasing across restarts"
    );
}

/// Opens the engine on `dir` again after a crash (no close). The dropped engine's
/// flusher may still hold the data dir's lock for a moment.
async fn reopen(dir: &std::path::Path) -> Arc<Engine> {
    match open_store(dir, Durability::Strict).await {
        Ok(store) => Engine::open(store, Clock::system()).unwrap(),
        Err(e) => panic!("reopen: {e}"),
    }
}

fn keyed(indexes: impl Iterator<Item = usize>) -> Vec<NewItem> {
    indexes
        .map(|i| NewItem {
            payload: bytes::Bytes::from(format!("p{i}")),
            key: format!("key-{i}"),
            ..NewItem::default()
        })
        .collect()
}

/// A queue past the split of its item and key tables (8,192 entries) comes back whole
/// from a snapshot and the log after it: every key still deduplicates to its item.
#[tokio::test]
async fn keys_of_a_large_queue_deduplicate_after_a_restart() {
    const ITEMS: usize = 12_000;
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u64> = {
        let engine = Engine::open(
            Store::open_disk(dir.path(), Durability::Strict).unwrap(),
            Clock::system(),
        )
        .unwrap();
        create(&engine, "q", 60_000).await;
        let mut ids = Vec::new();
        for start in (0..ITEMS).step_by(1_000) {
            if start == ITEMS / 2 {
                assert!(engine.checkpoint().await.unwrap().is_some());
            }
            let enqueued = engine
                .enqueue("q", keyed(start..start + 1_000), false)
                .await
                .unwrap();
            assert!(enqueued.iter().all(|e| !e.deduplicated));
            ids.extend(enqueued.iter().map(|e| e.id));
        }
        ids
    };
    let engine = reopen(dir.path()).await;
    assert_eq!(engine.stats("q").unwrap().ready, ITEMS as u64);
    let sample = [0, 4_321, ITEMS / 2 - 1, ITEMS / 2, ITEMS - 1];
    let again = engine
        .enqueue("q", keyed(sample.into_iter()), false)
        .await
        .unwrap();
    for (e, i) in again.iter().zip(sample) {
        assert!(e.deduplicated, "key-{i}");
        assert_eq!(e.id, ids[i], "key-{i}");
    }
    let fresh = engine
        .enqueue("q", keyed(ITEMS..ITEMS + 1), false)
        .await
        .unwrap();
    assert!(!fresh[0].deduplicated, "a new key");
    assert_eq!(engine.stats("q").unwrap().ready, ITEMS as u64 + 1);
}

#[tokio::test]
async fn a_page_of_large_items_ends_at_the_byte_cap_and_paging_finds_them_all() {
    use workq_coordinator::engine::limits::MAX_LIST_BYTES;
    let engine = open_memory();
    create(&engine, "q", 1_000).await;
    const MIB: usize = 1024 * 1024;
    let big = |fill: u8| NewItem {
        payload: bytes::Bytes::from(vec![fill; MIB]),
        ..NewItem::default()
    };
    let items = MAX_LIST_BYTES / MIB * 5 / 2;
    for i in 0..items {
        engine
            .enqueue("q", vec![big(i as u8)], false)
            .await
            .unwrap();
    }

    let (first, next) = engine.list_items("q", None, 0, 1_000, true).unwrap();
    assert_eq!(
        first.len(),
        MAX_LIST_BYTES / MIB,
        "the page ends at the cap"
    );
    assert_eq!(next, first.last().unwrap().id, "and says where to go on");
    let (mut seen, mut after) = (first.len(), next);
    while after != 0 {
        let (page, next) = engine.list_items("q", None, after, 1_000, true).unwrap();
        assert!(!page.is_empty());
        assert!(page.iter().all(|item| item.payload.len() == MIB));
        assert!(page.first().unwrap().id > after);
        seen += page.len();
        after = next;
    }
    assert_eq!(seen, items, "every item is on some page");

    // Without payloads there is nothing to cap.
    let (all, next) = engine.list_items("q", None, 0, 1_000, false).unwrap();
    assert_eq!((all.len(), next), (items, 0));
    assert!(all.iter().all(|item| item.payload.is_empty()));

    // An item larger than the cap still comes, alone.
    let patch = OptionsPatch {
        max_payload_bytes: Some((MAX_LIST_BYTES + MIB) as u64),
        ..OptionsPatch::default()
    };
    engine.create_queue("huge", &patch, false).await.unwrap();
    let huge = NewItem {
        payload: bytes::Bytes::from(vec![7; MAX_LIST_BYTES + MIB]),
        ..NewItem::default()
    };
    engine
        .enqueue("huge", vec![huge.clone(), huge], false)
        .await
        .unwrap();
    let (page, next) = engine.list_items("huge", None, 0, 1_000, true).unwrap();
    assert_eq!(page.len(), 1);
    let (rest, last) = engine.list_items("huge", None, next, 1_000, true).unwrap();
    assert_eq!((rest.len(), last), (1, 0));
}
