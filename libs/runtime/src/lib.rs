//! The runtime every MedAI Flow service is built on. Each module is one concern:
//! configuration, logging, transport security, who may call what, error statuses, health
//! (readiness),
//! shutdown and the admin (metrics) endpoint.

pub mod admin;
pub mod async_main;
pub mod balance;
pub mod call_status;
pub mod certificate_expiry;
pub mod config;
pub mod connections;
pub mod correlation;
pub mod deadline;
pub mod errors;
pub mod grpc_client_metrics;
pub mod grpc_metrics;
pub mod health;
pub mod identity;
pub mod peer_policy;
pub mod process;
pub mod process_metrics;
pub mod rpc_trace;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod unprocessed;

pub use errors::{ErrorKind, ServiceError};
pub use identity::ServiceIdentity;
pub use peer_policy::{PeerPolicy, PeerPolicyLayer};
pub use tls::TlsFiles;
