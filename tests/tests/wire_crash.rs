//! The wire protocol under `kill -9` with the real binary. In strict mode an answer
//! read off a wire connection means the change is on disk: every EnqueueResponse's ids
//! and every confirmed ack survive a crash and a restart, and nothing is lost or made
//! up. The client learns of the crash as UNAVAILABLE, never as a clean end of the call.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::timeout;
use tonic::Code;
use workq_tests::{Coordinator, all_items, create_queue, pb, queue_stats, wait_for_async};

/// Requests a producer keeps in flight on its wire connection, and leases a worker
/// asks for at once.
const IN_FLIGHT: usize = 32;
/// Answers a test waits for before it kills the coordinator.
const BEFORE_KILL: usize = 2_000;
/// How long a call may stay unanswered once the coordinator is gone: a hang guard.
const HANG: Duration = Duration::from_secs(30);

fn one(payload: &str) -> pb::EnqueueRequest {
    pb::EnqueueRequest {
        queue: "crash".into(),
        items: vec![pb::NewItem {
            payload: payload.as_bytes().to_vec().into(),
            ..Default::default()
        }],
        seal: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_wire_enqueues_survive_kill_9() {
    let mut coordinator = Coordinator::start_with(&["--durability", "strict"]);
    let mut client = coordinator.client().await;
    create_queue(&mut client, "crash", 600_000).await;
    let (mut requests, mut responses) = client.wire_enqueue_stream().await.unwrap();

    // One task pipelines single-item requests, up to IN_FLIGHT unanswered; another
    // pairs each answer with the oldest unanswered payload. The sending side is never
    // closed, so the call has no reason to end cleanly.
    let acked: Arc<Mutex<HashMap<u64, String>>> = Arc::default();
    let unanswered: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let producer = tokio::spawn({
        let (unanswered, permits) = (unanswered.clone(), permits.clone());
        async move {
            for i in 0.. {
                let Ok(permit) = permits.acquire().await else {
                    break; // the call ended
                };
                permit.forget();
                let payload = format!("wire-{i}");
                unanswered.lock().unwrap().push_back(payload.clone());
                if requests.send(&one(&payload)).await.is_err() {
                    break; // the coordinator is gone
                }
            }
            requests
        }
    });
    let reader = tokio::spawn({
        let (acked, unanswered, permits) = (acked.clone(), unanswered.clone(), permits.clone());
        async move {
            let end = loop {
                match responses.message().await {
                    Ok(Some(r)) => {
                        let payload = unanswered
                            .lock()
                            .unwrap()
                            .pop_front()
                            .expect("an answer belongs to a request sent");
                        assert_eq!(r.results.len(), 1, "one result per one-item request");
                        acked.lock().unwrap().insert(r.results[0].id, payload);
                        permits.add_permits(1);
                    }
                    Ok(None) => break Ok(()),
                    Err(status) => break Err(status),
                }
            };
            permits.close();
            end
        }
    });
    wait_for_async(
        "2,000 acknowledged wire enqueues",
        Duration::from_secs(60),
        || {
            let n = acked.lock().unwrap().len();
            async move { n >= BEFORE_KILL }
        },
    )
    .await;
    coordinator.kill9();

    let end = timeout(HANG, reader)
        .await
        .expect("the reader sees the connection go")
        .unwrap();
    let status = end.expect_err("a crash is not a clean end of the call");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let _requests = timeout(HANG, producer)
        .await
        .expect("the producer stops")
        .unwrap();
    let acked = acked.lock().unwrap().clone();
    let unanswered: HashSet<String> = unanswered.lock().unwrap().iter().cloned().collect();

    coordinator.restart();
    let mut client = coordinator.client().await;
    let found = all_items(&mut client, "crash").await;
    for (id, payload) in &acked {
        let item = found
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged item {id} ({payload}) lost in the crash"));
        assert_eq!(item.payload, payload.as_bytes(), "item {id}");
    }
    // Beyond the acknowledged items, only requests still unanswered at the crash may
    // have made it in, each once.
    let mut payloads = HashSet::new();
    for item in found.values() {
        let payload = String::from_utf8(item.payload.clone()).unwrap();
        assert!(
            acked.get(&item.id) == Some(&payload) || unanswered.contains(&payload),
            "item {} ({payload}) was never sent",
            item.id
        );
        assert!(
            payloads.insert(payload.clone()),
            "duplicated item {payload}"
        );
    }
    let s = queue_stats(&mut client, "crash").await;
    assert_eq!(
        s.total_enqueued as usize,
        found.len(),
        "counter agrees with items"
    );
    assert_eq!(s.ready as usize, found.len());
    eprintln!(
        "acknowledged {} over the wire before kill -9, recovered {}",
        acked.len(),
        found.len()
    );

    // The recovered coordinator takes wire calls again, with ids above the old ones.
    let (mut requests, mut responses) = client.wire_enqueue_stream().await.unwrap();
    requests.send(&one("after restart")).await.unwrap();
    let fresh = timeout(HANG, responses.message())
        .await
        .unwrap()
        .unwrap()
        .expect("an answer")
        .results[0]
        .id;
    let highest = found.keys().copied().max().unwrap_or(0);
    assert!(
        fresh > highest,
        "new id {fresh} is above every id before the crash ({highest})"
    );
    requests.close().await.unwrap();
    assert!(
        timeout(HANG, responses.message())
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
    assert_eq!(coordinator.stop(), Some(0), "clean exit on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_wire_acks_survive_kill_9() {
    const ITEMS: usize = 20_000;
    let mut coordinator = Coordinator::start_with(&["--durability", "strict"]);
    let mut client = coordinator.client().await;
    create_queue(&mut client, "crash", 600_000).await;
    let mut enqueued = HashSet::new();
    for batch in 0..ITEMS / 1_000 {
        let results = client
            .enqueue(pb::EnqueueRequest {
                queue: "crash".into(),
                items: (0..1_000)
                    .map(|i| pb::NewItem {
                        payload: format!("{batch}-{i}").into_bytes().into(),
                        ..Default::default()
                    })
                    .collect(),
                seal: false,
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        enqueued.extend(results.into_iter().map(|r| r.id));
    }
    assert_eq!(enqueued.len(), ITEMS);

    // A worker that acks each lease on its own as soon as it arrives, asking for one
    // more with each ack, and records the acks the coordinator confirmed.
    let confirmed: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let refused: Arc<Mutex<Vec<pb::SettleResult>>> = Arc::default();
    let (mut requests, mut responses) = client.wire_work().await.unwrap();
    requests
        .send(&pb::WorkRequest {
            queue: "crash".into(),
            worker_id: "wire-worker".into(),
            credit: IN_FLIGHT as u32,
            ..Default::default()
        })
        .await
        .unwrap();
    let worker = tokio::spawn({
        let (confirmed, refused) = (confirmed.clone(), refused.clone());
        async move {
            let mut connected = true;
            loop {
                let r = match responses.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ok(false),
                    Err(status) => return Err(status),
                };
                for s in r.settled {
                    if s.code == 0 {
                        confirmed.lock().unwrap().insert(s.id);
                    } else {
                        refused.lock().unwrap().push(s);
                    }
                }
                if r.drained {
                    return Ok(true);
                }
                for lease in r.leases {
                    let ack = pb::WorkRequest {
                        credit: 1,
                        settlements: vec![pb::Settlement {
                            id: lease.id,
                            token: lease.token,
                            action: pb::SettleAction::Ack as i32,
                            ..Default::default()
                        }],
                        ..Default::default()
                    };
                    // Once the coordinator is gone, keep reading for how the call ended.
                    connected = connected && requests.send(&ack).await.is_ok();
                }
            }
        }
    });
    wait_for_async("2,000 confirmed wire acks", Duration::from_secs(60), || {
        let n = confirmed.lock().unwrap().len();
        async move { n >= BEFORE_KILL }
    })
    .await;
    coordinator.kill9();

    let end = timeout(HANG, worker)
        .await
        .expect("the worker sees the connection go")
        .unwrap();
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(drained) => panic!("the session ended cleanly (drained: {drained}) despite the crash"),
    }
    assert!(
        refused.lock().unwrap().is_empty(),
        "acks of live leases refused: {:?}",
        refused.lock().unwrap()
    );
    let confirmed = confirmed.lock().unwrap().clone();

    coordinator.restart();
    let mut client = coordinator.client().await;
    let found = all_items(&mut client, "crash").await;
    let ids: HashSet<u64> = found.keys().copied().collect();
    assert_eq!(
        ids, enqueued,
        "every enqueued item is there, and only those"
    );
    for id in &confirmed {
        assert_eq!(
            found[id].state,
            pb::ItemState::Done as i32,
            "item {id}, whose ack was confirmed, is DONE"
        );
    }
    let s = queue_stats(&mut client, "crash").await;
    assert_eq!(
        (s.ready + s.leased + s.done) as usize,
        ITEMS,
        "no item lost: {s:?}"
    );
    assert_eq!((s.delayed, s.dead), (0, 0));
    assert!(s.done as usize >= confirmed.len(), "{s:?}");
    eprintln!(
        "confirmed {} acks over the wire before kill -9; after restart {} done, {} leased, {} ready",
        confirmed.len(),
        s.done,
        s.leased,
        s.ready
    );
    assert_eq!(coordinator.stop(), Some(0), "clean exit on SIGTERM");
}
