//! CPU time per prediction by process, from /proc (user + system): the load-independent
//! figure the benchmarks report beside their rates.

use std::collections::BTreeMap;

/// CPU seconds of this process's descendants, by command name (`medai-*` each under its own
/// name, any other under `other`), of this process as "benchmark client", and of the suite's
/// PostgreSQL as "postgresql (whole cluster)" ([`postgres_cpu_seconds`]: whichever side a
/// round drives is the one using it).
pub fn cpu_seconds_by_process(other: &str) -> BTreeMap<String, f64> {
    let ticks = 100.0; // USER_HZ on Linux
    let own = std::process::id();
    let mut parents = BTreeMap::new();
    let mut figures = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return figures;
    };
    let mut stats = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // comm is in parentheses and may hold spaces; fields after it are space separated.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let parent: u32 = fields[1].parse().unwrap_or(0);
        let cpu =
            fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
        parents.insert(pid, parent);
        stats.push((pid, name, cpu / ticks));
    }
    let descends_from_us = |mut pid: u32| {
        for _ in 0..8 {
            match parents.get(&pid) {
                Some(&parent) if parent == own => return true,
                Some(&parent) => pid = parent,
                None => return false,
            }
        }
        false
    };
    for (pid, name, cpu) in stats {
        if descends_from_us(pid) {
            let group = if name.starts_with("medai-") {
                name
            } else {
                other.to_owned()
            };
            *figures.entry(group).or_insert(0.0) += cpu;
        }
    }
    figures.insert("benchmark client".to_owned(), own_cpu_seconds());
    if std::env::var_os("MEDAI_TEST_PG_DATA").is_some() {
        figures.insert(
            "postgresql (whole cluster)".to_owned(),
            postgres_cpu_seconds(),
        );
    }
    if let Some(redis) = redis_cpu_seconds() {
        figures.insert("redis".to_owned(), redis);
    }
    figures
}

/// CPU seconds (user + system) of the suite's Redis, whose pid file `scripts/test-servers.sh`
/// names in `MEDAI_TEST_REDIS_PIDFILE`; `None` without one.
pub fn redis_cpu_seconds() -> Option<f64> {
    let pid = std::fs::read_to_string(std::env::var_os("MEDAI_TEST_REDIS_PIDFILE")?).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks = |index: usize| fields.get(index)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// CPU seconds (user + system) of the suite's PostgreSQL: its postmaster (with the backends
/// it has reaped) and every live child of it, from /proc. 0 when `MEDAI_TEST_PG_DATA` is unset.
pub fn postgres_cpu_seconds() -> f64 {
    let Ok(data) = std::env::var("MEDAI_TEST_PG_DATA") else {
        return 0.0;
    };
    let Some(postmaster) = std::fs::read_to_string(format!("{data}/postmaster.pid"))
        .ok()
        .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok())
    else {
        return 0.0;
    };
    let stat_of = |pid: u32| -> Option<(u32, f64, f64)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let close = stat.rfind(')')?;
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let number = |index: usize| fields.get(index)?.parse::<f64>().ok();
        Some((
            fields.get(1)?.parse().ok()?,
            (number(11)? + number(12)?) / 100.0,
            (number(13)? + number(14)?) / 100.0,
        ))
    };
    let mut seconds = stat_of(postmaster).map_or(0.0, |(_, own, reaped)| own + reaped);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some((parent, own, _)) = stat_of(pid)
            && parent == postmaster
        {
            seconds += own;
        }
    }
    seconds
}

fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
    (fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0)) / 100.0
}

/// CPU microseconds per prediction by process over a measured stretch.
pub fn cpu_per_prediction(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    predictions: usize,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(name, seconds)| {
            let spent = seconds - before.get(name).copied().unwrap_or(0.0);
            (name.clone(), spent * 1e6 / predictions as f64)
        })
        .filter(|(_, micros)| *micros > 0.5)
        .collect()
}
