//! The fault harness and the soak of issue 17, as programs (not timed tests).
//!
//! `chaos`: every fault of [`Fault::all`] in turn under a steady load through the gateway;
//! prints one line per fault and writes target/bench/chaos.json.
//! `chaos -- soak <minutes>`: measures the load's peak rate for 30 s, then runs it at half of
//! that for `<minutes>`, printing RSS and open descriptors of every service, database
//! connections and prediction p99 at the start and the end; writes target/bench/soak.json.
//! Run both through `scripts/chaos.sh` (it starts nothing on the network but loopback).
// A program that reports figures on standard output, as the other benches.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use medai_e2e::chaos::{ChaosRig, Fault, Window, output_file, run_faults};

fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match arguments.iter().position(|argument| argument == "soak") {
        Some(index) => {
            let minutes: f64 = arguments
                .get(index + 1)
                .and_then(|text| text.parse().ok())
                .unwrap_or(30.0);
            runtime.block_on(soak(Duration::from_secs_f64(minutes * 60.0)));
        }
        None => runtime.block_on(chaos()),
    }
}

async fn chaos() {
    let started = Instant::now();
    let reports = run_faults(&Fault::all(), 1, Duration::from_secs(3)).await;
    let json: Vec<serde_json::Value> = reports
        .iter()
        .map(|report| {
            serde_json::json!({
                "fault": report.fault,
                "ok": report.window.ok,
                "refused": report.window.refused,
                "failed": report.window.failed,
                "predictions": report.window.predictions.len(),
                "unrecorded": report.unrecorded,
                "chain_intact": report.chain_intact,
                "ledger_entries": report.ledger_entries,
                "recovered_after_s": report.recovered_after.as_secs_f64(),
            })
        })
        .collect();
    std::fs::write(
        output_file("chaos.json"),
        serde_json::to_vec_pretty(&json).expect("json"),
    )
    .expect("write chaos.json");
    println!(
        "\n| fault | ok | refused (stable code) | failed otherwise | unrecorded predictions | chain | recovered in |"
    );
    println!("|---|---|---|---|---|---|---|");
    for report in &reports {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} s |",
            report.fault,
            report.window.ok,
            report.window.refused_total(),
            report.window.failed_total(),
            report.unrecorded,
            if report.chain_intact {
                "intact"
            } else {
                "BROKEN"
            },
            report.recovered_after.as_secs_f64()
        );
    }
    println!("chaos run: {:.0} s", started.elapsed().as_secs_f64());
    let unrecorded: usize = reports.iter().map(|report| report.unrecorded).sum();
    assert_eq!(
        unrecorded, 0,
        "predictions were delivered without their ledger record"
    );
    assert!(
        reports.iter().all(|report| report.chain_intact),
        "a chain did not verify"
    );
}

fn describe(window: &Window, seconds: f64) -> String {
    format!(
        "{:.1} calls/s ok, {} refused {:?}, {} failed {:?}, prediction p50 {:.0} ms p99 {:.0} ms",
        window.ok as f64 / seconds,
        window.refused_total(),
        window.refused,
        window.failed_total(),
        window.failed,
        window.prediction_quantile_ms(0.5).unwrap_or(f64::NAN),
        window.prediction_quantile_ms(0.99).unwrap_or(f64::NAN)
    )
}

/// The one-minute load average of the machine, as /proc/loadavg gives it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

