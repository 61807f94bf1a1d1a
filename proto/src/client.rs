//! A small client for the coordinator: connect (optionally with a bearer token) and
//! call the generated `WorkQ` methods.
//!
//! ```no_run
//! # async fn demo() -> Result<(), workq_proto::ClientError> {
//! use workq_proto::{Client, ConnectOptions, pb};
//! let mut client = Client::connect(ConnectOptions::new("http://127.0.0.1:7070")).await?;
//! let queues = client.list_queues(pb::ListQueuesRequest {}).await?.into_inner();
//! # let _ = queues; Ok(()) }
//! ```

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls::RootCertStore;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tonic::codegen::{BoxFuture, Service, http};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::pb;
use crate::pb::work_q_client::WorkQClient;
use crate::wire::{WireReceiver, WireSender};

/// The default coordinator address clients use.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

/// Largest message the client accepts or sends; matches the server's limit.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How to reach the coordinator.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// `http://host:port`, or `https://host:port` for a coordinator serving TLS.
    pub url: String,
    /// Bearer token sent with every call, when the coordinator wants one.
    pub token: Option<String>,
    /// PEM certificates of the CAs that an `https://` coordinator's certificate must
    /// chain to, instead of the system's.
    pub ca_cert: Option<Vec<u8>>,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
}

impl ConnectOptions {
    pub fn new(url: impl Into<String>) -> Self {
        ConnectOptions {
            url: url.into(),
            token: None,
            ca_cert: None,
            connect_timeout: Duration::from_secs(5),
        }
    }

    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// Trusts the CA certificates of the PEM file at `path` (`--ca-cert`), instead of
    /// the system's; `None` leaves the options as they are.
    pub fn ca_cert_file(mut self, path: Option<&std::path::Path>) -> Result<Self, ClientError> {
        if let Some(path) = path {
            let pem = std::fs::read(path).map_err(|e| {
                ClientError::InvalidCaCert(format!("cannot read {}: {e}", path.display()))
            })?;
            let count = check_ca_pem(&pem).map_err(|reason| {
                ClientError::InvalidCaCert(format!("{}: {reason}", path.display()))
            })?;
            if count == 0 {
                return Err(ClientError::InvalidCaCert(format!(
                    "{} holds no PEM CERTIFICATE block",
                    path.display()
                )));
            }
            self.ca_cert = Some(pem);
        }
        Ok(self)
    }
}

/// Reads the CERTIFICATE blocks of a CA file as the TLS client will: the number of
/// them, or what is wrong with one. Checked here, where the file's name is known:
/// the TLS client refuses a bad block with only "Error parsing TLS certificate".
fn check_ca_pem(pem: &[u8]) -> Result<usize, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| describe_pem_error(&e))?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        roots.add(cert.clone()).map_err(|e| {
            let why = match e {
                tokio_rustls::rustls::Error::InvalidCertificate(e) => format!("{e:?}"),
                e => e.to_string(),
            };
            format!("CERTIFICATE block {} is not a certificate ({why})", i + 1)
        })?;
    }
    Ok(certs.len())
}

/// A PEM parse error in words: the section label as text, not as bytes. Shared with
/// the coordinator, which reads its own certificate and key.
pub fn describe_pem_error(error: &pem::Error) -> String {
    match error {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "the {} block has no END line (is the file cut short?)",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "malformed BEGIN line: {}",
            String::from_utf8_lossy(line).trim()
        ),
        pem::Error::Base64Decode(e) => format!("a PEM block is not valid base64 ({e})"),
        e => e.to_string(),
    }
}

/// Why a client could not talk to the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server address '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("invalid --ca-cert: {0}")]
    InvalidCaCert(String),
    #[error(
        "this system has no CA certificates to check an https:// coordinator against: \
         pass --ca-cert (or WORKQ_CA_CERT)"
    )]
    NoCaCertificates,
    #[error("cannot reach coordinator at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error(
        "the wire protocol has no TLS, and an https:// coordinator does not offer it: \
         use the gRPC streams (--mode stream)"
    )]
    WireWithoutTls,
    #[error("{}", describe_status(.0))]
    Status(#[from] tonic::Status),
}

