//! The streaming calls: pipelined enqueue and the worker session.
//!
//! Both keep one stream open so each item costs a message, not a call. The same
//! session code serves the gRPC streams (requests from `tonic::Streaming`, answers
//! through a channel to the response body) and the wire protocol (`crate::wire`:
//! frames read from and written to the connection by the session's own task).
//!
//! Work session ownership: one task per stream owns the session state (credit, the
//! pending lease poll). It asks the engine for leases and settlements like any other
//! handler, so the engine stays the single writer of item state. The pending lease
//! poll is kept alive across loop iterations rather than dropped when a request
//! arrives: dropping it after the engine granted leases would strand those items
//! until their leases expired.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use workq_proto::pb;

use crate::engine::{self, Engine, LeaseOutcome, LeaseRequest};
use crate::grpc::{lease_pb, settled_pb, settlement_from_pb, status};
use crate::store::Ticket;

/// How long one lease poll of a session waits before polling again.
const SESSION_POLL_MS: u64 = 30_000;
/// Enqueue requests of one stream processed concurrently (they share flushes).
const ENQUEUE_PIPELINE: usize = 64;
/// A work session's answers handed over and not yet written, before it stops reading.
const WORK_HANDED: usize = 64;

/// Where a streaming call's answers go.
pub trait Replies<T>: Send {
    /// Sends one answer, or the status that ends the call; false when the client is
    /// gone.
    fn send(&mut self, reply: Result<T, Status>) -> impl Future<Output = bool> + Send;

    /// Hands `reply` over to go out as soon as `ticket` is durable, without the session
    /// waiting or waking for it (the wire protocol: the store's flusher writes it).
    /// Gives it back when that cannot be done; the session then answers it itself after
    /// the sync. Nothing is handed over by default.
    fn hand_over(&mut self, _engine: &Engine, _ticket: Ticket, reply: T) -> Result<(), T> {
        Err(reply)
    }

    /// Whether the client is keeping up: fewer than `free` handed-over answers are
    /// waiting to go out, and nothing else the session sent is still waiting for the
    /// client to take it. When not, [`Replies::attend`] wakes once there is room.
    /// With `free` 0: whether no handed-over answer waits at all.
    fn has_room(&mut self, _free: usize) -> bool {
        true
    }

    /// The ticket of the oldest handed-over answer that did not go out: its sync
    /// failed, or it is still waiting for it. None when every one went out, or none
    /// was handed over.
    fn oldest_unsent(&mut self) -> Option<Ticket> {
        None
    }

    /// Waits until the answers sent or handed over need the session: bytes the socket
    /// did not take (written before this returns), room under [`Replies::has_room`]'s
    /// limit, or a failed sync. False when a sync failed or the client is gone.
    fn attend(&mut self) -> impl Future<Output = bool> + Send {
        std::future::pending()
    }
}

/// An enqueue stream's answer, made from the engine's results: `pb::EnqueueResponse`
/// for gRPC, and for the wire an answer encoded straight from them
/// (`crate::wire::EnqueueAnswer`).
pub trait EnqueueReply: Send + 'static {
    fn from_results(results: Vec<engine::Enqueued>) -> Self;
}

impl EnqueueReply for pb::EnqueueResponse {
    fn from_results(results: Vec<engine::Enqueued>) -> Self {
        crate::grpc::enqueue_response(results)
    }
}

/// The gRPC way: a channel whose receiver is the response stream.
impl<T: Send + 'static> Replies<T> for mpsc::Sender<Result<T, Status>> {
    fn send(&mut self, reply: Result<T, Status>) -> impl Future<Output = bool> + Send {
        let sender = &*self;
        async move { sender.send(reply).await.is_ok() }
    }

    /// Room once the response body has taken everything sent: HTTP/2 flow control then
    /// holds back the rest, so answers to a client that stops reading wait in the
    /// channel, and a work session leases nothing more to it.
    fn has_room(&mut self, _free: usize) -> bool {
        self.capacity() == self.max_capacity()
    }

    fn attend(&mut self) -> impl Future<Output = bool> + Send {
        let sender = &*self;
        async move { sender.reserve_many(sender.max_capacity()).await.is_ok() }
    }
}

