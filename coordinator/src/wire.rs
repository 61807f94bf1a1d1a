//! The wire protocol's server side: `EnqueueStream` and `Work` framed straight on a
//! TCP connection (format in `workq.proto`, framing in `workq_proto::wire`).
//!
//! Connections reach here from the gRPC listener, which hands over every connection
//! that starts with the wire preamble ([`opening`]); everything else goes to tonic.
//! Each connection is one task: it reads the hello, checks the token, then runs the
//! same session code as the gRPC streams (`crate::stream`), reading requests off the
//! socket and writing each answer straight back, with no HTTP/2 framing, no extra
//! task and no channel in between. In strict mode the answers that wait for a sync
//! (an enqueue stream's, a work session's settlement steps) are written by the
//! store's flusher thread right after it ([`Writer`]), so the session does not wake
//! for them.
//!
//! Every call ends with a status frame: OK when the client closed its side and got
//! every answer, the error otherwise. A client that sees the connection close without
//! one knows the coordinator went away mid-call.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::stream;
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, watch};
use tokio_stream::Stream;
use tonic::Status;
use workq_proto::in_place::{read_enqueue_request, write_enqueue_response};
use workq_proto::pb;
use workq_proto::wire::{
    FrameReader, KIND_MESSAGE, KIND_STATUS, PREAMBLE, encode_frame, encode_frame_with,
};

use crate::auth::Auth;
use crate::engine::Engine;
use crate::engine::{Enqueued, NewItem};
use crate::store::{OnDurable, Ticket};
use crate::stream::{EnqueueInput, EnqueueReply, ReadEnqueue, Replies};

/// How long a new connection may take to show its first bytes, and a wire client its
/// hello, before the coordinator drops it.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP/2 connection preface every gRPC client opens with (RFC 9113, 3.4).
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How a connection of the gRPC port opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// The wire preamble.
    Wire,
    /// The whole HTTP/2 preface: a gRPC client.
    Http2,
    /// Something else (or the connection closed): tonic refuses it.
    Neither,
}

/// Waits until the connection has shown which protocol it speaks: the whole wire
/// preamble or the whole HTTP/2 preface, or bytes that are neither. Only peeks: the
/// bytes stay for whoever serves the connection. A client that trickles, or stops
/// part-way through, either opening waits here, where the caller's timeout ends it,
/// rather than in a server that would hold it for ever.
pub async fn opening(stream: &TcpStream) -> std::io::Result<Opening> {
    let mut first = [0u8; HTTP2_PREFACE.len()];
    let mut wait = Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut first).await?;
        let seen = &first[..n];
        if n == 0 {
            return Ok(Opening::Neither);
        }
        if seen.starts_with(PREAMBLE) {
            return Ok(Opening::Wire);
        }
        if seen == HTTP2_PREFACE {
            return Ok(Opening::Http2);
        }
        if !PREAMBLE.starts_with(seen) && !HTTP2_PREFACE.starts_with(seen) {
            return Ok(Opening::Neither);
        }
        // Part of an opening so far: peek again once more has arrived, backing off (a
        // real client sends it in one write; this is a trickle, or a client that
        // closed or stalled part-way, which the caller's timeout ends).
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(100));
    }
}

/// Serves one wire connection (its preamble not yet read) until the call ends.
pub async fn serve(
    stream: TcpStream,
    engine: Arc<Engine>,
    auth: Auth,
    stop: watch::Receiver<bool>,
) {
    let (read, write) = stream.into_split();
    let mut frames = FrameReader::new(read);
    let mut out = Out::new(write);
    let hello = tokio::time::timeout(HELLO_TIMEOUT, hello(&mut frames, &auth));
    let mut stopping = stop.clone();
    let call = tokio::select! {
        hello = hello => match hello {
            Ok(Ok(call)) => call,
            Ok(Err(status)) => return out.end(status).await,
            Err(_) => {
                return out
                    .end(Status::deadline_exceeded("no wire hello within 10 s"))
                    .await;
            }
        },
        () = async { let _ = stopping.wait_for(|stop| *stop).await; } => {
            return out.end(Status::unavailable("the coordinator is shutting down")).await;
        }
    };
    let requests = Requests::new(frames, stop);
    match call {
        pb::WireCall::EnqueueStream => {
            let mut requests = requests.messages(|body| Ok(InPlace(body)));
            crate::stream::enqueue_stream::<EnqueueAnswer>(engine.clone(), &mut requests, &mut out)
                .await;
            Replies::<EnqueueAnswer>::send(&mut out, Err(requests.ending())).await;
        }
        pb::WireCall::Work => {
            let mut requests = requests.messages(|body| {
                pb::WorkRequest::decode(&body[..])
                    .map_err(|e| Status::invalid_argument(format!("malformed request: {e}")))
            });
            crate::stream::work_session(engine.clone(), &mut requests, &mut out).await;
            Replies::<pb::WorkResponse>::send(&mut out, Err(requests.ending())).await;
        }
        pb::WireCall::Unspecified => unreachable!("hello() refuses it"),
    }
    out.close().await;
}

