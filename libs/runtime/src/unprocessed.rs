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
//! mesh retry them here: every mesh channel, the bridge's channel and the CLI's gateway and
//! inference (`medai models`) channels through the layer [`RetryNeverProcessed`]; at most
//! [`MOST_ATTEMPTS`] sends in all, each only after the one before was provably never processed.
//!
//! Never processed, read from the transport error (a channel's error or the source chain of the
//! [`tonic::Status`] made of it), never from its message or code:
//! - a GOAWAY received from the server with NO_ERROR;
//! - RST_STREAM(REFUSED_STREAM) from the server (RFC 9113 §8.7: refused before any processing);
//! - hyper's "operation was canceled" ("connection closed": the request was still queued for a
//!   connection whose dispatcher had ended, and was dropped from the queue; "connection was not
//!   ready": the queue was already closed and handed the request back). Nothing was written.
//!
//! What a GOAWAY-failed call may have reached (hyper 1.12, h2 0.4.20): hyper's HTTP/2 dispatcher
//! (`proto::h2::client::ClientTask`) fails a call with the connection's GOAWAY in three places:
//! `send_request` refused because the GOAWAY was already received (no stream, nothing written);
//! a stream above the final GOAWAY's last stream id (the server ignores its every frame); and,
//! rarely, a stream opened just before the dispatcher saw the first GOAWAY: `send_request`
//! queued its HEADERS, the connection task (another thread) wrote them and then read the GOAWAY,
//! and the dispatcher's next `poll_ready` failed, so it dropped the stream (RST_STREAM CANCEL)
//! before piping a byte of its body. Such a stream can be at or below the last stream id: the
//! server accepts its HEADERS and calls its service, whose layers run, but no message arrives
//! and the handler never runs (tonic answers it `INTERNAL: Missing request message`). Measured
//! by `libs/runtime/tests/drain`: about one such stream in 30,000 calls across a drain, each
//! answered without its handler running. So a GOAWAY proves that the server never received a
//! byte of the call's messages: a unary or server-streaming handler never ran, and the mesh's
//! streaming handlers act on messages only (an upload on its header message, a study on each
//! image). It is no proof for a handler that acts on HEADERS alone.
//!
//! A call cut after the server accepted it (an RST_STREAM of another kind, a connection reset
//! or closed under an open stream, a stream ended by the connection's end) may have run and is
//! never classified as such.

use std::error::Error as StdError;

/// Whether the transport error in `status` proves that the server never processed the call.
pub fn never_processed(status: &tonic::Status) -> bool {
    status.source().is_some_and(error_never_processed)
}

/// Whether `error` (a channel's error, or any error in its source chain) proves that the server
/// never processed the call: [`never_processed`] before tonic turns the error into a status.
pub fn error_never_processed(error: &(dyn StdError + 'static)) -> bool {
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
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
    status.source().map(error_chain).unwrap_or_default()
}

/// `error` and its source chain, each error's `Debug`, as [`transport_error_chain`] reports it.
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut links = Vec::new();
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(error) = next {
        links.push(format!("{error:?}"));
        next = error.source();
    }
    links.join(" <- ")
}

/// The most times a call is sent when each earlier attempt was provably never processed: a
/// retry can meet the same draining connection before the channel has replaced it.
pub const MOST_ATTEMPTS: u32 = 3;

/// The pause before attempt `attempt + 1`: a little longer each time, so the channel can
/// replace a connection that was closing.
fn pause_before_another(attempt: u32) -> std::time::Duration {
    std::time::Duration::from_millis(5 * u64::from(attempt))
}

/// The most request body bytes [`RetryNeverProcessed`] holds to send a call again: any unary
/// call of the mesh (a canonical image is at most 96 MiB) and short streams; a longer stream is
/// sent as it comes, without being held, and so is never sent again.
pub const MOST_HELD_BODY_BYTES: usize = 128 * 1024 * 1024;

/// The most request body frames [`RetryNeverProcessed`] takes before the first send. tonic
/// encodes a unary call's message as one frame (or a few); a stream whose source keeps up (its
/// producer on another thread) is not drained into memory ahead of its sending, it is sent as
/// it comes after this many.
pub const MOST_HELD_BODY_FRAMES: usize = 16;

/// [`RetryNeverProcessed`] around a channel: the rule of this module as a tower layer, for
/// every call of a client (the mesh channels, the bridge's, the CLI's gateway and inference ones).
#[derive(Clone, Copy, Debug, Default)]
pub struct RetryNeverProcessedLayer;

impl<S> tower::Layer<S> for RetryNeverProcessedLayer {
    type Service = RetryNeverProcessed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryNeverProcessed { inner }
    }
}

