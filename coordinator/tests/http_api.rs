//! The dashboard's JSON API (`/api/v1`) and the dashboard page itself.

mod http_common;

use http_common::Server;
use serde_json::json;
use workq_coordinator::engine::{LeaseRequest, NewItem, OptionsPatch};

fn items(payloads: &[&str]) -> Vec<NewItem> {
    payloads
        .iter()
        .map(|p| NewItem {
            payload: p.as_bytes().to_vec().into(),
            ..Default::default()
        })
        .collect()
}

fn lease_as(worker: &str, max: u32) -> LeaseRequest {
    LeaseRequest {
        worker: worker.to_string(),
        max_items: max,
        lease_timeout_ms: 0,
        wait_ms: 0,
    }
}

#[tokio::test]
async fn queues_workers_and_dead_items_are_listed() {
    let server = Server::start().await;
    let engine = &server.engine;
    engine
        .create_queue("batch", &OptionsPatch::default(), false)
        .await
        .unwrap();
    engine
        .create_queue("other", &OptionsPatch::default(), false)
        .await
        .unwrap();
    engine
        .enqueue("batch", items(&["a", "b", "c", "d", "<e>"]), true)
        .await
        .unwrap();

    let list = server.get("/api/v1/queues").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.header("content-type"), Some("application/json"));
    let list = list.json();
    assert!(list["now_ms"].as_u64().unwrap() > 0);
    let names: Vec<&str> = list["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["batch", "other"]);
    let stats = &list["queues"][0]["stats"];
    assert_eq!(stats["ready"], 5);
    assert_eq!(stats["sealed"], true);
    assert_eq!(stats["drained"], false);
    assert_eq!(stats["total_enqueued"], 5);
    assert_eq!(list["queues"][0]["options"]["max_attempts"], 5);

    // w1 holds two items, w2 completes one and fails one permanently.
    let held = engine.lease("batch", lease_as("w1", 2)).await.unwrap();
    let w2 = engine.lease("batch", lease_as("w2", 2)).await.unwrap();
    engine
        .ack(
            "batch",
            w2.granted[0].id,
            w2.granted[0].token,
            b"ok".to_vec(),
        )
        .await
        .unwrap();
    let dead_id = w2.granted[1].id;
    engine
        .fail(
            "batch",
            dead_id,
            w2.granted[1].token,
            "exit status 3: <bad input>".into(),
            true,
            0,
        )
        .await
        .unwrap();

    let one = server.get("/api/v1/queues/batch").await.json();
    let s = &one["stats"];
    assert_eq!(
        (&s["ready"], &s["leased"], &s["done"], &s["dead"]),
        (&json!(1), &json!(2), &json!(1), &json!(1))
    );
    assert_eq!(s["total_deliveries"], 4);
    assert_eq!(s["total_completed"], 1);
    assert_eq!(s["workers"], 2);

    let workers = server.get("/api/v1/queues/batch/workers").await.json();
    let rows = workers["workers"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["id"], "w1");
    assert_eq!(rows[0]["queue"], "batch");
    assert_eq!(rows[0]["in_flight"], 2);
    let holding: Vec<u64> = rows[0]["holding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let mut expected: Vec<u64> = held.granted.iter().map(|g| g.id).collect();
    expected.sort();
    assert_eq!(holding, expected);
    assert_eq!(rows[1]["id"], "w2");
    assert_eq!(rows[1]["completed"], 1);
    assert_eq!(rows[1]["in_flight"], 0);
    assert!(rows[1]["last_seen_ms"].as_u64().unwrap() > 0);
    let all = server.get("/api/v1/workers").await.json();
    assert_eq!(all["workers"].as_array().unwrap().len(), 2);
    let filtered = server.get("/api/v1/workers?queue=other").await.json();
    assert_eq!(filtered["workers"], json!([]));

    let dead = server
        .get("/api/v1/queues/batch/items?state=dead")
        .await
        .json();
    let dead_items = dead["items"].as_array().unwrap();
    assert_eq!(dead_items.len(), 1);
    assert_eq!(dead_items[0]["id"], dead_id);
    assert_eq!(dead_items[0]["state"], "dead");
    assert_eq!(dead_items[0]["last_error"], "exit status 3: <bad input>");
    assert_eq!(dead_items[0]["worker"], "w2");
    assert_eq!(dead_items[0]["attempts"], 1);
    assert_eq!(dead["next_after"], 0);

    // Paging through every item, two at a time.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = server
            .get(&format!("/api/v1/queues/batch/items?limit=2&after={after}"))
            .await
            .json();
        for item in page["items"].as_array().unwrap() {
            seen.push(item["payload_preview"].as_str().unwrap().to_string());
        }
        after = page["next_after"].as_u64().unwrap();
        if after == 0 {
            break;
        }
    }
    assert_eq!(seen, ["a", "b", "c", "d", "<e>"]);
    server.stop().await;
}

