//! The hardened consumer (INSERT-first dedup + a stable Idempotency-Key)
//! against real Postgres, RabbitMQ, the PSP and SIGKILLed processes. Each run
//! has its own databases and queue.

use std::path::PathBuf;
use std::time::Duration;

use chaos_lab::plan::{ChaosPlan, FaultMix, ProducerFault};
use chaos_lab::run::{execute, RunSpec};
use chaos_lab::BackendKind;
use chaos_lab::RunReport;
use consumer::crash::CrashPoint;
use consumer::Variant;
use psp::FaultConfig;

const MESSAGES: usize = 12;

fn chapter_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ch03-idempotency-key"))
}

async fn run(mut spec: RunSpec) -> RunReport {
    spec.executable = Some(chapter_binary());
    let report = execute(&spec, BackendKind::Rabbitmq)
        .await
        .expect("the run completes");
    assert!(report.drained, "the run drained before its deadline");
    report
}

fn crashing_at(point: CrashPoint, seed: u64) -> ChaosPlan {
    let mut mix = FaultMix::NONE;
    match point {
        CrashPoint::BeforeCharge => mix.before_charge = 0.25,
        CrashPoint::AfterChargeBeforeCommit => mix.after_charge_before_commit = 0.25,
        CrashPoint::AfterCommitBeforeAck => mix.after_commit_before_ack = 0.25,
    }
    ChaosPlan::generate(seed, MESSAGES, mix)
}

async fn assert_one_charge_per_order_when_killed_at(point: CrashPoint, seed: u64) {
    let plan = crashing_at(point, seed);
    assert_eq!(plan.count_crashes(point), 3);
    let report = run(RunSpec::new(Variant::Hardened, plan, 2)).await;
    assert_eq!(
        report.consumer_kills, 3,
        "{point}: every planned kill happened"
    );
    assert_eq!(report.double_charges, 0, "{point}");
    assert_eq!(report.lost_events, 0, "{point}");
    assert_eq!(report.audit.charges_executed, MESSAGES as u64, "{point}");
    assert_eq!(report.audit.payments_recorded, MESSAGES as u64, "{point}");
}

#[tokio::test]
async fn killed_before_the_charge_each_order_is_charged_once() {
    assert_one_charge_per_order_when_killed_at(CrashPoint::BeforeCharge, 21).await;
}

#[tokio::test]
async fn killed_after_the_charge_each_order_is_charged_once() {
    assert_one_charge_per_order_when_killed_at(CrashPoint::AfterChargeBeforeCommit, 22).await;
}

#[tokio::test]
async fn killed_after_the_commit_each_order_is_charged_once() {
    let plan = crashing_at(CrashPoint::AfterCommitBeforeAck, 23);
    assert_one_charge_per_order_when_killed_at(CrashPoint::AfterCommitBeforeAck, 23).await;
    // The redeliveries are caught by the dedup table, not by the PSP.
    let report = run(RunSpec::new(Variant::Hardened, plan, 2)).await;
    assert_eq!(report.dedup_hits, 3);
}

#[tokio::test]
async fn without_the_key_a_kill_after_the_charge_still_double_charges() {
    let plan = crashing_at(CrashPoint::AfterChargeBeforeCommit, 24);
    let report = run(RunSpec::new(Variant::DedupOnly, plan, 2)).await;
    assert_eq!(report.double_charges, 3);
    assert_eq!(report.double_charges_from("after_charge_before_commit"), 3);
}

/// Two consumer processes handed the same event at the same moment: the PSP
/// takes 300 ms, so both copies are in flight together. The second blocks on
/// the INSERT until the first commits, then takes the duplicate path.
#[tokio::test]
async fn two_processes_with_the_same_event_charge_it_once() {
    let plan = ChaosPlan::generate(
        25,
        6,
        FaultMix {
            published_twice: 1.0,
            ..FaultMix::NONE
        },
    );
    assert!(plan
        .orders
        .iter()
        .all(|o| o.producer_fault == Some(ProducerFault::PublishedTwice)));
    let with_latency = |variant| {
        let mut spec = RunSpec::new(variant, plan.clone(), 2);
        spec.psp_faults = FaultConfig {
            latency: Duration::from_millis(300),
            ..FaultConfig::default()
        };
        spec
    };
    let naive = run(with_latency(Variant::Naive)).await;
    assert_eq!(naive.double_charges, 6, "without dedup both copies charge");

    let hardened = run(with_latency(Variant::Hardened)).await;
    assert_eq!(hardened.deliveries, 12);
    assert_eq!(hardened.dedup_hits, 6);
    assert_eq!(hardened.double_charges, 0);
    assert_eq!(hardened.audit.charges_executed, 6);
}

