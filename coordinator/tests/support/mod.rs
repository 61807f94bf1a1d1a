//! An in-process coordinator on 127.0.0.1:0 for integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use workq_coordinator::auth::Auth;
use workq_coordinator::clock::Clock;
use workq_coordinator::store::{Durability, Store};
use workq_coordinator::{Engine, server};
use workq_proto::{Client, ConnectOptions, pb};

/// A coordinator on ephemeral ports; `stop()` shuts it down and awaits it.
pub struct Server {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _data: Option<tempfile::TempDir>,
}

impl Server {
    pub async fn start(auth: Auth) -> Server {
        Self::start_on(auth, Store::memory(), None, server::SHUTDOWN_GRACE).await
    }

    /// In memory, with a shutdown grace period of `grace` instead of the default.
    pub async fn start_with_grace(grace: std::time::Duration) -> Server {
        Self::start_on(Auth::disabled(), Store::memory(), None, grace).await
    }

    /// A coordinator on a write-ahead log in a temp dir, acknowledging only what is
    /// on disk (replies wait for group commits, unlike the memory store's).
    pub async fn start_strict(auth: Auth) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_disk(dir.path(), Durability::Strict).unwrap();
        Self::start_on(auth, store, Some(dir), server::SHUTDOWN_GRACE).await
    }

    async fn start_on(
        auth: Auth,
        store: Store,
        data: Option<tempfile::TempDir>,
        grace: std::time::Duration,
    ) -> Server {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", grpc.local_addr().unwrap());
        let engine: Arc<Engine> = Engine::open(store, Clock::system()).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let serving = server::Serving {
            grace,
            ..server::Serving::default()
        };
        let task = tokio::spawn(server::run_with(
            grpc, http, engine, auth, shutdown, serving,
        ));
        Server {
            url,
            stop: Some(stop),
            task: Some(task),
            _data: data,
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

/// A client with queue "q" created (leases of `lease_ms`) holding `payloads` items
/// `item-0`, `item-1`, ….
pub async fn setup(server: &Server, lease_ms: u64, payloads: usize) -> Client {
    let mut c = server.client().await;
    create(&mut c, "q", lease_ms).await;
    if payloads > 0 {
        c.enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: (0..payloads).map(|i| item(&format!("item-{i}"))).collect(),
            seal: false,
        })
        .await
        .unwrap();
    }
    c
}

/// Queue "q"'s stats.
pub async fn stats(c: &mut Client) -> pb::QueueStats {
    c.get_queue(pb::GetQueueRequest { queue: "q".into() })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
}

pub fn item(payload: &str) -> pb::NewItem {
    pb::NewItem {
        payload: payload.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

pub fn settle(id: u64, token: u64, action: pb::SettleAction) -> pb::Settlement {
    pb::Settlement {
        id,
        token,
        action: action as i32,
        ..Default::default()
    }
}

/// Creates `queue` with leases of `lease_ms`.
pub async fn create(c: &mut Client, queue: &str, lease_ms: u64) {
    c.create_queue(pb::CreateQueueRequest {
        queue: queue.into(),
        options: Some(pb::QueueOptions {
            lease_timeout_ms: lease_ms,
            ..Default::default()
        }),
        if_not_exists: false,
    })
    .await
    .unwrap();
}

/// Opens the data dir's store, waiting (up to 10 s) while an engine dropped just before
/// still holds it: its flusher may be finishing a sync, and the store keeps the data
/// dir locked until it is gone.
pub async fn open_store(
    dir: &std::path::Path,
    durability: Durability,
) -> workq_coordinator::Result<Store> {
    let start = std::time::Instant::now();
    loop {
        match Store::open_disk(dir, durability) {
            Err(e) if e.to_string().contains("in use") && start.elapsed().as_secs() < 10 => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            opened => return opened,
        }
    }
}
