//! The JSON API behind the dashboard (`/api/v1/...`): what `queue-cli stats`,
//! `workers`, `items --state dead` and `requeue` show over gRPC, for a browser.
//!
//! - `GET  /api/v1/queues`: every queue with options and stats;
//! - `GET  /api/v1/queues/{q}`: one queue;
//! - `GET  /api/v1/queues/{q}/workers`, `GET /api/v1/workers[?queue=Q]`: workers with
//!   the items they hold;
//! - `GET  /api/v1/queues/{q}/items?state=dead&after=ID&limit=N`: a page of items;
//! - `POST /api/v1/queues/{q}/requeue` with `{"ids":[…]}` or `{"all_dead":true}`;
//! - `GET  /api/v1/schedules[?queue=Q]`: schedules with their last runs.
//!
//! Times are Unix milliseconds; `now_ms` in listings lets a client compute ages with
//! the server's clock. Item ids are JSON numbers (ids count up from 1, far below 2^53).
//! Errors are `{"error": "..."}` with the status from [`super::status_of`].

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::{AppState, status_of};
use crate::engine::{self, Engine, QueueView, State as ItemState, WorkerRow};
use crate::error::Error;

/// Longest payload excerpt shown per item.
const PREVIEW_BYTES: usize = 256;
/// Item ids listed per worker under `holding` (the count is always exact).
const HOLDING_SHOWN: usize = 50;
/// LEASED items looked at per queue to fill `holding`: the dashboard polls every
/// second, so the scan is bounded; past it `holding` may miss ids while
/// `in_flight` stays exact.
const HOLDING_SCAN: usize = 5_000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/queues", get(list_queues))
        .route("/api/v1/queues/{q}", get(get_queue))
        .route("/api/v1/queues/{q}/workers", get(queue_workers))
        .route("/api/v1/workers", get(all_workers))
        .route("/api/v1/queues/{q}/items", get(list_items))
        .route("/api/v1/queues/{q}/requeue", post(requeue))
        .route("/api/v1/schedules", get(list_schedules))
}

