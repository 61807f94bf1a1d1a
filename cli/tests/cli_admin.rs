//! Queue administration and enqueueing through `queue-cli`, against a real
//! coordinator: create/list/stats/delete, purge, seal/unseal, enqueue from every
//! source, dedup counts, items and item.

mod cli_support;

use cli_support::{Env, parse_table};
use serde_json::Value;

fn payloads(items: &Value) -> Vec<String> {
    items["items"]
        .as_array()
        .expect("items array")
        .iter()
        .map(|item| item["payload"].as_str().expect("utf-8 payload").to_string())
        .collect()
}

#[test]
fn create_with_options_then_stats_list_and_delete() {
    let env = Env::start();
    let out = env.ok(&[
        "create",
        "keygen",
        "--lease-timeout",
        "5m",
        "--max-attempts",
        "3",
        "--backoff-base",
        "2s",
        "--backoff-cap",
        "1m",
        "--max-payload",
        "4096",
        "--max-depth",
        "500",
        "--retention",
        "2h",
    ]);
    assert_eq!(out.trim(), "queue 'keygen' created");

    let info = env.json(&["stats", "keygen"]);
    assert_eq!(info["name"], "keygen");
    let options = &info["options"];
    assert_eq!(options["lease_timeout_ms"], 300_000);
    assert_eq!(options["max_attempts"], 3);
    assert_eq!(options["backoff_base_ms"], 2_000);
    assert_eq!(options["backoff_cap_ms"], 60_000);
    assert_eq!(options["max_payload_bytes"], 4096);
    assert_eq!(options["max_depth"], 500);
    assert_eq!(options["retention_ms"], 7_200_000);
    assert_eq!(info["stats"]["drained"], true);
    assert_eq!(info["stats"]["sealed"], false);

    // The table view names the options in words.
    let table = env.ok(&["stats", "keygen"]);
    assert!(table.contains("Lease timeout:"), "{table}");
    assert!(table.contains("Max attempts:"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("Max depth:") && l.ends_with("500")),
        "{table}"
    );

    env.ok(&["create", "other"]);
    env.ok(&["enqueue", "other", "a", "b"]);
    let rows = parse_table(&env.ok(&["list"]));
    assert_eq!(
        rows[0],
        [
            "NAME", "READY", "DELAYED", "LEASED", "DONE", "DEAD", "SEALED", "DRAINED", "RATE",
            "ETA", "WORKERS"
        ]
    );
    assert_eq!(rows[1][0], "keygen");
    assert_eq!(rows[2][0], "other");
    assert_eq!(rows[2][1], "2", "READY of 'other': {rows:?}");
    assert_eq!(rows[2][7], "no", "DRAINED of 'other': {rows:?}");
    assert_eq!(rows[1][7], "yes", "DRAINED of 'keygen': {rows:?}");

    let listed = env.json(&["list"]);
    let names: Vec<&str> = listed["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .map(|q| q["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["keygen", "other"]);
    assert_eq!(listed["queues"][1]["stats"]["ready"], 2);

    let deleted = env.json(&["delete", "other"]);
    assert_eq!(deleted["items_deleted"], 2);
    assert_eq!(
        env.ok(&["delete", "keygen"]).trim(),
        "queue 'keygen' deleted (0 items)"
    );
    assert_eq!(env.json(&["list"])["queues"], serde_json::json!([]));
}

#[test]
fn create_if_not_exists_leaves_the_queue_unchanged() {
    let env = Env::start();
    env.ok(&["create", "q", "--max-attempts", "2"]);
    let error = env.fails(&["create", "q"], 1);
    assert!(error.contains("already exists"), "{error}");

    let out = env.ok(&["create", "q", "--max-attempts", "9", "--if-not-exists"]);
    assert_eq!(out.trim(), "queue 'q' already exists (unchanged)");
    assert_eq!(env.json(&["stats", "q"])["options"]["max_attempts"], 2);

    let created = env.json(&["create", "fresh", "--if-not-exists"]);
    assert_eq!(created["name"], "fresh");
}

