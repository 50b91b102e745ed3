//! The caller's deadline, read from the `grpc-timeout` header, so every downstream call can be
//! given only the time that is left.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// The instant by which the caller wants an answer, if it said.
pub fn caller_deadline(metadata: &MetadataMap, received_at: Instant) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value).map(|timeout| received_at + timeout)
}

/// Parses the gRPC wire format: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    match unit {
        "H" => Some(Duration::from_secs(amount.checked_mul(3600)?)),
        "M" => Some(Duration::from_secs(amount.checked_mul(60)?)),
        "S" => Some(Duration::from_secs(amount)),
        "m" => Some(Duration::from_millis(amount)),
        "u" => Some(Duration::from_micros(amount)),
        "n" => Some(Duration::from_nanos(amount)),
        _ => None,
    }
}

/// How much earlier than the caller's deadline this layer answers, so the answer reaches the
/// caller before its own timer fires (tonic clients report their own expiry as CANCELLED
/// "Timeout expired") even when the machine is busy: a fifth of the timeout, between 5 and
/// 50 ms.
fn answer_margin(timeout: Duration) -> Duration {
    (timeout / 5).clamp(Duration::from_millis(5), Duration::from_millis(50))
}

/// Answers DEADLINE_EXCEEDED (reason DEADLINE_EXCEEDED) when the caller's `grpc-timeout`
/// passes, dropping the handler's work so no downstream effect happens after it.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct DeadlineService<S> {
    inner: S,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for DeadlineService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use futures::FutureExt;
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let timeout = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout);
        async move {
            let Some(timeout) = timeout else {
                return inner.call(request).await;
            };
            match tokio::time::timeout(
                timeout.saturating_sub(answer_margin(timeout)),
                inner.call(request),
            )
            .await
            {
                Ok(response) => response,
                Err(_) => {
                    metrics::counter!("medai_grpc_deadline_exceeded_total").increment(1);
                    let status = crate::errors::status_with_reason(
                        crate::errors::ErrorKind::DeadlineExceeded,
                        "medai.runtime",
                        "DEADLINE_EXCEEDED",
                        "the caller's deadline passed before an answer was ready",
                    );
                    Ok(crate::errors::refusal_response(status))
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_refuses_garbage() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10u"), Some(Duration::from_micros(10)));
        assert_eq!(parse_grpc_timeout("10n"), Some(Duration::from_nanos(10)));
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
