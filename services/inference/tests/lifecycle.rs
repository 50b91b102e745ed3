//! The model repository's lifecycle against a real audit service: stage, activate, roll back
//! and retire change what is served, each change is recorded in the ledger before it takes
//! effect, a swap completes the requests already running, and a tampered file is refused.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use medai_inference::config::RuntimeSettings;
use medai_proto::inference::v1::inference_service_client::InferenceServiceClient;
use medai_proto::inference::v1::{
    ActivateModelVersionRequest, ListModelsRequest, ModelChange, ModelChangeOutcome,
    RetireModelVersionRequest, RollbackModelRequest, StageModelVersionRequest,
};
use medai_runtime::errors::reason_of;
use support::{Harness, LIGHT, add_light_version, grey_image, light_repository, manifest_status};
use tonic::Code;
use tonic::transport::Channel;

fn change(version: &str) -> ModelChange {
    ModelChange {
        model_name: LIGHT.to_owned(),
        model_version: version.to_owned(),
        reason: "CHG-1234 validated release".to_owned(),
    }
}

fn stage(version: &str) -> StageModelVersionRequest {
    StageModelVersionRequest {
        change: Some(change(version)),
    }
}

fn activate(version: &str) -> ActivateModelVersionRequest {
    ActivateModelVersionRequest {
        change: Some(change(version)),
    }
}

fn retire(version: &str) -> RetireModelVersionRequest {
    RetireModelVersionRequest {
        change: Some(change(version)),
    }
}

fn rollback() -> RollbackModelRequest {
    RollbackModelRequest {
        change: Some(ModelChange {
            reason: "CHG-1235 back out".to_owned(),
            ..change("")
        }),
    }
}

/// `message` as the gateway sends it for a signed-in user: the user's token subject relayed.
fn relayed<T>(message: T, subject: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        medai_inference::caller::RELAYED_SUBJECT_HEADER,
        subject.parse().expect("ascii subject"),
    );
    request
}

async fn served_version(client: &mut InferenceServiceClient<Channel>) -> Result<String, String> {
    client
        .predict(support::predict(LIGHT, grey_image(64, 1)))
        .await
        .map(|answer| answer.into_inner().model_version)
        .map_err(|status| reason_of(&status).unwrap_or_default())
}

fn changed(outcome: Option<ModelChangeOutcome>) -> (String, String, bool, u64) {
    let outcome = outcome.expect("outcome");
    let info = outcome.changed.expect("changed version");
    (info.version, info.status, info.ready, outcome.ledger_seq)
}

