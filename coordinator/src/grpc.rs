//! The `workq.v1.WorkQ` gRPC service: a thin adapter that converts messages, asks the
//! engine, and maps domain errors to status codes in exactly one place ([`status`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use workq_proto::pb;

use crate::engine::schedules::{NewSchedule, Policy, ScheduleView};
use crate::engine::{self, Engine, OptionsPatch, QueueView};
use crate::error::Error;
use crate::http::metrics;
use crate::stream::EnqueueInput;

/// The one mapping from domain errors to gRPC status codes.
pub fn status(error: Error) -> Status {
    let message = error.to_string();
    match error {
        Error::InvalidArgument(_) => Status::invalid_argument(message),
        Error::QueueNotFound(_) | Error::ItemNotFound { .. } | Error::ScheduleNotFound(_) => {
            Status::not_found(message)
        }
        Error::QueueExists(_) | Error::ScheduleExists(_) => Status::already_exists(message),
        Error::LeaseLost(_) | Error::Sealed(_) | Error::FailedPrecondition(_) => {
            Status::failed_precondition(message)
        }
        Error::ResourceExhausted(_) => Status::resource_exhausted(message),
        // A storage failure stops the coordinator (its log refuses every write from
        // then on) and its supervisor starts it again: to a client it is a coordinator
        // that is going away, to be retried with backoff, and the message says whether
        // the change is on disk.
        Error::ShuttingDown | Error::Storage(_) => Status::unavailable(message),
    }
}

#[derive(Clone, Debug)]
pub struct Service {
    engine: Arc<Engine>,
}

impl Service {
    pub fn new(engine: Arc<Engine>) -> Service {
        Service { engine }
    }
}

type Reply<T> = Result<Response<T>, Status>;

impl Service {
    async fn set_suspended(&self, name: String, suspended: bool) -> Reply<pb::Schedule> {
        reply(
            self.engine
                .set_schedule_suspended(&name, suspended)
                .await
                .map(schedule_pb),
        )
    }
}

fn reply<T>(result: crate::Result<T>) -> Reply<T> {
    result.map(Response::new).map_err(status)
}

pub fn options_patch(options: Option<pb::QueueOptions>, clear_max_depth: bool) -> OptionsPatch {
    let o = options.unwrap_or_default();
    let some = |v: u64| (v != 0).then_some(v);
    OptionsPatch {
        lease_timeout_ms: some(o.lease_timeout_ms),
        max_attempts: (o.max_attempts != 0).then_some(o.max_attempts),
        backoff_base_ms: some(o.backoff_base_ms),
        backoff_cap_ms: some(o.backoff_cap_ms),
        max_payload_bytes: some(o.max_payload_bytes),
        max_depth: if clear_max_depth {
            Some(0)
        } else {
            some(o.max_depth)
        },
        retention_ms: some(o.retention_ms),
    }
}

pub fn options_pb(o: &engine::Options) -> pb::QueueOptions {
    pb::QueueOptions {
        lease_timeout_ms: o.lease_timeout_ms,
        max_attempts: o.max_attempts,
        backoff_base_ms: o.backoff_base_ms,
        backoff_cap_ms: o.backoff_cap_ms,
        max_payload_bytes: o.max_payload_bytes,
        max_depth: o.max_depth,
        retention_ms: o.retention_ms,
    }
}

pub fn stats_pb(queue: &str, s: &engine::Stats, at_ms: u64) -> pb::QueueStats {
    pb::QueueStats {
        queue: queue.to_string(),
        ready: s.ready,
        delayed: s.delayed,
        leased: s.leased,
        done: s.done,
        dead: s.dead,
        sealed: s.sealed,
        drained: s.drained,
        total_enqueued: s.counters.enqueued,
        total_deliveries: s.counters.deliveries,
        total_completed: s.counters.completed,
        total_failed: s.counters.failed,
        total_expired: s.counters.expired,
        total_dead: s.counters.dead,
        total_purged: s.counters.purged,
        total_deduplicated: s.counters.deduplicated,
        oldest_ready_age_ms: s.oldest_ready_age_ms,
        rate_10s: s.rate_10s,
        rate_1m: s.rate_1m,
        eta_ms: s.eta_ms,
        workers: s.workers,
        at_ms,
    }
}

