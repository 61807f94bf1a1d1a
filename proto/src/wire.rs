//! The workq wire protocol: `EnqueueStream` and `Work` framed straight on TCP, without
//! HTTP/2 (the framing is described at the end of `workq.proto`).
//!
//! Both sides use [`FrameReader`] and [`encode_frame`]; clients open a call with
//! [`open`] (or [`Client::wire_enqueue_stream`](crate::Client::wire_enqueue_stream) and
//! [`Client::wire_work`](crate::Client::wire_work)) and get a [`WireSender`] and a
//! [`WireReceiver`], which can be used from different tasks.
//!
//! ```no_run
//! # async fn demo() -> Result<(), workq_proto::ClientError> {
//! use workq_proto::{Client, ConnectOptions, pb};
//! let client = Client::connect(ConnectOptions::new("http://127.0.0.1:7070")).await?;
//! let (mut requests, mut responses) = client.wire_enqueue_stream().await?;
//! let item = pb::NewItem { payload: b"hello".to_vec().into(), ..Default::default() };
//! requests.send(&pb::EnqueueRequest { queue: "q".into(), items: vec![item], seal: false }).await?;
//! let answer = responses.message().await?;
//! # let _ = answer; Ok(()) }
//! ```

use std::io;
use std::marker::PhantomData;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::client::{ClientError, MAX_MESSAGE_BYTES};
use crate::pb;

/// What a wire client sends first, before any frame.
pub const PREAMBLE: &[u8; 8] = b"workq/1\n";

/// Largest frame body: a kind byte and a message of at most [`MAX_MESSAGE_BYTES`].
pub const MAX_FRAME: usize = MAX_MESSAGE_BYTES + 1;

/// Most a reader reserves ahead of the bytes it has.
const READ_CHUNK: usize = 1 << 20;

/// Frame kinds.
pub const KIND_MESSAGE: u8 = 0;
pub const KIND_STATUS: u8 = 1;

/// Appends one frame (length, kind, message) to `out`. The length is written after
/// the message, in the place left for it: asking the message for its length first
/// would walk it once more (prost's `encode` already walks it for its own length).
pub fn encode_frame(kind: u8, message: &impl Message, out: &mut Vec<u8>) {
    encode_frame_with(kind, out, |out| {
        message.encode(out).expect("a Vec grows to fit any message")
    });
}

/// Appends one frame whose body `write` appends to `out` (a message encoded by hand).
pub fn encode_frame_with(kind: u8, out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    write(out);
    let len = u32::try_from(out.len() - start - 4).expect("a frame is under 4 GiB");
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Reads frames from a byte stream. Cancel-safe: a frame is consumed only whole.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
        }
    }

    /// The next frame's kind and body; `None` when the peer closed cleanly between
    /// frames. A frame over [`MAX_FRAME`], an empty one or a connection closed inside
    /// a frame is an `InvalidData`/`UnexpectedEof` error.
    pub async fn read_frame(&mut self) -> io::Result<Option<(u8, BytesMut)>> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
                if len == 0 || len > MAX_FRAME {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a frame of {len} bytes (1 to {MAX_FRAME} allowed)"),
                    ));
                }
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    let mut body = self.buf.split_to(len);
                    let kind = body[0];
                    body.advance(1);
                    return Ok(Some((kind, body)));
                }
                // Grow with what arrives, not with what the header claims: a peer
                // cannot make us hold 64 MiB by sending four bytes.
                self.buf.reserve((4 + len - self.buf.len()).min(READ_CHUNK));
            } else if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(8 * 1024);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed inside a frame",
                    ))
                };
            }
        }
    }

    /// Reads exactly `n` raw bytes (the preamble), before any frame.
    pub async fn read_raw(&mut self, n: usize) -> io::Result<BytesMut> {
        while self.buf.len() < n {
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.split_to(n))
    }
}

/// The gRPC status a wire status frame carries.
pub fn status_from_wire(status: pb::WireStatus) -> tonic::Status {
    tonic::Status::new(tonic::Code::from_i32(status.code), status.message)
}

