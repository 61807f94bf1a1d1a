//! End to end: a real coordinator, 30 items, and `queue-cli job run` running three
//! `workq-worker` pods in work-queue mode. The Job must complete (the workers exit 0
//! only once the queue is drained) with every item done exactly once.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use workq_tests::pb;
use workq_tests::{Coordinator, Process, bin_path, queue_stats};

const ITEMS: usize = 30;

#[tokio::test(flavor = "multi_thread")]
async fn work_queue_job_of_three_workers_does_every_item_once() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    client
        .create_queue(pb::CreateQueueRequest {
            queue: "q".into(),
            ..Default::default()
        })
        .await
        .expect("create queue");
    let payloads: Vec<String> = (0..ITEMS).map(|i| format!("item-{i}")).collect();
    client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: payloads
                .iter()
                .map(|p| pb::NewItem {
                    payload: p.clone().into_bytes().into(),
                    ..Default::default()
                })
                .collect(),
            seal: true,
        })
        .await
        .expect("enqueue");

    let dir = tempfile::tempdir().unwrap();
    let worker = bin_path("workq-worker");
    let mut job = Process::spawn(
        Command::new(bin_path("queue-cli"))
            .args(["job", "run", "consumers", "--parallelism", "3"])
            .arg("--logs-dir")
            .arg(dir.path().join("logs"))
            .arg("--")
            .arg(&worker)
            .args(["--server", &coordinator.grpc_url, "--queue", "q"])
            .args(["exec", "--", "cat"])
            .env_remove("WORKQ_TOKEN")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap()),
    );
    let code = tokio::task::spawn_blocking(move || job.wait_exit(Duration::from_secs(120)))
        .await
        .unwrap();
    let stdout = std::fs::read_to_string(dir.path().join("stdout")).unwrap();
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("consumers "))
        .expect("summary row");
    assert!(summary.contains("Complete"), "{summary}");
    assert!(stdout.contains("3 created"), "3 worker pods:\n{stdout}");

    let stats = queue_stats(&mut client, "q").await;
    assert!(stats.drained);
    assert_eq!(stats.done as usize, ITEMS);
    assert_eq!(
        stats.total_completed as usize, ITEMS,
        "each item completed once"
    );
    assert_eq!((stats.dead, stats.total_failed), (0, 0));

    let done = client
        .list_items(pb::ListItemsRequest {
            queue: "q".into(),
            state: pb::ItemState::Done as i32,
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    let results: BTreeSet<String> = done
        .iter()
        .map(|item| String::from_utf8(item.result.clone()).unwrap())
        .collect();
    let expected: BTreeSet<String> = payloads.into_iter().collect();
    assert_eq!(results, expected, "cat's output is each item's result");
}
