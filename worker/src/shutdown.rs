//! Shutdown: turns SIGTERM / SIGINT into the worker's two-step stop.
//!
//! The first signal moves the worker from [`Phase::Running`] to [`Phase::Draining`]:
//! stop leasing and let running items finish. When `--grace` has passed since that
//! signal (or a second signal arrives, or a fatal error asks for it) the phase becomes
//! [`Phase::Stopping`]: every item still running is cancelled and its lease released.
//!
//! The phase lives in one `watch` channel. The signal task is its only writer apart
//! from [`Shutdown::stop_now`], which the lease loop uses for fatal errors; everyone
//! else only reads and waits on it.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Where the worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Leasing and running items.
    Running,
    /// A signal arrived: lease nothing new, let running items finish.
    Draining,
    /// Grace is over: cancel what still runs and release its leases.
    Stopping,
}

/// The exit code for a worker stopped by a signal: 128 + the signal number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalExit(pub u8);

#[derive(Clone, Copy, Debug)]
struct State {
    phase: Phase,
    signal: Option<SignalExit>,
}

/// A handle on the shutdown phase; cheap to clone.
#[derive(Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<State>>,
}

impl Shutdown {
    /// A shutdown that only changes when [`Shutdown::stop_now`] is called (for tests
    /// and for modes that handle signals themselves).
    pub fn manual() -> Shutdown {
        let (tx, _) = watch::channel(State {
            phase: Phase::Running,
            signal: None,
        });
        Shutdown { tx: Arc::new(tx) }
    }

    /// Installs SIGTERM and SIGINT handlers: the first signal starts draining, the
    /// second one (or `grace` later) stops.
    pub fn listen(grace: Duration) -> std::io::Result<Shutdown> {
        let shutdown = Shutdown::manual();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let tx = shutdown.tx.clone();
        tokio::spawn(async move {
            let first = tokio::select! {
                _ = term.recv() => SignalExit(143),
                _ = int.recv() => SignalExit(130),
            };
            let name = if first.0 == 143 { "SIGTERM" } else { "SIGINT" };
            tracing::info!(
                "{name} received: stopping; anything still running after {} is cancelled",
                workq_proto::duration::format(grace)
            );
            tx.send_modify(|s| {
                s.signal = Some(first);
                if s.phase == Phase::Running {
                    s.phase = Phase::Draining;
                }
            });
            let reason = tokio::select! {
                _ = tokio::time::sleep(grace) => "grace period over",
                _ = term.recv() => "second signal",
                _ = int.recv() => "second signal",
            };
            if tx.borrow().phase != Phase::Stopping {
                tracing::info!("{reason}: cancelling what still runs");
            }
            tx.send_modify(|s| s.phase = Phase::Stopping);
        });
        Ok(shutdown)
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.tx.borrow().phase
    }

    /// The signal that started the shutdown, if one did.
    pub fn signal(&self) -> Option<SignalExit> {
        self.tx.borrow().signal
    }

    /// Skips the grace period: cancel everything now (fatal errors).
    pub fn stop_now(&self) {
        self.tx.send_modify(|s| s.phase = Phase::Stopping);
    }

    /// Resolves once the worker should stop leasing.
    pub async fn draining(&self) {
        self.wait(|p| p != Phase::Running).await
    }

    /// Resolves once running items must be cancelled and released.
    pub async fn stopping(&self) {
        self.wait(|p| p == Phase::Stopping).await
    }

    async fn wait(&self, done: impl Fn(Phase) -> bool) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so `wait_for` only fails if it is dropped,
        // which cannot happen while we borrow `self`.
        let _ = rx.wait_for(|s| done(s.phase)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_now_wakes_both_waiters() {
        let shutdown = Shutdown::manual();
        assert_eq!(shutdown.phase(), Phase::Running);
        let waiter = {
            let s = shutdown.clone();
            tokio::spawn(async move {
                s.draining().await;
                s.stopping().await;
            })
        };
        shutdown.stop_now();
        waiter.await.unwrap();
        assert_eq!(shutdown.phase(), Phase::Stopping);
        assert_eq!(shutdown.signal(), None);
    }
}
