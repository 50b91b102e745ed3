//! A service's client of the audit ledger: one append per event, answered once durable.

use medai_proto::audit::v1::AppendRequest;
use medai_proto::audit::v1::audit_service_client::AuditServiceClient;
use medai_runtime::grpc_client_metrics::MeteredChannel;

#[derive(Clone)]
pub struct LedgerClient {
    client: AuditServiceClient<MeteredChannel>,
}

impl LedgerClient {
    pub fn new(channel: MeteredChannel) -> Self {
        Self {
            client: AuditServiceClient::new(channel),
        }
    }

    /// Records one event; `Err` if the ledger did not make it durable.
    pub async fn record(
        &self,
        actor: &str,
        action: &str,
        resource: &str,
        outcome: &str,
        context: serde_json::Value,
    ) -> Result<u64, tonic::Status> {
        let request = AppendRequest {
            actor: actor.to_owned(),
            action: action.to_owned(),
            resource: resource.to_owned(),
            outcome: outcome.to_owned(),
            context_json: context.to_string(),
        };
        let mut request = tonic::Request::new(request);
        medai_runtime::telemetry::inject_trace_context(request.metadata_mut());
        let response = self.client.clone().append(request).await?;
        Ok(response.into_inner().seq)
    }
}
