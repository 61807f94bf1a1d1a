//! `GET /metrics`: valid Prometheus text (checked by a small parser below) whose
//! numbers move when items flow.

mod http_common;

use std::collections::BTreeMap;

use http_common::Server;
use workq_coordinator::auth::Auth;
use workq_coordinator::store::{Durability, Store};

/// One sample: metric name plus its sorted labels.
type Key = (String, Vec<(String, String)>);

/// Parses the text exposition format 0.0.4 strictly enough to catch what Prometheus
/// would reject: HELP/TYPE lines, metric and label names, quoted and escaped label
/// values, float values, a TYPE before its samples, no duplicate series, histogram
/// buckets cumulative and ending in `+Inf` equal to `_count`.
fn parse(text: &str) -> BTreeMap<Key, f64> {
    assert!(text.ends_with('\n'), "exposition ends with a newline");
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let valid_name = |name: &str| {
        !name.is_empty()
            && name.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().expect("metric name after HELP/TYPE");
            assert!(valid_name(name), "bad metric name in {line:?}");
            if kind == "TYPE" {
                let ty = parts.next().expect("type");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                    "{line:?}"
                );
                assert!(
                    types.insert(name.to_string(), ty.to_string()).is_none(),
                    "TYPE given twice: {line:?}"
                );
            } else {
                assert_eq!(kind, "HELP", "{line:?}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').expect("}"), line)),
        };
        assert!(valid_name(name), "bad metric name in {line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix).filter(|base| {
                    types
                        .get(*base)
                        .is_some_and(|t| t == "histogram" || t == "summary")
                })
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample before its TYPE: {line:?}"
        );
        let mut sorted = labels;
        sorted.sort();
        assert!(
            samples.insert((name.to_string(), sorted), value).is_none(),
            "duplicate series: {line:?}"
        );
    }
    for (family, ty) in &types {
        if ty != "histogram" {
            continue;
        }
        let buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|((n, _), _)| *n == format!("{family}_bucket"))
            .map(|((_, labels), v)| {
                let le = &labels.iter().find(|(k, _)| k == "le").expect("le").1;
                (
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    },
                    *v,
                )
            })
            .collect();
        let mut sorted = buckets.clone();
        sorted.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        assert!(sorted.last().unwrap().0.is_infinite(), "{family} has +Inf");
        assert!(
            sorted.windows(2).all(|w| w[0].1 <= w[1].1),
            "{family} cumulative"
        );
        let count = samples[&(format!("{family}_count"), Vec::new())];
        assert_eq!(sorted.last().unwrap().1, count, "{family} +Inf = count");
    }
    samples
}

