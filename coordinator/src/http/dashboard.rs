//! `GET /`: the dashboard, one page a person leaves open during a batch run.
//!
//! Plain HTML, CSS and JavaScript compiled into the binary with `include_str!`: no
//! build step, no external assets, so it works on an air-gapped cluster. The page
//! polls the JSON API ([`super::api`]) once a second. These static files hold no
//! queue data and are served without auth; with `--token-file` the page asks for the
//! token, keeps it in the browser's localStorage and sends it as a Bearer header.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::AppState;

const HTML: &str = include_str!("dashboard.html");
const JS: &str = include_str!("dashboard.js");
const CSS: &str = include_str!("dashboard.css");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/dashboard.js", get(script))
        .route("/dashboard.css", get(style))
}

/// The page must never be framed or sniffed; it only talks to its own origin.
const SECURITY: [(header::HeaderName, &str); 3] = [
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    ),
];

async fn page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        SECURITY,
        HTML,
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SECURITY,
        JS,
    )
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        SECURITY,
        CSS,
    )
}