fn queue_pb(view: QueueView, now: u64) -> pb::QueueInfo {
    pb::QueueInfo {
        stats: Some(stats_pb(&view.name, &view.stats, now)),
        options: Some(options_pb(&view.options)),
        created_at_ms: view.created_ms,
        name: view.name,
    }
}

pub fn state_pb(state: engine::State) -> pb::ItemState {
    match state {
        engine::State::Ready => pb::ItemState::Ready,
        engine::State::Delayed => pb::ItemState::Delayed,
        engine::State::Leased => pb::ItemState::Leased,
        engine::State::Done => pb::ItemState::Done,
        engine::State::Dead => pb::ItemState::Dead,
    }
}

pub fn item_pb(queue: &str, item: engine::Item) -> pb::Item {
    let lease = item.lease.as_ref();
    let outcome = item.outcome.map(|o| *o).unwrap_or_default();
    pb::Item {
        id: item.id,
        queue: queue.to_string(),
        state: state_pb(item.state) as i32,
        priority: item.priority,
        attempts: item.attempts,
        enqueued_at_ms: item.enqueued_ms,
        ready_at_ms: if item.state == engine::State::Delayed {
            item.ready_at_ms
        } else {
            0
        },
        lease_deadline_at_ms: lease.map_or(0, |l| l.deadline_ms),
        worker_id: outcome.worker.to_string(),
        done_at_ms: outcome.done_ms,
        payload: item.payload,
        key: item.key,
        result: outcome.result,
        last_error: outcome.last_error,
    }
}

pub fn enqueue_response(results: Vec<engine::Enqueued>) -> pb::EnqueueResponse {
    pb::EnqueueResponse {
        results: results.into_iter().map(enqueue_result_pb).collect(),
    }
}

pub fn enqueue_result_pb(e: engine::Enqueued) -> pb::EnqueueResult {
    pb::EnqueueResult {
        id: e.id,
        deduplicated: e.deduplicated,
        created_at_ms: e.enqueued_ms,
    }
}

pub fn lease_pb(g: engine::Granted) -> pb::Lease {
    pb::Lease {
        id: g.id,
        token: g.token,
        attempt: g.attempt,
        payload: g.payload,
        priority: g.priority,
        deadline_at_ms: g.deadline_ms,
        key: g.key,
        enqueued_at_ms: g.enqueued_ms,
    }
}

pub fn settlement_from_pb(s: pb::Settlement) -> engine::Settlement {
    let Ok(action) = pb::SettleAction::try_from(s.action) else {
        // Refused for this item alone: an unknown action must not ack anything.
        return engine::Settlement {
            id: s.id,
            token: s.token,
            action: engine::SettleAction::Invalid(s.action),
        };
    };
    let action = match action {
        pb::SettleAction::Ack => engine::SettleAction::Ack { result: s.result },
        pb::SettleAction::Fail => engine::SettleAction::Fail {
            error: s.error,
            permanent: false,
            delay_ms: s.delay_ms,
        },
        pb::SettleAction::FailPermanent => engine::SettleAction::Fail {
            error: s.error,
            permanent: true,
            delay_ms: s.delay_ms,
        },
        pb::SettleAction::Release => engine::SettleAction::Release,
        pb::SettleAction::Extend => engine::SettleAction::Extend {
            lease_timeout_ms: s.lease_timeout_ms,
        },
        pb::SettleAction::Unspecified => engine::SettleAction::Invalid(s.action),
    };
    engine::Settlement {
        id: s.id,
        token: s.token,
        action,
    }
}

