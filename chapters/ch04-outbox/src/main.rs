//! Chapter 4: the transactional outbox.
//!
//! The naive producer commits the order and then publishes (the dual write);
//! a dropped publish or a crash in between loses the event for good. The
//! outbox producer writes the order and its event in one transaction, and
//! relay processes publish pending rows, marking them sent only after the
//! broker confirmed.
//!
//! First the demonstration: one publish dropped, the row visibly still
//! pending, the relay publishing it again, the order charged once. Then both
//! producers under the same schedule: publishes dropped, the producer
//! SIGKILLed between commit and publish, relays SIGKILLed between publish and
//! mark, with the hardened consumer absorbing the relays' duplicates.

use std::process::ExitCode;
use std::time::Duration;

use chaos_lab::roles::ProducerKind;
use chaos_lab::{ChaosPlan, Chapter, ChapterReport, Claim, FaultMix, Lab};
use consumer::Variant;
use relay::RelayConfig;

static CHAPTER: Chapter = Chapter {
    id: "ch04",
    title: "the transactional outbox",
    default_messages: 60,
    backends: chaos_lab::chapter::EVERY_BACKEND,
};

/// Two relays woken by NOTIFY. A short lease, so that the rows of a relay
/// killed mid-batch go to the other relay within the run.
fn outbox_with_relays(relays: usize) -> ProducerKind {
    ProducerKind::Outbox {
        relays,
        relay: RelayConfig {
            lease: Duration::from_secs(2),
            ..RelayConfig::default()
        },
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    chaos_lab::chapter::main(&CHAPTER, transactional_outbox).await
}

async fn transactional_outbox(lab: Lab) -> anyhow::Result<ChapterReport> {
    // One order whose first publish is dropped on its way to the broker.
    let one = ChaosPlan::generate(
        lab.seed,
        1,
        FaultMix {
            publish_dropped: 1.0,
            ..FaultMix::NONE
        },
    );
    let mut spec = lab.spec(Variant::Hardened, &one);
    spec.scenario = "one publish dropped".into();
    spec.producer = outbox_with_relays(1);
    spec.trace_orders = vec![one.orders[0].order_id];
    let demo = lab.run(spec).await?;

    // The producer's legs, against both producers.
    let plan = lab.plan(FaultMix::PRODUCER_LEGS);
    eprintln!("fault schedule: {}", plan.summary());
    let naive = lab.run(lab.spec(Variant::Hardened, &plan)).await?;
    let mut spec = lab.spec(Variant::Hardened, &plan);
    spec.producer = outbox_with_relays(2);
    let outbox = lab.run(spec).await?;

    let claims = vec![
        Claim::new(
            "the dropped publish left its outbox row pending, the relay published it again, one charge",
            demo.traces
                .values()
                .flatten()
                .any(|line| line.contains("still pending"))
                && demo.audit.charges_executed == 1
                && demo.lost_events == 0,
        ),
        Claim::new(
            "the naive producer loses events under the schedule",
            naive.lost_events > 0,
        ),
        Claim::new(
            "the outbox loses none under the same schedule",
            outbox.lost_events == 0 && outbox.producer_kills > 0,
        ),
        Claim::new(
            "relays killed between publish and mark republish, and the hardened consumer absorbs it: zero double charges",
            outbox.relay_kills > 0
                && outbox.republished > 0
                && outbox.dedup_hits > 0
                && outbox.double_charges == 0,
        ),
    ];
    let trace = demo.traces.values().flatten().cloned().collect();
    let relay_lines = outbox.relay_metric_lines(&[
        "outbox_pending",
        "outbox_oldest_pending_age_seconds",
        "relay_published_total",
        "relay_republished_total",
        "relay_publish_failures_total",
        "relay_publish_latency_seconds_count",
    ]);
    Ok(lab
        .report(vec![demo, naive, outbox], claims)
        .with_section("The dropped publish, step by step", trace)
        .with_section(
            "What the relays served on /metrics after the outbox run",
            relay_lines,
        ))
}