#[tokio::test]
async fn activate_roll_back_and_retire_change_what_is_served_and_are_recorded() {
    let repository = light_repository(&[("1", "active")]);
    let mut harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let mut gateway = harness.client_as("gateway");
    let mut operator = harness.client_as("operator");
    assert_eq!(served_version(&mut gateway).await.as_deref(), Ok("1"));

    // A version placed in the repository is unknown until staged, and staging checks its hash.
    add_light_version(repository.path(), "2", "staged");
    let status = operator
        .activate_model_version(activate("2"))
        .await
        .expect_err("not staged yet");
    assert_eq!(reason_of(&status).as_deref(), Some("MODEL_VERSION_UNKNOWN"));
    let staged = operator
        .stage_model_version(stage("2"))
        .await
        .expect("stage")
        .into_inner()
        .outcome;
    let (version, status, ready, seq) = changed(staged);
    assert_eq!(
        (version.as_str(), status.as_str(), ready),
        ("2", "STAGED", false)
    );
    assert!(seq > 0);

    // Activation swaps while requests are running: every one of them completes, on one
    // version or the other.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for worker in 0..4u32 {
        let mut client = harness.client_as("gateway");
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let answer = client
                    .predict(support::predict(
                        LIGHT,
                        grey_image(64, worker * 1000 + round),
                    ))
                    .await
                    .expect("no request fails during a swap")
                    .into_inner();
                versions.push(answer.model_version);
            }
            versions
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let activated = changed(
        operator
            .activate_model_version(activate("2"))
            .await
            .expect("activate")
            .into_inner()
            .outcome,
    );
    assert_eq!(
        (activated.0.as_str(), activated.1.as_str(), activated.2),
        ("2", "ACTIVE", true)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for worker in load {
        seen.extend(worker.await.expect("load worker"));
    }
    assert!(seen.iter().all(|version| version == "1" || version == "2"));
    assert!(
        seen.contains(&"1".to_owned()) && seen.contains(&"2".to_owned()),
        "requests ran before and after the swap"
    );
    assert_eq!(served_version(&mut gateway).await.as_deref(), Ok("2"));
    // The manifests are immutable: the lifecycle state is in the database.
    assert_eq!(manifest_status(repository.path(), "1"), "active");
    assert_eq!(manifest_status(repository.path(), "2"), "staged");

    // Asking for the version no longer served is refused; readiness says the same.
    let mut pinned = support::predict(LIGHT, grey_image(64, 2));
    pinned.model_version = "1".to_owned();
    let status = gateway.predict(pinned).await.expect_err("version 1");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("MODEL_VERSION_NOT_SERVED")
    );
    let listed = operator
        .list_models(ListModelsRequest {})
        .await
        .expect("list")
        .into_inner()
        .versions;
    let states: Vec<(String, String, bool)> = listed
        .into_iter()
        .map(|info| (info.version, info.status, info.ready))
        .collect();
    assert_eq!(
        states,
        [
            ("1".to_owned(), "STAGED".to_owned(), false),
            ("2".to_owned(), "ACTIVE".to_owned(), true)
        ]
    );

    // Rollback returns to version 1; the gateway asks on behalf of a signed-in user.
    let rolled_back = changed(
        gateway
            .rollback_model(relayed(rollback(), "admin-subject-1"))
            .await
            .expect("rollback")
            .into_inner()
            .outcome,
    );
    assert_eq!(
        (rolled_back.0.as_str(), rolled_back.1.as_str()),
        ("1", "ACTIVE")
    );
    assert_eq!(served_version(&mut gateway).await.as_deref(), Ok("1"));
    let status = operator
        .rollback_model(rollback())
        .await
        .expect_err("nothing earlier than version 1");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::FailedPrecondition, Some("NO_PREVIOUS_VERSION"))
    );

    // Retiring version 2 makes it unservable for good; retiring 1 stops serving the model.
    operator
        .retire_model_version(retire("2"))
        .await
        .expect("retire 2");
    let status = operator
        .activate_model_version(activate("2"))
        .await
        .expect_err("retired");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::FailedPrecondition, Some("MODEL_VERSION_RETIRED"))
    );
    let status = operator
        .stage_model_version(stage("2"))
        .await
        .expect_err("retired");
    assert_eq!(reason_of(&status).as_deref(), Some("MODEL_VERSION_RETIRED"));

    // The state survives a restart: the lifecycle store is the record.
    harness.restart_inference().await;
    let mut gateway = harness.client_as("gateway");
    let mut operator = harness.client_as("operator");
    assert_eq!(served_version(&mut gateway).await.as_deref(), Ok("1"));
    operator
        .retire_model_version(retire("1"))
        .await
        .expect("retire 1");
    assert_eq!(
        served_version(&mut gateway).await,
        Err("MODEL_NOT_FOUND".to_owned())
    );
    assert_eq!(manifest_status(repository.path(), "1"), "active");
    assert_eq!(manifest_status(repository.path(), "2"), "staged");

    // Every change is in the ledger, in order, under the authenticated caller: the operator
    // tool's certificate, or the user whose subject the gateway relayed.
    let ledger = harness.ledger().await;
    let recorded: Vec<(&str, &str, &str)> = ledger
        .iter()
        .map(|(actor, action, resource, _)| (actor.as_str(), action.as_str(), resource.as_str()))
        .collect();
    assert_eq!(
        recorded,
        [
            ("service:operator", "MODEL_STAGE", "model/synthetic-light/2"),
            (
                "service:operator",
                "MODEL_ACTIVATE",
                "model/synthetic-light/2"
            ),
            (
                "user:admin-subject-1",
                "MODEL_ROLLBACK",
                "model/synthetic-light/1"
            ),
            (
                "service:operator",
                "MODEL_RETIRE",
                "model/synthetic-light/2"
            ),
            (
                "service:operator",
                "MODEL_RETIRE",
                "model/synthetic-light/1"
            ),
        ]
    );
    assert!(ledger.iter().all(|entry| entry.3 == "SUCCESS"));
}

