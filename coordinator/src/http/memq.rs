//! kuard's memq API, byte-compatible (shared/reference/kuard-memq.md §2–§5), so the
//! book's `load-queue.sh` and kuard's keygen workers run unchanged against workq.
//!
//! Routes under `/memq/server` (and kuard's `/a`, `/b`, `/c` mounts of the same
//! broker): `PUT|DELETE /queues/{q}`, `POST /queues/{q}/{enqueue,dequeue,drain}`,
//! `GET /stats`. Responses copy kuard's bytes: compact JSON plus `\n` with Go's string
//! escaping, its no-cache headers, 400 with `already exists` / `does not exist`,
//! 204 on an empty dequeue, httprouter's 405 with `Allow` and 404 page.
//!
//! Mapping onto workq (PRODUCT.md "Stats"): dequeue = lease + immediate ack, kuard's
//! at-most-once semantics; depth = ready + delayed; dequeued = deliveries; drained =
//! purged; drain = purge. A message id is the item id as 32 lowercase hex digits and
//! `creationTimestamp` is the enqueue time.
//!
//! Where workq is stricter than kuard it says so in a 4xx: queue names must be 1–128
//! of `A-Za-z0-9._-` (400), a body over the queue's max payload is refused (413), an
//! enqueue into a sealed queue gets 409 and one past max depth 429.

use std::fmt::Write as _;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use axum::{Extension, Router};
use tokio_stream::StreamExt;

use super::{AppState, Peer, metrics, status_of, text_error};
use crate::engine::{LeaseRequest, NewItem, OptionsPatch};
use crate::error::Error;

/// kuard mounts one broker under each of these.
const MOUNTS: [&str; 4] = [
    "/memq/server",
    "/a/memq/server",
    "/b/memq/server",
    "/c/memq/server",
];

/// `Expires` as kuard writes it: the Unix epoch in Go's `time.RFC1123`, UTC zone.
const EPOCH_RFC1123: &str = "Thu, 01 Jan 1970 00:00:00 UTC";

pub fn routes() -> Router<AppState> {
    let mut router = Router::new();
    for base in MOUNTS {
        router = router
            .route(
                &format!("{base}/stats"),
                only(
                    "GET, OPTIONS",
                    on(MethodFilter::GET, stats).on(MethodFilter::HEAD, refuse_head),
                ),
            )
            .route(
                &format!("{base}/queues/{{q}}"),
                only(
                    "DELETE, PUT, OPTIONS",
                    on(MethodFilter::PUT, create).on(MethodFilter::DELETE, delete),
                ),
            )
            .route(
                &format!("{base}/queues/{{q}}/enqueue"),
                post_only(on(MethodFilter::POST, enqueue)),
            )
            .route(
                &format!("{base}/queues/{{q}}/dequeue"),
                post_only(on(MethodFilter::POST, dequeue)),
            )
            .route(
                &format!("{base}/queues/{{q}}/drain"),
                post_only(on(MethodFilter::POST, drain)),
            );
        // httprouter matches an empty `:queue` (a doubled slash), and kuard answers it.
        for op in ["enqueue", "dequeue", "drain"] {
            router = router.route(
                &format!("{base}/queues//{op}"),
                post_only(on(MethodFilter::POST, empty_name)),
            );
        }
    }
    router
}

/// Completes a route's method router the way httprouter does: `OPTIONS` answers 200
/// with `Allow`, any other method 405 with `Allow` and Go's text body.
fn only(allow: &'static str, router: MethodRouter<AppState>) -> MethodRouter<AppState> {
    router.fallback(move |m: Method| wrong_method(m, allow))
}

fn post_only(router: MethodRouter<AppState>) -> MethodRouter<AppState> {
    only("POST, OPTIONS", router)
}

/// axum would serve `HEAD` from the GET handler; httprouter (kuard) answers 405.
async fn refuse_head() -> Response {
    wrong_method(Method::HEAD, "GET, OPTIONS").await
}