impl ClientError {
    /// True when retrying later may help (coordinator down or shutting down, or its
    /// certificate expired, which a renewal mends). A TLS mistake that only a change
    /// of the client's or the coordinator's configuration mends is not: see
    /// [`TlsFailure::is_transient`].
    pub fn is_transient(&self) -> bool {
        if self.tls_failure().is_some_and(|f| !f.is_transient()) {
            return false;
        }
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Status(s) => is_transient_status(s),
            _ => false,
        }
    }

    /// What was wrong with the TLS handshake, when that is why the connection failed.
    pub fn tls_failure(&self) -> Option<TlsFailure> {
        match self {
            ClientError::Unreachable { reason, .. } => TlsFailure::of(reason),
            ClientError::Status(status) => tls_failure(status),
            _ => None,
        }
    }

    /// The gRPC status, when the coordinator answered.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s) => Some(s),
            _ => None,
        }
    }
}

/// True for statuses that mean "the coordinator is (momentarily) not there": a
/// connection that failed or broke (the transport's UNAVAILABLE, UNKNOWN and
/// CANCELLED), or a coordinator that said UNAVAILABLE on its way out (shutting down, or
/// stopping after a storage failure, to be restarted).
pub fn is_transient_status(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) || went_away(status)
}

/// True when the call failed because the coordinator closed the connection with an
/// HTTP/2 GOAWAY, as one does when it stops: tonic reports the calls the GOAWAY cut
/// off as INTERNAL ("h2 protocol error"), though all they need is another
/// connection. (A call the GOAWAY names as not taken was never processed; one cut
/// when the connection closed after it may have been, so this says nothing about
/// whether the call took effect.)
pub fn went_away(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote();
        }
        source = cause.source();
    }
    false
}

/// Why a TLS handshake with the coordinator failed, as far as a client can fix it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The certificate has expired, or is not valid yet.
    Expired,
    /// The certificate does not list the name or address the client dialled.
    WrongName,
    /// The certificate does not chain to a CA the client trusts (UnknownIssuer,
    /// BadSignature and the like).
    Untrusted,
    /// An `https://` client read plain text: the port does not serve TLS.
    NotTls,
}

impl TlsFailure {
    /// Reads the failure off an error's text (rustls' words, which reach a client
    /// only as text once tonic has turned them into a status message).
    pub fn of(reason: &str) -> Option<TlsFailure> {
        if reason.contains("invalid peer certificate") {
            let expired = [
                "Expired",
                "certificate expired",
                "NotValidYet",
                "not valid yet",
            ];
            let wrong_name = ["NotValidForName", "not valid for name"];
            // The name first: its words quote names, which might hold any text.
            Some(if wrong_name.iter().any(|e| reason.contains(e)) {
                TlsFailure::WrongName
            } else if expired.iter().any(|e| reason.contains(e)) {
                TlsFailure::Expired
            } else {
                TlsFailure::Untrusted
            })
        } else if reason.contains("received corrupt message") {
            // Plain HTTP/2 (or HTTP/1.1) read as TLS records: "corrupt message of
            // type InvalidContentType".
            Some(TlsFailure::NotTls)
        } else {
            None
        }
    }

    /// True when the same client may get through later with nothing changed on its
    /// side: an expired certificate is renewed on the coordinator. The others are
    /// configuration mistakes that waiting does not mend (the client reads its CA
    /// file once, and keeps the address it dials).
    pub fn is_transient(self) -> bool {
        self == TlsFailure::Expired
    }

    /// What to do about it, for a client of `url`.
    fn hint(self, url: &str) -> String {
        match self {
            TlsFailure::Expired => {
                "renew the coordinator's certificate, or check the clocks of this machine \
                 and the coordinator's"
                    .into()
            }
            TlsFailure::WrongName => {
                let host = url
                    .parse::<http::Uri>()
                    .ok()
                    .and_then(|uri| uri.host().map(str::to_string))
                    .unwrap_or_else(|| "this address".into());
                format!(
                    "dial a name or address the certificate lists, or reissue the \
                     certificate with {host} among its names"
                )
            }
            TlsFailure::Untrusted => {
                "trust the coordinator's CA with --ca-cert or WORKQ_CA_CERT".into()
            }
            TlsFailure::NotTls => "if the coordinator does not serve TLS, use http://".into(),
        }
    }
}

/// What was wrong with the TLS handshake of a connection that failed or broke, when
/// that is why; `None` for a status the coordinator sent.
pub fn tls_failure(status: &tonic::Status) -> Option<TlsFailure> {
    let cause = std::error::Error::source(status)?;
    TlsFailure::of(&error_chain(cause))
}

