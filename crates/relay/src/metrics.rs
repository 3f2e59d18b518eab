//! The relay's `/metrics`: what it published, how late, and the backlog.
//!
//! The backlog (pending rows, age of the oldest) is read from the database
//! when `/metrics` is scraped, not on a timer, so an idle relay that nobody
//! scrapes issues no queries for it.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::outbox::{self, OutboxRow};

pub const PUBLISHED: &str = "relay_published_total";
pub const REPUBLISHED: &str = "relay_republished_total";
pub const PUBLISH_FAILURES: &str = "relay_publish_failures_total";
pub const QUERIES: &str = "relay_queries_total";
pub const PUBLISH_LATENCY: &str = "relay_publish_latency_seconds";
pub const PENDING: &str = "outbox_pending";
pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";

const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

pub use telemetry::MetricsError;

pub fn install_recorder() -> Result<PrometheusHandle, MetricsError> {
    telemetry::install_recorder(&[(PUBLISH_LATENCY, &LATENCY_BUCKETS)])
}

/// Serves `GET /metrics` on `addr`, refreshing the backlog gauges per scrape
/// once the relay has a database (`pool` is set when it connects; until
/// then a scrape shows the rest, `connected` among them).
pub async fn serve(
    handle: PrometheusHandle,
    pool: Arc<OnceLock<PgPool>>,
    addr: &str,
) -> Result<SocketAddr, MetricsError> {
    telemetry::serve(addr, move || {
        let handle = handle.clone();
        let pool = pool.get().cloned();
        async move {
            let backlog = match &pool {
                Some(pool) => outbox::backlog(pool).await.ok(),
                None => None,
            };
            if let Some(backlog) = backlog {
                metrics::gauge!(PENDING).set(backlog.pending as f64);
                metrics::gauge!(OLDEST_PENDING_AGE).set(backlog.oldest_age_seconds);
            }
            handle.render()
        }
    })
    .await
}

/// One SQL statement sent by the relay loop (the benchmark compares these).
pub fn query_issued() {
    metrics::counter!(QUERIES).increment(1);
}

pub fn published(row: &OutboxRow, confirmed_at: Instant) {
    metrics::counter!(PUBLISHED).increment(1);
    if row.attempts > 1 {
        metrics::counter!(REPUBLISHED).increment(1);
    }
    // From the row's insert (inside the producer's transaction) to the
    // broker's confirm, on the wall clock both sides share.
    let confirmed_wall =
        chrono::Utc::now() - chrono::Duration::from_std(confirmed_at.elapsed()).unwrap_or_default();
    let latency = (confirmed_wall - row.created_at)
        .num_microseconds()
        .unwrap_or(0)
        .max(0) as f64
        / 1e6;
    metrics::histogram!(PUBLISH_LATENCY).record(latency);
}

pub fn publish_failed() {
    metrics::counter!(PUBLISH_FAILURES).increment(1);
}
