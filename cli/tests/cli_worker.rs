//! The worker protocol by hand (`lease`, `ack`, `fail`, `extend`, `release`), the
//! commands that follow it (`results`, `requeue`, `workers`, `watch`), and a bash
//! worker loop that drains a queue with nothing but `queue-cli` and `jq`.

mod cli_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cli_support::{Env, parse_table};
use serde_json::Value;
use workq_tests::{Process, bin_path};

fn token(lease: &Value) -> String {
    lease["token"]
        .as_str()
        .expect("token is a string")
        .to_string()
}

fn id(lease: &Value) -> String {
    lease["id"].as_u64().expect("id is a number").to_string()
}

#[test]
fn lease_json_carries_id_token_attempt_and_payload_then_ack_keeps_the_result() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    env.ok(&["enqueue", "q", "work-item-0"]);

    let response = env.json(&["lease", "q", "--worker-id", "pod-a"]);
    assert_eq!(response["drained"], false);
    let lease = &response["leases"][0];
    assert_eq!(lease["attempt"], 1);
    assert_eq!(lease["payload"], "work-item-0");
    assert!(
        token(lease).parse::<u64>().is_ok(),
        "token is a decimal string: {lease}"
    );
    assert!(lease["deadline_at_ms"].as_u64().expect("deadline") > 0);

    let acked = env.json(&[
        "ack",
        "q",
        &id(lease),
        &token(lease),
        "--result",
        "SHA256:abc",
    ]);
    assert_eq!(acked["state"], "done");

    let results = env.json(&["results", "q"]);
    assert_eq!(results["results"][0]["id"], lease["id"]);
    assert_eq!(results["results"][0]["payload"], "work-item-0");
    assert_eq!(results["results"][0]["result"], "SHA256:abc");
    let rows = parse_table(&env.ok(&["results", "q"]));
    assert_eq!(rows[0], ["ID", "DONE", "PAYLOAD", "RESULT"]);
    assert_eq!(rows[1][2], "work-item-0");
    assert_eq!(rows[1][3], "SHA256:abc");

    // A result need not be UTF-8: an argument's bytes are kept as they are.
    env.ok(&["enqueue", "q", "binary"]);
    let lease = env.lease_one("q");
    let output = env
        .cli()
        .args(["ack", "q", &id(&lease), &token(&lease), "--result"])
        .arg(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff\xfeok"))
        .output()
        .expect("run");
    assert!(output.status.success(), "{output:?}");
    let item = env.json(&["item", "q", &id(&lease)]);
    assert_eq!(item["result"], Value::Null);
    assert_eq!(item["result_base64"], "//5vaw==");

    // Drained: lease returns at once and says so.
    let empty = env.json(&["lease", "q", "--wait", "30s"]);
    assert_eq!(empty["drained"], true);
    assert_eq!(empty["leases"], serde_json::json!([]));
    let table = env.cli().args(["lease", "q"]).output().expect("run");
    assert!(table.status.success());
    assert!(table.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&table.stderr).trim(),
        "no items: queue 'q' is drained"
    );
}

#[test]
fn lease_table_and_max_lease_several_items() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    env.ok(&["enqueue", "q", "--count", "5", "--payload", "p{i}"]);
    let rows = parse_table(&env.ok(&["lease", "q", "--max", "3", "--lease-timeout", "10m"]));
    assert_eq!(rows[0], ["ID", "TOKEN", "ATTEMPT", "EXPIRES", "PAYLOAD"]);
    assert_eq!(rows.len(), 4, "three leases: {rows:?}");
    let payloads: Vec<&str> = rows[1..].iter().map(|r| r[4].as_str()).collect();
    assert_eq!(payloads, ["p0", "p1", "p2"]);
    assert!(
        rows[1][3].starts_with("in "),
        "expires in the future: {rows:?}"
    );
    assert_eq!(env.stats("q")["leased"], 3);
}

