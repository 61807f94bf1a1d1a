//! The coordinator's one domain error type. Every failure a client can see is one of
//! these variants; `grpc::status` maps them to gRPC codes in exactly one place, and the
//! HTTP face maps them to HTTP statuses.

/// What went wrong, with the context a user needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Bad input: names, sizes, durations, counts.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("queue '{0}' not found (create it first: queue-cli create {0})")]
    QueueNotFound(String),
    #[error(
        "item {id} not found in queue '{queue}' (it may have been removed by retention or purge)"
    )]
    ItemNotFound { queue: String, id: u64 },
    #[error("queue '{0}' already exists")]
    QueueExists(String),
    #[error("schedule '{0}' not found (see queue-cli schedule list)")]
    ScheduleNotFound(String),
    #[error("schedule '{0}' already exists (delete it first to change it)")]
    ScheduleExists(String),
    /// A stale or unknown lease token: the item belongs to someone else now.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    #[error("queue '{0}' is sealed: no more items can be enqueued (unseal it to reopen)")]
    Sealed(String),
    /// The operation does not apply to the item's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A limit was reached (queue depth).
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("the coordinator is shutting down; retry shortly")]
    ShuttingDown,
    #[error("storage failure: {0}")]
    Storage(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
}
