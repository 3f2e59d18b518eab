//! Chapter 8's promises at a tenth of the book's size, one broker per test
//! (each run makes its own databases and queues, so they run in parallel).
//! The 1000-message run on every broker is the book command's.

const CHAPTER: &str = env!("CARGO_BIN_EXE_ch08-chaos");

fn on(broker: &str) -> serde_json::Value {
    let report = chaos_lab::chapter::run_for_test(
        CHAPTER,
        &["--backend", broker, "--messages", "100", "--seed", "8"],
    );
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let (naive, hardened) = (&runs[0], &runs[1]);
    assert_eq!(naive["backend"], broker);
    assert_eq!(naive["variant"], "naive");
    assert!(naive["double_charges"].as_u64().unwrap() > 0, "{naive}");
    assert!(naive["lost_events"].as_u64().unwrap() > 0, "{naive}");
    assert_eq!(hardened["variant"], "dedup-with-key");
    for point in [
        "before_charge",
        "after_charge_before_commit",
        "after_commit_before_ack",
    ] {
        assert!(
            hardened["kills_by_point"][point].as_u64().unwrap() >= 3,
            "{point}: {hardened}"
        );
    }
    // The ledger's verdict, order by order: all 100 charged exactly once.
    assert_eq!(
        hardened["audit"]["charges_per_order"],
        serde_json::json!([0, 100, 0, 0])
    );
    assert_eq!(hardened["audit"]["offending_orders"], serde_json::json!([]));
    assert_eq!(report["claims_hold"], true);
    report
}

#[test]
fn every_fault_on_rabbitmq_charges_each_order_once() {
    on("rabbitmq");
}

#[test]
fn every_fault_on_sqs_charges_each_order_once_despite_the_timeouts() {
    let report = on("sqs");
    assert!(report["runs"][1]["settled_late"].as_u64().unwrap() > 0);
}

#[test]
fn every_fault_on_kafka_charges_each_order_once() {
    on("kafka");
}
