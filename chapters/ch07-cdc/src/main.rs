//! Chapter 7: change data capture. Debezium reads the outbox's inserts from
//! Postgres's write-ahead log, and a Kafka Connect worker publishes them to
//! the consumers' topic: no relay queries the table.
//!
//! Three parts, each a real run:
//! - chaos: Kafka Connect SIGKILLed mid-stream and started again while the
//!   shop keeps committing, at-least-once and with Connect's exactly-once
//!   source support: what reached the topic, and what the consumer's dedup
//!   still has to absorb;
//! - compare: pollers (1 s, 100 ms), LISTEN/NOTIFY and Debezium under the
//!   same load, publishing to the same Kafka: latency, Postgres load, WAL;
//! - operations: Connect down for a minute, the abandoned slot and its
//!   guard, and the outbox table's size when rows are deleted at once.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cdc::comparison::ComparisonConfig;
use cdc::operations::OperationsConfig;
use cdc::worker::Delivery;
use chaos_lab::cdc_relay::ConnectOutage;
use chaos_lab::roles::ProducerKind;
use chaos_lab::{Chapter, ChapterReport, Claim, FaultMix, Lab};
use clap::ValueEnum;
use consumer::Variant;
use queue::backend::BackendKind;

static CHAPTER: Chapter = Chapter {
    id: "ch07",
    title: "change data capture",
    default_messages: 600,
    backends: &[BackendKind::Kafka],
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Chaos,
    Compare,
    Operations,
}

/// Chapter 7's own arguments.
#[derive(Debug, Clone, clap::Args)]
struct PartArgs {
    /// Run one part of the chapter (default: all three).
    #[arg(long, value_enum)]
    part: Option<Part>,
    /// Write the latency chart (SVG) into this folder.
    #[arg(long)]
    charts: Option<PathBuf>,
    /// Seconds each relay runs at each rate in the comparison.
    #[arg(long)]
    compare_seconds: Option<u64>,
    /// Seconds Kafka Connect stays down in the operations part.
    #[arg(long)]
    outage_seconds: Option<u64>,
}

