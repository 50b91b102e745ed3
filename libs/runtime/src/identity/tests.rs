//! The per-connection identity against real TLS handshakes with certificates of a development
//! CA: what a request carries is what tonic's `Connected` gives every call of the connection.

use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;

use super::*;
use crate::tls::{ClientCertificates, TlsMaterial};

type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;
type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

fn authority() -> medai_devpki::DevCertificateAuthority {
    medai_devpki::DevCertificateAuthority::generate("identity test CA")
        .expect("CA")
        .0
}

fn material(ca: &medai_devpki::DevCertificateAuthority, service: &str) -> TlsMaterial {
    let issued = ca.issue(service).expect("certificate");
    TlsMaterial::from_pem(
        ca.certificate_pem().as_bytes().to_vec(),
        issued.certificate_pem.into_bytes(),
        issued.private_key_pem.into_bytes(),
    )
    .expect("material")
}

/// A client that trusts the CA and presents no certificate.
fn anonymous(ca: &medai_devpki::DevCertificateAuthority) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.certificate_pem().as_bytes()).expect("CA PEM"))
        .expect("root");
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// One connection, after a real handshake, to a server that accepts (not demands) client
/// certificates; the server side's connection info is what tonic hands each of its requests.
struct Connection {
    info: TlsConnectInfo<TcpConnectInfo>,
    _streams: (ServerStream, ClientStream),
}

async fn connect(server: &TlsMaterial, client: Arc<rustls::ClientConfig>) -> Connection {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let acceptor =
        tokio_rustls::TlsAcceptor::from(server.server_config(ClientCertificates::Optional));
    let connector = tokio_rustls::TlsConnector::from(client);
    let (accepted, connected) = tokio::join!(
        async {
            let (stream, _) = listener.accept().await.expect("accept");
            acceptor.accept(stream).await.expect("server handshake")
        },
        async {
            let stream = TcpStream::connect(address).await.expect("connect");
            let name = ServerName::try_from("medai-validation").expect("name");
            connector
                .connect(name, stream)
                .await
                .expect("client handshake")
        }
    );
    Connection {
        info: accepted.connect_info(),
        _streams: (accepted, connected),
    }
}

impl Connection {
    /// The identity a layer reads from a call on this connection.
    fn layer_sees(&self) -> Option<ServiceIdentity> {
        let mut request = http::Request::new(());
        request.extensions_mut().insert(self.info.clone());
        ServiceIdentity::of_peer(&request)
    }

    /// The identity a handler reads from a call on this connection.
    fn handler_sees(&self) -> Option<ServiceIdentity> {
        let mut request = tonic::Request::new(());
        request.extensions_mut().insert(self.info.clone());
        ServiceIdentity::of_grpc_peer(&request)
    }
}

#[tokio::test]
async fn a_connection_s_identity_is_read_once_and_kept_for_its_calls() {
    let ca = authority();
    let server = material(&ca, "validation");
    let connection = connect(&server, material(&ca, "gateway").client_config()).await;
    let chain = connection.info.peer_certs().expect("a client certificate");
    assert!(!CONNECTIONS.holds(&chain));

    assert_eq!(
        connection.layer_sees(),
        Some(ServiceIdentity::new("gateway"))
    );
    assert!(CONNECTIONS.holds(&chain), "kept for the connection");
    for _ in 0..3 {
        assert_eq!(
            connection.layer_sees(),
            Some(ServiceIdentity::new("gateway"))
        );
        assert_eq!(
            connection.handler_sees(),
            Some(ServiceIdentity::new("gateway"))
        );
    }
}

#[tokio::test]
async fn another_connection_with_another_certificate_gets_its_own_identity() {
    let ca = authority();
    let server = material(&ca, "validation");
    let gateway = connect(&server, material(&ca, "gateway").client_config()).await;
    assert_eq!(gateway.layer_sees(), Some(ServiceIdentity::new("gateway")));

    let auth = connect(&server, material(&ca, "auth").client_config()).await;
    assert_eq!(auth.layer_sees(), Some(ServiceIdentity::new("auth")));
    assert_eq!(auth.handler_sees(), Some(ServiceIdentity::new("auth")));
    assert_eq!(gateway.layer_sees(), Some(ServiceIdentity::new("gateway")));

    // The first connection gone, a new one (same CA, another service) is read afresh.
    drop(gateway);
    let inference = connect(&server, material(&ca, "inference").client_config()).await;
    assert_eq!(
        inference.handler_sees(),
        Some(ServiceIdentity::new("inference"))
    );
    assert_eq!(auth.layer_sees(), Some(ServiceIdentity::new("auth")));
}

#[tokio::test]
async fn a_connection_without_a_client_certificate_has_no_identity() {
    let ca = authority();
    let server = material(&ca, "validation");
    let connection = connect(&server, anonymous(&ca)).await;
    assert!(connection.info.peer_certs().is_none());
    assert_eq!(connection.layer_sees(), None);
    assert_eq!(connection.handler_sees(), None);

    let after = connect(&server, material(&ca, "gateway").client_config()).await;
    assert_eq!(after.layer_sees(), Some(ServiceIdentity::new("gateway")));
    assert_eq!(connection.layer_sees(), None);
}

#[test]
fn closed_connections_are_swept_out_and_open_ones_kept() {
    let ca = authority();
    let leaf = |service: &str| {
        let issued = ca.issue(service).expect("certificate");
        CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes()).expect("PEM")
    };
    let cache = ConnectionIdentities::new();
    let open = Arc::new(vec![leaf("audit")]);
    assert_eq!(
        cache.identity_of(&open),
        Some(ServiceIdentity::new("audit"))
    );
    let gateway = leaf("gateway");
    for _ in 0..MIN_SWEEP * 3 {
        let closed = Arc::new(vec![gateway.clone()]);
        assert_eq!(
            cache.identity_of(&closed),
            Some(ServiceIdentity::new("gateway"))
        );
    }
    assert!(
        cache.lock().by_chain.len() <= MIN_SWEEP,
        "closed ones swept"
    );
    assert!(cache.holds(&open));
    assert_eq!(
        cache.identity_of(&open),
        Some(ServiceIdentity::new("audit"))
    );

    // A certificate without a mesh identity (the CA's own) names no one, on every call.
    let unnamed = Arc::new(vec![
        CertificateDer::from_pem_slice(ca.certificate_pem().as_bytes()).expect("PEM"),
    ]);
    assert_eq!(cache.identity_of(&unnamed), None);
    assert_eq!(cache.identity_of(&unnamed), None);
}
