//! The model repository's lifecycle against a real audit service: stage, activate, roll back
//! and retire change what is served, each change is recorded in the ledger before it takes
//! effect, a swap completes the requests already running, and a tampered file is refused.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use medai_inference::config::RuntimeSettings;
use medai_proto::inference::v1::inference_service_client::InferenceServiceClient;
use medai_proto::inference::v1::{
    AbortCanaryRequest, ActivateModelVersionRequest, GetModelReportRequest, ListModelsRequest,
    ModelChange, ModelChangeOutcome, ModelReport, ModelVersionInfo, PredictRequest,
    PredictResponse, PromoteCanaryRequest, RetireModelVersionRequest, RollbackModelRequest,
    StageModelVersionRequest, StartCanaryRequest,
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

/// `fn name(version) -> Request`: for each request that carries only a change of `version`.
macro_rules! change_requests {
    ($($name:ident -> $request:ident),+ $(,)?) => {$(
        fn $name(version: &str) -> $request {
            $request {
                change: Some(change(version)),
            }
        }
    )+};
}

change_requests!(
    stage -> StageModelVersionRequest,
    activate -> ActivateModelVersionRequest,
    retire -> RetireModelVersionRequest,
    promote_canary -> PromoteCanaryRequest,
    abort_canary -> AbortCanaryRequest,
);

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

/// The version a change left behind, and the ledger seq that records the change.
fn changed_version(outcome: Option<ModelChangeOutcome>) -> (ModelVersionInfo, u64) {
    let outcome = outcome.expect("outcome");
    (
        outcome.changed.expect("changed version"),
        outcome.ledger_seq,
    )
}

fn changed(outcome: Option<ModelChangeOutcome>) -> (String, String, bool, u64) {
    let (info, seq) = changed_version(outcome);
    (info.version, info.status, info.ready, seq)
}

/// Every version of the light model as the operator lists it: (version, status, ready).
async fn version_states(
    operator: &mut InferenceServiceClient<Channel>,
) -> Vec<(String, String, bool)> {
    operator
        .list_models(ListModelsRequest {})
        .await
        .expect("list")
        .into_inner()
        .versions
        .into_iter()
        .map(|info| (info.version, info.status, info.ready))
        .collect()
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
    assert_eq!(
        version_states(&mut operator).await,
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
    assert_eq!(
        version_states(&mut harness.client_as("operator")).await,
        [
            ("1".to_owned(), "ACTIVE".to_owned(), true),
            ("3".to_owned(), "STAGED".to_owned(), false)
        ]
    );
}

// --- model rollout (issue 18): canary, validation reports, model report ---

fn start_canary(version: &str, share_percent: u32) -> StartCanaryRequest {
    StartCanaryRequest {
        change: Some(change(version)),
        share_percent,
    }
}

/// The stable reason code of a refused change.
fn refusal<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Option<String> {
    reason_of(&result.expect_err("refused"))
}

/// The model report of one version of the light model.
async fn model_report(
    operator: &mut InferenceServiceClient<Channel>,
    version: &str,
) -> ModelReport {
    operator
        .get_model_report(GetModelReportRequest {
            model_name: LIGHT.to_owned(),
            model_version: version.to_owned(),
        })
        .await
        .expect("report")
        .into_inner()
        .report
        .expect("report")
}

/// A request routed by its image hash alone (no idempotency key), so it can be sent again
/// without being answered from the results store.
fn hashed_predict(index: u32) -> PredictRequest {
    PredictRequest {
        image_sha256: format!("{:064x}", u64::from(index) * 7919 + 1),
        ..support::predict(LIGHT, grey_image(64, index))
    }
}

/// The answer to `request`, which must succeed.
async fn prediction(
    gateway: &mut InferenceServiceClient<Channel>,
    request: PredictRequest,
) -> PredictResponse {
    gateway
        .predict(request)
        .await
        .expect("prediction")
        .into_inner()
}

/// Sends the hashed requests `0..count`; each must be answered by `version` on `route`.
async fn assert_all_routed(
    gateway: &mut InferenceServiceClient<Channel>,
    count: u32,
    (route, version): (&str, &str),
) {
    for index in 0..count {
        let answer = prediction(gateway, hashed_predict(index)).await;
        assert_eq!(
            (answer.route.as_str(), answer.model_version.as_str()),
            (route, version),
            "request {index}"
        );
    }
}

#[tokio::test]
async fn a_canary_at_20_percent_answers_about_a_fifth_of_500_requests_and_a_key_always_routes_the_same_way()
 {
    let repository = light_repository(&[("1", "active"), ("2", "staged")]);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let mut gateway = harness.client_as("gateway");
    let mut operator = harness.client_as("operator");

    assert_eq!(
        refusal(operator.start_canary(start_canary("2", 0)).await).as_deref(),
        Some("CANARY_SHARE_INVALID"),
        "no share"
    );
    let (info, seq) = changed_version(
        operator
            .start_canary(start_canary("2", 20))
            .await
            .expect("start the canary")
            .into_inner()
            .outcome,
    );
    assert_eq!(
        (info.rollout_role.as_str(), info.share_percent, info.ready),
        ("CANARY", 20, true)
    );
    assert!(seq > 0);
    assert_eq!(
        refusal(operator.start_canary(start_canary("2", 30)).await).as_deref(),
        Some("ROLLOUT_STATE_INVALID"),
        "one canary at a time"
    );

    // 500 requests, each with its own image hash: about a fifth go to the canary, and each
    // answer names the version of its route.
    let mut routes = Vec::new();
    for index in 0..500u32 {
        let answer = prediction(&mut gateway, hashed_predict(index)).await;
        let expected_version = match answer.route.as_str() {
            "CANARY" => "2",
            "ACTIVE" => "1",
            other => panic!("unexpected route {other}"),
        };
        assert_eq!(answer.model_version, expected_version);
        routes.push((answer.route, answer.result_id));
    }
    let canary = routes.iter().filter(|(route, _)| route == "CANARY").count();
    eprintln!(
        "canary at 20 %: {canary} of 500 requests ({:.1} %)",
        canary as f64 / 5.0
    );
    assert!(
        (75..=125).contains(&canary),
        "{canary} of 500 went to the canary"
    );

    // The same request sent again goes the same way, every time.
    for index in 0..40u32 {
        let again = prediction(&mut gateway, hashed_predict(index)).await;
        assert_eq!(again.route, routes[index as usize].0, "request {index}");
    }
    // With an idempotency key the key decides, as anyone can recompute from the rule.
    for index in 0..40u32 {
        let key = format!("{:064x}", u64::from(index) * 104_729 + 3);
        let request = PredictRequest {
            idempotency_key: key.clone(),
            image_sha256: format!("{:064x}", 5_000 + index),
            ..support::predict(LIGHT, grey_image(64, 5_000 + index))
        };
        let answer = prediction(&mut gateway, request).await;
        let expected = if medai_inference::rollout::routes_to_canary(LIGHT, key.as_bytes(), 20) {
            "CANARY"
        } else {
            "ACTIVE"
        };
        assert_eq!(answer.route, expected, "key {index}");
    }

    // The route is stored and bound by the content hash (rule 3).
    let (route, result_id) = routes
        .iter()
        .find(|(route, _)| route == "CANARY")
        .cloned()
        .expect("a canary answer");
    let stored = gateway
        .get_result(medai_proto::inference::v1::GetResultRequest {
            result_id,
            idempotency_key: String::new(),
        })
        .await
        .expect("result")
        .into_inner()
        .result
        .expect("result");
    assert_eq!(
        (stored.route.as_str(), stored.model_version.as_str()),
        (route.as_str(), "2")
    );
    assert_eq!(stored.content_hash_version, 3);
    assert_eq!(
        medai_inference::results::content_sha256_of_message(&stored),
        stored.content_sha256
    );
    let rerouted = medai_proto::inference::v1::StoredResult {
        route: "ACTIVE".to_owned(),
        ..stored.clone()
    };
    assert_ne!(
        medai_inference::results::content_sha256_of_message(&rerouted),
        stored.content_sha256,
        "the route is content"
    );

    // The model report counts the canary's answers per route.
    let report = model_report(&mut operator, "2").await;
    assert_eq!(report.role, "CANARY");
    assert_eq!(report.routes.len(), 1);
    assert_eq!(report.routes[0].label, "CANARY");
    assert_eq!(report.predictions, report.routes[0].count);
    assert!(report.predictions >= canary as u64);
    assert_eq!(
        report.labels.iter().map(|label| label.count).sum::<u64>(),
        report.predictions
    );
    assert!(report.research_use_only && !report.has_reference);

    // Promotion: the canary becomes the active version for every request; recorded first.
    let (info, _) = changed_version(
        operator
            .promote_canary(promote_canary("2"))
            .await
            .expect("promote")
            .into_inner()
            .outcome,
    );
    assert_eq!(
        (info.status.as_str(), info.rollout_role.as_str()),
        ("ACTIVE", "")
    );
    assert_all_routed(&mut gateway, 20, ("ACTIVE", "2")).await;

    // A canary of the former version, then aborted: everything back on the active version.
    operator
        .start_canary(start_canary("1", 50))
        .await
        .expect("start a canary of 1");
    assert_eq!(
        refusal(operator.abort_canary(abort_canary("2")).await).as_deref(),
        Some("ROLLOUT_STATE_INVALID"),
        "2 is not the canary"
    );
    operator
        .abort_canary(abort_canary("1"))
        .await
        .expect("abort");
    assert_all_routed(&mut gateway, 20, ("ACTIVE", "2")).await;

    let actions: Vec<(String, String)> = harness
        .ledger()
        .await
        .into_iter()
        .map(|(_, action, resource, outcome)| {
            assert_eq!(outcome, "SUCCESS");
            (action, resource)
        })
        .collect();
    let model = |version: &str| format!("model/{LIGHT}/{version}");
    assert_eq!(
        actions,
        vec![
            ("MODEL_CANARY_START".to_owned(), model("2")),
            ("MODEL_CANARY_PROMOTE".to_owned(), model("2")),
            ("MODEL_CANARY_START".to_owned(), model("1")),
            ("MODEL_CANARY_ABORT".to_owned(), model("1")),
        ]
    );
}

/// A light version whose manifest is not research use only, with `report` (its text, and the
/// SHA-256 the manifest claims for it) when given.
fn add_clinical_light_version(root: &Path, version: &str, report: Option<(&str, String)>) {
    let folder = add_light_version(root, version, "staged");
    let manifest_path = folder.join("manifest.toml");
    let mut manifest = std::fs::read_to_string(&manifest_path)
        .expect("manifest")
        .replace("research_use_only = true", "research_use_only = false");
    if let Some((text, sha256)) = report {
        std::fs::write(folder.join("validation-report.json"), text).expect("report");
        manifest.push_str(&format!(
            "\n[validation_report]\nfile = \"validation-report.json\"\nsha256 = \"{sha256}\"\n"
        ));
    }
    std::fs::write(manifest_path, manifest).expect("manifest");
}

/// A validation report of the light model. Its figures describe synthetic weights on a
/// synthetic set: they exist to exercise the association, not to claim anything.
const LIGHT_REPORT: &str = r#"{
  "dataset": "SYNTHETIC: 1000 generated grey test patterns (tests only)",
  "metrics": {"accuracy": 0.5},
  "intended_use": "SYNTHETIC WEIGHTS: tests only",
  "reference": {
    "labels": {"synthetic-a": 0.5, "synthetic-b": 0.5},
    "confidence": [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0]
  }
}"#;

#[tokio::test]
async fn a_version_without_its_validation_report_is_neither_activated_nor_canaried() {
    use sha2::{Digest, Sha256};
    let repository = light_repository(&[("1", "active")]);
    let report_sha256 = hex::encode(Sha256::digest(LIGHT_REPORT.as_bytes()));
    add_clinical_light_version(repository.path(), "2", None);
    add_clinical_light_version(
        repository.path(),
        "3",
        Some((LIGHT_REPORT, "ab".repeat(32))),
    );
    add_clinical_light_version(
        repository.path(),
        "4",
        Some((LIGHT_REPORT, report_sha256.clone())),
    );
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let mut gateway = harness.client_as("gateway");
    let mut operator = harness.client_as("operator");
    // Seeded as staged from their manifests: staging needs no report.
    let staged_seqs = harness.ledger().await.len();

    for (version, reason) in [
        ("2", "VALIDATION_REPORT_MISSING"),
        ("3", "VALIDATION_REPORT_MISMATCH"),
    ] {
        let status = operator
            .activate_model_version(activate(version))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            reason_of(&status).as_deref(),
            Some(reason),
            "version {version}"
        );
        assert_eq!(
            refusal(operator.start_canary(start_canary(version, 10)).await).as_deref(),
            Some(reason),
            "version {version}"
        );
    }
    assert_eq!(
        harness.ledger().await.len(),
        staged_seqs,
        "refusals record nothing"
    );
    assert_eq!(served_version(&mut gateway).await.as_deref(), Ok("1"));

    // With its report, the version is activated, and its figures are measured against the
    // report's reference distributions.
    operator
        .activate_model_version(activate("4"))
        .await
        .expect("activate with a report");
    for index in 0..30u32 {
        prediction(&mut gateway, hashed_predict(index)).await;
    }
    let report = model_report(&mut operator, "4").await;
    assert_eq!(report.role, "ACTIVE");
    assert_eq!(report.predictions, 30);
    assert_eq!(report.validation_report_sha256, report_sha256);
    assert!(report.has_reference && !report.research_use_only);
    assert!(report.mean_confidence > 0.0 && report.mean_confidence <= 1.0);
    // Recomputed here from the counts the report gives and the reference it was given.
    let observed: Vec<u64> = report.labels.iter().map(|label| label.count).collect();
    let expected_label_psi =
        medai_inference::rollout::population_stability_index(&observed, &[0.5, 0.5]);
    assert!((report.label_psi - expected_label_psi).abs() < 1e-9);
    assert!(report.confidence_psi.is_finite() && report.confidence_psi >= 0.0);
}
