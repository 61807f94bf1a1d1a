//! The lease loop: lease items, run the handler on each, settle the lease.
//!
//! One loop task leases at most as many items as it has free slots
//! (`--concurrency`), so the worker never holds an item it is not running. Each leased
//! item gets its own task, which owns that lease until it is settled:
//!
//! - while the handler runs, the task extends the lease every third of the lease
//!   timeout;
//! - the handler's [`Outcome`] becomes ack, fail (retry or permanent) or release;
//! - if the coordinator says the lease is lost (it expired, and the item may already
//!   belong to another worker), the task logs that and drops the item: its token is
//!   stale, so nothing it says about the item can count;
//! - when shutdown reaches [`Phase::Stopping`] the handler is cancelled and the item
//!   released, which does not count an attempt.
//!
//! The loop exits 0 only when a lease call reports the queue drained (and sealed, for
//! `--exit-on sealed`) while this worker holds nothing: the coordinator counts every
//! LEASED item, so a peer's outstanding lease keeps everybody waiting.
//!
//! A lease call in flight when a signal arrives gets [`RELEASE_BUDGET`] more to
//! answer, and what it brings is released at once, unrun: the coordinator may have
//! granted those items already, and a dropped call would leave them leased until
//! their lease ran out, then count the attempt. A long poll that has granted nothing
//! is dropped after that; the coordinator then grants it nothing.
//!
//! Once grace is over ([`Phase::Stopping`]), an ack or fail still riding out an
//! outage gets at most [`RELEASE_BUDGET`] more, as a release does: the pod is about
//! to be killed.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use workq_proto::duration::format as human;
use workq_proto::{Client, ClientError, ConnectOptions, pb};

use crate::handler::{Handler, Item, Outcome};
use crate::link::{self, Link, is_lease_lost};
use crate::shutdown::{Phase, Shutdown, SignalExit};

/// How long one lease call long-polls (the coordinator allows up to 60 s).
const LEASE_WAIT: Duration = Duration::from_secs(20);
/// How much longer than its wait a lease call may take before it counts as hung.
const LEASE_SLACK: Duration = Duration::from_secs(15);
/// Time limit for ack, fail, extend, release and get-queue calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long releasing an item may take once grace is over: the pod is about to be
/// killed, so do not wait out a whole outage.
const RELEASE_BUDGET: Duration = Duration::from_secs(3);
/// How long a slot stays idle after its item was given back unrun (the worker could
/// not start its handler), so a worker short of processes or memory does not spin.
const RELEASE_PAUSE: Duration = Duration::from_secs(1);
/// Pause between lease calls while the queue is drained but we are not exiting
/// (`--exit-on sealed|never`): the coordinator answers drained queues at once.
const DRAINED_PAUSE: Duration = Duration::from_secs(1);
/// Lease timeout assumed when neither `--lease-timeout` nor the queue says one.
const DEFAULT_LEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// When the worker's job is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExitOn {
    /// Exit 0 once no READY, DELAYED or LEASED items remain.
    Drained,
    /// Exit 0 once drained and the producer has sealed the queue.
    Sealed,
    /// Never exit on our own; only a signal stops the worker.
    Never,
}

impl ExitOn {
    /// The flag value (`drained`, `sealed`, `never`).
    pub fn name(self) -> &'static str {
        match self {
            ExitOn::Drained => "drained",
            ExitOn::Sealed => "sealed",
            ExitOn::Never => "never",
        }
    }
}

/// What the lease loop needs to know.
#[derive(Clone, Debug)]
pub struct Config {
    pub queue: String,
    pub worker_id: String,
    pub concurrency: u32,
    pub exit_on: ExitOn,
    /// Overrides the queue's lease timeout for our leases.
    pub lease_timeout: Option<Duration>,
}

/// How the loop ended (fatal errors come back as `Err`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The queue is drained (and sealed, if asked): exit 0.
    Drained,
    /// A signal stopped the worker; every item was settled or released.
    Signalled(SignalExit),
}

