//! Time for the coordinator: Unix milliseconds, anchored to tokio's clock.
//!
//! Deadlines are persisted as Unix milliseconds so they survive a restart, but the
//! running server measures time through `tokio::time::Instant`. Tests that call
//! `tokio::time::pause()` and `advance()` therefore move the engine's clock exactly,
//! and the pure queue core takes `now` as a plain argument.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base_unix_ms: u64,
    base: Instant,
}

impl Clock {
    /// The wall clock at start-up, advanced by tokio's monotonic clock.
    pub fn system() -> Clock {
        let base_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock {
            base_unix_ms,
            base: Instant::now(),
        }
    }

    /// A clock that reads `unix_ms` now (tests).
    pub fn starting_at(unix_ms: u64) -> Clock {
        Clock {
            base_unix_ms: unix_ms,
            base: Instant::now(),
        }
    }

    /// Now, in Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.base_unix_ms + self.base.elapsed().as_millis() as u64
    }

    /// The tokio instant at which the clock will read `unix_ms`.
    pub fn instant_at(&self, unix_ms: u64) -> Instant {
        let offset = unix_ms.saturating_sub(self.base_unix_ms);
        self.base + Duration::from_millis(offset)
    }
}
