//! `queue-cli schedule` against a real coordinator: create with every flag and its
//! refusals, the list table and one schedule's runs, suspend and resume, delete, and
//! schedules that keep their runs and keep ticking across `kill -9`.

mod cli_support;

use std::time::Duration;

use cli_support::{Env, parse_table};
use serde_json::Value;
use workq_tests::wait_for;

fn schedule(env: &Env, name: &str) -> Value {
    env.json(&["schedule", "list", name])
}

fn enqueued_runs(env: &Env, name: &str) -> u64 {
    schedule(env, name)["enqueued_runs"].as_u64().unwrap()
}

fn wait_runs(env: &Env, name: &str, at_least: u64) {
    wait_for(
        &format!("{name} to enqueue {at_least} times"),
        Duration::from_secs(20),
        || enqueued_runs(env, name) >= at_least,
    );
}

#[test]
fn create_list_suspend_resume_and_delete() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    let out = env.ok(&[
        "schedule",
        "create",
        "every-second",
        "--queue",
        "q",
        "--cron",
        "* * * * * *",
        "--count",
        "2",
        "--payload",
        "item-{i}",
        "--concurrency-policy",
        "Allow",
    ]);
    assert!(
        out.starts_with("schedule 'every-second' created; next run in "),
        "{out}"
    );
    let nightly = env.json(&[
        "schedule",
        "create",
        "nightly",
        "--queue",
        "q",
        "--cron",
        "0 2 * * *",
        "--time-zone",
        "Europe/Stockholm",
        "--concurrency-policy",
        "Forbid",
        "--starting-deadline",
        "10m",
        "--suspend",
    ]);
    assert_eq!(nightly["time_zone"], "Europe/Stockholm");
    assert_eq!(nightly["concurrency_policy"], "Forbid");
    assert_eq!(nightly["starting_deadline_ms"], 600_000);
    assert_eq!(nightly["suspended"], true);
    assert_eq!(nightly["next_run_at_ms"], 0);

    // Refusals: one line, and nothing created.
    let refusals: [(&[&str], i32, &str); 8] = [
        (&["--cron", "every minute"], 1, "is not valid"),
        (
            &["--cron", "0 0 L * *"],
            1,
            "'L' in the day-of-month field is not in the Kubernetes schedule syntax",
        ),
        (
            &["--cron", "* * * * *", "--time-zone", "Mars/Base"],
            1,
            "unknown time zone",
        ),
        (&["--cron", "TZ=UTC * * * * *"], 1, "--time-zone"),
        (
            &["--cron", "* * * * *", "--concurrency-policy", "Sometimes"],
            2,
            "Sometimes",
        ),
        (&["--cron", "* * * * *", "--count", "0"], 2, "--count"),
        (
            &["--cron", "* * * * *", "--starting-deadline", "soon"],
            2,
            "soon",
        ),
        (
            &["--cron", "* * * * *", "--starting-deadline", "0s"],
            2,
            "at least 1ms",
        ),
    ];
    for (flags, code, says) in refusals {
        let mut args = vec!["schedule", "create", "bad", "--queue", "q"];
        args.extend_from_slice(flags);
        let err = env.fails(&args, code);
        assert!(err.contains(says), "{flags:?}: {err}");
    }
    let err = env.fails(
        &[
            "schedule", "create", "bad", "--queue", "nope", "--cron", "@daily",
        ],
        1,
    );
    assert!(err.contains("queue 'nope' not found"), "{err}");
    let err = env.fails(
        &[
            "schedule", "create", "nightly", "--queue", "q", "--cron", "@daily",
        ],
        1,
    );
    assert!(err.contains("schedule 'nightly' already exists"), "{err}");
    let listed = env.json(&["schedule", "list"]);
    let names: Vec<&str> = listed["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["every-second", "nightly"]);

    // The ticks enqueue; the table shows the last one.
    wait_runs(&env, "every-second", 1);
    let table = parse_table(&env.ok(&["schedule", "list"]));
    assert_eq!(
        table[0],
        [
            "NAME", "QUEUE", "CRON", "TIMEZONE", "POLICY", "SUSPEND", "LAST", "RESULT", "NEXT"
        ]
    );
    let row = &table[1];
    assert_eq!(
        row[..6],
        ["every-second", "q", "* * * * * *", "UTC", "Allow", "no"]
    );
    assert_eq!(row[7], "enqueued 2");
    assert_eq!(
        table[2][..6],
        [
            "nightly",
            "q",
            "0 2 * * *",
            "Europe/Stockholm",
            "Forbid",
            "yes"
        ]
    );
    assert_eq!(table[2][6..], ["-", "-", "-"]);
    let items = env.json(&["items", "q"]);
    let payloads: Vec<&str> = items["items"]
        .as_array()
        .unwrap()
        .iter()
        .take(2)
        .map(|item| item["payload"].as_str().unwrap())
        .collect();
    assert_eq!(payloads, ["item-0", "item-1"]);

    // One schedule: its fields, then its runs.
    let shown = env.ok(&["schedule", "list", "every-second"]);
    assert!(shown.contains("policy:            Allow"), "{shown}");
    let runs = shown.split("\n\n").nth(1).expect("a runs table");
    let runs = parse_table(runs);
    assert_eq!(runs[0], ["SCHEDULED", "RAN", "OUTCOME", "ITEMS", "DETAIL"]);
    assert_eq!(runs[1][2..4], ["enqueued", "2"]);
    let shown = env.ok(&["schedule", "list", "nightly"]);
    assert!(shown.ends_with("no runs yet\n"), "{shown}");

    // Suspended: no ticks.
    let suspended = env.json(&["schedule", "suspend", "every-second"]);
    assert_eq!(suspended["suspended"], true);
    let runs_then = enqueued_runs(&env, "every-second");
    std::thread::sleep(Duration::from_millis(2_200));
    assert_eq!(
        enqueued_runs(&env, "every-second"),
        runs_then,
        "no tick while suspended"
    );
    // Resumed: the most recent tick missed meanwhile runs before the answer, which
    // says so.
    let out = env.ok(&["schedule", "resume", "every-second"]);
    assert!(
        out.starts_with("schedule 'every-second' resumed; the tick of "),
        "{out}"
    );
    // The ticks before it were passed over, and counted as missed.
    assert!(
        out.contains(" ago, missed while suspended: enqueued 2 (")
            && out.contains(" earlier tick")
            && out.contains(" missed); next run "),
        "{out}"
    );
    assert!(schedule(&env, "every-second")["missed_runs"].as_u64() >= Some(1));
    assert_eq!(enqueued_runs(&env, "every-second"), runs_then + 1);
    // Resuming a running schedule changes nothing and ran nothing.
    let out = env.ok(&["schedule", "resume", "every-second"]);
    assert!(
        out.starts_with("schedule 'every-second' resumed; next run "),
        "{out}"
    );

    // Deleted: gone, and its items stay.
    assert_eq!(
        env.ok(&["schedule", "delete", "every-second"]),
        "schedule 'every-second' deleted\n"
    );
    let err = env.fails(&["schedule", "delete", "every-second"], 1);
    assert!(err.contains("schedule 'every-second' not found"), "{err}");
    let err = env.fails(&["schedule", "list", "every-second"], 1);
    assert!(err.contains("not found"), "{err}");
    let err = env.fails(&["schedule", "resume", "every-second"], 1);
    assert!(err.contains("not found"), "{err}");
    assert!(env.stats("q")["ready"].as_u64().unwrap() >= 4);
    let by_queue = env.json(&["schedule", "list", "--queue", "other"]);
    assert_eq!(by_queue["schedules"], Value::Array(vec![]));
}