/// The sending half of a wire call: requests of type `T`.
#[derive(Debug)]
pub struct WireSender<T> {
    io: OwnedWriteHalf,
    buf: Vec<u8>,
    _requests: PhantomData<fn(T)>,
}

impl<T: Message> WireSender<T> {
    /// Writes one request. An error means the connection is gone; what the server
    /// answered before that is still read from the [`WireReceiver`].
    pub async fn send(&mut self, request: &T) -> Result<(), ClientError> {
        self.send_with(|out| request.encode(out).expect("a Vec grows to fit any message"))
            .await
    }

    /// Writes one request that `write` appends, encoded by hand: the bytes of a `T`
    /// (see `crate::in_place`).
    pub async fn send_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), ClientError> {
        self.buf.clear();
        encode_frame_with(KIND_MESSAGE, &mut self.buf, write);
        self.io
            .write_all(&self.buf)
            .await
            .map_err(|e| lost(&e).into())
    }

    /// Ends the call's requests, like closing a gRPC request stream: the server
    /// answers what it has, then ends the call.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.io.shutdown().await.map_err(|e| lost(&e).into())
    }
}

/// The receiving half of a wire call: responses of type `T`.
#[derive(Debug)]
pub struct WireReceiver<T> {
    frames: FrameReader<OwnedReadHalf>,
    ended: bool,
    _responses: PhantomData<fn() -> T>,
}

impl<T: Message + Default> WireReceiver<T> {
    /// The next response, `None` once the server ended the call cleanly, or the
    /// status that ended it, as `tonic::Streaming::message` gives them. A connection
    /// that closes without the server's final status is `UNAVAILABLE`. Cancel-safe.
    pub async fn message(&mut self) -> Result<Option<T>, tonic::Status> {
        if self.ended {
            return Ok(None);
        }
        let frame = self.frames.read_frame().await;
        let (kind, body) = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                let closed = io::Error::from(io::ErrorKind::UnexpectedEof);
                let mut status = tonic::Status::unavailable(
                    "the coordinator closed the connection without ending the call",
                );
                status.set_source(std::sync::Arc::new(closed));
                return Err(status);
            }
            Err(e) => return Err(lost(&e)),
        };
        match kind {
            // From a plain slice: prost reads it faster than the `BytesMut` (whose
            // zero-copy slicing only `bytes` fields would use, and responses have none).
            KIND_MESSAGE => T::decode(&body[..]).map(Some).map_err(|e| {
                tonic::Status::internal(format!("malformed response from the coordinator: {e}"))
            }),
            KIND_STATUS => {
                self.ended = true;
                let status = pb::WireStatus::decode(body).map_err(|e| {
                    tonic::Status::internal(format!("malformed status from the coordinator: {e}"))
                })?;
                match status.code {
                    0 => Ok(None),
                    _ => Err(status_from_wire(status)),
                }
            }
            other => Err(tonic::Status::internal(format!(
                "the coordinator sent a frame of unknown kind {other}"
            ))),
        }
    }
}

/// A broken connection: the io error is kept as the status's source, as tonic does
/// for its transport, so [`crate::client::is_transport_status`] tells it from an
/// answer the coordinator sent.
fn lost(error: &io::Error) -> tonic::Status {
    let mut status =
        tonic::Status::unavailable(format!("connection to the coordinator lost: {error}"));
    status.set_source(std::sync::Arc::new(io::Error::new(
        error.kind(),
        error.to_string(),
    )));
    status
}

