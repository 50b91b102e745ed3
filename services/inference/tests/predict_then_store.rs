//! Issue 14: PredictThenStore answers a prediction in two steps, the prediction as soon as the
//! model has answered and its row is handed to the results writer, then `stored` once the row
//! is committed, so the gateway can record the delivery in the ledger while the row commits.
//! Real PostgreSQL, real mTLS.

mod support;

use std::time::Duration;

use medai_inference::config::RuntimeSettings;
use medai_proto::inference::v1::predict_then_store_response::Progress;
use medai_proto::inference::v1::{PredictRequest, PredictThenStoreRequest};
use medai_runtime::errors::reason_of;
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, DatabaseConnection, Statement};
use support::{Harness, LIGHT, grey_image};
use tonic::Code;

fn request(seed: u32, result_id: &str, idempotency_key: &str) -> PredictThenStoreRequest {
    PredictThenStoreRequest {
        request: Some(PredictRequest {
            result_id: result_id.to_owned(),
            image_sha256: format!("{seed:064x}"),
            idempotency_key: idempotency_key.to_owned(),
            ..support::predict(LIGHT, grey_image(64, seed))
        }),
    }
}

async fn rows_with_id(results: &DatabaseConnection, result_id: &str) -> i64 {
    results
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            format!("SELECT count(*) AS n FROM inference_results WHERE result_id = '{result_id}'"),
        ))
        .await
        .expect("query")
        .expect("a row")
        .try_get::<i64>("", "n")
        .expect("count")
}

async fn started() -> (tempfile::TempDir, Harness, DatabaseConnection) {
    let repository = support::light_repository(&[("1", "active")]);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let results = Database::connect(harness.config.database_url.as_str())
        .await
        .expect("results database");
    // Warm: the model loaded, the writer's connection made.
    harness
        .client_as("gateway")
        .predict(support::predict(LIGHT, grey_image(64, 99)))
        .await
        .expect("warm-up prediction");
    (repository, harness, results)
}

/// The prediction arrives while its row's commit is held (a deferred trigger waits at COMMIT
/// on an advisory lock the test holds): the row is not in the store yet, and no second message
/// comes. Released, the commit is made, `stored` names the result, the stream ends, and the
/// row is kept. On Predict's order the prediction would not arrive until the release.
#[tokio::test]
async fn the_prediction_comes_before_its_row_is_committed_and_stored_after() {
    const COMMIT_LOCK: i64 = 141_414;
    let (_repository, harness, results) = started().await;
    let holder = medai_testkit::hold_result_commits(&results, COMMIT_LOCK).await;

    let result_id = uuid::Uuid::new_v4().to_string();
    let mut gateway = harness.client_as("gateway");
    let mut stream = tokio::time::timeout(
        Duration::from_secs(60),
        gateway.predict_then_store(request(1, &result_id, "")),
    )
    .await
    .expect("answered while the row's commit is held")
    .expect("stream")
    .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("the prediction while the commit is held")
        .expect("first message")
        .expect("a message");
    let Some(Progress::Prediction(prediction)) = first.progress else {
        panic!("the first message is the prediction: {first:?}");
    };
    assert_eq!(prediction.result_id, result_id);
    assert_eq!(prediction.model_name, LIGHT);
    assert_eq!(prediction.probabilities.len(), 2);
    assert!(!prediction.replayed);
    assert_eq!(
        rows_with_id(&results, &result_id).await,
        0,
        "the row is not committed yet"
    );
    let second = {
        let next = stream.message();
        tokio::pin!(next);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut next)
                .await
                .is_err(),
            "no `stored` while the commit is held"
        );
        holder.rollback().await.expect("release the commits");
        tokio::time::timeout(Duration::from_secs(60), next)
            .await
            .expect("stored once released")
            .expect("second message")
            .expect("a message")
    };
    let Some(Progress::Stored(stored)) = second.progress else {
        panic!("the second message is `stored`: {second:?}");
    };
    assert_eq!(stored.result_id, result_id);
    assert!(
        stream.message().await.expect("clean end").is_none(),
        "two messages, then the end"
    );
    assert_eq!(
        rows_with_id(&results, &result_id).await,
        1,
        "the row is kept"
    );
}

/// A commit that fails (a deferred constraint refusing it at COMMIT) ends the stream after the
/// prediction with Predict's stable error, RESULTS_STORE_FAILED, and keeps no row.
#[tokio::test]
async fn a_failed_commit_ends_the_stream_after_the_prediction_with_results_store_failed() {
    let (_repository, harness, results) = started().await;
    results
        .execute_unprepared(
            "CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'refused at commit'; END $$; \
             CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON inference_results \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit();",
        )
        .await
        .expect("the trigger that refuses commits");
    let result_id = uuid::Uuid::new_v4().to_string();
    let mut stream = harness
        .client_as("gateway")
        .predict_then_store(request(2, &result_id, ""))
        .await
        .expect("stream")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("first message")
        .expect("a message");
    assert!(
        matches!(first.progress, Some(Progress::Prediction(ref prediction)) if prediction.result_id == result_id),
        "{first:?}"
    );
    let status = stream.message().await.expect_err("the commit failed");
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(reason_of(&status).as_deref(), Some("RESULTS_STORE_FAILED"));
    assert_eq!(rows_with_id(&results, &result_id).await, 0, "no row kept");

    // Predict fails the same way, with the same code.
    let status = harness
        .client_as("gateway")
        .predict(support::predict(LIGHT, grey_image(64, 3)))
        .await
        .expect_err("the commit failed");
    assert_eq!(reason_of(&status).as_deref(), Some("RESULTS_STORE_FAILED"));
}

/// With an idempotency key the answer comes after the commit: the prediction, then `stored`
/// at once; the same request again is the stored result, replayed.
#[tokio::test]
async fn a_keyed_request_is_answered_after_its_commit_and_replayed_after() {
    let (_repository, harness, results) = started().await;
    let key = format!("{:064x}", 77);
    let mut answers = Vec::new();
    for _ in 0..2 {
        let mut stream = harness
            .client_as("gateway")
            .predict_then_store(request(4, &uuid::Uuid::new_v4().to_string(), &key))
            .await
            .expect("stream")
            .into_inner();
        let mut messages = Vec::new();
        while let Some(message) = stream.message().await.expect("message") {
            messages.push(message.progress.expect("progress"));
        }
        let [Progress::Prediction(prediction), Progress::Stored(stored)] = &messages[..] else {
            panic!("prediction then stored: {messages:?}");
        };
        assert_eq!(stored.result_id, prediction.result_id);
        assert_eq!(rows_with_id(&results, &prediction.result_id).await, 1);
        answers.push(prediction.clone());
    }
    assert!(!answers[0].replayed);
    assert!(answers[1].replayed, "the second is the stored result");
    assert_eq!(answers[1].result_id, answers[0].result_id);
}

/// As Predict: the gateway's only; any other peer is refused before the model runs.
#[tokio::test]
async fn only_the_gateway_may_call_predict_then_store() {
    let (_repository, harness, _results) = started().await;
    for identity in ["operator", "validation", "audit"] {
        let status = harness
            .client_as(identity)
            .predict_then_store(request(5, &uuid::Uuid::new_v4().to_string(), ""))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
        assert_eq!(
            reason_of(&status).as_deref(),
            Some("PEER_NOT_ALLOWED"),
            "{identity}"
        );
    }
    let status = harness
        .client_as("gateway")
        .predict_then_store(PredictThenStoreRequest { request: None })
        .await
        .expect_err("no request");
    assert_eq!(status.code(), Code::InvalidArgument);
}