#[tokio::test]
async fn a_409_is_retried_until_the_first_call_finishes() {
    let plan = ChaosPlan::generate(26, 1, FaultMix::NONE);
    let mut spec = RunSpec::new(Variant::Hardened, plan, 2);
    spec.psp_faults = FaultConfig {
        latency: Duration::from_millis(800),
        ..FaultConfig::default()
    };
    spec.psp_timeout = Duration::from_millis(300);
    let report = run(spec).await;
    assert!(
        report
            .requeued_by_cause
            .get("timeout")
            .copied()
            .unwrap_or(0)
            >= 1
    );
    assert!(
        report
            .requeued_by_cause
            .get("409 in flight")
            .copied()
            .unwrap_or(0)
            >= 1
    );
    assert_eq!(report.audit.charges_executed, 1);
    assert_eq!(report.dead_lettered, 0);
}

#[tokio::test]
async fn a_422_is_dead_lettered_and_never_charged_twice() {
    let mut plan = ChaosPlan::generate(27, 1, FaultMix::NONE);
    plan.orders[0].consumer_crash = Some(CrashPoint::AfterChargeBeforeCommit);
    plan.orders[0].producer_fault = Some(ProducerFault::RepublishedAltered);
    let mut spec = RunSpec::new(Variant::Hardened, plan.clone(), 2);
    spec.trace_orders = vec![plan.orders[0].order_id];
    // Keeps the first attempt's row lock held until the altered copy waits on it.
    spec.psp_faults = FaultConfig {
        latency: Duration::from_millis(300),
        ..FaultConfig::default()
    };
    let report = run(spec).await;
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(report.audit.charges_executed, 1);
    assert_eq!(report.lost_events, 0);
    let trace = report
        .traces
        .values()
        .flatten()
        .cloned()
        .collect::<Vec<_>>();
    assert!(
        trace
            .iter()
            .any(|line| line.contains("dead-lettered") && line.contains("422")),
        "the reason names the 422: {trace:?}"
    );
}

#[tokio::test]
async fn lost_responses_are_retried_with_the_key_and_charged_once() {
    let plan = ChaosPlan::generate(28, MESSAGES, FaultMix::NONE);
    let mut spec = RunSpec::new(Variant::Hardened, plan, 2);
    spec.psp_faults = FaultConfig {
        lost_response_rate: 0.3,
        seed: 28,
        lost_response_hold: Duration::from_secs(2),
        ..FaultConfig::default()
    };
    spec.psp_timeout = Duration::from_millis(300);
    let report = run(spec).await;
    assert!(
        report
            .requeued_by_cause
            .get("timeout")
            .copied()
            .unwrap_or(0)
            > 0
    );
    assert_eq!(report.double_charges, 0);
    assert_eq!(report.lost_events, 0);
}

/// The chapter's binary holds its claims (it exits 0) on one broker.
fn the_chapter_holds_its_claims_on(backend: &str) {
    let report = chaos_lab::chapter::run_for_test(
        env!("CARGO_BIN_EXE_ch03-idempotency-key"),
        &["--backend", backend, "--messages", "20", "--seed", "3"],
    );
    let hardened = &report["runs"][1];
    assert_eq!(hardened["backend"], backend);
    assert_eq!(hardened["variant"], "dedup-with-key");
    assert_eq!(hardened["double_charges"], 0);
    assert_eq!(hardened["lost_events"], 0);
    assert!(hardened["kills"].as_u64().unwrap() > 0);
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

/// A producer that retries by emitting a fresh event for the same order:
/// keyed on the event id, each order is charged twice; keyed on the order
/// (the hardened consumer), the second event is a dedup hit.
#[tokio::test]
async fn a_second_event_for_an_order_is_charged_once_only_when_keyed_on_the_order() {
    let mut plan = ChaosPlan::generate(29, 6, FaultMix::NONE);
    for order in &mut plan.orders {
        order.producer_fault = Some(ProducerFault::RepublishedNewId);
    }
    let by_event = run(RunSpec::new(Variant::EventKeyed, plan.clone(), 2)).await;
    assert_eq!(by_event.deliveries, 12);
    assert_eq!(by_event.double_charges, 6, "every order charged twice");

    let by_order = run(RunSpec::new(Variant::Hardened, plan, 2)).await;
    assert_eq!(by_order.deliveries, 12);
    assert_eq!(by_order.dedup_hits, 6);
    assert_eq!(by_order.double_charges, 0);
    assert_eq!(by_order.lost_events, 0);
    assert_eq!(by_order.audit.charges_executed, 6);
}