/// Opens one wire call on `addr` (`host:port`, the coordinator's gRPC address).
pub async fn open<Req: Message, Resp: Message + Default>(
    addr: &str,
    call: pb::WireCall,
    token: Option<&str>,
    connect_timeout: Duration,
) -> Result<(WireSender<Req>, WireReceiver<Resp>), ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        url: addr.to_string(),
        reason,
    };
    let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| unreachable(format!("no connection within {connect_timeout:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    stream
        .set_nodelay(true)
        .map_err(|e| unreachable(e.to_string()))?;
    let (read, write) = stream.into_split();
    let mut buf = PREAMBLE.to_vec();
    let hello = pb::WireHello {
        call: call as i32,
        token: token.unwrap_or_default().to_string(),
    };
    encode_frame(KIND_MESSAGE, &hello, &mut buf);
    let mut sender = WireSender {
        io: write,
        buf: Vec::new(),
        _requests: PhantomData,
    };
    sender
        .io
        .write_all(&buf)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let receiver = WireReceiver {
        frames: FrameReader::new(read),
        ended: false,
        _responses: PhantomData,
    };
    Ok((sender, receiver))
}

/// The `host:port` of an `http://host:port[/]` URL.
pub fn host_port(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://")?;
    let rest = rest.trim_end_matches('/');
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_across_partial_reads() {
        let mut bytes = Vec::new();
        let hello = pb::WireHello {
            call: pb::WireCall::Work as i32,
            token: "t".repeat(5000),
        };
        encode_frame(KIND_MESSAGE, &hello, &mut bytes);
        encode_frame(KIND_STATUS, &pb::WireStatus::default(), &mut bytes);
        // Delivered one byte at a time.
        let (mut client, server) = tokio::io::duplex(1);
        tokio::spawn(async move { client.write_all(&bytes).await });
        let mut reader = FrameReader::new(server);
        let (kind, body) = reader.read_frame().await.unwrap().unwrap();
        assert_eq!(kind, KIND_MESSAGE);
        assert_eq!(pb::WireHello::decode(body).unwrap(), hello);
        let (kind, body) = reader.read_frame().await.unwrap().unwrap();
        assert_eq!(kind, KIND_STATUS);
        assert!(body.is_empty(), "a default message encodes to nothing");
        assert!(reader.read_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_empty_and_cut_frames_are_errors() {
        for bytes in [
            ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec(),
            0u32.to_be_bytes().to_vec(),
            vec![0, 0, 0, 9, KIND_MESSAGE, 1, 2],
            vec![0, 0],
        ] {
            let mut reader = FrameReader::new(&bytes[..]);
            let err = reader.read_frame().await.unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ),
                "{bytes:?}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn a_frame_header_alone_does_not_make_the_reader_reserve_its_length() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client
            .write_all(&((MAX_FRAME - 1) as u32).to_be_bytes())
            .await
            .unwrap();
        client.write_all(&[KIND_MESSAGE; 1000]).await.unwrap();
        let mut reader = FrameReader::new(server);
        let pending = tokio::time::timeout(Duration::from_millis(50), reader.read_frame()).await;
        assert!(pending.is_err(), "the frame is incomplete");
        assert!(
            reader.buf.capacity() <= 2 * READ_CHUNK,
            "reserved {} bytes for 1,004 received",
            reader.buf.capacity()
        );
        drop(client);
    }

    #[tokio::test]
    async fn a_connection_closed_mid_call_is_a_transport_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (read, _write) = client.unwrap().into_split();
        drop(accepted.unwrap());
        let mut receiver = WireReceiver::<pb::WireStatus> {
            frames: FrameReader::new(read),
            ended: false,
            _responses: PhantomData,
        };
        let status = receiver.message().await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(crate::client::is_transport_status(&status), "{status:?}");
        // The coordinator's own status is not.
        let answered = status_from_wire(pb::WireStatus {
            code: tonic::Code::Unavailable as i32,
            message: "shutting down".into(),
        });
        assert!(!crate::client::is_transport_status(&answered));
    }

    #[test]
    fn host_port_takes_plain_http_urls_only() {
        assert_eq!(host_port("http://127.0.0.1:7070"), Some("127.0.0.1:7070"));
        assert_eq!(host_port("http://localhost:7070/"), Some("localhost:7070"));
        assert_eq!(host_port("https://localhost:7070"), None);
        assert_eq!(host_port("http://localhost:7070/x"), None);
        assert_eq!(host_port("http://"), None);
    }
}
