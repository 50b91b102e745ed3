//! The status a gRPC call ended with, read where gRPC puts it: the response headers of a
//! trailers-only answer (an error before any message), else the trailers that follow the last
//! message. For a streamed answer (server streaming, bidirectional) that is only known when the
//! body ends, so the response body is wrapped in [`StatusBody`], which tells a [`CallEnd`] once.
//! One wrapper serves every layer that needs the final status: the call's span
//! ([`crate::rpc_trace`]) and the `grpc_*_handled_total` counters ([`crate::grpc_metrics`],
//! [`crate::grpc_client_metrics`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use tonic::Code;

/// What learns how a call ended.
pub trait CallEnd {
    /// Called exactly once: with the code (and the stable reason code of its
    /// `google.rpc.ErrorInfo`, if it carries one) the call ended with.
    fn ended(&mut self, code: Code, reason: Option<String>);

    /// Held while the body is polled: the call's span, so log lines of a streamed answer
    /// belong to the call. None by default.
    fn polling_scope(&self) -> Option<tracing::span::Entered<'_>> {
        None
    }
}

/// A [`CallEnd`] told once: by the headers, the trailers, or, when the call or its body is
/// dropped before either said, as CANCELLED (the peer went away).
pub struct EndOnce<E: CallEnd> {
    end: Option<E>,
}

impl<E: CallEnd> EndOnce<E> {
    pub fn new(end: E) -> Self {
        Self { end: Some(end) }
    }

    /// Tells the call's end, unless it was told already.
    pub fn record(&mut self, code: Code, reason: Option<String>) {
        if let Some(mut end) = self.end.take() {
            end.ended(code, reason);
        }
    }

    fn polling_scope(&self) -> Option<tracing::span::Entered<'_>> {
        self.end.as_ref().and_then(CallEnd::polling_scope)
    }
}

impl<E: CallEnd> Drop for EndOnce<E> {
    fn drop(&mut self) {
        self.record(Code::Cancelled, None);
    }
}

/// The code and stable reason of a status carried by `headers` (response headers of a
/// trailers-only answer, or trailers), if they carry one.
pub fn status_in(headers: &http::HeaderMap) -> Option<(Code, Option<String>)> {
    headers.get("grpc-status")?;
    let status = tonic::Status::from_header_map(headers)?;
    Some((status.code(), crate::errors::reason_of(&status)))
}

pin_project_lite::pin_project! {
    /// A response body that tells its [`CallEnd`] the status its trailers carry when it ends
    /// (the end itself, if the headers already carried it).
    pub struct StatusBody<B, E: CallEnd> {
        #[pin]
        inner: B,
        end: EndOnce<E>,
    }
}

impl<B: Body, E: CallEnd> Body for StatusBody<B, E> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = {
            let _scope = this.end.polling_scope();
            this.inner.poll_frame(context)
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some((code, reason)) = frame.trailers_ref().and_then(status_in) {
                    this.end.record(code, reason);
                }
            }
            // The stream broke under the call: what tonic answers as UNAVAILABLE.
            Poll::Ready(Some(Err(_))) => this.end.record(Code::Unavailable, None),
            // gRPC always ends with a status; an answer without one is not a success.
            Poll::Ready(None) => this.end.record(Code::Unknown, None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps a response's body in [`StatusBody`], telling `end` at once a status its headers carry.
pub fn with_status_body<B, E: CallEnd>(
    response: http::Response<B>,
    mut end: EndOnce<E>,
) -> http::Response<StatusBody<B, E>> {
    if let Some((code, reason)) = status_in(response.headers()) {
        end.record(code, reason);
    }
    response.map(|inner| StatusBody { inner, end })
}
