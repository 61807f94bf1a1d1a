//! Handlers: what the worker does with one leased item.
//!
//! A handler gets an [`Item`] and returns an [`Outcome`]; it never talks to the
//! coordinator itself. The lease loop (`runner`) owns the lease: it extends it while
//! the handler runs and turns the outcome into ack, fail or release. Dropping a
//! handler's future cancels it (exec kills the command's process group).

pub mod exec;
pub mod keygen;

/// One leased item, as a handler sees it.
#[derive(Clone, Debug)]
pub struct Item {
    pub queue: String,
    pub id: u64,
    /// 1 on the first delivery.
    pub attempt: u32,
    pub payload: Vec<u8>,
    pub worker_id: String,
}

/// What became of an item.
#[derive(Debug)]
pub enum Outcome {
    /// Done: ack with this result.
    Done(Vec<u8>),
    /// Failed; another attempt may succeed (fail, retry with backoff).
    Retry(String),
    /// Failed for good (fail, permanent: the item goes DEAD).
    Permanent(String),
    /// This worker cannot run it right now (e.g. out of processes): give it back
    /// without counting the attempt.
    Release(String),
    /// This worker cannot run any item (e.g. the command does not exist): release the
    /// item and exit 1, rather than burn every item's attempts.
    Fatal(String),
}

/// The handler chosen on the command line.
#[derive(Debug)]
pub enum Handler {
    Keygen(keygen::Keygen),
    Exec(exec::Exec),
}

impl Handler {
    /// Runs the handler on one item. Cancel-safe: dropping the future abandons the item.
    pub async fn run(&self, item: &Item) -> Outcome {
        match self {
            Handler::Keygen(h) => h.run(item).await,
            Handler::Exec(h) => h.run(item).await,
        }
    }
}
