//! The standard `process_*` families (as the Prometheus client libraries export them), read
//! from `/proc/self` (CPU time from the process's CPU clock) when `/metrics` is scraped, and
//! `medai_build_info{version,commit}` and `medai_runtime_worker_threads`.
//! Nowhere but Linux has `/proc`; there the families are described but not set.

use std::sync::OnceLock;

/// Kernel clock ticks per second as `/proc` reports times (`USER_HZ`; the start time here).
/// Fixed at 100 on every architecture this runs on; the Prometheus Go client's procfs assumes
/// the same.
const USER_HZ: f64 = 100.0;

/// The version and the commit the binary was built from (see build.rs).
pub const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");
pub const BUILD_COMMIT: &str = env!("MEDAI_BUILD_COMMIT");

pub(crate) fn describe() {
    metrics::describe_gauge!(
        "medai_build_info",
        "Always 1; the labels name the version and the commit this binary was built from."
    );
    metrics::gauge!("medai_build_info", "version" => BUILD_VERSION, "commit" => BUILD_COMMIT)
        .set(1.0);
    metrics::describe_gauge!(
        WORKER_THREADS_GAUGE,
        "Worker threads of the process's async runtime (TOKIO_WORKER_THREADS when set, else one \
         per CPU the process may use); blocking work runs on a separate pool."
    );
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        metrics::gauge!(WORKER_THREADS_GAUGE).set(runtime.metrics().num_workers() as f64);
    }
}

/// How many workers the async runtime runs: how the process was sized (issue 14).
pub const WORKER_THREADS_GAUGE: &str = "medai_runtime_worker_threads";

/// What `/proc/self` says now.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessFigures {
    pub fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let fields = stat.as_deref().and_then(stat_fields_after_name);
        let field = |index: usize| -> Option<f64> { fields.as_ref()?.get(index)?.parse().ok() };
        let cpu_seconds = Some(process_cpu_seconds());
        // Numbered as in proc(5) minus 3: `state` (field 3) is index 0 after the name.
        let start_time_seconds = match (field(22 - 3), *boot_time()) {
            (Some(ticks), Some(boot)) => Some(boot + ticks / USER_HZ),
            _ => None,
        };
        let status = std::fs::read_to_string("/proc/self/status").ok();
        let kilobytes = |key: &str| -> Option<f64> {
            let line = status
                .as_deref()?
                .lines()
                .find(|line| line.starts_with(key))?;
            let value: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(value * 1024.0)
        };
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|entries| entries.count() as f64);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| {
                let line = limits
                    .lines()
                    .find(|line| line.starts_with("Max open files"))?;
                line.trim_start_matches("Max open files")
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
        Self {
            cpu_seconds,
            resident_bytes: kilobytes("VmRSS:"),
            virtual_bytes: kilobytes("VmSize:"),
            open_fds,
            max_fds,
            start_time_seconds,
        }
    }
}

/// User and system CPU time of all the process's threads so far, to the nanosecond. Not
/// `/proc/self/stat`'s utime and stime: those count 10 ms ticks, so a quiet service that had run
/// for less than a tick reported 0.
fn process_cpu_seconds() -> f64 {
    let spent = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    spent.tv_sec as f64 + spent.tv_nsec as f64 / 1e9
}

/// The fields of `/proc/self/stat` after `(comm)`, which may itself hold spaces and parentheses.
fn stat_fields_after_name(stat: &str) -> Option<Vec<String>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Seconds since the epoch at which the machine booted (`btime` in `/proc/stat`).
fn boot_time() -> &'static Option<f64> {
    static BOOT_TIME: OnceLock<Option<f64>> = OnceLock::new();
    BOOT_TIME.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        stat.lines()
            .find_map(|line| line.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()
    })
}

/// The `process_*` families in the Prometheus text format, as read now, for appending to the
/// recorder's exposition. Written here rather than through the recorder because CPU seconds
/// are fractional and the recorder's counters count whole units.
pub fn render() -> String {
    let figures = ProcessFigures::read();
    let families = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            figures.cpu_seconds,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            figures.resident_bytes,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            figures.virtual_bytes,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            figures.open_fds,
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            figures.max_fds,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            figures.start_time_seconds,
        ),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in families {
        if let Some(value) = value {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 12345 0";
        let fields = stat_fields_after_name(stat).expect("fields");
        assert_eq!(fields[0], "S");
        assert_eq!(fields[14 - 3], "250");
        assert_eq!(fields[15 - 3], "50");
        assert_eq!(fields[22 - 3], "12345");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reports_cpu_memory_descriptors_and_start_time() {
        let figures = ProcessFigures::read();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        // Any process that has run has spent some CPU, however little, to the nanosecond.
        assert!(figures.cpu_seconds.is_some_and(|seconds| seconds > 0.0));
        assert!(
            figures
                .resident_bytes
                .is_some_and(|bytes| bytes > 1024.0 * 1024.0)
        );
        assert!(figures.open_fds.is_some_and(|count| count >= 3.0));
        assert!(figures.max_fds.is_some_and(|count| count >= 3.0));
        let started = figures.start_time_seconds.expect("start time");
        assert!(
            started <= now + 1.0 && started > now - 86_400.0 * 365.0,
            "{started} vs {now}"
        );
        let text = render();
        for family in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{text}");
            assert!(text.contains(&format!("\n{family} ")), "{text}");
        }
    }
}