#[tokio::test]
async fn requeue_brings_dead_items_back() {
    let server = Server::start().await;
    let engine = &server.engine;
    engine
        .create_queue("q", &OptionsPatch::default(), false)
        .await
        .unwrap();
    engine
        .enqueue("q", items(&["x", "y", "z"]), false)
        .await
        .unwrap();
    let leased = engine.lease("q", lease_as("w", 3)).await.unwrap();
    for g in &leased.granted {
        engine
            .fail("q", g.id, g.token, "boom".into(), true, 0)
            .await
            .unwrap();
    }
    assert_eq!(engine.stats("q").unwrap().dead, 3);

    let first = leased.granted[0].id;
    let one = server
        .send(
            "POST",
            "/api/v1/queues/q/requeue",
            &[("Content-Type", "application/json")],
            format!("{{\"ids\":[{first}]}}").as_bytes(),
        )
        .await;
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(one.json(), json!({"requeued": 1}));
    let stats = engine.stats("q").unwrap();
    assert_eq!((stats.ready, stats.dead), (1, 2));
    assert_eq!(engine.get_item("q", first).unwrap().attempts, 0);

    let rest = server
        .send(
            "POST",
            "/api/v1/queues/q/requeue",
            &[("Content-Type", "application/json")],
            b"{\"all_dead\":true}",
        )
        .await;
    assert_eq!(rest.json(), json!({"requeued": 2}));
    assert_eq!(engine.stats("q").unwrap().ready, 3);
    server.stop().await;
}

