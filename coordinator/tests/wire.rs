//! The wire protocol against a real server on 127.0.0.1:0, in-process: the cases of
//! the gRPC streams (`streams.rs`) over raw TCP, plus what only the wire has: the
//! preamble sniffing that shares the gRPC port, the token in the hello, malformed
//! frames, and how a call ends (a clean end, an error status, or the coordinator
//! going away).

mod support;

use std::collections::HashSet;
use std::time::Duration;

use prost::Message;
use support::{Server, item, settle, setup, stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tonic::Code;
use workq_coordinator::auth::Auth;
use workq_proto::wire::{
    FrameReader, KIND_MESSAGE, KIND_STATUS, MAX_FRAME, PREAMBLE, WireReceiver, encode_frame,
};
use workq_proto::{Client, pb};

/// How long one answer may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(10);

async fn get(c: &mut Client, id: u64) -> pb::Item {
    c.get_item(pb::GetItemRequest {
        queue: "q".into(),
        id,
    })
    .await
    .unwrap()
    .into_inner()
}

/// One request of one item to queue "q".
fn one(payload: &str) -> pb::EnqueueRequest {
    pb::EnqueueRequest {
        queue: "q".into(),
        items: vec![item(payload)],
        seal: false,
    }
}

fn start_work(worker: &str, credit: u32) -> pb::WorkRequest {
    pb::WorkRequest {
        queue: "q".into(),
        worker_id: worker.into(),
        credit,
        ..Default::default()
    }
}

fn ack(lease: &pb::Lease) -> pb::Settlement {
    settle(lease.id, lease.token, pb::SettleAction::Ack)
}

/// The next thing the coordinator says on a wire call, within [`HANG`].
async fn answer<T: Message + Default>(
    rx: &mut WireReceiver<T>,
) -> Result<Option<T>, tonic::Status> {
    timeout(HANG, rx.message())
        .await
        .expect("the coordinator answers within 10 s")
}

/// The next response of a wire call, which must not have ended.
async fn next<T: Message + Default>(rx: &mut WireReceiver<T>) -> T {
    answer(rx)
        .await
        .expect("no error")
        .expect("the call is still open")
}

/// How the call ends, skipping any responses still on their way: `Ok` for a clean end.
async fn end_of<T: Message + Default>(rx: &mut WireReceiver<T>) -> Result<(), tonic::Status> {
    while answer(rx).await?.is_some() {}
    Ok(())
}

/// A work session the worker closed ends cleanly, with no lease pushed after the
/// close (a late "drained" may still be on its way).
async fn assert_clean_end(rx: &mut WireReceiver<pb::WorkResponse>) {
    loop {
        match answer(rx).await {
            Ok(None) => return,
            Ok(Some(r)) => assert!(r.leases.is_empty(), "a lease after the close: {r:?}"),
            Err(e) => panic!("closing the sending side ends the session cleanly: {e:?}"),
        }
    }
}

#[tokio::test]
async fn wire_enqueue_stream_answers_each_request_in_order() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 0).await;
    let (mut tx, mut rx) = c.wire_enqueue_stream().await.unwrap();
    // Pipelined: every request is on its way before the first answer is read.
    for i in 0..100 {
        tx.send(&one(&format!("{i}"))).await.unwrap();
    }
    let batch = pb::EnqueueRequest {
        queue: "q".into(),
        items: (0..10).map(|i| item(&format!("batch-{i}"))).collect(),
        seal: false,
    };
    tx.send(&batch).await.unwrap();
    let mut singles = Vec::new();
    for _ in 0..100 {
        let r = next(&mut rx).await;
        assert_eq!(r.results.len(), 1, "one result per single-item request");
        singles.push(r.results[0].id);
    }
    let batch_ids: Vec<u64> = next(&mut rx).await.results.iter().map(|r| r.id).collect();
    assert_eq!(batch_ids.len(), 10, "the batch is answered as one response");
    let distinct: HashSet<u64> = singles.iter().chain(&batch_ids).copied().collect();
    assert_eq!(distinct.len(), 110, "every item got its own id");
    for i in [0, 37, 99] {
        assert_eq!(
            get(&mut c, singles[i]).await.payload,
            format!("{i}").as_bytes(),
            "responses come back in request order"
        );
    }
    assert_eq!(get(&mut c, batch_ids[9]).await.payload, b"batch-9");
    let s = stats(&mut c).await;
    assert_eq!((s.total_enqueued, s.ready), (110, 110));

    tx.close().await.unwrap();
    assert!(
        answer(&mut rx).await.unwrap().is_none(),
        "closing the sending side ends the call cleanly"
    );

    // A call with no requests at all ends cleanly too.
    let (tx, mut rx) = c.wire_enqueue_stream().await.unwrap();
    tx.close().await.unwrap();
    assert!(answer(&mut rx).await.unwrap().is_none());
    assert_eq!(stats(&mut c).await.total_enqueued, 110);
    server.stop().await;
}

