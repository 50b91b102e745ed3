//! Replicas of one service behind one name, as a headless Service gives them: real mesh servers
//! (the production acceptor, mTLS and layers) on 127.0.0.1, 127.0.0.2 and 127.0.0.3 with the
//! same port, each in a runtime of its own so that killing one closes its connections as a
//! killed pod's would. The name resolves through a resolver the test controls, standing in for
//! the cluster DNS (production resolves through the system, see `SystemResolver`).

// The figures (calls per replica) are printed for the report.
#![allow(clippy::print_stdout)]
// Built into the certificate_rotation test binary (one binary per test file costs CI time).

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tonic::server::NamedService;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::Service;

use medai_runtime::ServiceIdentity;
use medai_runtime::balance::Resolve;
use medai_runtime::connections::ConnectionLimits;
use medai_runtime::peer_policy::PeerPolicy;
use medai_runtime::rpc_trace::MeshChannel;
use medai_runtime::server::{incoming, mesh_server};
use medai_runtime::tls::{ClientCertificates, TlsMaterial};

const WHICH: &str = "/medai.test.v1.Replica/Which";
/// Re-resolution in the test (production: every 5 s).
const RESOLVE_EVERY: Duration = Duration::from_millis(100);
const DEADLINE: Duration = Duration::from_secs(30);

/// Answers `Which` with its replica number and counts the calls it served.
#[derive(Clone)]
struct ReplicaService {
    number: i32,
    calls: Arc<AtomicUsize>,
}

impl NamedService for ReplicaService {
    const NAME: &'static str = "medai.test.v1.Replica";
}

struct Which(i32);

impl tonic::server::UnaryService<HealthCheckRequest> for Which {
    type Response = HealthCheckResponse;
    type Future = BoxFuture<'static, Result<tonic::Response<HealthCheckResponse>, tonic::Status>>;

    fn call(&mut self, _request: tonic::Request<HealthCheckRequest>) -> Self::Future {
        let status = self.0;
        Box::pin(async move { Ok(tonic::Response::new(HealthCheckResponse { status })) })
    }
}

impl Service<http::Request<tonic::body::Body>> for ReplicaService {
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
        self.calls.fetch_add(1, Ordering::SeqCst);
        let number = self.number;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                HealthCheckResponse,
                HealthCheckRequest,
            >::default());
            Ok(grpc.unary(Which(number), request).await)
        })
    }
}

/// A replica served from a thread and runtime of its own; [`RunningReplica::kill`] drops that
/// runtime, which closes the listener and every connection at once.
struct RunningReplica {
    address: SocketAddr,
    calls: Arc<AtomicUsize>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningReplica {
    fn start(number: i32, listener: std::net::TcpListener, tls: TlsMaterial) -> Self {
        let address = listener.local_addr().expect("address");
        let calls = Arc::new(AtomicUsize::new(0));
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let service = ReplicaService {
            number,
            calls: calls.clone(),
        };
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("replica runtime");
            runtime.block_on(async move {
                listener.set_nonblocking(true).expect("non-blocking");
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let server = mesh_server(
                    &tls,
                    PeerPolicy::new().allow(WHICH, &["gateway"]),
                    &ConnectionLimits::default(),
                )
                .expect("mesh server")
                .add_service(service);
                let serving = server.serve_with_incoming(incoming(
                    listener,
                    &tls,
                    ClientCertificates::Required,
                    &ConnectionLimits::default(),
                ));
                tokio::select! {
                    served = serving => served.expect("replica server"),
                    _ = killed => {}
                }
            });
            // Dropping the runtime drops every connection task: the sockets close now.
            drop(runtime);
        });
        Self {
            address,
            calls,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("replica thread");
        }
    }
}

