//! Latency histograms and the figures a run reports.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Microsecond latencies.
pub struct Latencies(Histogram<u64>);

impl Latencies {
    pub fn new() -> Latencies {
        Latencies(Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"))
    }

    pub fn record(&mut self, d: Duration) {
        let _ = self.0.record((d.as_micros() as u64).max(1));
    }

    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn mean_ms(&self) -> f64 {
        self.0.mean() / 1000.0
    }
}

/// Quantile (in seconds) of a Prometheus histogram given its cumulative buckets
/// `(upper bound, count)`, interpolating linearly inside the bucket.
pub fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let span = count - lower.1;
            let fraction = if span > 0.0 { (rank - lower.1) / span } else { 1.0 };
            return Some(lower.0 + (bound - lower.0) * fraction);
        }
        lower = (bound, count);
    }
    None
}

/// Cumulative buckets of a histogram in Prometheus text, minus an earlier scrape's.
/// `series` is its name, with its labels when it has any (`name{label="value"}`).
pub fn histogram_delta(before: &str, after: &str, series: &str) -> Vec<(f64, f64)> {
    let (name, labels) = series.split_once('{').unwrap_or((series, ""));
    let labels: Vec<&str> = labels.trim_end_matches('}').split(',').filter(|l| !l.is_empty()).collect();
    let prefix = format!("{name}_bucket{{");
    // the series' labels, in any order among the others (`le`)
    let ours = |line: &str| {
        let Some(rest) = line.strip_prefix(&prefix) else { return false };
        let present: Vec<&str> = rest.split('}').next().unwrap_or_default().split(',').collect();
        labels.iter().all(|l| present.contains(l))
    };
    let parse = |text: &str| -> Vec<(f64, f64)> {
        text.lines()
            .filter(|l| ours(l))
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((bound, l.rsplit(' ').next()?.parse().ok()?))
            })
            .collect()
    };
    let (b, a) = (parse(before), parse(after));
    a.iter().zip(b.iter().map(|x| x.1).chain(std::iter::repeat(0.0))).map(|(&(le, n), m)| (le, n - m)).collect()
}

/// The value of a counter (summed over its label sets) in Prometheus text.
pub fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One reported figure of one repeat.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub id: &'static str,
    pub name: &'static str,
    pub unit: &'static str,
    pub value: f64,
    /// The target, as text (`≤ 50`), when the issue sets one.
    pub target: Option<&'static str>,
    /// Whether a lower value is better (latencies, statements).
    pub lower_is_better: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_quantiles_interpolate() {
        let buckets = [(0.001, 0.0), (0.002, 50.0), (0.004, 100.0), (f64::INFINITY, 100.0)];
        assert!((bucket_quantile(&buckets, 0.5).unwrap() - 0.002).abs() < 1e-9);
        assert!((bucket_quantile(&buckets, 0.25).unwrap() - 0.0015).abs() < 1e-9);
        assert!((bucket_quantile(&buckets, 0.99).unwrap() - 0.00396).abs() < 1e-6);
        assert_eq!(bucket_quantile(&[(1.0, 0.0)], 0.5), None);
    }

    #[test]
    fn prometheus_text_is_read() {
        let before = "h_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nc_total 5\n";
        let after = "h_bucket{le=\"0.1\"} 4\nh_bucket{le=\"+Inf\"} 6\nc_total 9\n";
        assert_eq!(histogram_delta(before, after, "h"), [(0.1, 3.0), (f64::INFINITY, 4.0)]);
        assert_eq!(counter(after, "c_total"), 9.0);
    }

    #[test]
    fn a_labelled_series_is_read_alone() {
        // as prometheus_client writes them, `le` first
        let text = "h_bucket{le=\"0.1\",phase=\"read\"} 1\nh_bucket{le=\"+Inf\",phase=\"read\"} 2\n\
                    h_bucket{le=\"0.1\",phase=\"write\"} 5\nh_bucket{le=\"+Inf\",phase=\"write\"} 7\n\
                    hh_bucket{le=\"0.1\",phase=\"write\"} 9\n";
        assert_eq!(histogram_delta("", text, "h{phase=\"write\"}"), [(0.1, 5.0), (f64::INFINITY, 7.0)]);
        assert_eq!(histogram_delta("", text, "h{phase=\"read\"}"), [(0.1, 1.0), (f64::INFINITY, 2.0)]);
        assert!(histogram_delta("", text, "h{phase=\"apply\"}").is_empty());
    }
}