#[test]
fn enqueue_from_arguments_template_file_and_stdin() {
    let env = Env::start();
    env.ok(&["create", "q"]);

    let out = env.ok(&["enqueue", "q", "alpha", "beta", "gamma"]);
    assert_eq!(out.trim(), "enqueued 3 items to queue 'q', 0 deduplicated");
    let out = env.ok(&["purge", "q"]);
    assert_eq!(out.trim(), "purged 3 items from queue 'q'");
    let out = env.ok(&["enqueue", "q", "alpha"]);
    assert!(out.starts_with("enqueued 1 item to queue 'q'"), "{out}");
    let out = env.ok(&["purge", "q"]);
    assert_eq!(out.trim(), "purged 1 item from queue 'q'");
    env.ok(&["enqueue", "q", "alpha", "beta", "gamma"]);

    let template = env.json(&["enqueue", "q", "--count", "4", "--payload", "work-item-{i}"]);
    assert_eq!(template["enqueued"], 4);
    assert_eq!(template["ids"].as_array().expect("ids").len(), 4);

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("items.txt");
    // CRLF endings, a blank line, and a last line without its LF but with its CR.
    std::fs::write(&file, "from-file-1\r\n\nfrom-file-2\nfrom-file-3\r").expect("write");
    let from_file = env.json(&["enqueue", "q", "--file", file.to_str().expect("path")]);
    assert_eq!(
        from_file["enqueued"], 3,
        "blank lines are skipped: {from_file}"
    );

    let stdin = env
        .cli()
        .args(["-o", "json", "enqueue", "q", "--stdin"])
        .write_stdin("in-1\nin-2\n")
        .output()
        .expect("run");
    assert!(stdin.status.success());
    let stdin: Value = serde_json::from_slice(&stdin.stdout).expect("json");
    assert_eq!(stdin["enqueued"], 2);

    let items = env.json(&["items", "q"]);
    assert_eq!(
        payloads(&items),
        [
            "alpha",
            "beta",
            "gamma",
            "work-item-0",
            "work-item-1",
            "work-item-2",
            "work-item-3",
            "from-file-1",
            "from-file-2",
            "from-file-3",
            "in-1",
            "in-2"
        ]
    );
    assert_eq!(env.stats("q")["ready"], 12);
}

#[test]
fn enqueue_sends_large_inputs_in_batches() {
    let env = Env::start();
    env.ok(&["create", "big"]);
    let input: String = (0..2500).map(|i| format!("line-{i}\n")).collect();
    let output = env
        .cli()
        .args([
            "-o",
            "json",
            "enqueue",
            "big",
            "--stdin",
            "--batch-size",
            "1000",
        ])
        .write_stdin(input)
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(result["enqueued"], 2500);
    let mut ids: Vec<u64> = result["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|id| id.as_u64().expect("id"))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 2500, "one distinct id per line");
    assert_eq!(env.stats("big")["ready"], 2500);

    let more = env.json(&[
        "enqueue",
        "big",
        "--count",
        "1500",
        "--payload",
        "x{i}",
        "--seal",
    ]);
    assert_eq!(more["enqueued"], 1500);
    let stats = env.stats("big");
    assert_eq!(stats["ready"], 4000);
    assert_eq!(stats["sealed"], true);
}

/// An item refused in a later batch is named by its index in the whole input, not
/// in its batch, and the batches before it stay in.
#[test]
fn a_refused_item_in_a_later_batch_is_named_by_its_input_index() {
    let env = Env::start();
    env.ok(&["create", "small", "--max-payload", "16"]);
    let input: String = (0..1500)
        .map(|i| match i {
            1234 => format!("{}\n", "x".repeat(40)),
            i => format!("line-{i}\n"),
        })
        .collect();
    let output = env
        .cli()
        .args(["enqueue", "small", "--stdin", "--batch-size", "500"])
        .write_stdin(input)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(
            "error: stopped after 1000 items were accepted (1000 enqueued, 0 deduplicated): \
             the item with index 1234: payload of 40 bytes is over queue 'small''s max payload"
        ),
        "{stderr}"
    );
    assert_eq!(env.stats("small")["ready"], 1000);
}

#[test]
fn enqueue_with_keys_reports_deduplicated_items() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    let first = env.json(&["enqueue", "q", "a", "b", "c", "--key", "k-{i}"]);
    assert_eq!(first["enqueued"], 3);
    assert_eq!(first["deduplicated"], 0);

    let out = env.ok(&["enqueue", "q", "a", "b", "c", "d", "--key", "k-{i}"]);
    assert_eq!(out.trim(), "enqueued 1 item to queue 'q', 3 deduplicated");

    let again = env.json(&["enqueue", "q", "a", "--key", "k-0"]);
    assert_eq!(again["enqueued"], 0);
    assert_eq!(again["deduplicated"], 1);
    assert_eq!(
        again["ids"][0], first["ids"][0],
        "dedup returns the existing item's id"
    );
    assert_eq!(env.stats("q")["ready"], 4);
}

