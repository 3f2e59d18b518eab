//! Chapter 3: the Idempotency-Key.
//!
//! Dedup in our database cannot take back money that moved outside it. The
//! fix belongs at the PSP: every charge carries an Idempotency-Key derived
//! from the event, the same on every redelivery, every consumer and every
//! retry, so the PSP replays the first charge instead of making a second.
//!
//! Measured here, all against the real PSP and its ledger:
//! - chapter 1's crash schedule (the consumer's legs): dedup without a key
//!   against dedup with the key;
//! - the PSP losing responses after it charged ("charged but the response
//!   was lost"): the naive consumer against the hardened one;
//! - what a retry gets back: 409 while the first attempt is still in flight
//!   (retried later), 422 when the key comes back with other parameters (a
//!   poison message, dead-lettered with its reason, never charged twice);
//! - a producer that emits a second event for an order under a fresh event
//!   id: the consumer keyed on the event (message identity) against the one
//!   keyed on the order (business identity).

use std::process::ExitCode;
use std::time::Duration;

use chaos_lab::plan::ProducerFault;
use chaos_lab::{BackendKind, ChaosPlan, Chapter, ChapterReport, Claim, FaultMix, Lab};
use consumer::crash::CrashPoint;
use consumer::Variant;
use psp::FaultConfig;

static CHAPTER: Chapter = Chapter {
    id: "ch03",
    title: "the Idempotency-Key",
    default_messages: 60,
    backends: chaos_lab::chapter::EVERY_BACKEND,
};

#[tokio::main]
async fn main() -> ExitCode {
    chaos_lab::chapter::main(&CHAPTER, idempotency_key).await
}

async fn idempotency_key(lab: Lab) -> anyhow::Result<ChapterReport> {
    // Chapter 1's crash points, with and without the key.
    let plan = lab.plan(FaultMix::CONSUMER_LEGS);
    eprintln!("fault schedule: {}", plan.summary());
    let dedup_only = lab.run(lab.spec(Variant::DedupOnly, &plan)).await?;
    let hardened = lab.run(lab.spec(Variant::Hardened, &plan)).await?;

    // The PSP charges, then loses one response in five: the consumer's call
    // times out not knowing whether money moved.
    let quiet = lab.plan(FaultMix::NONE);
    let lost_responses = |variant| {
        let mut spec = lab.spec(variant, &quiet);
        spec.scenario = "PSP loses 20% of responses".into();
        spec.psp_faults = FaultConfig {
            lost_response_rate: 0.2,
            seed: lab.seed,
            lost_response_hold: Duration::from_secs(2),
            ..FaultConfig::default()
        };
        spec.psp_timeout = Duration::from_millis(300);
        spec
    };
    let naive_lost = lab.run(lost_responses(Variant::Naive)).await?;
    let hardened_lost = lab.run(lost_responses(Variant::Hardened)).await?;

    // 409: the PSP takes 800 ms, the consumer gives up after 300 ms and its
    // retry arrives while the first request is still being processed.
    let one = ChaosPlan::generate(lab.seed, 1, FaultMix::NONE);
    let mut spec = lab.spec(Variant::Hardened, &one);
    spec.scenario = "retry while the first call is in flight".into();
    spec.psp_faults = FaultConfig {
        latency: Duration::from_millis(800),
        ..FaultConfig::default()
    };
    spec.psp_timeout = Duration::from_millis(300);
    spec.trace_orders = vec![one.orders[0].order_id];
    let in_flight = lab.run(spec).await?;

    // 422: the first attempt charges and dies before its commit; the
    // producer meanwhile re-sent the event with another amount (on Kafka
    // the copy queues behind the original instead: see the claim).
    let mut poisoned = ChaosPlan::generate(lab.seed, 1, FaultMix::NONE);
    poisoned.orders[0].consumer_crash = Some(CrashPoint::AfterChargeBeforeCommit);
    poisoned.orders[0].producer_fault = Some(ProducerFault::RepublishedAltered);
    let mut spec = lab.spec(Variant::Hardened, &poisoned);
    spec.scenario = "same key, other amount".into();
    // A slow PSP keeps the first attempt's dedup row locked until the altered
    // copy is waiting on it, so the copy reaches the PSP before the original
    // is redelivered, every run.
    spec.psp_faults = FaultConfig {
        latency: Duration::from_millis(300),
        ..FaultConfig::default()
    };
    spec.trace_orders = vec![poisoned.orders[0].order_id];
    let reused = lab.run(spec).await?;

    // One order, two events: a quarter of the orders are published again
    // as a new event (same order, same amount, a fresh event id).
    let renewed_plan = second_events(&lab);
    let renewed_orders = renewed_plan.count_producer_faults(ProducerFault::RepublishedNewId);
    let second_event = |variant| {
        let mut spec = lab.spec(variant, &renewed_plan);
        spec.scenario = "second event for an order, fresh event id".into();
        spec
    };
    let keyed_by_event = lab.run(second_event(Variant::EventKeyed)).await?;
    let keyed_by_order = lab.run(second_event(Variant::Hardened)).await?;

    let after_charge = CrashPoint::AfterChargeBeforeCommit.name();
    let claims = vec![
        Claim::new(
            "without a key, dedup still double-charges after_charge_before_commit",
            dedup_only.double_charges_from(after_charge) > 0,
        ),
        Claim::new(
            "with the key: zero double charges and zero lost events under the same schedule",
            hardened.double_charges == 0
                && hardened.lost_events == 0
                && hardened.consumer_kills > 0,
        ),
        Claim::new(
            "lost responses double-charge the naive consumer's retries",
            naive_lost.double_charges > 0,
        ),
        Claim::new(
            "lost responses: the hardened consumer retries with the same key, one charge per order",
            hardened_lost.double_charges == 0
                && hardened_lost.lost_events == 0
                && hardened_lost
                    .requeued_by_cause
                    .get("timeout")
                    .copied()
                    .unwrap_or(0)
                    > 0,
        ),
        Claim::new(
            "a 409 is retried later and ends in exactly one charge",
            in_flight
                .requeued_by_cause
                .get("409 in flight")
                .copied()
                .unwrap_or(0)
                > 0
                && in_flight.audit.charges_executed == 1,
        ),
        same_key_other_amount(lab.backend, &reused),
        Claim::new(
            "a second event for an order under a fresh event id: keyed on the event, every such order is charged twice",
            keyed_by_event.double_charges == renewed_orders as u64
                && keyed_by_event.dedup_hits == 0,
        ),
        Claim::new(
            "keyed on the order: the second event is a dedup hit, each order charged once",
            keyed_by_order.double_charges == 0
                && keyed_by_order.lost_events == 0
                && keyed_by_order.dedup_hits == renewed_orders as u64,
        ),
    ];
    let traces = |run: &chaos_lab::RunReport| run.traces.values().flatten().cloned().collect();
    let retry_metrics = hardened_lost.metric_lines(&["charges_total", "requeued_total"]);
    let in_flight_trace = traces(&in_flight);
    let reused_trace = traces(&reused);
    Ok(lab
        .report(
            vec![
                dedup_only,
                hardened,
                naive_lost,
                hardened_lost,
                in_flight,
                reused,
                keyed_by_event,
                keyed_by_order,
            ],
            claims,
        )
        .with_section(
            "The hardened consumers' /metrics after the lost-response run",
            retry_metrics,
        )
        .with_section("409: the retry that arrived too early", in_flight_trace)
        .with_section("422: the same key with another amount", reused_trace))
}

