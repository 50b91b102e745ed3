//! A rolling restart seen from one HTTP/2 connection (issue 13): callers call through a
//! Service address (a TCP forwarder that sends each new connection to the current pod, as
//! kube-proxy does) while the pod they are connected to is replaced and drains the way every
//! mesh server drains (tonic's graceful shutdown: GOAWAY, finish the streams it accepted,
//! close). Real mesh servers (production acceptor, mTLS, layers), each in a runtime of its own.
//!
//! What must hold: a pod's handler runs a call exactly when its answer reaches the caller
//! (nothing accepted is dropped), and every attempt that fails on the way was provably never
//! processed (`medai_runtime::unprocessed`), so the mesh channel's layer that sends those again
//! (`RetryNeverProcessed`) loses no call and runs none twice. Each attempt carries its own id, so
//! the test knows for every failed attempt whether a pod's service was called for its stream
//! and whether its handler ran.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tonic::server::NamedService;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::Service;

use medai_runtime::ServiceIdentity;
use medai_runtime::connections::ConnectionLimits;
use medai_runtime::peer_policy::PeerPolicy;
use medai_runtime::server::{incoming, mesh_server};
use medai_runtime::tls::{ClientCertificates, TlsMaterial};
use medai_runtime::unprocessed::{
    RetryNeverProcessed, error_chain, error_never_processed, transport_error_chain,
};

const COUNT: &str = "/medai.test.v1.Counted/Count";
/// Pods replaced one after the other while the callers call.
const ROLLS: usize = 12;
const CALLERS: usize = 8;
const DEADLINE: Duration = Duration::from_secs(30);

/// The header that names one attempt (`caller-call-attempt`), set below the layer that sends a
/// call again: the pod reads it when a stream reaches its service and when its handler runs.
const ATTEMPT_HEADER: &str = "x-medai-attempt";
/// The header that names one call (`caller-call`), the same for every attempt of it.
const CALL_HEADER: &str = "x-medai-call";

/// What the pods did, by attempt id, across all pods.
#[derive(Default)]
struct PodRecords {
    /// Streams routed to the pods' gRPC service (HEADERS accepted and dispatched): the server's
    /// layers ran for them.
    dispatched: Mutex<HashMap<String, usize>>,
    /// Attempts whose handler ran on the decoded request message: the call was processed.
    handled: Mutex<HashMap<String, usize>>,
    /// For streams dispatched whose handler never ran: the status the pod answered them with.
    unhandled: Mutex<HashMap<String, String>>,
}

/// Records every stream it is called for and every request its handler runs on.
#[derive(Clone)]
struct CountedService {
    records: Arc<PodRecords>,
}

impl NamedService for CountedService {
    const NAME: &'static str = "medai.test.v1.Counted";
}

struct Answer {
    records: Arc<PodRecords>,
}

impl tonic::server::UnaryService<HealthCheckRequest> for Answer {
    type Response = HealthCheckResponse;
    type Future = BoxFuture<'static, Result<tonic::Response<HealthCheckResponse>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<HealthCheckRequest>) -> Self::Future {
        *self
            .records
            .handled
            .lock()
            .expect("handled")
            .entry(
                request
                    .metadata()
                    .get(ATTEMPT_HEADER)
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default() += 1;
        Box::pin(async move { Ok(tonic::Response::new(HealthCheckResponse { status: 1 })) })
    }
}

impl Service<http::Request<tonic::body::Body>> for CountedService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let attempt = request
            .headers()
            .get(ATTEMPT_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        *self
            .records
            .dispatched
            .lock()
            .expect("dispatched")
            .entry(attempt.clone())
            .or_default() += 1;
        let records = self.records.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                HealthCheckResponse,
                HealthCheckRequest,
            >::default());
            let response = grpc
                .unary(
                    Answer {
                        records: records.clone(),
                    },
                    request,
                )
                .await;
            if !records
                .handled
                .lock()
                .expect("handled")
                .contains_key(&attempt)
            {
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                records.unhandled.lock().expect("unhandled").insert(
                    attempt,
                    format!(
                        "grpc-status {} {}",
                        header("grpc-status"),
                        header("grpc-message")
                    ),
                );
            }
            Ok(response)
        })
    }
}

