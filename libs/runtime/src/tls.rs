//! mTLS for every hop: server configs that demand (or, at the gateway, accept) client
//! certificates from the mesh CA, and client channels that present the service's own
//! certificate and check that the server is the service they meant to reach.
//!
//! Certificates rotate without a restart. cert-manager renews a Certificate into its Secret and
//! the kubelet swaps the mounted files (a `..data` symlink replaced in one rename), so the
//! material is re-read from the files every few seconds ([`TlsMaterial::watch_files`], started
//! by [`crate::server::mesh_server`]). A change builds a new rustls server and client
//! configuration from the certificate, key and trust bundle read together; every new
//! connection, accepted or dialled, takes the current one, and connections already open keep
//! theirs. A replacement that does not hold together (unreadable, a key that is not the
//! certificate's, a certificate the trust bundle does not sign or that has expired, another
//! identity) is refused: the old material keeps serving, the refusal is logged and counted in
//! `medai_tls_reload_failures_total`, once per bad set of files.
//!
//! tonic's own TLS (`ServerTlsConfig`, `ClientTlsConfig`) is built once, so servers accept
//! over [`TlsMaterial::incoming`] (a tokio-rustls acceptor whose streams carry the peer's
//! certificates to the handlers as `TlsConnectInfo`, as tonic's would) and channels dial
//! through a connector that does the handshake itself.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::balance::{BalancedChannel, Resolve, SystemResolver};
use crate::connections::{BoundedListener, ConnectionLimits, ConnectionSlots, HeldConnection};
use crate::identity::ServiceIdentity;

/// How often services look at their certificate files. cert-manager renews well before expiry
/// (a third of the lifetime by default), so seconds of delay cost nothing.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// A client that has not finished its handshake by then is dropped, so slow or silent
/// connections cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const ACCEPT_QUEUE: usize = 128;
/// A torn read (the kubelet swapping the files between two reads) is read again this often
/// before the files are judged.
const TORN_READ_ATTEMPTS: usize = 3;

/// PEM files of one service: the CA that signs every mesh certificate, and the service's own
/// certificate and key.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid TLS material: {0}")]
    Invalid(String),
    #[error("invalid endpoint {endpoint}: {reason}")]
    Endpoint { endpoint: String, reason: String },
}

/// Whether a server demands a client certificate (every internal service) or only accepts
/// one (the gateway, where PACS clients may use mTLS and people use tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCertificates {
    Required,
    Optional,
}

/// What a look at the files found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The files hold what is served (or what was already refused).
    Unchanged,
    /// New material is served to new connections; `serial` is the new certificate's.
    Reloaded { serial: String },
    /// The files changed but were refused; the old material keeps serving.
    Refused { reason: String },
}

/// The TLS material of one service, re-read from its files when they change. Clones share it.
#[derive(Clone)]
pub struct TlsMaterial {
    shared: Arc<Shared>,
}

struct Shared {
    /// `None` for material built from PEM in memory, which never changes.
    files: Option<TlsFiles>,
    current: RwLock<Arc<LoadedTls>>,
    /// The last refused state of the files, so one bad rotation is reported once.
    refused: Mutex<Option<RefusedFiles>>,
    watching: AtomicBool,
}

#[derive(Clone, PartialEq, Eq)]
enum RefusedFiles {
    Contents(FileContents),
    Unreadable(String),
}

#[derive(Clone, PartialEq, Eq)]
struct FileContents {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// One consistent set of material and the configurations built from it.
struct LoadedTls {
    contents: FileContents,
    identity: Option<ServiceIdentity>,
    serial: String,
    server_required: Arc<ServerConfig>,
    server_optional: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(reason: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid(reason.to_string())
}

impl LoadedTls {
    fn build(contents: FileContents) -> Result<Self, TlsError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(&contents.ca) {
            let certificate = certificate.map_err(|error| invalid(format!("ca_cert: {error}")))?;
            roots
                .add(certificate)
                .map_err(|error| invalid(format!("ca_cert: {error}")))?;
        }
        if roots.is_empty() {
            return Err(invalid("ca_cert holds no certificate"));
        }
        let roots = Arc::new(roots);
        let chain = CertificateDer::pem_slice_iter(&contents.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| invalid(format!("cert: {error}")))?;
        let Some(leaf) = chain.first().cloned() else {
            return Err(invalid("cert holds no certificate"));
        };
        let key = PrivateKeyDer::from_pem_slice(&contents.key)
            .map_err(|error| invalid(format!("key: {error}")))?;
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
            .map_err(|error| invalid(format!("the key is not the certificate's: {error}")))?;

