//! Delivery notes written after the answer has left (issue 14).
//!
//! A prediction is answered once its result is stored and its ledger record is durable; the
//! note of that record on the stored result (what the results views and a replay look at
//! first) is an index, not a safety step, so it is written beside the answer instead of before
//! it. What this gateway has answered it still shows at once: a read of results first waits
//! for the notes this gateway began before the read (see [`NotesInFlight::written_before_now`]),
//! and a single result whose note is missing (another replica's in flight, or one lost with a
//! killed gateway) is noted from its ledger record when it is read (`results::fetch`).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use medai_proto::inference::v1::inference_service_client::InferenceServiceClient;
use medai_proto::inference::v1::{RecordDeliveriesRequest, RecordDeliveryRequest};
use medai_runtime::rpc_trace::MeshChannel;
use tokio::sync::{mpsc, oneshot, watch};

/// How long a read waits for the notes begun before it; a note that takes longer is treated
/// like one that failed (the single-result read then notes it from the ledger).
pub const NOTE_WAIT_FOR_READS: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Tickets {
    next: u64,
    open: BTreeSet<u64>,
}

/// The notes this gateway has begun and not yet finished, each with a ticket in order, and
/// the coalescing client that writes them.
pub struct NotesInFlight {
    tickets: watch::Sender<Tickets>,
    writer: OnceLock<mpsc::Sender<QueuedNote>>,
}

impl Default for NotesInFlight {
    fn default() -> Self {
        Self {
            tickets: watch::Sender::new(Tickets::default()),
            writer: OnceLock::new(),
        }
    }
}

/// Most notes one `RecordDeliveries` call carries (inference takes up to 1024).
const MAX_NOTES_PER_CALL: usize = 256;

/// How long a note that finds the client idle waits for others to share its call. Notes are
/// off the answer's path, so this costs no caller time; at low concurrency it turns one call
/// (and one statement in inference) per prediction into one per few (issue 14). A read of
/// results waits for the notes begun before it, so at most this much longer.
pub const NOTE_LINGER: Duration = Duration::from_millis(5);

/// A note waiting for the coalescing client's next call, and where its answer goes.
struct QueuedNote {
    result_id: String,
    ledger_seq: u64,
    correlation_id: String,
    answer: oneshot::Sender<Result<u64, tonic::Status>>,
}

/// Sends the queued notes (issue 14): a note that finds the client idle waits [`NOTE_LINGER`]
/// for others; notes queued meanwhile, or while a call runs, go together in the next
/// `RecordDeliveries` call, which inference writes in one group commit. Notes are written beside the answers, so waiting for
/// the call in flight costs no caller time. An inference service without `RecordDeliveries`
/// (an older version during an upgrade) gets one `RecordDelivery` per note, as before.
async fn send_notes(
    mut inference: InferenceServiceClient<MeshChannel>,
    timeout: Duration,
    mut queue: mpsc::Receiver<QueuedNote>,
) {
    let mut batch = Vec::with_capacity(MAX_NOTES_PER_CALL);
    let mut batches_served = true;
    while queue.recv_many(&mut batch, MAX_NOTES_PER_CALL).await > 0 {
        linger_for_more(&mut queue, &mut batch).await;
        if batches_served {
            let deliveries = batch
                .iter()
                .map(|note| RecordDeliveryRequest {
                    result_id: note.result_id.clone(),
                    ledger_seq: note.ledger_seq,
                })
                .collect();
            let mut request = tonic::Request::new(RecordDeliveriesRequest { deliveries });
            // One call, many correlation ids: it carries the first; each note's own is logged
            // with its outcome.
            medai_runtime::correlation::propagate(request.metadata_mut(), &batch[0].correlation_id);
            request.set_timeout(timeout);
            match inference.record_deliveries(request).await {
                Ok(response) => {
                    let noted = response.into_inner().noted;
                    if noted.len() == batch.len() {
                        for (note, outcome) in batch.drain(..).zip(noted) {
                            let answer = if outcome.error_code.is_empty() {
                                Ok(outcome.ledger_seq)
                            } else {
                                Err(note_refused(&outcome.error_code))
                            };
                            let _gone = note.answer.send(answer);
                        }
                    } else {
                        let status =
                            tonic::Status::internal("RecordDeliveries answered another count");
                        for note in batch.drain(..) {
                            let _gone = note.answer.send(Err(status.clone()));
                        }
                    }
                    continue;
                }
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::warn!(
                        "inference does not serve RecordDeliveries; noting deliveries one by one"
                    );
                    batches_served = false;
                }
                Err(status) => {
                    for note in batch.drain(..) {
                        let _gone = note.answer.send(Err(status.clone()));
                    }
                    continue;
                }
            }
        }
        let singles = batch.drain(..).map(|note| {
            let mut inference = inference.clone();
            async move {
                let mut request = tonic::Request::new(RecordDeliveryRequest {
                    result_id: note.result_id,
                    ledger_seq: note.ledger_seq,
                });
                medai_runtime::correlation::propagate(request.metadata_mut(), &note.correlation_id);
                request.set_timeout(timeout);
                let answer = inference
                    .record_delivery(request)
                    .await
                    .map(|response| response.into_inner().ledger_seq);
                let _gone = note.answer.send(answer);
            }
        });
        futures::future::join_all(singles).await;
    }
}

