//! The HTTP face on `--http-addr`: health probes now; the kuard memq API, metrics,
//! JSON API and dashboard are added here as their own modules.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::auth::Auth;
use crate::engine::Engine;

/// Shared state of every HTTP handler.
#[derive(Clone, Debug)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub auth: Auth,
}

pub fn router(engine: Arc<Engine>, auth: Auth) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { engine, auth })
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
