//! The gRPC API against a real server on 127.0.0.1:0, in-process: the worker protocol
//! end to end, status codes for bad input, auth, health and the watch stream.

mod support;

use std::time::Duration;

use support::{Server, create};
use tonic::Code;
use workq_coordinator::auth::Auth;
use workq_proto::{Client, pb};

fn items(payloads: &[&str]) -> Vec<pb::NewItem> {
    payloads
        .iter()
        .map(|p| pb::NewItem {
            payload: p.as_bytes().to_vec().into(),
            ..Default::default()
        })
        .collect()
}

async fn enqueue(c: &mut Client, queue: &str, payloads: &[&str]) -> Vec<pb::EnqueueResult> {
    c.enqueue(pb::EnqueueRequest {
        queue: queue.into(),
        items: items(payloads),
        seal: false,
    })
    .await
    .unwrap()
    .into_inner()
    .results
}

async fn lease(c: &mut Client, queue: &str, max: u32) -> pb::LeaseResponse {
    c.lease(pb::LeaseRequest {
        queue: queue.into(),
        worker_id: "test-worker".into(),
        max_items: max,
        lease_timeout_ms: 0,
        wait_ms: 0,
    })
    .await
    .unwrap()
    .into_inner()
}

async fn stats(c: &mut Client, queue: &str) -> pb::QueueStats {
    c.get_queue(pb::GetQueueRequest {
        queue: queue.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .stats
    .unwrap()
}

#[tokio::test]
async fn worker_protocol_end_to_end() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = server.client().await;
    create(&mut c, "jobs", 30_000).await;
    enqueue(&mut c, "jobs", &["a", "b", "c"]).await;

    let got = lease(&mut c, "jobs", 2).await;
    assert_eq!(got.leases.len(), 2);
    assert!(!got.drained);
    let (a, b) = (&got.leases[0], &got.leases[1]);
    assert_eq!((a.payload.as_slice(), a.attempt), (&b"a"[..], 1));
    c.ack(pb::AckRequest {
        queue: "jobs".into(),
        id: a.id,
        token: a.token,
        result: b"A".to_vec(),
    })
    .await
    .unwrap();
    let fail = c
        .fail(pb::FailRequest {
            queue: "jobs".into(),
            id: b.id,
            token: b.token,
            error: "nope".into(),
            permanent: true,
            retry_delay_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fail.state, pb::ItemState::Dead as i32);
    let last = lease(&mut c, "jobs", 10).await;
    assert_eq!(last.leases.len(), 1);
    c.extend(pb::ExtendRequest {
        queue: "jobs".into(),
        id: last.leases[0].id,
        token: last.leases[0].token,
        lease_timeout_ms: 60_000,
    })
    .await
    .unwrap();
    c.ack(pb::AckRequest {
        queue: "jobs".into(),
        id: last.leases[0].id,
        token: last.leases[0].token,
        result: vec![],
    })
    .await
    .unwrap();

    let s = stats(&mut c, "jobs").await;
    assert_eq!(
        (s.done, s.dead, s.total_completed, s.total_deliveries),
        (2, 1, 2, 3)
    );
    assert!(s.drained);
    let drained = lease(&mut c, "jobs", 1).await;
    assert!(drained.drained && drained.leases.is_empty());

    let item = c
        .get_item(pb::GetItemRequest {
            queue: "jobs".into(),
            id: a.id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.result, b"A");
    assert_eq!(item.state, pb::ItemState::Done as i32);

    let dead = c
        .list_items(pb::ListItemsRequest {
            queue: "jobs".into(),
            state: pb::ItemState::Dead as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dead.items.len(), 1);
    assert_eq!(dead.items[0].last_error, "nope");
    let requeued = c
        .requeue(pb::RequeueRequest {
            queue: "jobs".into(),
            ids: vec![],
            all_dead: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(requeued.requeued, 1);
    assert_eq!(stats(&mut c, "jobs").await.ready, 1);

    let workers = c
        .list_workers(pb::ListWorkersRequest {
            queue: "jobs".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(workers.workers[0].id, "test-worker");
    assert_eq!(workers.workers[0].completed, 2);
    server.stop().await;
}

#[tokio::test]
async fn stale_token_is_failed_precondition_and_changes_nothing() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = server.client().await;
    create(&mut c, "q", 200).await;
    enqueue(&mut c, "q", &["x"]).await;
    let old = lease(&mut c, "q", 1).await.leases.remove(0);
    // Wait for the server's own timer to expire the 200 ms lease and re-lease it.
    let new = loop {
        let got = lease(&mut c, "q", 1).await;
        if let Some(l) = got.leases.into_iter().next() {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(new.id, old.id);
    let err = c
        .ack(pb::AckRequest {
            queue: "q".into(),
            id: old.id,
            token: old.token,
            result: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().starts_with("lease lost"), "{}", err.message());
    let s = stats(&mut c, "q").await;
    assert_eq!((s.leased, s.total_completed), (1, 0));
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_the_server_keeps_serving() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = server.client().await;
    create(&mut c, "q", 30_000).await;

    let expect = |result: Result<(), tonic::Status>, code: Code, needle: &str| {
        let err = result.expect_err(needle);
        assert_eq!(err.code(), code, "{needle}: {}", err.message());
        assert!(
            err.message().contains(needle),
            "'{}' lacks '{needle}'",
            err.message()
        );
    };
    for bad in ["", "-x", "a b", "ü", &"x".repeat(129)] {
        let r = c
            .create_queue(pb::CreateQueueRequest {
                queue: bad.to_string(),
                ..Default::default()
            })
            .await
            .map(drop);
        expect(r, Code::InvalidArgument, "invalid queue name");
    }
    let r = c
        .create_queue(pb::CreateQueueRequest {
            queue: "q".into(),
            ..Default::default()
        })
        .await
        .map(drop);
    expect(r, Code::AlreadyExists, "already exists");
    let r = c
        .create_queue(pb::CreateQueueRequest {
            queue: "z".into(),
            options: Some(pb::QueueOptions {
                lease_timeout_ms: 5,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(drop);
    expect(r, Code::InvalidArgument, "lease timeout");
    let enqueue = |queue: &str, items: Vec<pb::NewItem>| pb::EnqueueRequest {
        queue: queue.into(),
        items,
        seal: false,
    };
    let r = c.enqueue(enqueue("q", vec![])).await.map(drop);
    expect(r, Code::InvalidArgument, "at least one item");
    let r = c.enqueue(enqueue("nope", items(&["a"]))).await.map(drop);
    expect(r, Code::NotFound, "queue 'nope' not found");
    let big = pb::NewItem {
        payload: vec![0; 1024 * 1024 + 1].into(),
        ..Default::default()
    };
    let r = c.enqueue(enqueue("q", vec![big])).await.map(drop);
    expect(r, Code::InvalidArgument, "max payload");
    let many = items(&vec!["x"; 10_001]);
    let r = c.enqueue(enqueue("q", many)).await.map(drop);
    expect(r, Code::InvalidArgument, "at most 10000 items");
    let absurd = pb::NewItem {
        delay_ms: u64::MAX,
        ..Default::default()
    };
    let r = c.enqueue(enqueue("q", vec![absurd])).await.map(drop);
    expect(r, Code::InvalidArgument, "delay");
    let lease_req = |worker: &str, max: u32, wait_ms: u64, timeout: u64| pb::LeaseRequest {
        queue: "q".into(),
        worker_id: worker.into(),
        max_items: max,
        lease_timeout_ms: timeout,
        wait_ms,
    };
    let r = c.lease(lease_req("", 1, 0, 0)).await.map(drop);
    expect(r, Code::InvalidArgument, "worker id");
    let r = c.lease(lease_req("evil\x1b[2J\n", 1, 0, 0)).await.map(drop);
    expect(r, Code::InvalidArgument, "control characters");
    let r = c.lease(lease_req("w", 1001, 0, 0)).await.map(drop);
    expect(r, Code::InvalidArgument, "max items");
    let r = c.lease(lease_req("w", 1, 3_600_000, 0)).await.map(drop);
    expect(r, Code::InvalidArgument, "wait");
    let r = c.lease(lease_req("w", 1, 0, u64::MAX)).await.map(drop);
    expect(r, Code::InvalidArgument, "lease timeout");
    let r = c
        .ack(pb::AckRequest {
            queue: "q".into(),
            id: 424242,
            token: 1,
            result: vec![],
        })
        .await
        .map(drop);
    expect(r, Code::NotFound, "item 424242 not found");
    let r = c
        .seal_queue(pb::SealQueueRequest { queue: "q".into() })
        .await
        .map(drop);
    assert!(r.is_ok());
    let r = c.enqueue(enqueue("q", items(&["late"]))).await.map(drop);
    expect(r, Code::FailedPrecondition, "sealed");

    // Still serving, and nothing above changed the queue.
    let s = stats(&mut c, "q").await;
    assert_eq!((s.total_enqueued, s.ready), (0, 0));
    assert!(s.sealed);
    server.stop().await;
}

#[tokio::test]
async fn token_auth_guards_the_api_but_not_health() {
    let server = Server::start(Auth::with_token("s3cret")).await;
    let mut anonymous = server.client().await;
    let err = anonymous
        .list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("missing token"), "{}", err.message());
    let mut wrong = server.client_with(Some("guess")).await;
    let err = wrong
        .list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut right = server.client_with(Some("s3cret")).await;
    right.list_queues(pb::ListQueuesRequest {}).await.unwrap();
    // Whitespace around a token is not part of it, as in the token file and over HTTP.
    let mut padded = server.client_with(Some(" s3cret ")).await;
    padded.list_queues(pb::ListQueuesRequest {}).await.unwrap();

    // Kubernetes gRPC probes carry no token.
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn watch_streams_progress_until_drained() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = server.client().await;
    create(&mut c, "w", 30_000).await;
    enqueue(&mut c, "w", &["1", "2"]).await;
    let mut stream = c
        .watch(pb::WatchRequest {
            queue: "w".into(),
            min_interval_ms: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!((first.ready, first.drained), (2, false));
    let mut worker = server.client().await;
    for l in lease(&mut worker, "w", 2).await.leases {
        worker
            .ack(pb::AckRequest {
                queue: "w".into(),
                id: l.id,
                token: l.token,
                result: vec![],
            })
            .await
            .unwrap();
    }
    let last = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let s = stream.message().await.unwrap().unwrap();
            if s.drained {
                return s;
            }
        }
    })
    .await
    .expect("watch reports drained");
    assert_eq!(last.total_completed, 2);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_long_polls_promptly() {
    let server = Server::start(Auth::disabled()).await;
    let mut c = server.client().await;
    create(&mut c, "q", 30_000).await;
    enqueue(&mut c, "q", &["held"]).await;
    lease(&mut c, "q", 1).await;
    let mut poller = server.client().await;
    let poll = tokio::spawn(async move {
        poller
            .lease(pb::LeaseRequest {
                queue: "q".into(),
                worker_id: "w2".into(),
                max_items: 1,
                lease_timeout_ms: 0,
                wait_ms: 60_000,
            })
            .await
    });
    // A worker session waiting for work, too.
    let (session_tx, session_rx) = tokio::sync::mpsc::channel::<pb::WorkRequest>(1);
    session_tx
        .send(pb::WorkRequest {
            queue: "q".into(),
            worker_id: "w3".into(),
            credit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut session = server
        .client()
        .await
        .work(tokio_stream::wrappers::ReceiverStream::new(session_rx))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("shutdown does not wait for the 60 s poll");
    // Neither is told that the wait ran out with nothing to lease: the coordinator
    // says it is going away, which workers retry.
    let err = poll.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("shutting down"), "{err:?}");
    let err = session.message().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("shutting down"), "{err:?}");
    drop(session_tx);
}

#[tokio::test]
async fn schedule_calls_map_their_errors_to_status_codes_and_need_the_token() {
    let server = Server::start(Auth::with_token("s3cret")).await;
    let mut anonymous = server.client().await;
    let err = anonymous
        .list_schedules(pb::ListSchedulesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut c = server.client_with(Some("s3cret")).await;
    create(&mut c, "q", 30_000).await;
    let request = |name: &str, cron: &str| pb::CreateScheduleRequest {
        name: name.into(),
        queue: "q".into(),
        cron: cron.into(),
        ..Default::default()
    };
    let created = c
        .create_schedule(request("s", "@hourly"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.time_zone, "UTC");
    assert_eq!(created.count, 1, "0 means one item");
    assert_eq!(
        created.concurrency_policy,
        pb::ConcurrencyPolicy::Allow as i32,
        "unset means Allow"
    );
    assert!(created.next_run_at_ms > created.created_at_ms);

    let refused = [
        (request("s", "@hourly"), Code::AlreadyExists),
        (request("t", "@never"), Code::InvalidArgument),
        (
            pb::CreateScheduleRequest {
                concurrency_policy: 9,
                ..request("t", "@hourly")
            },
            Code::InvalidArgument,
        ),
        (
            pb::CreateScheduleRequest {
                queue: "missing".into(),
                ..request("t", "@hourly")
            },
            Code::NotFound,
        ),
    ];
    for (request, code) in refused {
        let err = c.create_schedule(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{request:?}: {}", err.message());
    }
    for result in [
        c.delete_schedule(pb::DeleteScheduleRequest { name: "t".into() })
            .await
            .map(|_| ()),
        c.suspend_schedule(pb::SuspendScheduleRequest { name: "t".into() })
            .await
            .map(|_| ()),
        c.resume_schedule(pb::ResumeScheduleRequest { name: "t".into() })
            .await
            .map(|_| ()),
    ] {
        assert_eq!(result.unwrap_err().code(), Code::NotFound);
    }
    let listed = c
        .list_schedules(pb::ListSchedulesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .schedules;
    assert_eq!(listed.len(), 1, "refusals created nothing");
    let suspended = c
        .suspend_schedule(pb::SuspendScheduleRequest { name: "s".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(suspended.suspended);
    assert_eq!(suspended.next_run_at_ms, 0);
    c.delete_schedule(pb::DeleteScheduleRequest { name: "s".into() })
        .await
        .unwrap();
    server.stop().await;
}
