//! The outbox under each producer-side fault alone, with real processes:
//! producer, relays and consumers, SIGKILLed where the plan says.

use std::path::PathBuf;
use std::time::Duration;

use chaos_lab::plan::{ChaosPlan, FaultMix};
use chaos_lab::roles::ProducerKind;
use chaos_lab::run::{execute, RunSpec};
use chaos_lab::BackendKind;
use chaos_lab::RunReport;
use consumer::Variant;
use relay::RelayConfig;

const MESSAGES: usize = 12;

async fn run(plan: ChaosPlan, producer: ProducerKind) -> RunReport {
    let mut spec = RunSpec::new(Variant::Hardened, plan, 2);
    spec.producer = producer;
    spec.executable = Some(PathBuf::from(env!("CARGO_BIN_EXE_ch04-outbox")));
    let report = execute(&spec, BackendKind::Rabbitmq)
        .await
        .expect("the run completes");
    assert!(report.drained, "the run drained before its deadline");
    report
}

fn outbox(relays: usize) -> ProducerKind {
    ProducerKind::Outbox {
        relays,
        relay: RelayConfig {
            lease: Duration::from_secs(1),
            ..RelayConfig::default()
        },
    }
}

fn only(set: impl FnOnce(&mut FaultMix), seed: u64) -> ChaosPlan {
    let mut mix = FaultMix::NONE;
    set(&mut mix);
    ChaosPlan::generate(seed, MESSAGES, mix)
}

#[tokio::test]
async fn dropped_publishes_are_lost_by_the_dual_write_and_kept_by_the_outbox() {
    let plan = only(|m| m.publish_dropped = 0.25, 41);
    let naive = run(plan.clone(), ProducerKind::Naive).await;
    assert_eq!(naive.lost_events, 3);
    let kept = run(plan, outbox(1)).await;
    assert_eq!(kept.lost_events, 0);
    assert_eq!(kept.double_charges, 0);
    assert_eq!(kept.audit.charges_executed, MESSAGES as u64);
}

#[tokio::test]
async fn a_producer_killed_after_its_commit_loses_nothing_with_an_outbox() {
    let plan = only(|m| m.producer_crash_after_commit = 0.25, 42);
    let naive = run(plan.clone(), ProducerKind::Naive).await;
    assert_eq!(naive.producer_kills, 3);
    assert_eq!(naive.lost_events, 3);
    let kept = run(plan, outbox(1)).await;
    assert_eq!(kept.producer_kills, 3);
    assert_eq!(kept.lost_events, 0);
    assert_eq!(kept.audit.orders_committed, MESSAGES as u64);
}

#[tokio::test]
async fn a_relay_killed_between_publish_and_mark_republishes_and_the_consumer_absorbs_it() {
    let plan = only(|m| m.relay_crash_after_publish = 0.25, 43);
    let report = run(plan, outbox(2)).await;
    assert_eq!(report.relay_kills, 3);
    assert!(
        report.republished > 0,
        "the killed relays' rows went out again"
    );
    assert_eq!(report.dedup_hits, report.deliveries - MESSAGES as u64);
    assert_eq!(report.double_charges, 0);
    assert_eq!(report.lost_events, 0);
}

/// The chapter's binary holds its claims (it exits 0) on one broker.
fn the_chapter_holds_its_claims_on(backend: &str) {
    let report = chaos_lab::chapter::run_for_test(
        env!("CARGO_BIN_EXE_ch04-outbox"),
        &["--backend", backend, "--messages", "30", "--seed", "9"],
    );
    let outbox = &report["runs"][2];
    assert_eq!(outbox["backend"], backend);
    assert_eq!(outbox["lost_events"], 0);
    assert_eq!(outbox["double_charges"], 0);
    assert!(report["runs"][1]["lost_events"].as_u64().unwrap() > 0);
}

#[test]
fn the_chapter_holds_its_claims_on_rabbitmq() {
    the_chapter_holds_its_claims_on("rabbitmq");
}

#[test]
fn the_chapter_holds_its_claims_on_sqs() {
    the_chapter_holds_its_claims_on("sqs");
}

#[test]
fn the_chapter_holds_its_claims_on_kafka() {
    the_chapter_holds_its_claims_on("kafka");
}