/// A JSON error reply.
struct ApiError(StatusCode, String);

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError(status_of(&error), error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

#[derive(Serialize)]
struct QueueJson {
    name: String,
    created_ms: u64,
    options: OptionsJson,
    stats: StatsJson,
}

#[derive(Serialize)]
struct OptionsJson {
    lease_timeout_ms: u64,
    max_attempts: u32,
    backoff_base_ms: u64,
    backoff_cap_ms: u64,
    max_payload_bytes: u64,
    max_depth: u64,
    retention_ms: u64,
}

#[derive(Serialize)]
struct StatsJson {
    ready: u64,
    delayed: u64,
    leased: u64,
    done: u64,
    dead: u64,
    sealed: bool,
    drained: bool,
    total_enqueued: u64,
    total_deliveries: u64,
    total_completed: u64,
    total_failed: u64,
    total_expired: u64,
    total_dead: u64,
    total_purged: u64,
    total_deduplicated: u64,
    oldest_ready_age_ms: u64,
    /// Completions per second over the last 10 s and 1 min.
    rate_10s: f64,
    rate_1m: f64,
    /// 0 when unknown (no recent completions) or drained.
    eta_ms: u64,
    workers: u32,
}

impl QueueJson {
    fn from_view(view: QueueView) -> QueueJson {
        let o = &view.options;
        let s = &view.stats;
        let c = &s.counters;
        QueueJson {
            options: OptionsJson {
                lease_timeout_ms: o.lease_timeout_ms,
                max_attempts: o.max_attempts,
                backoff_base_ms: o.backoff_base_ms,
                backoff_cap_ms: o.backoff_cap_ms,
                max_payload_bytes: o.max_payload_bytes,
                max_depth: o.max_depth,
                retention_ms: o.retention_ms,
            },
            stats: StatsJson {
                ready: s.ready,
                delayed: s.delayed,
                leased: s.leased,
                done: s.done,
                dead: s.dead,
                sealed: s.sealed,
                drained: s.drained,
                total_enqueued: c.enqueued,
                total_deliveries: c.deliveries,
                total_completed: c.completed,
                total_failed: c.failed,
                total_expired: c.expired,
                total_dead: c.dead,
                total_purged: c.purged,
                total_deduplicated: c.deduplicated,
                oldest_ready_age_ms: s.oldest_ready_age_ms,
                rate_10s: s.rate_10s,
                rate_1m: s.rate_1m,
                eta_ms: s.eta_ms,
                workers: s.workers,
            },
            created_ms: view.created_ms,
            name: view.name,
        }
    }
}

#[derive(Serialize)]
struct QueueList {
    now_ms: u64,
    queues: Vec<QueueJson>,
}

async fn list_queues(State(state): State<AppState>) -> Json<QueueList> {
    let now_ms = state.engine.now_ms();
    let queues = state
        .engine
        .list_queues()
        .into_iter()
        .map(QueueJson::from_view)
        .collect();
    Json(QueueList { now_ms, queues })
}

async fn get_queue(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<QueueJson> {
    Ok(Json(QueueJson::from_view(state.engine.get_queue(&name)?)))
}

#[derive(Serialize)]
struct ScheduleJson {
    name: String,
    queue: String,
    cron: String,
    time_zone: String,
    policy: &'static str,
    count: u32,
    starting_deadline_ms: u64,
    suspended: bool,
    created_ms: u64,
    /// 0 while suspended.
    next_run_ms: u64,
    enqueued_runs: u64,
    skipped_runs: u64,
    missed_runs: u64,
    failed_runs: u64,
    /// The most recent first.
    runs: Vec<RunJson>,
}

#[derive(Serialize)]
struct RunJson {
    scheduled_ms: u64,
    ran_ms: u64,
    outcome: &'static str,
    items: u32,
    replaced: u32,
    detail: String,
}

#[derive(Serialize)]
struct ScheduleList {
    now_ms: u64,
    schedules: Vec<ScheduleJson>,
}

#[derive(Deserialize)]
struct SchedulesQuery {
    queue: Option<String>,
}

async fn list_schedules(
    State(state): State<AppState>,
    query: Result<Query<SchedulesQuery>, QueryRejection>,
) -> ApiResult<ScheduleList> {
    use crate::engine::schedules::{Outcome, Policy};
    let Query(query) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let queue = query.queue.as_deref().filter(|q| !q.is_empty());
    let views = state.engine.list_schedules(queue).await?;
    let schedules = views
        .into_iter()
        .map(|view| {
            let r = view.record;
            ScheduleJson {
                policy: Policy::from_code(r.policy).map_or("Allow", Policy::name),
                runs: r
                    .runs
                    .into_iter()
                    .map(|run| RunJson {
                        scheduled_ms: run.scheduled_ms,
                        ran_ms: run.ran_ms,
                        outcome: Outcome::from_code(run.outcome).map_or("unknown", Outcome::name),
                        items: run.items,
                        replaced: run.replaced,
                        detail: run.detail,
                    })
                    .collect(),
                name: r.name,
                queue: r.queue,
                cron: r.cron,
                time_zone: r.time_zone,
                count: r.count,
                starting_deadline_ms: r.starting_deadline_ms,
                suspended: r.suspended,
                created_ms: r.created_ms,
                next_run_ms: view.next_run_ms.unwrap_or(0),
                enqueued_runs: r.enqueued_runs,
                skipped_runs: r.skipped_runs,
                missed_runs: r.missed_runs,
                failed_runs: r.failed_runs,
            }
        })
        .collect();
    Ok(Json(ScheduleList {
        now_ms: state.engine.now_ms(),
        schedules,
    }))
}

#[derive(Serialize)]
struct WorkerJson {
    queue: String,
    id: String,
    last_seen_ms: u64,
    in_flight: u64,
    completed: u64,
    /// Ids of the items this worker holds (at most [`HOLDING_SHOWN`]).
    holding: Vec<u64>,
}

#[derive(Serialize)]
struct WorkerList {
    now_ms: u64,
    workers: Vec<WorkerJson>,
}

#[derive(Deserialize)]
struct WorkersQuery {
    queue: Option<String>,
}

async fn queue_workers(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<WorkerList> {
    workers(&state.engine, Some(&name))
}

async fn all_workers(
    State(state): State<AppState>,
    query: Result<Query<WorkersQuery>, QueryRejection>,
) -> ApiResult<WorkerList> {
    let Query(query) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let name = query.queue.filter(|q| !q.is_empty());
    workers(&state.engine, name.as_deref())
}

fn workers(engine: &Engine, name: Option<&str>) -> ApiResult<WorkerList> {
    let rows: Vec<WorkerRow> = engine.workers(name)?;
    // What each worker holds: the LEASED items of its queues, grouped by lease holder.
    let mut holding: HashMap<(String, String), Vec<u64>> = HashMap::new();
    let mut queues: Vec<&str> = rows.iter().map(|r| r.queue.as_str()).collect();
    queues.dedup();
    for queue in queues {
        let (mut after, mut scanned) = (0, 0);
        while scanned < HOLDING_SCAN {
            let (items, next) = match engine.list_items(
                queue,
                Some(ItemState::Leased),
                after,
                engine::limits::MAX_LIST_LIMIT,
                false,
            ) {
                Ok(page) => page,
                // Deleted since the worker listing: it holds nothing there any more.
                Err(Error::QueueNotFound(_)) => break,
                Err(e) => return Err(e.into()),
            };
            scanned += items.len();
            for item in items {
                if let Some(lease) = item.lease {
                    let ids = holding
                        .entry((queue.to_string(), lease.worker.to_string()))
                        .or_default();
                    if ids.len() < HOLDING_SHOWN {
                        ids.push(item.id);
                    }
                }
            }
            if next == 0 {
                break;
            }
            after = next;
        }
    }
    let workers = rows
        .into_iter()
        .map(|row| WorkerJson {
            holding: holding
                .remove(&(row.queue.clone(), row.id.clone()))
                .unwrap_or_default(),
            queue: row.queue,
            id: row.id,
            last_seen_ms: row.info.last_seen_ms,
            in_flight: row.info.in_flight,
            completed: row.info.completed,
        })
        .collect();
    Ok(Json(WorkerList {
        now_ms: engine.now_ms(),
        workers,
    }))
}

#[derive(Deserialize)]
struct ItemsQuery {
    state: Option<String>,
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: u32,
}

#[derive(Serialize)]
struct ItemJson {
    id: u64,
    state: &'static str,
    attempts: u32,
    priority: i32,
    key: String,
    enqueued_ms: u64,
    /// When a DELAYED item becomes READY (0 otherwise).
    ready_at_ms: u64,
    lease_deadline_ms: u64,
    done_ms: u64,
    worker: String,
    last_error: String,
    payload_bytes: usize,
    /// The payload's first bytes as text (invalid UTF-8 replaced).
    payload_preview: String,
    result_preview: String,
}

#[derive(Serialize)]
struct ItemList {
    now_ms: u64,
    items: Vec<ItemJson>,
    /// Pass as `after` for the next page; 0 when this was the last one.
    next_after: u64,
}

fn preview(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(PREVIEW_BYTES)];
    let mut text = String::from_utf8_lossy(cut).into_owned();
    if bytes.len() > PREVIEW_BYTES {
        text.push('…');
    }
    text
}

fn parse_state(text: &str) -> Result<Option<ItemState>, ApiError> {
    Ok(Some(match text.to_ascii_lowercase().as_str() {
        "" | "all" => return Ok(None),
        "ready" => ItemState::Ready,
        "delayed" => ItemState::Delayed,
        "leased" => ItemState::Leased,
        "done" => ItemState::Done,
        "dead" => ItemState::Dead,
        other => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown item state '{other}' (use ready, delayed, leased, done, dead or all)"
                ),
            ));
        }
    }))
}

