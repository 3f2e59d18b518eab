//! Crash points: where the chaos lab kills a consumer, and how.
//!
//! A crash is a real `SIGKILL` of the whole process: no destructor runs, no
//! channel is closed politely, no transaction is rolled back by our code.
//! The broker sees a dead TCP connection and Postgres sees a dead session,
//! exactly as after a power cut or an OOM kill.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The three places in Leg 3 where a crash changes the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashPoint {
    /// Received, nothing done yet.
    BeforeCharge,
    /// The PSP moved the money; our database does not know yet.
    AfterChargeBeforeCommit,
    /// Our database knows; the broker does not (no ack yet).
    AfterCommitBeforeAck,
}

impl CrashPoint {
    pub const ALL: [CrashPoint; 3] = [
        CrashPoint::BeforeCharge,
        CrashPoint::AfterChargeBeforeCommit,
        CrashPoint::AfterCommitBeforeAck,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::BeforeCharge => "before_charge",
            CrashPoint::AfterChargeBeforeCommit => "after_charge_before_commit",
            CrashPoint::AfterCommitBeforeAck => "after_commit_before_ack",
        }
    }
}

impl fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decides, when a delivery of `order_id` reaches `point`, whether to crash.
pub trait CrashSchedule: Send + Sync {
    fn should_crash(&self, point: CrashPoint, order_id: uuid::Uuid) -> bool;
}

/// Never crashes: the consumer as it runs in production.
pub struct NeverCrash;

impl CrashSchedule for NeverCrash {
    fn should_crash(&self, _: CrashPoint, _: uuid::Uuid) -> bool {
        false
    }
}

/// Sends SIGKILL to this process. Never returns.
pub fn kill_this_process() -> ! {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    // SIGKILL cannot be caught or ignored; the kernel ends the process before
    // the next instruction of ours runs.
    let _ = kill(Pid::this(), Signal::SIGKILL);
    // Unreachable in practice; abort rather than carry on as if nothing happened.
    std::process::abort()
}
