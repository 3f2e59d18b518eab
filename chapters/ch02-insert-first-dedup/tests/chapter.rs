//! Chapter 2's promises, from the real binary with real processes.

const CHAPTER: &str = env!("CARGO_BIN_EXE_ch02-insert-first-dedup");

#[test]
fn the_chapter_shows_the_dedup_hit_and_the_gap() {
    let report = chaos_lab::chapter::run_for_test(CHAPTER, &["--messages", "20", "--seed", "5"]);
    let demo = &report["runs"][0];
    assert_eq!(demo["dedup_hits"], 1);
    assert_eq!(demo["double_charges"], 0);
    let scraped = demo["consumer_metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect::<String>();
    assert!(scraped.contains("dedup_hits_total 1"), "{scraped}");
    let dedup = &report["runs"][2];
    assert_eq!(
        dedup["double_charges_by_fault"]["after_commit_before_ack"],
        serde_json::Value::Null
    );
    assert!(
        dedup["double_charges_by_fault"]["after_charge_before_commit"]
            .as_u64()
            .unwrap()
            > 0
    );
}

fn dedup_catches_the_redelivery_and_leaves_the_same_gap_on(backend: &str) {
    let report = chaos_lab::chapter::run_for_test(
        CHAPTER,
        &["--backend", backend, "--messages", "20", "--seed", "5"],
    );
    assert_eq!(report["backend"], backend);
    assert_eq!(report["runs"][0]["dedup_hits"], 1);
    assert_eq!(report["claims_hold"], true);
}

#[test]
fn on_sqs_dedup_catches_the_redelivery_and_leaves_the_same_gap() {
    dedup_catches_the_redelivery_and_leaves_the_same_gap_on("sqs");
}

#[test]
fn on_kafka_dedup_catches_the_redelivery_and_leaves_the_same_gap() {
    dedup_catches_the_redelivery_and_leaves_the_same_gap_on("kafka");
}
