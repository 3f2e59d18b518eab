//! Chapter 2: INSERT-first dedup.
//!
//! First the mechanism, on one message: a consumer is SIGKILLed after its
//! commit and before its ack, the broker redelivers, the INSERT of the event
//! id violates the primary key, the transaction rolls back, the delivery is
//! acked, and the surviving consumer's `/metrics` shows the dedup hit.
//!
//! Then the measurement: chapter 1's crash schedule (the consumer's legs)
//! against the naive consumer and the dedup consumer. Dedup closes the
//! `after_commit_before_ack` leg completely, and leaves the
//! `after_charge_before_commit` leg open: the money moved outside the
//! database, the rollback cannot take it back, and the redelivery charges
//! again. That gap is chapter 3.

use std::process::ExitCode;

use chaos_lab::{ChaosPlan, Chapter, ChapterReport, Claim, FaultMix, Lab};
use consumer::crash::CrashPoint;
use consumer::Variant;

static CHAPTER: Chapter = Chapter {
    id: "ch02",
    title: "INSERT-first dedup",
    default_messages: 60,
    backends: chaos_lab::chapter::EVERY_BACKEND,
};

#[tokio::main]
async fn main() -> ExitCode {
    chaos_lab::chapter::main(&CHAPTER, insert_first_dedup).await
}

async fn insert_first_dedup(lab: Lab) -> anyhow::Result<ChapterReport> {
    // One message, killed after the commit and before the ack.
    let one_message = ChaosPlan::generate(
        lab.seed,
        1,
        FaultMix {
            after_commit_before_ack: 1.0,
            ..FaultMix::NONE
        },
    );
    let mut spec = lab.spec(Variant::DedupOnly, &one_message);
    spec.scenario = "one message, killed after commit".into();
    spec.trace_orders = vec![one_message.orders[0].order_id];
    let demo = lab.run(spec).await?;

    // Chapter 1's crash points on the same orders, against both consumers.
    let plan = lab.plan(FaultMix::CONSUMER_LEGS);
    eprintln!("fault schedule: {}", plan.summary());
    let naive = lab.run(lab.spec(Variant::Naive, &plan)).await?;
    let dedup = lab.run(lab.spec(Variant::DedupOnly, &plan)).await?;

    let after_commit = CrashPoint::AfterCommitBeforeAck.name();
    let after_charge = CrashPoint::AfterChargeBeforeCommit.name();
    let scraped_hits = demo.metric_lines(&["dedup_hits_total", "dedup_hit_rate"]);
    let claims = vec![
        Claim::new(
            "the redelivery after the kill is caught by the primary key: one dedup hit, one charge",
            demo.dedup_hits == 1 && demo.consumer_kills == 1 && demo.audit.charges_executed == 1,
        ),
        Claim::new(
            "a consumer's /metrics registered the dedup hit",
            scraped_hits
                .iter()
                .any(|line| line.contains("dedup_hits_total 1")),
        ),
        Claim::new(
            "the naive consumer double-charges on both legs",
            naive.double_charges_from(after_commit) > 0
                && naive.double_charges_from(after_charge) > 0,
        ),
        Claim::new(
            "dedup closes the after_commit_before_ack leg: zero double charges there",
            dedup.double_charges_from(after_commit) == 0 && dedup.dedup_hits > 0,
        ),
        Claim::new(
            "dedup alone still double-charges after_charge_before_commit (chapter 3's gap)",
            dedup.double_charges_from(after_charge) > 0,
        ),
    ];
    let trace = demo.traces.values().flatten().cloned().collect();
    Ok(lab
        .report(vec![demo, naive, dedup], claims)
        .with_section("The one message's deliveries", trace)
        .with_section(
            "What the consumers served on /metrics afterwards",
            scraped_hits,
        ))
}