async fn soak(duration: Duration) {
    let rig = ChaosRig::start().await;
    const KINDS: f64 = 4.0;
    // The peak: one worker of each kind back to back.
    let peak_window = Duration::from_secs(30);
    let load = rig.start_load(1, None).await;
    tokio::time::sleep(peak_window).await;
    let peak = load.stop().await;
    let peak_rate = peak.ok as f64 / peak_window.as_secs_f64();
    println!("peak: {}", describe(&peak, peak_window.as_secs_f64()));
    // Half of it: each worker paced to KINDS / (peak / 2) seconds per call.
    let pace = Duration::from_secs_f64(KINDS / (peak_rate / 2.0).max(0.1));
    let processes_at_start = rig.process_figures();
    let connections_at_start = rig.database_connections().await;
    let load = rig.start_load(1, Some(pace)).await;
    let started = Instant::now();
    let minute = Duration::from_secs(60).min(duration / 4);
    let mut windows = Vec::new();
    while started.elapsed() < duration {
        tokio::time::sleep(minute).await;
        let window = load.take_window();
        // The machine's load beside each window: a p99 that moves with it is the machine's.
        println!(
            "soak {:>5.1} min: {} (load average {})",
            started.elapsed().as_secs_f64() / 60.0,
            describe(&window, minute.as_secs_f64()),
            load_average()
        );
        windows.push(window);
    }
    let processes_at_end = rig.process_figures();
    let connections_at_end = rig.database_connections().await;
    load.stop().await;
    let (unrecorded, entries) = {
        let predictions: Vec<(u64, String)> = windows
            .iter()
            .flat_map(|window| window.predictions.iter().cloned())
            .collect();
        rig.unrecorded(&predictions).await
    };
    let chain_intact = rig.chain_intact().await;
    let first = windows.first().cloned().unwrap_or_default();
    let last = windows.last().cloned().unwrap_or_default();
    let errors: u64 = windows
        .iter()
        .map(|window| window.refused_total() + window.failed_total())
        .sum();
    println!(
        "\nsoak of {:.1} min at half the peak ({peak_rate:.1} calls/s peak, each of 4 workers one call every {:.2} s)",
        duration.as_secs_f64() / 60.0,
        pace.as_secs_f64()
    );
    println!("| service | RSS start (MiB) | RSS end (MiB) | growth | fds start | fds end |");
    println!("|---|---|---|---|---|---|");
    let mut services = Vec::new();
    for (service, (rss_start, fds_start)) in &processes_at_start {
        let (rss_end, fds_end) = processes_at_end.get(service).copied().unwrap_or((0, 0));
        let growth = (rss_end as f64 - *rss_start as f64) / (*rss_start as f64) * 100.0;
        println!(
            "| {service} | {:.1} | {:.1} | {growth:+.1} % | {fds_start} | {fds_end} |",
            *rss_start as f64 / 1024.0,
            rss_end as f64 / 1024.0
        );
        services.push(serde_json::json!({
            "service": service, "rss_kib_start": rss_start, "rss_kib_end": rss_end,
            "rss_growth_percent": growth, "fds_start": fds_start, "fds_end": fds_end,
        }));
    }
    let p99_first = first.prediction_quantile_ms(0.99).unwrap_or(f64::NAN);
    let p99_last = last.prediction_quantile_ms(0.99).unwrap_or(f64::NAN);
    println!(
        "prediction p99 first window {p99_first:.0} ms, last window {p99_last:.0} ms (drift {:+.1} %)",
        (p99_last - p99_first) / p99_first * 100.0
    );
    println!(
        "database connections at start {connections_at_start:?}, at end {connections_at_end:?}"
    );
    println!(
        "errors (refused + failed) {errors}; predictions without ledger record {unrecorded} of {entries} ledger entries; chain {}",
        if chain_intact { "intact" } else { "BROKEN" }
    );
    let json = serde_json::json!({
        "minutes": duration.as_secs_f64() / 60.0,
        "peak_calls_per_second": peak_rate,
        "pace_seconds_per_worker_call": pace.as_secs_f64(),
        "services": services,
        "prediction_p99_ms_first": p99_first,
        "prediction_p99_ms_last": p99_last,
        "database_connections_start": connections_at_start,
        "database_connections_end": connections_at_end,
        "errors": errors,
        "unrecorded": unrecorded,
        "chain_intact": chain_intact,
    });
    std::fs::write(
        output_file("soak.json"),
        serde_json::to_vec_pretty(&json).expect("json"),
    )
    .expect("write soak.json");
    rig.stop().await;
    // Issue 17's bar: memory growth under 10 % in every service, descriptors and database
    // connections not growing (a few more, as a pool opens one, is not a leak), no error, nothing unrecorded, the chain intact.
    let mut failures = Vec::new();
    for (service, (rss_start, fds_start)) in &processes_at_start {
        let (rss_end, fds_end) = processes_at_end.get(service).copied().unwrap_or((0, 0));
        if rss_end as f64 > *rss_start as f64 * 1.10 {
            failures.push(format!("{service} RSS grew over 10 %"));
        }
        if fds_end > fds_start + 4 {
            failures.push(format!("{service} holds more file descriptors"));
        }
    }
    let connections =
        |figures: &std::collections::BTreeMap<String, i64>| figures.values().sum::<i64>();
    if connections(&connections_at_end) > connections(&connections_at_start) + 4 {
        failures.push("more database connections at the end".to_owned());
    }
    if errors > 0 {
        failures.push(format!("{errors} calls refused or failed"));
    }
    if unrecorded > 0 {
        failures.push(format!("{unrecorded} predictions without a ledger record"));
    }
    if !chain_intact {
        failures.push("the chain does not verify".to_owned());
    }
    if failures.is_empty() {
        println!("soak verdict: PASS");
    } else {
        println!("soak verdict: FAIL ({})", failures.join("; "));
        std::process::exit(1);
    }
}