/// Everything an item task needs; shared read-only.
struct Shared {
    client: Client,
    config: Config,
    handler: Handler,
    link: Link,
    shutdown: Shutdown,
    extend_every: Duration,
}

/// Connects, then leases and runs items until the queue is drained, a signal
/// arrives, or something fatal happens.
pub async fn run(
    options: ConnectOptions,
    config: Config,
    handler: Handler,
    link: Link,
    shutdown: Shutdown,
) -> anyhow::Result<End> {
    let Some(client) = link::connect(&options, &link, &shutdown).await? else {
        return Ok(signalled(&shutdown));
    };
    let Some(lease_timeout) = lease_timeout(&client, &config, &link, &shutdown).await? else {
        return Ok(signalled(&shutdown));
    };
    info!(
        "leasing from queue '{}' at {} as '{}' (concurrency {}, exit on {}, lease timeout {})",
        config.queue,
        options.url,
        config.worker_id,
        config.concurrency,
        config.exit_on.name(),
        human(lease_timeout)
    );
    let slots = Arc::new(Semaphore::new(config.concurrency as usize));
    let shared = Arc::new(Shared {
        client,
        config,
        handler,
        link,
        shutdown,
        extend_every: (lease_timeout / 3).max(Duration::from_millis(50)),
    });
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let mut fatal: Option<anyhow::Error> = None;
    // Say once (not every poll) that we are idling on a drained queue.
    let mut idle_announced = false;

    let drained = loop {
        while let Some(done) = tasks.try_join_next() {
            note_task(done, &mut fatal, &shared.shutdown);
        }
        if fatal.is_some() || shared.shutdown.phase() != Phase::Running {
            if fatal.is_none() && !tasks.is_empty() {
                info!(
                    "not leasing any more; waiting for {} running item(s), releasing them if \
                     grace runs out",
                    tasks.len()
                );
            }
            break false;
        }
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                _ = shared.shutdown.draining() => {}
                Some(done) = tasks.join_next() => note_task(done, &mut fatal, &shared.shutdown),
            }
            continue;
        }
        let started = Instant::now();
        let call = lease(&shared, free as u32);
        tokio::pin!(call);
        let response = tokio::select! {
            biased;
            _ = shared.shutdown.draining() => {
                if let Ok(Ok(granted)) = tokio::time::timeout(RELEASE_BUDGET, &mut call).await {
                    give_back(&shared, &granted.leases).await;
                }
                continue;
            }
            response = &mut call => response,
        };
        let response = match response {
            Ok(response) => {
                shared.link.ok_since(started);
                response
            }
            Err(e) => {
                let what = if e
                    .status()
                    .is_some_and(|s| s.code() == tonic::Code::NotFound)
                {
                    format!("queue '{}' does not exist (yet): {e}", shared.config.queue)
                } else if e.is_transient() {
                    format!("lease call failed: {e}")
                } else {
                    fatal = Some(anyhow::anyhow!("lease call failed: {e}"));
                    break false;
                };
                match shared.link.failed(&what) {
                    Ok(delay) => pause(&shared.shutdown, delay).await,
                    Err(gave_up) => {
                        fatal = Some(gave_up.into());
                        break false;
                    }
                }
                continue;
            }
        };
        let leased = response.leases.len();
        for lease in response.leases {
            let permit = slots
                .clone()
                .try_acquire_owned()
                .expect("the coordinator grants at most max_items leases");
            tasks.spawn(run_item(shared.clone(), lease, permit));
        }
        if leased == 0 && response.drained {
            let done = match shared.config.exit_on {
                ExitOn::Drained => true,
                ExitOn::Sealed => response.sealed,
                ExitOn::Never => false,
            };
            if done && tasks.is_empty() {
                break true;
            }
            if done {
                // Our own tasks have settled their items (else the queue would not
                // be drained) but are still finishing up; collect them and ask again.
                if let Some(finished) = tasks.join_next().await {
                    note_task(finished, &mut fatal, &shared.shutdown);
                }
            } else {
                if !idle_announced {
                    info!(
                        "queue '{}' is drained{}; waiting for more items (--exit-on {})",
                        shared.config.queue,
                        if response.sealed {
                            " and sealed"
                        } else {
                            " but not sealed"
                        },
                        shared.config.exit_on.name()
                    );
                    idle_announced = true;
                }
                pause(&shared.shutdown, DRAINED_PAUSE).await;
            }
        } else if leased > 0 {
            idle_announced = false;
        }
    };

    if fatal.is_some() {
        shared.shutdown.stop_now();
    }
    while let Some(done) = tasks.join_next().await {
        note_task(done, &mut fatal, &shared.shutdown);
    }
    if let Some(e) = fatal {
        return Err(e);
    }
    if drained {
        info!(
            "queue '{}' is drained{}: exiting 0",
            shared.config.queue,
            if shared.config.exit_on == ExitOn::Sealed {
                " and sealed"
            } else {
                ""
            }
        );
        return Ok(End::Drained);
    }
    info!("every item settled or released: exiting");
    Ok(signalled(&shared.shutdown))
}

