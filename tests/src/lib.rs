//! Fixtures for end-to-end tests that start the real binaries.
//!
//! Every process is started on 127.0.0.1 with port 0 in a temp dir, and killed by pid
//! when its fixture is stopped or dropped. The coordinator reports its bound addresses
//! through `--addr-file`, so tests never guess ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

pub use workq_proto::{Client, ConnectOptions, pb};

/// Path of one of the workspace's binaries (`workq-coordinator`, `workq-worker`,
/// `queue-cli`), next to the running test executable in `target/<profile>/`.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test binary has a parent dir")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, \
         which `cargo test --workspace` does)",
        path.display()
    );
    path
}

/// Polls `check` every 20 ms until it is true, panicking with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Async version of [`wait_for`].
pub async fn wait_for_async<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `signal` to `pid`, ignoring "no such process".
pub fn signal(pid: u32, signal: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), signal);
}

/// A `workq-coordinator` process on ephemeral ports, owning its temp dir.
pub struct Coordinator {
    dir: TempDir,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// `RLIMIT_FSIZE` for the next start: a disk that refuses to grow files.
    file_size_limit: Option<u64>,
    /// `http://127.0.0.1:PORT` of the gRPC API.
    pub grpc_url: String,
    /// `http://127.0.0.1:PORT` of the HTTP face.
    pub http_url: String,
}

impl Coordinator {
    /// Starts a coordinator with a data dir in a fresh temp dir.
    pub fn start() -> Coordinator {
        Self::start_with(&[])
    }

    /// Starts one with extra flags (e.g. `["--in-memory"]`, `["--token-file", f]`).
    pub fn start_with(args: &[&str]) -> Coordinator {
        Self::start_limited(None, args)
    }

    /// Starts one whose files cannot grow past `bytes` (`RLIMIT_FSIZE`, with
    /// `SIGXFSZ` ignored): a write past it fails with `EFBIG`, as on a full disk.
    pub fn start_with_file_size_limit(bytes: u64, args: &[&str]) -> Coordinator {
        Self::start_limited(Some(bytes), args)
    }

    fn start_limited(file_size_limit: Option<u64>, args: &[&str]) -> Coordinator {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut coordinator = Coordinator {
            dir,
            child: None,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            file_size_limit,
            grpc_url: String::new(),
            http_url: String::new(),
        };
        coordinator.spawn();
        coordinator
    }

    /// The file size limit of the next [`Coordinator::restart`] (`None`: none).
    pub fn set_file_size_limit(&mut self, bytes: Option<u64>) {
        self.file_size_limit = bytes;
    }

    /// The temp dir this coordinator owns (data dir is `dir()/data`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("coordinator running").id()
    }

    fn spawn(&mut self) {
        self.spawn_at("127.0.0.1:0", "127.0.0.1:0");
    }

    fn spawn_at(&mut self, grpc_addr: &str, http_addr: &str) {
        let addr_file = self.dir.path().join("addr.json");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("coordinator.log"))
            .expect("log file");
        let mut command = Command::new(bin_path("workq-coordinator"));
        command
            .arg("--grpc-addr")
            .arg(grpc_addr)
            .arg("--http-addr")
            .arg(http_addr)
            .arg("--addr-file")
            .arg(&addr_file);
        if !self.extra_args.iter().any(|a| a == "--in-memory") {
            command.arg("--data-dir").arg(self.data_dir());
        }
        command
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(bytes) = self.file_size_limit {
            limit_file_size(&mut command, bytes);
        }
        let child = command.spawn().expect("spawn workq-coordinator");
        let pid = child.id();
        self.child = Some(child);
        wait_for(
            &format!("coordinator pid {pid} to write {}", addr_file.display()),
            Duration::from_secs(30),
            || {
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!("coordinator exited early ({status}); log:\n{}", self.log());
                }
                std::fs::read_to_string(&addr_file)
                    .ok()
                    .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                    .map(|v| {
                        self.grpc_url =
                            format!("http://{}", v["grpc"].as_str().unwrap_or_default());
                        self.http_url =
                            format!("http://{}", v["http"].as_str().unwrap_or_default());
                    })
                    .is_some()
            },
        );
    }

    /// Everything the coordinator logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }

    /// `kill -9`, then wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (20 s at most) for a clean exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        signal(self.child.as_ref()?.id(), Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(20))
    }

    /// Waits up to `timeout` for the coordinator to exit by itself; its exit code
    /// (`None` when a signal ended it). Panics with its log if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take().expect("coordinator running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                signal(child.id(), Signal::SIGKILL);
                let _ = child.wait();
                panic!(
                    "coordinator still running after {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the coordinator again on the same data dir (new ports).
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "stop or kill the coordinator before restarting"
        );
        self.spawn();
    }

    /// Starts the coordinator again on the same data dir and the same ports, for
    /// clients that keep the old address. The ports were the coordinator's a moment
    /// ago; should another process have taken one meanwhile, the start fails.
    pub fn restart_on_same_ports(&mut self) {
        assert!(
            self.child.is_none(),
            "stop or kill the coordinator before restarting"
        );
        let grpc = self.grpc_url.trim_start_matches("http://").to_string();
        let http = self.http_url.trim_start_matches("http://").to_string();
        self.spawn_at(&grpc, &http);
    }

    /// A connected gRPC client.
    pub async fn client(&self) -> Client {
        Client::connect(ConnectOptions::new(self.grpc_url.clone()))
            .await
            .expect("connect to coordinator")
    }

    /// A connected gRPC client sending `token`.
    pub async fn client_with_token(&self, token: &str) -> Client {
        Client::connect(ConnectOptions::new(self.grpc_url.clone()).token(Some(token.into())))
            .await
            .expect("connect to coordinator")
    }
}

