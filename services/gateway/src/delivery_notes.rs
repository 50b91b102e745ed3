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
use std::time::Duration;

use tokio::sync::watch;

/// How long a read waits for the notes begun before it; a note that takes longer is treated
/// like one that failed (the single-result read then notes it from the ledger).
pub const NOTE_WAIT_FOR_READS: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Tickets {
    next: u64,
    open: BTreeSet<u64>,
}

/// The notes this gateway has begun and not yet finished, each with a ticket in order.
pub struct NotesInFlight {
    tickets: watch::Sender<Tickets>,
}

impl Default for NotesInFlight {
    fn default() -> Self {
        Self {
            tickets: watch::Sender::new(Tickets::default()),
        }
    }
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