/// An enqueue request as a stream session reads it: prost's decoded message (the
/// gRPC stream) or the encoded message itself (the wire protocol, read in place by
/// `crate::wire`).
pub trait EnqueueInput {
    /// The request's contents, or why it is malformed.
    fn read(&self) -> Result<ReadEnqueue<'_>, Status>;
}

/// An enqueue request's contents, the items' payloads borrowed from the request.
pub struct ReadEnqueue<'a> {
    pub queue: &'a str,
    pub items: Vec<engine::NewItem<&'a [u8]>>,
    pub seal: bool,
}

impl EnqueueInput for pb::EnqueueRequest {
    fn read(&self) -> Result<ReadEnqueue<'_>, Status> {
        let items = self
            .items
            .iter()
            .map(|i| engine::NewItem {
                payload: &i.payload[..],
                priority: i.priority,
                delay_ms: i.delay_ms,
                key: i.key.clone(),
            })
            .collect();
        Ok(ReadEnqueue {
            queue: &self.queue,
            items,
            seal: self.seal,
        })
    }
}

/// Answers each enqueue request in order. Requests are applied one by one as they
/// are read, and up to `ENQUEUE_PIPELINE` of them wait for their flush at once, so a
/// pipelining producer shares group commits. The first refused request ends the
/// stream with its status once everything before it is answered; nothing read after
/// it is applied (nothing of it was added either), so every answer the producer got
/// is exactly what is in the queue.
///
/// Tickets grow in request order, so the stream waits for one sync at a time: the
/// oldest unanswered request's. When it is on disk, every request it covered is
/// answered, and the wait moves to the next unanswered one.
///
/// Where the replies can be handed over ([`Replies::hand_over`]: the wire protocol in
/// strict mode), a request with nothing unanswered before it is handed over instead
/// of waited for, and the session goes back to reading. Handed-over answers go out
/// in order with their syncs, before anything the session writes later: the session
/// writes an answer only once its ticket is durable, and the store makes the calls
/// for a ticket before publishing it durable.
pub async fn enqueue_stream<R: EnqueueReply>(
    engine: Arc<Engine>,
    mut requests: impl Stream<Item = Result<impl EnqueueInput + Send, Status>> + Unpin + Send,
    out: &mut impl Replies<R>,
) {
    let mut unanswered: VecDeque<(Ticket, R)> = VecDeque::new();
    let mut sync: Option<SyncWait> = None;
    // The ticket of the last answer handed over.
    let mut handed: Option<Ticket> = None;
    let mut input_open = true;
    let mut refused = None;
    loop {
        // While the disk is behind, a stream applies one request at a time, as a
        // unary caller does: what it takes in stays in memory until it is on disk.
        let behind = engine.store().behind()
            && (!unanswered.is_empty() || (handed.is_some() && !out.has_room(0)));
        let reading = input_open
            && !behind
            && unanswered.len() < ENQUEUE_PIPELINE
            && (handed.is_none() || out.has_room(ENQUEUE_PIPELINE - unanswered.len()));
        tokio::select! {
            request = requests.next(), if reading => {
                match request {
                    Some(Ok(r)) => {
                        let applied = r.read().and_then(|r| {
                            engine.enqueue_unsynced(r.queue, r.items, r.seal).map_err(status)
                        });
                        match applied {
                            // Durable already (the memory store) and nothing before it
                            // to answer first: answer now.
                            Ok((results, ticket)) if unanswered.is_empty() && engine.is_durable(ticket) => {
                                if !out.send(Ok(EnqueueReply::from_results(results))).await {
                                    return;
                                }
                            }
                            Ok((results, ticket)) => {
                                let mut reply = R::from_results(results);
                                if unanswered.is_empty() {
                                    match out.hand_over(&engine, ticket, reply) {
                                        Ok(()) => {
                                            handed = Some(ticket);
                                            continue;
                                        }
                                        Err(back) => reply = back,
                                    }
                                }
                                if sync.is_none() {
                                    sync = Some(wait_for_sync(&engine, ticket));
                                }
                                unanswered.push_back((ticket, reply));
                            }
                            Err(refusal) => {
                                refused = Some(refusal);
                                input_open = false;
                            }
                        }
                    }
                    // A request tonic could not read (too large, malformed) is
                    // refused like one the engine refused; a transport error ends the
                    // call anyway, and no one hears the status.
                    Some(Err(unread)) => {
                        refused = Some(crate::grpc::request_refused(unread));
                        input_open = false;
                    }
                    None => input_open = false,
                }
            }
            synced = async { sync.as_mut().expect("guarded").await }, if sync.is_some() => {
                sync = None;
                if let Err(e) = synced {
                    let own = unanswered.front().map(|(ticket, _)| *ticket);
                    end_with_failed_sync(&engine, out, own, e).await;
                    return;
                }
                while let Some((ticket, _)) = unanswered.front() {
                    if !engine.is_durable(*ticket) {
                        sync = Some(wait_for_sync(&engine, *ticket));
                        break;
                    }
                    let (_, reply) = unanswered.pop_front().expect("just seen");
                    if !out.send(Ok(reply)).await {
                        return;
                    }
                }
            }
            attended = out.attend(), if handed.is_some() && (input_open || !unanswered.is_empty()) => {
                if !attended {
                    // A failed sync (say so) or a client that is gone (nothing to say).
                    handed_out(&engine, handed, out).await;
                    return;
                }
            }
            else => {
                // Every answer of the session's own is out; the handed-over ones go
                // out with their syncs, before the status that ends the call.
                if !handed_out(&engine, handed, out).await {
                    return;
                }
                if let Some(refusal) = refused {
                    out.send(Err(refusal)).await;
                }
                return;
            }
        }
    }
}

