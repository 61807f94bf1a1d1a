//! Serving: the caller owns the sockets (mini-redis `server::run(listener, shutdown)`).
//! The binary binds real addresses and passes a signal; tests bind port 0.
//!
//! Shutdown order: stop long polls and mark health NOT_SERVING, stop accepting, let
//! in-flight calls finish (for at most the grace period), then flush the store one
//! last time. A failed write-ahead log starts the same shutdown, and `run` returns
//! its error (the binary exits 1, and its supervisor restarts it from disk).
//!
//! The gRPC port also speaks the wire protocol (`crate::wire`): the accept loop peeks
//! at each new connection's first bytes and keeps the wire ones, passing the others
//! on to tonic. With TLS ([`Serving::tls`]) both ports serve TLS only, and the gRPC
//! port passes every connection to tonic (the wire protocol is plain TCP).

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::http::idle::Idle;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use workq_proto::pb::work_q_server::WorkQServer;

use crate::auth::Auth;
use crate::engine::Engine;
use crate::grpc::Service;
use crate::tls::{Conn, Tls};
use crate::wire::Opening;
use tokio_rustls::server::TlsStream;

/// Largest gRPC message accepted (a full enqueue batch).
pub const MAX_MESSAGE_BYTES: usize = workq_proto::client::MAX_MESSAGE_BYTES;
/// How often the gRPC port pings a client it has heard nothing from, and how long it
/// waits for the answer before it closes the connection.
const GRPC_PING_INTERVAL: Duration = Duration::from_secs(30);
const GRPC_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How long calls may take to finish once shutdown began (under Kubernetes' default
/// 30 s termination grace period). Calls still open then, say a client that stopped
/// reading its answers, are cut before the last sync.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

pub async fn run(
    grpc: TcpListener,
    http: TcpListener,
    engine: Arc<Engine>,
    auth: Auth,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(grpc, http, engine, auth, shutdown, Serving::default()).await
}

/// How [`run_with`] serves, besides its listeners.
#[derive(Clone, Debug)]
pub struct Serving {
    /// How long calls may take to finish once shutdown began.
    pub grace: Duration,
    /// TLS on both ports, or none.
    pub tls: Option<Tls>,
    /// How long an HTTP connection may stay silent both ways before it is closed.
    pub http_idle_timeout: Duration,
}

impl Default for Serving {
    fn default() -> Serving {
        Serving {
            grace: SHUTDOWN_GRACE,
            tls: None,
            http_idle_timeout: crate::http::idle::HTTP_IDLE_TIMEOUT,
        }
    }
}

/// [`run`], with another grace period or TLS.
pub async fn run_with(
    grpc: TcpListener,
    http: TcpListener,
    engine: Arc<Engine>,
    auth: Auth,
    shutdown: impl Future<Output = ()> + Send + 'static,
    serving: Serving,
) -> anyhow::Result<()> {
    let Serving {
        grace,
        tls,
        http_idle_timeout,
    } = serving;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<WorkQServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(workq_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let grpc_auth = auth.clone();
    let service = WorkQServer::new(Service::new(engine.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let service = InterceptedService::new(service, move |request: tonic::Request<()>| {
        let headers = request.metadata().get_all("authorization");
        match grpc_auth.check(headers.iter().map(|v| v.as_bytes())) {
            Ok(()) => Ok(request),
            Err(message) => Err(tonic::Status::unauthenticated(message)),
        }
    });
    let service = crate::grpc::Refusals(service);

    // One shutdown future fans out to both servers. A failed log stops the
    // coordinator too: it refuses every write from then on, and a restart (the
    // StatefulSet's, or the operator's) recovers everything acknowledged from disk.
    let (stop_tx, stop_rx) = watch::channel(false);
    let trigger_engine = engine.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => tracing::info!("shutting down: finishing in-flight calls"),
            () = trigger_engine.store().failed() => tracing::error!(
                "the write-ahead log failed: shutting down, so that a restart recovers \
                 every acknowledged change from disk"
            ),
        }
        trigger_engine.begin_shutdown();
        health_reporter
            .set_not_serving::<WorkQServer<Service>>()
            .await;
        let _ = stop_tx.send(true);
    });
    let wait_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    // One port, two protocols: wire connections are served here, the rest by tonic.
    let (grpc_tx, grpc_rx) = mpsc::channel(64);
    let accept = tokio::spawn(accept(
        grpc,
        grpc_tx,
        Port {
            engine: engine.clone(),
            auth: auth.clone(),
            tls: tls.clone(),
        },
        stop_rx.clone(),
    ));
    let incoming = tokio_stream::wrappers::ReceiverStream::new(grpc_rx);
    let grpc_server = tonic::transport::Server::builder()
        // A client that stops answering pings (its node died, the network split, or
        // it never spoke HTTP/2 past the preface) is closed, and its calls with it,
        // rather than kept for ever.
        .http2_keepalive_interval(Some(GRPC_PING_INTERVAL))
        .http2_keepalive_timeout(Some(GRPC_PING_TIMEOUT))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, wait_stop(stop_rx.clone()));

    let http_app = crate::http::router(engine.clone(), auth)
        .into_make_service_with_connect_info::<crate::http::Peer>();
    let http_stop = wait_stop(stop_rx.clone());
    let http_server: Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match &tls {
        Some(tls) => Box::pin(
            axum::serve(Idle::new(tls.listen(http)?, http_idle_timeout), http_app)
                .with_graceful_shutdown(http_stop)
                .into_future(),
        ),
        None => Box::pin(
            axum::serve(Idle::new(http, http_idle_timeout), http_app)
                .with_graceful_shutdown(http_stop)
                .into_future(),
        ),
    };

    let accept_abort = accept.abort_handle();
    let grace_over = async {
        wait_stop(stop_rx.clone()).await;
        tokio::time::sleep(grace).await;
    };
    let (grpc_result, http_result, accept_result) = tokio::select! {
        results = async { tokio::join!(grpc_server, http_server, accept) } => results,
        () = grace_over => {
            tracing::warn!(
                ?grace,
                "calls still open after the shutdown grace period (clients not reading \
                 their answers?): closing them"
            );
            // Dropping the accept task drops its wire calls; tonic's and axum's
            // connections go with the runtime.
            accept_abort.abort();
            (Ok(()), Ok(()), Ok(()))
        }
    };
    // Every call has ended (accept waits for the wire ones) or was cut, before the
    // last flush.
    let flushed = engine.close().await;
    accept_result?;
    grpc_result?;
    http_result?;
    flushed?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// The listener's next connection. A failed accept (out of file descriptors and the
/// like) is logged and retried after a pause, not in a spin.
pub(crate) async fn next_connection(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads the HTTP/2 preface off a TLS connection (which cannot be peeked at); an
/// error unless the connection opens with it. [`Conn::tls_after_preface`] gives it back
/// to the reader.
async fn read_http2_preface(stream: &mut TlsStream<TcpStream>) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut preface = [0u8; crate::wire::HTTP2_PREFACE.len()];
    stream.read_exact(&mut preface).await?;
    if &preface != crate::wire::HTTP2_PREFACE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not an HTTP/2 client",
        ));
    }
    Ok(())
}

