//! Batch settlement, pipelined enqueue and the worker session stream.

mod support;

use std::time::Duration;

use support::{Server, settle, setup, stats};
use tokio_stream::StreamExt;
use workq_coordinator::auth::Auth;
use workq_proto::pb;

#[tokio::test]
async fn settle_acks_many_and_fails_only_the_stale_ones() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 5).await;
    let leases = c
        .lease(pb::LeaseRequest {
            queue: "q".into(),
            worker_id: "w".into(),
            max_items: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(leases.len(), 5);
    let mut batch: Vec<pb::Settlement> = leases[..3]
        .iter()
        .map(|l| settle(l.id, l.token, pb::SettleAction::Ack))
        .collect();
    batch.push(settle(
        leases[3].id,
        leases[3].token + 999,
        pb::SettleAction::Ack,
    ));
    batch.push(settle(
        leases[4].id,
        leases[4].token,
        pb::SettleAction::Release,
    ));
    batch.push(settle(
        leases[0].id,
        leases[0].token,
        pb::SettleAction::Unspecified,
    ));
    // An action from a newer client: refused for that item alone, by its number.
    let mut unknown = settle(leases[4].id, leases[4].token, pb::SettleAction::Ack);
    unknown.action = 9;
    batch.push(unknown);
    let results = c
        .settle(pb::SettleRequest {
            queue: "q".into(),
            settlements: batch,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        [
            0,
            0,
            0,
            tonic::Code::FailedPrecondition as i32,
            0,
            tonic::Code::InvalidArgument as i32,
            tonic::Code::InvalidArgument as i32
        ]
    );
    assert!(results[3].message.starts_with("lease lost"));
    assert!(
        results[5].message.contains("action is missing"),
        "{results:?}"
    );
    assert!(
        results[6].message.contains("action 9 is unknown"),
        "{results:?}"
    );
    let s = stats(&mut c).await;
    assert_eq!((s.done, s.leased, s.ready), (3, 1, 1));
    server.stop().await;
}

#[tokio::test]
async fn enqueue_stream_answers_each_request_in_order() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 0).await;
    let requests = tokio_stream::iter((0..200).map(|i| pb::EnqueueRequest {
        queue: "q".into(),
        items: vec![pb::NewItem {
            payload: format!("{i}").into_bytes().into(),
            ..Default::default()
        }],
        seal: false,
    }));
    let mut responses = c.enqueue_stream(requests).await.unwrap().into_inner();
    let mut ids = Vec::new();
    while let Some(r) = responses.next().await {
        ids.push(r.unwrap().results[0].id);
    }
    assert_eq!(ids.len(), 200);
    let item = c
        .get_item(pb::GetItemRequest {
            queue: "q".into(),
            id: ids[137],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.payload, b"137", "responses come back in request order");
    assert_eq!(stats(&mut c).await.total_enqueued, 200);

    // A refused request ends the stream with its status.
    let bad = tokio_stream::iter(vec![pb::EnqueueRequest {
        queue: "missing".into(),
        items: vec![pb::NewItem::default()],
        seal: false,
    }]);
    let mut responses = c.enqueue_stream(bad).await.unwrap().into_inner();
    let err = responses.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn work_session_pushes_leases_within_credit_and_reports_drained() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 10).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::WorkRequest>(16);
    tx.send(pb::WorkRequest {
        queue: "q".into(),
        worker_id: "streamer".into(),
        credit: 4,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = c
        .work(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut responses).await;
    assert_eq!(first.leases.len(), 4, "exactly the credit");
    let mut completed = 0;
    let mut held = first.leases;
    loop {
        // Ack what we hold and ask for as many again.
        let credit = held.len() as u32;
        let settlements = held
            .drain(..)
            .map(|l| settle(l.id, l.token, pb::SettleAction::Ack))
            .collect();
        tx.send(pb::WorkRequest {
            credit,
            settlements,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut got_settled = false;
        while !got_settled || held.is_empty() {
            let r = next(&mut responses).await;
            if !r.settled.is_empty() {
                assert!(r.settled.iter().all(|s| s.code == 0));
                completed += r.settled.len();
                got_settled = true;
            }
            held.extend(r.leases);
            if r.drained {
                assert_eq!(completed, 10);
                assert!(held.is_empty());
                let s = stats(&mut c).await;
                assert_eq!((s.total_completed, s.total_deliveries), (10, 10));
                drop(tx);
                server.stop().await;
                return;
            }
        }
    }
}

#[tokio::test]
async fn work_session_waits_while_another_worker_holds_a_lease() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 1).await;
    let held = c
        .lease(pb::LeaseRequest {
            queue: "q".into(),
            worker_id: "other".into(),
            max_items: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .leases
        .remove(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::WorkRequest>(4);
    tx.send(pb::WorkRequest {
        queue: "q".into(),
        worker_id: "streamer".into(),
        credit: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = c
        .work(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let early = tokio::time::timeout(Duration::from_millis(300), responses.next()).await;
    assert!(
        early.is_err(),
        "no drained answer while a lease is outstanding"
    );
    let mut other = server.client().await;
    other
        .ack(pb::AckRequest {
            queue: "q".into(),
            id: held.id,
            token: held.token,
            result: vec![],
        })
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), responses.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(r.drained);
    drop(tx);
    server.stop().await;
}

/// A worker that grants credit and then stops reading is leased only what the
/// transport holds for it, not a channel full of responses more; once it reads
/// again, the session goes on leasing.
#[tokio::test]
async fn work_session_leases_nothing_more_to_a_worker_that_stops_reading() {
    const ITEMS: usize = 400;
    const PAYLOAD: usize = 512 * 1024; // 32 items fill one response (16 MiB)
    let server = Server::start(Auth::disabled()).await;
    let mut c = server.client().await;
    c.create_queue(pb::CreateQueueRequest {
        queue: "q".into(),
        options: Some(pb::QueueOptions {
            lease_timeout_ms: 300_000,
            max_payload_bytes: PAYLOAD as u64,
            ..Default::default()
        }),
        if_not_exists: false,
    })
    .await
    .unwrap();
    for _ in 0..ITEMS / 40 {
        c.enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: (0..40)
                .map(|_| pb::NewItem {
                    payload: vec![7u8; PAYLOAD].into(),
                    ..Default::default()
                })
                .collect(),
            seal: false,
        })
        .await
        .unwrap();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::WorkRequest>(4);
    tx.send(pb::WorkRequest {
        queue: "q".into(),
        worker_id: "stalled".into(),
        credit: ITEMS as u32,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = c
        .clone()
        .work(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Read nothing, and wait until the session stops leasing.
    let mut leased = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = stats(&mut c).await.leased;
        if now == leased && now > 0 {
            break;
        }
        leased = now;
    }
    // One response holds 32 items; before the session waited for the client, 16
    // responses queued up in the coordinator on top of what HTTP/2 and the sockets
    // hold, and every item was leased.
    assert!(
        leased <= ITEMS as u64 / 2,
        "{leased} of {ITEMS} items leased to a worker that reads nothing"
    );
    // Reading again, the worker gets every item.
    let mut got = 0;
    while got < ITEMS {
        got += next(&mut responses).await.leases.len();
    }
    assert_eq!(stats(&mut c).await.leased, ITEMS as u64);
    drop(tx);
    server.stop().await;
}

/// A message over the 64 MiB limit is refused with RESOURCE_EXHAUSTED and what to do,
/// on a unary call and on both streams (which answer what came before it first), and
/// nothing of it is applied.
#[tokio::test]
async fn a_message_over_the_limit_is_resource_exhausted_and_changes_nothing() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 1).await;
    // Tonic's own client encodes any size; workq's refuses what the server would.
    let mut raw = pb::work_q_client::WorkQClient::connect(server.url.clone())
        .await
        .unwrap();
    let huge = || pb::EnqueueRequest {
        queue: "q".into(),
        items: vec![pb::NewItem {
            payload: vec![0u8; 65 << 20].into(),
            ..Default::default()
        }],
        seal: false,
    };
    let small = || pb::EnqueueRequest {
        queue: "q".into(),
        items: vec![support::item("small")],
        seal: false,
    };
    let expect_refusal = |err: tonic::Status| {
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("at most 64 MiB"), "{err:?}");
    };
    expect_refusal(raw.enqueue(huge()).await.unwrap_err());

    let mut answers = raw
        .enqueue_stream(tokio_stream::iter(vec![small(), huge(), small()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answers.next().await.unwrap().unwrap().results.len(), 1);
    expect_refusal(answers.next().await.unwrap().unwrap_err());
    assert!(answers.next().await.is_none());

    let first = pb::WorkRequest {
        queue: "q".into(),
        worker_id: "w".into(),
        credit: 1,
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::WorkRequest>(2);
    tx.send(first).await.unwrap();
    let mut session = raw
        .work(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let lease = next(&mut session).await.leases.remove(0);
    let mut ack = settle(lease.id, lease.token, pb::SettleAction::Ack);
    ack.result = vec![0u8; 65 << 20];
    tx.send(pb::WorkRequest {
        settlements: vec![ack],
        ..Default::default()
    })
    .await
    .unwrap();
    expect_refusal(session.message().await.unwrap_err());

    let s = stats(&mut c).await;
    assert_eq!((s.total_enqueued, s.leased, s.done), (2, 1, 0));
    drop(tx);
    server.stop().await;
}

async fn next(responses: &mut tonic::Streaming<pb::WorkResponse>) -> pb::WorkResponse {
    tokio::time::timeout(Duration::from_secs(10), responses.next())
        .await
        .expect("a response within 10 s")
        .expect("stream open")
        .expect("no error")
}