fn parse_labels(text: &str, line: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut chars = text.chars().peekable();
    while chars.peek().is_some() {
        let name: String = chars.by_ref().take_while(|&c| c != '=').collect();
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad label name in {line:?}"
        );
        assert_eq!(chars.next(), Some('"'), "label value is quoted in {line:?}");
        let mut value = String::new();
        loop {
            match chars
                .next()
                .unwrap_or_else(|| panic!("unterminated value in {line:?}"))
            {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => panic!("bad escape {other:?} in {line:?}"),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((name, value));
        match chars.next() {
            Some(',') | None => {}
            other => panic!("unexpected {other:?} in {line:?}"),
        }
    }
    labels
}

fn sample(samples: &BTreeMap<Key, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut key: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    key.sort();
    *samples
        .get(&(name.to_string(), key))
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

async fn scrape(server: &Server) -> BTreeMap<Key, f64> {
    let reply = server.get("/metrics").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    parse(&reply.text())
}

/// On disk: group commits, snapshots, and the log a restart would replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_metrics_count_flushes_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_disk(dir.path(), Durability::Strict).unwrap();
    let server = Server::start_on(store, Auth::disabled()).await;
    server
        .send("PUT", "/memq/server/queues/disk", &[], b"")
        .await;
    server
        .post("/memq/server/queues/disk/enqueue", b"one")
        .await;
    let before = scrape(&server).await;
    assert!(sample(&before, "workq_store_flush_duration_seconds_count", &[]) >= 2.0);
    assert_eq!(
        sample(&before, "workq_store_snapshot_duration_seconds_count", &[]),
        0.0
    );
    assert!(sample(&before, "workq_store_log_bytes", &[]) > 0.0);

    server.engine.checkpoint().await.unwrap().unwrap();
    let after = scrape(&server).await;
    assert_eq!(
        sample(&after, "workq_store_snapshot_duration_seconds_count", &[]),
        1.0
    );
    assert!(sample(&after, "workq_store_snapshot_duration_seconds_sum", &[]) > 0.0);
    assert!(sample(&after, "workq_store_snapshot_bytes", &[]) > 0.0);
    assert_eq!(sample(&after, "workq_store_log_bytes", &[]), 0.0);
    server
        .post("/memq/server/queues/disk/enqueue", b"two")
        .await;
    let later = scrape(&server).await;
    assert!(sample(&later, "workq_store_log_bytes", &[]) > 0.0);
    server.stop().await;
}

#[tokio::test]
async fn metrics_parse_and_move_when_items_flow() {
    let server = Server::start().await;
    let before = scrape(&server).await;
    assert_eq!(sample(&before, "workq_queues", &[]), 0.0);
    assert_eq!(sample(&before, "workq_store_healthy", &[]), 1.0);
    let leases_before = sample(&before, "workq_lease_duration_seconds_count", &[]);
    let acks_before = sample(&before, "workq_ack_duration_seconds_count", &[]);

    server
        .send("PUT", "/memq/server/queues/flow", &[], b"")
        .await;
    for i in 0..5 {
        server
            .post(
                "/memq/server/queues/flow/enqueue",
                format!("{i}").as_bytes(),
            )
            .await;
    }
    let q = [("queue", "flow")];
    let loaded = scrape(&server).await;
    assert_eq!(sample(&loaded, "workq_queues", &[]), 1.0);
    assert_eq!(sample(&loaded, "workq_enqueued_total", &q), 5.0);
    assert_eq!(
        sample(
            &loaded,
            "workq_queue_items",
            &[("queue", "flow"), ("state", "ready")]
        ),
        5.0
    );
    assert_eq!(sample(&loaded, "workq_queue_drained", &q), 0.0);
    for state in ["delayed", "leased", "done", "dead"] {
        assert_eq!(
            sample(
                &loaded,
                "workq_queue_items",
                &[("queue", "flow"), ("state", state)]
            ),
            0.0
        );
    }

    for _ in 0..5 {
        let reply = server.post("/memq/server/queues/flow/dequeue", b"").await;
        assert_eq!(reply.status, 200);
    }
    let after = scrape(&server).await;
    assert_eq!(
        sample(
            &after,
            "workq_queue_items",
            &[("queue", "flow"), ("state", "ready")]
        ),
        0.0
    );
    assert_eq!(
        sample(
            &after,
            "workq_queue_items",
            &[("queue", "flow"), ("state", "done")]
        ),
        5.0
    );
    assert_eq!(sample(&after, "workq_deliveries_total", &q), 5.0);
    assert_eq!(sample(&after, "workq_completed_total", &q), 5.0);
    assert_eq!(sample(&after, "workq_queue_drained", &q), 1.0);
    assert!(sample(&after, "workq_queue_completion_rate", &q) > 0.0);
    assert_eq!(sample(&after, "workq_workers", &q), 1.0);
    // Histograms are process-wide and other tests may run alongside: at least ours.
    assert!(sample(&after, "workq_lease_duration_seconds_count", &[]) >= leases_before + 5.0);
    assert!(sample(&after, "workq_ack_duration_seconds_count", &[]) >= acks_before + 5.0);
    assert!(
        sample(
            &after,
            "workq_ack_duration_seconds_bucket",
            &[("le", "+Inf")]
        ) >= acks_before + 5.0
    );

    server
        .send("DELETE", "/memq/server/queues/flow", &[], b"")
        .await;
    let gone = scrape(&server).await;
    assert!(
        !gone
            .keys()
            .any(|(_, labels)| labels.iter().any(|(_, v)| v == "flow")),
        "a deleted queue's series disappear"
    );
    server.stop().await;
}

#[test]
fn the_parser_rejects_what_prometheus_rejects() {
    for bad in [
        "no_type 1\n",
        "# TYPE x gauge\nx{q=\"a} 1\n",
        "# TYPE x gauge\nx 1\nx 2\n",
        "# TYPE x gauge\nx one\n",
        "# TYPE 1x gauge\n1x 1\n",
    ] {
        let text = bad.to_string();
        assert!(
            std::panic::catch_unwind(|| parse(&text)).is_err(),
            "accepted {bad:?}"
        );
    }
    let good = "# HELP x help\n# TYPE x gauge\nx{q=\"a\\\"b\"} 1.5\n";
    assert_eq!(parse(good).len(), 1);
}

#[tokio::test]
async fn schedules_count_their_runs_by_outcome() {
    use workq_coordinator::engine::OptionsPatch;
    use workq_coordinator::engine::schedules::{NewSchedule, Policy};

    let server = Server::start().await;
    let engine = &server.engine;
    engine
        .create_queue("q", &OptionsPatch::default(), false)
        .await
        .unwrap();
    let every_second = NewSchedule {
        policy: Policy::Forbid,
        ..NewSchedule::new("every-second", "q", "* * * * * *")
    };
    engine.create_schedule(every_second).await.unwrap();
    engine
        .create_schedule(NewSchedule::new("yearly", "q", "@yearly"))
        .await
        .unwrap();
    // The first tick enqueues; the next ones find its item unfinished. Suspended
    // after the first skip, the counts hold still for the scrape.
    let view = loop {
        let views = engine.all_schedules().await;
        if views[0].record.skipped_runs > 0 {
            break engine
                .set_schedule_suspended("every-second", true)
                .await
                .unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let samples = scrape(&server).await;
    let runs = |schedule, outcome| {
        sample(
            &samples,
            "workq_schedule_runs_total",
            &[("schedule", schedule), ("queue", "q"), ("outcome", outcome)],
        )
    };
    assert_eq!(runs("every-second", "enqueued"), 1.0);
    assert_eq!(
        runs("every-second", "skipped"),
        view.record.skipped_runs as f64
    );
    assert_eq!(runs("every-second", "missed"), 0.0);
    assert_eq!(runs("every-second", "failed"), 0.0);
    assert_eq!(runs("yearly", "enqueued"), 0.0);
    let next = |schedule| {
        sample(
            &samples,
            "workq_schedule_next_run_timestamp_seconds",
            &[("schedule", schedule)],
        )
    };
    assert_eq!(next("every-second"), 0.0, "suspended");
    // In whole seconds, as the engine has it.
    let new_year = engine
        .all_schedules()
        .await
        .into_iter()
        .find(|s| s.record.name == "yearly")
        .unwrap()
        .next_run_ms
        .unwrap();
    assert_eq!(next("yearly"), (new_year / 1000) as f64);
    server.stop().await;
}
