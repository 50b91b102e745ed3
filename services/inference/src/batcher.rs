//! Dynamic batching for one served model version: requests wait in a bounded queue; one worker
//! per ONNX Runtime session takes the first waiting request together with everything queued
//! behind it (up to the batch size), drops the ones whose caller has gone or whose deadline has
//! passed, and runs the rest in one call. A request that finds the version idle runs at once:
//! batches form only from what queued while a run was busy, so batching trades latency for
//! throughput only under load. The manifest's queue delay applies only then too: a worker that
//! starts while another session's run is in progress may wait that long to fill its batch.
//!
//! A run goes to the blocking pool so the runtime's threads keep serving calls meanwhile, except
//! a lone request that finds nothing else queued or running on a model whose last run took at
//! most [`INLINE_RUN_LIMIT`]: that one runs on the worker's own thread, because the hand-off to
//! the pool and back (two thread wake-ups) cost more than a light model's whole run.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ndarray::{Array4, Axis, concatenate};
use ort::session::Session;
use tokio::sync::{mpsc, oneshot};

use crate::error::InferenceError;
use crate::manifest::ModelManifest;
use crate::model::run_rows;

/// The longest model run, as last measured, that a lone request may make on the runtime's own
/// thread (tokio's guidance: a task should reach an `.await` every 10–100 µs; the light model's
/// run is ~10 µs, the brain-MRI model's tens of milliseconds).
pub const INLINE_RUN_LIMIT: Duration = Duration::from_micros(200);

/// The time per row of the version's last model run, in nanoseconds; `u64::MAX` until one has
/// run, so the first run of any model goes to the blocking pool.
#[derive(Debug)]
struct RunTimePerRow(AtomicU64);

impl RunTimePerRow {
    fn unknown() -> Self {
        Self(AtomicU64::new(u64::MAX))
    }

    fn record(&self, took: Duration, rows: usize) {
        let per_row = nanos(took) / (rows.max(1) as u64);
        self.0.store(per_row, Ordering::Relaxed);
    }

    /// Whether `rows` are expected to run within [`INLINE_RUN_LIMIT`].
    fn expects_within_inline_limit(&self, rows: usize) -> bool {
        self.0
            .load(Ordering::Relaxed)
            .checked_mul(rows as u64)
            .is_some_and(|expected| expected <= nanos(INLINE_RUN_LIMIT))
    }
}

/// What one request gets back.
#[derive(Debug)]
pub struct RowsOutput {
    /// One row of scores per input row.
    pub scores: Vec<Vec<f32>>,
    pub queued: Duration,
    pub computed: Duration,
    /// Rows in the run this request shared.
    pub batch_rows: usize,
}

struct Job {
    rows: Array4<f32>,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<RowsOutput, InferenceError>>,
    /// The span of the call that queued it: its batch's run is traced under it.
    caller: tracing::Span,
    /// Open while the job waits in the queue; closed when a worker takes it.
    queue_wait: tracing::Span,
}

