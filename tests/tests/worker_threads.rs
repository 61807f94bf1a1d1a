//! `--worker-threads`: the coordinator serves with exactly the runtime threads it was
//! given, and refuses a count it cannot use before it touches anything.

use std::process::Command;

use workq_tests::{Coordinator, bin_path, create_queue, enqueue_empty, lease_one, pb};

/// The runtime's worker threads of process `pid` (tokio names them so; blocking-pool
/// threads share the name, but an idle coordinator has none).
fn runtime_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the coordinator's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "tokio-rt-worker")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_with_the_worker_threads_it_was_given() {
    // Five: more than the CPUs of a CI machine, so a flag that did nothing shows.
    let coordinator = Coordinator::start_with(&["--durability", "strict", "--worker-threads", "5"]);
    assert_eq!(runtime_threads(coordinator.pid()), 5);

    let mut client = coordinator.client().await;
    create_queue(&mut client, "threads", 60_000).await;
    let id = enqueue_empty(&mut client, "threads").await;
    let lease = lease_one(&mut client, "threads", "w").await;
    assert_eq!(lease.id, id);
    client
        .ack(pb::AckRequest {
            queue: "threads".into(),
            id,
            token: lease.token,
            ..Default::default()
        })
        .await
        .expect("ack");
}

#[test]
fn refuses_zero_worker_threads_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let output = Command::new(bin_path("workq-coordinator"))
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--worker-threads", "0"])
        .output()
        .expect("run workq-coordinator");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--worker-threads"), "{stderr}");
    assert!(!data.exists(), "a refused start created its data dir");
}