impl Drop for RunningReplica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Listeners on 127.0.0.1, 127.0.0.2 and 127.0.0.3 with one port, as pods of one Service
/// listen on the same port at different addresses. The port is the kernel's pick for the first
/// address; another pick is tried if it is taken on the others.
fn listeners_on_one_port() -> Vec<std::net::TcpListener> {
    for _ in 0..20 {
        let first = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = first.local_addr().expect("address").port();
        let others: Result<Vec<_>, _> = [2u8, 3]
            .iter()
            .map(|last| {
                std::net::TcpListener::bind(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(127, 0, 0, *last)),
                    port,
                ))
            })
            .collect();
        if let Ok(others) = others {
            let mut all = vec![first];
            all.extend(others);
            return all;
        }
    }
    panic!("no port free on 127.0.0.1, 127.0.0.2 and 127.0.0.3 at once");
}

/// The cluster DNS of the test: the name answers what the test sets.
#[derive(Clone, Default)]
struct TestDns {
    addresses: Arc<Mutex<Vec<SocketAddr>>>,
    lookups: Arc<AtomicUsize>,
}

impl TestDns {
    fn set(&self, addresses: &[SocketAddr]) {
        *self.addresses.lock().expect("dns") = addresses.to_vec();
    }

    fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }
}

impl Resolve for TestDns {
    fn resolve(
        &self,
        host: &str,
        _port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        assert_eq!(host, "medai-validation-headless", "the name resolved");
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let addresses = self.addresses.lock().expect("dns").clone();
        Box::pin(async move { Ok(addresses) })
    }
}

/// One `Which` call; the replica number that answered.
async fn which(channel: MeshChannel) -> Result<i32, tonic::Status> {
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
            http::uri::PathAndQuery::from_static(WHICH),
            codec,
        )
        .await?;
    Ok(answer.into_inner().status)
}

/// Calls made by `callers` concurrent callers, `per_caller` each: (answers per replica
/// number, failed calls).
async fn call_many(channel: &MeshChannel, callers: usize, per_caller: usize) -> (Vec<i32>, usize) {
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let channel = channel.clone();
            tokio::spawn(async move {
                let mut answered = Vec::new();
                let mut failed = 0;
                for _ in 0..per_caller {
                    match which(channel.clone()).await {
                        Ok(number) => answered.push(number),
                        Err(status) => {
                            println!("call failed: {status}");
                            failed += 1;
                        }
                    }
                }
                (answered, failed)
            })
        })
        .collect();
    let mut answered = Vec::new();
    let mut failed = 0;
    for task in tasks {
        let (some, failures) = task.await.expect("caller");
        answered.extend(some);
        failed += failures;
    }
    (answered, failed)
}

