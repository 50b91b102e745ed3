//! Structured JSON logs through `tracing`, one line per event, with the service name on every
//! line. Fields, never interpolated strings, carry values; none of them may hold PHI.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// Installs the JSON log subscriber once for the process. `filter` uses `RUST_LOG` syntax.
/// A second call (tests that start several services in one process) keeps the first.
pub fn init_json_logging(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _already_installed = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .with_span_events(FmtSpan::NONE)
        .with_writer(std::io::stderr)
        .try_init();
}
