//! Chapter 6's promises, from the real binary against the real broker, one
//! part per test (each part makes its own topics, so they run in parallel).
//! The sizes are small: the book command runs the chapter at full size.
//! Part a, the producer benchmark, is tested in `kafka-transactions`: its
//! figures are benchmark results, not claims a test could hold.

const CHAPTER: &str = env!("CARGO_BIN_EXE_ch06-kafka-transactions");

fn part(name: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--part", name, "--seed", "6"];
    args.extend_from_slice(extra);
    chaos_lab::chapter::run_for_test(CHAPTER, &args)
}

#[test]
fn a_transaction_covers_kafka_and_not_the_charge() {
    let report = part("boundary", &["--messages", "20"]);
    let runs = report["runs"].as_array().unwrap();
    let (naive, hardened) = (&runs[0], &runs[1]);
    assert_eq!(naive["backend"], "kafka");
    assert_eq!(naive["variant"], "naive");
    assert!(naive["double_charges"].as_u64().unwrap() > 0, "{naive}");
    assert_eq!(hardened["variant"], "dedup-with-key");
    assert_eq!(hardened["double_charges"], 0);
    assert_eq!(hardened["lost_events"], 0);
    assert!(hardened["consumer_kills"].as_u64().unwrap() > 0);
}

#[test]
fn read_committed_sees_each_input_once_despite_the_kills() {
    let report = part("exactly-once", &["--pipeline-records", "400"]);
    let pipelines = &report["measurements"]["exactly_once"];
    let txn = &pipelines["transactional"];
    assert!(!txn["kills"].as_array().unwrap().is_empty(), "{txn}");
    assert_eq!(txn["read_committed"]["duplicates"], 0);
    assert_eq!(txn["read_committed"]["missing"], 0);
    assert_eq!(txn["read_committed"]["distinct"], 400);
    assert_eq!(report["claims_hold"], true);
}
