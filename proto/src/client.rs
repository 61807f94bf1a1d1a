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
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

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
    /// `http://host:port`.
    pub url: String,
    /// Bearer token sent with every call, when the coordinator wants one.
    pub token: Option<String>,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
}

impl ConnectOptions {
    pub fn new(url: impl Into<String>) -> Self {
        ConnectOptions {
            url: url.into(),
            token: None,
            connect_timeout: Duration::from_secs(5),
        }
    }

    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }
}

/// Why a client could not talk to the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server address '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("cannot reach coordinator at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{}", describe_status(.0))]
    Status(#[from] tonic::Status),
}

impl ClientError {
    /// True when retrying later may help (coordinator down or shutting down).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Status(s) => is_transient_status(s),
            _ => false,
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

/// True for statuses that mean "the coordinator is (momentarily) not there".
pub fn is_transient_status(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && !status.message().contains("queue")
}

/// One line for humans: the coordinator's message, which already says what was wrong.
pub fn describe_status(status: &tonic::Status) -> String {
    let message = status.message();
    match status.code() {
        tonic::Code::Unauthenticated if message.is_empty() => {
            "unauthenticated: the coordinator wants a token (--token or WORKQ_TOKEN)".into()
        }
        _ if message.is_empty() => format!("coordinator answered {:?}", status.code()),
        _ => message.to_string(),
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

type Inner = WorkQClient<InterceptedService<Channel, Auth>>;

/// A connected client. Cheap to clone; clones share one HTTP/2 connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Inner,
    url: String,
    token: Option<String>,
    connect_timeout: Duration,
}

impl Client {
    /// Connects once; fails fast with [`ClientError::Unreachable`] when nothing listens.
    pub async fn connect(options: ConnectOptions) -> Result<Client, ClientError> {
        let endpoint = Self::endpoint(&options)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: options.url.clone(),
                reason: error_chain(&e),
            })?;
        Self::with_channel(channel, &options)
    }

    /// A client that connects on first use and reconnects by itself afterwards.
    pub fn connect_lazy(options: ConnectOptions) -> Result<Client, ClientError> {
        let channel = Self::endpoint(&options)?.connect_lazy();
        Self::with_channel(channel, &options)
    }

    fn endpoint(options: &ConnectOptions) -> Result<Endpoint, ClientError> {
        let invalid = |reason: String| ClientError::InvalidUrl {
            url: options.url.clone(),
            reason,
        };
        if options.url.starts_with("https://") {
            return Err(invalid(
                "TLS is not supported yet: use http:// (and a private network or a TLS-terminating proxy)"
                    .into(),
            ));
        }
        if !options.url.starts_with("http://") {
            return Err(invalid("it must start with http://".into()));
        }
        let endpoint = Endpoint::from_shared(options.url.clone())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(endpoint)
    }

    fn with_channel(channel: Channel, options: &ConnectOptions) -> Result<Client, ClientError> {
        let header = match &options.token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ClientError::InvalidToken("it must be printable ASCII".into()))?,
            ),
            None => None,
        };
        let inner = WorkQClient::with_interceptor(channel, Auth { header })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Client {
            inner,
            url: options.url.clone(),
            token: options.token.clone(),
            connect_timeout: options.connect_timeout,
        })
    }

    /// The address this client talks to.
    pub fn url(&self) -> &str {
        &self.url
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
        let addr = crate::wire::host_port(&self.url).ok_or_else(|| ClientError::InvalidUrl {
            url: self.url.clone(),
            reason: "the wire protocol needs an http://host:port address".into(),
        })?;
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
