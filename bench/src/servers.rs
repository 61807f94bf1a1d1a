//! The servers a comparison runs: beanstalkd, redis-server, nats-server and
//! workq-coordinator, each on 127.0.0.1 on a free port, in its own temp dir,
//! logging to a file there.
//! A [`Server`] kills its process by pid when stopped or dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Pids of the servers running now, so a signal can take them down with us.
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn register(child: &Child) {
    RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child.id());
}

fn unregister(pid: u32) {
    RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}

/// SIGKILLs every server still running (on SIGINT or SIGTERM, when destructors do
/// not run).
pub fn kill_all() {
    for pid in RUNNING.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// A running server process.
pub struct Server {
    pub label: String,
    child: Option<Child>,
    dir: TempDir,
    /// Where it listens (the gRPC address for workq).
    pub addr: SocketAddr,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `http://ADDR`, for queue-cli.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc status")
    }

    /// SIGTERM, then SIGKILL if it has not exited within 20 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unregister(child.id());
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = kill(pid, Signal::SIGKILL);
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unregister(child.id());
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// Installs beanstalkd, redis-server and nats-server from Debian's packages when
/// any is missing (`apt-get update` once first).
pub fn ensure_installed() -> Result<()> {
    let missing: Vec<&str> = [
        ("beanstalkd", "beanstalkd"),
        ("redis-server", "redis-server"),
        ("nats-server", "nats-server"),
    ]
    .into_iter()
    .filter(|(binary, _)| which(binary).is_none())
    .map(|(_, package)| package)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {} with apt-get", missing.join(" "));
    // apt's progress goes to stderr with ours: stdout is the report (`-o json`).
    let to_stderr =
        || -> Result<Stdio> { Ok(std::io::stderr().as_fd().try_clone_to_owned()?.into()) };
    let status = Command::new("apt-get")
        .args(["update", "-qq"])
        .stdout(to_stderr()?)
        .status()?;
    if !status.success() {
        bail!("apt-get update failed ({status})");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(to_stderr()?)
        .status()?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", missing.join(" "));
    }
    Ok(())
}

fn which(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(binary))
            .find(|p| p.is_file())
    })
}

/// A port nothing listens on right now. The server binds it a moment later; another
/// process taking it in between makes the start fail loudly, not silently.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(label: &str, mut command: Command, dir: TempDir, addr: SocketAddr) -> Result<Server> {
    let log = std::fs::File::create(dir.path().join("server.log"))?;
    command
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = command
        .spawn()
        .with_context(|| format!("start {label} ({command:?})"))?;
    register(&child);
    let mut server = Server {
        label: label.to_string(),
        child: Some(child),
        dir,
        addr,
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if TcpStream::connect(addr).is_ok() {
            return Ok(server);
        }
        if let Some(status) = server
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            let log = std::fs::read_to_string(server.dir().join("server.log")).unwrap_or_default();
            bail!("{label} exited at start ({status}):\n{log}");
        }
        if Instant::now() > deadline {
            bail!("{label} did not listen on {addr} within {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// beanstalkd in memory (`fsync_ms` None) or with a binlog fsynced at most every
/// `fsync_ms` (0: after every write).
pub fn beanstalkd(fsync_ms: Option<u32>) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mut command = Command::new("beanstalkd");
    command.args(["-l", "127.0.0.1", "-p", &port.to_string()]);
    let label = match fsync_ms {
        None => "beanstalkd".to_string(),
        Some(ms) => {
            let binlog = dir.path().join("binlog");
            std::fs::create_dir(&binlog)?;
            command.arg("-b").arg(&binlog).args(["-f", &ms.to_string()]);
            format!("beanstalkd -f{ms}")
        }
    };
    spawn(&label, command, dir, ([127, 0, 0, 1], port).into())
}

/// redis-server without persistence, or with an append-only file fsynced on every
/// write (`appendfsync always`).
pub fn redis(aof_always: bool) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--protected-mode", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir.path());
    let label = if aof_always {
        command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        "redis aof-always"
    } else {
        command.args(["--appendonly", "no"]);
        "redis"
    };
    spawn(label, command, dir, ([127, 0, 0, 1], port).into())
}

/// Label of the NATS JetStream row with file storage.
pub const NATS_FILE: &str = "nats jetstream file";

/// What NATS JetStream's file storage guarantees, printed under the table.
/// (Seen with strace on 2.9.10: no fsync per publish or ack, fsyncs of the block
/// files 120 s after the stream was created; 2.9.10 rejects `sync_interval`, which
/// came later with nats-server PR 4483, 2023.)
pub const NATS_FILE_NOTE: &str = "nats jetstream file: nats-server 2.9 answers publishes and \
     acks once they are in the page cache and fsyncs its file store only every 2 minutes (it \
     has no sync_interval option): not fsync-per-write durable";

/// nats-server with JetStream, its store dir in its temp dir. The storage (memory
/// or file) is per stream, so `file_storage` only names the row; the peer's streams
/// must be created with the same storage.
pub fn nats(file_storage: bool) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mut command = Command::new("nats-server");
    command
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
        .arg("-sd")
        .arg(dir.path().join("jetstream"));
    let label = if file_storage {
        NATS_FILE
    } else {
        "nats jetstream"
    };
    spawn(label, command, dir, ([127, 0, 0, 1], port).into())
}

/// workq-coordinator in memory or with `--durability strict` on a data dir in its
/// temp dir. It binds port 0 itself and reports the address through --addr-file.
pub fn workq(bin_dir: &Path, strict: bool) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let label = if strict {
        "workq strict"
    } else {
        "workq in-memory"
    };
    let mut server = Server {
        label: label.to_string(),
        child: None,
        dir,
        addr: ([127, 0, 0, 1], 0).into(),
    };
    server.start_workq(bin_dir)?;
    Ok(server)
}

impl Server {
    /// Stops workq (SIGTERM) and starts it again on the same data dir; returns how
    /// long the new process took to listen.
    pub fn restart_workq(&mut self, bin_dir: &Path) -> Result<Duration> {
        self.stop();
        let started = Instant::now();
        self.start_workq(bin_dir)?;
        Ok(started.elapsed())
    }

    fn start_workq(&mut self, bin_dir: &Path) -> Result<()> {
        let addr_file = self.dir().join("addr.json");
        let _ = std::fs::remove_file(&addr_file);
        let mut command = Command::new(bin_dir.join("workq-coordinator"));
        command
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .arg("--addr-file")
            .arg(&addr_file);
        if self.label.contains("strict") {
            command
                .arg("--data-dir")
                .arg(self.dir().join("data"))
                .args(["--durability", "strict"]);
        } else {
            command.arg("--in-memory");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("server.log"))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command.spawn().with_context(|| {
            format!(
                "start {} (build it: cargo build --release -p workq-coordinator -p workq-cli)",
                bin_dir.join("workq-coordinator").display()
            )
        })?;
        register(&child);
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let addr = std::fs::read_to_string(&addr_file)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|v| v["grpc"].as_str().and_then(|a| a.parse().ok()));
            if let Some(addr) = addr {
                self.addr = addr;
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log =
                    std::fs::read_to_string(self.dir().join("server.log")).unwrap_or_default();
                bail!("{} exited at start ({status}):\n{log}", self.label);
            }
            if Instant::now() > deadline {
                bail!("{} wrote no address within {START_TIMEOUT:?}", self.label);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