/// An `EnqueueRequest` frame, read in place when the session takes it: the items'
/// payloads stay slices of the frame until the engine copies each into its record.
struct InPlace(BytesMut);

impl EnqueueInput for InPlace {
    fn read(&self) -> Result<ReadEnqueue<'_>, Status> {
        let mut items = Vec::new();
        let (queue, seal) = read_enqueue_request(&self.0, |item| {
            items.push(NewItem {
                payload: item.payload,
                priority: item.priority,
                delay_ms: item.delay_ms,
                key: item.key.to_string(),
            })
        })
        .map_err(|e| Status::invalid_argument(format!("malformed request: {e}")))?;
        Ok(ReadEnqueue { queue, items, seal })
    }
}

/// Reads the preamble and the hello; the call it names, once the token checks out.
async fn hello(
    frames: &mut FrameReader<OwnedReadHalf>,
    auth: &Auth,
) -> Result<pb::WireCall, Status> {
    let preamble = frames.read_raw(PREAMBLE.len()).await.map_err(gone)?;
    if preamble[..] != PREAMBLE[..] {
        return Err(Status::invalid_argument("not the workq wire preamble"));
    }
    let hello = match frames.read_frame().await {
        Ok(Some((KIND_MESSAGE, body))) => pb::WireHello::decode(body)
            .map_err(|e| Status::invalid_argument(format!("malformed WireHello: {e}")))?,
        Ok(Some((kind, _))) => {
            return Err(Status::invalid_argument(format!(
                "a client frame of kind {kind} (only 0 is defined)"
            )));
        }
        Ok(None) => return Err(Status::cancelled("the client closed before its hello")),
        Err(e) => return Err(frame_error(e)),
    };
    auth.check_token(&hello.token)
        .map_err(Status::unauthenticated)?;
    match pb::WireCall::try_from(hello.call) {
        Ok(pb::WireCall::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "unknown wire call {} (1 = EnqueueStream, 2 = Work)",
            hello.call
        ))),
        Ok(call) => Ok(call),
    }
}

fn gone(error: std::io::Error) -> Status {
    Status::cancelled(format!("the client went away: {error}"))
}

fn frame_error(error: std::io::Error) -> Status {
    match error.kind() {
        std::io::ErrorKind::InvalidData => {
            Status::invalid_argument(format!("malformed frame: {error}"))
        }
        _ => gone(error),
    }
}

/// Answers written straight to the connection.
struct Out {
    writer: Arc<Writer>,
    /// `writer` again, as the store takes it ([`Out::hand_over`]).
    call: Arc<dyn OnDurable>,
    buf: Vec<u8>,
    /// A status frame went out: the call is over and nothing more is written.
    ended: bool,
}

impl Out {
    fn new(io: OwnedWriteHalf) -> Out {
        let writer = Arc::new(Writer {
            io,
            state: Mutex::new(WriteState::default()),
            attention: Notify::new(),
        });
        Out {
            call: writer.clone(),
            writer,
            buf: Vec::with_capacity(4096),
            ended: false,
        }
    }

    async fn end(mut self, status: Status) {
        Replies::<pb::WireStatus>::send(&mut self, Err(status)).await;
        self.close().await;
    }