/// What the gRPC port serves besides gRPC: the wire protocol, or (instead) TLS.
struct Port {
    engine: Arc<Engine>,
    auth: Auth,
    tls: Option<Tls>,
}

/// Accepts connections on the gRPC port until shutdown; wire connections are served
/// here, everything else goes to tonic through `grpc` (past its TLS handshake, with
/// TLS). Returns once every wire call has ended.
async fn accept(
    listener: TcpListener,
    grpc: mpsc::Sender<std::io::Result<Conn>>,
    port: Port,
    mut stop: watch::Receiver<bool>,
) {
    let mut calls = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            Some(_) = calls.join_next(), if !calls.is_empty() => continue,
            (stream, _) = next_connection(&listener) => stream,
        };
        let _ = stream.set_nodelay(true);
        let (grpc, engine, auth, tls, mut stop) = (
            grpc.clone(),
            port.engine.clone(),
            port.auth.clone(),
            port.tls.clone(),
            stop.clone(),
        );
        calls.spawn(async move {
            // A connection goes to tonic only once it has sent the whole HTTP/2
            // preface, within the hello timeout: hyper would wait for it for ever,
            // and hold up shutdown for the grace period. Shutting down first, the
            // connection is dropped.
            if let Some(tls) = tls {
                // A wire hello fails the handshake.
                let opened = async {
                    let Some(mut stream) = tls.accept(stream).await? else {
                        return Err(std::io::Error::other("plain HTTP on the TLS port"));
                    };
                    let preface = tokio::time::timeout(
                        crate::wire::HELLO_TIMEOUT,
                        read_http2_preface(&mut stream),
                    );
                    preface.await.map_err(std::io::Error::from)??;
                    std::io::Result::Ok(stream)
                };
                let opened = tokio::select! {
                    opened = opened => opened,
                    _ = stop.wait_for(|stop| *stop) => return,
                };
                if let Ok(stream) = opened {
                    let _ = grpc.send(Ok(Conn::tls_after_preface(stream))).await;
                }
                return;
            }
            let sniff =
                tokio::time::timeout(crate::wire::HELLO_TIMEOUT, crate::wire::opening(&stream));
            let sniffed = tokio::select! {
                sniffed = sniff => sniffed,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            match sniffed {
                Ok(Ok(Opening::Wire)) => crate::wire::serve(stream, engine, auth, stop).await,
                Ok(Ok(Opening::Http2 | Opening::Neither)) => {
                    let _ = grpc.send(Ok(Conn::Plain(stream))).await;
                }
                // No whole opening within the timeout, or a broken socket.
                Ok(Err(_)) | Err(_) => {}
            }
        });
    }
    drop(grpc);
    while calls.join_next().await.is_some() {}
}