#[tokio::test]
async fn api_errors_are_json_with_the_right_status() {
    let server = Server::start().await;
    server
        .engine
        .create_queue("q", &OptionsPatch::default(), false)
        .await
        .unwrap();
    let cases: [(&str, &str, &[u8], u16, &str); 12] = [
        ("GET", "/api/v1/queues/missing", b"", 404, "not found"),
        // What the router itself refuses is JSON too.
        ("GET", "/api/v1/queues/%FF", b"", 400, "UTF-8"),
        ("GET", "/api/v1/queues/%FF/items", b"", 400, "UTF-8"),
        (
            "GET",
            "/api/v1/nothing-here",
            b"",
            404,
            "no API route /api/v1/nothing-here",
        ),
        (
            "DELETE",
            "/api/v1/queues",
            b"",
            405,
            "DELETE is not allowed on /api/v1/queues",
        ),
        (
            "GET",
            "/api/v1/schedules?queue=bad%20name",
            b"",
            400,
            "invalid queue name",
        ),
        (
            "GET",
            "/api/v1/queues/bad%20name",
            b"",
            400,
            "invalid queue name",
        ),
        (
            "GET",
            "/api/v1/queues/q/items?state=zombie",
            b"",
            400,
            "unknown item state",
        ),
        (
            "GET",
            "/api/v1/queues/q/items?limit=5000",
            b"",
            400,
            "limit must be at most",
        ),
        (
            "POST",
            "/api/v1/queues/q/requeue",
            b"{not json",
            400,
            "all_dead",
        ),
        (
            "POST",
            "/api/v1/queues/q/requeue",
            b"{}",
            400,
            "name the dead items",
        ),
        (
            "POST",
            "/api/v1/queues/missing/requeue",
            b"{\"all_dead\":true}",
            404,
            "not found",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let reply = server
            .send(method, path, &[("Content-Type", "application/json")], body)
            .await;
        assert_eq!(reply.status, status, "{method} {path}: {reply:?}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
        let error = reply.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(needle), "{method} {path}: {error}");
    }
    // A body past the limit is too large, not malformed.
    let mut huge = b"{\"ids\":[".to_vec();
    huge.extend(std::iter::repeat_n(b"1,".as_slice(), 2_000_000).flatten());
    huge.extend(b"1]}");
    let reply = server
        .send(
            "POST",
            "/api/v1/queues/q/requeue",
            &[("Content-Type", "application/json")],
            &huge,
        )
        .await;
    assert_eq!(reply.status, 413, "{reply:?}");
    let error = reply.json()["error"].as_str().unwrap().to_string();
    assert!(error.contains("at most 10000 ids"), "{error}");
    let wrong = server.send("DELETE", "/api/v1/queues", &[], b"").await;
    assert_eq!(wrong.status, 405);
    assert!(
        wrong
            .header("allow")
            .is_some_and(|allow| allow.contains("GET"))
    );
    // An empty filter lists every schedule, as gRPC's does.
    let all = server.get("/api/v1/schedules?queue=").await;
    assert_eq!(all.status, 200, "{all:?}");
    server.stop().await;
}

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary() {
    let server = Server::start().await;
    let page = server.get("/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = page.text();
    assert!(html.contains("<script src=\"/dashboard.js\"></script>"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external assets"
    );
    let script = server.get("/dashboard.js").await;
    assert_eq!(
        script.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert!(script.text().contains("/api/v1/queues"));
    let style = server.get("/dashboard.css").await;
    assert_eq!(
        style.header("content-type"),
        Some("text/css; charset=utf-8")
    );
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .contains("default-src 'self'")
    );
    server.stop().await;
}

#[tokio::test]
async fn schedules_are_listed_with_their_runs() {
    use workq_coordinator::engine::schedules::{NewSchedule, Policy};

    let server = Server::start().await;
    let engine = &server.engine;
    for queue in ["a", "b"] {
        engine
            .create_queue(queue, &OptionsPatch::default(), false)
            .await
            .unwrap();
    }
    let ticker = NewSchedule {
        count: 2,
        policy: Policy::Replace,
        ..NewSchedule::new("ticker", "a", "* * * * * *")
    };
    engine.create_schedule(ticker).await.unwrap();
    let nightly = NewSchedule {
        time_zone: "Europe/Stockholm".into(),
        suspend: true,
        starting_deadline_ms: 600_000,
        policy: Policy::Forbid,
        ..NewSchedule::new("nightly", "b", "0 2 * * *")
    };
    engine.create_schedule(nightly).await.unwrap();
    // Wait (really) for the ticker's first run.
    let listed = loop {
        let reply = server.get("/api/v1/schedules").await;
        assert_eq!(reply.status, 200);
        let listed = reply.json();
        if listed["schedules"][1]["enqueued_runs"] == 1 {
            break listed;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let nightly = &listed["schedules"][0];
    assert_eq!(nightly["name"], "nightly");
    assert_eq!(nightly["time_zone"], "Europe/Stockholm");
    assert_eq!(nightly["policy"], "Forbid");
    assert_eq!(nightly["starting_deadline_ms"], 600_000);
    assert_eq!(nightly["suspended"], true);
    assert_eq!(nightly["next_run_ms"], 0);
    assert_eq!(nightly["runs"], json!([]));
    let ticker = &listed["schedules"][1];
    assert_eq!(ticker["policy"], "Replace");
    assert_eq!(ticker["count"], 2);
    let run = &ticker["runs"][0];
    assert_eq!(run["outcome"], "enqueued");
    assert_eq!(run["items"], 2);
    assert!(run["scheduled_ms"].as_u64().unwrap() <= run["ran_ms"].as_u64().unwrap());
    assert!(ticker["next_run_ms"].as_u64().unwrap() > run["scheduled_ms"].as_u64().unwrap());
    assert!(listed["now_ms"].as_u64().unwrap() >= run["ran_ms"].as_u64().unwrap());

    let only_b = server.get("/api/v1/schedules?queue=b").await.json();
    let names: Vec<&str> = only_b["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["nightly"]);
    server.stop().await;
}
