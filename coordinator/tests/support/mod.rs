//! An in-process coordinator on 127.0.0.1:0 for integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use workq_coordinator::auth::Auth;
use workq_coordinator::clock::Clock;
use workq_coordinator::store::Store;
use workq_coordinator::{Engine, server};
use workq_proto::{Client, ConnectOptions};

/// A coordinator on ephemeral ports; `stop()` shuts it down and awaits it.
pub struct Server {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub async fn start(auth: Auth) -> Server {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", grpc.local_addr().unwrap());
        let engine: Arc<Engine> = Engine::open(Store::memory(), Clock::system()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(grpc, http, engine, auth, async {
            let _ = stopped.await;
        }));
        Server {
            url,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn client(&self) -> Client {
        self.client_with(None).await
    }

    pub async fn client_with(&self, token: Option<&str>) -> Client {
        Client::connect(ConnectOptions::new(self.url.clone()).token(token.map(String::from)))
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}