async fn wrong_method(method: Method, allow: &'static str) -> Response {
    let mut response = if method == Method::OPTIONS {
        StatusCode::OK.into_response()
    } else {
        text_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
    };
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// Unknown paths, everywhere on the HTTP face: Go's `404 page not found`, after
/// httprouter's two redirects for memq paths (`RedirectTrailingSlash`, then
/// `RedirectFixedPath`: a cleaned, case-insensitive match): 301 for GET, 307 for
/// other methods, only when the fixed path is a route for the same method.
pub async fn fallback(method: Method, uri: Uri) -> Response {
    if let Some(location) = redirect_target(&method, uri.path()) {
        // Go's `http.Redirect` cleans a path it is given (keeping a trailing slash).
        let location = clean_path(&location);
        let location = match uri.query() {
            Some(query) => format!("{location}?{query}"),
            None => location,
        };
        return redirect(&method, &location);
    }
    text_error(StatusCode::NOT_FOUND, "404 page not found")
}

/// The memq route shapes each method has: `None` is a `{q}` segment.
fn shapes(method: &Method) -> &'static [&'static [Option<&'static str>]] {
    const S: Option<&str> = None;
    match *method {
        Method::GET => &[&[Some("stats")]],
        Method::PUT | Method::DELETE => &[&[Some("queues"), S]],
        Method::POST => &[
            &[Some("queues"), S, Some("drain")],
            &[Some("queues"), S, Some("dequeue")],
            &[Some("queues"), S, Some("enqueue")],
        ],
        _ => &[],
    }
}

/// Matches `path` (segments after a mount) against one shape; `exact` compares static
/// segments case-sensitively. Returns the path with the route's own spelling.
fn fit(segments: &[&str], shape: &[Option<&str>], exact: bool) -> Option<String> {
    if segments.len() != shape.len() {
        return None;
    }
    let mut fixed = String::new();
    for (segment, want) in segments.iter().zip(shape) {
        fixed.push('/');
        match want {
            Some(word) if *segment == *word => fixed.push_str(word),
            Some(word) if !exact && segment.eq_ignore_ascii_case(word) => fixed.push_str(word),
            Some(_) => return None,
            None => fixed.push_str(segment),
        }
    }
    Some(fixed)
}

/// Where httprouter would redirect `path`, if anywhere.
fn redirect_target(method: &Method, path: &str) -> Option<String> {
    let routes_for = |candidate: &str, exact: bool| -> Option<String> {
        MOUNTS.iter().find_map(|base| {
            let rest = if exact {
                candidate.strip_prefix(base)?
            } else {
                let head = candidate.get(..base.len())?;
                if !head.eq_ignore_ascii_case(base) {
                    return None;
                }
                &candidate[base.len()..]
            };
            let segments: Vec<&str> = rest.strip_prefix('/')?.split('/').collect();
            shapes(method)
                .iter()
                .find_map(|shape| fit(&segments, shape, exact))
                .map(|fixed| format!("{base}{fixed}"))
        })
    };
    // 1. Trailing slash: the same path with one added or removed is a route.
    let toggled = match path.strip_suffix('/') {
        Some(stripped) if !stripped.is_empty() => stripped.to_string(),
        Some(_) => return None,
        None => format!("{path}/"),
    };
    if let Some(target) = routes_for(&toggled, true) {
        return Some(target);
    }
    // 2. The cleaned path, case-insensitively, with or without its trailing slash.
    let cleaned = clean_path(path);
    let bare = cleaned.strip_suffix('/').unwrap_or(&cleaned);
    routes_for(bare, false).filter(|target| target != path)
}

/// Go's `path.Clean` as httprouter's `CleanPath` uses it: no `.`, `..` or empty
/// segments, a leading slash, and the trailing slash kept.
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    let mut cleaned = format!("/{}", parts.join("/"));
    if path.ends_with('/') && cleaned.len() > 1 {
        cleaned.push('/');
    }
    cleaned
}

/// Go's `http.Redirect`: `Location`, and for GET a tiny HTML body.
fn redirect(method: &Method, location: &str) -> Response {
    let status = if *method == Method::GET {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::TEMPORARY_REDIRECT
    };
    let mut response = if *method == Method::GET {
        let href = location
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&#34;")
            .replace('\'', "&#39;");
        let text = status.canonical_reason().unwrap_or_default();
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            format!("<a href=\"{href}\">{text}</a>.\n\n"),
        )
            .into_response()
    } else {
        status.into_response()
    };
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

async fn empty_name() -> Response {
    text_error(StatusCode::BAD_REQUEST, "empty name")
}

// ---- handlers ---------------------------------------------------------------------