        let verifier = |optional: bool| {
            let builder =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
            let builder = if optional {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            builder
                .build()
                .map_err(|error| invalid(format!("ca_cert: {error}")))
        };
        let required = verifier(false)?;
        // The trust bundle must vouch for the certificate itself, so a half-rotated pair (a new
        // CA with the old leaf or the reverse) is refused rather than served.
        required
            .verify_client_cert(&leaf, &chain[1..], UnixTime::now())
            .map_err(|error| invalid(format!("the CA does not vouch for cert: {error}")))?;
        let server_config = |verifier: Arc<dyn ClientCertVerifier>| {
            let mut config = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(rustls::DEFAULT_VERSIONS)
                .map_err(invalid)?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(invalid)?;
            config.alpn_protocols = vec![b"h2".to_vec()];
            // Every connection makes a full handshake, so a client reconnecting after a
            // rotation sees the new certificate, not a resumed session of the old one.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
            Ok::<_, TlsError>(Arc::new(config))
        };
        let server_required = server_config(required)?;
        let server_optional = server_config(verifier(true)?)?;
        let server_verifier: Arc<dyn ServerCertVerifier> =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|error| invalid(format!("ca_cert: {error}")))?;
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(invalid)?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(chain, key)
            .map_err(invalid)?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        client.resumption = rustls::client::Resumption::disabled();

        Ok(Self {
            identity: ServiceIdentity::from_certificate_der(leaf.as_ref()),
            serial: certificate_serial(leaf.as_ref()).unwrap_or_default(),
            contents,
            server_required,
            server_optional,
            client: Arc::new(client),
        })
    }
}

/// The serial number of a DER certificate, as colon-separated hex.
pub fn certificate_serial(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, certificate) = X509Certificate::from_der(der).ok()?;
    Some(certificate.raw_serial_as_string())
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.clone(),
        source,
    })
}

fn read_files(files: &TlsFiles) -> Result<FileContents, TlsError> {
    Ok(FileContents {
        ca: read_file(&files.ca_cert)?,
        cert: read_file(&files.cert)?,
        key: read_file(&files.key)?,
    })
}

/// Reads and builds the material, reading again when the files changed between two reads
/// (the kubelet swaps the whole folder at once, but three reads may straddle the swap).
fn read_consistent(files: &TlsFiles) -> Result<LoadedTls, (TlsError, Option<FileContents>)> {
    let mut contents = read_files(files).map_err(|error| (error, None))?;
    let mut attempt = 1;
    loop {
        match LoadedTls::build(contents.clone()) {
            Ok(loaded) => return Ok(loaded),
            Err(error) => {
                let again = read_files(files).map_err(|error| (error, None))?;
                if again == contents || attempt >= TORN_READ_ATTEMPTS {
                    return Err((error, Some(contents)));
                }
                contents = again;
                attempt += 1;
            }
        }
    }
}

