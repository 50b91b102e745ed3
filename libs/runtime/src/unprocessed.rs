//! Calls that a server provably never processed, which a client may send again whatever the
//! method (a refresh-token rotation as much as a health check).
//!
//! A draining server ends each HTTP/2 connection with GOAWAY, and RFC 9113 §6.8 makes the
//! GOAWAY's last stream identifier a promise: streams above it "were not or will not be
//! processed" and may be retried. hyper's graceful shutdown sends GOAWAY(2^31-1), a PING, and on
//! the PING's answer GOAWAY(last stream it accepted). The h2 client answers that PING as soon as
//! it reads it, ahead of a request it had queued but not yet written, so a request made just as
//! a pod starts draining reaches the server after the final GOAWAY, is ignored there, and the
//! client fails it with the GOAWAY itself: `INTERNAL: h2 protocol error: http2 error`. A request
//! handed to hyper after the first GOAWAY fails the same way without being written at all.
//! grpc-go and grpc-java retry such calls transparently; tonic surfaces them, so clients of the
//! mesh retry them here ([`retry_never_processed`]): at most [`MOST_ATTEMPTS`] sends in all, each
//! only after the one before was provably never processed.
//!
//! Never processed, read from the transport error a [`tonic::Status`] carries (its source
//! chain), never from its message or code:
//! - a GOAWAY received from the server with NO_ERROR (the stream was above its last stream
//!   identifier, or was opened after it);
//! - RST_STREAM(REFUSED_STREAM) from the server (RFC 9113 §8.7: refused before any processing);
//! - hyper's "operation was canceled": the request was still queued for a connection that closed
//!   before hyper took it (nothing written).
//!
//! A call cut after the server accepted it (an RST_STREAM of another kind, a connection reset
//! or closed under an open stream) may have run and is never classified as such.

use std::error::Error as StdError;
use std::future::Future;

/// Whether the transport error in `status` proves that the server never processed the call.
pub fn never_processed(status: &tonic::Status) -> bool {
    let mut next: Option<&(dyn StdError + 'static)> = status.source();
    while let Some(error) = next {
        if let Some(h2_error) = error.downcast_ref::<h2::Error>() {
            return h2_never_processed(h2_error);
        }
        if let Some(hyper_error) = error.downcast_ref::<hyper::Error>()
            && hyper_error.is_canceled()
        {
            return true;
        }
        next = error.source();
    }
    false
}

fn h2_never_processed(error: &h2::Error) -> bool {
    if !error.is_remote() {
        return false;
    }
    let reason = error.reason();
    (error.is_go_away() && reason == Some(h2::Reason::NO_ERROR))
        || (error.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM))
}

/// The source chain of `status`, each error's `Debug` (for a failure report: which transport
/// error ended the call, e.g. `GoAway(b"", NO_ERROR, Remote)`).
pub fn transport_error_chain(status: &tonic::Status) -> String {
    let mut links = Vec::new();
    let mut next: Option<&(dyn StdError + 'static)> = status.source();
    while let Some(error) = next {
        links.push(format!("{error:?}"));
        next = error.source();
    }
    links.join(" <- ")
}

/// The most times a call is sent when each earlier attempt was provably never processed: a
/// retry can meet the same draining connection before the channel has replaced it.
pub const MOST_ATTEMPTS: u32 = 3;

/// Makes the call; while the server provably never processed it ([`never_processed`]), makes it
/// again, up to [`MOST_ATTEMPTS`] in all, a little later each time so the channel can reconnect.
/// Returns the outcome and whether it was sent again.
pub async fn retry_never_processed<T, F, Fut>(mut call: F) -> (Result<T, tonic::Status>, bool)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Err(status) if attempt < MOST_ATTEMPTS && never_processed(&status) => {
                tracing::debug!(
                    transport_error = %transport_error_chain(&status),
                    attempt,
                    "a call the server never processed is sent again"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5 * u64::from(attempt))).await;
                attempt += 1;
            }
            outcome => return (outcome, attempt > 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_without_a_transport_error_are_not_classified_as_never_processed() {
        for status in [
            tonic::Status::internal("h2 protocol error: http2 error"),
            tonic::Status::cancelled("operation was canceled"),
            tonic::Status::unavailable("connection reset"),
        ] {
            assert!(
                !never_processed(&status),
                "{status:?}: the message alone proves nothing"
            );
        }
    }

    #[test]
    fn a_local_or_non_refusing_h2_error_may_have_been_processed() {
        for reason in [
            h2::Reason::NO_ERROR,
            h2::Reason::REFUSED_STREAM,
            h2::Reason::INTERNAL_ERROR,
            h2::Reason::CANCEL,
        ] {
            // An h2 error built from a reason is a local one: not the server's word.
            let status = tonic::Status::from_error(Box::new(h2::Error::from(reason)));
            assert!(!never_processed(&status), "{reason:?}");
        }
    }
}