async fn stats(State(state): State<AppState>) -> Response {
    let mut json = String::from(r#"{"kind":"stats","queues":["#);
    for (i, view) in state.engine.list_queues().iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        let s = &view.stats;
        json.push_str(r#"{"name":"#);
        push_go_string(&mut json, view.name.as_bytes());
        let _ = write!(
            json,
            r#","depth":{},"enqueued":{},"dequeued":{},"drained":{}}}"#,
            s.ready + s.delayed,
            s.counters.enqueued,
            s.counters.deliveries,
            s.counters.purged
        );
    }
    json.push_str("]}");
    json_response(json)
}

async fn create(State(state): State<AppState>, QueueName(name): QueueName) -> Response {
    ok_or_memq_error(
        state
            .engine
            .create_queue(&name, &OptionsPatch::default(), false)
            .await,
    )
}

async fn delete(State(state): State<AppState>, QueueName(name): QueueName) -> Response {
    ok_or_memq_error(state.engine.delete_queue(&name).await)
}

async fn drain(State(state): State<AppState>, QueueName(name): QueueName) -> Response {
    ok_or_memq_error(state.engine.purge(&name).await)
}

async fn enqueue(
    State(state): State<AppState>,
    QueueName(name): QueueName,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let max = match state.engine.get_queue(&name) {
        Ok(view) => view.options.max_payload_bytes,
        Err(e) => return memq_error(e),
    };
    let too_large = || {
        text_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "payload too large: queue '{name}' accepts at most {max} bytes per item \
                 (its max payload option)"
            ),
        )
    };
    // Refuse before reading when the client announces the size (curl then never
    // sends a large body it was about to `Expect: 100-continue`).
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max) {
        return too_large();
    }
    let mut payload = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => {
                if (payload.len() + bytes.len()) as u64 > max {
                    return too_large();
                }
                payload.extend_from_slice(&bytes);
            }
            Err(e) => {
                return text_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("reading the request body: {e}"),
                );
            }
        }
    }
    let item: NewItem = NewItem {
        payload: payload.into(),
        ..NewItem::default()
    };
    let body_bytes = item.payload.clone();
    match state.engine.enqueue(&name, vec![item], false).await {
        Ok(results) => match results.first() {
            Some(e) => json_response(message_json(e.id, &body_bytes, e.enqueued_ms)),
            None => text_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "enqueue returned no item",
            ),
        },
        Err(e) => memq_error(e),
    }
}

async fn dequeue(
    State(state): State<AppState>,
    QueueName(name): QueueName,
    peer: Option<Extension<ConnectInfo<Peer>>>,
) -> Response {
    // One worker row per client host (a kuard pod), not per connection.
    let worker = match peer {
        Some(Extension(ConnectInfo(Peer(addr)))) => format!("memq:{}", addr.ip()),
        None => "memq-http".to_string(),
    };
    let request = LeaseRequest {
        worker,
        max_items: 1,
        lease_timeout_ms: 0,
        wait_ms: 0,
    };
    let outcome = match metrics::LEASE
        .time(state.engine.lease(&name, request))
        .await
    {
        Ok(outcome) => outcome,
        Err(e) => return memq_error(e),
    };
    let Some(granted) = outcome.granted.into_iter().next() else {
        return StatusCode::NO_CONTENT.into_response();
    };
    // kuard's dequeue is destructive: complete the item at once. Should the ack fail
    // (shutdown), the lease expires and the item comes back: nothing is lost.
    let ack = state
        .engine
        .ack(&name, granted.id, granted.token, Vec::new());
    match metrics::ACK.time(ack).await {
        Ok(()) => json_response(message_json(
            granted.id,
            &granted.payload,
            granted.enqueued_ms,
        )),
        Err(e) => memq_error(e),
    }
}

// ---- shapes and errors --------------------------------------------------------------

/// The `{q}` segment, checked against workq's (stricter than kuard's) name rules;
/// anything else is refused with a 400 and its reason.
struct QueueName(String);

impl<S: Send + Sync> FromRequestParts<S> for QueueName {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let refuse = |message: &str| text_error(StatusCode::BAD_REQUEST, message);
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| refuse(&e.body_text()))?;
        if name.is_empty() {
            return Err(refuse("empty name"));
        }
        crate::engine::limits::check_queue_name(&name)
            .map_err(|e| refuse(&format!("{e}; workq queue names are stricter than kuard's")))?;
        Ok(QueueName(name))
    }
}

/// A bare 200, as kuard answers a queue's create, delete and drain.
fn ok_or_memq_error<T>(result: Result<T, Error>) -> Response {
    match result {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => memq_error(e),
    }
}

/// kuard's two error bodies; everything else keeps workq's status and message.
fn memq_error(error: Error) -> Response {
    match error {
        Error::QueueNotFound(_) => text_error(StatusCode::BAD_REQUEST, "does not exist"),
        Error::QueueExists(_) => text_error(StatusCode::BAD_REQUEST, "already exists"),
        other => text_error(status_of(&other), &other.to_string()),
    }
}

/// A 200 with kuard's `apiutils.ServeJSON` headers; `json` gets Go's trailing newline.
fn json_response(mut json: String) -> Response {
    json.push('\n');
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache, private, max-age=0"),
            (header::EXPIRES, EPOCH_RFC1123),
            (header::PRAGMA, "no-cache"),
        ],
        json,
    )
        .into_response()
}

