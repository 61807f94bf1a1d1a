//! The HTTP face on `--http-addr` (PRODUCT.md "HTTP face"):
//!
//! - [`memq`]: kuard's memq API under `/memq/server`, byte-compatible;
//! - [`api`]: the JSON API the dashboard polls (`/api/v1/...`);
//! - [`metrics`]: `GET /metrics` in Prometheus text, and the latency histograms that
//!   the gRPC service records into;
//! - [`dashboard`]: `GET /`, one embedded page;
//! - `/healthz` and `/readyz` for Kubernetes probes.
//!
//! Like the gRPC service, every handler here is a thin adapter: it converts, asks the
//! engine (the single writer of queue state) for a transition, and maps domain errors
//! to statuses in one place ([`status_of`]).
//!
//! Auth: with `--token-file`, every route that reads or changes queue data (memq, the
//! JSON API and `/metrics`) needs `authorization: Bearer <token>`, as PRODUCT.md
//! "Security" says of every HTTP API call. The probes stay open, and so do the
//! dashboard's static files, which hold no data: the page asks for the token and sends
//! it with each API call. kuard's own keygen binary cannot send a token, so a
//! coordinator that serves kuard workers runs without `--token-file`.

pub mod api;
pub mod dashboard;
pub mod idle;
pub mod memq;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use tokio::net::TcpListener;

use crate::auth::Auth;
use crate::engine::Engine;
use crate::error::Error;
use crate::tls::TlsListener;
use idle::Idle;

/// The client's address, whichever way the port is served (plain or TLS): memq names
/// a worker after it.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, Idle<TcpListener>>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Idle<TcpListener>>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, Idle<TlsListener>>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Idle<TlsListener>>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

/// Shared state of every HTTP handler.
#[derive(Clone, Debug)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub auth: Auth,
}

pub fn router(engine: Arc<Engine>, auth: Auth) -> Router {
    let state = AppState { engine, auth };
    // Data routes: behind the bearer token when one is configured. `route_layer` runs
    // the check only for matched routes, so unknown paths still answer 404.
    let data = memq::routes()
        .merge(api::routes())
        .route("/metrics", get(metrics::render))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(dashboard::routes())
        .merge(data)
        .fallback(memq::fallback)
        .layer(middleware::from_fn(api_errors_as_json))
        .with_state(state)
}

/// Under `/api/`, every error is JSON, `{"error": …}`, as the API's module promises.
/// Its handlers write theirs so; this rewrites the rest (a path segment the router
/// could not decode, an unknown route, a method a route does not take, a missing
/// token), keeping each one's status and headers (`Allow`, `WWW-Authenticate`).
async fn api_errors_as_json(request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with("/api/") {
        return next.run(request).await;
    }
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Such bodies are a line or two: axum's rejections, the token check's reason.
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
        .unwrap_or_default();
    let message = match status {
        StatusCode::NOT_FOUND => format!("no API route {path}"),
        // axum adds the `Allow` header past this layer.
        StatusCode::METHOD_NOT_ALLOWED => {
            format!("{method} is not allowed on {path} (its Allow header says what is)")
        }
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_string(),
        _ => text,
    };
    let body = serde_json::json!({ "error": message }).to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::X_CONTENT_TYPE_OPTIONS);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The one mapping from domain errors to HTTP statuses (the memq face then rewrites
/// kuard's two 400 cases to its exact bodies).
pub fn status_of(error: &Error) -> StatusCode {
    match error {
        Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        Error::QueueNotFound(_) | Error::ItemNotFound { .. } | Error::ScheduleNotFound(_) => {
            StatusCode::NOT_FOUND
        }
        Error::QueueExists(_)
        | Error::ScheduleExists(_)
        | Error::LeaseLost(_)
        | Error::Sealed(_)
        | Error::FailedPrecondition(_) => StatusCode::CONFLICT,
        Error::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::ShuttingDown | Error::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A plain-text error the way Go's `http.Error` writes it (kuard's format): the
/// message and a newline, `text/plain; charset=utf-8`, `X-Content-Type-Options:
/// nosniff`.
pub fn text_error(status: StatusCode, message: &str) -> Response {
    let mut body = message.to_string();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// Refuses a data route without the configured bearer token (401 with the reason).
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let presented = request.headers().get_all(header::AUTHORIZATION);
    match state.auth.check(presented.iter().map(|v| v.as_bytes())) {
        Ok(()) => next.run(request).await,
        Err(message) => {
            let mut response = text_error(StatusCode::UNAUTHORIZED, message);
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"workq\""),
            );
            response
        }
    }
}

/// Alive: the process is serving HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready: the store is healthy and the coordinator is not shutting down.
async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.engine.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if !state.engine.store().healthy() {
        (StatusCode::SERVICE_UNAVAILABLE, "storage failed\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}