#[tokio::test]
async fn refused_changes_change_nothing_and_record_nothing() {
    let repository = light_repository(&[("1", "active")]);
    let mut harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let mut operator = harness.client_as("operator");

    // A tampered file is refused at staging.
    let folder = add_light_version(repository.path(), "2", "staged");
    let mut model = std::fs::read(folder.join("model.onnx")).expect("model");
    let last = model.len() - 1;
    model[last] ^= 0x01;
    std::fs::write(folder.join("model.onnx"), model).expect("tamper");
    let status = operator
        .stage_model_version(stage("2"))
        .await
        .expect_err("tampered");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::FailedPrecondition, Some("MODEL_INTEGRITY_MISMATCH"))
    );

    // A change without a reason, to an unknown or escaping version, or from a peer the policy
    // does not name, is refused.
    let mut no_reason = change("1");
    no_reason.reason = "  ".to_owned();
    let status = operator
        .retire_model_version(RetireModelVersionRequest {
            change: Some(no_reason),
        })
        .await
        .expect_err("no reason");
    assert_eq!(reason_of(&status).as_deref(), Some("REASON_MISSING"));
    for version in ["9", "../1", ""] {
        let status = operator
            .stage_model_version(stage(version))
            .await
            .expect_err("unknown");
        assert_eq!(
            reason_of(&status).as_deref(),
            Some("MODEL_VERSION_UNKNOWN"),
            "{version}"
        );
    }
    let status = operator
        .activate_model_version(activate("1"))
        .await
        .expect_err("already active");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("MODEL_VERSION_ALREADY_IN_STATE")
    );
    // A KServe client may run inference, never change what is served.
    harness
        .pki
        .layout
        .ensure(&[medai_inference::KSERVE_CLIENT_IDENTITY])
        .expect("kserve-client certificate");
    for identity in [
        "validation",
        "audit",
        "stranger",
        medai_inference::KSERVE_CLIENT_IDENTITY,
    ] {
        let mut client = harness.client_as(identity);
        let status = client
            .retire_model_version(retire("1"))
            .await
            .expect_err("peer policy");
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
        let status = client
            .stage_model_version(stage("2"))
            .await
            .expect_err("peer policy");
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
    }
    // Only the gateway may name a user as the actor; the operator tool cannot.
    let status = operator
        .retire_model_version(relayed(retire("1"), "someone-else"))
        .await
        .expect_err("relay from a non-gateway peer");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::PermissionDenied, Some("SUBJECT_RELAY_REFUSED"))
    );
    assert!(harness.ledger().await.is_empty());

    // Without the ledger, nothing changes: the store's transaction is rolled back.
    add_light_version(repository.path(), "3", "staged");
    operator
        .stage_model_version(stage("3"))
        .await
        .expect("stage 3");
    harness.audit.take().expect("audit").stop().await;
    let status = operator
        .activate_model_version(activate("3"))
        .await
        .expect_err("ledger down");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::Unavailable, Some("LEDGER_UNAVAILABLE"))
    );
    assert_eq!(manifest_status(repository.path(), "1"), "active");
    assert_eq!(manifest_status(repository.path(), "3"), "staged");
    let mut gateway = harness.client_as("gateway");
    assert_eq!(served_version(&mut gateway).await.as_deref(), Ok("1"));
    harness.restart_inference().await;
    let mut gateway = harness.client_as("gateway");
    assert_eq!(served_version(&mut gateway).await.as_deref(), Ok("1"));
    let states: Vec<(String, String, bool)> = harness
        .client_as("operator")
        .list_models(ListModelsRequest {})
        .await
        .expect("list")
        .into_inner()
        .versions
        .into_iter()
        .map(|info| (info.version, info.status, info.ready))
        .collect();
    assert_eq!(
        states,
        [
            ("1".to_owned(), "ACTIVE".to_owned(), true),
            ("3".to_owned(), "STAGED".to_owned(), false)
        ]
    );
}
