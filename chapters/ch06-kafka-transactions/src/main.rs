//! Chapter 6: what Kafka's idempotent producer and transactions cost, and
//! where their guarantee ends.
//!
//! Three parts, each a real run against the Kafka broker:
//! - a. the producer's cost: `acks=1`, `acks=all`, idempotent, and
//!   transactions committed every message, 10 ms, 100 ms and 1 s, as ratios
//!   to `acks=all` measured in one run;
//! - b. exactly-once inside Kafka: a consume–transform–produce pipeline
//!   whose transformer is SIGKILLed at seeded moments, read back by a
//!   `read_committed` and a `read_uncommitted` reader;
//! - c. where the boundary ends: a consumer that acks inside a Kafka
//!   transaction but charges the PSP and writes Postgres, SIGKILLed after the
//!   charge and after the Postgres commit: the naive consumer double-charges,
//!   the hardened one does not.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chaos_lab::{Chapter, ChapterReport, Claim, FaultMix, Lab};
use clap::ValueEnum;
use consumer::Variant;
use kafka_transactions::exactly_once::TransformerCommand;
use kafka_transactions::producer_cost::{CommitEvery, ProducerMode};
use kafka_transactions::{ExactlyOnceConfig, ProducerCostConfig};
use queue::backend::BackendKind;

static CHAPTER: Chapter = Chapter {
    id: "ch06",
    title: "Kafka transactions",
    default_messages: 40,
    backends: &[BackendKind::Kafka],
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    ProducerCost,
    ExactlyOnce,
    Boundary,
}

/// Chapter 6's own arguments.
#[derive(Debug, Clone, clap::Args)]
struct PartArgs {
    /// Run one part of the chapter (default: all three).
    #[arg(long, value_enum)]
    part: Option<Part>,
    /// Write the producer-cost chart (SVG) into this folder.
    #[arg(long)]
    charts: Option<PathBuf>,
    /// Records each producer mode sends per payload size (part a).
    #[arg(long)]
    producer_messages: Option<usize>,
    /// Input records of the consume–transform–produce pipeline (part b).
    #[arg(long)]
    pipeline_records: Option<u64>,
}

impl PartArgs {
    fn runs(&self, part: Part) -> bool {
        self.part.is_none_or(|chosen| chosen == part)
    }
}

