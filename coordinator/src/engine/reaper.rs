//! The reaper: runs queue timers (lease expiry, delayed items coming due, retention)
//! on the server's own clock, whether or not anyone polls.
//!
//! It is deadline-driven, not a fixed tick (mini-redis `purge_expired_tasks`): after
//! each pass it publishes the earliest deadline in `Engine::next_wake` and sleeps until
//! then. A mutation that creates an earlier deadline wakes it through
//! `Engine::reaper_wake` (a `Notify` keeps the permit if the reaper is busy, so no
//! wake-up is lost between the pass and the sleep).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Before, Engine};

pub(super) fn spawn(engine: Arc<Engine>) {
    // Hold the engine only during a pass, so dropping the engine ends the task.
    let weak = Arc::downgrade(&engine);
    let wake = engine.reaper_wake.clone();
    let clock = engine.clock;
    let mut shutdown = engine.shutdown.subscribe();
    drop(engine);
    tokio::spawn(async move {
        loop {
            let next = {
                let Some(engine) = weak.upgrade() else { break };
                if *shutdown.borrow_and_update() {
                    break;
                }
                // While scanning, any new deadline must wake us: publish "none yet"
                // first, so a mutation that lands behind the scan sees MAX and notifies.
                engine.next_wake.store(u64::MAX, Ordering::SeqCst);
                let next = pass(&engine);
                engine.next_wake.store(next, Ordering::SeqCst);
                next
            };
            super::sleep_until_due(clock, next, &wake, &mut shutdown).await;
        }
    });
}

/// Runs every queue's due timers; returns the earliest remaining deadline.
fn pass(engine: &Engine) -> u64 {
    let mut next = u64::MAX;
    let mut wrote = false;
    for slot in engine.slots() {
        let mut queue = slot.lock();
        if queue.deleted {
            continue;
        }
        let now = engine.clock.now_ms();
        let before = Before::of(&queue);
        if queue.next_deadline().is_some_and(|d| d <= now) && queue.tick(now) {
            match engine.persist(&mut queue, true, None) {
                Ok(_) => wrote = true,
                Err(e) => {
                    tracing::error!(queue = %queue.name, error = %e, "persisting expiry failed")
                }
            }
            slot.announce(&queue, before);
        }
        if let Some(deadline) = queue.next_deadline() {
            next = next.min(deadline);
        }
    }
    if wrote {
        engine.store.request_flush();
    }
    next
}
