//! Riding out a coordinator restart, for the commands that wait (`lease --wait`,
//! `watch`): which failures another try may mend, and how long to pause before it.

use std::time::Duration;

use workq_proto::Client;
use workq_proto::client::{Answered, is_transport_status, tls_failure, was_never_sent};

/// The failures of one wait, in a row.
pub struct Outage {
    answered: Answered,
    failures: u32,
    unexplained: u32,
}

impl Outage {
    pub fn new(client: &Client) -> Outage {
        Outage {
            answered: client.answered(),
            failures: 0,
            unexplained: 0,
        }
    }

    /// The coordinator answered: it is up, and a later outage starts afresh.
    pub fn answered(&mut self) {
        self.unexplained = 0;
    }

    /// The failures counted so far (0: none since the last [`Outage::over`]).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The outage ended: the next failure is the first of a new one.
    pub fn over(&mut self) {
        (self.failures, self.unexplained) = (0, 0);
    }

    /// Whether another try may mend `status`: a connection that broke or was refused,
    /// or the coordinator's own UNAVAILABLE (shutting down, or stopping after a
    /// storage failure, to be restarted).
    ///
    /// A connection closed without a word before the coordinator ever answered may be
    /// a port serving TLS, which no retry mends: the second such failure in a row is
    /// not retried. A certificate the client does not accept (a coordinator restarted
    /// with another one) is never retried, unless it only expired, which a renewal
    /// mends.
    pub fn may_mend(&mut self, status: &tonic::Status) -> bool {
        if tls_failure(status).is_some_and(|f| !f.is_transient()) {
            false
        } else if !is_transport_status(status) {
            self.unexplained = 0;
            status.code() == tonic::Code::Unavailable
        } else if was_never_sent(status) || self.answered.get() {
            self.unexplained = 0;
            true
        } else {
            self.unexplained += 1;
            self.unexplained < 2
        }
    }

    /// Counts a failure and gives the pause before the next try: 100 ms doubling to
    /// 2 s.
    pub fn pause(&mut self) -> Duration {
        self.failures += 1;
        Duration::from_millis(100 << (self.failures - 1).min(4)).min(Duration::from_secs(2))
    }
}