/// Takes the notes that arrive within [`NOTE_LINGER`] into `batch`, up to a full call.
async fn linger_for_more(queue: &mut mpsc::Receiver<QueuedNote>, batch: &mut Vec<QueuedNote>) {
    let deadline = tokio::time::sleep(NOTE_LINGER);
    tokio::pin!(deadline);
    while batch.len() < MAX_NOTES_PER_CALL {
        tokio::select! {
            // Cancel-safe: a note taken is in `batch`, one not taken stays queued.
            taken = queue.recv_many(batch, MAX_NOTES_PER_CALL - batch.len()) => {
                if taken == 0 {
                    return;
                }
            }
            () = &mut deadline => return,
        }
    }
}

/// The status a note refused inside a `RecordDeliveries` answer stands for.
fn note_refused(error_code: &str) -> tonic::Status {
    let code = match error_code {
        "RESULT_NOT_FOUND" => tonic::Code::NotFound,
        "QUERY_INVALID" => tonic::Code::InvalidArgument,
        _ => tonic::Code::Internal,
    };
    tonic::Status::new(code, error_code.to_owned())
}

/// One note being written; dropping it (written, failed or abandoned) ends it.
pub struct NoteTicket {
    number: u64,
    tickets: watch::Sender<Tickets>,
}

impl Drop for NoteTicket {
    fn drop(&mut self) {
        self.tickets.send_modify(|tickets| {
            tickets.open.remove(&self.number);
        });
    }
}

impl NotesInFlight {
    /// A ticket for a note about to be written.
    pub fn begin(&self) -> NoteTicket {
        let mut number = 0;
        self.tickets.send_modify(|tickets| {
            number = tickets.next;
            tickets.next += 1;
            tickets.open.insert(number);
        });
        NoteTicket {
            number,
            tickets: self.tickets.clone(),
        }
    }

    /// Notes the ledger entry `ledger_seq` on the stored result `result_id` through the
    /// coalescing client (started on the first note, on `inference`); returns the seq that
    /// stands once inference has committed it.
    pub async fn write(
        &self,
        inference: &InferenceServiceClient<MeshChannel>,
        timeout: Duration,
        correlation_id: &str,
        result_id: &str,
        ledger_seq: u64,
    ) -> Result<u64, tonic::Status> {
        let writer = self.writer.get_or_init(|| {
            let (writer, queue) = mpsc::channel(16 * MAX_NOTES_PER_CALL);
            // Ends when this gateway's notes are dropped.
            tokio::spawn(send_notes(inference.clone(), timeout, queue));
            writer
        });
        let (answer, answered) = oneshot::channel();
        let note = QueuedNote {
            result_id: result_id.to_owned(),
            ledger_seq,
            correlation_id: correlation_id.to_owned(),
            answer,
        };
        writer
            .send(note)
            .await
            .map_err(|_| tonic::Status::unavailable("the delivery-note client has stopped"))?;
        answered
            .await
            .unwrap_or_else(|_| Err(tonic::Status::unavailable("the delivery note was dropped")))
    }