fn main() -> ExitCode {
    // Part b re-executes this binary as its transformer process (the lab's
    // consumer and producer processes are dispatched by chapter::main).
    if let Some(code) = kafka_transactions::run_transformer_if_requested() {
        return code;
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(async {
        chaos_lab::chapter::main_with_args(&CHAPTER, kafka_transactions_chapter).await
    })
}

async fn kafka_transactions_chapter(lab: Lab, args: PartArgs) -> anyhow::Result<ChapterReport> {
    let mut report = lab.report(Vec::new(), Vec::new());
    if args.runs(Part::ProducerCost) {
        report = producer_cost(&args, report).await?;
    }
    if args.runs(Part::ExactlyOnce) {
        report = exactly_once(&lab, &args, report).await?;
    }
    if args.runs(Part::Boundary) {
        report = boundary(&lab, report).await?;
    }
    Ok(report)
}

/// a. The same messages through every producer mode, in one run.
async fn producer_cost(args: &PartArgs, report: ChapterReport) -> anyhow::Result<ChapterReport> {
    eprintln!("a. the producer's cost, mode by mode ...");
    let mut config = ProducerCostConfig::default();
    if let Some(messages) = args.producer_messages {
        config.messages = messages;
    }
    let cost = kafka_transactions::measure_producer_cost(&config)
        .await
        .context("measuring the producer modes")?;
    if let Some(dir) = &args.charts {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("ch06-producer-cost.svg");
        cost.write_chart(&path)
            .with_context(|| format!("drawing {}", path.display()))?;
    }
    let collapse = one_message_transactions_collapse(&cost);
    Ok(report
        .with_measurement("producer_cost", cost.to_markdown(), &cost)
        .with_claim(Claim::new(
            "a transaction per message costs a large share of the throughput (under half of 100 ms transactions, every payload)",
            collapse,
        )))
}

/// True when, for every payload size, one-message transactions reach less
/// than half the throughput of transactions committed every 100 ms (the
/// ratio taken within each round, as every ratio of the table).
fn one_message_transactions_collapse(cost: &kafka_transactions::ProducerCostReport) -> bool {
    let per_message = ProducerMode::Transactional(CommitEvery::Message);
    let every_100ms =
        ProducerMode::Transactional(CommitEvery::Interval(Duration::from_millis(100)));
    let sizes = cost.payload_sizes();
    !sizes.is_empty()
        && sizes.into_iter().all(|size| {
            cost.throughput_ratio(per_message, every_100ms, size)
                .is_some_and(|ratio| ratio < 0.5)
        })
}

/// b. Consume–transform–produce with the transformer SIGKILLed.
async fn exactly_once(
    lab: &Lab,
    args: &PartArgs,
    report: ChapterReport,
) -> anyhow::Result<ChapterReport> {
    eprintln!("b. exactly-once inside Kafka, the transformer SIGKILLed ...");
    let mut config = ExactlyOnceConfig::new(TransformerCommand::this_executable()?);
    config.seed = lab.seed;
    if let Some(records) = args.pipeline_records {
        config.records = records;
    }
    let pipelines = kafka_transactions::run_exactly_once(&config)
        .await
        .context("running the consume–transform–produce pipelines")?;
    let txn = &pipelines.transactional;
    let alo = &pipelines.at_least_once;
    let claims = [
        Claim::new(
            "with transactions, a read_committed reader sees every input exactly once despite the kills",
            txn.drained()
                && !txn.kills.is_empty()
                && txn.read_committed.duplicates == 0
                && txn.read_committed.missing == 0,
        ),
        Claim::new(
            "a read_uncommitted reader sees the writes of the transactions the kills cut short",
            txn.kills_inside_open_batch() == 0 || txn.aborted_records_seen() > 0,
        ),
        Claim::new(
            "without transactions, a kill between the produce and the offset commit leaves duplicates every reader sees",
            alo.drained() && (alo.acked_in_killed_batches() == 0 || alo.read_committed.duplicates > 0),
        ),
    ];
    let mut report = report.with_measurement("exactly_once", pipelines.to_markdown(), &pipelines);
    for claim in claims {
        report = report.with_claim(claim);
    }
    Ok(report)
}

/// c. A transactional Kafka consumer whose side effect lives outside Kafka.
async fn boundary(lab: &Lab, report: ChapterReport) -> anyhow::Result<ChapterReport> {
    eprintln!("c. where the boundary ends: the charge outside the transaction ...");
    let mix = FaultMix {
        after_charge_before_commit: 0.1,
        after_commit_before_ack: 0.1,
        ..FaultMix::NONE
    };
    let plan = lab.plan(mix);
    eprintln!("fault schedule: {}", plan.summary());
    let transactional = |variant| {
        let mut spec = lab.spec(variant, &plan);
        spec.scenario = "acks commit in a Kafka transaction".into();
        spec.transactional_ack = true;
        spec
    };
    let naive = lab.run(transactional(Variant::Naive)).await?;
    let hardened = lab.run(transactional(Variant::Hardened)).await?;
    let claims = [
        Claim::new(
            "the Kafka transaction does not cover the charge: the naive consumer double-charges",
            naive.double_charges > 0,
        ),
        Claim::new(
            "INSERT-first dedup and the Idempotency-Key: zero double charges and zero lost events under the same kills",
            hardened.double_charges == 0 && hardened.lost_events == 0 && hardened.consumer_kills > 0,
        ),
    ];
    let mut report = report.with_runs(vec![naive, hardened]);
    for claim in claims {
        report = report.with_claim(claim);
    }
    Ok(report)
}
