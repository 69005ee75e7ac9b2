//! Retry policy (design §4).
//!
//! The wait before attempt `n + 1`, after attempt `n` failed retryably, is
//!
//! ```text
//! delay(n) = min(base · multiplier^(n-1) · (1 + j), max)      j uniform in [-jitter, +jitter]
//! ```
//!
//! or, when the handler asked for a delay (`retry_after`), `min(retry_after, max)` with no
//! jitter. Defaults: base 1 s, multiplier 2, max 60 s, jitter 0.1 (±10 %).

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    pub multiplier: f64,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Fraction of the computed delay added or removed at random (0.1 = ±10 %).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_secs(1), multiplier: 2.0, max: Duration::from_secs(60), jitter: 0.1 }
    }
}

impl Backoff {
    /// The delay after failed attempt `attempt` (1-based), with `unit` in `[-1, 1]`
    /// scaling the jitter. Deterministic, for tests and for [`Backoff::delay`].
    pub fn delay_with(&self, attempt: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        if let Some(asked) = retry_after {
            return asked.min(self.max);
        }
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let raw = self.base.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let jittered = raw * (1.0 + self.jitter.clamp(0.0, 1.0) * unit.clamp(-1.0, 1.0));
        let capped = jittered.min(self.max.as_secs_f64()).max(0.0);
        Duration::from_secs_f64(capped)
    }

    /// The delay after failed attempt `attempt`, with random jitter.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        self.delay_with(attempt, retry_after, rand::random_range(-1.0..=1.0))
    }
}

/// How an attempt failed, as a worker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Worth trying again.
    Retryable,
    /// Trying again will not help.
    Permanent,
    /// The handler ran past the step's timeout (retried like `Retryable`).
    TimedOut,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Retryable => "retryable",
            FailureKind::Permanent => "permanent",
            FailureKind::TimedOut => "timed_out",
        }
    }
}

/// What the orchestrator does with a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureDecision {
    /// `waiting_for_retry`, next attempt after `delay`.
    Retry { delay: Duration },
    /// `error`: non-retryable, permanent, or out of attempts.
    Fail,
}

/// The retry rule: a failed attempt is retried when the failure is not permanent, the step
/// is retryable, and attempts are left (`attempts` counts the one that just failed; the
/// first attempt always runs whatever `retryable` says).
pub fn decide(
    kind: FailureKind,
    attempts: u32,
    max_attempts: u32,
    retryable: bool,
    backoff: &Backoff,
    retry_after: Option<Duration>,
) -> FailureDecision {
    if kind == FailureKind::Permanent || !retryable || attempts >= max_attempts {
        FailureDecision::Fail
    } else {
        FailureDecision::Retry { delay: backoff.delay(attempts, retry_after) }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn grows_geometrically_then_caps() {
        let b = Backoff::default();
        let secs = |n| b.delay_with(n, None, 0.0).as_secs_f64();
        assert_eq!([secs(1), secs(2), secs(3), secs(4)], [1.0, 2.0, 4.0, 8.0]);
        assert_eq!(secs(7), 60.0);
        assert_eq!(secs(1_000), 60.0);
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let b = Backoff::default();
        assert_eq!(b.delay_with(1, Some(Duration::from_secs(7)), 1.0), Duration::from_secs(7));
        assert_eq!(b.delay_with(1, Some(Duration::from_secs(600)), 0.0), Duration::from_secs(60));
    }

    #[test]
    fn decisions_follow_the_rule() {
        let b = Backoff::default();
        assert!(matches!(decide(FailureKind::Retryable, 1, 3, true, &b, None), FailureDecision::Retry { .. }));
        assert!(matches!(decide(FailureKind::TimedOut, 2, 3, true, &b, None), FailureDecision::Retry { .. }));
        assert_eq!(decide(FailureKind::Retryable, 3, 3, true, &b, None), FailureDecision::Fail);
        assert_eq!(decide(FailureKind::Permanent, 1, 3, true, &b, None), FailureDecision::Fail);
        assert_eq!(decide(FailureKind::Retryable, 1, 3, false, &b, None), FailureDecision::Fail);
        assert_eq!(decide(FailureKind::Retryable, 1, 1, true, &b, None), FailureDecision::Fail);
    }

    proptest! {
        #[test]
        fn jitter_stays_within_bounds(attempt in 1u32..20, unit in -1.0f64..=1.0) {
            let b = Backoff::default();
            let nominal = b.delay_with(attempt, None, 0.0).as_secs_f64();
            let d = b.delay_with(attempt, None, unit).as_secs_f64();
            prop_assert!(d <= 60.0 + 1e-9);
            prop_assert!(d >= nominal * 0.9 - 1e-9 && d <= nominal * 1.1 + 1e-9, "{} vs {}", d, nominal);
            let random = b.delay(attempt, None).as_secs_f64();
            prop_assert!(random >= nominal * 0.9 - 1e-9 && random <= (nominal * 1.1).min(60.0) + 1e-9);
        }
    }
}
