//! Why: every reason Kubernetes mode gives, in a Condition's `reason` or an
//! Event's, as one type.
//!
//! A run's failure is the core's [`ErrorKind`] (whose name is also the
//! backup metrics' label); everything Kubernetes mode decides on its own is
//! a variant here. Each variant's name is the CamelCase string users see,
//! so `kubectl get` columns, Events and alerts read the same words; this
//! file is the one place a kind becomes a string.

use crate::core::error::ErrorKind;

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// A Condition's or Event's reason.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            /// A run's failure, by the core's kind.
            Run(ErrorKind),
            $($(#[$doc])* $name,)*
        }

        impl Reason {
            /// Every reason Kubernetes mode decides on its own.
            pub const OWN: &[Reason] = &[$(Reason::$name),*];

            /// The CamelCase reason.
            pub fn as_str(self) -> &'static str {
                match self {
                    Reason::Run(kind) => kind.reason(),
                    $(Reason::$name => stringify!($name),)*
                }
            }
        }
    };
}

reasons! {
    // Resolving a group (its Resolved and Protectable conditions).
    /// Every member was found.
    AllMembersFound,
    /// A backup can run now.
    Ready,
    /// The spec asks for something that cannot be meant.
    InvalidSpec,
    /// A request to the API server failed.
    APIError,
    MemberNotFound,
    TooManyPods,
    TooManyVolumes,
    NoAgent,
    PodNotRunning,
    VolumeNotFound,
    VolumeNotPVC,
    PVCNotFound,
    PVCUnbound,
    NotCSI,
    NoSnapshotClass,
    ClassDriverMismatch,
    AtomicityUnknown,
    /// Some list entries were left out of a status to keep it in bounds.
    StatusTooLarge,
    // Backups.
    GroupNotFound,
    GroupBusy,
    Waiting,
    ArtefactsSecretExists,
    Running,
    /// A backup's run failed (its `Completed` condition says how).
    Failed,
    /// The controller that ran it stopped before it ended.
    ControllerRestarted,
    Succeeded,
    // Quiesces.
    Frozen,
    Held,
    Expired,
    Thawed,
    // Schedules.
    Valid,
    Scheduled,
    Skipped,
    Missed,
    Pruned,
    // Contents.
    /// A content's GroupBackup exists.
    Bound,
    /// A content's GroupBackup is gone; the content keeps its data.
    SourceDeleted,
    // Restores.
    Restoring,
    BackupNotFound,
    ContentNotFound,
    /// A content from another namespace, and no admission policy checked
    /// who asked for it.
    RestorePolicyMissing,
    BackupNotRestorable,
    BackupReplaced,
    NoWorkload,
    NotRestorable,
    SnapshotNotFound,
    SnapshotNotReady,
    WorkloadNotFound,
    WorkloadMismatch,
    PVCExists,
    PVCNotDeleted,
    PodExists,
    ScaleDownTimedOut,
    PrepareTimedOut,
    Prepared,
    StageStarting,
    StageReady,
    StageNotReady,
    OrderViolation,
    PositionCheckFailed,
}

impl From<ErrorKind> for Reason {
    fn from(kind: ErrorKind) -> Self {
        Reason::Run(kind)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_reason_of_its_own_is_spelled_like_a_kind_of_the_core() {
        let core: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.reason()).collect();
        for r in Reason::OWN {
            assert!(
                !core.contains(&r.as_str()),
                "{r} is the core's too: use Reason::Run"
            );
            assert!(
                r.as_str().chars().next().unwrap().is_ascii_uppercase(),
                "{r}"
            );
        }
    }
}