#[test]
fn seal_refuses_enqueue_until_unsealed() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    let out = env.ok(&["enqueue", "q", "last-one", "--seal"]);
    let id = env.json(&["items", "q"])["items"][0]["id"].to_string();
    assert_eq!(
        out.trim(),
        format!("enqueued 1 item to queue 'q', 0 deduplicated (id {id}); queue sealed")
    );
    assert_eq!(env.stats("q")["sealed"], true);

    let error = env.fails(&["enqueue", "q", "too-late"], 1);
    assert!(error.contains("sealed"), "{error}");

    assert_eq!(env.ok(&["unseal", "q"]).trim(), "queue 'q' unsealed");
    env.ok(&["enqueue", "q", "welcome-back"]);
    let sealed = env.json(&["seal", "q"]);
    assert_eq!(sealed["stats"]["sealed"], true);
    assert_eq!(sealed["stats"]["ready"], 2);

    // Sealing with no input at all still seals.
    env.ok(&["create", "empty"]);
    let nothing = env
        .cli()
        .args(["-o", "json", "enqueue", "empty", "--stdin", "--seal"])
        .write_stdin("")
        .output()
        .expect("run");
    assert!(nothing.status.success());
    let nothing: Value = serde_json::from_slice(&nothing.stdout).expect("json");
    assert_eq!(nothing["enqueued"], 0);
    assert_eq!(env.stats("empty")["sealed"], true);
}

#[test]
fn purge_discards_ready_and_delayed_items() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    env.ok(&["enqueue", "q", "a", "b"]);
    env.ok(&["enqueue", "q", "later", "--delay", "1h"]);
    let stats = env.stats("q");
    assert_eq!(stats["ready"], 2);
    assert_eq!(stats["delayed"], 1);

    assert_eq!(
        env.ok(&["purge", "q"]).trim(),
        "purged 3 items from queue 'q'"
    );
    let stats = env.stats("q");
    assert_eq!(stats["ready"], 0);
    assert_eq!(stats["delayed"], 0);
    assert_eq!(stats["drained"], true);
    assert_eq!(env.json(&["purge", "q"])["purged"], 0);
}

#[test]
fn items_and_item_show_state_priority_and_payload() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    env.ok(&["enqueue", "q", "low"]);
    env.ok(&[
        "enqueue",
        "q",
        "high",
        "--priority",
        "5",
        "--key",
        "the-key",
    ]);
    env.ok(&["enqueue", "q", "negative", "--priority", "-1"]);
    env.ok(&["enqueue", "q", "sleepy", "--delay", "1h"]);

    let rows = parse_table(&env.ok(&["items", "q"]));
    assert_eq!(
        rows[0],
        [
            "ID", "STATE", "PRIORITY", "ATTEMPTS", "AGE", "WORKER", "KEY", "PAYLOAD"
        ]
    );
    let high = rows.iter().find(|r| r[7] == "high").expect("high row");
    assert_eq!(high[1], "ready");
    assert_eq!(high[2], "5");
    assert_eq!(high[6], "the-key");
    let sleepy = rows.iter().find(|r| r[7] == "sleepy").expect("sleepy row");
    assert_eq!(sleepy[1], "delayed");

    let delayed = env.json(&["items", "q", "--state", "delayed"]);
    assert_eq!(payloads(&delayed), ["sleepy"]);
    assert_eq!(delayed["next_after_id"], 0);

    let first_page = env.json(&["items", "q", "--limit", "2"]);
    assert_eq!(payloads(&first_page), ["low", "high"]);
    let after = first_page["next_after_id"].to_string();
    assert_ne!(after, "0");
    let second_page = env.json(&["items", "q", "--after", &after]);
    assert_eq!(payloads(&second_page), ["negative", "sleepy"]);

    // The highest priority is leased first.
    let lease = env.lease_one("q");
    assert_eq!(lease["payload"], "high");

    let id = high[0].clone();
    let item = env.json(&["item", "q", &id]);
    assert_eq!(item["state"], "leased");
    assert_eq!(item["payload"], "high");
    assert_eq!(item["priority"], 5);
    assert_eq!(item["key"], "the-key");
    assert_eq!(item["attempts"], 1);

    let detail = env.ok(&["item", "q", &id]);
    assert!(
        detail
            .lines()
            .any(|l| l.starts_with("State:") && l.ends_with("leased")),
        "{detail}"
    );
    assert!(
        detail
            .lines()
            .any(|l| l.starts_with("Payload:") && l.ends_with("high")),
        "{detail}"
    );
    assert!(detail.contains("Lease expires:"), "{detail}");
}