/// True when the connection was closed because nothing answered the client's
/// HTTP/2 pings (sent every 20 s, 10 s to answer): the port took the connection,
/// then stayed silent, as a stopped coordinator or a dead node does.
pub fn pings_unanswered(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        // hyper's error for it is private; its words are not.
        if cause.to_string() == "keep-alive timed out" {
            return true;
        }
        source = cause.source();
    }
    false
}

/// What [`pings_unanswered`] means, in a user's words.
pub const PINGS_UNANSWERED: &str =
    "the coordinator accepted the connection but stopped answering (HTTP/2 pings went unanswered)";

/// True when an HTTP server that is not gRPC answered the call: tonic read an HTTP
/// error page as a gRPC message, or found no gRPC status in the answer. Such is the
/// coordinator's HTTP port, mistaken for its gRPC port.
pub fn answered_by_plain_http(status: &tonic::Status) -> bool {
    let message = status.message();
    let status_not_ok = message.contains("while receiving response with status")
        && !message.ends_with("status: 200 OK");
    status_not_ok || message.contains("grpc-status header missing, mapped from HTTP status")
}

/// True when the status came from the transport (the connection failed or broke),
/// not from an answer the coordinator sent: tonic keeps the transport's error as the
/// status's source, while a status read from the coordinator's trailers has none.
pub fn is_transport_status(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// True when the call's request was certainly never sent, so it did not take
/// effect: it found nothing listening, or the connection closed while the request
/// still waited to be written (hyper cancels it then).
pub fn was_never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let refused = cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
        let canceled = cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled);
        if refused || canceled {
            return true;
        }
        source = cause.source();
    }
    false
}

/// One line for humans: the coordinator's message, which already says what was wrong.
pub fn describe_status(status: &tonic::Status) -> String {
    let message = status.message();
    match status.code() {
        tonic::Code::Unauthenticated if message.is_empty() => {
            "unauthenticated: the coordinator wants a token (--token or WORKQ_TOKEN)".into()
        }
        _ if pings_unanswered(status) => PINGS_UNANSWERED.into(),
        _ if message.is_empty() => format!("coordinator answered {:?}", status.code()),
        _ if went_away(status) => {
            "the coordinator closed the connection (HTTP/2 GOAWAY): it is stopping or \
             restarting"
                .into()
        }
        // What a plain http:// client reads from a port that serves TLS.
        _ if message.contains("h2 protocol error") => {
            format!("{message} (if the coordinator serves TLS, use https://)")
        }
        _ if answered_by_plain_http(status) => format!(
            "{message} (is this the coordinator's HTTP port? workq's clients talk to its \
             gRPC port, default 7070)"
        ),
        _ => message.to_string(),
    }
}

/// Why a connection to `url` failed, with a hint where TLS may be the cause: a
/// certificate that failed the check (what to do depends on why, see
/// [`TlsFailure`]), an `https://` client reading plain text, or a plain connection
/// closed without a word, as a port serving TLS closes one (which of these words
/// the client reads depends on when the close arrives).
pub fn with_tls_hint(url: &str, reason: String) -> String {
    const CLOSED: [&str; 3] = [
        "transport error",
        "operation was canceled",
        "h2 protocol error",
    ];
    // Nothing listening (or no route): TLS cannot be why.
    let tcp_failed = reason.contains("tcp connect error");
    if let Some(failure) = TlsFailure::of(&reason) {
        let hint = failure.hint(url);
        format!("{reason} ({hint})")
    } else if url.starts_with("http://")
        && !tcp_failed
        && CLOSED.iter().any(|c| reason.starts_with(c))
    {
        format!("{reason} (if the coordinator serves TLS, use https://)")
    } else {
        reason
    }
}

/// The TCP connector under a client's channel. Given to tonic as a custom connector
/// (tonic adds TLS on top), the endpoint's connect timeout covers the TCP connect and
/// the TLS handshake together, on the first connection and on every reconnect: a port
/// that accepts a connection and never answers the handshake (a coordinator that ran
/// out of file descriptors, or a process that is stopped) fails the attempt instead
/// of holding it for ever. tonic's own connector times the TCP connect alone.
///
/// It notes whether a TCP connection was made, so that an attempt that timed out
/// can say which half of it did, and, on a plain `http://` connection, whether the
/// server opened with an HTTP/2 SETTINGS frame (see [`Watched`]).
#[derive(Clone, Debug)]
struct TcpConnector {
    tcp: HttpConnector,
    connected: Arc<AtomicBool>,
    answered: Answered,
    /// Notified when a server first sends something (or closes) on a plain
    /// connection.
    spoke: Arc<tokio::sync::Notify>,
}

