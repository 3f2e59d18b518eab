//! Each process's Prometheus recorder and its `GET /metrics` endpoint: what
//! the consumer and the relay processes share. Which metrics they record,
//! and what they refresh before a scrape, stays with them.
//!
//! [`redact`]: what a connection string may show in a log line; every
//! service prints URLs through it.
//!
//! [`service`]: logs, backoff, the `connected` gauge and the stop signals
//! that every long-running process shares.

pub mod redact;
pub mod service;

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

/// The empirical CDF of `sorted` (ascending) as the corners of a step line,
/// for a latency chart: from (`floor`, 0) up to (last, 1), thinned to about
/// a thousand steps (a minute at 2,000 events/s has 120,000 samples), each
/// x at least `floor` (a log axis has no 0).
pub fn cdf_steps(sorted: &[f64], floor: f64) -> Vec<(f64, f64)> {
    let n = sorted.len();
    let mut points = vec![(floor, 0.0)];
    if n == 0 {
        return points;
    }
    let step = n.div_ceil(1000).max(1);
    let mut previous = 0.0;
    for i in (0..n).step_by(step).chain(std::iter::once(n - 1)) {
        let x = sorted[i].max(floor);
        let y = (i + 1) as f64 / n as f64;
        points.push((x, previous));
        points.push((x, y));
        previous = y;
    }
    points
}

#[cfg(test)]
mod tests {
    use super::{cdf_steps, nearest_rank};

    #[test]
    fn cdf_steps_climb_from_the_floor_to_one() {
        let steps = cdf_steps(&[0.5, 2.0, 3.0, 10.0], 1.0);
        assert_eq!(steps.first(), Some(&(1.0, 0.0)));
        assert_eq!(steps.last(), Some(&(10.0, 1.0)));
        assert!(steps
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(cdf_steps(&[], 1.0), vec![(1.0, 0.0)]);
    }

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
