//! End to end: real `workq-coordinator` and `workq-worker` processes. The lease loop,
//! lease expiry and fencing, SIGTERM, reconnecting, and exit codes.

mod common;

use common::*;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_drain_sixty_exec_items_and_all_exit_0() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    create_queue(&mut client, "sixty", options(0, 0)).await;
    let payloads: Vec<String> = (0..60).map(|i| format!("item-{i}")).collect();
    let ids = enqueue(
        &mut client,
        "sixty",
        &payloads.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let script = sh(r#"read p; echo "$p done by $WORKQ_WORKER_ID""#);
    let mut workers: Vec<Worker> = (1..=3)
        .map(|n| {
            let args = cmd(&["--queue", "sixty", "--concurrency", "2"], script.clone());
            Worker::start(&coordinator.grpc_url, dir.path(), &format!("w{n}"), &args)
        })
        .collect();

    for worker in &mut workers {
        assert_eq!(
            worker.exit_code(SOON),
            Some(0),
            "{} log:\n{}",
            worker.id,
            worker.log()
        );
    }
    let stats = stats(&mut client, "sixty").await;
    assert_eq!(
        (stats.total_completed, stats.done, stats.dead),
        (60, 60, 0),
        "{stats:?}"
    );
    assert!(stats.drained);
    for (id, payload) in ids.iter().zip(&payloads) {
        let item = item(&mut client, "sixty", *id).await;
        let result = String::from_utf8(item.result.clone()).unwrap();
        assert!(
            result.starts_with(&format!("{payload} done by w")),
            "{item:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_item_is_completed_once_by_another_after_its_lease_expires() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    create_queue(&mut client, "crash", options(1_000, 5)).await;
    let id = enqueue(&mut client, "crash", &["slow"]).await[0];

    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pid");
    // The first delivery hangs (in its own process group, led by `sleep`); later
    // deliveries echo the payload.
    let script = sh(&format!(
        r#"if [ "$WORKQ_ATTEMPT" = 1 ]; then echo $$ > {}; exec sleep 600; fi; read p; echo "$p by $WORKQ_WORKER_ID""#,
        marker.display()
    ));
    let mut first = Worker::start(
        &coordinator.grpc_url,
        dir.path(),
        "first",
        &cmd(&["--queue", "crash"], script.clone()),
    );
    wait_for("the first worker to start the item", SOON, || {
        marker.exists() && std::fs::read_to_string(&marker).unwrap().ends_with('\n')
    });
    let orphan: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    first.signal(Signal::SIGKILL);
    assert_eq!(first.exit_code(SOON), None, "killed by a signal");
    // The item's command outlives a SIGKILLed worker; clean it up ourselves.
    let _ = killpg(Pid::from_raw(orphan), Signal::SIGKILL);

    let mut second = Worker::start(
        &coordinator.grpc_url,
        dir.path(),
        "second",
        &cmd(&["--queue", "crash"], script.clone()),
    );
    assert_eq!(second.exit_code(SOON), Some(0), "log:\n{}", second.log());

    let item = item(&mut client, "crash", id).await;
    assert_eq!(state(&item), pb::ItemState::Done);
    assert_eq!(item.result, b"slow by second\n");
    assert_eq!(item.attempts, 2, "the expired lease counted one attempt");
    let stats = stats(&mut client, "crash").await;
    assert_eq!(
        (stats.total_completed, stats.total_expired),
        (1, 1),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_past_its_lease_has_its_ack_refused_and_carries_on() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    create_queue(&mut client, "freeze", options(1_000, 5)).await;
    let frozen_id = enqueue(&mut client, "freeze", &["freeze"]).await[0];

    let dir = tempfile::tempdir().unwrap();
    // On its first delivery the item SIGSTOPs the worker running it ($PPID), so the
    // worker is frozen in the middle of the item, deterministically. kill(2) only
    // starts a group stop: until every thread of the worker has stopped, a running one
    // could still report the item done, so the item waits for that before finishing.
    let script = sh(concat!(
        r#"read p; if [ "$p" = freeze ] && [ "$WORKQ_ATTEMPT" = 1 ]; then kill -STOP $PPID; "#,
        r#"while grep -qv '^[^)]*) [Tt]' /proc/$PPID/task/*/stat; do sleep 0.01; done; fi; "#,
        r#"echo "$p by $WORKQ_WORKER_ID""#,
    ));
    let args = cmd(&["--queue", "freeze"], script.clone());
    let mut frozen = Worker::start(&coordinator.grpc_url, dir.path(), "frozen", &args);
    wait_for("the worker to be stopped", SOON, || {
        frozen.state() == Some('T')
    });

    // Its lease expires; another worker completes the item and, the queue drained, exits.
    let mut other = Worker::start(&coordinator.grpc_url, dir.path(), "other", &args);
    assert_eq!(other.exit_code(SOON), Some(0), "log:\n{}", other.log());
    let done = item(&mut client, "freeze", frozen_id).await;
    assert_eq!(state(&done), pb::ItemState::Done);
    assert_eq!(
        done.result,
        b"freeze by other\n",
        "frozen log:\n{}\nother log:\n{}",
        frozen.log(),
        other.log()
    );

    // More work arrives; the frozen worker wakes up with a stale lease.
    let next_id = enqueue(&mut client, "freeze", &["next"]).await[0];
    frozen.signal(Signal::SIGCONT);
    assert_eq!(frozen.exit_code(SOON), Some(0), "log:\n{}", frozen.log());
    let log = frozen.log();
    assert!(log.contains("ack refused: lease lost"), "log:\n{log}");

    let done = item(&mut client, "freeze", frozen_id).await;
    assert_eq!(
        done.result, b"freeze by other\n",
        "the stale ack changed nothing"
    );
    let next = item(&mut client, "freeze", next_id).await;
    assert_eq!(next.result, b"next by frozen\n", "the worker carried on");
    let stats = stats(&mut client, "freeze").await;
    assert_eq!(
        stats.total_completed, 2,
        "each item completed once: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_an_unfinished_item_without_counting_the_attempt_and_exits_143() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    create_queue(&mut client, "term", options(0, 0)).await;
    let id = enqueue(&mut client, "term", &["slow"]).await[0];

    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pid");
    let script = sh(&format!("echo $$ > {}; exec sleep 600", marker.display()));
    let args = cmd(&["--queue", "term", "--grace", "500ms"], script.clone());
    let mut worker = Worker::start(&coordinator.grpc_url, dir.path(), "w", &args);
    wait_for("the item to start", SOON, || {
        std::fs::read_to_string(&marker).is_ok_and(|s| s.ends_with('\n'))
    });
    let command_pid: u32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let leased = item(&mut client, "term", id).await;
    assert_eq!(
        (state(&leased), leased.attempts),
        (pb::ItemState::Leased, 1)
    );

    worker.signal(Signal::SIGTERM);
    assert_eq!(worker.exit_code(SOON), Some(143), "log:\n{}", worker.log());

    let released = item(&mut client, "term", id).await;
    assert_eq!(state(&released), pb::ItemState::Ready, "{released:?}");
    assert_eq!(released.attempts, 0, "release does not count the attempt");
    assert!(
        worker.log().contains("released unfinished"),
        "log:\n{}",
        worker.log()
    );
    wait_for("the item's command to be killed", SOON, || {
        is_dead(command_pid)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_item_finish_within_grace() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    create_queue(&mut client, "finish", options(0, 0)).await;
    let ids = enqueue(&mut client, "finish", &["a", "b"]).await;

    let dir = tempfile::tempdir().unwrap();
    let (started, go) = (dir.path().join("started"), dir.path().join("go"));
    let script = sh(&format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.05; done; echo finished",
        started.display(),
        go.display()
    ));
    let args = cmd(&["--queue", "finish", "--grace", "60s"], script.clone());
    let mut worker = Worker::start(&coordinator.grpc_url, dir.path(), "w", &args);
    wait_for("the first item to start", SOON, || started.exists());
    worker.signal(Signal::SIGTERM);
    worker.wait_for_log("SIGTERM received");
    std::fs::write(&go, b"").unwrap();
    assert_eq!(worker.exit_code(SOON), Some(143), "log:\n{}", worker.log());

    let first = item(&mut client, "finish", ids[0]).await;
    assert_eq!(
        (state(&first), first.result.as_slice()),
        (pb::ItemState::Done, &b"finished\n"[..])
    );
    let second = item(&mut client, "finish", ids[1]).await;
    assert_eq!(
        state(&second),
        pb::ItemState::Ready,
        "nothing new was leased after SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_the_coordinator_waits_connects_and_works() {
    let dir = tempfile::tempdir().unwrap();
    let port = unused_port();
    let server = format!("http://127.0.0.1:{port}");
    let args = cmd(&["--queue", "early", "--connect-timeout", "2m"], sh("cat"));
    let mut worker = Worker::start(&server, dir.path(), "early-bird", &args);
    worker.wait_for_log("waiting for the coordinator");

    // Now the coordinator comes up on the address the worker was given.
    let addr_file = dir.path().join("addr.json");
    let log = std::fs::File::create(dir.path().join("coordinator.log")).unwrap();
    let _coordinator = Process::spawn(
        std::process::Command::new(bin_path("workq-coordinator"))
            .args([
                "--grpc-addr",
                &format!("127.0.0.1:{port}"),
                "--http-addr",
                "127.0.0.1:0",
                "--in-memory",
            ])
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    );
    wait_for("the coordinator to listen", SOON, || addr_file.exists());
    let mut client = workq_tests::Client::connect(workq_tests::ConnectOptions::new(server.clone()))
        .await
        .unwrap();
    create_queue(&mut client, "early", options(0, 0)).await;
    let ids = enqueue(&mut client, "early", &["one", "two", "three"]).await;

    assert_eq!(worker.exit_code(SOON), Some(0), "log:\n{}", worker.log());
    for (id, payload) in ids.iter().zip(["one", "two", "three"]) {
        let item = item(&mut client, "early", *id).await;
        assert_eq!(item.result, payload.as_bytes(), "{item:?}");
    }
}

#[test]
fn a_worker_pointed_at_nothing_gives_up_after_connect_timeout_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let server = format!("http://127.0.0.1:{}", unused_port());
    let args = cmd(&["--queue", "q", "--connect-timeout", "1s"], sh("cat"));
    let mut worker = Worker::start(&server, dir.path(), "lonely", &args);
    assert_eq!(worker.exit_code(SOON), Some(1), "log:\n{}", worker.log());
    assert!(
        worker.log().contains("gave up after"),
        "log:\n{}",
        worker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_on_drained_waits_while_another_workers_lease_is_outstanding() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    create_queue(&mut client, "held", options(600_000, 5)).await;
    let id = enqueue(&mut client, "held", &["held"]).await[0];
    // Another worker (by hand) holds the only item.
    let lease = workq_tests::lease_one(&mut client, "held", "by-hand").await;

    let dir = tempfile::tempdir().unwrap();
    let script = sh(r#"read p; echo "$p by $WORKQ_WORKER_ID""#);
    let args = cmd(&["--queue", "held", "--exit-on", "drained"], script.clone());
    let mut worker = Worker::start(&coordinator.grpc_url, dir.path(), "patient", &args);
    // The coordinator has seen it ask for work (and answered "not drained")…
    wait_for_async("the worker's lease call", SOON, || {
        let mut client = client.clone();
        async move {
            let workers = client
                .list_workers(pb::ListWorkersRequest {
                    queue: "held".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .workers;
            workers.iter().any(|w| w.id == "patient")
        }
    })
    .await;
    assert!(
        worker.process.is_running(),
        "exited while a lease was outstanding:\n{}",
        worker.log()
    );

    // …and when the other worker gives the item back, this one does it and exits 0.
    client
        .release(pb::ReleaseRequest {
            queue: "held".into(),
            id,
            token: lease.token,
        })
        .await
        .unwrap();
    assert_eq!(worker.exit_code(SOON), Some(0), "log:\n{}", worker.log());
    let item = item(&mut client, "held", id).await;
    assert_eq!(item.result, b"held by patient\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_on_sealed_waits_for_the_producer_to_seal() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    create_queue(&mut client, "batch", options(0, 0)).await;
    let dir = tempfile::tempdir().unwrap();
    let args = cmd(&["--queue", "batch", "--exit-on", "sealed"], sh("cat"));
    let mut worker = Worker::start(&coordinator.grpc_url, dir.path(), "w", &args);

    let first = enqueue(&mut client, "batch", &["first"]).await[0];
    wait_for_state(&mut client, "batch", first, pb::ItemState::Done).await;
    assert!(
        worker.process.is_running(),
        "drained but not sealed: keep going\n{}",
        worker.log()
    );

    client
        .enqueue(pb::EnqueueRequest {
            queue: "batch".into(),
            items: vec![pb::NewItem {
                payload: b"last".to_vec().into(),
                ..Default::default()
            }],
            seal: true,
        })
        .await
        .unwrap();
    assert_eq!(worker.exit_code(SOON), Some(0), "log:\n{}", worker.log());
    assert_eq!(stats(&mut client, "batch").await.total_completed, 2);
}

/// A coordinator on a fixed 127.0.0.1 port (so it can come back on the same one),
/// with its data in `dir/data`.
fn coordinator_on(port: u16, dir: &std::path::Path) -> Process {
    let addr_file = dir.join("addr.json");
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("coordinator.log"))
        .unwrap();
    let process = Process::spawn(
        std::process::Command::new(bin_path("workq-coordinator"))
            .args(["--grpc-addr", &format!("127.0.0.1:{port}")])
            .args(["--http-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    );
    wait_for("the coordinator to listen", SOON, || addr_file.exists());
    process
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_rides_out_a_coordinator_restart_and_acks_its_surviving_lease() {
    let dir = tempfile::tempdir().unwrap();
    let port = unused_port();
    let server = format!("http://127.0.0.1:{port}");
    let mut coordinator = coordinator_on(port, dir.path());
    let mut client = Client::connect(workq_tests::ConnectOptions::new(server.clone()))
        .await
        .unwrap();
    // Extended every ~3 s, so the worker notices the outage while the lease has
    // plenty of time left.
    create_queue(&mut client, "restart", options(10_000, 5)).await;
    let id = enqueue(&mut client, "restart", &["survivor"]).await[0];

    let (started, go) = (dir.path().join("started"), dir.path().join("go"));
    let script = sh(&format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.05; done; cat",
        started.display(),
        go.display()
    ));
    let args = cmd(&["--queue", "restart", "--connect-timeout", "2m"], script);
    let mut worker = Worker::start(&server, dir.path(), "w", &args);
    wait_for("the item to start", SOON, || started.exists());

    // kill -9 the coordinator mid-item, bring it back on the same address and data.
    coordinator.signal(nix::sys::signal::Signal::SIGKILL);
    coordinator.wait_exit(SOON);
    worker.wait_for_log("could not extend the lease on item");
    let _coordinator = coordinator_on(port, dir.path());
    std::fs::write(&go, b"").unwrap();

    assert_eq!(worker.exit_code(SOON), Some(0), "log:\n{}", worker.log());
    let mut client = Client::connect(workq_tests::ConnectOptions::new(server))
        .await
        .unwrap();
    let item = item(&mut client, "restart", id).await;
    assert_eq!(state(&item), pb::ItemState::Done, "{item:?}");
    assert_eq!(
        (item.result.as_slice(), item.attempts),
        (&b"survivor"[..], 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_right_token_exits_1_and_with_it_works() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let coordinator = Coordinator::start_with(&["--token-file", token_file.to_str().unwrap()]);
    let mut client = coordinator.client_with_token("s3cret").await;
    create_queue(&mut client, "secure", options(0, 0)).await;
    let id = enqueue(&mut client, "secure", &["payload"]).await[0];

    let mut refused = Worker::start(
        &coordinator.grpc_url,
        dir.path(),
        "no-token",
        &cmd(&["--queue", "secure"], sh("cat")),
    );
    assert_eq!(refused.exit_code(SOON), Some(1), "log:\n{}", refused.log());
    assert!(
        refused.log().contains("token"),
        "says why:\n{}",
        refused.log()
    );

    let mut worker = Worker::start(
        &coordinator.grpc_url,
        dir.path(),
        "with-token",
        &cmd(&["--queue", "secure", "--token", "s3cret"], sh("cat")),
    );
    assert_eq!(worker.exit_code(SOON), Some(0), "log:\n{}", worker.log());
    assert_eq!(item(&mut client, "secure", id).await.result, b"payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_n_runs_n_items_at_once() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    create_queue(&mut client, "wide", options(0, 0)).await;
    enqueue(&mut client, "wide", &["a", "b", "c"]).await;
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    std::fs::create_dir(&gate).unwrap();
    // Each item waits until all three are running: only possible with 3 at once.
    let script = sh(&format!(
        "touch {gate}/$WORKQ_ITEM_ID; while [ $(ls {gate} | wc -l) -lt 3 ]; do sleep 0.05; done; echo together",
        gate = gate.display()
    ));
    let args = cmd(&["--queue", "wide", "--concurrency", "3"], script);
    let mut worker = Worker::start(&coordinator.grpc_url, dir.path(), "w", &args);
    assert_eq!(worker.exit_code(SOON), Some(0), "log:\n{}", worker.log());
    let stats = stats(&mut client, "wide").await;
    assert_eq!((stats.total_completed, stats.total_deliveries), (3, 3));
}

/// SIGTERM while lease calls are in flight, over and over: a call the coordinator had
/// already granted is not dropped (which left its items leased to a worker that
/// never ran them, until their lease ran out and counted an attempt); what it brings
/// is released unrun. After every exit nothing is leased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_lease_call_leaves_nothing_leased() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<String> = (0..2000).map(|i| format!("item-{i}")).collect();
    let payloads: Vec<&str> = payloads.iter().map(String::as_str).collect();
    for round in 0..6u64 {
        let queue = format!("busy{round}");
        // A lease of an hour: an item left leased would stay so for the whole test.
        create_queue(&mut client, &queue, options(3_600_000, 0)).await;
        enqueue(&mut client, &queue, &payloads).await;
        let args = cmd(
            &["--queue", &queue, "--concurrency", "4"],
            vec!["exec".into(), "--".into(), "true".into()],
        );
        let mut worker = Worker::start(
            &coordinator.grpc_url,
            dir.path(),
            &format!("w{round}"),
            &args,
        );
        wait_for_async("the worker to ack items", SOON, || {
            let mut client = client.clone();
            let queue = queue.clone();
            async move { stats(&mut client, &queue).await.total_completed > 0 }
        })
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(50 * round)).await;
        worker.signal(Signal::SIGTERM);
        assert_eq!(worker.exit_code(SOON), Some(143), "log:\n{}", worker.log());
        let stats = stats(&mut client, &queue).await;
        assert_eq!(
            stats.leased,
            0,
            "round {round}: {stats:?}\n{}",
            worker.log()
        );
        assert!(stats.ready > 0, "round {round}: the worker ran them all");
    }
}

/// An item that finishes within grace while the coordinator is gone: its ack rides out
/// the outage until grace is over, and then only a little longer, so the worker exits
/// 143 before the pod would be killed, not after `--connect-timeout` (5 minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_during_an_outage_gives_up_soon_after_grace() {
    let mut coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    create_queue(&mut client, "late", options(0, 0)).await;
    enqueue(&mut client, "late", &["x"]).await;
    let dir = tempfile::tempdir().unwrap();

    let (started, go) = (dir.path().join("started"), dir.path().join("go"));
    let script = sh(&format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.05; done; echo done",
        started.display(),
        go.display()
    ));
    let args = cmd(
        &[
            "--queue",
            "late",
            "--grace",
            "2s",
            "--connect-timeout",
            "5m",
        ],
        script,
    );
    let mut worker = Worker::start(&coordinator.grpc_url, dir.path(), "w", &args);
    wait_for("the item to start", SOON, || started.exists());
    coordinator.kill9();
    worker.signal(Signal::SIGTERM);
    worker.wait_for_log("SIGTERM received");
    std::fs::write(&go, b"").unwrap();
    worker.wait_for_log("ack item");
    assert_eq!(worker.exit_code(SOON), Some(143), "log:\n{}", worker.log());
    assert!(
        worker.log().contains("ack failed, out of time"),
        "log:\n{}",
        worker.log()
    );
}