/// A gRPC channel that sends a call again, up to [`MOST_ATTEMPTS`] sends in all, while the
/// channel's error proves the server never processed it ([`error_never_processed`]), whatever
/// the method. It can only when it holds the whole request: before the first send it takes the
/// request body's frames that are ready (a unary call's message is; a stream's are until its
/// source waits), and a body that ends within [`MOST_HELD_BODY_BYTES`] is sent from that copy
/// each time. Any other body is sent as it comes, and its call only once.
#[derive(Clone, Debug)]
pub struct RetryNeverProcessed<S> {
    inner: S,
}

impl<S> RetryNeverProcessed<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for RetryNeverProcessed<S>
where
    S: tower::Service<http::Request<tonic::body::Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(
        &mut self,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(context).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        // The service made ready makes the first send; a clone, made ready again, each later one.
        let fresh = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, fresh);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let held = HeldBody::take_ready(body).await;
            let whole = held.whole();
            let mut request = http::Request::from_parts(parts.clone(), held.into_body());
            let mut attempt = 1;
            loop {
                let error: BoxError = match service.call(request).await {
                    Ok(response) => return Ok(response),
                    Err(error) => error.into(),
                };
                let Some(whole) = &whole else {
                    return Err(error);
                };
                if attempt >= MOST_ATTEMPTS || !error_never_processed(&*error) {
                    return Err(error);
                }
                // Rare (a drain's GOAWAY met calls in flight) and worth seeing: the method
                // path and the transport error only, never the request.
                tracing::info!(
                    transport_error = %error_chain(&*error),
                    attempt,
                    path = parts.uri.path(),
                    "a call the server never processed is sent again"
                );
                tokio::time::sleep(pause_before_another(attempt)).await;
                attempt += 1;
                futures::future::poll_fn(|context| service.poll_ready(context))
                    .await
                    .map_err(Into::into)?;
                request = http::Request::from_parts(parts.clone(), whole.replay());
            }
        })
    }
}

/// One frame of a held request body.
#[derive(Clone)]
enum HeldFrame {
    Data(bytes::Bytes),
    Trailers(http::HeaderMap),
}

impl HeldFrame {
    fn into_frame(self) -> http_body::Frame<bytes::Bytes> {
        match self {
            Self::Data(data) => http_body::Frame::data(data),
            Self::Trailers(trailers) => http_body::Frame::trailers(trailers),
        }
    }
}

/// A request body's frames that were ready before the first send, and what is left of it.
struct HeldBody {
    frames: Vec<HeldFrame>,
    /// The rest of the body; `None` when it ended (the frames are the whole body).
    rest: Option<tonic::body::Body>,
    /// An error the body ended with while its frames were taken.
    error: Option<tonic::Status>,
}

impl HeldBody {
    async fn take_ready(mut body: tonic::body::Body) -> Self {
        use http_body::Body as _;
        let mut frames = Vec::new();
        let mut held_bytes = 0_usize;
        loop {
            if held_bytes > MOST_HELD_BODY_BYTES || frames.len() >= MOST_HELD_BODY_FRAMES {
                return Self::partial(frames, body, None);
            }
            let next = futures::future::poll_fn(|context| {
                match std::pin::Pin::new(&mut body).poll_frame(context) {
                    std::task::Poll::Ready(frame) => std::task::Poll::Ready(Some(frame)),
                    std::task::Poll::Pending => std::task::Poll::Ready(None),
                }
            })
            .await;
            match next {
                // The source waits: a stream being written, sent as it comes.
                None => return Self::partial(frames, body, None),
                Some(None) => {
                    return Self {
                        frames,
                        rest: None,
                        error: None,
                    };
                }
                Some(Some(Err(status))) => return Self::partial(frames, body, Some(status)),
                Some(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            held_bytes += data.len();
                            HeldFrame::Data(data)
                        }
                        Err(frame) => match frame.into_trailers() {
                            Ok(trailers) => HeldFrame::Trailers(trailers),
                            Err(_) => continue,
                        },
                    };
                    frames.push(frame);
                }
            }
        }
    }

    fn partial(
        frames: Vec<HeldFrame>,
        rest: tonic::body::Body,
        error: Option<tonic::Status>,
    ) -> Self {
        Self {
            frames,
            rest: Some(rest),
            error,
        }
    }

    /// The whole body, to send again, when it ended while it was taken.
    fn whole(&self) -> Option<WholeBody> {
        (self.rest.is_none() && self.error.is_none()).then(|| WholeBody {
            frames: self.frames.clone(),
        })
    }

    /// The body to send first: the frames taken, then the rest as it comes.
    fn into_body(self) -> tonic::body::Body {
        tonic::body::Body::new(ReplayedBody {
            frames: self.frames.into(),
            error: self.error,
            rest: self.rest,
        })
    }
}