/// Waits until the answers handed over are out (the sync of the last one, `handed`,
/// is done: the store makes its calls before it publishes a sync), so that nothing the
/// session writes next can overtake them. A failed sync ends the call with its error,
/// and then this returns false.
async fn handed_out<T>(engine: &Engine, handed: Option<Ticket>, out: &mut impl Replies<T>) -> bool {
    if let Some(ticket) = handed
        && let Err(e) = engine.sync(ticket).await
    {
        end_with_failed_sync(engine, out, None, e).await;
        return false;
    }
    true
}

/// Ends a call whose sync failed with `error`. The error is worded by the oldest
/// request the client has no answer for: the oldest handed-over answer that did not
/// go out, or `own` (the oldest the session holds), whichever came first. The client
/// retries all of them or none, and the oldest is the one most in doubt: when cutting
/// a failed batch off the log fails too, that batch may be on disk, while every
/// later one surely is not. Worded by a later ticket, the call would say "not on
/// disk, retry", and the retry could add the earlier request's items twice.
async fn end_with_failed_sync<T>(
    engine: &Engine,
    out: &mut impl Replies<T>,
    own: Option<Ticket>,
    error: crate::Error,
) {
    let oldest = out.oldest_unsent().into_iter().chain(own).min();
    let error = match oldest {
        Some(ticket) => engine.sync(ticket).await.err().unwrap_or(error),
        None => error,
    };
    let _ = out.send(Err(status(error))).await;
}

type SyncWait = Pin<Box<dyn Future<Output = crate::Result<()>> + Send>>;

fn wait_for_sync(engine: &Arc<Engine>, ticket: Ticket) -> SyncWait {
    let engine = engine.clone();
    Box::pin(async move { engine.sync(ticket).await })
}

