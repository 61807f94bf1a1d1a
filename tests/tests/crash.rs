//! Durability under `kill -9` with the real binary: strict mode acknowledges an
//! enqueue only after it is on disk, so after a crash and a restart every acknowledged
//! item is there exactly once, counters agree with the items, and a lease granted
//! before the crash can still be acked with its token.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use workq_tests::{
    Coordinator, all_items, create_queue, enqueue_empty, lease_one, pb, queue_stats, try_lease_one,
    wait_for_async,
};

const PRODUCERS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_enqueues_survive_kill_9() {
    // Snapshot constantly, so log rotation and snapshots race the producers and the
    // kill lands among them. A snapshot is written only once a third of what a restart
    // would read is garbage, which a queue that only grows never makes: a churn task
    // creates, fills and deletes another queue over and over to make it.
    let mut coordinator =
        Coordinator::start_with(&["--durability", "strict", "--checkpoint-every", "50ms"]);
    let mut client = coordinator.client().await;
    create_queue(&mut client, "crash", 600_000).await;
    client
        .enqueue(pb::EnqueueRequest {
            queue: "crash".into(),
            items: vec![pb::NewItem {
                payload: b"leased-before-crash".to_vec().into(),
                ..Default::default()
            }],
            seal: false,
        })
        .await
        .unwrap();
    let held = lease_one(&mut client, "crash", "survivor").await;

    // Producers enqueue unique payloads one per call and record what was acknowledged.
    let acked: Arc<Mutex<HashMap<u64, String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let mut client = coordinator.client().await;
        let acked = acked.clone();
        let stop = stop.clone();
        producers.push(tokio::spawn(async move {
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let payload = format!("p{p}-{i}");
                let reply = client
                    .enqueue(pb::EnqueueRequest {
                        queue: "crash".into(),
                        items: vec![pb::NewItem {
                            payload: payload.clone().into_bytes().into(),
                            ..Default::default()
                        }],
                        seal: false,
                    })
                    .await;
                match reply {
                    Ok(r) => {
                        let id = r.into_inner().results[0].id;
                        acked.lock().unwrap().insert(id, payload);
                    }
                    Err(_) => break, // the coordinator is gone
                }
            }
        }));
    }
    let churn = {
        let mut client = coordinator.client().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let created = client
                    .create_queue(pb::CreateQueueRequest {
                        queue: "churn".into(),
                        ..Default::default()
                    })
                    .await;
                let items = (0..200)
                    .map(|_| pb::NewItem {
                        payload: vec![b'c'; 256].into(),
                        ..Default::default()
                    })
                    .collect();
                let filled = client
                    .enqueue(pb::EnqueueRequest {
                        queue: "churn".into(),
                        items,
                        seal: false,
                    })
                    .await;
                let deleted = client
                    .delete_queue(pb::DeleteQueueRequest {
                        queue: "churn".into(),
                    })
                    .await;
                if created.is_err() || filled.is_err() || deleted.is_err() {
                    break; // the coordinator is gone
                }
            }
        })
    };
    wait_for_async(
        "5,000 acknowledged enqueues",
        Duration::from_secs(60),
        || {
            let n = acked.lock().unwrap().len();
            async move { n >= 5_000 }
        },
    )
    .await;
    coordinator.kill9();
    stop.store(true, Ordering::SeqCst);
    for p in producers {
        p.await.unwrap();
    }
    churn.await.unwrap();
    let snapshots = strip_ansi(&coordinator.log())
        .matches("snapshot written")
        .count();
    assert!(snapshots >= 2, "{snapshots} snapshots raced the producers");
    let acked = acked.lock().unwrap().clone();

    coordinator.restart();
    // The restart read a snapshot taken while the producers ran, then the log after it.
    let log = strip_ansi(&coordinator.log());
    let recovery = log
        .lines()
        .filter(|l| l.contains("recovered from disk"))
        .nth(1)
        .unwrap_or_else(|| panic!("no recovery line in\n{log}"));
    assert!(
        !recovery.contains("snapshot=0 ") && !recovery.contains("log_files=0 "),
        "recovery went through a snapshot and the log: {recovery}"
    );
    let mut client = coordinator.client().await;
    let mut found: HashMap<u64, String> = HashMap::new();
    let mut payloads = HashSet::new();
    for item in all_items(&mut client, "crash").await.into_values() {
        let payload = String::from_utf8(item.payload).unwrap();
        assert!(
            payloads.insert(payload.clone()),
            "duplicated item {payload}"
        );
        found.insert(item.id, payload);
    }
    for (id, payload) in &acked {
        assert_eq!(
            found.get(id),
            Some(payload),
            "acknowledged item {id} ({payload}) lost in the crash"
        );
    }
    let stats = queue_stats(&mut client, "crash").await;
    assert_eq!(
        stats.total_enqueued as usize,
        found.len(),
        "counter agrees with items"
    );
    assert_eq!((stats.ready + stats.leased) as usize, found.len());
    assert_eq!(stats.leased, 1, "the lease survived");
    eprintln!(
        "acknowledged {} before kill -9 with {snapshots} snapshots written, recovered {} items",
        acked.len(),
        found.len()
    );

    // The lease granted before the crash is acked with its token after the restart.
    client
        .ack(pb::AckRequest {
            queue: "crash".into(),
            id: held.id,
            token: held.token,
            result: b"after restart".to_vec(),
        })
        .await
        .expect("ack with a pre-crash token");
    let item = client
        .get_item(pb::GetItemRequest {
            queue: "crash".into(),
            id: held.id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.state, pb::ItemState::Done as i32);
    // Ids keep increasing across the crash: a new item gets an id above every old one.
    let fresh = enqueue_empty(&mut client, "crash").await;
    let highest = found.keys().copied().max().unwrap_or(0).max(held.token);
    assert!(
        fresh > highest,
        "new id {fresh} is above every id before the crash ({highest})"
    );
    assert_eq!(coordinator.stop(), Some(0), "clean exit on SIGTERM");
}

