//! Each process's Prometheus recorder and its `GET /metrics` endpoint: what
//! the consumer and the relay processes share. Which metrics they record,
//! and what they refresh before a scrape, stays with them.
//!
//! [`redact`]: what a connection string may show in a log line; every
//! service prints URLs through it.

pub mod redact;

use std::future::Future;
use std::net::SocketAddr;

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("installing the Prometheus recorder: {0}")]
    Install(String),
    #[error("binding the metrics endpoint on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Installs the process-wide Prometheus recorder, with bucket bounds for
/// each named histogram. Call once per process.
pub fn install_recorder(histograms: &[(&str, &[f64])]) -> Result<PrometheusHandle, MetricsError> {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in histograms {
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
            .map_err(|e| MetricsError::Install(e.to_string()))?;
    }
    builder
        .install_recorder()
        .map_err(|e| MetricsError::Install(e.to_string()))
}

/// Serves `GET /metrics` on `addr` (port 0 picks one) from a task of its
/// own, answering each scrape with what `render` returns, and returns the
/// address it bound.
pub async fn serve<F, Fut>(addr: &str, render: F) -> Result<SocketAddr, MetricsError>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let bind_error = |source| MetricsError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let app = Router::new().route("/metrics", get(render));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(bound)
}

/// The `q` quantile (0 to 1) of `sorted` by nearest rank: the smallest
/// sample with at least `q` of the samples at or below it. `None` when there
/// are no samples.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::nearest_rank;

    #[test]
    fn nearest_rank_picks_a_sample() {
        let samples: Vec<u32> = (1..=100).collect();
        assert_eq!(nearest_rank(&samples, 0.50), Some(50));
        assert_eq!(nearest_rank(&samples, 0.99), Some(99));
        assert_eq!(nearest_rank(&samples, 1.0), Some(100));
        assert_eq!(nearest_rank(&samples, 0.0), Some(1));
        assert_eq!(nearest_rank(&[7], 0.99), Some(7));
        assert_eq!(nearest_rank::<u32>(&[], 0.5), None);
    }
}
