//! Serving: the caller owns the sockets (mini-redis `server::run(listener, shutdown)`).
//! The binary binds real addresses and passes a signal; tests bind port 0.
//!
//! Shutdown order: stop long polls and mark health NOT_SERVING, stop accepting, let
//! in-flight calls finish, then flush the store one last time.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use workq_proto::pb::work_q_server::WorkQServer;

use crate::auth::Auth;
use crate::engine::Engine;
use crate::grpc::Service;

/// Largest gRPC message accepted (a full enqueue batch).
pub const MAX_MESSAGE_BYTES: usize = workq_proto::client::MAX_MESSAGE_BYTES;

pub async fn run(
    grpc: TcpListener,
    http: TcpListener,
    engine: Arc<Engine>,
    auth: Auth,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
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
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        match grpc_auth.check(header) {
            Ok(()) => Ok(request),
            Err(message) => Err(tonic::Status::unauthenticated(message)),
        }
    });

    // One shutdown future fans out to both servers.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let trigger_engine = engine.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight calls");
        trigger_engine.begin_shutdown();
        health_reporter
            .set_not_serving::<WorkQServer<Service>>()
            .await;
        let _ = stop_tx.send(true);
    });
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let incoming = TcpIncoming::from(grpc).with_nodelay(Some(true));
    let grpc_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, wait_stop(stop_rx.clone()));

    let http_app = crate::http::router(engine.clone(), auth);
    let http_server = axum::serve(
        http,
        http_app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(wait_stop(stop_rx));

    let (grpc_result, http_result) = tokio::join!(grpc_server, http_server);
    let flushed = engine.close().await;
    grpc_result?;
    http_result?;
    flushed?;
    tracing::info!("stopped cleanly");
    Ok(())
}
