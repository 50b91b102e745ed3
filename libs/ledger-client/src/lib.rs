//! A service's client of the audit ledger: each event is answered once durable.
//!
//! Concurrent `record` calls in one process are coalesced: one task takes every event waiting
//! and sends them as one `AppendBatch` (a single event goes as a plain `Append`), with at most
//! [`MAX_IN_FLIGHT`] calls outstanding; events arriving meanwhile wait for the next call. So a
//! lone caller pays one `Append` as before, and many concurrent callers share the RPC, TLS and
//! HTTP/2 cost per event. Each caller gets its own receipt only after the ledger made its event
//! durable; a failed batch fails exactly its callers. The ledger checks every event of a batch
//! before recording any, so when it refuses a batch as invalid (nothing recorded) the events
//! are sent again one by one, and only the bad event's caller sees the refusal.
//!
//! Traces: the batch call runs in a `ledger.append_batch` span that follows from every
//! caller's span (OpenTelemetry links), and the audit service's spans hang under it.

use medai_proto::audit::v1::audit_service_client::AuditServiceClient;
use medai_proto::audit::v1::{AppendBatchRequest, AppendRequest, AppendResponse};
use medai_runtime::rpc_trace::MeshChannel;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

pub use medai_proto::audit::v1::{
    APPEND_BATCH_MAX_BYTES as MAX_BATCH_BYTES, APPEND_BATCH_MAX_EVENTS as MAX_BATCH_EVENTS,
};
/// Calls to the ledger outstanding at once from one client; more events wait and are batched.
pub const MAX_IN_FLIGHT: usize = 4;
/// Events waiting for a call; beyond this, `record` waits (backpressure).
const QUEUE_DEPTH: usize = 4096;

/// An event, its caller's span and where its answer goes.
struct Waiting {
    event: AppendRequest,
    span: tracing::Span,
    reply: oneshot::Sender<Result<AppendResponse, tonic::Status>>,
}

#[derive(Clone)]
pub struct LedgerClient {
    queue: mpsc::Sender<Waiting>,
}

impl LedgerClient {
    /// Starts the task that sends this client's events. Call inside a tokio runtime.
    pub fn new(channel: MeshChannel) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(send_batches(AuditServiceClient::new(channel), waiting));
        Self { queue }
    }

    /// Records one event; `Err` if the ledger did not make it durable.
    pub async fn record(
        &self,
        actor: &str,
        action: &str,
        resource: &str,
        outcome: &str,
        context: serde_json::Value,
    ) -> Result<u64, tonic::Status> {
        let event = AppendRequest {
            actor: actor.to_owned(),
            action: action.to_owned(),
            resource: resource.to_owned(),
            outcome: outcome.to_owned(),
            context_json: context.to_string(),
        };
        Ok(self.append(event).await?.seq)
    }

    /// Records one event and returns its receipt (seq, hash, time) once it is durable; `Err`
    /// if the ledger did not make it durable. A caller that stops waiting (a timeout, a
    /// cancelled request) before its event is sent withdraws it: no record is made for an
    /// answer nobody waits for. Once sent, the event may still be recorded.
    pub async fn append(&self, event: AppendRequest) -> Result<AppendResponse, tonic::Status> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Waiting {
                event,
                span: tracing::Span::current(),
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> tonic::Status {
    tonic::Status::unavailable("the ledger client has stopped")
}

/// Takes every waiting event (within the batch bounds) whenever a call may start, and sends it.
async fn send_batches(
    client: AuditServiceClient<MeshChannel>,
    mut waiting: mpsc::Receiver<Waiting>,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carried: Option<Waiting> = None;
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(first) => first,
            None => match waiting.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut bytes = first.event.field_bytes();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_EVENTS {
            let Ok(next) = waiting.try_recv() else {
                break;
            };
            let size = next.event.field_bytes();
            if bytes + size > MAX_BATCH_BYTES {
                carried = Some(next);
                break;
            }
            bytes += size;
            batch.push(next);
        }
        let client = client.clone();
        tokio::spawn(async move {
            send(client, batch).await;
            drop(permit);
        });
    }
}

/// Sends one batch and answers each of its callers.
async fn send(mut client: AuditServiceClient<MeshChannel>, mut batch: Vec<Waiting>) {
    // Callers that stopped waiting while queued withdraw their events.
    batch.retain(|waiting| !waiting.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    if batch.len() == 1
        && let Some(only) = batch.pop()
    {
        let answer = append_one(&mut client, only.event)
            .instrument(only.span)
            .await;
        let _caller_gone = only.reply.send(answer);
        return;
    }
    let span = tracing::info_span!("ledger.append_batch", events = batch.len());
    for waiting in &batch {
        span.follows_from(&waiting.span);
    }
    let events: Vec<AppendRequest> = batch.iter().map(|waiting| waiting.event.clone()).collect();
    let answer = async {
        let mut request = tonic::Request::new(AppendBatchRequest { events });
        medai_runtime::telemetry::inject_trace_context(request.metadata_mut());
        client.append_batch(request).await
    }
    .instrument(span.clone())
    .await;
    match answer {
        Ok(response) => {
            let receipts = response.into_inner().receipts;
            if receipts.len() != batch.len() {
                let status = tonic::Status::internal(format!(
                    "the ledger answered {} receipts for {} events",
                    receipts.len(),
                    batch.len()
                ));
                for waiting in batch {
                    let _caller_gone = waiting.reply.send(Err(status.clone()));
                }
                return;
            }
            for (waiting, receipt) in batch.into_iter().zip(receipts) {
                let _caller_gone = waiting.reply.send(Ok(receipt));
            }
        }
        // Refused before anything was recorded (a bad event, or bounds): each event alone, so
        // only a bad event's caller is refused.
        Err(status) if status.code() == tonic::Code::InvalidArgument => {
            for waiting in batch {
                if waiting.reply.is_closed() {
                    continue;
                }
                let answer = append_one(&mut client, waiting.event)
                    .instrument(waiting.span)
                    .await;
                let _caller_gone = waiting.reply.send(answer);
            }
        }
        Err(status) => {
            for waiting in batch {
                let _caller_gone = waiting.reply.send(Err(status.clone()));
            }
        }
    }
}

async fn append_one(
    client: &mut AuditServiceClient<MeshChannel>,
    event: AppendRequest,
) -> Result<AppendResponse, tonic::Status> {
    let mut request = tonic::Request::new(event);
    medai_runtime::telemetry::inject_trace_context(request.metadata_mut());
    Ok(client.append(request).await?.into_inner())
}