    /// Notes begun and not finished.
    pub fn open(&self) -> usize {
        self.tickets.borrow().open.len()
    }

    /// Waits, at most `bound`, until every note begun before this call has finished (notes
    /// begun later are not waited for, so a steady stream of new ones cannot starve a
    /// reader). `false` if the bound ran out first.
    pub fn written_before_now(&self, bound: Duration) -> impl Future<Output = bool> + use<> {
        let mut watcher = self.tickets.subscribe();
        let horizon = watcher.borrow().next;
        async move {
            let settled = watcher
                .wait_for(|tickets| tickets.open.first().is_none_or(|&oldest| oldest >= horizon));
            matches!(tokio::time::timeout(bound, settled).await, Ok(Ok(_)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(seq: u64) -> QueuedNote {
        let (answer, _) = oneshot::channel();
        QueuedNote {
            result_id: format!("result-{seq}"),
            ledger_seq: seq,
            correlation_id: String::new(),
            answer,
        }
    }

    fn seqs(batch: &[QueuedNote]) -> Vec<u64> {
        batch.iter().map(|note| note.ledger_seq).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn notes_within_the_linger_share_a_call_and_later_ones_go_in_the_next() {
        let (sender, mut queue) = mpsc::channel(16);
        sender.send(note(1)).await.expect("queued");
        let mut batch = Vec::new();
        queue.recv_many(&mut batch, MAX_NOTES_PER_CALL).await;
        tokio::spawn(async move {
            tokio::time::sleep(NOTE_LINGER / 2).await;
            sender.send(note(2)).await.expect("queued");
            tokio::time::sleep(NOTE_LINGER).await;
            sender.send(note(3)).await.expect("queued");
        });
        let started = tokio::time::Instant::now();
        linger_for_more(&mut queue, &mut batch).await;
        assert_eq!(seqs(&batch), [1, 2]);
        assert_eq!(started.elapsed(), NOTE_LINGER, "no longer than the linger");
        let mut next = Vec::new();
        queue.recv_many(&mut next, MAX_NOTES_PER_CALL).await;
        assert_eq!(
            seqs(&next),
            [3],
            "a note after the linger waits for the next call"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_call_does_not_linger_and_a_closed_queue_ends_it() {
        let (sender, mut queue) = mpsc::channel(2 * MAX_NOTES_PER_CALL);
        for seq in 0..MAX_NOTES_PER_CALL as u64 + 1 {
            sender.send(note(seq)).await.expect("queued");
        }
        let mut batch = Vec::new();
        queue.recv_many(&mut batch, 1).await;
        let started = tokio::time::Instant::now();
        linger_for_more(&mut queue, &mut batch).await;
        assert_eq!(batch.len(), MAX_NOTES_PER_CALL);
        assert_eq!(started.elapsed(), Duration::ZERO);

        drop(sender);
        let mut last = Vec::new();
        queue.recv_many(&mut last, MAX_NOTES_PER_CALL).await;
        linger_for_more(&mut queue, &mut last).await;
        assert_eq!(seqs(&last), [MAX_NOTES_PER_CALL as u64]);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "a closed queue ends the wait"
        );
    }

    #[tokio::test]
    async fn a_read_waits_for_the_notes_begun_before_it_and_not_for_later_ones() {
        let notes = NotesInFlight::default();
        assert!(notes.written_before_now(Duration::from_millis(1)).await);
        let earlier = notes.begin();
        // Still open: the read runs out of time.
        assert!(!notes.written_before_now(Duration::from_millis(20)).await);
        let reader = tokio::spawn(notes.written_before_now(Duration::from_secs(30)));
        // Begun after the read: not waited for.
        let later = notes.begin();
        drop(earlier);
        assert!(reader.await.expect("reader"), "the earlier note finished");
        assert_eq!(notes.open(), 1);
        drop(later);
        assert_eq!(notes.open(), 0);
    }
}