#[test]
fn schedules_keep_their_runs_and_keep_ticking_across_kill_9() {
    let mut env = Env::start_on_disk();
    env.ok(&["create", "q"]);
    env.ok(&[
        "schedule",
        "create",
        "s",
        "--queue",
        "q",
        "--cron",
        "* * * * * *",
        "--concurrency-policy",
        "Replace",
        "--payload",
        "tick {tick}",
    ]);
    wait_runs(&env, "s", 2);
    let before = schedule(&env, "s");
    env.coordinator.kill9();
    env.coordinator.restart();

    let after = schedule(&env, "s");
    assert_eq!(after["concurrency_policy"], "Replace");
    assert_eq!(after["payload"], "tick {tick}");
    let runs_before = before["runs"].as_array().unwrap();
    let runs_after = after["runs"].as_array().unwrap();
    // Every run acknowledged before the crash is still listed, in order.
    let position = runs_after
        .iter()
        .position(|run| run == &runs_before[0])
        .unwrap_or_else(|| panic!("{} not in {after}", runs_before[0]));
    let kept = runs_before.len().min(runs_after.len() - position);
    assert_eq!(runs_after[position..position + kept], runs_before[..kept]);
    // And the ticks go on, each replacing the one before it: one item is left.
    let enqueued = after["enqueued_runs"].as_u64().unwrap();
    wait_runs(&env, "s", enqueued + 2);
    let last = schedule(&env, "s")["runs"][0].clone();
    assert_eq!(last["outcome"], "enqueued");
    assert_eq!(last["replaced"], 1);
    let ready = env.stats("q")["ready"].as_u64().unwrap();
    assert!(
        (1..=2).contains(&ready),
        "Replace keeps at most the newest tick's item (and one racing it): {ready}"
    );
}
