//! The two streaming calls, opened over gRPC (`--mode stream`) or the wire protocol
//! (`--mode wire`), behind one send/receive shape so producers and consumers do not
//! care which.

use anyhow::{Context, Result, anyhow};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use workq_proto::wire::{WireReceiver, WireSender};
use workq_proto::{Client, pb};

use super::Mode;
use super::produce::Batch;

/// The requests half of an open call.
pub enum Requests<T> {
    Grpc(mpsc::Sender<T>),
    Wire(WireSender<T>),
}

impl<T: prost::Message> Requests<T> {
    pub async fn send(&mut self, request: T) -> Result<()> {
        match self {
            Requests::Grpc(tx) => tx
                .send(request)
                .await
                .map_err(|_| anyhow!("the stream closed early")),
            Requests::Wire(tx) => tx.send(&request).await.context("send on the wire"),
        }
    }

    /// Ends the requests; the coordinator answers what is pending, then ends the call.
    pub async fn close(self) -> Result<()> {
        match self {
            Requests::Grpc(tx) => drop(tx),
            Requests::Wire(tx) => tx.close().await.context("close the wire call")?,
        }
        Ok(())
    }
}

impl Requests<pb::EnqueueRequest> {
    /// Sends one batch of bench items: over gRPC as a message, on the wire written
    /// straight into the frame ([`Batch::write`]).
    pub async fn send_batch(&mut self, batch: &Batch<'_>) -> Result<()> {
        match self {
            Requests::Grpc(tx) => tx
                .send(batch.request())
                .await
                .map_err(|_| anyhow!("the stream closed early")),
            Requests::Wire(tx) => tx
                .send_with(|out| batch.write(out))
                .await
                .context("send on the wire"),
        }
    }
}

/// The responses half of an open call.
pub enum Responses<T> {
    Grpc(tonic::Streaming<T>),
    Wire(WireReceiver<T>),
}

impl<T: prost::Message + Default> Responses<T> {
    /// The next response; `None` when the coordinator ended the call.
    pub async fn message(&mut self) -> Result<Option<T>, tonic::Status> {
        match self {
            Responses::Grpc(stream) => stream.message().await,
            Responses::Wire(stream) => stream.message().await,
        }
    }
}

/// How many requests the gRPC side may buffer before `send` waits.
const BUFFER: usize = 1024;

pub async fn enqueue_stream(
    client: &mut Client,
    mode: Mode,
) -> Result<(Requests<pb::EnqueueRequest>, Responses<pb::EnqueueResponse>)> {
    if mode == Mode::Wire {
        let (tx, rx) = client
            .wire_enqueue_stream()
            .await
            .context("open enqueue stream")?;
        return Ok((Requests::Wire(tx), Responses::Wire(rx)));
    }
    let (tx, rx) = mpsc::channel(BUFFER);
    let responses = client
        .enqueue_stream(ReceiverStream::new(rx))
        .await
        .context("open enqueue stream")?
        .into_inner();
    Ok((Requests::Grpc(tx), Responses::Grpc(responses)))
}

pub async fn work(
    client: &mut Client,
    mode: Mode,
) -> Result<(Requests<pb::WorkRequest>, Responses<pb::WorkResponse>)> {
    if mode == Mode::Wire {
        let (tx, rx) = client.wire_work().await.context("open work stream")?;
        return Ok((Requests::Wire(tx), Responses::Wire(rx)));
    }
    let (tx, rx) = mpsc::channel(BUFFER);
    let responses = client
        .work(ReceiverStream::new(rx))
        .await
        .context("open work stream")?
        .into_inner();
    Ok((Requests::Grpc(tx), Responses::Grpc(responses)))
}