/// The coordinator's log without terminal colours.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ … final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Relaxed mode answers before the log is on disk, so `kill -9` can lose leases and
/// items it already handed out. What comes back READY is leased again with a token
/// never seen before, so a worker still holding a lost lease is refused; and no id
/// handed out before the crash is given to a new item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_mode_never_hands_out_a_lost_id_or_token_again() {
    const ITEMS: usize = 20;
    let mut coordinator = Coordinator::start_with(&["--durability", "relaxed"]);
    let mut client = coordinator.client().await;
    create_queue(&mut client, "relaxed", 600_000).await;
    let items = (0..ITEMS)
        .map(|i| pb::NewItem {
            payload: format!("item {i}").into_bytes().into(),
            ..Default::default()
        })
        .collect();
    client
        .enqueue(pb::EnqueueRequest {
            queue: "relaxed".into(),
            items,
            seal: false,
        })
        .await
        .unwrap();
    // A clean stop syncs the log: the queue and its items are on disk.
    assert_eq!(coordinator.stop(), Some(0));
    coordinator.restart();

    // Leases and one more item, answered but (most likely) not yet on disk.
    let mut client = coordinator.client().await;
    let mut handed_out = HashSet::new();
    let mut held = Vec::new();
    for _ in 0..ITEMS {
        let lease = lease_one(&mut client, "relaxed", "before-crash").await;
        handed_out.insert(lease.token);
        held.push(lease);
    }
    let lost = enqueue_empty(&mut client, "relaxed").await;
    handed_out.insert(lost);
    coordinator.kill9();
    coordinator.restart();

    let mut client = coordinator.client().await;
    let mut relet = 0;
    while let Some(lease) = try_lease_one(&mut client, "relaxed", "after-crash").await {
        assert!(
            !handed_out.contains(&lease.token),
            "token {} of item {} was handed out before the crash",
            lease.token,
            lease.id
        );
        let stale = held
            .iter()
            .find(|h| h.id == lease.id)
            .expect("a known item");
        let refused = client
            .ack(pb::AckRequest {
                queue: "relaxed".into(),
                id: stale.id,
                token: stale.token,
                result: Vec::new(),
            })
            .await
            .expect_err("an ack with a lost lease's token");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        relet += 1;
    }
    let fresh = enqueue_empty(&mut client, "relaxed").await;
    assert!(
        !handed_out.contains(&fresh),
        "id {fresh} was handed out before the crash"
    );
    eprintln!("{relet} of {ITEMS} leases were lost in the crash and granted again");
    assert_eq!(coordinator.stop(), Some(0), "clean exit on SIGTERM");
}
