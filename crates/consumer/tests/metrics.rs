//! The consumer's /metrics endpoint, scraped over HTTP. Its own test binary,
//! because the Prometheus recorder is installed once per process.

use std::time::Duration;

use consumer::metrics::{install_recorder, serve, DeliveryMetrics};
use consumer::observe::Outcome;

#[tokio::test]
async fn metrics_are_served_in_prometheus_text_format() {
    let handle = install_recorder().unwrap();
    let addr = serve(handle, "127.0.0.1:0").await.unwrap();

    let metrics = DeliveryMetrics::default();
    let outcomes = [
        Outcome::Charged {
            charge_id: "ch_1".into(),
        },
        Outcome::Duplicate,
        Outcome::DeadLettered {
            reason: "bad".into(),
        },
        Outcome::Requeued {
            reason: "409".into(),
        },
    ];
    for (n, outcome) in outcomes.iter().enumerate() {
        metrics.received(n > 0);
        metrics.settled(outcome, Duration::from_millis(12));
    }

    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        "deliveries_total 4",
        "redeliveries_total 3",
        "dedup_hits_total 1",
        "dedup_hit_rate 0.25",
        "charges_total 1",
        "dead_lettered_total 1",
        "requeued_total 1",
        "processing_seconds_bucket{le=\"0.025\"} 4",
        "processing_seconds_count 4",
    ] {
        assert!(body.contains(expected), "missing {expected:?} in:\n{body}");
    }
}