impl TcpConnector {
    fn new(answered: Answered) -> TcpConnector {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        TcpConnector {
            tcp,
            connected: Arc::default(),
            answered,
            spoke: Arc::default(),
        }
    }
}

impl Service<http::Uri> for TcpConnector {
    type Response = TokioIo<Watched>;
    type Error = <HttpConnector as Service<http::Uri>>::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.tcp.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        // Under TLS the first bytes are a TLS record, and a finished handshake
        // already says the port was no plain one.
        let plain = uri.scheme_str() == Some("http");
        let connecting = self.tcp.call(uri);
        let connected = self.connected.clone();
        let answered = plain.then(|| (self.answered.0.clone(), self.spoke.clone()));
        Box::pin(async move {
            let stream = connecting.await?.into_inner();
            connected.store(true, Ordering::Relaxed);
            Ok(TokioIo::new(Watched {
                stream,
                header: [0; 9],
                seen: 0,
                answered,
            }))
        })
    }
}

/// A plain TCP connection that sets [`Answered`] when the server's first nine bytes
/// are the header of an HTTP/2 SETTINGS frame on stream 0, which an HTTP/2 server
/// sends first on every connection. A port that serves TLS sends a TLS alert
/// instead, so a connection that breaks after this was lost (the coordinator
/// stopped), not refused for speaking plain text, even when no call had been
/// answered yet. Its first read of anything (bytes, the end, an error) wakes
/// [`Client::connect`], which waits for the server to say something.
#[derive(Debug)]
struct Watched {
    stream: tokio::net::TcpStream,
    header: [u8; 9],
    seen: usize,
    /// Until the header has been read: what to set, and whom to tell that the
    /// server sent something.
    answered: Option<(Arc<AtomicBool>, Arc<tokio::sync::Notify>)>,
}

