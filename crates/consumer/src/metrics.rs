//! The consumer's Prometheus metrics, served on `/metrics`.
//!
//! The counters live in the process, so a SIGKILL resets them: that is one
//! more reason the chaos lab audits the PSP's ledger and counts deliveries
//! from the consumers' observation lines, and reports these beside them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::observe::Outcome;

pub const DELIVERIES: &str = "deliveries_total";
pub const REDELIVERIES: &str = "redeliveries_total";
pub const DEDUP_HITS: &str = "dedup_hits_total";
pub const DEDUP_HIT_RATE: &str = "dedup_hit_rate";
pub const CHARGES: &str = "charges_total";
pub const DEAD_LETTERED: &str = "dead_lettered_total";
pub const REQUEUED: &str = "requeued_total";
pub const LOST: &str = "lost_total";
pub const PROCESSING_SECONDS: &str = "processing_seconds";
pub const SETTLED_LATE: &str = "settled_after_lease_expired_total";
pub const LEASE_EXTENSIONS: &str = "lease_extensions_total";
/// Dedup hits whose fingerprint differs from what was charged: a producer
/// bug. Any increase deserves an alert.
pub const FINGERPRINT_MISMATCHES: &str = "dedup_fingerprint_mismatches_total";
/// Dedup hits by order under another event id (the hardened consumer only):
/// a producer that retries by emitting a fresh event.
pub const ORDER_DUPLICATES: &str = "dedup_order_hits_total";

/// Seconds spent in each step of handling, labelled `step`, recorded once
/// per step per transaction (a batch's steps once for all its messages):
/// the sums over a run, divided by the messages handled, say where each
/// message's time went.
pub const STEP_SECONDS: &str = "step_seconds";

/// The steps [`STEP_SECONDS`] tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A receive that brought deliveries (an empty one is idle time).
    Receive,
    /// BEGIN and the dedup INSERT.
    Dedup,
    /// The PSP's charge (a batch's concurrent charges, until the last).
    Psp,
    /// The payment rows.
    Record,
    Commit,
    /// Ack, requeue or dead letter, with the broker's reply.
    Settle,
}

impl Step {
    pub const ALL: [Step; 6] = [
        Step::Receive,
        Step::Dedup,
        Step::Psp,
        Step::Record,
        Step::Commit,
        Step::Settle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Receive => "receive",
            Step::Dedup => "dedup",
            Step::Psp => "psp",
            Step::Record => "record",
            Step::Commit => "commit",
            Step::Settle => "settle",
        }
    }
}

/// Records how long one step took, from `since`.
pub fn step_took(step: Step, since: std::time::Instant) {
    metrics::histogram!(STEP_SECONDS, "step" => step.name()).record(since.elapsed().as_secs_f64());
}

/// Bucket bounds for the processing time: from a fast local charge to a PSP
/// call that ran into its timeout.
const PROCESSING_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

pub use telemetry::MetricsError;

/// Installs the process-wide Prometheus recorder. Call once per process.
pub fn install_recorder() -> Result<PrometheusHandle, MetricsError> {
    telemetry::install_recorder(&[(PROCESSING_SECONDS, &PROCESSING_BUCKETS)])
}

/// Serves `GET /metrics` on `addr` (port 0 picks one) and returns the
/// address it bound.
pub async fn serve(handle: PrometheusHandle, addr: &str) -> Result<SocketAddr, MetricsError> {
    telemetry::serve(addr, move || {
        let handle = handle.clone();
        async move { handle.render() }
    })
    .await
}

/// Records one delivery's life. The rate is kept here because Prometheus
/// cannot divide two counters of a process that died between scrapes.
#[derive(Debug, Default)]
pub struct DeliveryMetrics {
    deliveries: AtomicU64,
    dedup_hits: AtomicU64,
}

impl DeliveryMetrics {
    pub fn received(&self, redelivered: bool) {
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(DELIVERIES).increment(1);
        if redelivered {
            metrics::counter!(REDELIVERIES).increment(1);
        }
        self.publish_rate();
    }

    pub fn settled(&self, outcome: &Outcome, elapsed: Duration) {
        metrics::histogram!(PROCESSING_SECONDS).record(elapsed.as_secs_f64());
        match outcome {
            Outcome::Charged { .. } => metrics::counter!(CHARGES).increment(1),
            Outcome::Duplicate => {
                self.dedup_hits.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(DEDUP_HITS).increment(1);
            }
            Outcome::Requeued { .. } => metrics::counter!(REQUEUED).increment(1),
            Outcome::DeadLettered { .. } => metrics::counter!(DEAD_LETTERED).increment(1),
            Outcome::Lost { .. } => metrics::counter!(LOST).increment(1),
        }
        self.publish_rate();
    }

    /// An ack, requeue or dead letter refused because the lease had run out
    /// and the message was already with another consumer.
    pub fn settled_late(&self) {
        metrics::counter!(SETTLED_LATE).increment(1);
    }

    fn publish_rate(&self) {
        let deliveries = self.deliveries.load(Ordering::Relaxed);
        let hits = self.dedup_hits.load(Ordering::Relaxed);
        let rate = if deliveries == 0 {
            0.0
        } else {
            hits as f64 / deliveries as f64
        };
        metrics::gauge!(DEDUP_HIT_RATE).set(rate);
    }
}

/// A dedup hit with another fingerprint, dead-lettered.
pub fn fingerprint_mismatch() {
    metrics::counter!(FINGERPRINT_MISMATCHES).increment(1);
}

/// A dedup hit on the order from another event id, same contents.
pub fn order_duplicate() {
    metrics::counter!(ORDER_DUPLICATES).increment(1);
}

/// One beat of the visibility heartbeat (from the heartbeat's own task).
pub fn lease_extended() {
    metrics::counter!(LEASE_EXTENSIONS).increment(1);
}