/// A request body held whole (cheap to copy: its data is reference-counted).
struct WholeBody {
    frames: Vec<HeldFrame>,
}

impl WholeBody {
    fn replay(&self) -> tonic::body::Body {
        tonic::body::Body::new(ReplayedBody {
            frames: self.frames.clone().into(),
            error: None,
            rest: None,
        })
    }
}

/// Held frames, then a held error, then the rest of the body.
struct ReplayedBody {
    frames: std::collections::VecDeque<HeldFrame>,
    error: Option<tonic::Status>,
    rest: Option<tonic::body::Body>,
}

impl http_body::Body for ReplayedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        if let Some(frame) = self.frames.pop_front() {
            return std::task::Poll::Ready(Some(Ok(frame.into_frame())));
        }
        if let Some(error) = self.error.take() {
            return std::task::Poll::Ready(Some(Err(error)));
        }
        match &mut self.rest {
            Some(rest) => std::pin::Pin::new(rest).poll_frame(context),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
            && self.error.is_none()
            && self
                .rest
                .as_ref()
                .is_none_or(http_body::Body::is_end_stream)
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

    /// A request body of `chunks`, then its end, or (`waits`) a source that waits.
    struct ChunkedBody {
        chunks: std::collections::VecDeque<&'static [u8]>,
        waits: bool,
    }

    impl http_body::Body for ChunkedBody {
        type Data = bytes::Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _context: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>>
        {
            match self.chunks.pop_front() {
                Some(chunk) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(
                    bytes::Bytes::from_static(chunk),
                )))),
                None if self.waits => std::task::Poll::Pending,
                None => std::task::Poll::Ready(None),
            }
        }
    }

    fn body(chunks: &[&'static [u8]], waits: bool) -> tonic::body::Body {
        tonic::body::Body::new(ChunkedBody {
            chunks: chunks.iter().copied().collect(),
            waits,
        })
    }

    /// The data frames a body yields until it ends or waits.
    async fn ready_data(mut body: tonic::body::Body) -> Vec<bytes::Bytes> {
        use http_body::Body as _;
        let mut data = Vec::new();
        while let Some(Some(Ok(frame))) = futures::future::poll_fn(|context| {
            match std::pin::Pin::new(&mut body).poll_frame(context) {
                std::task::Poll::Ready(frame) => std::task::Poll::Ready(Some(frame)),
                std::task::Poll::Pending => std::task::Poll::Ready(None),
            }
        })
        .await
        {
            data.extend(frame.into_data().ok());
        }
        data
    }

    #[tokio::test]
    async fn a_body_that_ends_is_held_whole_and_replayed_and_a_waiting_stream_is_not_held() {
        let held = HeldBody::take_ready(body(&[b"first", b"second"], false)).await;
        let whole = held.whole().expect("a body that ended is held whole");
        for replayed in [whole.replay(), whole.replay(), held.into_body()] {
            assert_eq!(ready_data(replayed).await, [&b"first"[..], &b"second"[..]]);
        }

        let streaming = HeldBody::take_ready(body(&[b"first"], true)).await;
        assert!(
            streaming.whole().is_none(),
            "a stream whose source waits cannot be sent again"
        );
        assert_eq!(ready_data(streaming.into_body()).await, [&b"first"[..]]);

        let chunks = [&b"chunk"[..]; MOST_HELD_BODY_FRAMES + 1];
        let long = HeldBody::take_ready(body(&chunks, false)).await;
        assert!(
            long.whole().is_none(),
            "a stream of more frames than are held is sent as it comes"
        );
        assert_eq!(ready_data(long.into_body()).await, chunks);
    }

    #[tokio::test]
    async fn a_call_whose_error_proves_nothing_is_sent_once() {
        use tower::{Layer as _, Service as _, ServiceExt as _};
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = sent.clone();
        let failing = tower::service_fn(move |_request: http::Request<tonic::body::Body>| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                Err::<http::Response<tonic::body::Body>, _>(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection reset under an open stream",
                ))
            }
        });
        let mut channel = RetryNeverProcessedLayer.layer(failing);
        let outcome = channel
            .ready()
            .await
            .expect("ready")
            .call(http::Request::new(body(&[b"message"], false)))
            .await;
        assert!(outcome.is_err());
        assert_eq!(
            sent.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "a call that may have been processed is sent once"
        );
    }
}
