//! Service identities carried in certificates as SPIFFE-style URI SANs
//! (`spiffe://medai/<name>`), and how a server reads its peer's identity.
//!
//! A peer's identity is read from its verified leaf certificate once per connection, not once
//! per call. tonic takes a connection's peer certificates once, when it accepts the connection,
//! into one `Arc<Vec<CertificateDer>>` that every request on that connection carries (in its
//! `TlsConnectInfo`); that allocation therefore stands for the connection, and the identity read
//! from its leaf is kept against it (see [`ConnectionIdentities`]). The identity is still
//! exactly the one the connection's own verified certificate names: the cache never answers
//! for a chain other than the one it read.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use rustls::pki_types::CertificateDer;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

pub const SPIFFE_PREFIX: &str = "spiffe://medai/";

/// The name of a mesh service (or a tool) as its certificate states it. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceIdentity(Arc<str>);

/// The certificates a peer presented on one connection, as tonic hands them to every request.
type PeerChain = Vec<CertificateDer<'static>>;

impl ServiceIdentity {
    pub fn new(name: impl Into<String>) -> Self {
        Self(Arc::from(name.into()))
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    pub fn spiffe_uri(&self) -> String {
        format!("{SPIFFE_PREFIX}{}", self.0)
    }

    /// Reads the identity from a DER certificate's URI SANs.
    pub fn from_certificate_der(der: &[u8]) -> Option<Self> {
        let (_, certificate) = X509Certificate::from_der(der).ok()?;
        let san = certificate.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(SPIFFE_PREFIX).map(Self::new),
            _ => None,
        })
    }

    /// The identity of the peer on a request's TLS connection, if it presented a client
    /// certificate that the server's CA verified. Read once per connection.
    pub fn of_peer<B>(request: &http::Request<B>) -> Option<Self> {
        let info = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()?;
        Self::of_connection(&info.peer_certs()?)
    }

    /// The same, for a request a tonic handler holds.
    pub fn of_grpc_peer<T>(request: &tonic::Request<T>) -> Option<Self> {
        Self::of_connection(&request.peer_certs()?)
    }

    /// The identity the leaf of a connection's verified chain names, read on the connection's
    /// first call and kept for the others.
    fn of_connection(chain: &Arc<PeerChain>) -> Option<Self> {
        CONNECTIONS.identity_of(chain)
    }
}

impl fmt::Display for ServiceIdentity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

static CONNECTIONS: ConnectionIdentities = ConnectionIdentities::new();

/// Identities already read, keyed by the address of the connection's certificate chain
/// allocation. Each entry holds a [`Weak`] to that allocation, which keeps the allocation (not
/// the certificates) from being freed, so no other connection's chain can be given the same
/// address while the entry exists: an address found here is the same connection's chain.
/// Entries of closed connections (no strong reference left) are dropped as the map grows.
struct ConnectionIdentities {
    state: Mutex<Entries>,
}

struct Entries {
    by_chain: BTreeMap<usize, Entry>,
    /// The size at which closed connections' entries are next swept out.
    sweep_at: usize,
}

struct Entry {
    chain: Weak<PeerChain>,
    identity: Option<ServiceIdentity>,
}

/// Below this many entries closed connections are not swept out.
const MIN_SWEEP: usize = 64;

impl ConnectionIdentities {
    const fn new() -> Self {
        Self {
            state: Mutex::new(Entries {
                by_chain: BTreeMap::new(),
                sweep_at: MIN_SWEEP,
            }),
        }
    }

    fn identity_of(&self, chain: &Arc<PeerChain>) -> Option<ServiceIdentity> {
        let key = Arc::as_ptr(chain).addr();
        if let Some(entry) = self.lock().by_chain.get(&key) {
            debug_assert!(std::ptr::eq(entry.chain.as_ptr(), Arc::as_ptr(chain)));
            return entry.identity.clone();
        }
        // Parsed outside the lock; two first calls on one connection may both parse, the
        // same certificate giving the same identity.
        let identity = chain
            .first()
            .and_then(|leaf| ServiceIdentity::from_certificate_der(leaf.as_ref()));
        let mut entries = self.lock();
        if entries.by_chain.len() >= entries.sweep_at {
            entries
                .by_chain
                .retain(|_, entry| entry.chain.strong_count() > 0);
            let open = entries.by_chain.len();
            entries.sweep_at = (open * 2).max(MIN_SWEEP);
        }
        entries.by_chain.insert(
            key,
            Entry {
                chain: Arc::downgrade(chain),
                identity: identity.clone(),
            },
        );
        identity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn holds(&self, chain: &Arc<PeerChain>) -> bool {
        self.lock()
            .by_chain
            .contains_key(&Arc::as_ptr(chain).addr())
    }
}

#[cfg(test)]
mod tests;
