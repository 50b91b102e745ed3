//! What the benchmark programs share: throughput and latency quantiles from measured calls,
//! and their JSON reports under target/bench/.

use std::time::Duration;

/// Calls per second over the wall time, and latency quantiles in milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Throughput {
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Throughput {
    /// From every call's latency and the wall time they took together.
    pub fn measure(mut latencies: Vec<Duration>, wall: Duration) -> Self {
        latencies.sort();
        let at = |quantile: f64| {
            let index = ((latencies.len() as f64 - 1.0) * quantile).round() as usize;
            latencies[index].as_secs_f64() * 1000.0
        };
        Self {
            per_second: latencies.len() as f64 / wall.as_secs_f64(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
        }
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "per_second": self.per_second,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
        })
    }
}

/// Writes `report` as target/bench/<name>.json.
pub fn write_report(name: &str, report: serde_json::Value) {
    let directory = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&directory).expect("bench folder");
    std::fs::write(
        directory.join(format!("{name}.json")),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("write report");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_rate_come_from_the_samples() {
        let latencies: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let figures = Throughput::measure(latencies, Duration::from_secs(2));
        assert_eq!(figures.per_second, 50.0);
        assert_eq!(figures.p50_ms, 51.0);
        assert_eq!(figures.p99_ms, 99.0);
    }
}