    /// Shuts the connection's sending side once everything queued is written (dropping
    /// the last handle does the same).
    async fn close(mut self) {
        drop(self.call);
        if let Some(writer) = Arc::get_mut(&mut self.writer) {
            let _ = writer.io.shutdown().await;
        }
    }

    /// Writes one frame: the answer `write` encodes, or the status that ends the call.
    async fn send_frame(&mut self, reply: Result<impl FnOnce(&mut Vec<u8>), Status>) -> bool {
        if self.ended {
            return false;
        }
        self.buf.clear();
        match reply {
            Ok(write) => encode_frame_with(KIND_MESSAGE, &mut self.buf, write),
            Err(status) => {
                self.ended = true;
                let status = pb::WireStatus {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                };
                encode_frame(KIND_STATUS, &status, &mut self.buf);
            }
        }
        let left = {
            let mut state = lock(&self.writer.state);
            let left = self.writer.write_after_queued(&mut state, &self.buf);
            state.ended = self.ended;
            if state.broken {
                return false;
            }
            left
        };
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::with_capacity(4096); // do not keep a big batch's buffer
        }
        !left || self.writer.write_queued().await
    }
}

/// A connection's sending side, shared by its session's task and the store's flusher
/// thread. In strict mode the session hands its answers over to the flusher
/// ([`Out::hand_over_answer`]), which writes each right after its sync: the session is not
/// woken for every sync only to write a few bytes, and the answer leaves one thread
/// switch sooner. Every write goes through `state`'s lock, after whatever is queued
/// before it, so frames go out whole and in order; the flusher never waits for the
/// socket, and what it cannot take is left for the session to write.
struct Writer {
    io: OwnedWriteHalf,
    state: Mutex<WriteState>,
    /// Wakes the session: bytes are queued that the socket did not take, a handed-over
    /// answer's sync failed, or handed-over answers went out while it waits for room.
    attention: Notify,
}

#[derive(Default)]
struct WriteState {
    /// Bytes the socket has not taken yet, written before anything else.
    queued: Vec<u8>,
    /// Handed-over answers not yet written, with their tickets, in hand-over order:
    /// the store makes its calls in that order, and each writes the oldest.
    handed: VecDeque<(Ticket, Handed)>,
    /// The session waits for `handed` to shrink.
    wants_room: bool,
    /// A handed-over answer's sync failed: the oldest such answer's ticket.
    failed: Option<Ticket>,
    /// Writing failed: the client is gone.
    broken: bool,
    /// The call's status frame is written or queued: nothing more goes out.
    ended: bool,
    /// Where the flusher frames a handed-over answer.
    frame: Vec<u8>,
}

impl Writer {
    /// Writes `bytes` after what is queued, as far as the socket takes them now, and
    /// queues the rest. True when bytes are left queued.
    fn write_after_queued(&self, state: &mut WriteState, bytes: &[u8]) -> bool {
        if state.broken || state.ended {
            return false;
        }
        let mut rest = bytes;
        if state.queued.is_empty() {
            match self.write_now(rest) {
                Ok(n) => rest = &rest[n..],
                Err(_) => {
                    state.broken = true;
                    return false;
                }
            }
            if rest.is_empty() {
                return false;
            }
        }
        state.queued.extend_from_slice(rest);
        true
    }

