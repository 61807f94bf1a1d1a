//! `queue-cli bench` against a real coordinator: every workload in both modes runs to
//! the end, checks its own work and says so in its JSON. Small runs, no timing
//! assertions: benchmarks measure, tests assert.

mod cli_support;

use cli_support::Env;
use serde_json::Value;

/// Runs `queue-cli -o json bench ARGS` and checks what every report must hold.
fn bench(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    let report = env.json(&all);
    assert_eq!(report["verified"], true, "bench {args:?}: {report}");
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    assert!(report["items_per_sec"].as_f64().unwrap() > 0.0, "{report}");
    let latency = &report["latency_us"];
    let [p50, p99, p999, max] =
        ["p50", "p99", "p999", "max"].map(|p| latency[p].as_u64().expect("latency in µs"));
    assert!(
        p50 <= p99 && p99 <= p999 && p999 <= max,
        "percentiles out of order: {report}"
    );
    report
}

/// Queue names the coordinator holds.
fn queue_names(env: &Env) -> Vec<String> {
    env.json(&["list"])["queues"]
        .as_array()
        .expect("queues array")
        .iter()
        .map(|q| q["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn every_workload_verifies_in_both_modes_and_cleans_up() {
    let env = Env::start();
    for workload in ["enqueue", "drain", "e2e"] {
        for mode in ["unary", "stream"] {
            let report = bench(
                &env,
                &[
                    "--workload",
                    workload,
                    "--mode",
                    mode,
                    "--items",
                    "300",
                    "--concurrency",
                    "4",
                ],
            );
            assert_eq!(report["workload"], workload);
            assert_eq!(report["mode"], mode);
            assert_eq!(report["items"], 300);
            assert_eq!(report["batch"], 1);
            assert_eq!(report["payload_size"], 64);
            let expected_clients = if workload == "e2e" { 8 } else { 4 };
            assert_eq!(report["concurrency"], expected_clients, "{report}");
            assert_eq!(report["lost_leases"], 0, "{report}");
        }
    }
    assert!(
        queue_names(&env).iter().all(|q| !q.starts_with("bench-")),
        "bench queues left behind: {:?}",
        queue_names(&env)
    );
}

#[test]
fn batches_pipelines_and_a_paced_e2e_run_verify() {
    let env = Env::start();
    let enqueue = bench(
        &env,
        &[
            "--workload",
            "enqueue",
            "--mode",
            "stream",
            "--items",
            "1000",
            "--batch",
            "10",
            "--pipeline",
            "4",
            "-c",
            "2",
            "--payload-size",
            "100",
        ],
    );
    assert_eq!(
        (enqueue["batch"].as_u64(), enqueue["pipeline"].as_u64()),
        (Some(10), Some(4))
    );
    assert_eq!(enqueue["payload_size"], 100);
    for mode in ["unary", "stream"] {
        let drain = bench(
            &env,
            &[
                "--workload",
                "drain",
                "--mode",
                mode,
                "--items",
                "1000",
                "--batch",
                "25",
                "-c",
                "3",
            ],
        );
        assert_eq!(drain["items"], 1000);
        let e2e = bench(
            &env,
            &[
                "--workload",
                "e2e",
                "--mode",
                mode,
                "--items",
                "200",
                "--producers",
                "2",
                "--consumers",
                "3",
                "--rate",
                "2000",
            ],
        );
        assert_eq!(
            (e2e["producers"].as_u64(), e2e["consumers"].as_u64()),
            (Some(2), Some(3))
        );
        assert_eq!(e2e["rate"], 2000.0);
        assert_eq!(e2e["latency_of"], "enqueue_to_ack");
    }
}

#[test]
fn a_named_queue_keeps_its_items_and_drain_refuses_a_busy_queue() {
    let env = Env::start();
    let report = bench(
        &env,
        &[
            "--workload",
            "enqueue",
            "--queue",
            "kept",
            "--items",
            "250",
            "-c",
            "2",
        ],
    );
    assert_eq!(report["queue"], "kept");
    assert_eq!(env.stats("kept")["ready"], 250);
    let error = env.fails(
        &[
            "bench",
            "--workload",
            "drain",
            "--queue",
            "kept",
            "--items",
            "10",
        ],
        1,
    );
    assert!(error.contains("holds 250 unfinished items"), "{error}");
    assert_eq!(
        env.stats("kept")["ready"],
        250,
        "a refused run adds nothing"
    );
}

#[test]
fn rate_without_e2e_is_refused() {
    let env = Env::start();
    let error = env.fails(&["bench", "--workload", "enqueue", "--rate", "100"], 1);
    assert!(error.contains("--rate goes with --workload e2e"), "{error}");
}

#[test]
fn human_output_names_throughput_latency_and_verification() {
    let env = Env::start();
    let out = env.ok(&["bench", "--workload", "drain", "--items", "200", "-c", "2"]);
    for field in [
        "workload:",
        "throughput:",
        "latency lease→ack:",
        "verified:",
    ] {
        assert!(out.contains(field), "missing {field} in:\n{out}");
    }
    assert!(out.contains("yes: every item acked exactly once"), "{out}");
}

#[test]
fn keyed_runs_give_every_item_its_own_key_and_do_not_dedup_each_other() {
    let env = Env::start();
    for mode in ["stream", "wire"] {
        let report = bench(
            &env,
            &[
                "--workload",
                "enqueue",
                "--mode",
                mode,
                "--queue",
                "keyed",
                "--keyed",
                "--items",
                "120",
                "--batch",
                "7",
                "-c",
                "3",
            ],
        );
        assert_eq!(report["keyed"], true, "{report}");
    }
    assert_eq!(env.stats("keyed")["ready"], 240, "two runs, no dedup");
    let items = env.json(&["items", "keyed", "--limit", "0"]);
    let keys: std::collections::HashSet<&str> = items["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["key"].as_str().expect("a key"))
        .collect();
    assert_eq!(keys.len(), 240, "a key of its own for every item");
    assert!(!keys.contains(""), "every item keyed");

    let drain = bench(
        &env,
        &[
            "--workload",
            "drain",
            "--mode",
            "wire",
            "--keyed",
            "--items",
            "300",
            "--batch",
            "10",
        ],
    );
    assert_eq!(
        (drain["keyed"].clone(), drain["lost_leases"].clone()),
        (true.into(), 0.into())
    );
}