/// Makes `command`'s process unable to grow a file past `bytes`: `RLIMIT_FSIZE`, with
/// `SIGXFSZ` ignored so that the write fails with `EFBIG` instead of killing it.
#[allow(unsafe_code)] // `pre_exec` is the only way to set a child's limits before exec
fn limit_file_size(command: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: between fork and exec the closure only makes two async-signal-safe
    // system calls on values it owns.
    unsafe {
        command.pre_exec(move || {
            if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
                || libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A child process killed by pid when dropped (workers, CLI runs in the background).
pub struct Process {
    pub child: Child,
}

impl Process {
    pub fn spawn(command: &mut Command) -> Process {
        Process {
            child: command.spawn().expect("spawn"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: Signal) {
        signal(self.child.id(), sig);
    }

    /// Waits up to `timeout` for the exit code (`None` when killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            if start.elapsed() > timeout {
                self.signal(Signal::SIGKILL);
                let _ = self.child.wait();
                panic!(
                    "process {} did not exit within {timeout:?}",
                    self.child.id()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the exited child left on its piped stdout and stderr (empty when a
    /// stream was not piped). Call after it exited, or a full pipe could block it.
    pub fn take_output(&mut self) -> (String, String) {
        use std::io::Read;
        fn all(pipe: Option<impl Read>) -> String {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                pipe.read_to_string(&mut text)
                    .expect("read the child's output");
            }
            text
        }
        (all(self.child.stdout.take()), all(self.child.stderr.take()))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.is_running() {
            self.signal(Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Leases the next item of `queue` by hand as `worker` (a worker that is not a
/// `workq-worker` process), panicking if none is ready.
pub async fn lease_one(client: &mut Client, queue: &str, worker: &str) -> pb::Lease {
    try_lease_one(client, queue, worker)
        .await
        .unwrap_or_else(|| panic!("no item ready in queue '{queue}'"))
}

/// One item leased to `worker`, or `None` when none is ready.
pub async fn try_lease_one(client: &mut Client, queue: &str, worker: &str) -> Option<pb::Lease> {
    client
        .lease(pb::LeaseRequest {
            queue: queue.into(),
            worker_id: worker.into(),
            max_items: 1,
            ..Default::default()
        })
        .await
        .expect("lease")
        .into_inner()
        .leases
        .pop()
}

/// Enqueues one item with an empty payload; returns its id.
pub async fn enqueue_empty(client: &mut Client, queue: &str) -> u64 {
    client
        .enqueue(pb::EnqueueRequest {
            queue: queue.into(),
            items: vec![pb::NewItem::default()],
            seal: false,
        })
        .await
        .expect("enqueue")
        .into_inner()
        .results[0]
        .id
}

/// Every item of `queue`, by id, read page by page; an id listed twice fails the test.
pub async fn all_items(
    client: &mut Client,
    queue: &str,
) -> std::collections::HashMap<u64, pb::Item> {
    let mut items = std::collections::HashMap::new();
    let mut after_id = 0;
    loop {
        let page = client
            .list_items(pb::ListItemsRequest {
                queue: queue.into(),
                after_id,
                limit: 1_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for item in page.items {
            let id = item.id;
            assert!(items.insert(id, item).is_none(), "item {id} listed twice");
        }
        if page.next_after_id == 0 {
            return items;
        }
        after_id = page.next_after_id;
    }
}

/// Creates `queue` with leases of `lease_ms`.
pub async fn create_queue(client: &mut Client, queue: &str, lease_ms: u64) {
    client
        .create_queue(pb::CreateQueueRequest {
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

/// `queue`'s stats.
pub async fn queue_stats(client: &mut Client, queue: &str) -> pb::QueueStats {
    client
        .get_queue(pb::GetQueueRequest {
            queue: queue.into(),
        })
        .await
        .expect("get queue")
        .into_inner()
        .stats
        .expect("stats")
}