    /// Writes what the socket takes of `bytes` without waiting; how much it took.
    fn write_now(&self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut done = 0;
        while done < bytes.len() {
            match self.io.try_write(&bytes[done..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Writes the queued bytes, waiting for the socket, until none are left. False when
    /// the client is gone.
    async fn write_queued(&self) -> bool {
        loop {
            {
                let mut state = lock(&self.state);
                if state.broken {
                    return false;
                }
                if state.queued.is_empty() {
                    return true;
                }
                match self.write_now(&state.queued) {
                    Ok(n) => drop(state.queued.drain(..n)),
                    Err(_) => {
                        state.broken = true;
                        return false;
                    }
                }
                if state.queued.is_empty() {
                    return true;
                }
            }
            if self.io.writable().await.is_err() {
                lock(&self.state).broken = true;
                return false;
            }
        }
    }
}

/// An answer handed over to the flusher.
enum Handed {
    /// An enqueue stream's answer.
    Enqueue(Vec<Enqueued>),
    /// A work session's step (its settlements' outcomes, maybe leases), and when the
    /// step started, for the ack latency histogram (time until durable).
    Work(pb::WorkResponse, Instant),
}

impl Handed {
    fn write(self, buf: &mut Vec<u8>) {
        match self {
            Handed::Enqueue(results) => {
                let results = results.into_iter().map(crate::grpc::enqueue_result_pb);
                write_enqueue_response(results, buf);
            }
            Handed::Work(response, started) => {
                if !response.settled.is_empty() {
                    crate::http::metrics::ACK.observe(started.elapsed());
                }
                response
                    .encode(buf)
                    .expect("a Vec grows to fit any message");
            }
        }
    }
}

/// The flusher's call for a handed-over answer: its sync is done.
impl OnDurable for Writer {
    fn durable(&self, ok: bool) {
        let mut state = lock(&self.state);
        let Some((ticket, answer)) = state.handed.pop_front() else {
            return;
        };
        let wake = if ok {
            let mut frame = std::mem::take(&mut state.frame);
            frame.clear();
            encode_frame_with(KIND_MESSAGE, &mut frame, |buf| answer.write(buf));
            let left = self.write_after_queued(&mut state, &frame);
            if frame.capacity() <= MAX_FRAME_SCRATCH {
                state.frame = frame;
            }
            left || std::mem::take(&mut state.wants_room)
        } else {
            state.failed.get_or_insert(ticket);
            true
        };
        drop(state);
        if wake {
            self.attention.notify_one();
        }
    }
}

/// The largest frame buffer a connection keeps for the flusher's next answer.
const MAX_FRAME_SCRATCH: usize = 64 << 10;

fn lock(state: &Mutex<WriteState>) -> std::sync::MutexGuard<'_, WriteState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Out {
    /// Sends a message, or the status that ends the call.
    async fn send_message<M: Message>(&mut self, reply: Result<M, Status>) -> bool {
        let write = |message: M| {
            move |buf: &mut Vec<u8>| message.encode(buf).expect("a Vec grows to fit any message")
        };
        self.send_frame(reply.map(write)).await
    }

    /// Queues `answer` to be written by the store's call once `ticket` is durable;
    /// gives it back when the store does not take the call.
    fn hand_over_answer(
        &mut self,
        engine: &Engine,
        ticket: Ticket,
        answer: Handed,
    ) -> Result<(), Handed> {
        lock(&self.writer.state).handed.push_back((ticket, answer));
        if engine.store().on_durable(ticket, &self.call) {
            return Ok(());
        }
        // Not taken, so no call will write it: it is still the newest one handed.
        let (_, answer) = lock(&self.writer.state)
            .handed
            .pop_back()
            .expect("the answer just handed over");
        Err(answer)
    }

    /// See [`Replies::has_room`]. No room either while bytes are queued that the socket
    /// has not taken: a client that stops reading stops the session reading its
    /// requests, so neither the answers nor the requests pile up in the coordinator.
    fn room_for(&mut self, free: usize) -> bool {
        let mut state = lock(&self.writer.state);
        // `free` 0 asks whether none waits at all.
        let room =
            (state.handed.is_empty() || state.handed.len() < free) && state.queued.is_empty();
        state.wants_room = !room;
        room
    }

    /// See [`Replies::oldest_unsent`].
    fn oldest_unsent_answer(&self) -> Option<Ticket> {
        let state = lock(&self.writer.state);
        state
            .failed
            .or_else(|| state.handed.front().map(|(ticket, _)| *ticket))
    }

    /// See [`Replies::attend`].
    async fn attend_writer(&mut self) -> bool {
        let mut woken = false;
        loop {
            let (failed, queued) = {
                let state = lock(&self.writer.state);
                (state.failed.is_some(), !state.queued.is_empty())
            };
            if failed {
                return false;
            }
            if queued {
                return self.writer.write_queued().await;
            }
            if woken {
                return true;
            }
            self.writer.attention.notified().await;
            woken = true;
        }
    }
}

impl Replies<pb::WireStatus> for Out {
    async fn send(&mut self, reply: Result<pb::WireStatus, Status>) -> bool {
        self.send_message(reply).await
    }
}

impl Replies<pb::WorkResponse> for Out {
    async fn send(&mut self, reply: Result<pb::WorkResponse, Status>) -> bool {
        self.send_message(reply).await
    }

    fn hand_over(
        &mut self,
        engine: &Engine,
        ticket: Ticket,
        reply: pb::WorkResponse,
    ) -> Result<(), pb::WorkResponse> {
        match self.hand_over_answer(engine, ticket, Handed::Work(reply, Instant::now())) {
            Ok(()) => Ok(()),
            Err(Handed::Work(reply, _)) => Err(reply),
            Err(Handed::Enqueue(_)) => unreachable!("a work answer was handed over"),
        }
    }

    fn has_room(&mut self, free: usize) -> bool {
        self.room_for(free)
    }

    fn oldest_unsent(&mut self) -> Option<Ticket> {
        self.oldest_unsent_answer()
    }

    async fn attend(&mut self) -> bool {
        self.attend_writer().await
    }
}

/// An enqueue answer on the wire: an `EnqueueResponse` encoded straight from the
/// engine's results ([`write_enqueue_response`]), with no message built in between.
struct EnqueueAnswer(Vec<Enqueued>);

impl EnqueueReply for EnqueueAnswer {
    fn from_results(results: Vec<Enqueued>) -> Self {
        EnqueueAnswer(results)
    }
}

impl Replies<EnqueueAnswer> for Out {
    async fn send(&mut self, reply: Result<EnqueueAnswer, Status>) -> bool {
        let write =
            |answer: EnqueueAnswer| move |buf: &mut Vec<u8>| Handed::Enqueue(answer.0).write(buf);
        self.send_frame(reply.map(write)).await
    }

    fn hand_over(
        &mut self,
        engine: &Engine,
        ticket: Ticket,
        reply: EnqueueAnswer,
    ) -> Result<(), EnqueueAnswer> {
        match self.hand_over_answer(engine, ticket, Handed::Enqueue(reply.0)) {
            Ok(()) => Ok(()),
            Err(Handed::Enqueue(results)) => Err(EnqueueAnswer(results)),
            Err(Handed::Work(..)) => unreachable!("an enqueue answer was handed over"),
        }
    }

    fn has_room(&mut self, free: usize) -> bool {
        self.room_for(free)
    }

    fn oldest_unsent(&mut self) -> Option<Ticket> {
        self.oldest_unsent_answer()
    }

    async fn attend(&mut self) -> bool {
        self.attend_writer().await
    }
}

/// The requests of a call, read off the connection until the client closes its side,
/// sends something malformed, or the coordinator shuts down.
struct Requests {
    frames: FrameReader<OwnedReadHalf>,
    /// Resolves when the coordinator shuts down. Made once per call, so each read
    /// polls a registered waiter instead of registering a new one.
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// A call's requests as a stream, and the status their end calls for (set once the
/// stream ended: OK when the client closed its side, the problem otherwise).
struct Messages<S> {
    stream: S,
    end: Arc<Mutex<Option<Status>>>,
}

impl Requests {
    fn new(frames: FrameReader<OwnedReadHalf>, mut stop: watch::Receiver<bool>) -> Requests {
        let stopped = Box::pin(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        });
        Requests { frames, stopped }
    }

    /// The call's requests, each frame's body made one by `decode`.
    fn messages<T: Send + 'static>(
        self,
        decode: fn(BytesMut) -> Result<T, Status>,
    ) -> Messages<impl Stream<Item = Result<T, Status>> + Unpin + Send> {
        let end = Arc::new(Mutex::new(None));
        let record = end.clone();
        let stream = stream::unfold(self, move |mut state| {
            let record = record.clone();
            async move {
                let outcome = tokio::select! {
                    biased;
                    () = &mut state.stopped => {
                        Err(Status::unavailable("the coordinator is shutting down"))
                    }
                    frame = state.frames.read_frame() => match frame {
                        Ok(Some((KIND_MESSAGE, body))) => decode(body),
                        Ok(Some((kind, _))) => Err(Status::invalid_argument(format!(
                            "a client frame of kind {kind} (only 0 is defined)"
                        ))),
                        Ok(None) => Err(Status::ok("")),
                        Err(e) => Err(frame_error(e)),
                    },
                };
                match outcome {
                    Ok(message) => Some((Ok(message), state)),
                    Err(end) => {
                        *record.lock().expect("end lock") = Some(end);
                        None
                    }
                }
            }
        });
        Messages {
            stream: Box::pin(stream),
            end,
        }
    }
}

impl<S: Stream + Unpin> Stream for Messages<S> {
    type Item = S::Item;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        Pin::new(&mut self.stream).poll_next(cx)
    }
}

impl<S> Messages<S> {
    /// The status that ends the call after the session returned: what ended its
    /// requests, or, if they never ended, the session stopped on its own, which it does
    /// only when the coordinator shuts down.
    fn ending(&self) -> Status {
        self.end
            .lock()
            .expect("end lock")
            .take()
            .unwrap_or_else(|| Status::unavailable("the coordinator is shutting down"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::engine::OptionsPatch;
    use crate::store::{Durability, Store};
    use tokio::net::TcpListener;

    const HANG: Duration = Duration::from_secs(30);

    /// A strict coordinator's wire side on 127.0.0.1:0 with queue "q"; its address.
    async fn strict_server(dir: &std::path::Path) -> (Arc<Engine>, std::net::SocketAddr) {
        server_on(dir, Durability::Strict).await
    }

    async fn server_on(
        dir: &std::path::Path,
        durability: Durability,
    ) -> (Arc<Engine>, std::net::SocketAddr) {
        let store = Store::open_disk(dir, durability).unwrap();
        let engine = Engine::open(store, Clock::system()).unwrap();
        engine
            .create_queue("q", &OptionsPatch::default(), false)
            .await
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = engine.clone();
        tokio::spawn(async move {
            let (_stop_tx, stop) = watch::channel(false);
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(serve(
                    stream,
                    serving.clone(),
                    Auth::disabled(),
                    stop.clone(),
                ));
            }
        });
        (engine, addr)
    }

    /// A call's opening bytes: the preamble and the hello.
    fn opening_of(call: pb::WireCall) -> Vec<u8> {
        let mut bytes = PREAMBLE.to_vec();
        let hello = pb::WireHello {
            call: call as i32,
            ..Default::default()
        };
        encode_frame(KIND_MESSAGE, &hello, &mut bytes);
        bytes
    }

    /// The next message of a call, or the status that ended it (`Ok` for OK).
    async fn next_frame<T: Message + Default>(
        frames: &mut FrameReader<OwnedReadHalf>,
    ) -> Result<T, Status> {
        let frame = tokio::time::timeout(HANG, frames.read_frame()).await;
        match frame.expect("hung").expect("a whole frame") {
            Some((KIND_MESSAGE, body)) => Ok(T::decode(body).unwrap()),
            Some((KIND_STATUS, body)) => {
                let status = pb::WireStatus::decode(body).unwrap();
                Err(Status::new(status.code.into(), status.message))
            }
            other => panic!("an unexpected frame: {other:?}"),
        }
    }

    /// The next enqueue answer's first id, or the status that ended the call.
    async fn next_answer(frames: &mut FrameReader<OwnedReadHalf>) -> Result<u64, Status> {
        next_frame::<pb::EnqueueResponse>(frames)
            .await
            .map(|answer| answer.results[0].id)
    }

    /// A connection to `addr` that has opened `call`.
    async fn open(
        addr: std::net::SocketAddr,
        call: pb::WireCall,
    ) -> (FrameReader<OwnedReadHalf>, OwnedWriteHalf) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read, mut write) = stream.into_split();
        write.write_all(&opening_of(call)).await.unwrap();
        (FrameReader::new(read), write)
    }

