//! Each fault alone, against real Postgres, RabbitMQ and the PSP, with real
//! SIGKILLed processes: the counts must match what the schedule planned.
//! The tests named `on_…` run the same on another broker.
//! Every run creates its own databases and queue, so tests never share state.

use std::path::PathBuf;
use std::process::Command;

use chaos_lab::plan::{ChaosPlan, FaultMix};
use chaos_lab::run::{execute, RunSpec};
use chaos_lab::BackendKind;
use chaos_lab::RunReport;
use consumer::Variant;

const MESSAGES: usize = 12;

fn chapter_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ch01-reproduce-duplicates"))
}

fn only(set: impl FnOnce(&mut FaultMix)) -> FaultMix {
    let mut mix = FaultMix::NONE;
    set(&mut mix);
    mix
}

/// Three orders of twelve meet the fault (a quarter, rounded).
const SHARE: f64 = 0.25;

async fn run(variant: Variant, mix: FaultMix, seed: u64) -> (ChaosPlan, RunReport) {
    run_on(BackendKind::Rabbitmq, variant, mix, seed).await
}

async fn run_on(
    backend: BackendKind,
    variant: Variant,
    mix: FaultMix,
    seed: u64,
) -> (ChaosPlan, RunReport) {
    let plan = ChaosPlan::generate(seed, MESSAGES, mix);
    let mut spec = RunSpec::new(variant, plan.clone(), 2);
    spec.executable = Some(chapter_binary());
    let report = execute(&spec, backend).await.expect("the run completes");
    assert!(report.drained, "the run drained before its deadline");
    (plan, report)
}

#[tokio::test]
async fn no_faults_means_every_order_charged_once() {
    let (_, report) = run(Variant::Naive, FaultMix::NONE, 1).await;
    assert_eq!(report.audit.orders_committed, MESSAGES as u64);
    assert_eq!(report.double_charges, 0);
    assert_eq!(report.lost_events, 0);
    assert_eq!(report.kills, 0);
    assert_eq!(report.deliveries, MESSAGES as u64);
}

#[tokio::test]
async fn a_crash_before_the_charge_is_redelivered_and_charged_once() {
    let (_, report) = run(Variant::Naive, only(|m| m.before_charge = SHARE), 2).await;
    assert_eq!(report.consumer_kills, 3);
    assert_eq!(report.redeliveries, 3);
    assert_eq!(report.double_charges, 0);
    assert_eq!(report.lost_events, 0);
}

/// Kafka cannot tell the consumer that takes over a dead one's partition
/// that the message is a redelivery; the lab counts it from the position
/// (partition and offset) it saw delivered before.
#[tokio::test]
async fn on_kafka_a_killed_consumers_message_counts_as_a_redelivery() {
    let (_, report) = run_on(
        BackendKind::Kafka,
        Variant::Naive,
        only(|m| m.before_charge = SHARE),
        2,
    )
    .await;
    assert_eq!(report.consumer_kills, 3);
    assert_eq!(report.redeliveries, 3);
    assert_eq!(report.deliveries, MESSAGES as u64 + 3);
    assert_eq!(report.double_charges, 0);
    assert_eq!(report.lost_events, 0);
}

#[tokio::test]
async fn a_crash_after_the_charge_double_charges_the_naive_consumer() {
    let (_, report) = run(
        Variant::Naive,
        only(|m| m.after_charge_before_commit = SHARE),
        3,
    )
    .await;
    assert_eq!(report.consumer_kills, 3);
    assert_eq!(report.double_charges, 3, "each redelivery charged again");
    assert_eq!(report.lost_events, 0);
    // The consumer's own table saw only the second charge of each: it
    // believes nothing went wrong, which is why the audit reads the ledger.
    assert_eq!(report.audit.payments_recorded, MESSAGES as u64);
    assert_eq!(report.audit.charges_executed, MESSAGES as u64 + 3);
}

#[tokio::test]
async fn a_crash_after_the_commit_double_charges_the_naive_consumer() {
    let (_, report) = run(
        Variant::Naive,
        only(|m| m.after_commit_before_ack = SHARE),
        4,
    )
    .await;
    assert_eq!(report.consumer_kills, 3);
    assert_eq!(report.double_charges, 3);
    assert_eq!(report.audit.payments_recorded, MESSAGES as u64 + 3);
}