/// `{"kind":"message","id":…,"body":…,"creationTimestamp":…}` in kuard's field order.
pub fn message_json(id: u64, body: &[u8], enqueued_ms: u64) -> String {
    let mut json = format!(r#"{{"kind":"message","id":"{id:032x}","body":"#);
    push_go_string(&mut json, body);
    let _ = write!(
        json,
        r#","creationTimestamp":"{}"}}"#,
        rfc3339_utc(enqueued_ms)
    );
    json
}

/// Appends `bytes` as a JSON string exactly as Go's `encoding/json` (the version kuard
/// was built with) writes it: `<`, `>`, `&`, U+2028 and U+2029 as `\u` escapes,
/// control characters other than `\n`, `\r`, `\t` as `\u00XX`, and each byte of
/// invalid UTF-8 as `\ufffd`.
pub fn push_go_string(out: &mut String, bytes: &[u8]) {
    out.push('"');
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => out.push(c),
            }
        }
        // Go decodes rune by rune: every byte that does not start a valid sequence
        // becomes one replacement character.
        for _ in chunk.invalid() {
            out.push_str("\\ufffd");
        }
    }
    out.push('"');
}

/// RFC 3339 in UTC with Go's `RFC3339Nano` fraction rule (trailing zeros trimmed, no
/// fraction when it is zero), from Unix milliseconds.
pub fn rfc3339_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let millis = unix_ms % 1000;
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    if millis != 0 {
        let fraction = format!("{millis:03}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_fixed_like_httprouter() {
        let target = |m: Method, p: &str| redirect_target(&m, p);
        assert_eq!(
            target(Method::GET, "/memq/server/stats/").as_deref(),
            Some("/memq/server/stats")
        );
        assert_eq!(
            target(Method::POST, "/memq/server/queues/q1/enqueue/").as_deref(),
            Some("/memq/server/queues/q1/enqueue")
        );
        assert_eq!(
            target(Method::GET, "/MEMQ/Server/STATS").as_deref(),
            Some("/memq/server/stats")
        );
        assert_eq!(
            target(Method::PUT, "/memq/server//queues/./KeyGen").as_deref(),
            Some("/memq/server/queues/KeyGen"),
            "the queue name keeps its case"
        );
        assert_eq!(
            target(Method::GET, "/b/memq/server/x/../stats").as_deref(),
            Some("/b/memq/server/stats")
        );
        // Only to a route of the same method; PUT /queues/ has no name: 404.
        assert_eq!(target(Method::POST, "/memq/server/stats/"), None);
        assert_eq!(target(Method::PUT, "/memq/server/queues/"), None);
        assert_eq!(target(Method::GET, "/nothing/here"), None);
        assert_eq!(target(Method::GET, "/"), None);
        assert_eq!(clean_path("/a//b/./c/../d/"), "/a/b/d/");
    }

    fn go(bytes: &[u8]) -> String {
        let mut out = String::new();
        push_go_string(&mut out, bytes);
        out
    }

    #[test]
    fn strings_are_escaped_like_go() {
        assert_eq!(go(b"work-item-0"), r#""work-item-0""#);
        assert_eq!(
            go(b"<a href=\"x\">&</a>"),
            r#""\u003ca href=\"x\"\u003e\u0026\u003c/a\u003e""#
        );
        assert_eq!(go(b"a\nb\rc\td\\e"), r#""a\nb\rc\td\\e""#);
        assert_eq!(
            go(b"\x00\x08\x0c\x1f\x7f"),
            "\"\\u0000\\u0008\\u000c\\u001f\x7f\""
        );
        assert_eq!(go("é \u{2028}\u{2029}".as_bytes()), "\"é \\u2028\\u2029\"");
        // One replacement per invalid byte, as Go's rune-by-rune decoder does.
        assert_eq!(go(b"a\xffb"), r#""a\ufffdb""#);
        assert_eq!(go(b"\xe2\x82"), r#""\ufffd\ufffd""#);
        assert_eq!(go(b"\xed\xa0\x80"), r#""\ufffd\ufffd\ufffd""#);
    }

    #[test]
    fn timestamps_are_rfc3339_with_trimmed_fractions() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(1_552_857_803_523), "2019-03-17T21:23:23.523Z");
        assert_eq!(rfc3339_utc(1_552_857_803_520), "2019-03-17T21:23:23.52Z");
        assert_eq!(rfc3339_utc(1_552_857_803_500), "2019-03-17T21:23:23.5Z");
        assert_eq!(rfc3339_utc(951_782_400_001), "2000-02-29T00:00:00.001Z");
        assert_eq!(rfc3339_utc(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn messages_keep_kuards_field_order() {
        assert_eq!(
            message_json(255, b"work-item-7", 1_552_857_803_523),
            r#"{"kind":"message","id":"000000000000000000000000000000ff","body":"work-item-7","creationTimestamp":"2019-03-17T21:23:23.523Z"}"#
        );
    }
}
