//! The kuard memq face, checked byte for byte against kuard-memq.md §2–§5: routes,
//! status codes, headers, JSON field names and order, error bodies, and the book's
//! load script run unchanged with curl.

mod http_common;

use http_common::{Reply, Server, raw};
use workq_coordinator::auth::Auth;
use workq_coordinator::engine::{LeaseRequest, OptionsPatch};

const Q: &str = "/memq/server/queues";

/// Asserts `reply` is a Go `http.Error` with exactly this status and text.
fn assert_go_error(reply: &Reply, status: u16, text: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert_eq!(reply.text(), format!("{text}\n"), "{reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
}

/// Asserts kuard's `apiutils.ServeJSON` headers and returns the body text.
fn assert_kuard_json(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(
        reply.header("cache-control"),
        Some("no-cache, private, max-age=0")
    );
    assert_eq!(reply.header("pragma"), Some("no-cache"));
    assert_eq!(
        reply.header("expires"),
        Some("Thu, 01 Jan 1970 00:00:00 UTC")
    );
    let text = reply.text();
    assert!(
        text.ends_with("}\n"),
        "compact JSON plus a newline: {text:?}"
    );
    assert_eq!(text.matches('\n').count(), 1, "{text:?}");
    text
}

fn assert_empty_ok(reply: &Reply) {
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.is_empty(), "{reply:?}");
    assert_eq!(reply.header("content-length"), Some("0"));
}