impl PartArgs {
    fn runs(&self, part: Part) -> bool {
        self.part.is_none_or(|chosen| chosen == part)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    chaos_lab::chapter::main_with_args(&CHAPTER, cdc_chapter).await
}

async fn cdc_chapter(lab: Lab, args: PartArgs) -> anyhow::Result<ChapterReport> {
    let mut report = lab.report(Vec::new(), Vec::new());
    if args.runs(Part::Chaos) {
        report = connect_killed(&lab, report).await?;
    }
    if args.runs(Part::Compare) {
        report = compare(&args, report).await?;
    }
    if args.runs(Part::Operations) {
        report = operations(&args, report).await?;
    }
    Ok(report)
}

/// b. The four relays under the same load, one after another.
async fn compare(args: &PartArgs, report: ChapterReport) -> anyhow::Result<ChapterReport> {
    eprintln!("b. pollers, NOTIFY and Debezium under one load ...");
    let mut config = ComparisonConfig::default();
    if let Some(seconds) = args.compare_seconds {
        config = config.with_duration(Duration::from_secs(seconds));
    }
    let comparison = cdc::comparison::compare_relays(&config)
        .await
        .context("comparing the relays")?;
    if let Some(dir) = &args.charts {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("ch07-relay-latency-cdf.svg");
        comparison
            .write_cdf_chart(&path)
            .with_context(|| format!("drawing {}", path.display()))?;
    }
    let claim = Claim::new(
        "every relay delivered every committed event under both loads (none lost)",
        comparison.lost() == 0,
    );
    Ok(report
        .with_measurement("comparison", comparison.to_markdown(), &comparison)
        .with_claim(claim))
}

/// c. Connect down for a while, the abandoned slot, the outbox's size.
async fn operations(args: &PartArgs, report: ChapterReport) -> anyhow::Result<ChapterReport> {
    eprintln!("c. what running CDC costs an operator ...");
    let mut config = OperationsConfig::default();
    if let Some(seconds) = args.outage_seconds {
        config = config.with_outage(Duration::from_secs(seconds));
    }
    let operations = cdc::operations::measure_operations(&config)
        .await
        .context("measuring Connect's outage, the abandoned slot and the outbox's size")?;
    let claims = [
        Claim::new(
            "Kafka Connect down while the shop kept writing: the slot held the WAL, and no event was lost",
            operations.lost() == 0 && operations.retained_bytes() > 0,
        ),
        Claim::new(
            "max_slot_wal_keep_size invalidated the abandoned slot once it held more WAL than allowed",
            operations.slot_invalidated(),
        ),
    ];
    let mut report = report.with_measurement("operations", operations.to_markdown(), &operations);
    for claim in claims {
        report = report.with_claim(claim);
    }
    Ok(report)
}

/// The relay is Debezium; Kafka Connect dies once a third of the orders are
/// committed and comes back five seconds later, while the shop keeps
/// placing an order every 10 ms.
fn debezium(lab: &Lab, variant: Variant, delivery: Delivery) -> chaos_lab::run::RunSpec {
    // No consumer faults: every dedup hit in these runs is a record that
    // Debezium sent again.
    let plan = lab.plan(FaultMix::NONE);
    let mut spec = lab.spec(variant, &plan);
    spec.scenario = "Kafka Connect SIGKILLed mid-stream".into();
    spec.producer = ProducerKind::Cdc { delivery };
    spec.publish_pace = Some(Duration::from_millis(10));
    spec.connect_outage = Some(ConnectOutage {
        after_rows: (plan.orders.len() / 3).max(1) as i64,
        down_for: Duration::from_secs(5),
    });
    spec
}

/// a. SIGKILL Kafka Connect mid-stream, in both delivery modes.
async fn connect_killed(lab: &Lab, report: ChapterReport) -> anyhow::Result<ChapterReport> {
    eprintln!("a. Kafka Connect SIGKILLed mid-stream, at-least-once and exactly-once source ...");
    let naive = lab
        .run(debezium(lab, Variant::Naive, Delivery::AtLeastOnce))
        .await?;
    let at_least_once = lab
        .run(debezium(lab, Variant::Hardened, Delivery::AtLeastOnce))
        .await?;
    let exactly_once = lab
        .run(debezium(lab, Variant::Hardened, Delivery::ExactlyOnce))
        .await?;
    let resent = |run: &chaos_lab::RunReport| run.topic_records.map_or(0, |c| c.resent());
    let claims = vec![
        Claim::new(
            "Kafka Connect was SIGKILLed and restarted in every run, and no event was lost",
            [&naive, &at_least_once, &exactly_once]
                .iter()
                .all(|run| run.relay_kills > 0 && run.lost_events == 0 && run.drained),
        ),
        Claim::new(
            "at-least-once, the records Debezium sends again are charged again by the naive consumer",
            resent(&naive) > 0 && naive.double_charges > 0,
        ),
        Claim::new(
            "the hardened consumer absorbs every record sent again as a dedup hit: zero double charges, zero lost",
            at_least_once.double_charges == 0
                && at_least_once.lost_events == 0
                && at_least_once.dedup_hits >= resent(&at_least_once),
        ),
        Claim::new(
            "with exactly-once source support, a read_committed reader finds each event on the topic once despite the kill",
            exactly_once.topic_records.is_some_and(|count| {
                count.resent() == 0 && count.distinct_events == exactly_once.audit.orders_committed
            }) && exactly_once.double_charges == 0
                && exactly_once.lost_events == 0,
        ),
    ];
    let mut report = report.with_runs(vec![naive, at_least_once, exactly_once]);
    for claim in claims {
        report = report.with_claim(claim);
    }
    Ok(report)
}
