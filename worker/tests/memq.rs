//! End to end: `workq-worker` as a drop-in for kuard's memq keygen consumer, against
//! the coordinator's kuard-compatible HTTP face.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use nix::sys::signal::Signal;

/// One plain HTTP/1.1 request, as `curl -X METHOD URL -d BODY` sends it; returns the
/// status code and body.
fn http(method: &str, url: &str, body: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("http:// url");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = TcpStream::connect(authority).expect("connect to the HTTP face");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: \
         application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// What the book's `load-queue.sh` does: create `keygen`, enqueue `work-item-N` items.
fn load_queue(memq: &str, items: usize) {
    assert_eq!(http("PUT", &format!("{memq}/queues/keygen"), "").0, 200);
    for i in 0..items {
        let (status, body) = http(
            "POST",
            &format!("{memq}/queues/keygen/enqueue"),
            &format!("work-item-{i}"),
        );
        assert_eq!(status, 200, "{body}");
    }
}

fn memq_worker(memq: &str, dir: &std::path::Path, id: &str, queue: &str, extra: &[&str]) -> Worker {
    // The book's consumer Job arguments, plus a small key size for the test.
    let mut args: Vec<String> = vec![
        "--keygen-enable".into(),
        format!("--keygen-memq-server={memq}"),
        "--keygen-memq-queue".into(),
        queue.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["keygen", "--bits", "1024"].map(String::from));
    // `--server` is ignored in memq mode; Worker::start always passes one.
    Worker::start("http://127.0.0.1:1", dir, id, &args)
}

#[test]
fn kuard_memq_consumers_drain_a_queue_filled_over_http_and_exit_with_the_exit_code() {
    let coordinator = Coordinator::start_with(&["--in-memory"]);
    let memq = format!("{}/memq/server", coordinator.http_url);
    load_queue(&memq, 12);

    let dir = tempfile::tempdir().unwrap();
    let mut workers: Vec<Worker> = (1..=2)
        .map(|n| {
            memq_worker(
                &memq,
                dir.path(),
                &format!("consumer-{n}"),
                "keygen",
                &["--keygen-exit-on-complete", "--keygen-exit-code=0"],
            )
        })
        .collect();
    let mut keys = 0;
    for worker in &mut workers {
        assert_eq!(worker.exit_code(SOON), Some(0), "log:\n{}", worker.log());
        let log = worker.log();
        assert!(log.contains("MemQ Worker starting"), "{log}");
        keys += log.matches("Item done: SHA256:").count();
    }
    assert_eq!(keys, 12, "one key per item");

    let (status, stats) = http("GET", &format!("{memq}/stats"), "");
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let queue = &stats["queues"][0];
    assert_eq!(
        (
            queue["name"].as_str(),
            queue["depth"].as_i64(),
            queue["dequeued"].as_i64()
        ),
        (Some("keygen"), Some(0), Some(12)),
        "{stats}"
    );
}

#[test]
fn without_exit_on_complete_an_empty_queue_is_polled_until_sigterm() {
    let coordinator = Coordinator::start_with(&["--in-memory"]);
    let memq = format!("{}/memq/server", coordinator.http_url);
    load_queue(&memq, 1);
    let dir = tempfile::tempdir().unwrap();
    let mut worker = memq_worker(&memq, dir.path(), "poller", "keygen", &[]);
    worker.wait_for_log("Item done: SHA256:");
    worker.wait_for_log("Queue is empty. Retrying after 1s.");
    // More work arrives later and is picked up.
    assert_eq!(
        http("POST", &format!("{memq}/queues/keygen/enqueue"), "late").0,
        200
    );
    wait_for("the late item", SOON, || {
        worker.log().matches("Item done: SHA256:").count() == 2
    });
    worker.signal(Signal::SIGTERM);
    assert_eq!(worker.exit_code(SOON), Some(143));
}

#[test]
fn a_missing_queue_is_retried_forever_like_kuard_even_with_exit_on_complete() {
    let coordinator = Coordinator::start_with(&["--in-memory"]);
    let memq = format!("{}/memq/server", coordinator.http_url);
    let dir = tempfile::tempdir().unwrap();
    let mut worker = memq_worker(
        &memq,
        dir.path(),
        "early",
        "nowhere",
        &["--keygen-exit-on-complete"],
    );
    let line = "Error talking to server: HTTP Error: 400 Bad Request. Retrying after 1s.";
    wait_for("two retries", SOON, || {
        worker.log().matches(line).count() >= 2
    });
    assert!(worker.process.is_running(), "{}", worker.log());
    worker.signal(Signal::SIGTERM);
    assert_eq!(worker.exit_code(SOON), Some(143));
}