#[test]
fn binary_payloads_come_back_as_base64_in_json() {
    let env = Env::start();
    env.ok(&["create", "bin"]);
    let output = env
        .cli()
        .args(["enqueue", "bin", "--stdin"])
        .write_stdin(&b"\xff\xfe\x00raw\ntext\n"[..])
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let items = env.json(&["items", "bin"]);
    let binary = &items["items"][0];
    assert_eq!(binary["payload"], Value::Null);
    assert_eq!(binary["payload_base64"], "//4AcmF3");
    assert_eq!(items["items"][1]["payload"], "text");
    assert!(items["items"][1].get("payload_base64").is_none());

    // Tables escape what a terminal would mangle.
    let rows = parse_table(&env.ok(&["items", "bin"]));
    assert_eq!(rows[1][7], "\u{fffd}\u{fffd}\\u{0}raw");
}

#[test]
fn update_changes_only_the_options_given() {
    let env = Env::start();
    env.ok(&["create", "q", "--max-attempts", "3", "--max-depth", "2"]);
    let out = env.ok(&[
        "update",
        "q",
        "--lease-timeout",
        "10m",
        "--max-attempts",
        "9",
    ]);
    assert_eq!(out.trim(), "queue 'q' updated");
    let options = &env.json(&["stats", "q"])["options"];
    assert_eq!(options["lease_timeout_ms"], 600_000);
    assert_eq!(options["max_attempts"], 9);
    assert_eq!(options["max_depth"], 2, "untouched");

    // A lower depth limit refuses enqueues; lifting it lets them in again.
    env.ok(&["enqueue", "q", "a", "b"]);
    let err = env.fails(&["enqueue", "q", "c"], 1);
    assert!(err.contains("full"), "{err}");
    env.ok(&["update", "q", "--unlimited-depth"]);
    env.ok(&["enqueue", "q", "c"]);
    assert_eq!(env.json(&["stats", "q"])["options"]["max_depth"], 0);

    // Bad values are refused and change nothing.
    let err = env.fails(&["update", "q", "--lease-timeout", "1ms"], 1);
    assert!(err.contains("lease timeout"), "{err}");
    assert_eq!(
        env.json(&["stats", "q"])["options"]["lease_timeout_ms"],
        600_000
    );
    let err = env.fails(&["update", "nope", "--max-attempts", "2"], 1);
    assert!(err.contains("queue 'nope' not found"), "{err}");
}

#[test]
fn items_and_results_list_payloads_larger_than_one_message() {
    // Three 24 MB items: 72 MB together, more than the 64 MiB one answer can carry,
    // so the coordinator ends a page early and the CLI pages on.
    const SIZE: usize = 24_000_000;
    let env = Env::start();
    env.ok(&["create", "big", "--max-payload", &(32 << 20).to_string()]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("items.txt");
    let input: String = ["a", "b", "c"]
        .iter()
        .map(|c| format!("{}\n", c.repeat(SIZE)))
        .collect();
    std::fs::write(&file, input).expect("write input");
    env.ok(&[
        "enqueue",
        "big",
        "--file",
        file.to_str().expect("utf-8 path"),
    ]);

    let rows = parse_table(&env.ok(&["items", "big"]));
    assert_eq!(rows.len(), 4, "a header and three items");
    for (row, letter) in rows[1..].iter().zip(["a", "b", "c"]) {
        assert!(row[7].starts_with(&letter.repeat(10)), "{row:?}");
    }

    for _ in 0..3 {
        let lease = env.lease_one("big");
        let id = lease["id"].to_string();
        let token = lease["token"].as_str().expect("token").to_string();
        env.ok(&["ack", "big", &id, &token, "--result", "ok"]);
    }
    let rows = parse_table(&env.ok(&["results", "big"]));
    assert_eq!(rows.len(), 4, "a header and three results");
    assert!(rows[1..].iter().all(|row| row[3] == "ok"), "{rows:?}");
}