#[tokio::test]
async fn acking_on_receipt_loses_the_message_in_hand() {
    let (_, report) = run(Variant::AckOnReceipt, only(|m| m.before_charge = SHARE), 5).await;
    assert_eq!(report.consumer_kills, 3);
    assert_eq!(report.lost_events, 3);
    assert_eq!(report.double_charges, 0);
}

#[tokio::test]
async fn dropped_publishes_are_lost_events() {
    let (_, report) = run(Variant::Naive, only(|m| m.publish_dropped = SHARE), 6).await;
    assert_eq!(report.audit.orders_committed, MESSAGES as u64);
    assert_eq!(report.lost_events, 3);
    assert_eq!(report.kills, 0);
}

#[tokio::test]
async fn a_producer_crash_between_commit_and_publish_loses_the_event() {
    let (_, report) = run(
        Variant::Naive,
        only(|m| m.producer_crash_after_commit = SHARE),
        7,
    )
    .await;
    assert_eq!(report.producer_kills, 3);
    assert_eq!(report.audit.orders_committed, MESSAGES as u64);
    assert_eq!(report.lost_events, 3);
}

#[test]
fn the_chapter_shows_its_claim_and_prints_the_contract_json() {
    let output = Command::new(chapter_binary())
        .args(["--messages", "20", "--seed", "11", "--json"])
        .output()
        .expect("the chapter binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ch01 failed: {stderr}");
    assert!(stderr.contains("seed 11"), "the seed is printed: {stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("stdout is one JSON object");
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    let naive = &runs[0];
    assert_eq!(naive["variant"], "naive");
    assert_eq!(naive["seed"], 11);
    assert!(naive["double_charges"].as_u64().unwrap() > 0);
    assert!(naive["lost_events"].as_u64().unwrap() > 0);
    assert!(naive["kills"].as_u64().unwrap() > 0);
    assert_eq!(report["claims_hold"], true);
}

#[test]
fn unknown_backends_are_refused_with_the_known_ones() {
    let output = Command::new(chapter_binary())
        .args(["--backend", "nats"])
        .output()
        .expect("the chapter binary runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("rabbitmq, sqs, kafka"), "{stderr}");
}

#[tokio::test]
async fn the_same_seed_replays_the_same_counts() {
    let mix = FaultMix {
        before_charge: 0.1,
        after_charge_before_commit: 0.1,
        after_commit_before_ack: 0.1,
        publish_dropped: 0.1,
        producer_crash_after_commit: 0.1,
        published_twice: 0.0,
        relay_crash_after_publish: 0.0,
    };
    let (_, first) = run(Variant::Naive, mix, 99).await;
    let (_, again) = run(Variant::Naive, mix, 99).await;
    let counts = |r: &RunReport| {
        (
            r.double_charges,
            r.lost_events,
            r.consumer_kills,
            r.producer_kills,
        )
    };
    assert_eq!(counts(&first), counts(&again));
    assert_eq!(first.double_charges, 2);
    assert_eq!(first.lost_events, 2);
}

fn the_naive_pipeline_fails_the_same_way_on(backend: &str) {
    let report = chaos_lab::chapter::run_for_test(
        env!("CARGO_BIN_EXE_ch01-reproduce-duplicates"),
        &["--backend", backend, "--messages", "20", "--seed", "11"],
    );
    let naive = &report["runs"][0];
    assert_eq!(naive["backend"], backend);
    assert!(naive["double_charges"].as_u64().unwrap() > 0);
    assert!(naive["lost_events"].as_u64().unwrap() > 0);
    assert_eq!(report["claims_hold"], true);
}

#[test]
fn on_sqs_the_naive_pipeline_fails_the_same_way() {
    the_naive_pipeline_fails_the_same_way_on("sqs");
}

#[test]
fn on_kafka_the_naive_pipeline_fails_the_same_way() {
    the_naive_pipeline_fails_the_same_way_on("kafka");
}