#[test]
fn fail_retries_then_goes_dead_and_requeue_brings_it_back() {
    let env = Env::start();
    env.ok(&[
        "create",
        "q",
        "--max-attempts",
        "5",
        "--backoff-base",
        "1ms",
        "--backoff-cap",
        "1ms",
    ]);
    env.ok(&["enqueue", "q", "flaky"]);

    let first = env.lease_one("q");
    let failed = env.json(&[
        "fail",
        "q",
        &id(&first),
        &token(&first),
        "--error",
        "disk full",
    ]);
    assert!(
        failed["state"] == "delayed" || failed["state"] == "ready",
        "a retryable failure goes back to the queue: {failed}"
    );
    let item = env.json(&["item", "q", &id(&first)]);
    assert_eq!(item["last_error"], "disk full");

    let second = env.lease_one("q");
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["attempt"], 2);
    let out = env.ok(&[
        "fail",
        "q",
        &id(&second),
        &token(&second),
        "--permanent",
        "--error",
        "bad input",
    ]);
    assert_eq!(out.trim(), format!("item {} is dead", id(&second)));
    assert_eq!(env.stats("q")["dead"], 1);

    let dead = env.json(&["items", "q", "--state", "dead"]);
    assert_eq!(dead["items"][0]["id"], first["id"]);
    assert_eq!(dead["items"][0]["last_error"], "bad input");

    assert_eq!(
        env.ok(&["requeue", "q", "--dead"]).trim(),
        "requeued 1 item in queue 'q'"
    );
    let again = env.lease_one("q");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["attempt"], 1, "requeue resets attempts");
    env.ok(&["fail", "q", &id(&again), &token(&again), "--permanent"]);
    let by_id = env.json(&["requeue", "q", &id(&again)]);
    assert_eq!(by_id["requeued"], 1);
    assert_eq!(env.stats("q")["ready"], 1);
}

#[test]
fn fail_with_delay_schedules_the_retry() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    env.ok(&["enqueue", "q", "later"]);
    let lease = env.lease_one("q");
    let failed = env.json(&["fail", "q", &id(&lease), &token(&lease), "--delay", "1h"]);
    assert_eq!(failed["state"], "delayed");
    let retry_at = failed["retry_at_ms"].as_u64().expect("retry_at_ms");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(
        retry_at > now + 30 * 60 * 1000,
        "retry about an hour from now: {failed}"
    );
    assert_eq!(env.stats("q")["delayed"], 1);
}

#[test]
fn extend_and_release_need_the_current_token() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    env.ok(&["enqueue", "q", "long-job"]);

    let lease = env.lease_one("q");
    let before = lease["deadline_at_ms"].as_u64().expect("deadline");
    let extended = env.json(&[
        "extend",
        "q",
        &id(&lease),
        &token(&lease),
        "--lease-timeout",
        "2h",
    ]);
    assert!(extended["deadline_at_ms"].as_u64().expect("deadline") > before);
    let out = env.ok(&["extend", "q", &id(&lease), &token(&lease)]);
    assert!(
        out.starts_with(&format!(
            "lease on item {} extended: expires in ",
            id(&lease)
        )),
        "{out}"
    );

    let released = env.ok(&["release", "q", &id(&lease), &token(&lease)]);
    assert_eq!(
        released.trim(),
        format!("item {} released (attempt not counted)", id(&lease))
    );
    assert_eq!(env.stats("q")["ready"], 1);

    // The old token is stale now: every call with it is refused.
    for verb in ["ack", "extend", "release", "fail"] {
        let error = env.fails(&[verb, "q", &id(&lease), &token(&lease)], 1);
        assert!(error.starts_with("error: lease lost"), "{verb}: {error}");
    }

    let again = env.lease_one("q");
    assert_eq!(again["attempt"], 1, "release does not count the attempt");
    assert_ne!(token(&again), token(&lease));
    env.ok(&["ack", "q", &id(&again), &token(&again)]);
    assert_eq!(env.stats("q")["done"], 1);
}

#[test]
fn workers_lists_who_leased() {
    let env = Env::start();
    env.ok(&["create", "a"]);
    env.ok(&["create", "b"]);
    env.ok(&["enqueue", "a", "x", "y"]);
    env.ok(&["enqueue", "b", "z"]);
    let lease = &env.json(&["lease", "a", "--worker-id", "pod-1"])["leases"][0];
    env.ok(&["ack", "a", &id(lease), &token(lease)]);
    env.json(&["lease", "a", "--worker-id", "pod-1"]);
    env.json(&["lease", "b", "--worker-id", "pod-2"]);

    let all = env.json(&["workers"]);
    let workers = all["workers"].as_array().expect("workers");
    let pod1 = workers
        .iter()
        .find(|w| w["id"] == "pod-1" && w["queue"] == "a")
        .unwrap_or_else(|| panic!("pod-1 on a: {all}"));
    assert_eq!(pod1["in_flight"], 1);
    assert_eq!(pod1["completed"], 1);
    assert!(
        workers
            .iter()
            .any(|w| w["id"] == "pod-2" && w["queue"] == "b"),
        "{all}"
    );

    let rows = parse_table(&env.ok(&["workers", "b"]));
    assert_eq!(
        rows[0],
        ["WORKER", "QUEUE", "IN-FLIGHT", "COMPLETED", "LAST-SEEN"]
    );
    assert_eq!(rows.len(), 2, "only queue b's worker: {rows:?}");
    assert_eq!(rows[1][0], "pod-2");
    assert_eq!(rows[1][2], "1");
}