impl Watched {
    fn note(&mut self, read: &[u8]) {
        let Some((answered, spoke)) = &self.answered else {
            return;
        };
        // Once is enough; a Notify keeps at most one wake-up for its waiter.
        spoke.notify_one();
        let n = read.len().min(self.header.len() - self.seen);
        self.header[self.seen..self.seen + n].copy_from_slice(&read[..n]);
        self.seen += n;
        if self.seen == self.header.len() || read.is_empty() {
            let settings = self.header[3] == 0x4;
            let stream_zero = self.header[5..9].iter().all(|b| b & 0x7f == 0);
            if self.seen == self.header.len() && settings && stream_zero {
                answered.store(true, Ordering::Relaxed);
            }
            self.answered = None;
        }
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        if self.answered.is_some() && polled.is_ready() {
            // Bytes, the end of the stream (nothing read), or an error: all say the
            // server is not silent.
            self.note(&buf.filled()[before..]);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// True when the connect timeout ended the attempt (tonic's timer, not the system's
/// TCP timeout, which is a "tcp connect error").
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(cause) = source {
        let elapsed = cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .is_some_and(|inner| inner.is::<tokio::time::error::Elapsed>());
        if elapsed || cause.is::<tokio::time::error::Elapsed>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Why an attempt that the connect timeout ended failed, by how far it got.
fn no_answer(options: &ConnectOptions, tcp_connected: bool) -> String {
    let limit = crate::duration::format(options.connect_timeout);
    match (tcp_connected, options.url.starts_with("https://")) {
        (true, true) => format!(
            "the port accepted the connection but gave no TLS handshake within the {limit} \
             a connection attempt may take"
        ),
        (true, false) => format!(
            "the port accepted the connection but did not answer within the {limit} a \
             connection attempt may take"
        ),
        (false, _) => format!(
            "no TCP connection within the {limit} a connection attempt may take (a wrong \
             address, or a firewall dropping packets?)"
        ),
    }
}

/// Refuses a port outside 1–65535 in `url`, which the URI parser would pass on (and
/// the connector would wrap around to another port).
fn check_port(url: &str) -> Result<(), String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let Some((_, port)) = host_port.rsplit_once(':') else {
        return Ok(());
    };
    if port.contains(']') {
        // The colon is inside an IPv6 address and no port is given.
        return Ok(());
    }
    match port.parse::<u16>() {
        Ok(1..) => Ok(()),
        _ => Err(format!(
            "the port must be a number from 1 to 65535, not '{port}'"
        )),
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone, Debug)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
}

impl Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// Whether the coordinator has answered a client: set at the first HTTP/2 response
/// (headers, or trailers alone) on any of the client's calls, or, on a plain
/// connection, once the server has opened HTTP/2 (see [`Watched`]); never cleared.
///
/// A connection that breaks after that was not a TLS port read as plain text, nor a
/// coordinator that could not be reached: it was lost, and a call cut then may or
/// may not have taken effect.
#[derive(Clone, Debug, Default)]
pub struct Answered(Arc<AtomicBool>);

impl Answered {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The channel, noting in [`Answered`] when a response arrives.
#[derive(Clone, Debug)]
pub struct NoteAnswers {
    channel: Channel,
    answered: Answered,
}

impl<B> Service<http::Request<B>> for NoteAnswers
where
    Channel: Service<http::Request<B>>,
    <Channel as Service<http::Request<B>>>::Future: Send + 'static,
{
    type Response = <Channel as Service<http::Request<B>>>::Response;
    type Error = <Channel as Service<http::Request<B>>>::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<http::Request<B>>::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.channel.call(request);
        let answered = self.answered.0.clone();
        Box::pin(async move {
            let response = response.await?;
            answered.store(true, Ordering::Relaxed);
            Ok(response)
        })
    }
}

type Inner = WorkQClient<InterceptedService<NoteAnswers, Auth>>;

/// A connected client. Cheap to clone; clones share one HTTP/2 connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Inner,
    answered: Answered,
    url: String,
    token: Option<String>,
    connect_timeout: Duration,
}

impl Client {
    /// Connects once; fails fast with [`ClientError::Unreachable`] when nothing listens.
    pub async fn connect(options: ConnectOptions) -> Result<Client, ClientError> {
        let endpoint = Self::endpoint(&options)?;
        let started = tokio::time::Instant::now();
        let answered = Answered::default();
        let connector = TcpConnector::new(answered.clone());
        let tcp_connected = connector.connected.clone();
        let spoke = connector.spoke.clone();
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| ClientError::Unreachable {
                url: options.url.clone(),
                reason: if timed_out(&e) {
                    no_answer(&options, tcp_connected.load(Ordering::Relaxed))
                } else {
                    with_tls_hint(&options.url, error_chain(&e))
                },
            })?;
        // On plain HTTP/2 the connection is made once the client has written its
        // preface, whether or not anything listens behind the port. The server's
        // first bytes (its SETTINGS, or whatever else it says) are waited for within
        // the same timeout, so that a port that never answers fails here, as under
        // TLS, and not after the pings that would find it out half a minute later.
        // The first call says what was wrong with whatever came.
        if options.url.starts_with("http://") {
            let deadline = started + options.connect_timeout;
            if tokio::time::timeout_at(deadline, spoke.notified())
                .await
                .is_err()
            {
                return Err(ClientError::Unreachable {
                    url: options.url.clone(),
                    reason: no_answer(&options, true),
                });
            }
        }
        Self::with_channel(channel, answered, &options)
    }

    /// A client that connects on first use and reconnects by itself afterwards.
    pub fn connect_lazy(options: ConnectOptions) -> Result<Client, ClientError> {
        let answered = Answered::default();
        let channel = Self::endpoint(&options)?
            .connect_with_connector_lazy(TcpConnector::new(answered.clone()));
        Self::with_channel(channel, answered, &options)
    }

    fn endpoint(options: &ConnectOptions) -> Result<Endpoint, ClientError> {
        let invalid = |reason: String| ClientError::InvalidUrl {
            url: options.url.clone(),
            reason,
        };
        let tls = options.url.starts_with("https://");
        if !tls && !options.url.starts_with("http://") {
            return Err(invalid("it must start with http:// or https://".into()));
        }
        if !tls && options.ca_cert.is_some() {
            return Err(invalid(
                "--ca-cert (WORKQ_CA_CERT) is for a coordinator serving TLS: use https://".into(),
            ));
        }
        check_port(&options.url).map_err(invalid)?;
        let mut endpoint = Endpoint::from_shared(options.url.clone())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(options.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if tls {
            // Like curl's --cacert: the given CAs replace the system's, which a slim
            // image (workq's own) does not have.
            let config = match &options.ca_cert {
                Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
                None => ClientTlsConfig::new().with_native_roots(),
            };
            endpoint = endpoint.tls_config(config).map_err(|e| {
                let reason = error_chain(&e);
                if reason.contains("no native certs") {
                    ClientError::NoCaCertificates
                } else if reason.contains("certificate") {
                    // CA bytes given without ca_cert_file, which checks them first.
                    ClientError::InvalidCaCert(reason)
                } else {
                    invalid(reason)
                }
            })?;
        }
        Ok(endpoint)
    }

    fn with_channel(
        channel: Channel,
        answered: Answered,
        options: &ConnectOptions,
    ) -> Result<Client, ClientError> {
        let header = match &options.token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ClientError::InvalidToken("it must be printable ASCII".into()))?,
            ),
            None => None,
        };
        let channel = NoteAnswers {
            channel,
            answered: answered.clone(),
        };
        let inner = WorkQClient::with_interceptor(channel, Auth { header })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Client {
            inner,
            answered,
            url: options.url.clone(),
            token: options.token.clone(),
            connect_timeout: options.connect_timeout,
        })
    }

    /// The address this client talks to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the coordinator has answered any of this client's calls (shared by
    /// its clones).
    pub fn answered(&self) -> Answered {
        self.answered.clone()
    }

    /// Opens `EnqueueStream` over the wire protocol ([`crate::wire`]) on a connection
    /// of its own to the same address: the same messages and answers, without HTTP/2.
    pub async fn wire_enqueue_stream(
        &self,
    ) -> Result<
        (
            WireSender<pb::EnqueueRequest>,
            WireReceiver<pb::EnqueueResponse>,
        ),
        ClientError,
    > {
        self.wire_open(pb::WireCall::EnqueueStream).await
    }

    /// Opens a `Work` session over the wire protocol ([`crate::wire`]); the first
    /// request names the queue and the worker, as on the gRPC stream.
    pub async fn wire_work(
        &self,
    ) -> Result<(WireSender<pb::WorkRequest>, WireReceiver<pb::WorkResponse>), ClientError> {
        self.wire_open(pb::WireCall::Work).await
    }

    async fn wire_open<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        call: pb::WireCall,
    ) -> Result<(WireSender<Req>, WireReceiver<Resp>), ClientError> {
        if self.url.starts_with("https://") {
            return Err(ClientError::WireWithoutTls);
        }
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: self.url.clone(),
            reason: reason.into(),
        };
        let addr = crate::wire::host_port(&self.url)
            .ok_or_else(|| invalid("the wire protocol needs an http://host:port address"))?;
        crate::wire::open(addr, call, self.token.as_deref(), self.connect_timeout).await
    }
}