/// One pod: a mesh server in a thread and runtime of its own, stopped by
/// [`Pod::drain`] through the graceful shutdown every service uses.
struct Pod {
    address: SocketAddr,
    drain: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pod {
    fn start(tls: TlsMaterial, records: Arc<PodRecords>) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let (drain, drained) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("pod runtime");
            runtime.block_on(async move {
                listener.set_nonblocking(true).expect("non-blocking");
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                mesh_server(
                    &tls,
                    PeerPolicy::new().allow(COUNT, &["gateway"]),
                    &ConnectionLimits::default(),
                )
                .expect("mesh server")
                .add_service(CountedService { records })
                .serve_with_incoming_shutdown(
                    incoming(
                        listener,
                        &tls,
                        ClientCertificates::Required,
                        &ConnectionLimits::default(),
                    ),
                    async {
                        let _ = drained.await;
                    },
                )
                .await
                .expect("pod server");
            });
        });
        Self {
            address,
            drain: Some(drain),
            thread: Some(thread),
        }
    }

    /// SIGTERM's end of the drain: stop accepting, GOAWAY, finish the accepted calls, return.
    fn drain(&mut self) {
        if let Some(drain) = self.drain.take() {
            let _ = drain.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("pod thread");
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.drain();
    }
}

/// The Service address: each new connection goes to the pod named now; established
/// connections stay where they are (kube-proxy does not move or cut them).
async fn start_service_address(target: Arc<Mutex<SocketAddr>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the Service address");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let pod = *target.lock().expect("target");
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(pod).await {
                    let _ = outbound.set_nodelay(true);
                    let _ = inbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    address
}

/// Below the layer under test: names each attempt of a call and records how it ended.
#[derive(Clone)]
struct AttemptRecorder {
    channel: tonic::transport::Channel,
    outcomes: Arc<Outcomes>,
}

type ChannelError = <tonic::transport::Channel as Service<http::Request<tonic::body::Body>>>::Error;

impl Service<http::Request<tonic::body::Body>> for AttemptRecorder {
    type Response = http::Response<tonic::body::Body>;
    type Error = ChannelError;
    type Future = BoxFuture<'static, Result<Self::Response, ChannelError>>;

    fn poll_ready(
        &mut self,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ChannelError>> {
        self.channel.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let call = request
            .headers()
            .get(CALL_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let attempt = {
            let mut attempts = self.outcomes.attempts.lock().expect("attempts");
            let made = attempts.entry(call.clone()).or_default();
            *made += 1;
            format!("{call}-{made}")
        };
        request.headers_mut().insert(
            ATTEMPT_HEADER,
            attempt.parse().expect("an attempt id is ASCII"),
        );
        let sent = self.channel.call(request);
        let outcomes = self.outcomes.clone();
        Box::pin(async move {
            let outcome = sent.await;
            match &outcome {
                Ok(_) => outcomes
                    .answered_attempts
                    .lock()
                    .expect("answered")
                    .push(attempt),
                Err(error) => outcomes.failed_attempts.lock().expect("failed").push((
                    attempt,
                    error_chain(error),
                    error_never_processed(error),
                )),
            }
            outcome
        })
    }
}

async fn count(
    channel: RetryNeverProcessed<AttemptRecorder>,
    call: &str,
) -> Result<i32, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request
        .metadata_mut()
        .insert(CALL_HEADER, call.parse().expect("a call id is ASCII"));
    let answer = grpc
        .unary(request, http::uri::PathAndQuery::from_static(COUNT), codec)
        .await?;
    Ok(answer.into_inner().status)
}

/// What the callers saw over the rolls.
#[derive(Default)]
struct Outcomes {
    answered: AtomicUsize,
    failures: Mutex<Vec<String>>,
    /// Attempts made of each call.
    attempts: Mutex<HashMap<String, usize>>,
    /// Every failed attempt: its id, the transport error that ended it, and whether it was
    /// classed as never processed.
    failed_attempts: Mutex<Vec<(String, String, bool)>>,
    /// Every attempt that got an answer.
    answered_attempts: Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_replaced_under_callers_drop_no_call_and_every_failed_attempt_was_never_processed() {
    let pki = medai_testkit::TestPki::new();
    let records = Arc::new(PodRecords::default());
    let mut pod = Pod::start(pki.material("validation"), records.clone());
    let target = Arc::new(Mutex::new(pod.address));
    let service = start_service_address(target.clone()).await;
    let channel = pki
        .material("gateway")
        .channel(
            &format!("https://{service}"),
            &ServiceIdentity::new("validation"),
        )
        .expect("channel");

    let outcomes = Arc::new(Outcomes::default());
    let channel = RetryNeverProcessed::new(AttemptRecorder {
        channel,
        outcomes: outcomes.clone(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let (channel, outcomes, stop) = (channel.clone(), outcomes.clone(), stop.clone());
            tokio::spawn(async move {
                let mut call = 0_usize;
                while !stop.load(Ordering::SeqCst) {
                    call += 1;
                    match count(channel.clone(), &format!("{caller}-{call}")).await {
                        Ok(_) => {
                            outcomes.answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(status) => outcomes.failures.lock().expect("failures").push(format!(
                            "{status:?}; transport: {}",
                            transport_error_chain(&status)
                        )),
                    }
                }
            })
        })
        .collect();

    let began = Instant::now();
    for _ in 0..ROLLS {
        // maxSurge 1: the new pod is up and takes new connections, then the old one drains.
        let next = Pod::start(pki.material("validation"), records.clone());
        let calls_before = outcomes.answered.load(Ordering::SeqCst);
        while outcomes.answered.load(Ordering::SeqCst) < calls_before + 200 {
            assert!(began.elapsed() < DEADLINE, "the callers stopped calling");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        *target.lock().expect("target") = next.address;
        let mut old = std::mem::replace(&mut pod, next);
        tokio::task::spawn_blocking(move || old.drain())
            .await
            .expect("drain");
    }
    let calls_before = outcomes.answered.load(Ordering::SeqCst);
    while outcomes.answered.load(Ordering::SeqCst) < calls_before + 200 {
        assert!(began.elapsed() < DEADLINE, "the callers stopped calling");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for caller in callers {
        caller.await.expect("caller");
    }
    drop(pod);

    let answered = outcomes.answered.load(Ordering::SeqCst);
    let sent_again = outcomes
        .attempts
        .lock()
        .expect("attempts")
        .values()
        .filter(|made| **made > 1)
        .count();
    let dispatched = records.dispatched.lock().expect("dispatched");
    let handled = records.handled.lock().expect("handled");
    let unhandled = records.unhandled.lock().expect("unhandled");
    let handled_total: usize = handled.values().sum();
    println!(
        "{ROLLS} pods drained under {CALLERS} callers in {:.1} s: {answered} calls answered, \
         {sent_again} calls sent again, {handled_total} attempts \
         handled by the pods, {} streams dispatched to them",
        began.elapsed().as_secs_f64(),
        dispatched.values().sum::<usize>(),
    );
    // Every failed attempt, by its transport error and what the pods did with it.
    let failed_attempts = outcomes.failed_attempts.lock().expect("attempts");
    let mut by_class: BTreeMap<(String, bool, bool, String), usize> = BTreeMap::new();
    for (id, transport_error, _) in failed_attempts.iter() {
        *by_class
            .entry((
                transport_error.clone(),
                dispatched.contains_key(id),
                handled.contains_key(id),
                unhandled.get(id).cloned().unwrap_or_default(),
            ))
            .or_default() += 1;
    }
    for ((transport_error, reached, ran, pod_answer), attempts) in &by_class {
        println!(
            "  {attempts} attempts ended by {transport_error}; reached a pod's service: {reached}, \
             handler ran: {ran} {pod_answer}"
        );
    }
    let failures = outcomes.failures.lock().expect("failures");
    assert!(failures.is_empty(), "calls failed: {failures:?}");
    let resent_yet_handled: Vec<_> = failed_attempts
        .iter()
        .filter(|(id, _, classed_never_processed)| {
            *classed_never_processed && handled.contains_key(id)
        })
        .collect();
    assert!(
        resent_yet_handled.is_empty(),
        "attempts sent again although a pod handled them: {resent_yet_handled:?}"
    );
    let answered_attempts = outcomes.answered_attempts.lock().expect("answered");
    for id in answered_attempts.iter() {
        assert_eq!(
            handled.get(id),
            Some(&1),
            "answered attempt {id} was handled exactly once"
        );
    }
    assert_eq!(
        handled_total, answered,
        "every call a pod handled was answered, and each answered call was handled once"
    );
}