async fn list_items(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<ItemsQuery>, QueryRejection>,
) -> ApiResult<ItemList> {
    let Query(query) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let filter = parse_state(query.state.as_deref().unwrap_or(""))?;
    let (items, next_after) =
        state
            .engine
            .list_items(&name, filter, query.after, query.limit, true)?;
    let items = items
        .into_iter()
        .map(|item| {
            let outcome = item.outcome.map(|o| *o).unwrap_or_default();
            ItemJson {
                id: item.id,
                state: engine::queue::state_name(item.state),
                attempts: item.attempts,
                priority: item.priority,
                enqueued_ms: item.enqueued_ms,
                ready_at_ms: if item.state == ItemState::Delayed {
                    item.ready_at_ms
                } else {
                    0
                },
                lease_deadline_ms: item.lease.as_ref().map_or(0, |l| l.deadline_ms),
                done_ms: outcome.done_ms,
                payload_bytes: item.payload.len(),
                payload_preview: preview(&item.payload),
                result_preview: preview(&outcome.result),
                key: item.key,
                worker: outcome.worker.to_string(),
                last_error: outcome.last_error,
            }
        })
        .collect();
    Ok(Json(ItemList {
        now_ms: state.engine.now_ms(),
        items,
        next_after,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequeueBody {
    #[serde(default)]
    ids: Vec<u64>,
    #[serde(default)]
    all_dead: bool,
}

#[derive(Serialize)]
struct Requeued {
    requeued: u64,
}

async fn requeue(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<RequeueBody>, JsonRejection>,
) -> ApiResult<Requeued> {
    let Json(body) = body.map_err(|e| match e.status() {
        // The body limit (axum's 2 MB): far more than 10,000 ids need.
        StatusCode::PAYLOAD_TOO_LARGE => ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{}: one requeue takes at most {} ids",
                e.body_text(),
                engine::limits::MAX_REQUEUE_IDS
            ),
        ),
        _ => ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "{}: send {{\"ids\":[1,2]}} or {{\"all_dead\":true}} as application/json",
                e.body_text()
            ),
        ),
    })?;
    let requeued = state
        .engine
        .requeue(&name, &body.ids, body.all_dead)
        .await?;
    Ok(Json(Requeued { requeued }))
}
