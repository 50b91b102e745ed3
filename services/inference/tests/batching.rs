//! Dynamic batching and load control on real ONNX Runtime sessions: concurrent requests share
//! runs, a full queue refuses at once, and a request whose deadline passed in the queue is
//! never run.

mod support;

use std::time::{Duration, Instant};

use medai_inference::config::RuntimeSettings;
use medai_proto::kserve::ModelStatisticsRequest;
use medai_runtime::errors::reason_of;
use support::{Harness, LIGHT, brain_repository, grey_image, light_repository};
use tonic::Code;

async fn batch_sizes(harness: &Harness, model: &str) -> Vec<(u64, u64)> {
    let stats = harness
        .kserve_as("operator")
        .model_statistics(ModelStatisticsRequest {
            name: model.to_owned(),
            version: String::new(),
        })
        .await
        .expect("statistics")
        .into_inner();
    stats.model_stats[0]
        .batch_stats
        .iter()
        .map(|batch| {
            (
                batch.batch_size,
                batch
                    .compute_infer
                    .as_ref()
                    .map_or(0, |duration| duration.count),
            )
        })
        .collect()
}

/// Sends `count` predictions at once and returns how many succeeded.
async fn burst(harness: &Harness, model: &str, count: u32) -> usize {
    let mut calls = Vec::new();
    for index in 0..count {
        let mut client = harness.client_as("gateway");
        let model = model.to_owned();
        calls.push(tokio::spawn(async move {
            client
                .predict(support::predict(&model, grey_image(64, index)))
                .await
                .is_ok()
        }));
    }
    let mut succeeded = 0;
    for call in calls {
        succeeded += usize::from(call.await.expect("call"));
    }
    succeeded
}

#[tokio::test]
async fn concurrent_requests_share_runs_and_batching_can_be_turned_off() {
    let repository = light_repository(&[("1", "active")]);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    assert_eq!(burst(&harness, LIGHT, 96).await, 96);
    let sizes = batch_sizes(&harness, LIGHT).await;
    let rows: u64 = sizes.iter().map(|(size, runs)| size * runs).sum();
    assert_eq!(rows, 96, "every request ran exactly once: {sizes:?}");
    assert!(
        sizes.iter().any(|(size, _)| *size > 1),
        "some runs held more than one request: {sizes:?}"
    );
    assert!(sizes.iter().all(|(size, _)| *size <= 32), "{sizes:?}");

    let unbatched = Harness::start(
        repository.path(),
        RuntimeSettings {
            dynamic_batching: false,
            ..RuntimeSettings::default()
        },
    )
    .await;
    assert_eq!(burst(&unbatched, LIGHT, 48).await, 48);
    assert_eq!(batch_sizes(&unbatched, LIGHT).await, [(1, 48)]);
}

/// A request that finds the model idle runs at once: the batching window only applies while
/// another run is busy. With a 2 s window, lone requests still answer in far less than 2 s.
#[tokio::test]
async fn a_lone_request_is_not_delayed_by_the_batching_window() {
    let repository = light_repository(&[("1", "active")]);
    let manifest = repository
        .path()
        .join(LIGHT)
        .join("1")
        .join("manifest.toml");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    assert!(text.contains("max_queue_delay_microseconds = 500\n"));
    std::fs::write(
        &manifest,
        text.replace(
            "max_queue_delay_microseconds = 500\n",
            "max_queue_delay_microseconds = 2000000\n",
        ),
    )
    .expect("a 2 s window");
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let mut client = harness.client_as("gateway");
    client
        .predict(support::predict(LIGHT, grey_image(64, 0)))
        .await
        .expect("warm-up");
    for round in 1..=5u32 {
        let started = Instant::now();
        client
            .predict(support::predict(LIGHT, grey_image(64, round)))
            .await
            .expect("prediction");
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1000),
            "a lone request waited {took:?} with a 2 s window"
        );
    }
    // They ran one by one, each alone.
    assert_eq!(batch_sizes(&harness, LIGHT).await, [(1, 6)]);
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_expired_requests_never_run() {
    let repository = brain_repository();
    let harness = Harness::start(
        repository.path(),
        RuntimeSettings {
            dynamic_batching: false,
            queue_capacity: 2,
            ..RuntimeSettings::default()
        },
    )
    .await;
    let model = "brain-mri-tumor";
    let mut calls = Vec::new();
    for index in 0..12u32 {
        let mut client = harness.client_as("gateway");
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let outcome = client
                .predict(support::predict(model, grey_image(64, index)))
                .await;
            (outcome.map(|_| ()), started.elapsed())
        }));
    }
    let mut served = Vec::new();
    let mut refused = Vec::new();
    for call in calls {
        match call.await.expect("call") {
            (Ok(()), took) => served.push(took),
            (Err(status), took) => {
                assert_eq!(
                    (status.code(), reason_of(&status).as_deref()),
                    (Code::ResourceExhausted, Some("INFERENCE_QUEUE_FULL"))
                );
                refused.push(took);
            }
        }
    }
    assert!(
        !refused.is_empty(),
        "a 2-deep queue cannot hold 12 requests"
    );
    assert!(served.len() >= 2, "the queued requests are served");
    let slowest_refusal = refused.iter().max().expect("refusals");
    let slowest_served = served.iter().max().expect("served");
    assert!(
        slowest_refusal < slowest_served,
        "refusals ({slowest_refusal:?}) come before the queue drains ({slowest_served:?})"
    );

    // Requests whose deadline passes while they wait are answered without running.
    let roomy = Harness::start(
        repository.path(),
        RuntimeSettings {
            dynamic_batching: false,
            queue_capacity: 64,
            ..RuntimeSettings::default()
        },
    )
    .await;
    drop(harness);
    let mut calls = Vec::new();
    for index in 0..8u32 {
        let mut client = roomy.client_as("gateway");
        calls.push(tokio::spawn(async move {
            let mut request = tonic::Request::new(support::predict(model, grey_image(64, index)));
            request.set_timeout(Duration::from_millis(150));
            client.predict(request).await.map(|_| ())
        }));
    }
    let mut expired = 0;
    for call in calls {
        if let Err(status) = call.await.expect("call") {
            assert!(
                matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
                "{status:?}"
            );
            expired += 1;
        }
    }
    assert!(expired > 0, "8 runs of a VGG16 cannot all finish in 150 ms");
    // Let the queue drain, then count what actually ran.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs: u64 = batch_sizes(&roomy, model)
        .await
        .iter()
        .map(|(_, runs)| runs)
        .sum();
    assert!(
        runs < 8,
        "{runs} of 8 requests ran; the expired ones must not have"
    );
}