/// The plan of the identity runs: every fourth order (at least one) is
/// published a second time as a new event.
fn second_events(lab: &Lab) -> ChaosPlan {
    let mut plan = ChaosPlan::generate(lab.seed, lab.messages, FaultMix::NONE);
    for order in plan.orders.iter_mut().step_by(4) {
        order.producer_fault = Some(ProducerFault::RepublishedNewId);
    }
    plan
}

/// What the altered copy of an event meets. On RabbitMQ and SQS another
/// consumer takes it while the original's first attempt holds its dedup
/// row, so it reaches the PSP with the key and another amount: 422. On
/// Kafka both copies carry the order's key, so they sit on one partition in
/// publish order and one consumer at a time reads them: the original is
/// redelivered first (the PSP replays its charge) and commits its dedup row,
/// and the copy behind it is a dedup hit whose fingerprint differs from
/// what was charged: dead-lettered with the mismatch as its reason, never
/// acked as an ordinary duplicate.
fn same_key_other_amount(backend: BackendKind, reused: &chaos_lab::RunReport) -> Claim {
    let charged_once = reused.audit.charges_executed == 1;
    match backend {
        BackendKind::Kafka => Claim::new(
            "same event id, other amount: the copy waits behind the original on the order's partition, its dedup hit has another fingerprint, and it is dead-lettered; the order is charged once",
            reused.dead_lettered == 1 && reused.dedup_hits == 0 && charged_once,
        ),
        BackendKind::Rabbitmq | BackendKind::Sqs => Claim::new(
            "a 422 is dead-lettered with its reason; the order is charged once",
            reused.dead_lettered == 1 && charged_once,
        ),
    }
}