impl TlsMaterial {
    /// Reads the files; refuses material that does not hold together.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let loaded = read_consistent(files).map_err(|(error, _)| error)?;
        Ok(Self::new(Some(files.clone()), loaded))
    }

    /// Material from PEM in memory; it is never reloaded.
    pub fn from_pem(
        ca_pem: Vec<u8>,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> Result<Self, TlsError> {
        let loaded = LoadedTls::build(FileContents {
            ca: ca_pem,
            cert: cert_pem,
            key: key_pem,
        })?;
        Ok(Self::new(None, loaded))
    }

    fn new(files: Option<TlsFiles>, loaded: LoadedTls) -> Self {
        crate::certificate_expiry::record(&loaded.contents.cert, &loaded.contents.ca);
        Self {
            shared: Arc::new(Shared {
                files,
                current: RwLock::new(Arc::new(loaded)),
                refused: Mutex::new(None),
                watching: AtomicBool::new(false),
            }),
        }
    }

    fn current(&self) -> Arc<LoadedTls> {
        self.shared
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The serial number of the certificate new connections present.
    pub fn serial(&self) -> String {
        self.current().serial.clone()
    }

    /// The rustls configuration a new server-side connection gets now.
    pub fn server_config(&self, client_certificates: ClientCertificates) -> Arc<ServerConfig> {
        let current = self.current();
        match client_certificates {
            ClientCertificates::Required => current.server_required.clone(),
            ClientCertificates::Optional => current.server_optional.clone(),
        }
    }

    /// The rustls configuration a new client-side connection gets now (it checks the server's
    /// certificate against the mesh CA and presents this service's certificate).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// Looks at the files once and takes them if they changed and hold together.
    pub fn reload_if_changed(&self) -> ReloadOutcome {
        let Some(files) = &self.shared.files else {
            return ReloadOutcome::Unchanged;
        };
        let current = self.current();
        let (error, refused_contents) = match read_files(files) {
            Ok(contents) if contents == current.contents => {
                self.forget_refusal();
                return ReloadOutcome::Unchanged;
            }
            Ok(_) => match read_consistent(files) {
                Ok(loaded) if loaded.identity == current.identity || current.identity.is_none() => {
                    return self.take(loaded);
                }
                Ok(loaded) => {
                    let named = loaded
                        .identity
                        .as_ref()
                        .map_or_else(|| "no identity".to_owned(), ToString::to_string);
                    let expected = current
                        .identity
                        .as_ref()
                        .map_or_else(String::new, ToString::to_string);
                    (
                        invalid(format!("the new certificate names {named}, not {expected}")),
                        Some(loaded.contents),
                    )
                }
                Err((error, contents)) => (error, contents),
            },
            Err(error) => (error, None),
        };
        let reason = error.to_string();
        let state = match refused_contents {
            Some(contents) => RefusedFiles::Contents(contents),
            None => RefusedFiles::Unreadable(reason.clone()),
        };
        let mut last = self
            .shared
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.as_ref() == Some(&state) {
            return ReloadOutcome::Unchanged;
        }
        *last = Some(state);
        tracing::warn!(
            error = %reason,
            serial = %current.serial,
            "refused the rotated TLS material; the current certificate keeps serving"
        );
        metrics::counter!("medai_tls_reload_failures_total").increment(1);
        ReloadOutcome::Refused { reason }
    }

    fn forget_refusal(&self) {
        *self
            .shared
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn take(&self, loaded: LoadedTls) -> ReloadOutcome {
        crate::certificate_expiry::record(&loaded.contents.cert, &loaded.contents.ca);
        let serial = loaded.serial.clone();
        let previous = std::mem::replace(
            &mut *self
                .shared
                .current
                .write()
                .unwrap_or_else(PoisonError::into_inner),
            Arc::new(loaded),
        );
        self.forget_refusal();
        tracing::info!(
            serial = %serial,
            previous_serial = %previous.serial,
            "reloaded the rotated TLS material; new connections present the new certificate"
        );
        metrics::counter!("medai_tls_reloads_total").increment(1);
        ReloadOutcome::Reloaded { serial }
    }

    /// Looks at the files every `interval` from a background task, as long as any clone of
    /// this material lives. Only the first call starts one; material from PEM has no files to
    /// watch. Call inside a tokio runtime.
    pub fn watch_files(&self, interval: Duration) {
        if self.shared.files.is_none() || self.shared.watching.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.shared.watching.store(false, Ordering::SeqCst);
            tracing::warn!("no async runtime: TLS files are not watched for rotation");
            return;
        };
        let shared: Weak<Shared> = Arc::downgrade(&self.shared);
        runtime.spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let material = TlsMaterial { shared };
                // Three small files; reading them off the async threads is not worth a hop.
                material.reload_if_changed();
            }
        });
    }

    /// The connections of a handed-in listener, each after a TLS handshake with the material
    /// current when it arrived; Nagle's algorithm off (without it a response's HEADERS, DATA
    /// and trailer frames wait on the peer's delayed ACK). Handshakes run concurrently, so a
    /// slow client holds up no one; a failed one is dropped. At most `limits.max_open` are open
    /// at once, handshakes included, and one that sends nothing for the idle time is closed (see
    /// [`crate::connections`]). The streams carry the peer's certificates, which tonic hands to
    /// handlers as `TlsConnectInfo`.
    pub fn incoming(
        &self,
        listener: TcpListener,
        client_certificates: ClientCertificates,
        limits: &ConnectionLimits,
    ) -> MeshIncoming {
        let (sender, receiver) = mpsc::channel(ACCEPT_QUEUE);
        let material = self.clone();
        // Places are taken before any TLS work, so a flood of connections costs a close each.
        let mut listener = BoundedListener::new(
            listener,
            ConnectionSlots::new(limits, crate::connections::GRPC),
        );
        tokio::spawn(async move {
            loop {
                let (stream, slot, _) = tokio::select! {
                    accepted = listener.accept_with_slot() => accepted,
                    () = sender.closed() => return,
                };
                let _ = stream.set_nodelay(true);
                let acceptor =
                    tokio_rustls::TlsAcceptor::from(material.server_config(client_certificates));
                let sender = sender.clone();
                let slots = listener.slots().clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(connection)) => {
                            let _ = sender.send(Ok(slots.hold(connection, slot))).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(error = %error, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(receiver)
    }

    /// A lazily connecting channel to `endpoint` (for example `https://127.0.0.1:50051`)
    /// that only accepts a server certificate naming `expected_server`. Each connection it
    /// opens presents the certificate current at that moment.
    pub fn channel(
        &self,
        endpoint: &str,
        expected_server: &ServiceIdentity,
    ) -> Result<Channel, TlsError> {
        let (endpoint, server_name) = self.endpoint(endpoint, expected_server)?;
        Ok(endpoint.connect_with_connector_lazy(MeshConnector {
            material: self.clone(),
            server_name,
        }))
    }

    /// The tonic endpoint for `endpoint` (TLS left to the connector) and the server name its
    /// certificate must carry.
    fn endpoint(
        &self,
        endpoint: &str,
        expected_server: &ServiceIdentity,
    ) -> Result<(Endpoint, ServerName<'static>), TlsError> {
        let invalid_endpoint = |reason: String| TlsError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let server_name = ServerName::try_from(server_dns_name(expected_server))
            .map_err(|error| invalid_endpoint(error.to_string()))?;
        // The connector does TLS itself; tonic must not look for its own TLS on `https`.
        let plain = match endpoint.strip_prefix("https://") {
            Some(rest) => format!("http://{rest}"),
            None => endpoint.to_owned(),
        };
        let endpoint = Endpoint::from_shared(plain)
            .map_err(|error| invalid_endpoint(error.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .max_frame_size(crate::server::MAX_FRAME_BYTES)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        Ok((endpoint, server_name))
    }

    /// What services use for their calls to other services: a [`BalancedChannel`] over every
    /// address the endpoint's name resolves to (the system resolver, again every
    /// [`crate::balance::RESOLVE_INTERVAL`]), each connection checked as [`Self::channel`]'s, with
    /// a CLIENT span around every call (see [`crate::rpc_trace`]) over the `grpc_client_*`
    /// metrics. Call inside a tokio runtime.
    pub fn mesh_channel(
        &self,
        endpoint: &str,
        expected_server: &ServiceIdentity,
    ) -> Result<crate::rpc_trace::MeshChannel, TlsError> {
        self.mesh_channel_resolved_by(
            endpoint,
            expected_server,
            Arc::new(SystemResolver),
            crate::balance::RESOLVE_INTERVAL,
        )
    }

    /// [`Self::mesh_channel`] with the name resolved by `resolver` every `interval`: tests stand
    /// in for a headless Service's DNS with it (production resolves through the system).
    pub fn mesh_channel_resolved_by(
        &self,
        endpoint: &str,
        expected_server: &ServiceIdentity,
        resolver: Arc<dyn Resolve>,
        interval: Duration,
    ) -> Result<crate::rpc_trace::MeshChannel, TlsError> {
        let channel = self.balanced_channel(endpoint, expected_server, resolver, interval)?;
        Ok(crate::rpc_trace::traced_channel(channel, endpoint))
    }

    /// A [`BalancedChannel`] to every address of `endpoint`'s name, accepting only servers
    /// whose certificate names `expected_server`.
    pub fn balanced_channel(
        &self,
        endpoint: &str,
        expected_server: &ServiceIdentity,
        resolver: Arc<dyn Resolve>,
        interval: Duration,
    ) -> Result<BalancedChannel, TlsError> {
        let (endpoint, server_name) = self.endpoint(endpoint, expected_server)?;
        Ok(BalancedChannel::new(
            self.clone(),
            server_name,
            endpoint,
            resolver,
            interval,
        ))
    }
}

/// What [`TlsMaterial::incoming`] yields.
pub type MeshIncoming = ReceiverStream<
    Result<HeldConnection<tokio_rustls::server::TlsStream<TcpStream>>, std::io::Error>,
>;

/// Dials a mesh server and makes the TLS handshake with the material current at that moment.
#[derive(Clone)]
struct MeshConnector {
    material: TlsMaterial,
    server_name: ServerName<'static>,
}

type MeshConnection = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<http::Uri> for MeshConnector {
    type Response = MeshConnection;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<MeshConnection, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.material.client_config());
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .map(|host| {
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned()
                })
                .ok_or_else(|| std::io::Error::other("endpoint without a host"))?;
            let port = uri.port_u16().unwrap_or(443);
            let stream = TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            let connection = connector.connect(server_name, stream).await?;
            Ok(TokioIo::new(connection))
        })
    }
}

/// The DNS name every certificate of a mesh service carries, so a client can insist that the
/// server it reached is the service it meant (`medai-audit` for the audit service).
pub fn server_dns_name(service: &ServiceIdentity) -> String {
    format!("medai-{}", service.name())
}