/// Counters behind KServe's ModelStatistics (durations in nanoseconds).
#[derive(Debug, Default)]
pub struct VersionStatistics {
    pub success_count: AtomicU64,
    pub success_ns: AtomicU64,
    pub fail_count: AtomicU64,
    pub fail_ns: AtomicU64,
    pub queue_count: AtomicU64,
    pub queue_ns: AtomicU64,
    /// Requests computed, and the run time each of them spent.
    pub compute_count: AtomicU64,
    pub compute_ns: AtomicU64,
    /// Rows inferred.
    pub inference_count: AtomicU64,
    /// Runs of the model (batches).
    pub execution_count: AtomicU64,
    /// Unix milliseconds of the last run.
    pub last_inference_ms: AtomicU64,
    /// Batch size → (runs, compute ns).
    pub batches: Mutex<BTreeMap<u64, (u64, u64)>>,
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl VersionStatistics {
    fn record_request(&self, outcome: &Result<RowsOutput, InferenceError>, took: Duration) {
        let (count, ns) = match outcome {
            Ok(_) => (&self.success_count, &self.success_ns),
            Err(_) => (&self.fail_count, &self.fail_ns),
        };
        count.fetch_add(1, Ordering::Relaxed);
        ns.fetch_add(nanos(took), Ordering::Relaxed);
    }

    /// One run of `rows` rows for `requests` requests. As in Triton, compute counts are per
    /// request (each request spent the whole run computing); runs are the execution count.
    fn record_run(&self, rows: usize, requests: usize, computed: Duration) {
        let rows = rows as u64;
        let requests = requests as u64;
        self.compute_count.fetch_add(requests, Ordering::Relaxed);
        self.compute_ns
            .fetch_add(nanos(computed).saturating_mul(requests), Ordering::Relaxed);
        self.inference_count.fetch_add(rows, Ordering::Relaxed);
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        self.last_inference_ms.store(now_ms, Ordering::Relaxed);
        if let Ok(mut batches) = self.batches.lock() {
            let entry = batches.entry(rows).or_default();
            entry.0 += 1;
            entry.1 += nanos(computed);
        }
    }
}

/// This version's metric handles, registered once instead of on every request.
struct VersionMetrics {
    request_seconds: metrics::Histogram,
    queue_seconds: metrics::Histogram,
    compute_seconds: metrics::Histogram,
    batch_size: metrics::Histogram,
    queue_depth: metrics::Gauge,
    succeeded: metrics::Counter,
    /// Triton's per-model families (cumulative microseconds as counters), so dashboards made
    /// for Triton work unchanged.
    triton: TritonMetrics,
    labels: [(&'static str, String); 2],
}

/// Triton's `nv_inference_*` families for one model version, counted as Triton counts them:
/// requests by outcome, inferences (rows) and executions (model runs), and cumulative
/// request, queue and compute microseconds (compute per request: each request of a batch
/// spent the whole run computing).
struct TritonMetrics {
    request_success: metrics::Counter,
    request_failure: metrics::Counter,
    inference_count: metrics::Counter,
    exec_count: metrics::Counter,
    request_duration_us: metrics::Counter,
    queue_duration_us: metrics::Counter,
    compute_infer_duration_us: metrics::Counter,
}

impl TritonMetrics {
    fn new(labels: &[(&'static str, String); 2]) -> Self {
        use crate::metric_catalog as catalog;
        Self {
            request_success: metrics::counter!(catalog::NV_REQUEST_SUCCESS, labels),
            request_failure: metrics::counter!(catalog::NV_REQUEST_FAILURE, labels),
            inference_count: metrics::counter!(catalog::NV_INFERENCE_COUNT, labels),
            exec_count: metrics::counter!(catalog::NV_EXEC_COUNT, labels),
            request_duration_us: metrics::counter!(catalog::NV_REQUEST_DURATION_US, labels),
            queue_duration_us: metrics::counter!(catalog::NV_QUEUE_DURATION_US, labels),
            compute_infer_duration_us: metrics::counter!(
                catalog::NV_COMPUTE_INFER_DURATION_US,
                labels
            ),
        }
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl VersionMetrics {
    fn new(manifest: &ModelManifest) -> Self {
        let labels = [
            ("model", manifest.name.clone()),
            ("version", manifest.version.clone()),
        ];
        Self {
            request_seconds: metrics::histogram!("medai_inference_request_seconds", &labels),
            queue_seconds: metrics::histogram!("medai_inference_queue_seconds", &labels),
            compute_seconds: metrics::histogram!("medai_inference_compute_seconds", &labels),
            batch_size: metrics::histogram!("medai_inference_batch_size", &labels),
            queue_depth: metrics::gauge!("medai_inference_queue_depth", &labels),
            succeeded: metrics::counter!("medai_inference_requests_total", "model" => labels[0].1.clone(), "version" => labels[1].1.clone(), "code" => "OK"),
            triton: TritonMetrics::new(&labels),
            labels,
        }
    }

    fn count_outcome(&self, outcome: &Result<RowsOutput, InferenceError>, took: Duration) {
        self.triton.request_duration_us.increment(micros(took));
        match outcome {
            Ok(_) => {
                self.succeeded.increment(1);
                self.triton.request_success.increment(1);
            }
            Err(error) => {
                self.triton.request_failure.increment(1);
                let code = medai_runtime::ServiceError::reason(error);
                metrics::counter!("medai_inference_requests_total", "model" => self.labels[0].1.clone(), "version" => self.labels[1].1.clone(), "code" => code)
                    .increment(1);
            }
        }
    }
}

/// A model version being served: its manifest, its queue and its workers. Dropping the last
/// handle closes the queue; the workers finish what is queued and then release their sessions,
/// so a swap never cuts off a request already accepted.
pub struct ServedVersion {
    pub manifest: ModelManifest,
    /// The largest batch one run takes (1 when batching is off).
    pub max_batch_rows: usize,
    pub sessions: usize,
    pub statistics: Arc<VersionStatistics>,
    queue: mpsc::Sender<Job>,
    depth: Arc<QueueDepth>,
    metrics: Arc<VersionMetrics>,
}

/// Requests queued and not yet taken by a worker. A request is counted before it is sent, so a
/// worker never takes more than was counted; the count still saturates at zero rather than
/// wrapping (a wrapped gauge reads 1.8e19, and debug builds panic on the subtraction).
#[derive(Debug, Default)]
pub struct QueueDepth {
    count: AtomicUsize,
}

impl QueueDepth {
    /// One more request queued; the new depth.
    pub fn add(&self) -> usize {
        self.count.fetch_add(1, Ordering::AcqRel).saturating_add(1)
    }

    /// `taken` requests left the queue (taken by a worker, or never sent); the new depth.
    pub fn remove(&self, taken: usize) -> usize {
        let previous = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |depth| {
                Some(depth.saturating_sub(taken))
            })
            .unwrap_or_else(|depth| depth);
        previous.saturating_sub(taken)
    }

    pub fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

impl ServedVersion {
    /// Starts one worker per session. `batching` off runs every request alone.
    pub fn start(
        manifest: ModelManifest,
        sessions: Vec<Session>,
        batching: bool,
        queue_capacity: usize,
    ) -> Arc<Self> {
        let max_batch_rows = if batching {
            manifest.batching.max_batch_size
        } else {
            1
        };
        let max_delay = if batching {
            Duration::from_micros(manifest.batching.max_queue_delay_microseconds)
        } else {
            Duration::ZERO
        };
        let (queue, receiver) = mpsc::channel(queue_capacity.max(1));
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let statistics = Arc::new(VersionStatistics::default());
        let depth = Arc::new(QueueDepth::default());
        let running = Arc::new(AtomicUsize::new(0));
        let run_time = Arc::new(RunTimePerRow::unknown());
        let metrics = Arc::new(VersionMetrics::new(&manifest));
        let shared_manifest = Arc::new(manifest.clone());
        let session_count = sessions.len();
        for session in sessions {
            let worker = Worker {
                manifest: shared_manifest.clone(),
                metrics: metrics.clone(),
                receiver: receiver.clone(),
                statistics: statistics.clone(),
                depth: depth.clone(),
                running: running.clone(),
                run_time: run_time.clone(),
                max_batch_rows,
                max_delay,
                carried: None,
            };
            tokio::spawn(worker.run(session));
        }
        Arc::new(Self {
            manifest,
            max_batch_rows,
            sessions: session_count,
            statistics,
            queue,
            depth,
            metrics,
        })
    }

    /// Queues `rows` and waits for their scores. A full queue is refused at once.
    pub async fn infer(
        &self,
        rows: Array4<f32>,
        deadline: Option<Instant>,
    ) -> Result<RowsOutput, InferenceError> {
        let started = Instant::now();
        let outcome = self.queue_and_wait(rows, deadline, started).await;
        let took = started.elapsed();
        self.statistics.record_request(&outcome, took);
        self.metrics.request_seconds.record(took.as_secs_f64());
        self.metrics.count_outcome(&outcome, took);
        outcome
    }

    async fn queue_and_wait(
        &self,
        rows: Array4<f32>,
        deadline: Option<Instant>,
        enqueued: Instant,
    ) -> Result<RowsOutput, InferenceError> {
        let count = rows.shape()[0];
        if count == 0 || count > self.max_batch_rows {
            return Err(InferenceError::BatchTooLarge {
                rows: count,
                max: self.max_batch_rows,
            });
        }
        let (reply, answer) = oneshot::channel();
        let caller = tracing::Span::current();
        let job = Job {
            rows,
            deadline,
            enqueued,
            reply,
            queue_wait: tracing::info_span!(parent: &caller, "inference.queue_wait"),
            caller,
        };
        // Counted before it is sent: a worker may take it before `try_send` returns.
        let depth = self.depth.add();
        if let Err(error) = self.queue.try_send(job) {
            let depth = self.depth.remove(1);
            self.metrics.queue_depth.set(depth as f64);
            return Err(match error {
                mpsc::error::TrySendError::Full(_) => InferenceError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => {
                    InferenceError::Failed("the model version stopped serving".to_owned())
                }
            });
        }
        self.metrics.queue_depth.set(depth as f64);
        answer.await.map_err(|_| {
            InferenceError::Failed("the batch worker stopped before answering".to_owned())
        })?
    }

    pub fn queue_depth(&self) -> usize {
        self.depth.get()
    }
}

/// The rows of a batch's requests as one array, in order. A lone request's rows are its own
/// array, moved rather than copied.
fn batch_rows(mut inputs: Vec<Array4<f32>>) -> Result<Array4<f32>, crate::model::ModelError> {
    if inputs.len() == 1
        && let Some(rows) = inputs.pop()
    {
        return Ok(rows);
    }
    let views: Vec<_> = inputs.iter().map(|rows| rows.view()).collect();
    concatenate(Axis(0), &views).map_err(|error| crate::model::ModelError::Run(error.to_string()))
}

struct Worker {
    manifest: Arc<ModelManifest>,
    metrics: Arc<VersionMetrics>,
    receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    statistics: Arc<VersionStatistics>,
    depth: Arc<QueueDepth>,
    /// Runs in progress across this version's workers.
    running: Arc<AtomicUsize>,
    run_time: Arc<RunTimePerRow>,
    max_batch_rows: usize,
    max_delay: Duration,
    /// A job that did not fit the previous batch; it starts the next one.
    carried: Option<Job>,
}

impl Worker {
    async fn run(mut self, mut session: Session) {
        while let Some(batch) = self.gather().await {
            let batch = self.drop_abandoned(batch);
            if batch.is_empty() {
                continue;
            }
            match self.run_batch(session, batch).await {
                Some(returned) => session = returned,
                None => return,
            }
        }
    }

    /// The next batch, or `None` once the queue is closed and empty: the first waiting request
    /// and everything queued behind it. Only while another worker's run is in progress does it
    /// wait (at most the queue delay after the first request was queued) for more.
    async fn gather(&mut self) -> Option<Vec<Job>> {
        let mut receiver = self.receiver.lock().await;
        let first = match self.carried.take() {
            Some(job) => job,
            None => receiver.recv().await?,
        };
        let mut rows = first.rows.shape()[0];
        let until = tokio::time::Instant::from_std(first.enqueued + self.max_delay);
        let mut batch = vec![first];
        while rows < self.max_batch_rows {
            let next = match receiver.try_recv() {
                Ok(job) => job,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let under_load = self.running.load(Ordering::Acquire) > 0;
                    if !under_load || self.max_delay.is_zero() {
                        break;
                    }
                    match tokio::time::timeout_at(until, receiver.recv()).await {
                        Ok(Some(job)) => job,
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            let next_rows = next.rows.shape()[0];
            if rows + next_rows > self.max_batch_rows {
                self.carried = Some(next);
                break;
            }
            rows += next_rows;
            batch.push(next);
        }
        drop(receiver);
        let depth = self.depth.remove(batch.len());
        self.metrics.queue_depth.set(depth as f64);
        Some(batch)
    }

    /// Answers, without running them, jobs whose caller has gone or whose deadline has passed.
    fn drop_abandoned(&self, batch: Vec<Job>) -> Vec<Job> {
        let now = Instant::now();
        batch
            .into_iter()
            .filter_map(|job| {
                if job.reply.is_closed() {
                    return None;
                }
                if job.deadline.is_some_and(|deadline| deadline <= now) {
                    let _ = job.reply.send(Err(InferenceError::DeadlinePassed));
                    return None;
                }
                Some(job)
            })
            .collect()
    }

    /// Runs one batch; gives the session back unless the run could not complete at all.
    async fn run_batch(&self, mut session: Session, batch: Vec<Job>) -> Option<Session> {
        let started = Instant::now();
        let mut row_counts = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        let mut inputs = Vec::with_capacity(batch.len());
        // One ONNX Runtime run serves the whole batch: its span hangs under the first caller's
        // call and follows from the others'.
        let run_span = tracing::info_span!(
            parent: batch.first().map(|job| &job.caller).and_then(tracing::Span::id),
            "inference.onnxruntime_run",
            model = %self.manifest.name,
            version = %self.manifest.version,
            batch_requests = batch.len(),
        );
        for (position, job) in batch.into_iter().enumerate() {
            drop(job.queue_wait);
            if position > 0 {
                run_span.follows_from(&job.caller);
            }
            let queued = started.duration_since(job.enqueued);
            self.metrics.queue_seconds.record(queued.as_secs_f64());
            self.metrics
                .triton
                .queue_duration_us
                .increment(micros(queued));
            self.statistics.queue_count.fetch_add(1, Ordering::Relaxed);
            self.statistics
                .queue_ns
                .fetch_add(nanos(queued), Ordering::Relaxed);
            row_counts.push(job.rows.shape()[0]);
            replies.push((job.reply, queued));
            inputs.push(job.rows);
        }
        let total_rows: usize = row_counts.iter().sum();
        let manifest = self.manifest.clone();
        let others_running = self.running.fetch_add(1, Ordering::AcqRel);
        let inline = replies.len() == 1
            && others_running == 0
            && self.depth.get() == 0
            && self.run_time.expects_within_inline_limit(total_rows);
        let run = move || {
            let _run = run_span.enter();
            let ran = Instant::now();
            let result =
                batch_rows(inputs).and_then(|rows| run_rows(&mut session, &manifest, rows));
            (session, result, ran.elapsed())
        };
        let outcome = if inline {
            std::panic::catch_unwind(AssertUnwindSafe(run)).map_err(drop)
        } else {
            tokio::task::spawn_blocking(run).await.map_err(drop)
        };
        self.running.fetch_sub(1, Ordering::AcqRel);
        let computed = started.elapsed();
        let Ok((session, result, ran_for)) = outcome else {
            tracing::error!(model = %self.manifest.name, version = %self.manifest.version, "a batch run panicked; this worker stops");
            for (reply, _) in replies {
                let _ = reply.send(Err(InferenceError::Failed(
                    "the model run failed".to_owned(),
                )));
            }
            return None;
        };
        self.run_time.record(ran_for, total_rows);
        self.metrics.compute_seconds.record(computed.as_secs_f64());
        self.metrics.batch_size.record(total_rows as f64);
        let triton = &self.metrics.triton;
        triton.exec_count.increment(1);
        triton.inference_count.increment(total_rows as u64);
        triton
            .compute_infer_duration_us
            .increment(micros(computed).saturating_mul(row_counts.len() as u64));
        self.statistics
            .record_run(total_rows, row_counts.len(), computed);
        match result {
            Ok(scores) => {
                let mut scores = scores.into_iter();
                for ((reply, queued), rows) in replies.into_iter().zip(row_counts) {
                    let _ = reply.send(Ok(RowsOutput {
                        scores: scores.by_ref().take(rows).collect(),
                        queued,
                        computed,
                        batch_rows: total_rows,
                    }));
                }
            }
            Err(error) => {
                tracing::warn!(model = %self.manifest.name, version = %self.manifest.version, error = %error, "batch run failed");
                for (reply, _) in replies {
                    let _ = reply.send(Err(InferenceError::Failed(error.to_string())));
                }
            }
        }
        Some(session)
    }
}

#[cfg(test)]
mod tests {
    use super::{QueueDepth, RunTimePerRow, batch_rows};
    use ndarray::Array4;
    use std::time::Duration;

    fn rows(count: usize, first: f32) -> Array4<f32> {
        Array4::from_shape_fn((count, 2, 2, 1), |(row, y, x, _)| {
            first + (row * 4 + y * 2 + x) as f32
        })
    }

    #[test]
    fn a_batch_holds_its_requests_rows_in_order_and_a_lone_request_is_moved_whole() {
        let lone = rows(3, 0.0);
        let pointer = lone.as_ptr();
        let moved = batch_rows(vec![lone.clone()]).expect("lone");
        assert_eq!(moved, lone);
        let moved = batch_rows(vec![lone]).expect("lone");
        assert_eq!(
            moved.as_ptr(),
            pointer,
            "a lone request's rows are not copied"
        );
        let batch = batch_rows(vec![rows(1, 100.0), rows(2, 200.0)]).expect("batch");
        assert_eq!(batch.shape(), [3, 2, 2, 1]);
        let expected: Vec<f32> = rows(1, 100.0)
            .iter()
            .chain(rows(2, 200.0).iter())
            .copied()
            .collect();
        assert_eq!(batch.iter().copied().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn only_a_model_measured_fast_enough_for_the_rows_asked_runs_inline() {
        let run_time = RunTimePerRow::unknown();
        assert!(
            !run_time.expects_within_inline_limit(1),
            "a model never run goes to the blocking pool first"
        );
        run_time.record(Duration::from_micros(120), 1);
        assert!(run_time.expects_within_inline_limit(1));
        assert!(
            !run_time.expects_within_inline_limit(2),
            "two rows of a 120 µs model exceed the limit"
        );
        run_time.record(Duration::from_micros(400), 8);
        assert!(run_time.expects_within_inline_limit(4));
        assert!(!run_time.expects_within_inline_limit(5));
        run_time.record(Duration::from_millis(30), 1);
        assert!(
            !run_time.expects_within_inline_limit(1),
            "a heavy model stays on the blocking pool"
        );
    }

    #[test]
    fn queue_depth_counts_and_never_wraps_below_zero() {
        let depth = QueueDepth::default();
        assert_eq!(depth.add(), 1);
        assert_eq!(depth.add(), 2);
        assert_eq!(depth.remove(2), 0);
        // A worker that takes more than was counted (the old order: sent, taken, then counted)
        // leaves the depth at zero instead of wrapping to usize::MAX or panicking.
        assert_eq!(depth.remove(1), 0);
        assert_eq!(depth.get(), 0);
        assert_eq!(depth.add(), 1);
    }
}
