//! What a consumer process tells its supervisor, one JSON line per event on
//! stdout. Lines are written and flushed before the step they describe, so a
//! SIGKILL right after still leaves them in the pipe for the supervisor.

use std::io::Write;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::crash::CrashPoint;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "observed", rename_all = "snake_case")]
pub enum Observation {
    /// A delivery arrived. `order_id` is absent when the payload did not decode.
    Received {
        message_id: Option<String>,
        order_id: Option<Uuid>,
        /// What the consumer can tell: the broker's flag or count.
        redelivered: bool,
        /// Where the broker keeps the message, where every delivery of it
        /// shares one address (Kafka's partition and offset): a supervisor
        /// that sees the same position twice knows it is a redelivery even
        /// when the consumer that got it could not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<queue::Position>,
    },
    /// The delivery was settled with this outcome.
    Settled {
        order_id: Option<Uuid>,
        outcome: Outcome,
        /// From receive to settle: the processing time a lease must cover.
        #[serde(default)]
        elapsed_ms: u64,
    },
    /// A settle (`operation`) came after the lease ran out: the broker had
    /// handed the message out again, and the newer delivery settles it.
    SettledLate {
        order_id: Option<Uuid>,
        operation: String,
    },
    /// The visibility heartbeat pushed the delivery's lease out.
    LeaseExtended { order_id: Option<Uuid> },
    /// The process serves its Prometheus metrics at this address.
    MetricsServed { addr: String },
    /// The process is about to SIGKILL itself at this point.
    Crashing { order_id: Uuid, point: CrashPoint },
    /// The process lost `dependency` (the broker, the database) and
    /// connects again: every delivery it held unsettled goes back to the
    /// broker, to be handed out again.
    Reconnecting { dependency: String, reason: String },
}

/// How one delivery ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Charged, recorded and acked.
    Charged { charge_id: String },
    /// A duplicate delivery caught by the consumer's dedup (chapter 2).
    Duplicate,
    /// Given back to the broker to try again later.
    Requeued { reason: String },
    /// Moved to the dead-letter queue; never charged, never silently dropped.
    DeadLettered { reason: String },
    /// Acked but not charged: the at-most-once variant lost it.
    Lost { reason: String },
}

pub trait Observer: Send + Sync {
    fn observe(&self, observation: &Observation);
}

/// Writes each observation as one JSON line on stdout and flushes it.
pub struct StdoutObserver;

impl Observer for StdoutObserver {
    fn observe(&self, observation: &Observation) {
        let line = serde_json::to_string(observation).expect("observations serialise");
        let mut out = std::io::stdout().lock();
        // If the supervisor is gone there is nobody to tell; keep working.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Logs how each delivery ended, for a consumer an operator runs: one line
/// per settle at `info` (a dead letter or a late settle at `warn`), so the
/// log says what happened to each order without the chaos lab.
pub struct LogObserver;

impl Observer for LogObserver {
    fn observe(&self, observation: &Observation) {
        let order =
            |id: &Option<Uuid>| id.map_or_else(|| "(undecodable)".to_owned(), |id| id.to_string());
        match observation {
            Observation::Settled {
                order_id,
                outcome,
                elapsed_ms,
            } => match outcome {
                Outcome::Charged { charge_id } => {
                    tracing::info!("order {} charged ({charge_id}) in {elapsed_ms} ms", order(order_id))
                }
                Outcome::Duplicate => {
                    tracing::info!("order {}: duplicate delivery, acked without a charge", order(order_id))
                }
                Outcome::Requeued { reason } => {
                    tracing::warn!("order {}: handed back to retry later: {reason}", order(order_id))
                }
                Outcome::DeadLettered { reason } => {
                    tracing::warn!("order {}: dead-lettered: {reason}", order(order_id))
                }
                Outcome::Lost { reason } => {
                    tracing::warn!("order {}: acked without a charge: {reason}", order(order_id))
                }
            },
            Observation::SettledLate { order_id, operation } => tracing::warn!(
                "order {}: {operation} came after the lease ran out (the visibility timeout is too short)",
                order(order_id)
            ),
            Observation::Received { .. }
            | Observation::LeaseExtended { .. }
            | Observation::MetricsServed { .. }
            | Observation::Crashing { .. } => {}
            // The service logs it already, with the delay before it retries.
            Observation::Reconnecting { .. } => {}
        }
    }
}

/// Observes nothing, for callers that only want the side effects.
pub struct Unobserved;

impl Observer for Unobserved {
    fn observe(&self, _: &Observation) {}
}
