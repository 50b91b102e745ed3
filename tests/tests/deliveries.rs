//! Issue 14, across the whole mesh (separate processes over mTLS, PostgreSQL): concurrent
//! predictions share the inference service's durable commits of their results and the
//! gateway's calls that note their deliveries, and every result still shows its ledger seq.

use std::sync::Arc;

use medai_e2e::bench_images::noise_png;
use medai_e2e::{MeshUnderTest, Storage, authorised, light_model_request as infer, metric_sum};
use medai_proto::gateway::v1 as gw;
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};

const LIGHT: &str = "synthetic-light";

/// (result commits, RecordDelivery calls, RecordDeliveries calls, Predict calls) inference has
/// made or served so far.
async fn inference_figures(mesh: &MeshUnderTest) -> (f64, f64, f64, f64) {
    let address = mesh
        .mesh
        .admin_address("inference")
        .expect("inference has an admin port");
    let exposition = medai_e2e::http_get(address, "/metrics").await;
    let handled = |method: &str| {
        metric_sum(
            &exposition,
            "grpc_server_handled_total",
            &[("grpc_method", method), ("grpc_code", "OK")],
        )
    };
    (
        metric_sum(
            &exposition,
            "medai_inference_results_commits_total",
            &[("write", "result")],
        ),
        handled("RecordDelivery"),
        handled("RecordDeliveries"),
        handled("Predict") + handled("PredictThenStore"),
    )
}

/// Many predictions at once, each on its own connection: their results are stored in fewer
/// commits than predictions, their delivery notes reach inference in fewer calls than
/// predictions (the gateway's coalescing client, `RecordDeliveries`), and every result, read
/// back through the gateway and straight from the results database, shows the ledger seq its
/// answer named.
#[tokio::test]
async fn concurrent_predictions_share_result_commits_and_note_calls_and_each_shows_its_seq() {
    const PREDICTIONS: usize = 48;
    let mesh = MeshUnderTest::start(Storage::Postgres).await;
    let admin = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;
    // Warm: the model loaded, the connections made, the warm-up's note written (a read through
    // the gateway waits for it).
    let warm_up = gateway
        .infer(authorised(infer(noise_png(64, 1), ""), &admin))
        .await
        .expect("warm-up prediction")
        .into_inner();
    gateway
        .get_result(authorised(
            gw::GetResultRequest {
                result_id: warm_up.result_id,
            },
            &admin,
        ))
        .await
        .expect("the warm-up result reads back");

    let (commits_before, single_before, batch_before, predict_before) =
        inference_figures(&mesh).await;
    let start = Arc::new(tokio::sync::Barrier::new(PREDICTIONS));
    let mut predictions = Vec::new();
    for index in 0..PREDICTIONS {
        let mut client = mesh.gateway().await;
        let request = authorised(
            infer(
                noise_png(64, 100 + index as u32),
                &format!("1.2.826.0.1.3680043.8.498.{index}+{LIGHT}"),
            ),
            &admin,
        );
        let start = start.clone();
        predictions.push(tokio::spawn(async move {
            start.wait().await;
            client.infer(request).await
        }));
    }
    let mut answers = Vec::new();
    for prediction in predictions {
        let answer = prediction
            .await
            .expect("task")
            .expect("prediction")
            .into_inner();
        assert!(answer.ledger_seq > 0 && !answer.replayed, "{answer:?}");
        answers.push(answer);
    }

    // Every result shows its seq through the gateway (a read waits for this gateway's notes in
    // flight) and in the results database.
    let results = Database::connect(mesh.settings.inference_database_url.as_str())
        .await
        .expect("results database");
    for answer in &answers {
        let shown = gateway
            .get_result(authorised(
                gw::GetResultRequest {
                    result_id: answer.result_id.clone(),
                },
                &admin,
            ))
            .await
            .expect("the result reads back")
            .into_inner()
            .result
            .expect("result");
        assert_eq!(shown.ledger_seq, answer.ledger_seq);
        let stored = results
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                format!(
                    "SELECT ledger_seq FROM inference_results WHERE result_id = '{}'",
                    answer.result_id
                ),
            ))
            .await
            .expect("query")
            .expect("the result is stored")
            .try_get::<i64>("", "ledger_seq")
            .expect("ledger_seq");
        assert_eq!(
            stored, answer.ledger_seq as i64,
            "the note is in the results store"
        );
    }

    let (commits_after, single_after, batch_after, predict_after) = inference_figures(&mesh).await;
    let predictions = PREDICTIONS as f64;
    assert_eq!(predict_after - predict_before, predictions);
    let result_commits = commits_after - commits_before;
    let note_calls = (single_after - single_before) + (batch_after - batch_before);
    eprintln!(
        "{PREDICTIONS} concurrent predictions: {result_commits} result commits, \
         {note_calls} note calls ({} RecordDelivery, {} RecordDeliveries)",
        single_after - single_before,
        batch_after - batch_before
    );
    assert_eq!(
        single_after - single_before,
        0.0,
        "this gateway notes through RecordDeliveries"
    );
    assert!(
        result_commits < predictions,
        "{PREDICTIONS} results took {result_commits} commits: not grouped"
    );
    assert!(
        note_calls < predictions,
        "{PREDICTIONS} notes took {note_calls} calls: not coalesced"
    );
    mesh.stop().await;
}
