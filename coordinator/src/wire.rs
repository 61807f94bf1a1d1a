//! The wire protocol's server side: `EnqueueStream` and `Work` framed straight on a
//! TCP connection (format in `workq.proto`, framing in `workq_proto::wire`).
//!
//! Connections reach here from the gRPC listener, which hands over every connection
//! that starts with the wire preamble ([`is_wire`]); everything else goes to tonic.
//! Each connection is one task: it reads the hello, checks the token, then runs the
//! same session code as the gRPC streams (`crate::stream`), reading requests off the
//! socket and writing each answer straight back, with no HTTP/2 framing, no extra
//! task and no channel in between.
//!
//! Every call ends with a status frame: OK when the client closed its side and got
//! every answer, the error otherwise. A client that sees the connection close without
//! one knows the coordinator went away mid-call.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::stream;
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
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
use crate::stream::{EnqueueInput, EnqueueReply, ReadEnqueue, Replies};

/// How long a new connection may take to show its first bytes, and a wire client its
/// hello, before the coordinator drops it.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// True when the connection starts with the wire preamble, false for anything else
/// (a gRPC client's HTTP/2 preface, a probe that connects and closes). Only peeks:
/// the bytes stay for whoever serves the connection.
pub async fn is_wire(stream: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; PREAMBLE.len()];
    let mut wait = Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 || first[..n] != PREAMBLE[..n] {
            return Ok(false);
        }
        if n == PREAMBLE.len() {
            return Ok(true);
        }
        // Part of the preamble so far: peek again once more has arrived, backing off
        // (a real client sends its preamble in one write; this is a trickle or a
        // client that closed mid-preamble, which the caller's timeout ends).
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
    let mut out = Out {
        io: write,
        buf: Vec::with_capacity(4096),
        ended: false,
    };
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
    let _ = out.io.shutdown().await;
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
    io: OwnedWriteHalf,
    buf: Vec<u8>,
    /// A status frame went out: the call is over and nothing more is written.
    ended: bool,
}

impl Out {
    async fn end(mut self, status: Status) {
        Replies::<pb::WireStatus>::send(&mut self, Err(status)).await;
        let _ = self.io.shutdown().await;
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
        let written = self.io.write_all(&self.buf).await.is_ok();
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::with_capacity(4096); // do not keep a big batch's buffer
        }
        written
    }
}

impl<T: Message + Send + 'static> Replies<T> for Out {
    async fn send(&mut self, reply: Result<T, Status>) -> bool {
        let write = |message: T| {
            move |buf: &mut Vec<u8>| message.encode(buf).expect("a Vec grows to fit any message")
        };
        self.send_frame(reply.map(write)).await
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
        let write = |answer: EnqueueAnswer| {
            move |buf: &mut Vec<u8>| {
                let results = answer.0.into_iter().map(crate::grpc::enqueue_result_pb);
                write_enqueue_response(results, buf);
            }
        };
        self.send_frame(reply.map(write)).await
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
