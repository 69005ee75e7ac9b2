//! Where the CPU goes: CPU seconds per process name (from /proc), so a scenario's cost can
//! be split between Postgres, RabbitMQ, the services and the load generator itself.

use std::collections::BTreeMap;

/// CPU seconds used so far by every process, summed by name.
pub fn snapshot() -> BTreeMap<String, f64> {
    let ticks = 100.0; // USER_HZ on Linux
    let mut by_name = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return by_name };
    for entry in entries.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ... utime(14) stime(15)
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        // kernel workers rename themselves with their current job: one bucket for them all
        let name = &stat[open + 1..close];
        let name = if name.starts_with("kworker") { "kworker" } else { name };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let used = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        // after the comm: state is field 0, so utime (14th overall) is 11, stime 12
        *by_name.entry(name.to_owned()).or_insert(0.0) += (used(11) + used(12)) / ticks;
    }
    by_name
}

/// The CPU seconds each process name used between two snapshots, largest first, with the
/// rest summed as `other`.
pub fn used(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let mut deltas: Vec<(String, f64)> = after
        .iter()
        .map(|(name, t)| (name.clone(), t - before.get(name).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();
    deltas.sort_by(|a, b| b.1.total_cmp(&a.1));
    let shown: Vec<String> = deltas.iter().take(8).map(|(n, d)| format!("{n} {d:.1}")).collect();
    let rest: f64 = deltas.iter().skip(8).map(|(_, d)| d).sum::<f64>().max(0.0);
    format!("{}, other {rest:.1} (CPU s)", shown.join(", "))
}
