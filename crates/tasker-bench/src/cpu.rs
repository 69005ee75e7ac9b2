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

/// CPU seconds the whole machine has spent busy so far (every process and the kernel:
/// `/proc/stat`'s user, nice, system, irq and softirq time, over all cores).
pub fn busy_seconds() -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return f64::NAN };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return f64::NAN };
    let fields: Vec<f64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq …
    [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum::<f64>() / ticks
}

/// The machine's cores.
pub fn cores() -> f64 {
    std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(f64::NAN)
}

/// Units of work per second the machine would do with every core busy, at the CPU each
/// unit took (`busy` CPU seconds for `units`): the ceiling of a CPU-bound scenario.
pub fn ceiling(units: f64, busy: f64) -> f64 {
    units / busy * cores()
}