    fn enqueued(engine: &Engine) -> u64 {
        engine.stats("q").unwrap().counters.enqueued
    }

    fn request(payload: &str) -> Vec<u8> {
        let request = pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![pb::NewItem {
                payload: payload.as_bytes().to_vec().into(),
                ..Default::default()
            }],
            seal: false,
        };
        let mut bytes = Vec::new();
        encode_frame(KIND_MESSAGE, &request, &mut bytes);
        bytes
    }

    /// A client that sends and stops reading: once the answers back up, the session
    /// stops reading too (the client's writes block instead of requests and answers
    /// piling up in the coordinator), and when the client reads again every answer
    /// comes, once, in request order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_holds_up_its_strict_session_and_loses_nothing() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        // Far more than the socket buffers hold (a few MiB).
        const AT_MOST: u64 = 200_000;
        let dir = tempfile::tempdir().unwrap();
        let (engine, addr) = strict_server(dir.path()).await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.set_send_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (read, mut write) = stream.into_split();
        let written = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn({
            let (written, stop) = (written.clone(), stop.clone());
            async move {
                write
                    .write_all(&opening_of(pb::WireCall::EnqueueStream))
                    .await
                    .unwrap();
                let payload = "p".repeat(1000);
                let chunk: Vec<u8> = (0..10).flat_map(|_| request(&payload)).collect();
                while !stop.load(Ordering::SeqCst) {
                    write.write_all(&chunk).await.unwrap();
                    written.fetch_add(10, Ordering::SeqCst);
                }
                write.shutdown().await.unwrap();
            }
        });
        // Wait until the writes stop moving: the session has stopped reading.
        let mut seen = u64::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = written.load(Ordering::SeqCst);
            assert!(now < AT_MOST, "the session never stopped reading");
            if now == seen {
                break;
            }
            seen = now;
        }
        stop.store(true, Ordering::SeqCst);
        assert!(
            enqueued(&engine) <= seen + 10,
            "requests applied past the blocked writes"
        );

        let mut frames = FrameReader::new(read);
        let mut last = 0;
        let mut count = 0u64;
        loop {
            match next_answer(&mut frames).await {
                Ok(id) => {
                    assert!(id > last, "answers out of request order");
                    last = id;
                    count += 1;
                }
                Err(status) if status.code() == tonic::Code::Ok => break,
                Err(status) => panic!("the call ended with {status:?}"),
            }
        }
        writer.await.unwrap();
        assert_eq!(count, written.load(Ordering::SeqCst));
        assert_eq!(enqueued(&engine), count);
    }

    fn work_request(settlements: Vec<pb::Settlement>, credit: u32) -> Vec<u8> {
        let request = pb::WorkRequest {
            queue: "q".into(),
            worker_id: "w".into(),
            credit,
            settlements,
            ..Default::default()
        };
        let mut bytes = Vec::new();
        encode_frame(KIND_MESSAGE, &request, &mut bytes);
        bytes
    }

    /// A strict work session's settlement answers, handed to the flusher, confirm only
    /// what is on disk: acks answered before the log fails are confirmed, and the ack
    /// after it gets the error that ends the call, never a confirmation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_log_ends_a_strict_work_session_with_an_error_not_a_confirmation() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, addr) = strict_server(dir.path()).await;
        let items = (0..10)
            .map(|i| NewItem {
                payload: bytes::Bytes::from(format!("item-{i}")),
                ..Default::default()
            })
            .collect();
        engine.enqueue("q", items, false).await.unwrap();
        let (mut frames, mut write) = open(addr, pb::WireCall::Work).await;
        write.write_all(&work_request(Vec::new(), 1)).await.unwrap();
        let mut lease = next_frame::<pb::WorkResponse>(&mut frames)
            .await
            .unwrap()
            .leases
            .remove(0);
        let ack = |lease: &pb::Lease| pb::Settlement {
            id: lease.id,
            token: lease.token,
            action: pb::SettleAction::Ack as i32,
            ..Default::default()
        };
        for _ in 0..5 {
            write
                .write_all(&work_request(vec![ack(&lease)], 1))
                .await
                .unwrap();
            let mut answer = next_frame::<pb::WorkResponse>(&mut frames).await.unwrap();
            assert_eq!(answer.settled.len(), 1);
            assert_eq!(answer.settled[0].id, lease.id);
            lease = answer.leases.remove(0);
        }
        assert_eq!(engine.stats("q").unwrap().counters.completed, 5);

        let Store::Disk(log) = engine.store() else {
            unreachable!("a strict server")
        };
        log.fail_writes();
        write
            .write_all(&work_request(vec![ack(&lease)], 1))
            .await
            .unwrap();
        let status = next_frame::<pb::WorkResponse>(&mut frames)
            .await
            .expect_err("an ack was confirmed after the log failed");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    /// Answers handed to the flusher say only what is on disk: when the log fails, the
    /// requests waiting for it get the error that ends the call, never a success.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_log_ends_a_strict_enqueue_stream_with_an_error_not_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, addr) = strict_server(dir.path()).await;
        let (mut frames, mut write) = open(addr, pb::WireCall::EnqueueStream).await;
        for i in 0..20 {
            write.write_all(&request(&format!("ok-{i}"))).await.unwrap();
        }
        for _ in 0..20 {
            next_answer(&mut frames).await.unwrap();
        }

        let Store::Disk(log) = engine.store() else {
            unreachable!("a strict server")
        };
        log.fail_writes();
        for i in 0..20 {
            // The call may end (and the connection close) at the first failed write,
            // before the rest are sent.
            if write
                .write_all(&request(&format!("lost-{i}")))
                .await
                .is_err()
            {
                break;
            }
        }
        let status = next_answer(&mut frames)
            .await
            .expect_err("a request was answered after the log failed");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    /// When a batch's write fails and cutting it off the log fails too, that batch may
    /// be on disk and every later one surely is not. A stream with answers waiting in
    /// both ends with the words for the older: "look before retrying", not "retry",
    /// which would add the first request's item twice if it was on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_ends_with_the_words_for_its_oldest_unanswered_request() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, addr) = strict_server(dir.path()).await;
        let Store::Disk(log) = engine.store() else {
            unreachable!("a strict server")
        };
        let (mut frames, mut write) = open(addr, pb::WireCall::EnqueueStream).await;
        write.write_all(&request("first")).await.unwrap();
        next_answer(&mut frames).await.unwrap();

        let until = |what: &str, done: &dyn Fn() -> bool| {
            let started = Instant::now();
            while !done() {
                assert!(started.elapsed() < HANG, "{what} never happened");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let stall = log.stall_then_fail();
        write.write_all(&request("in-doubt")).await.unwrap();
        until("a flush taking the second request", &|| {
            enqueued(&engine) == 2 && log.taken() == log.last_ticket()
        });
        write.write_all(&request("not-written")).await.unwrap();
        until("the third request", &|| enqueued(&engine) == 3);
        assert!(log.last_ticket() > log.taken(), "one batch per request");
        drop(stall);

        let status = next_answer(&mut frames)
            .await
            .expect_err("a request was answered after the log failed");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("may or may not be on disk"),
            "{status:?}"
        );
    }

    /// While the disk is behind (a stalled volume), an enqueue stream takes in one
    /// request at a time, as a unary caller does, instead of applying and holding up to
    /// its pipeline's worth in memory; once the disk catches up, every request sent
    /// meanwhile is applied and answered. Relaxed mode, where answers otherwise run
    /// ahead of the disk, and strict mode, where they are handed to the flusher.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_enqueue_stream_takes_in_one_request_at_a_time_while_the_disk_is_behind() {
        for durability in [Durability::Relaxed, Durability::Strict] {
            let dir = tempfile::tempdir().unwrap();
            let (engine, addr) = server_on(dir.path(), durability).await;
            let Store::Disk(log) = engine.store() else {
                unreachable!("a disk server")
            };
            // Any write waiting for the disk puts it behind.
            log.set_max_unsynced(0);
            let (mut frames, mut write) = open(addr, pb::WireCall::EnqueueStream).await;
            write.write_all(&request("first")).await.unwrap();
            next_answer(&mut frames).await.unwrap();
            let enqueued = || engine.get_queue("q").unwrap().stats.ready;
            assert_eq!(enqueued(), 1);

            let stall = log.stall();
            for i in 0..30 {
                write
                    .write_all(&request(&format!("during-{i}")))
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(
                enqueued(),
                2,
                "{durability:?}: one request taken in while the disk is stalled"
            );
            drop(stall);
            for _ in 0..30 {
                next_answer(&mut frames).await.unwrap();
            }
            assert_eq!(enqueued(), 31, "{durability:?}");
        }
    }
}