#[tokio::test]
async fn wire_enqueue_stream_ends_with_the_first_refused_request() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 0).await;

    // An unknown queue: the requests before it are answered, then NOT_FOUND ends it.
    let (mut tx, mut rx) = c.wire_enqueue_stream().await.unwrap();
    tx.send(&one("a")).await.unwrap();
    tx.send(&one("b")).await.unwrap();
    tx.send(&pb::EnqueueRequest {
        queue: "missing".into(),
        items: vec![item("lost")],
        seal: false,
    })
    .await
    .unwrap();
    assert_eq!(next(&mut rx).await.results.len(), 1);
    assert_eq!(next(&mut rx).await.results.len(), 1);
    let err = answer(&mut rx).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("missing"), "{}", err.message());
    assert_eq!(stats(&mut c).await.total_enqueued, 2);
    let err = c
        .get_queue(pb::GetQueueRequest {
            queue: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "the refused request created nothing"
    );

    // A batch with one invalid item is refused whole.
    let (mut tx, mut rx) = c.wire_enqueue_stream().await.unwrap();
    let mut bad_key = item("bad");
    bad_key.key = "k".repeat(513);
    tx.send(&pb::EnqueueRequest {
        queue: "q".into(),
        items: vec![item("fine"), item("fine too"), bad_key],
        seal: false,
    })
    .await
    .unwrap();
    let err = answer(&mut rx).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("key"), "{}", err.message());

    // So is a request without items.
    let (mut tx, mut rx) = c.wire_enqueue_stream().await.unwrap();
    tx.send(&pb::EnqueueRequest {
        queue: "q".into(),
        items: vec![],
        seal: false,
    })
    .await
    .unwrap();
    assert_eq!(
        answer(&mut rx).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let s = stats(&mut c).await;
    assert_eq!(
        (s.total_enqueued, s.ready),
        (2, 2),
        "nothing of a refused request is added"
    );
    server.stop().await;
}

/// On a disk store a pipelining producer has many requests waiting for group
/// commits at once: each is answered once, in request order, with the item it added,
/// over the wire and the gRPC stream alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_enqueue_stream_on_a_strict_store_answers_in_order() {
    let server = Server::start_strict(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 0).await;
    let requests = |from: usize| (from..from + 300).map(|i| one(&format!("p-{i}")));

    let (mut tx, mut rx) = c.wire_enqueue_stream().await.unwrap();
    let sender = tokio::spawn(async move {
        for request in requests(0) {
            tx.send(&request).await.unwrap();
        }
        tx
    });
    let mut ids = Vec::new();
    for _ in 0..300 {
        ids.push(next(&mut rx).await.results[0].id);
    }
    drop(sender.await.unwrap());
    assert!(end_of(&mut rx).await.is_ok());

    let mut responses = c
        .enqueue_stream(tokio_stream::iter(requests(300)))
        .await
        .unwrap()
        .into_inner();
    while let Some(answer) = responses.message().await.unwrap() {
        ids.push(answer.results[0].id);
    }

    assert_eq!(ids.len(), 600);
    assert!(
        ids.is_sorted_by(|a, b| a < b),
        "answers out of request order"
    );
    for i in [0, 1, 150, 299, 300, 451, 599] {
        assert_eq!(
            get(&mut c, ids[i]).await.payload,
            format!("p-{i}").into_bytes()
        );
    }
    assert_eq!(stats(&mut c).await.total_enqueued, 600);
    server.stop().await;
}