pub fn settled_pb(s: engine::Settled) -> pb::SettleResult {
    match s.outcome {
        Ok(at_ms) => pb::SettleResult {
            id: s.id,
            token: s.token,
            code: 0,
            message: String::new(),
            at_ms,
        },
        Err(e) => {
            let st = status(e);
            pb::SettleResult {
                id: s.id,
                token: s.token,
                code: st.code() as i32,
                message: st.message().to_string(),
                at_ms: 0,
            }
        }
    }
}

/// A create request in the engine's terms; an unknown policy is refused.
fn new_schedule(r: pb::CreateScheduleRequest) -> crate::Result<NewSchedule> {
    let policy = u32::try_from(r.concurrency_policy)
        .ok()
        .and_then(Policy::from_code)
        .ok_or_else(|| {
            Error::invalid(format!(
                "unknown concurrency policy {} (Allow, Forbid or Replace)",
                r.concurrency_policy
            ))
        })?;
    Ok(NewSchedule {
        name: r.name,
        queue: r.queue,
        cron: r.cron,
        time_zone: r.time_zone,
        payload: r.payload,
        count: r.count,
        policy,
        starting_deadline_ms: r.starting_deadline_ms,
        suspend: r.suspend,
    })
}

fn schedule_pb(view: ScheduleView) -> pb::Schedule {
    let r = view.record;
    pb::Schedule {
        name: r.name,
        queue: r.queue,
        cron: r.cron,
        time_zone: r.time_zone,
        payload: r.payload,
        count: r.count,
        concurrency_policy: r.policy as i32,
        starting_deadline_ms: r.starting_deadline_ms,
        suspended: r.suspended,
        created_at_ms: r.created_ms,
        next_run_at_ms: view.next_run_ms.unwrap_or(0),
        runs: r
            .runs
            .into_iter()
            .map(|run| pb::ScheduleRun {
                scheduled_at_ms: run.scheduled_ms,
                ran_at_ms: run.ran_ms,
                outcome: run.outcome as i32,
                items: run.items,
                replaced: run.replaced,
                detail: run.detail,
            })
            .collect(),
        enqueued_runs: r.enqueued_runs,
        skipped_runs: r.skipped_runs,
        missed_runs: r.missed_runs,
        failed_runs: r.failed_runs,
    }
}

fn state_filter(raw: i32) -> Result<Option<engine::State>, Status> {
    match pb::ItemState::try_from(raw) {
        Ok(pb::ItemState::Unspecified) => Ok(None),
        Ok(pb::ItemState::Ready) => Ok(Some(engine::State::Ready)),
        Ok(pb::ItemState::Delayed) => Ok(Some(engine::State::Delayed)),
        Ok(pb::ItemState::Leased) => Ok(Some(engine::State::Leased)),
        Ok(pb::ItemState::Done) => Ok(Some(engine::State::Done)),
        Ok(pb::ItemState::Dead) => Ok(Some(engine::State::Dead)),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown item state {raw}"
        ))),
    }
}

