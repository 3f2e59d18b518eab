//! Chapter 1: reproduce duplicates and losses on purpose.
//!
//! The naive pipeline (commit then publish; charge without an
//! Idempotency-Key; ack after commit) runs under one seeded chaos schedule
//! that meets every leg: consumers SIGKILLed at all three crash points,
//! publishes dropped, the producer SIGKILLed between commit and publish. The
//! same schedule then runs against the consumer that acks on receipt.
//!
//! The chapter's claim: the naive pipeline double-charges AND loses events,
//! and acking on receipt trades the duplicates for more losses. The binary
//! exits non-zero if a run does not show it.

use std::process::ExitCode;

use chaos_lab::{Chapter, ChapterReport, Claim, FaultMix, Lab};
use consumer::Variant;

static CHAPTER: Chapter = Chapter {
    id: "ch01",
    title: "reproduce duplicates and lost events",
    default_messages: 60,
    backends: chaos_lab::chapter::EVERY_BACKEND,
};

#[tokio::main]
async fn main() -> ExitCode {
    chaos_lab::chapter::main(&CHAPTER, reproduce).await
}

async fn reproduce(lab: Lab) -> anyhow::Result<ChapterReport> {
    let plan = lab.plan(FaultMix::EVERY_LEG);
    eprintln!("fault schedule: {}", plan.summary());

    let naive = lab.run(lab.spec(Variant::Naive, &plan)).await?;
    let ack_on_receipt = lab.run(lab.spec(Variant::AckOnReceipt, &plan)).await?;

    let claims = vec![
        Claim::new(
            "the naive consumer double-charges (Leg 3: redelivery after a crash)",
            naive.double_charges > 0,
        ),
        Claim::new(
            "the naive producer loses events (dual write: dropped publish, crash after commit)",
            naive.lost_events > 0,
        ),
        Claim::new(
            "acking on receipt loses more events than acking after commit",
            ack_on_receipt.lost_events > naive.lost_events,
        ),
    ];
    Ok(lab.report(vec![naive, ack_on_receipt], claims))
}