type LeasePoll = Pin<Box<dyn Future<Output = crate::Result<LeaseOutcome>> + Send>>;

/// Runs one worker session until the worker closes its side or an error ends it.
pub async fn work_session(
    engine: Arc<Engine>,
    mut requests: impl Stream<Item = Result<pb::WorkRequest, Status>> + Unpin + Send,
    out: &mut impl Replies<pb::WorkResponse>,
) {
    let first = match requests.next().await {
        Some(Ok(first)) => first,
        _ => return,
    };
    if first.queue.is_empty() || first.worker_id.is_empty() {
        let _ = out
            .send(Err(Status::invalid_argument(
                "the first message of a work session names the queue and the worker id",
            )))
            .await;
        return;
    }
    let queue = first.queue.clone();
    let worker = first.worker_id.clone();
    let lease_timeout_ms = first.lease_timeout_ms;
    let mut changes = match engine.subscribe(&queue) {
        Ok(rx) => rx,
        Err(e) => {
            let _ = out.send(Err(status(e))).await;
            return;
        }
    };
    let mut credit: u64 = 0;
    let mut poll: Option<LeasePoll> = None;
    // Set when the worker closes its side: a poll still waiting then gives up, so no
    // item is leased to a worker that can no longer settle it.
    let (closed_tx, closed) = tokio::sync::watch::channel(false);
    // After answering "drained", wait for a change before polling again.
    let mut quiet = false;
    // The `sealed` flag of the last "drained" the worker was told, until it is pushed
    // leases again: a later poll that finds the same state says nothing (its own
    // settlement's change wakes the session once more after the notice).
    let mut told_drained: Option<bool> = None;
    let mut input_open = true;
    let mut refused = None;
    let mut next_request = Some(first);
    // The ticket of the last answer handed over (see `Replies::hand_over`).
    let mut handed: Option<Ticket> = None;

    loop {
        if let Some(request) = next_request.take() {
            credit = credit.saturating_add(request.credit as u64);
            if !request.settlements.is_empty() {
                quiet = false;
                let settlements = request
                    .settlements
                    .into_iter()
                    .map(settlement_from_pb)
                    .collect();
                // Settle and, when the worker has credit and no poll is pending, take
                // its next items in the same step: one flush, one reply message.
                let want =
                    if poll.is_none() && !engine.is_shutting_down() && out.has_room(WORK_HANDED) {
                        credit.min(engine::limits::MAX_LEASE_ITEMS as u64) as u32
                    } else {
                        0
                    };
                let started = std::time::Instant::now();
                let step = engine.settle_and_lease_unsynced(
                    &queue,
                    settlements,
                    &worker,
                    want,
                    lease_timeout_ms,
                );
                let reply = match step {
                    Ok(((settled, outcome), ticket)) => {
                        credit -= outcome.granted.len() as u64;
                        let drained = want > 0 && outcome.drained && outcome.granted.is_empty();
                        quiet = drained;
                        told_drained = match (drained, outcome.granted.is_empty()) {
                            (true, _) => Some(outcome.sealed),
                            (false, false) => None,
                            (false, true) => told_drained,
                        };
                        let reply = pb::WorkResponse {
                            settled: settled.into_iter().map(settled_pb).collect(),
                            leases: outcome.granted.into_iter().map(lease_pb).collect(),
                            drained,
                            sealed: outcome.sealed,
                        };
                        Ok((reply, ticket))
                    }
                    Err(e) => Err(status(e)),
                };
                let (reply, ticket) = match reply {
                    Ok(answer) => answer,
                    Err(refusal) => {
                        out.send(Err(refusal)).await;
                        return;
                    }
                };
                // Handed over, the answer goes out right after its sync without this
                // task waking for it; otherwise the session waits for the sync.
                let reply = if engine.is_durable(ticket) {
                    Some(reply)
                } else {
                    match out.hand_over(&engine, ticket, reply) {
                        Ok(()) => {
                            handed = Some(ticket);
                            None
                        }
                        Err(reply) => {
                            if let Err(e) = engine.sync(ticket).await {
                                end_with_failed_sync(&engine, out, Some(ticket), e).await;
                                return;
                            }
                            Some(reply)
                        }
                    }
                };
                if let Some(reply) = reply {
                    crate::http::metrics::ACK.observe(started.elapsed());
                    if !out.send(Ok(reply)).await {
                        return;
                    }
                }
            }
        }
        // A client that is not taking its answers is leased nothing more: the items
        // would only wait in the coordinator with their leases running.
        // While the disk is behind, a session with answers waiting for it takes in
        // no more requests and leases nothing more until they are out.
        let behind = handed.is_some() && engine.store().behind() && !out.has_room(0);
        let room = !behind && out.has_room(WORK_HANDED);
        if poll.is_none()
            && credit > 0
            && !quiet
            && input_open
            && room
            && !engine.is_shutting_down()
        {
            let engine = engine.clone();
            let queue = queue.clone();
            let mut closed = closed.clone();
            let request = LeaseRequest {
                worker: worker.clone(),
                max_items: credit.min(engine::limits::MAX_LEASE_ITEMS as u64) as u32,
                lease_timeout_ms,
                wait_ms: SESSION_POLL_MS,
            };
            changes.borrow_and_update();
            poll = Some(Box::pin(async move {
                let cancel = async move {
                    let _ = closed.wait_for(|closed| *closed).await;
                };
                engine.lease_until(&queue, request, cancel).await
            }));
        }
        if !input_open && poll.is_none() {
            // The answers handed over go out with their syncs, before the status that
            // ends the call.
            if handed_out(&engine, handed, out).await
                && let Some(refusal) = refused
            {
                out.send(Err(refusal)).await;
            }
            return;
        }
        let reading = input_open && (handed.is_none() || room);
        tokio::select! {
            attended = out.attend(), if handed.is_some() || !room => {
                if !attended {
                    // A failed sync (say so) or a client that is gone (nothing to say).
                    handed_out(&engine, handed, out).await;
                    return;
                }
            }
            request = requests.next(), if reading => match request {
                Some(Ok(r)) => next_request = Some(r),
                // The worker closed its side: a waiting poll gives up; one that was
                // already granted leases delivers them; then the session ends, with
                // the refusal of a request that could not be read.
                ended => {
                    if let Some(Err(unread)) = ended {
                        refused = Some(crate::grpc::request_refused(unread));
                    }
                    input_open = false;
                    closed_tx.send_replace(true);
                }
            },
            outcome = async { poll.as_mut().expect("guarded").await }, if poll.is_some() => {
                poll = None;
                match outcome {
                    Ok(outcome) => {
                        credit -= outcome.granted.len() as u64;
                        let drained = outcome.drained && outcome.granted.is_empty();
                        quiet = drained;
                        if outcome.granted.is_empty() && !drained {
                            if engine.is_shutting_down() {
                                return;
                            }
                            continue; // the poll timed out: poll again
                        }
                        if drained && told_drained == Some(outcome.sealed) {
                            continue; // nothing new to tell
                        }
                        told_drained = drained.then_some(outcome.sealed);
                        let reply = pb::WorkResponse {
                            leases: outcome.granted.into_iter().map(lease_pb).collect(),
                            settled: Vec::new(),
                            drained,
                            sealed: outcome.sealed,
                        };
                        if !out.send(Ok(reply)).await {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = out.send(Err(status(e))).await;
                        return;
                    }
                }
            },
            changed = changes.changed(), if quiet => {
                if changed.is_err() {
                    let _ = out.send(Err(status(crate::Error::QueueNotFound(queue.clone())))).await;
                    return;
                }
                quiet = false;
            }
        }
    }
}