/// Splits a message into (id, body JSON, creationTimestamp), checking field order.
fn message_parts(text: &str) -> (String, String, String) {
    let rest = text
        .strip_prefix(r#"{"kind":"message","id":""#)
        .unwrap_or_else(|| panic!("message starts with kind and id: {text:?}"));
    let (id, rest) = rest.split_at(32);
    assert!(
        id.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "id is 32 lowercase hex: {id}"
    );
    let rest = rest.strip_prefix(r#"","body":"#).expect("body follows id");
    let (body, rest) = rest
        .split_once(r#","creationTimestamp":""#)
        .expect("creationTimestamp follows body");
    let stamp = rest.strip_suffix("\"}\n").expect("message ends");
    (id.to_string(), body.to_string(), stamp.to_string())
}

fn assert_rfc3339(stamp: &str) {
    // 2019-03-17T21:23:23.52309871Z: date, T, time, optional trimmed fraction, Z.
    let bytes = stamp.as_bytes();
    assert!(stamp.len() >= 20 && stamp.ends_with('Z'), "{stamp}");
    for (i, c) in stamp[..19].char_indices() {
        match i {
            4 | 7 => assert_eq!(c, '-', "{stamp}"),
            10 => assert_eq!(c, 'T', "{stamp}"),
            13 | 16 => assert_eq!(c, ':', "{stamp}"),
            _ => assert!(c.is_ascii_digit(), "{stamp}"),
        }
    }
    if stamp.len() > 20 {
        assert_eq!(bytes[19], b'.', "{stamp}");
        let fraction = &stamp[20..stamp.len() - 1];
        assert!(
            (1..=9).contains(&fraction.len()) && !fraction.ends_with('0'),
            "{stamp}"
        );
    }
}

#[tokio::test]
async fn every_memq_route_answers_like_kuard() {
    let server = Server::start().await;

    let stats = server.get("/memq/server/stats").await;
    assert_eq!(
        assert_kuard_json(&stats),
        "{\"kind\":\"stats\",\"queues\":[]}\n"
    );

    assert_empty_ok(&server.send("PUT", &format!("{Q}/keygen"), &[], b"").await);
    let again = server.send("PUT", &format!("{Q}/keygen"), &[], b"").await;
    assert_go_error(&again, 400, "already exists");

    let enqueued = server
        .post(&format!("{Q}/keygen/enqueue"), b"work-item-0")
        .await;
    let (id, body, stamp) = message_parts(&assert_kuard_json(&enqueued));
    assert_eq!(body, "\"work-item-0\"");
    assert_rfc3339(&stamp);
    server
        .post(&format!("{Q}/keygen/enqueue"), b"work-item-1")
        .await;

    let stats = server.get("/memq/server/stats").await;
    assert_eq!(
        assert_kuard_json(&stats),
        "{\"kind\":\"stats\",\"queues\":[{\"name\":\"keygen\",\"depth\":2,\"enqueued\":2,\"dequeued\":0,\"drained\":0}]}\n"
    );

    // FIFO head, same id, body and timestamp as when it was enqueued.
    let dequeued = server.post(&format!("{Q}/keygen/dequeue"), b"").await;
    assert_eq!(
        message_parts(&assert_kuard_json(&dequeued)),
        (id, body, stamp)
    );
    let second = server.post(&format!("{Q}/keygen/dequeue"), b"").await;
    assert_eq!(
        message_parts(&assert_kuard_json(&second)).1,
        "\"work-item-1\""
    );

    let empty = server.post(&format!("{Q}/keygen/dequeue"), b"").await;
    assert_eq!(empty.status, 204, "{empty:?}");
    assert!(empty.body.is_empty());

    // Drain discards what is stored and counts it; enqueued and dequeued stay.
    for i in 0..3 {
        server
            .post(&format!("{Q}/keygen/enqueue"), format!("x{i}").as_bytes())
            .await;
    }
    assert_empty_ok(&server.post(&format!("{Q}/keygen/drain"), b"").await);
    let stats = server.get("/memq/server/stats").await.json();
    assert_eq!(
        stats["queues"][0],
        serde_json::json!({"name":"keygen","depth":0,"enqueued":5,"dequeued":2,"drained":3})
    );

    assert_empty_ok(
        &server
            .send("DELETE", &format!("{Q}/keygen"), &[], b"")
            .await,
    );
    for (method, path) in [
        ("DELETE", format!("{Q}/keygen")),
        ("POST", format!("{Q}/keygen/drain")),
        ("POST", format!("{Q}/keygen/enqueue")),
        ("POST", format!("{Q}/keygen/dequeue")),
        ("POST", format!("{Q}/never-created/enqueue")),
    ] {
        let reply = server.send(method, &path, &[], b"x").await;
        assert_go_error(&reply, 400, "does not exist");
    }
    assert_eq!(
        server.get("/memq/server/stats").await.text(),
        "{\"kind\":\"stats\",\"queues\":[]}\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn dequeue_is_a_lease_plus_an_immediate_ack() {
    let server = Server::start().await;
    server.send("PUT", &format!("{Q}/jobs"), &[], b"").await;
    for i in 0..3 {
        server
            .post(&format!("{Q}/jobs/enqueue"), format!("{i}").as_bytes())
            .await;
    }
    server.post(&format!("{Q}/jobs/dequeue"), b"").await;

    let stats = server.engine.stats("jobs").unwrap();
    assert_eq!((stats.ready, stats.leased, stats.done), (2, 0, 1));
    assert_eq!(stats.counters.deliveries, 1);
    assert_eq!(stats.counters.completed, 1);
    // The worker is named after the client's host (one row per kuard pod).
    let workers: Vec<String> = server
        .engine
        .workers(Some("jobs"))
        .unwrap()
        .into_iter()
        .map(|row| row.id)
        .collect();
    assert_eq!(workers, ["memq:127.0.0.1"]);

    // Items enqueued over gRPC count in memq's stats too.
    server
        .engine
        .enqueue(
            "jobs",
            vec![workq_coordinator::engine::NewItem {
                payload: b"from grpc".to_vec().into(),
                ..Default::default()
            }],
            false,
        )
        .await
        .unwrap();
    server.post(&format!("{Q}/jobs/drain"), b"").await;
    let stats = server.get("/memq/server/stats").await.json();
    assert_eq!(stats["queues"][0]["drained"], 3);
    assert_eq!(stats["queues"][0]["depth"], 0);

    // A message id is the item id in hex.
    let again = server.post(&format!("{Q}/jobs/enqueue"), b"last").await;
    let (hex, _, _) = message_parts(&again.text());
    let dequeued = server.post(&format!("{Q}/jobs/dequeue"), b"").await;
    assert_eq!(message_parts(&dequeued.text()).0, hex);
    let item = server
        .engine
        .get_item("jobs", u64::from_str_radix(&hex, 16).unwrap())
        .unwrap();
    assert_eq!(item.payload, b"last");
    assert!(
        item.worker().starts_with("memq"),
        "dequeues lease as a memq worker: {}",
        item.worker()
    );
    server.stop().await;
}

#[tokio::test]
async fn bodies_are_raw_bytes_escaped_like_go() {
    let server = Server::start().await;
    server.send("PUT", &format!("{Q}/esc"), &[], b"").await;
    let payload = b"<a href=\"x\">&</a>\n\t\x01\xff\xe2\x82 \xc3\xa9";
    let reply = server
        .send(
            "POST",
            &format!("{Q}/esc/enqueue"),
            &[("Content-Type", "application/x-www-form-urlencoded")],
            payload,
        )
        .await;
    let expected =
        r#""\u003ca href=\"x\"\u003e\u0026\u003c/a\u003e\n\t\u0001\ufffd\ufffd\ufffd é""#;
    assert_eq!(message_parts(&reply.text()).1, expected);
    let dequeued = server.post(&format!("{Q}/esc/dequeue"), b"").await;
    assert_eq!(message_parts(&dequeued.text()).1, expected);
    // The stored payload is the raw body, unchanged.
    let empty = server.post(&format!("{Q}/esc/enqueue"), b"").await;
    assert_eq!(message_parts(&empty.text()).1, "\"\"");
    server.stop().await;
}

#[tokio::test]
async fn methods_and_paths_follow_httprouter() {
    let server = Server::start().await;
    server.send("PUT", &format!("{Q}/q1"), &[], b"").await;

    for (method, path, allow) in [
        ("GET", format!("{Q}/q1/dequeue"), "POST, OPTIONS"),
        ("PUT", format!("{Q}/q1/enqueue"), "POST, OPTIONS"),
        ("DELETE", format!("{Q}/q1/drain"), "POST, OPTIONS"),
        ("HEAD", "/memq/server/stats".to_string(), "GET, OPTIONS"),
        ("POST", "/memq/server/stats".to_string(), "GET, OPTIONS"),
        ("GET", format!("{Q}/q1"), "DELETE, PUT, OPTIONS"),
        ("POST", format!("{Q}/q1"), "DELETE, PUT, OPTIONS"),
    ] {
        let reply = server.send(method, &path, &[], b"").await;
        assert_eq!(reply.status, 405, "{method} {path}: {reply:?}");
        assert_eq!(reply.header("allow"), Some(allow), "{method} {path}");
        if method != "HEAD" {
            assert_go_error(&reply, 405, "Method Not Allowed");
        }
    }

    let options = server
        .send("OPTIONS", &format!("{Q}/q1/enqueue"), &[], b"")
        .await;
    assert_eq!(options.status, 200);
    assert_eq!(options.header("allow"), Some("POST, OPTIONS"));

    for (method, path) in [
        ("GET", "/memq/server/nope"),
        ("PUT", "/memq/server/queues/"),
        ("POST", "/memq/server/queues/q1/peek"),
        ("GET", "/no/such/path"),
    ] {
        let reply = server.send(method, path, &[], b"").await;
        assert_go_error(&reply, 404, "404 page not found");
    }

    // An empty name is only reachable through a doubled slash; kuard says so.
    for op in ["enqueue", "dequeue", "drain"] {
        let reply = server.post(&format!("{Q}//{op}"), b"x").await;
        assert_go_error(&reply, 400, "empty name");
    }

    // httprouter's redirects: trailing slash, then a cleaned case-insensitive path.
    let slash = server.get("/memq/server/stats/?x=1").await;
    assert_eq!(slash.status, 301, "{slash:?}");
    assert_eq!(slash.header("location"), Some("/memq/server/stats?x=1"));
    assert_eq!(
        slash.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(
        slash.text(),
        "<a href=\"/memq/server/stats?x=1\">Moved Permanently</a>.\n\n"
    );
    let post = server.post(&format!("{Q}/q1/Enqueue/"), b"x").await;
    assert_eq!(post.status, 307, "{post:?}");
    assert_eq!(
        post.header("location"),
        Some("/memq/server/queues/q1/enqueue")
    );
    assert!(post.body.is_empty());
    assert_eq!(server.get("/MEMQ/server/stats").await.status, 301);
    // The target is cleaned, as Go's `http.Redirect` cleans it.
    let doubled = server.post(&format!("{Q}//enqueue/"), b"x").await;
    assert_eq!(doubled.status, 307, "{doubled:?}");
    assert_eq!(
        doubled.header("location"),
        Some("/memq/server/queues/enqueue")
    );
    let dot = server.send("PUT", &format!("{Q}/./"), &[], b"").await;
    assert_eq!(dot.status, 307, "{dot:?}");
    assert_eq!(dot.header("location"), Some("/memq/server/queues"));

    // kuard's other mounts of the same broker.
    let stats = server.get("/a/memq/server/stats").await;
    assert_eq!(stats.json()["queues"][0]["name"], "q1");
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_the_server_keeps_serving() {
    let server = Server::start().await;
    server.send("PUT", &format!("{Q}/big"), &[], b"").await;

    // Names workq cannot hold: kuard allows them, workq says why not.
    for name in ["a%20b", ".hidden", "a%2Fb", "%C3%A9", &"x".repeat(129)] {
        let reply = server.send("PUT", &format!("{Q}/{name}"), &[], b"").await;
        assert_eq!(reply.status, 400, "{name}: {reply:?}");
        let text = reply.text();
        assert!(
            text.contains("invalid queue name") && text.contains("stricter than kuard"),
            "{name}: {text}"
        );
    }

    // Over the default 1 MiB max payload: refused from Content-Length before the body
    // is sent (curl's Expect: 100-continue), with the limit in the message.
    let mut stream = tokio::net::TcpStream::connect(server.http).await.unwrap();
    use tokio::io::AsyncWriteExt;
    let head = format!(
        "POST {Q}/big/enqueue HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        2 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let reply = http_common::read_reply(&mut stream).await;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert!(
        reply.text().contains("at most 1048576 bytes"),
        "{}",
        reply.text()
    );

    // A queue with a small max payload; the body streams in without a length.
    server
        .engine
        .create_queue(
            "small",
            &OptionsPatch {
                max_payload_bytes: Some(16),
                ..Default::default()
            },
            false,
        )
        .await
        .unwrap();
    let chunked = format!(
        "POST {Q}/small/enqueue HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Transfer-Encoding: chunked\r\n\r\n20\r\n{}\r\n0\r\n\r\n",
        "y".repeat(32)
    );
    let reply = raw(server.http, chunked.as_bytes()).await;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert!(
        reply
            .text()
            .contains("queue 'small' accepts at most 16 bytes")
    );
    let fits = server
        .post(&format!("{Q}/small/enqueue"), b"sixteen bytes ok")
        .await;
    assert_eq!(fits.status, 200, "{fits:?}");

    // Sealed queues refuse memq enqueues with a reason (kuard has no seal).
    server.engine.set_sealed("small", true).await.unwrap();
    let sealed = server.post(&format!("{Q}/small/enqueue"), b"x").await;
    assert_eq!(sealed.status, 409);
    assert!(sealed.text().contains("sealed"), "{}", sealed.text());

    // Garbage on the wire: a 400 from the HTTP layer, not a crash.
    let garbage = raw(server.http, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(garbage.status, 400, "{garbage:?}");

    // Still serving, with nothing corrupted.
    let stats = server.get("/memq/server/stats").await.json();
    assert_eq!(
        stats["queues"],
        serde_json::json!([
            {"name":"big","depth":0,"enqueued":0,"dequeued":0,"drained":0},
            {"name":"small","depth":1,"enqueued":1,"dequeued":0,"drained":0},
        ])
    );
    assert_eq!(server.get("/healthz").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn the_books_load_script_runs_unchanged() {
    let server = Server::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/http_book_load_queue.sh");
    // The script says localhost:8080; curl's --connect-to points that at our port 0
    // listener without touching the script's text.
    let wrapper = format!(
        "curl() {{ command curl -sS --connect-to localhost:8080:127.0.0.1:{} \"$@\"; echo; }}\n. {script}\n",
        server.http.port()
    );
    let output = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&wrapper)
        .output()
        .await
        .expect("run bash");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let messages: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(messages.len(), 100, "{stdout}");
    for (i, line) in messages.iter().enumerate() {
        let (_, body, _) = message_parts(&format!("{line}\n"));
        assert_eq!(body, format!("\"work-item-{i}\""));
    }
    let stats = server.get("/memq/server/stats").await;
    assert_eq!(
        assert_kuard_json(&stats),
        "{\"kind\":\"stats\",\"queues\":[{\"name\":\"keygen\",\"depth\":100,\"enqueued\":100,\"dequeued\":0,\"drained\":0}]}\n"
    );
    // And a gRPC worker would lease them in order.
    let outcome = server
        .engine
        .lease(
            "keygen",
            LeaseRequest {
                worker: "w".into(),
                max_items: 1,
                lease_timeout_ms: 0,
                wait_ms: 0,
            },
        )
        .await
        .unwrap();
    assert_eq!(outcome.granted[0].payload, b"work-item-0");
    server.stop().await;
}

#[tokio::test]
async fn with_a_token_memq_needs_it_and_probes_stay_open() {
    let server = Server::start_with(Auth::with_token("s3cret")).await;
    let denied = server.get("/memq/server/stats").await;
    assert_eq!(denied.status, 401);
    assert!(denied.text().contains("missing token"), "{}", denied.text());
    assert!(denied.header("www-authenticate").is_some());
    let wrong = server
        .send(
            "PUT",
            &format!("{Q}/x"),
            &[("Authorization", "Bearer nope")],
            b"",
        )
        .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.text(), "invalid token\n");
    // Two headers are refused whichever comes first, so no proxy can slip one in.
    for pair in [
        ["Bearer nope", "Bearer s3cret"],
        ["Bearer s3cret", "Bearer nope"],
    ] {
        let two = server
            .send(
                "PUT",
                &format!("{Q}/x"),
                &[("Authorization", pair[0]), ("Authorization", pair[1])],
                b"",
            )
            .await;
        assert_eq!(two.status, 401);
        assert!(two.text().contains("more than one"), "{}", two.text());
    }
    assert!(server.engine.list_queues().is_empty());
    // The scheme is case-insensitive (RFC 7235).
    let shouted = [("Authorization", "BEARER  s3cret")];
    let created = server.send("PUT", &format!("{Q}/y"), &shouted, b"").await;
    assert_eq!(created.status, 200, "{}", created.text());

    let auth = [("Authorization", "Bearer s3cret")];
    assert_eq!(
        server
            .send("PUT", &format!("{Q}/x"), &auth, b"")
            .await
            .status,
        200
    );
    let stats = server
        .send("GET", "/memq/server/stats", &auth, b"")
        .await
        .json();
    assert_eq!(stats["queues"][0]["name"], "x");
    assert_eq!(stats["queues"][1]["name"], "y");
    for path in ["/metrics", "/api/v1/queues"] {
        assert_eq!(server.get(path).await.status, 401, "{path}");
        assert_eq!(server.send("GET", path, &auth, b"").await.status, 200);
    }
    // The JSON API says why in JSON, as it does every error; the challenge stays.
    let denied = server.get("/api/v1/queues").await;
    let error = denied.json()["error"].as_str().unwrap().to_string();
    assert!(error.starts_with("missing token"), "{error}");
    assert!(denied.header("www-authenticate").is_some());
    for path in ["/healthz", "/readyz", "/", "/dashboard.js"] {
        assert_eq!(server.get(path).await.status, 200, "{path}");
    }
    server.stop().await;
}
