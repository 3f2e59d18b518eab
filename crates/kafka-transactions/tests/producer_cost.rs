//! The producer benchmark against the real broker, small: every mode runs,
//! and its figures are real numbers in the right order.

use std::time::Duration;

use kafka_transactions::producer_cost::{ProducerMode, DEFAULT_LINGER};
use kafka_transactions::{measure_producer_cost, ProducerCostConfig};

#[tokio::test]
async fn every_mode_yields_finite_rates_and_ordered_percentiles() {
    let config = ProducerCostConfig {
        messages: 300,
        time_cap: Duration::from_secs(1),
        latency_rate: 1_000,
        latency_duration: Duration::from_millis(100),
        rounds: 2,
        warmup_messages: 50,
        payload_sizes: vec![1024, 100],
        max_in_flight: 200,
        linger: DEFAULT_LINGER,
        topic_prefix: "eo.test.ch06.cost".to_owned(),
        ..ProducerCostConfig::default()
    };
    let report = measure_producer_cost(&config).await.unwrap();

    assert_eq!(
        report.measurements.len(),
        ProducerMode::CHAPTER.len() * 2,
        "{report:#?}"
    );
    for m in &report.measurements {
        assert_eq!(m.rounds.len(), 2, "{m:?}");
        for round in &m.rounds {
            assert!(round.messages > 0, "{m:?}");
            assert!(round.capped || round.messages == 300, "{m:?}");
            assert!(round.latency_messages > 0, "{m:?}");
            assert!(round.p50_ms <= round.p99_ms, "{m:?}");
        }
        assert_eq!(
            m.messages,
            m.rounds.iter().map(|r| r.messages).sum::<usize>()
        );
        for rate in [m.msgs_per_sec, m.mb_per_sec] {
            assert!(rate.is_finite() && rate > 0.0, "{m:?}");
        }
        assert!(m.p50_ms.is_finite() && m.p50_ms > 0.0, "{m:?}");
        assert!(m.p50_ms <= m.p99_ms, "{m:?}");
        if m.mode.is_transactional() {
            assert!(m.commits >= 1, "{m:?}");
        } else {
            assert_eq!(m.commits, 0, "{m:?}");
        }
        let ratios = report.ratios(m).expect("acks=all ran at every size");
        assert!(ratios.throughput.is_finite() && ratios.throughput > 0.0);
    }
    // One transaction per message commits once per message.
    for per_message in report
        .measurements
        .iter()
        .filter(|m| m.mode == ProducerMode::CHAPTER[3])
    {
        assert_eq!(per_message.commits, per_message.messages, "{per_message:?}");
    }

    let table = report.to_markdown();
    for mode in ProducerMode::CHAPTER {
        assert!(table.contains(&format!("| {} |", mode.label())), "{table}");
    }
    assert!(
        table.contains("1.00×"),
        "acks=all is its own baseline:\n{table}"
    );

    let chart =
        std::env::temp_dir().join(format!("eo-ch06-producer-cost-{}.svg", std::process::id()));
    report.write_chart(&chart).unwrap();
    let svg = std::fs::read_to_string(&chart).unwrap();
    std::fs::remove_file(&chart).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    assert!(svg.contains("txn 100 ms"), "the axis names the modes");
}