#[tonic::async_trait]
impl pb::work_q_server::WorkQ for Service {
    async fn create_schedule(
        &self,
        request: Request<pb::CreateScheduleRequest>,
    ) -> Reply<pb::Schedule> {
        let new = new_schedule(request.into_inner()).map_err(status)?;
        reply(self.engine.create_schedule(new).await.map(schedule_pb))
    }

    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Reply<pb::ListSchedulesResponse> {
        let r = request.into_inner();
        let queue = (!r.queue.is_empty()).then_some(r.queue.as_str());
        let schedules = self.engine.list_schedules(queue).await.map_err(status)?;
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: schedules.into_iter().map(schedule_pb).collect(),
        }))
    }

    async fn delete_schedule(
        &self,
        request: Request<pb::DeleteScheduleRequest>,
    ) -> Reply<pb::DeleteScheduleResponse> {
        let r = request.into_inner();
        reply(
            self.engine
                .delete_schedule(&r.name)
                .await
                .map(|()| pb::DeleteScheduleResponse {}),
        )
    }

    async fn suspend_schedule(
        &self,
        request: Request<pb::SuspendScheduleRequest>,
    ) -> Reply<pb::Schedule> {
        self.set_suspended(request.into_inner().name, true).await
    }

    async fn resume_schedule(
        &self,
        request: Request<pb::ResumeScheduleRequest>,
    ) -> Reply<pb::Schedule> {
        self.set_suspended(request.into_inner().name, false).await
    }

    async fn create_queue(&self, request: Request<pb::CreateQueueRequest>) -> Reply<pb::QueueInfo> {
        let r = request.into_inner();
        let patch = options_patch(r.options, false);
        let now = self.engine.now_ms();
        reply(
            self.engine
                .create_queue(&r.queue, &patch, r.if_not_exists)
                .await
                .map(|v| queue_pb(v, now)),
        )
    }

    async fn update_queue(&self, request: Request<pb::UpdateQueueRequest>) -> Reply<pb::QueueInfo> {
        let r = request.into_inner();
        let patch = options_patch(r.options, r.clear_max_depth);
        let now = self.engine.now_ms();
        reply(
            self.engine
                .update_queue(&r.queue, &patch)
                .await
                .map(|v| queue_pb(v, now)),
        )
    }

    async fn delete_queue(
        &self,
        request: Request<pb::DeleteQueueRequest>,
    ) -> Reply<pb::DeleteQueueResponse> {
        let r = request.into_inner();
        reply(
            self.engine
                .delete_queue(&r.queue)
                .await
                .map(|items_deleted| pb::DeleteQueueResponse { items_deleted }),
        )
    }

    async fn list_queues(
        &self,
        _: Request<pb::ListQueuesRequest>,
    ) -> Reply<pb::ListQueuesResponse> {
        let now = self.engine.now_ms();
        let queues = self
            .engine
            .list_queues()
            .into_iter()
            .map(|v| queue_pb(v, now))
            .collect();
        Ok(Response::new(pb::ListQueuesResponse { queues }))
    }

    async fn get_queue(&self, request: Request<pb::GetQueueRequest>) -> Reply<pb::QueueInfo> {
        let now = self.engine.now_ms();
        reply(
            self.engine
                .get_queue(&request.into_inner().queue)
                .map(|v| queue_pb(v, now)),
        )
    }

    async fn purge_queue(
        &self,
        request: Request<pb::PurgeQueueRequest>,
    ) -> Reply<pb::PurgeQueueResponse> {
        reply(
            self.engine
                .purge(&request.into_inner().queue)
                .await
                .map(|purged| pb::PurgeQueueResponse { purged }),
        )
    }

    async fn seal_queue(&self, request: Request<pb::SealQueueRequest>) -> Reply<pb::QueueInfo> {
        let now = self.engine.now_ms();
        reply(
            self.engine
                .set_sealed(&request.into_inner().queue, true)
                .await
                .map(|v| queue_pb(v, now)),
        )
    }

    async fn unseal_queue(&self, request: Request<pb::UnsealQueueRequest>) -> Reply<pb::QueueInfo> {
        let now = self.engine.now_ms();
        reply(
            self.engine
                .set_sealed(&request.into_inner().queue, false)
                .await
                .map(|v| queue_pb(v, now)),
        )
    }

    async fn enqueue(&self, request: Request<pb::EnqueueRequest>) -> Reply<pb::EnqueueResponse> {
        let r = request.into_inner();
        let read = r.read()?;
        let (results, ticket) = self
            .engine
            .enqueue_unsynced(read.queue, read.items, read.seal)
            .map_err(status)?;
        reply(
            self.engine
                .sync(ticket)
                .await
                .map(|()| enqueue_response(results)),
        )
    }

    async fn lease(&self, request: Request<pb::LeaseRequest>) -> Reply<pb::LeaseResponse> {
        let r = request.into_inner();
        let lease = engine::LeaseRequest {
            worker: r.worker_id,
            max_items: r.max_items,
            lease_timeout_ms: r.lease_timeout_ms,
            wait_ms: r.wait_ms,
        };
        reply(
            metrics::LEASE
                .time(self.engine.lease(&r.queue, lease))
                .await
                .map(|outcome| pb::LeaseResponse {
                    drained: outcome.drained,
                    sealed: outcome.sealed,
                    leases: outcome.granted.into_iter().map(lease_pb).collect(),
                }),
        )
    }

    async fn extend(&self, request: Request<pb::ExtendRequest>) -> Reply<pb::ExtendResponse> {
        let r = request.into_inner();
        reply(
            self.engine
                .extend(&r.queue, r.id, r.token, r.lease_timeout_ms)
                .await
                .map(|deadline_at_ms| pb::ExtendResponse { deadline_at_ms }),
        )
    }

    async fn ack(&self, request: Request<pb::AckRequest>) -> Reply<pb::AckResponse> {
        let r = request.into_inner();
        reply(
            metrics::ACK
                .time(self.engine.ack(&r.queue, r.id, r.token, r.result))
                .await
                .map(|_| pb::AckResponse {}),
        )
    }

    async fn fail(&self, request: Request<pb::FailRequest>) -> Reply<pb::FailResponse> {
        let r = request.into_inner();
        reply(
            self.engine
                .fail(
                    &r.queue,
                    r.id,
                    r.token,
                    r.error,
                    r.permanent,
                    r.retry_delay_ms,
                )
                .await
                .map(|outcome| match outcome {
                    engine::FailOutcome::Dead => pb::FailResponse {
                        state: pb::ItemState::Dead as i32,
                        retry_at_ms: 0,
                    },
                    engine::FailOutcome::Retry { at_ms } => pb::FailResponse {
                        state: pb::ItemState::Delayed as i32,
                        retry_at_ms: at_ms,
                    },
                }),
        )
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Reply<pb::ReleaseResponse> {
        let r = request.into_inner();
        reply(
            self.engine
                .release(&r.queue, r.id, r.token)
                .await
                .map(|_| pb::ReleaseResponse {}),
        )
    }

    async fn get_item(&self, request: Request<pb::GetItemRequest>) -> Reply<pb::Item> {
        let r = request.into_inner();
        reply(
            self.engine
                .get_item(&r.queue, r.id)
                .map(|item| item_pb(&r.queue, item)),
        )
    }

    async fn list_items(
        &self,
        request: Request<pb::ListItemsRequest>,
    ) -> Reply<pb::ListItemsResponse> {
        let r = request.into_inner();
        let state = state_filter(r.state)?;
        reply(
            self.engine
                .list_items(&r.queue, state, r.after_id, r.limit, !r.omit_payloads)
                .map(|(items, next_after_id)| pb::ListItemsResponse {
                    items: items.into_iter().map(|i| item_pb(&r.queue, i)).collect(),
                    next_after_id,
                }),
        )
    }

    async fn requeue(&self, request: Request<pb::RequeueRequest>) -> Reply<pb::RequeueResponse> {
        let r = request.into_inner();
        reply(
            self.engine
                .requeue(&r.queue, &r.ids, r.all_dead)
                .await
                .map(|requeued| pb::RequeueResponse { requeued }),
        )
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Reply<pb::ListWorkersResponse> {
        let r = request.into_inner();
        let name = (!r.queue.is_empty()).then_some(r.queue.as_str());
        reply(self.engine.workers(name).map(|rows| {
            pb::ListWorkersResponse {
                workers: rows
                    .into_iter()
                    .map(|row| pb::Worker {
                        id: row.id,
                        queue: row.queue,
                        last_seen_at_ms: row.info.last_seen_ms,
                        in_flight: row.info.in_flight,
                        completed: row.info.completed,
                    })
                    .collect(),
            }
        }))
    }

    async fn settle(&self, request: Request<pb::SettleRequest>) -> Reply<pb::SettleResponse> {
        let r = request.into_inner();
        let settlements = r.settlements.into_iter().map(settlement_from_pb).collect();
        reply(
            metrics::ACK
                .time(self.engine.settle(&r.queue, settlements))
                .await
                .map(|settled| pb::SettleResponse {
                    results: settled.into_iter().map(settled_pb).collect(),
                }),
        )
    }

    type EnqueueStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::EnqueueResponse, Status>> + Send>>;

    async fn enqueue_stream(
        &self,
        request: Request<tonic::Streaming<pb::EnqueueRequest>>,
    ) -> Reply<Self::EnqueueStreamStream> {
        let (mut tx, rx) = tokio::sync::mpsc::channel(64);
        let engine = self.engine.clone();
        tokio::spawn(async move {
            crate::stream::enqueue_stream(engine, request.into_inner(), &mut tx).await
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type WorkStream = Pin<Box<dyn Stream<Item = Result<pb::WorkResponse, Status>> + Send>>;

    async fn work(
        &self,
        request: Request<tonic::Streaming<pb::WorkRequest>>,
    ) -> Reply<Self::WorkStream> {
        let (mut tx, rx) = tokio::sync::mpsc::channel(16);
        let engine = self.engine.clone();
        tokio::spawn(async move {
            crate::stream::work_session(engine, request.into_inner(), &mut tx).await
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::QueueStats, Status>> + Send>>;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Reply<Self::WatchStream> {
        let r = request.into_inner();
        let min_interval = Duration::from_millis(match r.min_interval_ms {
            0 => 200,
            n => n.clamp(10, 60_000),
        });
        let mut changes = self.engine.subscribe(&r.queue).map_err(status)?;
        let mut shutdown = self.engine.shutdown_signal();
        let engine = self.engine.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                changes.borrow_and_update();
                let message = match engine.get_queue(&r.queue) {
                    Ok(view) => Ok(stats_pb(&view.name, &view.stats, engine.now_ms())),
                    Err(e) => Err(status(e)),
                };
                let ended = message.is_err();
                if tx.send(message).await.is_err() || ended {
                    return;
                }
                // Rate-limit, then wait for a change, or a second for fresh rates/ETA.
                tokio::time::sleep(min_interval).await;
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A request refused before it reached a handler, as the client should hear it. tonic
/// refuses a message over the decoding limit with OUT_OF_RANGE and its own text; the
/// gRPC status codes give that case RESOURCE_EXHAUSTED, and the client needs to know
/// what to do about it. No handler answers OUT_OF_RANGE itself.
pub fn request_refused(refusal: Status) -> Status {
    if refusal.code() == tonic::Code::OutOfRange && refusal.message().contains("too large") {
        Status::resource_exhausted(format!(
            "a request message can be at most {} MiB: send fewer or smaller items per \
             request ({})",
            crate::server::MAX_MESSAGE_BYTES >> 20,
            refusal.message()
        ))
    } else {
        refusal
    }
}

/// Serves `S`, with a unary request that tonic refused before its handler told as
/// [`request_refused`] says. (A streaming call's requests are refused by its handler,
/// which reads them.)
#[derive(Clone)]
pub struct Refusals<S>(pub S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for Refusals<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, Req, ResBody> tonic::codegen::Service<Req> for Refusals<S>
where
    S: tonic::codegen::Service<Req, Response = tonic::codegen::http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let answer = self.0.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            // Only a trailers-only answer carries its status in the headers.
            if let Some(refusal) = Status::from_header_map(response.headers())
                && refusal.code() == tonic::Code::OutOfRange
            {
                let _ = request_refused(refusal).add_header(response.headers_mut());
            }
            Ok(response)
        })
    }
}