/// A bash worker built from `lease -o json` and `ack`, as the README shows it.
const SHELL_WORKER: &str = r#"
set -euo pipefail
while :; do
  lease=$(queue-cli lease "$QUEUE" -o json --wait 10s --worker-id "$WORKER")
  item=$(jq -c '.leases[0] // empty' <<<"$lease")
  if [ -z "$item" ]; then
    if [ "$(jq .drained <<<"$lease")" = true ]; then break; fi
    continue
  fi
  id=$(jq -r .id <<<"$item")
  token=$(jq -r .token <<<"$item")
  payload=$(jq -r .payload <<<"$item")
  queue-cli ack "$QUEUE" "$id" "$token" --result "done:$payload" >/dev/null
done
"#;

#[test]
fn a_shell_worker_loop_drains_the_queue() {
    assert!(
        Command::new("jq")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "this test needs jq on PATH (the README's shell worker uses it)"
    );
    let env = Env::start();
    env.ok(&["create", "jobs"]);
    env.ok(&[
        "enqueue",
        "jobs",
        "--count",
        "30",
        "--payload",
        "item-{i}",
        "--seal",
    ]);

    let cli_dir = bin_path("queue-cli")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        cli_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut workers: Vec<Process> = ["sh-1", "sh-2"]
        .iter()
        .map(|name| {
            Process::spawn(
                Command::new("bash")
                    .arg("-c")
                    .arg(SHELL_WORKER)
                    .env("PATH", &path)
                    .env("WORKQ_SERVER", env.url())
                    .env("QUEUE", "jobs")
                    .env("WORKER", name)
                    .stdin(Stdio::null()),
            )
        })
        .collect();
    for worker in &mut workers {
        assert_eq!(worker.wait_exit(Duration::from_secs(120)), Some(0));
    }

    let stats = env.stats("jobs");
    assert_eq!(stats["drained"], true);
    assert_eq!(stats["done"], 30);
    assert_eq!(stats["total_completed"], 30);
    let results = env.json(&["results", "jobs"]);
    let mut seen: Vec<String> = results["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            assert_eq!(
                r["result"],
                format!("done:{}", r["payload"].as_str().expect("payload"))
            );
            r["payload"].as_str().expect("payload").to_string()
        })
        .collect();
    seen.sort();
    let mut expected: Vec<String> = (0..30).map(|i| format!("item-{i}")).collect();
    expected.sort();
    assert_eq!(seen, expected, "every item completed exactly once");
}

/// Spawns `queue-cli ARGS` with stdout and stderr piped; stdout's lines arrive on
/// the channel, stderr is read once it exits.
fn spawn_cli(env: &Env, args: &[&str]) -> (Process, mpsc::Receiver<String>) {
    let mut process = Process::spawn(
        Command::new(bin_path("queue-cli"))
            .args(args)
            .env("WORKQ_SERVER", env.url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let stdout = process.child.stdout.take().expect("piped stdout");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    (process, lines)
}

fn next_line(lines: &mpsc::Receiver<String>) -> String {
    lines
        .recv_timeout(Duration::from_secs(30))
        .expect("a line from queue-cli within 30s")
}

#[test]
fn watch_follows_the_queue_until_it_is_drained() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    env.ok(&["enqueue", "q", "--count", "3", "--payload", "w{i}"]);

    let (mut watch, lines) = spawn_cli(&env, &["-o", "json", "watch", "q"]);
    let first: Value = serde_json::from_str(&next_line(&lines)).expect("json line");
    assert_eq!(first["ready"], 3);
    assert_eq!(first["drained"], false);

    for _ in 0..3 {
        let lease = env.lease_one("q");
        env.ok(&["ack", "q", &id(&lease), &token(&lease)]);
    }
    assert_eq!(watch.wait_exit(Duration::from_secs(30)), Some(0));
    let mut last = first;
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        last = serde_json::from_str(&line).expect("json line");
    }
    assert_eq!(last["drained"], true);
    assert_eq!(last["done"], 3);
}

#[test]
fn watch_until_sealed_waits_for_the_seal() {
    let env = Env::start();
    env.ok(&["create", "q"]);

    let (mut watch, lines) = spawn_cli(&env, &["-o", "json", "watch", "q", "--until", "sealed"]);
    let first: Value = serde_json::from_str(&next_line(&lines)).expect("json line");
    assert_eq!(first["drained"], true, "an empty queue is drained");
    assert_eq!(first["sealed"], false);
    assert!(
        watch.is_running(),
        "drained but not sealed: watch keeps going"
    );

    env.ok(&["seal", "q"]);
    assert_eq!(watch.wait_exit(Duration::from_secs(30)), Some(0));
    let mut last = first;
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        last = serde_json::from_str(&line).expect("json line");
    }
    assert_eq!(last["sealed"], true);
}