impl Deref for Client {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_outside_1_to_65535_are_refused() {
        for url in [
            "http://127.0.0.1:7070",
            "http://127.0.0.1",
            "https://coordinator.workq.svc:443/",
            "http://[::1]:7070",
            "http://[::1]",
            "http://user:secret@host:7070",
        ] {
            assert_eq!(check_port(url), Ok(()), "{url}");
        }
        for url in [
            "http://127.0.0.1:99999",
            "http://127.0.0.1:0",
            "http://127.0.0.1:",
            "http://[::1]:70000",
            "http://host:-1/path",
        ] {
            let error = check_port(url).unwrap_err();
            assert!(error.contains("from 1 to 65535"), "{url}: {error}");
        }
    }

    #[test]
    fn a_status_the_coordinator_sent_is_told_from_a_broken_connection() {
        let answered = tonic::Status::unavailable("shutting down");
        assert!(is_transient_status(&answered));
        assert!(!is_transport_status(&answered));
        let broken = tonic::Status::from_error(Box::new(std::io::Error::other("reset")));
        assert!(is_transient_status(&broken));
        assert!(is_transport_status(&broken));
        // A queue's name in the message changes nothing.
        assert!(is_transient_status(&tonic::Status::unavailable(
            "storage failure: queue 'q': the change is not on disk"
        )));
        assert!(!is_transient_status(&tonic::Status::not_found(
            "queue 'q' not found"
        )));
    }

