//! Chapter 2's promises, from the real binary with real processes.

use std::process::Command;

#[test]
fn the_chapter_shows_the_dedup_hit_and_the_gap() {
    let output = Command::new(env!("CARGO_BIN_EXE_ch02-insert-first-dedup"))
        .args(["--messages", "20", "--seed", "5", "--json"])
        .output()
        .expect("the chapter binary runs");
    assert!(
        output.status.success(),
        "ch02 failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
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

#[test]
fn on_sqs_dedup_catches_the_redelivery_and_leaves_the_same_gap() {
    let output = Command::new(env!("CARGO_BIN_EXE_ch02-insert-first-dedup"))
        .args([
            "--backend",
            "sqs",
            "--messages",
            "20",
            "--seed",
            "5",
            "--json",
        ])
        .output()
        .expect("the chapter binary runs");
    assert!(
        output.status.success(),
        "ch02 on SQS failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["backend"], "sqs");
    assert_eq!(report["runs"][0]["dedup_hits"], 1);
    assert_eq!(report["claims_hold"], true);
}
