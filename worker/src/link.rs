//! The worker's link to the coordinator: connecting, and riding out outages.
//!
//! Pods often start before the coordinator's Service is ready, and a coordinator
//! restart is a normal event. [`Link`] tracks the current outage (shared by the lease
//! loop and every item task): each failed call asks it for a jittered backoff, each
//! successful call ends the outage, and once an outage has lasted longer than
//! `--connect-timeout` it answers [`GaveUp`] and the worker exits 1.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngExt;
use workq_proto::{Client, ClientError, ConnectOptions};

use crate::shutdown::Shutdown;

/// First retry delay; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Retry delay ceiling: keeps a recovering coordinator from waiting long for workers.
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// The coordinator has been unreachable for longer than `--connect-timeout`.
#[derive(Debug)]
pub struct GaveUp {
    pub waited: Duration,
    pub last_error: String,
}

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gave up after {} (--connect-timeout): {}",
            workq_proto::duration::format(self.waited),
            self.last_error
        )
    }
}

impl std::error::Error for GaveUp {}

#[derive(Debug)]
struct Outage {
    since: Instant,
    failures: u32,
}

/// Outage bookkeeping shared by every task that talks to the coordinator.
#[derive(Debug)]
pub struct Link {
    connect_timeout: Duration,
    /// Sync mutex: held only for a few field updates, never across an await.
    outage: Mutex<Option<Outage>>,
}

impl Link {
    pub fn new(connect_timeout: Duration) -> Link {
        Link {
            connect_timeout,
            outage: Mutex::new(None),
        }
    }

    /// A call went through: the outage (if any) is over.
    pub fn ok(&self) {
        self.ok_since(Instant::now());
    }

    /// A call made at `started` went through, so the coordinator was back by then:
    /// a long poll answers only when it ends, which can be long after the outage did.
    pub fn ok_since(&self, started: Instant) {
        if let Some(outage) = self.outage.lock().unwrap().take() {
            tracing::info!(
                "coordinator reachable again after {}",
                workq_proto::duration::format(started.saturating_duration_since(outage.since))
            );
        }
    }

    /// A call failed in a way that waiting may fix. Returns how long to wait before
    /// retrying, or [`GaveUp`] when the outage has outlasted `--connect-timeout`.
    pub fn failed(&self, what: &str) -> Result<Duration, GaveUp> {
        let mut guard = self.outage.lock().unwrap();
        let outage = guard.get_or_insert_with(|| Outage {
            since: Instant::now(),
            failures: 0,
        });
        outage.failures += 1;
        let waited = outage.since.elapsed();
        if waited >= self.connect_timeout {
            return Err(GaveUp {
                waited,
                last_error: what.to_string(),
            });
        }
        // Log the first failure and then every tenth, so a long outage stays readable.
        if outage.failures == 1 || outage.failures.is_multiple_of(10) {
            tracing::warn!(
                "{what}; retrying (waiting up to {} in all)",
                workq_proto::duration::format(self.connect_timeout)
            );
        }
        let delay = backoff(outage.failures);
        Ok(delay.min(self.connect_timeout - waited))
    }
}

/// Jittered exponential backoff for the `failures`-th consecutive failure: a random
/// delay between half and all of `min(cap, base * 2^(failures-1))`, so workers that
/// lost the coordinator together do not come back in lockstep.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let ceiling = BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_CAP);
    let ms = ceiling.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

/// Connects to the coordinator, retrying with backoff until it answers, the outage
/// outlasts `--connect-timeout`, or shutdown begins (`Ok(None)`). A failure that no
/// wait mends ends it at once ([`ClientError::is_transient`]): a bad address, or a
/// TLS mistake (a certificate from a CA we do not trust or for another name, plain
/// text on https://). An expired certificate is waited out: a renewal mends it.
pub async fn connect(
    options: &ConnectOptions,
    link: &Link,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<Client>> {
    loop {
        let attempt = tokio::select! {
            _ = shutdown.draining() => return Ok(None),
            attempt = Client::connect(options.clone()) => attempt,
        };
        match attempt {
            Ok(client) => {
                link.ok();
                return Ok(Some(client));
            }
            Err(e) if e.is_transient() => {
                let delay = link.failed(&format!("waiting for the coordinator: {e}"))?;
                tokio::select! {
                    _ = shutdown.draining() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// True when the coordinator refused a call because our lease is gone: it expired and
/// the item went back to the queue (maybe to another worker), or the item was removed.
pub fn is_lease_lost(error: &ClientError) -> bool {
    error.status().is_some_and(|s| {
        (s.code() == tonic::Code::FailedPrecondition && s.message().starts_with("lease lost"))
            || s.code() == tonic::Code::NotFound
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        for _ in 0..100 {
            let first = backoff(1);
            assert!(
                first >= BACKOFF_BASE / 2 && first <= BACKOFF_BASE,
                "{first:?}"
            );
            let third = backoff(3);
            assert!(
                third >= BACKOFF_BASE * 2 && third <= BACKOFF_BASE * 4,
                "{third:?}"
            );
            let late = backoff(40);
            assert!(late >= BACKOFF_CAP / 2 && late <= BACKOFF_CAP, "{late:?}");
        }
    }

    #[test]
    fn gives_up_once_the_outage_outlasts_the_timeout() {
        let link = Link::new(Duration::ZERO);
        let err = link.failed("connection refused").unwrap_err();
        assert!(err.to_string().contains("--connect-timeout"), "{err}");
        assert!(err.to_string().contains("connection refused"), "{err}");

        let link = Link::new(Duration::from_secs(60));
        assert!(link.failed("refused").unwrap() <= BACKOFF_BASE);
        link.ok();
        assert!(link.outage.lock().unwrap().is_none());

        // A long poll made before the outage began and answered after it ends it too.
        let started = Instant::now();
        assert!(link.failed("refused").is_ok());
        link.ok_since(started);
        assert!(link.outage.lock().unwrap().is_none());
    }

    #[test]
    fn lease_lost_is_recognised_by_code_and_message() {
        let lost = ClientError::Status(tonic::Status::failed_precondition(
            "lease lost: item 3 is leased by another worker",
        ));
        assert!(is_lease_lost(&lost));
        let sealed = ClientError::Status(tonic::Status::failed_precondition("queue is sealed"));
        assert!(!is_lease_lost(&sealed));
    }
}
