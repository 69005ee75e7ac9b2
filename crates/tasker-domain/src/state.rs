//! Task and step state machines (design §4). The only place the legal transitions are
//! written down; every writer asks [`TaskState::check`] / [`StepState::check`] first.

use std::{fmt, str::FromStr};

/// A transition the state machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal {entity} transition from {from} to {to}")]
pub struct IllegalTransition {
    pub entity: &'static str,
    pub from: String,
    pub to: String,
}

/// An unknown state name read from storage or input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state `{0}`")]
pub struct UnknownState(pub String);

macro_rules! states {
    ($name:ident, $entity:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// `Ok` when `self → to` is legal.
            pub fn check(self, to: $name) -> Result<(), IllegalTransition> {
                if self.can_become(to) {
                    Ok(())
                } else {
                    Err(IllegalTransition {
                        entity: $entity,
                        from: self.as_str().to_owned(),
                        to: to.as_str().to_owned(),
                    })
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s { $($text => Ok($name::$variant),)+ other => Err(UnknownState(other.to_owned())) }
            }
        }
    };
}

states!(TaskState, "task", {
    Pending => "pending",
    InProgress => "in_progress",
    Complete => "complete",
    Error => "error",
    Cancelled => "cancelled",
});

states!(StepState, "step", {
    Pending => "pending",
    Enqueued => "enqueued",
    InProgress => "in_progress",
    WaitingForRetry => "waiting_for_retry",
    Complete => "complete",
    Error => "error",
    ResolvedManually => "resolved_manually",
    Cancelled => "cancelled",
});

impl TaskState {
    /// `pending → in_progress → complete | error`; any non-terminal → `cancelled`;
    /// `error → in_progress` when an operator retries or resolves a step.
    pub fn can_become(self, to: TaskState) -> bool {
        use TaskState::*;
        matches!(
            (self, to),
            (Pending, InProgress)
                | (InProgress, Complete)
                | (InProgress, Error)
                | (Error, InProgress)
                | (Pending | InProgress | Error, Cancelled)
        )
    }

    /// No further transition happens on its own. `error` can still be resumed by an
    /// operator, but it is final for watchers: nothing more runs without one.
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Complete | TaskState::Error | TaskState::Cancelled)
    }
}

impl StepState {
    /// `pending → enqueued → in_progress → complete`;
    /// `in_progress → waiting_for_retry → enqueued`; `in_progress → error`;
    /// `error → resolved_manually | pending` (operator);
    /// `pending | enqueued | in_progress | waiting_for_retry → cancelled`.
    pub fn can_become(self, to: StepState) -> bool {
        use StepState::*;
        matches!(
            (self, to),
            (Pending, Enqueued)
                | (Enqueued, InProgress)
                | (InProgress, Complete)
                | (InProgress, WaitingForRetry)
                | (WaitingForRetry, Enqueued)
                | (InProgress, Error)
                | (Error, ResolvedManually)
                | (Error, Pending)
                | (Pending | Enqueued | InProgress | WaitingForRetry, Cancelled)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_paths_are_legal() {
        use StepState::*;
        for path in [
            &[Pending, Enqueued, InProgress, Complete][..],
            &[Pending, Enqueued, InProgress, WaitingForRetry, Enqueued, InProgress, Complete],
            &[Pending, Enqueued, InProgress, Error, ResolvedManually],
            &[Pending, Enqueued, InProgress, Error, Pending, Enqueued],
        ] {
            for pair in path.windows(2) {
                assert!(pair[0].check(pair[1]).is_ok(), "{} -> {}", pair[0], pair[1]);
            }
        }
        use TaskState as T;
        assert!(T::Pending.check(T::InProgress).is_ok());
        assert!(T::Error.check(T::InProgress).is_ok());
    }

    #[test]
    fn terminal_states_do_not_move_on_their_own() {
        use StepState::*;
        for to in StepState::ALL {
            assert!(Complete.check(*to).is_err(), "complete -> {to}");
            assert!(Cancelled.check(*to).is_err(), "cancelled -> {to}");
            assert!(ResolvedManually.check(*to).is_err(), "resolved -> {to}");
        }
        for to in TaskState::ALL {
            assert!(TaskState::Complete.check(*to).is_err());
            assert!(TaskState::Cancelled.check(*to).is_err());
        }
    }

    #[test]
    fn skipping_a_state_is_illegal() {
        let err = StepState::Pending.check(StepState::Complete).unwrap_err();
        assert_eq!(err.to_string(), "illegal step transition from pending to complete");
        assert!(StepState::Enqueued.check(StepState::Complete).is_err());
        assert!(StepState::Error.check(StepState::Complete).is_err());
        assert!(TaskState::Pending.check(TaskState::Complete).is_err());
        assert!(StepState::Complete.check(StepState::Cancelled).is_err());
    }

    #[test]
    fn names_round_trip() {
        for s in StepState::ALL {
            assert_eq!(s.as_str().parse::<StepState>().unwrap(), *s);
        }
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), *s);
        }
        assert!("done".parse::<TaskState>().is_err());
    }
}