    #[tokio::test]
    async fn a_call_that_found_nothing_listening_was_never_sent() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind")
            .port();
        let options = ConnectOptions::new(format!("http://127.0.0.1:{port}"));
        let mut client = Client::connect_lazy(options).expect("lazy client");
        let status = client
            .list_queues(pb::ListQueuesRequest {})
            .await
            .expect_err("nothing listens");
        assert!(was_never_sent(&status), "{status:?}");
        assert!(is_transport_status(&status));
        assert!(!client.answered().get());
        assert!(!was_never_sent(&tonic::Status::unavailable(
            "connection refused"
        )));
    }

    /// Serves one connection on a fresh port: writes `opening`, reads what the client
    /// sends for a moment, and closes.
    async fn one_connection_opening_with(opening: &'static [u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            socket.write_all(opening).await.expect("write");
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf)).await;
        });
        url
    }

    /// A coordinator that stops sends a GOAWAY: a call it turned away is one to make
    /// again on a new connection, not an internal error.
    #[tokio::test]
    async fn a_call_turned_away_by_a_goaway_is_transient() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let mut connection = h2::server::handshake(socket).await.expect("handshake");
            // Takes no stream: every call the client opens is past the last one taken.
            connection.abrupt_shutdown(h2::Reason::NO_ERROR);
            while connection.accept().await.is_some() {}
        });
        let mut client = Client::connect_lazy(ConnectOptions::new(url)).expect("lazy client");
        let status = client
            .list_queues(pb::ListQueuesRequest {})
            .await
            .expect_err("the server took no call");
        assert!(went_away(&status), "{status:?}");
        assert!(is_transient_status(&status), "{status:?}");
        assert!(describe_status(&status).contains("GOAWAY"), "{status:?}");
        assert!(!went_away(&tonic::Status::internal("h2 protocol error")));
    }

    #[tokio::test]
    async fn a_plain_connection_whose_server_opened_http2_counts_as_answered() {
        // An HTTP/2 server's first frame: an empty SETTINGS frame on stream 0.
        let url = one_connection_opening_with(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
        let mut client = Client::connect_lazy(ConnectOptions::new(url)).expect("lazy client");
        let status = client
            .list_queues(pb::ListQueuesRequest {})
            .await
            .expect_err("the server closed the connection");
        assert!(is_transport_status(&status), "{status:?}");
        assert!(client.answered().get(), "{status:?}");
    }

    #[tokio::test]
    async fn a_plain_connection_answered_by_a_tls_alert_does_not_count_as_answered() {
        // What a TLS server writes to a client that opened with plain HTTP/2: a fatal
        // alert record.
        let url = one_connection_opening_with(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]).await;
        let mut client = Client::connect_lazy(ConnectOptions::new(url)).expect("lazy client");
        let status = client
            .list_queues(pb::ListQueuesRequest {})
            .await
            .expect_err("the server closed the connection");
        assert!(!client.answered().get(), "{status:?}");
    }

    #[test]
    fn the_tls_hint_is_left_off_a_refused_connection() {
        let refused =
            "transport error: tcp connect error: Connection refused (os error 111)".to_string();
        assert_eq!(
            with_tls_hint("http://127.0.0.1:1", refused.clone()),
            refused
        );
        let closed = "transport error: connection closed".to_string();
        assert!(
            with_tls_hint("http://127.0.0.1:1", closed).ends_with("use https://)"),
            "a connection closed without a word may be a TLS port"
        );
        let untrusted = "transport error: invalid peer certificate: UnknownIssuer".to_string();
        assert!(with_tls_hint("https://h:1", untrusted).contains("--ca-cert"));
    }

    /// rustls' words for each way a certificate fails (as a client reads them), and
    /// those of an https:// client reading plain text.
    const EXPIRED: &str = "transport error: invalid peer certificate: certificate expired: \
        verification time 1796647428 (UNIX), but certificate is not valid after 1580515200 \
        (216132228 seconds ago)";
    const NOT_YET_VALID: &str = "transport error: invalid peer certificate: certificate not \
        valid yet: verification time 1 (UNIX), but certificate is not valid before 2 (1 \
        seconds in future)";
    const WRONG_NAME: &str = "transport error: invalid peer certificate: certificate not valid \
        for name \"127.0.0.1\"; certificate is only valid for DnsName(\"localhost\")";
    const UNTRUSTED: &str = "transport error: invalid peer certificate: UnknownIssuer";
    const PLAIN_TEXT: &str = "transport error: received corrupt message of type InvalidContentType";

    #[test]
    fn each_certificate_failure_gets_the_hint_that_fixes_it() {
        let url = "https://127.0.0.1:7070";
        let hinted = |reason: &str| with_tls_hint(url, reason.to_string());
        for expired in [EXPIRED, NOT_YET_VALID, "invalid peer certificate: Expired"] {
            let text = hinted(expired);
            assert!(
                text.contains("renew the coordinator's certificate"),
                "{text}"
            );
            assert!(text.contains("clocks"), "{text}");
            assert!(!text.contains("--ca-cert"), "{text}");
        }
        for wrong_name in [WRONG_NAME, "invalid peer certificate: NotValidForName"] {
            let text = hinted(wrong_name);
            assert!(
                text.contains("dial a name or address the certificate lists"),
                "{text}"
            );
            assert!(text.contains("127.0.0.1 among its names"), "{text}");
            assert!(!text.contains("--ca-cert"), "{text}");
        }
        for untrusted in [UNTRUSTED, "invalid peer certificate: BadSignature"] {
            let text = hinted(untrusted);
            assert!(text.ends_with("(trust the coordinator's CA with --ca-cert or WORKQ_CA_CERT)"));
        }
        let text = hinted(PLAIN_TEXT);
        assert!(
            text.ends_with("(if the coordinator does not serve TLS, use http://)"),
            "{text}"
        );
        // A connection closed or refused is none of these.
        assert_eq!(TlsFailure::of("transport error: connection closed"), None);
    }

    #[test]
    fn only_an_expired_certificate_is_worth_waiting_for() {
        let unreachable = |reason: &str| ClientError::Unreachable {
            url: "https://127.0.0.1:7070".into(),
            reason: with_tls_hint("https://127.0.0.1:7070", reason.to_string()),
        };
        for (reason, failure) in [
            (EXPIRED, TlsFailure::Expired),
            (NOT_YET_VALID, TlsFailure::Expired),
            (WRONG_NAME, TlsFailure::WrongName),
            (UNTRUSTED, TlsFailure::Untrusted),
            (PLAIN_TEXT, TlsFailure::NotTls),
        ] {
            let error = unreachable(reason);
            assert_eq!(error.tls_failure(), Some(failure), "{error}");
            assert_eq!(
                error.is_transient(),
                failure == TlsFailure::Expired,
                "{error}"
            );
        }
        // Nothing listening, or no answer in time: the coordinator may come.
        assert!(
            unreachable("transport error: tcp connect error: Connection refused").is_transient()
        );
        assert!(unreachable("extend got no answer").is_transient());
        // The same words in a status the transport made (a reconnect) count too; a
        // message the coordinator sent does not.
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, UNTRUSTED);
        let broken = tonic::Status::from_error(Box::new(io));
        assert_eq!(tls_failure(&broken), Some(TlsFailure::Untrusted));
        assert!(!ClientError::Status(broken).is_transient());
        let said = tonic::Status::unavailable(UNTRUSTED);
        assert_eq!(tls_failure(&said), None);
        assert!(ClientError::Status(said).is_transient());
    }

    #[test]
    fn an_http_error_page_read_as_grpc_is_told_apart() {
        let page = tonic::Status::internal(
            "protocol error: received message with invalid compression flag: 52 (valid flags \
             are 0 and 1) while receiving response with status: 404 Not Found",
        );
        assert!(answered_by_plain_http(&page));
        let text = describe_status(&page);
        assert!(
            text.contains("is this the coordinator's HTTP port?"),
            "{text}"
        );
        let unmapped = tonic::Status::unimplemented(
            "grpc-status header missing, mapped from HTTP status code 404",
        );
        assert!(answered_by_plain_http(&unmapped));
        assert!(!answered_by_plain_http(&tonic::Status::not_found(
            "queue 'q' not found"
        )));
    }

    #[test]
    fn a_ca_file_is_read_block_by_block() {
        let not_base64 =
            b"-----BEGIN CERTIFICATE-----\nAAAAnotbase64!!!\n-----END CERTIFICATE-----\n";
        let error = check_ca_pem(not_base64).unwrap_err();
        assert!(error.contains("not valid base64"), "{error}");
        let cut_short = b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n";
        let error = check_ca_pem(cut_short).unwrap_err();
        assert_eq!(
            error,
            "the CERTIFICATE block has no END line (is the file cut short?)"
        );
        // Base64 that is no certificate: the TLS client would skip it in silence.
        let not_a_certificate =
            b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        let error = check_ca_pem(not_a_certificate).unwrap_err();
        assert!(
            error.starts_with("CERTIFICATE block 1 is not a certificate"),
            "{error}"
        );
        assert_eq!(check_ca_pem(b"no PEM here"), Ok(0));
    }
}