/// Releases items a lease call brought after shutdown began, without running them.
async fn give_back(shared: &Shared, leases: &[pb::Lease]) {
    let releases = leases.iter().map(|lease| async move {
        let settle = Settle { shared, lease };
        if settle.release(Some(RELEASE_BUDGET)).await {
            info!(item = lease.id, "released unrun (leased as shutdown began)");
        }
    });
    futures_util::future::join_all(releases).await;
}

fn signalled(shutdown: &Shutdown) -> End {
    End::Signalled(shutdown.signal().unwrap_or(SignalExit(143)))
}

fn note_task(
    done: Result<anyhow::Result<()>, tokio::task::JoinError>,
    fatal: &mut Option<anyhow::Error>,
    shutdown: &Shutdown,
) {
    let error = match done {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(e) => anyhow::anyhow!("item task failed: {e}"),
    };
    shutdown.stop_now();
    if fatal.is_none() {
        *fatal = Some(error);
    } else {
        error!("{error:#}");
    }
}

/// Sleeps `delay`, or less if shutdown begins.
async fn pause(shutdown: &Shutdown, delay: Duration) {
    tokio::select! {
        _ = shutdown.draining() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// The lease timeout our leases will have: `--lease-timeout`, else the queue's.
/// Also the first check that the queue exists; a missing queue is waited for like an
/// unreachable coordinator (producers often create it after the workers start).
async fn lease_timeout(
    client: &Client,
    config: &Config,
    link: &Link,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<Duration>> {
    loop {
        let mut client = client.clone();
        let request = pb::GetQueueRequest {
            queue: config.queue.clone(),
        };
        let answer = tokio::select! {
            _ = shutdown.draining() => return Ok(None),
            answer = tokio::time::timeout(CALL_TIMEOUT, client.get_queue(request)) => answer,
        };
        let error = match answer {
            Ok(Ok(info)) => {
                link.ok();
                let queue_default = info
                    .into_inner()
                    .options
                    .map(|o| Duration::from_millis(o.lease_timeout_ms))
                    .filter(|d| !d.is_zero());
                return Ok(Some(
                    config
                        .lease_timeout
                        .or(queue_default)
                        .unwrap_or(DEFAULT_LEASE_TIMEOUT),
                ));
            }
            Ok(Err(status)) => ClientError::from(status),
            Err(_) => ClientError::Unreachable {
                url: client.url().to_string(),
                reason: "no answer within 10s".into(),
            },
        };
        let what = if error
            .status()
            .is_some_and(|s| s.code() == tonic::Code::NotFound)
        {
            format!("queue '{}' does not exist (yet)", config.queue)
        } else if error.is_transient() {
            format!("waiting for the coordinator: {error}")
        } else {
            anyhow::bail!("cannot read queue '{}': {error}", config.queue);
        };
        let delay = link.failed(&what)?;
        pause(shutdown, delay).await;
        if shutdown.phase() != Phase::Running {
            return Ok(None);
        }
    }
}

async fn lease(shared: &Shared, max_items: u32) -> Result<pb::LeaseResponse, ClientError> {
    let mut client = shared.client.clone();
    let request = pb::LeaseRequest {
        queue: shared.config.queue.clone(),
        worker_id: shared.config.worker_id.clone(),
        max_items,
        lease_timeout_ms: shared.config.lease_timeout.map_or(0, millis),
        wait_ms: millis(LEASE_WAIT),
    };
    match tokio::time::timeout(LEASE_WAIT + LEASE_SLACK, client.lease(request)).await {
        Ok(answer) => Ok(answer?.into_inner()),
        Err(_) => Err(ClientError::Unreachable {
            url: client.url().to_string(),
            reason: format!(
                "lease call got no answer within {}",
                human(LEASE_WAIT + LEASE_SLACK)
            ),
        }),
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// Runs one leased item to its end: handler, then ack / fail / release.
async fn run_item(
    shared: Arc<Shared>,
    lease: pb::Lease,
    _slot: OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let item = Item {
        queue: shared.config.queue.clone(),
        id: lease.id,
        attempt: lease.attempt,
        payload: lease.payload.clone(),
        worker_id: shared.config.worker_id.clone(),
    };
    let (id, attempt) = (item.id, item.attempt);
    debug!(item = id, attempt, "leased");
    let started = Instant::now();
    let outcome = tokio::select! {
        // Prefer a finished handler: its result should be reported even if the lease
        // turned out lost or grace ran out in the same instant.
        biased;
        outcome = shared.handler.run(&item) => Some(outcome),
        lost = keep_extended(&shared, &lease) => {
            warn!(
                item = id,
                attempt,
                "cannot keep the lease: {lost}; abandoning the item (another worker may \
                 be running it now)"
            );
            return Ok(());
        }
        _ = shared.shutdown.stopping() => None,
    };
    let took = human(started.elapsed());
    let settle = Settle {
        shared: &shared,
        lease: &lease,
    };
    match outcome {
        None => {
            if settle.release(Some(RELEASE_BUDGET)).await {
                info!(item = id, attempt, "released unfinished (shutting down)");
            }
        }
        Some(Outcome::Done(result)) => {
            let request = pb::AckRequest {
                queue: shared.config.queue.clone(),
                id,
                token: lease.token,
                result,
            };
            let acked = settle
                .call("ack", None, |mut c| {
                    let request = request.clone();
                    async move { c.ack(request).await }
                })
                .await;
            if acked.is_some() {
                info!(item = id, attempt, "acked after {took}");
            }
        }
        Some(Outcome::Retry(error)) => {
            warn!(
                item = id,
                attempt, "failed after {took}, will be retried: {error}"
            );
            settle.fail(error, false).await;
        }
        Some(Outcome::Permanent(error)) => {
            warn!(
                item = id,
                attempt, "failed permanently after {took}: {error}"
            );
            settle.fail(error, true).await;
        }
        Some(Outcome::Release(reason)) => {
            warn!(item = id, attempt, "giving the item back: {reason}");
            settle.release(None).await;
            // The worker could not run it (out of processes, memory, descriptors):
            // its slot stays taken a moment, so it does not lease again at once.
            pause(&shared.shutdown, RELEASE_PAUSE).await;
        }
        Some(Outcome::Fatal(reason)) => {
            settle.release(Some(RELEASE_BUDGET)).await;
            anyhow::bail!("{reason}");
        }
    }
    Ok(())
}

/// Extends the lease every third of its timeout while the handler runs. Returns only
/// when the lease is lost: the coordinator says so, or it has been unreachable for
/// longer than `--connect-timeout`.
async fn keep_extended(shared: &Shared, lease: &pb::Lease) -> String {
    let mut every = shared.extend_every;
    loop {
        tokio::time::sleep(every).await;
        let mut client = shared.client.clone();
        let request = pb::ExtendRequest {
            queue: shared.config.queue.clone(),
            id: lease.id,
            token: lease.token,
            lease_timeout_ms: 0,
        };
        let error = match tokio::time::timeout(CALL_TIMEOUT, client.extend(request)).await {
            Ok(Ok(_)) => {
                shared.link.ok();
                every = shared.extend_every;
                continue;
            }
            Ok(Err(status)) => ClientError::from(status),
            Err(_) => ClientError::Unreachable {
                url: client.url().to_string(),
                reason: "extend got no answer".into(),
            },
        };
        if is_lease_lost(&error) {
            return error.to_string();
        }
        if !error.is_transient() {
            warn!(item = lease.id, "could not extend the lease: {error}");
            continue;
        }
        // Try again sooner: the lease is running out while we cannot reach anyone.
        let retry = (shared.extend_every / 3).max(Duration::from_millis(50));
        match shared.link.failed(&format!(
            "could not extend the lease on item {}: {error}",
            lease.id
        )) {
            Ok(delay) => every = delay.min(retry),
            Err(gave_up) => return gave_up.to_string(),
        }
    }
}

/// Reports an item's end to the coordinator, riding out short outages.
struct Settle<'a> {
    shared: &'a Shared,
    lease: &'a pb::Lease,
}

impl Settle<'_> {
    async fn fail(&self, error: String, permanent: bool) {
        let request = pb::FailRequest {
            queue: self.shared.config.queue.clone(),
            id: self.lease.id,
            token: self.lease.token,
            error,
            permanent,
            retry_delay_ms: 0,
        };
        self.call("fail", None, |mut c| {
            let request = request.clone();
            async move { c.fail(request).await }
        })
        .await;
    }

    /// Gives the item back without counting the attempt; true when that worked.
    async fn release(&self, budget: Option<Duration>) -> bool {
        let request = pb::ReleaseRequest {
            queue: self.shared.config.queue.clone(),
            id: self.lease.id,
            token: self.lease.token,
        };
        self.call("release", budget, |mut c| {
            let request = request.clone();
            async move { c.release(request).await }
        })
        .await
        .is_some()
    }

    /// Makes `call`, retrying transient failures with backoff until it works, the
    /// lease turns out lost, the outage outlasts `--connect-timeout`, or `budget`
    /// runs out; once grace is over, [`RELEASE_BUDGET`] from then at most. Every
    /// failure is logged here; callers only log success.
    async fn call<T, F, Fut>(&self, verb: &str, budget: Option<Duration>, mut call: F) -> Option<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let (id, attempt) = (self.lease.id, self.lease.attempt);
        let mut deadline = budget.map(|b| Instant::now() + b);
        loop {
            if self.shared.shutdown.phase() == Phase::Stopping {
                let last = Instant::now() + RELEASE_BUDGET;
                deadline = Some(deadline.map_or(last, |d| d.min(last)));
            }
            let client = self.shared.client.clone();
            let limit = deadline.map_or(CALL_TIMEOUT, |d| {
                d.saturating_duration_since(Instant::now())
                    .min(CALL_TIMEOUT)
            });
            let error = match tokio::time::timeout(limit, call(client)).await {
                Ok(Ok(answer)) => {
                    self.shared.link.ok();
                    return Some(answer.into_inner());
                }
                Ok(Err(status)) => ClientError::from(status),
                Err(_) => ClientError::Unreachable {
                    url: self.shared.client.url().to_string(),
                    reason: format!("{verb} got no answer"),
                },
            };
            if is_lease_lost(&error) {
                warn!(
                    item = id,
                    attempt, "{verb} refused: {error}; the item is someone else's now, carrying on"
                );
                return None;
            }
            if !error.is_transient() {
                error!(item = id, attempt, "{verb} failed: {error}");
                return None;
            }
            let delay = match self
                .shared
                .link
                .failed(&format!("{verb} item {id}: {error}"))
            {
                Ok(delay) => delay,
                Err(gave_up) => {
                    error!(item = id, attempt, "{verb}: {gave_up}");
                    return None;
                }
            };
            if deadline.is_some_and(|d| Instant::now() + delay > d) {
                error!(item = id, attempt, "{verb} failed, out of time: {error}");
                return None;
            }
            // Grace running out cuts the wait short, to try once more in the time left.
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shared.shutdown.stopping(), if deadline.is_none() => {}
            }
        }
    }
}