/// With a disk store, answers wait for group commits while later requests keep
/// arriving: whatever follows a refused request must be neither answered nor applied,
/// on the wire and on the gRPC stream alike, or a producer that retries what it was
/// not answered would add duplicates.
#[tokio::test]
async fn nothing_after_a_refused_request_is_applied_on_a_strict_store() {
    let server = Server::start_strict(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 0).await;
    let requests = || {
        let mut all = vec![one("first")];
        all.push(pb::EnqueueRequest {
            queue: "missing".into(),
            items: vec![item("refused")],
            seal: false,
        });
        all.extend((0..50).map(|i| one(&format!("after-{i}"))));
        all
    };

    for _ in 0..5 {
        let (mut tx, mut rx) = c.wire_enqueue_stream().await.unwrap();
        for request in requests() {
            tx.send(&request).await.unwrap();
        }
        assert_eq!(next(&mut rx).await.results.len(), 1);
        assert_eq!(answer(&mut rx).await.unwrap_err().code(), Code::NotFound);
    }
    for _ in 0..5 {
        let mut responses = c
            .enqueue_stream(tokio_stream::iter(requests()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(responses.message().await.unwrap().unwrap().results.len(), 1);
        assert_eq!(
            responses.message().await.unwrap_err().code(),
            Code::NotFound
        );
    }

    let s = stats(&mut c).await;
    assert_eq!(
        (s.total_enqueued, s.ready),
        (10, 10),
        "only the ten answered requests are in the queue"
    );
    server.stop().await;
}

#[tokio::test]
async fn wire_work_session_pushes_leases_within_credit_and_reports_drained() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 10).await;
    let (mut tx, mut rx) = c.wire_work().await.unwrap();
    tx.send(&start_work("wire-worker", 4)).await.unwrap();
    let first = next(&mut rx).await;
    assert_eq!(first.leases.len(), 4, "exactly the credit");
    assert!(!first.drained);
    let s = stats(&mut c).await;
    assert_eq!(
        (s.leased, s.ready),
        (4, 6),
        "nothing beyond the credit is leased"
    );

    let mut held = first.leases;
    let mut completed = HashSet::new();
    loop {
        // Ack what we hold and ask for as many again, in one message.
        let settlements: Vec<pb::Settlement> = held.drain(..).map(|l| ack(&l)).collect();
        let credit = settlements.len() as u32;
        let acking: HashSet<u64> = settlements.iter().map(|s| s.id).collect();
        tx.send(&pb::WorkRequest {
            credit,
            settlements,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut settled = HashSet::new();
        let mut drained = false;
        // The settlements come back, and more leases as the fresh credit allows.
        while settled.len() < acking.len() || (held.is_empty() && !drained) {
            let r = next(&mut rx).await;
            for s in &r.settled {
                assert_eq!(s.code, 0, "ack of a live lease: {s:?}");
                assert!(settled.insert(s.id), "item {} settled twice", s.id);
            }
            held.extend(r.leases);
            drained |= r.drained;
        }
        assert_eq!(settled, acking, "each settlement gets its own result");
        completed.extend(settled);
        if drained {
            break;
        }
    }
    assert_eq!(completed.len(), 10, "drained only once everything is acked");
    assert!(held.is_empty());
    let s = stats(&mut c).await;
    assert_eq!(
        (s.done, s.total_completed, s.total_deliveries),
        (10, 10, 10)
    );
    assert!(s.drained);

    tx.close().await.unwrap();
    assert_clean_end(&mut rx).await;
    server.stop().await;
}

/// A worker that closes its side while it still has credit is done: its waiting
/// lease poll gives up, the session ends cleanly, and an item enqueued afterwards is
/// left for others instead of being leased to a worker that cannot settle it.
#[tokio::test]
async fn a_worker_that_closes_with_credit_left_is_leased_nothing_more() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 0).await;
    let (mut tx, mut rx) = c.wire_work().await.unwrap();
    tx.send(&start_work("leaving", 5)).await.unwrap();
    // The empty queue is drained: the session says so, then waits for a change.
    assert!(next(&mut rx).await.drained);
    // A change wakes the session's poll; it is waiting when the worker leaves.
    c.enqueue(pb::EnqueueRequest {
        queue: "q".into(),
        items: vec![item("taken")],
        seal: false,
    })
    .await
    .unwrap();
    let taken = next(&mut rx).await;
    assert_eq!(taken.leases.len(), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.close().await.unwrap();
    assert_eq!(
        answer(&mut rx).await.unwrap(),
        None,
        "the session ends cleanly once the worker closed its side"
    );

    c.enqueue(pb::EnqueueRequest {
        queue: "q".into(),
        items: vec![item("for someone else")],
        seal: false,
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = stats(&mut c).await;
    assert_eq!((s.ready, s.leased), (1, 1), "the new item stays READY");
    server.stop().await;
}

/// Acking the last item with fresh credit answers "drained" once; the change the ack
/// itself made does not make the session say it again.
#[tokio::test]
async fn a_worker_is_told_drained_once() {
    let server = Server::start(Auth::disabled()).await;
    let c = setup(&server, 30_000, 1).await;
    let (mut tx, mut rx) = c.wire_work().await.unwrap();
    tx.send(&start_work("w", 1)).await.unwrap();
    let lease = next(&mut rx).await.leases.remove(0);
    tx.send(&pb::WorkRequest {
        credit: 1,
        settlements: vec![ack(&lease)],
        ..Default::default()
    })
    .await
    .unwrap();
    let answer_to_ack = next(&mut rx).await;
    assert_eq!(answer_to_ack.settled[0].code, 0);
    assert!(answer_to_ack.drained, "{answer_to_ack:?}");
    // Time for a second poll, woken by the ack's own change, to find the same state.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.close().await.unwrap();
    assert_eq!(
        answer(&mut rx).await.unwrap(),
        None,
        "nothing between the drained answer and the end"
    );
    server.stop().await;
}

#[tokio::test]
async fn wire_settlement_with_a_wrong_token_fails_alone_and_changes_nothing() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 2).await;
    let (mut tx, mut rx) = c.wire_work().await.unwrap();
    tx.send(&start_work("wire-worker", 2)).await.unwrap();
    let leases = next(&mut rx).await.leases;
    assert_eq!(leases.len(), 2);
    let (good, victim) = (&leases[0], &leases[1]);
    let before = get(&mut c, victim.id).await;

    tx.send(&pb::WorkRequest {
        settlements: vec![
            ack(good),
            settle(victim.id, victim.token + 999, pb::SettleAction::Ack),
            // The other lease's token is just as wrong for this item.
            settle(victim.id, good.token, pb::SettleAction::FailPermanent),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let r = next(&mut rx).await;
    let codes: Vec<(u64, i32)> = r.settled.iter().map(|s| (s.id, s.code)).collect();
    assert_eq!(
        codes,
        [
            (good.id, 0),
            (victim.id, Code::FailedPrecondition as i32),
            (victim.id, Code::FailedPrecondition as i32)
        ]
    );
    assert!(
        r.settled[1].message.starts_with("lease lost"),
        "{}",
        r.settled[1].message
    );
    assert!(r.leases.is_empty(), "no credit, no leases");

    let after = get(&mut c, victim.id).await;
    assert_eq!(after.state, pb::ItemState::Leased as i32);
    assert_eq!(
        (after.attempts, after.lease_deadline_at_ms, &after.worker_id),
        (
            before.attempts,
            before.lease_deadline_at_ms,
            &before.worker_id
        ),
        "the wrong tokens changed nothing"
    );
    let s = stats(&mut c).await;
    assert_eq!((s.done, s.leased, s.dead), (1, 1, 0));

    // The session goes on: the right token still acks it.
    tx.send(&pb::WorkRequest {
        settlements: vec![ack(victim)],
        ..Default::default()
    })
    .await
    .unwrap();
    let r = next(&mut rx).await;
    assert_eq!(r.settled.len(), 1);
    assert_eq!(r.settled[0].code, 0);
    assert_eq!(stats(&mut c).await.done, 2);
    tx.close().await.unwrap();
    assert!(answer(&mut rx).await.unwrap().is_none());
    server.stop().await;
}

#[tokio::test]
async fn wire_work_session_on_a_missing_queue_ends_with_not_found() {
    let server = Server::start(Auth::disabled()).await;
    let c = server.client().await;
    let (mut tx, mut rx) = c.wire_work().await.unwrap();
    tx.send(&pb::WorkRequest {
        queue: "missing".into(),
        worker_id: "w".into(),
        credit: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(answer(&mut rx).await.unwrap_err().code(), Code::NotFound);

    let (mut tx, mut rx) = c.wire_work().await.unwrap();
    tx.send(&pb::WorkRequest {
        queue: "missing".into(),
        credit: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let err = answer(&mut rx).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "no worker id: {err:?}");
    server.stop().await;
}

#[tokio::test]
async fn grpc_and_wire_clients_share_the_port() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 0).await;
    // A wire call is open while gRPC calls (unary and streaming) run on the same port.
    let (mut wire_tx, mut wire_rx) = c.wire_enqueue_stream().await.unwrap();
    let wire = async {
        let mut ids = Vec::new();
        for i in 0..100 {
            wire_tx.send(&one(&format!("wire-{i}"))).await.unwrap();
            ids.push(next(&mut wire_rx).await.results[0].id);
        }
        ids
    };
    let mut streaming = c.clone();
    let grpc_stream = async move {
        let requests = tokio_stream::iter((0..100).map(|i| one(&format!("stream-{i}"))));
        let mut responses = streaming
            .enqueue_stream(requests)
            .await
            .unwrap()
            .into_inner();
        let mut n = 0;
        while let Some(r) = responses.message().await.unwrap() {
            n += r.results.len();
        }
        n
    };
    let mut unary = server.client().await;
    let grpc_unary = async move {
        for i in 0..20 {
            unary.enqueue(one(&format!("unary-{i}"))).await.unwrap();
        }
    };
    let (wire_ids, streamed, ()) = timeout(HANG * 3, async {
        tokio::join!(wire, grpc_stream, grpc_unary)
    })
    .await
    .expect("all three producers finish");
    assert_eq!((wire_ids.len(), streamed), (100, 100));
    assert_eq!(get(&mut c, wire_ids[42]).await.payload, b"wire-42");
    // A gRPC connection opened while the wire one is still open works too.
    let mut fresh = server.client().await;
    assert_eq!(stats(&mut fresh).await.total_enqueued, 220);
    wire_tx.close().await.unwrap();
    assert!(answer(&mut wire_rx).await.unwrap().is_none());

    // A wire worker and a gRPC worker drain the queue together.
    let wire_worker = async {
        let (mut tx, mut rx) = c.wire_work().await.unwrap();
        tx.send(&start_work("wire-worker", 8)).await.unwrap();
        let mut acked = Vec::new();
        loop {
            let r = next(&mut rx).await;
            for s in &r.settled {
                assert_eq!(s.code, 0, "{s:?}");
                acked.push(s.id);
            }
            if r.drained {
                break;
            }
            if !r.leases.is_empty() {
                let settlements: Vec<pb::Settlement> = r.leases.iter().map(ack).collect();
                tx.send(&pb::WorkRequest {
                    credit: settlements.len() as u32,
                    settlements,
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }
        tx.close().await.unwrap();
        assert_clean_end(&mut rx).await;
        acked
    };
    let mut grpc = server.client().await;
    let grpc_worker = async move {
        let mut acked = Vec::new();
        loop {
            let r = grpc
                .lease(pb::LeaseRequest {
                    queue: "q".into(),
                    worker_id: "grpc-worker".into(),
                    max_items: 8,
                    wait_ms: 1_000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            if r.leases.is_empty() && r.drained {
                break;
            }
            if r.leases.is_empty() {
                continue;
            }
            let results = grpc
                .settle(pb::SettleRequest {
                    queue: "q".into(),
                    settlements: r.leases.iter().map(ack).collect(),
                })
                .await
                .unwrap()
                .into_inner()
                .results;
            for s in results {
                assert_eq!(s.code, 0, "{s:?}");
                acked.push(s.id);
            }
        }
        acked
    };
    let (by_wire, by_grpc) = timeout(HANG * 3, async { tokio::join!(wire_worker, grpc_worker) })
        .await
        .expect("both workers finish");
    let all: HashSet<u64> = by_wire.iter().chain(&by_grpc).copied().collect();
    assert_eq!(
        (all.len(), by_wire.len() + by_grpc.len()),
        (220, 220),
        "every item acked exactly once"
    );
    let s = stats(&mut c).await;
    assert_eq!((s.done, s.total_completed), (220, 220));
    server.stop().await;
}

#[tokio::test]
async fn wire_hello_needs_the_right_token() {
    let server = Server::start(Auth::with_token("s3cret")).await;
    let mut admin = server.client_with(Some("s3cret")).await;
    admin
        .create_queue(pb::CreateQueueRequest {
            queue: "q".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin.enqueue(one("for workers")).await.unwrap();

    for token in [None, Some("guess"), Some("s3cre")] {
        let c = server.client_with(token).await;
        let (mut tx, mut rx) = c.wire_enqueue_stream().await.unwrap();
        // The request may find the connection already closed; the answer says why.
        let _ = tx.send(&one("sneaky")).await;
        let err = answer(&mut rx).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::Unauthenticated,
            "token {token:?}: {err:?}"
        );
        if token.is_none() {
            assert!(err.message().contains("missing token"), "{}", err.message());
        }

        let (mut tx, mut rx) = c.wire_work().await.unwrap();
        let _ = tx.send(&start_work("intruder", 10)).await;
        let err = answer(&mut rx).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::Unauthenticated,
            "token {token:?}: {err:?}"
        );
    }
    let s = stats(&mut admin).await;
    assert_eq!(
        (s.total_enqueued, s.leased, s.total_deliveries),
        (1, 0, 0),
        "nothing enqueued or leased without the token"
    );

    let right = server.client_with(Some("s3cret")).await;
    let (mut tx, mut rx) = right.wire_enqueue_stream().await.unwrap();
    tx.send(&one("welcome")).await.unwrap();
    let id = next(&mut rx).await.results[0].id;
    tx.close().await.unwrap();
    assert!(answer(&mut rx).await.unwrap().is_none());
    assert_eq!(get(&mut admin, id).await.payload, b"welcome");
    assert_eq!(stats(&mut admin).await.total_enqueued, 2);
    server.stop().await;
}

// ---- raw sockets ------------------------------------------------------------------

/// A raw TCP connection to the coordinator's gRPC port.
async fn connect(server: &Server) -> TcpStream {
    let addr = server.url.strip_prefix("http://").unwrap();
    TcpStream::connect(addr).await.unwrap()
}

fn frame(kind: u8, message: &impl Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(kind, message, &mut out);
    out
}

/// A frame with a body given byte by byte (e.g. one that is not a protobuf).
fn raw_frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    out.push(kind);
    out.extend_from_slice(body);
    out
}

/// The preamble and a hello for `call` (a `pb::WireCall` number).
fn hello(call: i32) -> Vec<u8> {
    let mut out = PREAMBLE.to_vec();
    out.extend(frame(
        KIND_MESSAGE,
        &pb::WireHello {
            call,
            token: String::new(),
        },
    ));
    out
}

/// Sends `bytes` on a fresh connection and reads what comes back: the number of
/// response frames, then the status frame that must end the call, after which the
/// coordinator must close the connection (without the client closing first).
async fn exchange(server: &Server, bytes: &[u8]) -> (usize, pb::WireStatus) {
    let mut stream = connect(server).await;
    stream.write_all(bytes).await.unwrap();
    let mut frames = FrameReader::new(stream);
    let mut responses = 0;
    let status = loop {
        let frame = timeout(HANG, frames.read_frame())
            .await
            .expect("an answer within 10 s")
            .expect("well-formed frames")
            .expect("a status frame before the connection closes");
        match frame {
            (KIND_MESSAGE, _) => responses += 1,
            (KIND_STATUS, body) => break pb::WireStatus::decode(body).unwrap(),
            (kind, _) => panic!("a server frame of kind {kind}"),
        }
    };
    let after = timeout(HANG, frames.read_frame())
        .await
        .expect("the coordinator closes the connection after the status");
    assert!(
        matches!(&after, Ok(None))
            || matches!(&after, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "nothing follows the status frame: {after:?}"
    );
    (responses, status)
}

#[tokio::test]
async fn malformed_frames_end_the_call_with_invalid_argument() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 0).await;
    let enqueue = pb::WireCall::EnqueueStream as i32;
    let work = pb::WireCall::Work as i32;
    let too_long = ((MAX_FRAME + 1) as u32).to_be_bytes();
    // Field 2 (the token, or the items) says 5 bytes follow; one does.
    let not_protobuf = [0x12, 0x05, b'x'];
    let cat = |parts: &[&[u8]]| parts.concat();
    // A batch whose first item is whole and whose second item's key is not UTF-8:
    // refused as a whole (the coordinator reads enqueue frames in place).
    let mut bad_second_key = pb::EnqueueRequest {
        queue: "q".into(),
        items: vec![
            item("first"),
            pb::NewItem {
                key: "~".into(),
                ..item("second")
            },
        ],
        seal: false,
    }
    .encode_to_vec();
    let tilde = bad_second_key
        .iter()
        .rposition(|&b| b == b'~')
        .expect("the key");
    bad_second_key[tilde] = 0xff;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a hello that is not a protobuf",
            cat(&[PREAMBLE, &raw_frame(KIND_MESSAGE, &not_protobuf)]),
        ),
        (
            "an enqueue request that is not a protobuf",
            cat(&[&hello(enqueue), &raw_frame(KIND_MESSAGE, &not_protobuf)]),
        ),
        (
            "an enqueue request with a key that is not UTF-8",
            cat(&[&hello(enqueue), &raw_frame(KIND_MESSAGE, &bad_second_key)]),
        ),
        (
            "a work request that is not a protobuf",
            cat(&[&hello(work), &raw_frame(KIND_MESSAGE, &not_protobuf)]),
        ),
        ("a hello over MAX_FRAME", cat(&[PREAMBLE, &too_long])),
        (
            "a request over MAX_FRAME",
            cat(&[&hello(enqueue), &too_long]),
        ),
        ("an empty frame", cat(&[&hello(enqueue), &[0, 0, 0, 0]])),
        ("an unknown call", hello(7)),
        ("an unspecified call", hello(0)),
        (
            "a hello of unknown kind",
            cat(&[PREAMBLE, &frame(9, &pb::WireHello::default())]),
        ),
        (
            "a request of unknown kind",
            cat(&[&hello(enqueue), &frame(9, &one("never"))]),
        ),
        (
            "a status frame from the client",
            cat(&[&hello(enqueue), &frame(KIND_STATUS, &one("never"))]),
        ),
    ];
    for (case, bytes) in &cases {
        let (responses, status) = exchange(&server, bytes).await;
        assert_eq!(
            (responses, status.code),
            (0, Code::InvalidArgument as i32),
            "{case}: {status:?}"
        );
        assert!(!status.message.is_empty(), "{case}: the status says why");
    }
    let s = stats(&mut c).await;
    assert_eq!(
        (s.total_enqueued, s.total_deliveries),
        (0, 0),
        "malformed calls change nothing"
    );

    // What came before the malformed frame is answered, then the call ends.
    let bytes = cat(&[
        &hello(enqueue),
        &frame(KIND_MESSAGE, &one("kept")),
        &raw_frame(KIND_MESSAGE, &not_protobuf),
        &frame(KIND_MESSAGE, &one("after the bad frame")),
    ]);
    let (responses, status) = exchange(&server, &bytes).await;
    assert_eq!((responses, status.code), (1, Code::InvalidArgument as i32));
    assert!(status.message.contains("malformed"), "{status:?}");
    let s = stats(&mut c).await;
    assert_eq!(
        s.total_enqueued, 1,
        "only the request before the bad frame is in"
    );

    // A well-formed call on a fresh connection still works.
    let bytes = cat(&[&hello(enqueue), &frame(KIND_MESSAGE, &one("fine"))]);
    let mut stream = connect(&server).await;
    stream.write_all(&bytes).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut frames = FrameReader::new(stream);
    let (kind, body) = frames.read_frame().await.unwrap().unwrap();
    assert_eq!(kind, KIND_MESSAGE);
    assert_eq!(pb::EnqueueResponse::decode(body).unwrap().results.len(), 1);
    let (kind, body) = frames.read_frame().await.unwrap().unwrap();
    assert_eq!(kind, KIND_STATUS);
    assert_eq!(pb::WireStatus::decode(body).unwrap().code, 0, "a clean end");
    assert!(frames.read_frame().await.unwrap().is_none());
    assert_eq!(stats(&mut c).await.total_enqueued, 2);
    server.stop().await;
}

#[tokio::test]
async fn non_wire_connections_go_to_grpc_and_the_server_keeps_serving() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 0).await;
    let garbage: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: workq\r\n\r\n",
        // Another version of the wire protocol is not this one.
        b"workq/2\n\0\0\0\x01\0",
        b"\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
    ];
    for bytes in garbage {
        let mut stream = connect(&server).await;
        stream.write_all(bytes).await.unwrap();
        let mut reply = Vec::new();
        let read = timeout(HANG, stream.read_to_end(&mut reply))
            .await
            .unwrap_or_else(|_| panic!("{bytes:?}: the connection is closed"));
        // What tonic says first: an HTTP/2 SETTINGS frame (type 4), not a wire status.
        assert_eq!(
            reply.get(3),
            Some(&4),
            "{bytes:?}: answered by the HTTP/2 server: {reply:?} ({read:?})"
        );
    }
    // Probes that connect and close, or stop inside the preamble.
    drop(connect(&server).await);
    let mut partial = connect(&server).await;
    partial.write_all(&PREAMBLE[..5]).await.unwrap();
    drop(partial);

    // Both protocols still work, on existing and new connections.
    c.enqueue(one("grpc")).await.unwrap();
    let mut fresh = server.client().await;
    let (mut tx, mut rx) = fresh.wire_enqueue_stream().await.unwrap();
    tx.send(&one("wire")).await.unwrap();
    assert_eq!(next(&mut rx).await.results.len(), 1);
    tx.close().await.unwrap();
    assert!(answer(&mut rx).await.unwrap().is_none());
    assert_eq!(stats(&mut fresh).await.total_enqueued, 2);
    timeout(HANG * 2, server.stop())
        .await
        .expect("the coordinator stops");
}

#[tokio::test]
async fn shutdown_ends_open_wire_calls_with_unavailable() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 2).await;

    // A worker holding its only lease with no credit left: waiting for requests.
    let (mut holding_tx, mut holding) = c.wire_work().await.unwrap();
    holding_tx.send(&start_work("holding", 1)).await.unwrap();
    assert_eq!(next(&mut holding).await.leases.len(), 1);
    // A worker with credit left over: a lease poll is pending on the server.
    let (mut polling_tx, mut polling) = c.wire_work().await.unwrap();
    polling_tx.send(&start_work("polling", 5)).await.unwrap();
    assert_eq!(next(&mut polling).await.leases.len(), 1);
    // A producer between requests.
    let (mut producer_tx, mut producer) = c.wire_enqueue_stream().await.unwrap();
    producer_tx.send(&one("before shutdown")).await.unwrap();
    assert_eq!(next(&mut producer).await.results.len(), 1);
    assert_eq!(
        next(&mut polling).await.leases.len(),
        1,
        "the pending poll takes the new item"
    );
    let s = stats(&mut c).await;
    assert_eq!((s.leased, s.ready, s.drained), (3, 0, false));

    timeout(HANG * 2, server.stop())
        .await
        .expect("stop returns while wire calls are open");

    for (who, ended) in [
        ("holding worker", end_of(&mut holding).await),
        ("polling worker", end_of(&mut polling).await),
    ] {
        let err = ended.expect_err("not a clean end");
        assert_eq!(err.code(), Code::Unavailable, "{who}: {err:?}");
        assert!(err.message().contains("shutting down"), "{who}: {err:?}");
    }
    let err = end_of(&mut producer).await.expect_err("not a clean end");
    assert_eq!(err.code(), Code::Unavailable, "producer: {err:?}");
    assert!(err.message().contains("shutting down"), "producer: {err:?}");
}

#[tokio::test]
async fn a_worker_that_drops_its_connection_disturbs_no_one() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 3).await;
    let (mut tx, mut rx) = c.wire_work().await.unwrap();
    tx.send(&pb::WorkRequest {
        lease_timeout_ms: 300,
        ..start_work("vanishing", 2)
    })
    .await
    .unwrap();
    let abandoned: HashSet<u64> = next(&mut rx).await.leases.iter().map(|l| l.id).collect();
    assert_eq!(abandoned.len(), 2);
    // Gone mid-session, holding two leases, without a word.
    drop((tx, rx));

    // Others carry on: a producer, and a worker that gets the item left over at once
    // and the abandoned ones when their leases expire.
    let (mut ptx, mut prx) = c.wire_enqueue_stream().await.unwrap();
    ptx.send(&one("late")).await.unwrap();
    assert_eq!(next(&mut prx).await.results.len(), 1);
    ptx.close().await.unwrap();
    assert!(answer(&mut prx).await.unwrap().is_none());

    let (mut tx, mut rx) = c.wire_work().await.unwrap();
    tx.send(&start_work("steady", 10)).await.unwrap();
    let mut held = Vec::new();
    while held.len() < 4 {
        held.extend(next(&mut rx).await.leases);
    }
    let redelivered: HashSet<u64> = held
        .iter()
        .filter(|l| l.attempt == 2)
        .map(|l| l.id)
        .collect();
    assert_eq!(redelivered, abandoned, "the abandoned items come back");
    tx.send(&pb::WorkRequest {
        settlements: held.iter().map(ack).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = next(&mut rx).await;
    assert!(r.settled.iter().all(|s| s.code == 0), "{:?}", r.settled);
    assert_eq!(r.settled.len(), 4);
    tx.close().await.unwrap();
    assert!(end_of(&mut rx).await.is_ok());
    let s = stats(&mut c).await;
    assert_eq!((s.done, s.ready, s.leased, s.total_expired), (4, 0, 0, 2));
    server.stop().await;
}

/// A strict producer that resets its connection while its answers wait for their
/// syncs (handed to the flusher, which then writes to a dead socket): the coordinator
/// keeps serving, every request it applied is whole, and shutdown is prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_producer_that_vanishes_with_answers_in_flight_disturbs_no_one() {
    let server = Server::start_strict(Auth::disabled()).await;
    let mut c = setup(&server, 30_000, 0).await;
    let mut stream = connect(&server).await;
    let mut requests = hello(pb::WireCall::EnqueueStream as i32);
    for i in 0..20_000 {
        requests.extend(frame(KIND_MESSAGE, &one(&format!("gone-{i}"))));
    }
    // Closed, the connection is reset, not shut down.
    stream.set_zero_linger().unwrap();
    let producer = tokio::spawn(async move {
        // It may block once the answers nobody reads fill the buffers.
        let _ = stream.write_all(&requests).await;
        std::future::pending::<()>().await
    });
    // Gone without reading an answer once the session is under way: some requests
    // applied, answers waiting for their syncs, more requests unread.
    while stats(&mut c).await.total_enqueued < 100 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    producer.abort();
    assert!(producer.await.unwrap_err().is_cancelled());

    // Another producer is answered, on the wire and over gRPC.
    let (mut tx, mut rx) = c.wire_enqueue_stream().await.unwrap();
    for i in 0..50 {
        tx.send(&one(&format!("after-{i}"))).await.unwrap();
        assert_eq!(next(&mut rx).await.results.len(), 1);
    }
    tx.close().await.unwrap();
    assert!(end_of(&mut rx).await.is_ok());
    c.enqueue(one("grpc")).await.unwrap();

    // The vanished producer's requests were applied in order, each whole or not at
    // all (its session may still be applying what it had read: ids only grow, so a
    // listing sees a prefix of them).
    let mut gone = Vec::new();
    let mut others = Vec::new();
    let mut after = 0;
    loop {
        let page = c
            .list_items(pb::ListItemsRequest {
                queue: "q".into(),
                after_id: after,
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for item in page.items {
            let payload = String::from_utf8(item.payload).unwrap();
            match payload.strip_prefix("gone-") {
                Some(i) => gone.push(i.parse::<usize>().unwrap()),
                None => others.push(payload),
            }
        }
        after = page.next_after_id;
        if after == 0 {
            break;
        }
    }
    assert!(gone.len() <= 20_000, "{} of 20,000", gone.len());
    assert!(
        gone.iter().enumerate().all(|(at, &i)| at == i),
        "not a prefix in request order"
    );
    let expected: Vec<String> = (0..50)
        .map(|i| format!("after-{i}"))
        .chain(["grpc".to_string()])
        .collect();
    assert_eq!(others, expected);
    timeout(HANG, server.stop())
        .await
        .expect("shutdown is not held up by the dead connection");
}

/// A client that keeps sending and never reads its answers blocks the call's writes;
/// shutdown cuts it after the grace period instead of waiting forever.
#[tokio::test]
async fn shutdown_cuts_a_call_whose_client_stopped_reading_after_the_grace_period() {
    let server = Server::start_with_grace(Duration::from_millis(500)).await;
    let mut c = setup(&server, 30_000, 0).await;
    let mut stream = connect(&server).await;
    stream
        .write_all(&hello(pb::WireCall::EnqueueStream as i32))
        .await
        .unwrap();
    let batch = frame(
        KIND_MESSAGE,
        &pb::EnqueueRequest {
            queue: "q".into(),
            items: (0..1000).map(|i| item(&format!("unread-{i}"))).collect(),
            seal: false,
        },
    );
    // Send until the socket buffers are full both ways and a write blocks.
    let mut sent = 0;
    while timeout(Duration::from_millis(500), stream.write_all(&batch))
        .await
        .is_ok_and(|written| written.is_ok())
    {
        sent += 1;
        assert!(sent < 100_000, "writes never blocked");
    }
    assert!(stats(&mut c).await.total_enqueued > 0);
    timeout(HANG, server.stop())
        .await
        .expect("shutdown ends after its grace period, not never");
}

/// A connection that sent the preamble but no hello does not hold shutdown up until
/// the hello timeout (10 s): it is told the coordinator is going away.
#[tokio::test]
async fn a_connection_waiting_for_its_hello_does_not_delay_shutdown() {
    let server = Server::start(Auth::disabled()).await;
    let mut stream = connect(&server).await;
    stream.write_all(PREAMBLE).await.unwrap();
    // Let the coordinator take the connection as a wire one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    timeout(Duration::from_secs(5), server.stop())
        .await
        .expect("shutdown does not wait for the hello timeout");
    let mut frames = FrameReader::new(stream);
    let (kind, body) = frames.read_frame().await.unwrap().unwrap();
    assert_eq!(kind, KIND_STATUS);
    assert_eq!(
        pb::WireStatus::decode(body).unwrap().code,
        Code::Unavailable as i32
    );
}

/// A plain connection that stops part-way through the HTTP/2 preface waits for the
/// rest where the opening timeout applies, not in tonic: shutdown drops it at once
/// rather than waiting out the grace period, and gRPC clients are served meanwhile.
#[tokio::test]
async fn a_connection_stopped_mid_http2_preface_does_not_delay_shutdown() {
    let server = Server::start_with_grace(Duration::from_secs(60)).await;
    let mut half = connect(&server).await;
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut client = server.client().await;
    client.list_queues(pb::ListQueuesRequest {}).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("shutdown does not wait for a preface that never comes");
    let mut rest = Vec::new();
    let _ = timeout(Duration::from_secs(5), half.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{rest:?}");
}