#[test]
fn watch_without_a_terminal_prints_a_summary() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    env.ok(&["enqueue", "q", "only"]);
    let lease = env.lease_one("q");
    env.ok(&["fail", "q", &id(&lease), &token(&lease), "--permanent"]);

    let out = env.ok(&["watch", "q"]);
    assert_eq!(
        out.trim().lines().last(),
        Some("queue 'q' drained: 0 done, 1 dead")
    );

    let error = env.fails(
        &["watch", "q", "--until", "sealed", "--timeout", "200ms"],
        1,
    );
    assert!(error.contains("timed out"), "{error}");
    assert!(error.contains("drained and sealed"), "{error}");
}

/// `watch` follows a queue through coordinator restarts: a SIGTERM, whose shutdown
/// ends the stream, and a kill -9, which cuts it. It opens the stream again once the
/// coordinator is back and exits 0 when the queue drains; with a --timeout shorter
/// than the outage it gives up with the last failure.
#[test]
fn watch_waits_out_a_coordinator_restart() {
    let mut env = Env::start_on_disk();
    env.ok(&["create", "q"]);
    env.ok(&["enqueue", "q", "a", "b"]);
    let (mut watch, lines) = spawn_cli(&env, &["-o", "json", "watch", "q", "--timeout", "2m"]);
    let ready = |line: String| -> u64 {
        let stats: Value = serde_json::from_str(&line).expect("json line");
        stats["ready"].as_u64().expect("ready")
    };
    assert_eq!(ready(next_line(&lines)), 2);

    assert_eq!(env.coordinator.stop(), Some(0));
    env.coordinator.restart_on_same_ports();
    assert_eq!(
        ready(next_line(&lines)),
        2,
        "a fresh stream after the restart"
    );
    let lease = env.lease_one("q");
    env.ok(&["ack", "q", &id(&lease), &token(&lease)]);
    while ready(next_line(&lines)) != 1 {}
    env.coordinator.kill9();
    env.coordinator.restart_on_same_ports();
    assert_eq!(ready(next_line(&lines)), 1, "a fresh stream after kill -9");
    assert!(watch.is_running(), "not drained yet");

    let lease = env.lease_one("q");
    env.ok(&["ack", "q", &id(&lease), &token(&lease)]);
    assert_eq!(watch.wait_exit(Duration::from_secs(30)), Some(0));
    let mut stderr = String::new();
    let mut pipe = watch.child.stderr.take().expect("piped stderr");
    std::io::Read::read_to_string(&mut pipe, &mut stderr).expect("stderr");
    assert!(
        stderr.contains("went away; waiting for it for up to"),
        "{stderr}"
    );

    // A coordinator that stays away longer than --timeout: the last failure.
    env.coordinator.kill9();
    let error = env.fails(&["watch", "q", "--timeout", "1s"], 1);
    assert!(error.contains("cannot reach coordinator"), "{error}");
}

/// A `lease --wait` outlasts coordinator restarts within its wait: a SIGTERM, whose
/// shutdown ends the long poll early with nothing, and a kill -9, which cuts it.
/// It polls again once the coordinator is back and gets the item when it is due.
#[test]
fn lease_wait_waits_out_a_coordinator_restart() {
    let mut env = Env::start_on_disk();
    env.ok(&["create", "q"]);
    env.ok(&["enqueue", "q", "later", "--delay", "6s", "--seal"]);
    let mut lease = Process::spawn(
        Command::new(bin_path("queue-cli"))
            .args(["lease", "q", "-o", "json", "--wait", "40s"])
            .args(["--worker-id", "waiter"])
            .env("WORKQ_SERVER", env.url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let waiting = |env: &Env| {
        workq_tests::wait_for("the lease call to wait", Duration::from_secs(20), || {
            env.json(&["workers", "q"])["workers"]
                .as_array()
                .is_some_and(|workers| workers.iter().any(|w| w["id"] == "waiter"))
        });
    };
    waiting(&env);
    assert_eq!(env.coordinator.stop(), Some(0));
    env.coordinator.restart_on_same_ports();
    waiting(&env);
    env.coordinator.kill9();
    env.coordinator.restart_on_same_ports();

    assert_eq!(lease.wait_exit(Duration::from_secs(60)), Some(0));
    let (stdout, stderr) = lease.take_output();
    let response: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(response["leases"][0]["payload"], "later", "{response}");
    assert!(stderr.contains("went away during the wait"), "{stderr}");
    assert!(!stderr.contains("https://"), "{stderr}");
}