fn share(answered: &[i32], number: i32) -> usize {
    answered.iter().filter(|answer| **answer == number).count()
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_across_replicas_and_a_killed_replica_fails_no_call_after_resolution() {
    let pki = medai_testkit::TestPki::new();
    let mut listeners = listeners_on_one_port().into_iter();
    let mut first =
        RunningReplica::start(1, listeners.next().expect("1"), pki.material("validation"));
    let mut second =
        RunningReplica::start(2, listeners.next().expect("2"), pki.material("validation"));
    let third_listener = listeners.next().expect("3");
    let port = first.address.port();

    let dns = TestDns::default();
    dns.set(&[first.address, second.address]);
    let client = pki.material("gateway");
    let balanced = client
        .balanced_channel(
            &format!("https://medai-validation-headless:{port}"),
            &ServiceIdentity::new("validation"),
            Arc::new(dns.clone()),
            RESOLVE_EVERY,
        )
        .expect("balanced channel");
    let channel: MeshChannel = tower::Layer::layer(
        &medai_runtime::rpc_trace::RpcClientTraceLayer::new("https://medai-validation-headless"),
        medai_runtime::grpc_client_metrics::GrpcClientMetrics::new(
            medai_runtime::unprocessed::RetryNeverProcessed::new(balanced.clone()),
        ),
    );

    // 200 calls from 4 callers over one channel: both replicas take a fair share.
    let (answered, failed) = call_many(&channel, 4, 50).await;
    println!(
        "spread: 200 calls, replica 127.0.0.1 served {} (answered {}), replica 127.0.0.2 served {} (answered {}), failed {failed}",
        first.calls(),
        share(&answered, 1),
        second.calls(),
        share(&answered, 2),
    );
    assert_eq!(failed, 0, "no call fails");
    assert_eq!(answered.len(), 200);
    for (replica, number) in [(&first, 1), (&second, 2)] {
        assert_eq!(
            replica.calls(),
            share(&answered, number),
            "each call served once"
        );
        assert!(
            replica.calls() >= 60,
            "replica {number} served {} of 200 calls, under 30 %",
            replica.calls()
        );
    }

    // Replica 2 is killed while callers keep calling; DNS still names it until the next
    // resolution after the test drops it, as the endpoints of a crashed pod linger.
    let before_kill = first.calls();
    let running = {
        let channel = channel.clone();
        tokio::spawn(async move { call_many(&channel, 4, 50).await })
    };
    wait_until("calls flow again", || first.calls() >= before_kill + 20).await;
    second.kill();
    let (answered_across_kill, failed_across_kill) = running.await.expect("callers");
    println!(
        "kill: 200 calls across the kill of 127.0.0.2 (calls in flight at the kill may fail): {} answered, {failed_across_kill} failed",
        answered_across_kill.len()
    );
    assert!(
        failed_across_kill <= 4,
        "only the calls in flight on the killed replica may fail, not {failed_across_kill}"
    );
    dns.set(&[first.address]);
    let lookups = dns.lookups();
    wait_until("the name is resolved again", || {
        dns.lookups() >= lookups + 2
    })
    .await;
    assert_eq!(balanced.usable_addresses(), vec![first.address]);
    let served_before = first.calls();
    let (answered, failed) = call_many(&channel, 4, 50).await;
    println!(
        "after re-resolution: 200 calls, replica 127.0.0.1 served {}, failed {failed}",
        first.calls() - served_before
    );
    assert_eq!(failed, 0, "no call fails once the killed replica left DNS");
    assert_eq!(share(&answered, 1), 200);

    // A new replica joins DNS: it takes calls from the next resolution on.
    let third = RunningReplica::start(3, third_listener, pki.material("validation"));
    dns.set(&[first.address, third.address]);
    wait_until("the new replica is known", || {
        balanced.usable_addresses().contains(&third.address)
    })
    .await;
    let served_before = first.calls();
    let (answered, failed) = call_many(&channel, 4, 50).await;
    println!(
        "new replica: 200 calls, replica 127.0.0.1 served {}, replica 127.0.0.3 served {}, failed {failed}",
        first.calls() - served_before,
        third.calls()
    );
    assert_eq!(failed, 0);
    assert!(
        third.calls() >= 60,
        "the new replica served {} of 200",
        third.calls()
    );
    assert_eq!(third.calls(), share(&answered, 3));
    first.kill();
}

/// A name with one address (`localhost` through the system resolver) and an IP literal work
/// as one channel did, and a call while the only replica is down fails at once (UNAVAILABLE)
/// rather than waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_names_and_ip_literals_behave_as_one_channel() {
    let pki = medai_testkit::TestPki::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut replica = RunningReplica::start(1, listener, pki.material("validation"));
    let port = replica.address.port();
    let client = pki.material("gateway");
    let expected = ServiceIdentity::new("validation");
    for endpoint in [
        format!("https://localhost:{port}"),
        format!("https://127.0.0.1:{port}"),
    ] {
        let channel = client.mesh_channel(&endpoint, &expected).expect("channel");
        for _ in 0..3 {
            assert_eq!(
                which(channel.clone()).await.expect("a call"),
                1,
                "{endpoint}"
            );
        }
    }
    let channel = client
        .mesh_channel(&format!("https://127.0.0.1:{port}"), &expected)
        .expect("channel");
    replica.kill();
    let started = Instant::now();
    let status = which(channel).await.expect_err("no server");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
