//! Consume–transform–produce inside Kafka, with the transforming process
//! SIGKILLed at seeded moments: what transactions guarantee, measured by
//! the readers of the output.
//!
//! The pipeline: an input topic holds records numbered 0..N; a transformer
//! process reads them (`read_committed`, its own consumer group, no
//! auto-commit) and, per batch, writes one output record per input record
//! and marks the batch consumed. Two variants run under the same seed:
//!
//! - [`Variant::Transactional`]: begin a transaction, produce, add the
//!   input offsets with `send_offsets_to_transaction`, commit. A killed
//!   transformer's open transaction is aborted by its successor (same
//!   `transactional.id`), so a `read_committed` reader of the output sees
//!   every sequence number exactly once, while a `read_uncommitted` reader
//!   also sees the aborted writes.
//! - [`Variant::AtLeastOnce`]: the idempotent producer, offsets committed
//!   after the broker acknowledged the batch. A kill after the produce and
//!   before the offset commit means the batch is consumed and written again:
//!   duplicates the idempotent producer cannot see, because the successor is
//!   a new producer.
//!
//! Where the guarantee ends: it covers Kafka → Kafka. A side effect outside
//! Kafka (a charge at the PSP, a row in Postgres) is not in the transaction,
//! so it is redone after a kill just as in the at-least-once variant; that
//! is the consumer's dedup of chapters 2 and 3.
//!
//! # Layout
//!
//! - [`transformer`](run_transformer_if_requested): the child process.
//! - `harness`: starts, kills and restarts it; records where each kill
//!   landed.
//! - `plan`: the seeded kill schedule.
//! - `readers`: the input loader, the offset check and the two readers.
//! - `report`: the results and their table.

mod harness;
mod plan;
mod readers;
mod report;
mod transformer;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::admin::Admin;
use crate::error::{KafkaTransactionsError, Result};

pub use harness::{Kill, KillLanding, TransformerCommand};
pub use plan::KillPlan;
pub use readers::{Isolation, ReaderCount};
pub use report::{ExactlyOnceReport, PipelineRun};
pub use transformer::{run_transformer_if_requested, TRANSFORMER_ENV};

/// How the transformer makes its output and its input offsets agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Output and offsets in one Kafka transaction.
    Transactional,
    /// Idempotent producer; offsets committed after the acknowledgement.
    AtLeastOnce,
}

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::Transactional => "transactions",
            Variant::AtLeastOnce => "at-least-once (idempotent producer)",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Variant::Transactional => "txn",
            Variant::AtLeastOnce => "alo",
        }
    }
}

/// Everything an exactly-once run is parameterised by.
#[derive(Debug, Clone)]
pub struct ExactlyOnceConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Input records (sequence numbers 0..records).
    pub records: u64,
    /// Partitions of the input and of the output topic.
    pub partitions: i32,
    /// Input records per batch (per transaction).
    pub batch_size: usize,
    /// Time the transformer spends on each record before producing it.
    pub work_per_record: Duration,
    /// The transformer's `linger.ms`.
    pub linger: Duration,
    /// SIGKILLs planned per pipeline.
    pub kills: usize,
    /// Each kill comes after 1 to this many acknowledged output records of
    /// one transformer life.
    pub max_acked_before_kill: u64,
    pub seed: u64,
    /// Longest one pipeline may take to drain; reported, not an error.
    pub deadline: Duration,
    /// Topic and group names start with this (then a fresh UUID).
    pub topic_prefix: String,
    /// How to start a transformer process.
    pub transformer: TransformerCommand,
}

impl ExactlyOnceConfig {
    /// The chapter's defaults, starting transformers with `transformer`.
    pub fn new(transformer: TransformerCommand) -> Self {
        Self {
            brokers: queue::kafka::brokers_from_env(),
            records: 2_000,
            partitions: 3,
            batch_size: 50,
            work_per_record: Duration::from_millis(1),
            linger: crate::producer_cost::DEFAULT_LINGER,
            kills: 6,
            max_acked_before_kill: 120,
            seed: 6,
            deadline: Duration::from_secs(120),
            topic_prefix: "eo.ch06.pipeline".to_owned(),
            transformer,
        }
    }

    pub fn kill_plan(&self) -> KillPlan {
        KillPlan::from_seed(self.seed, self.kills, self.max_acked_before_kill)
    }

    fn validate(&self) -> Result<()> {
        let problem = if self.records == 0 {
            "records must be at least 1"
        } else if self.partitions < 1 {
            "partitions must be at least 1"
        } else if self.batch_size == 0 {
            "batch_size must be at least 1"
        } else if self.max_acked_before_kill == 0 {
            "max_acked_before_kill must be at least 1"
        } else {
            return Ok(());
        };
        Err(KafkaTransactionsError::InvalidConfig(problem.to_owned()))
    }
}

/// Runs the transactional pipeline and then the at-least-once one under
/// the same kill plan, each on its own fresh topics.
pub async fn run_exactly_once(config: &ExactlyOnceConfig) -> Result<ExactlyOnceReport> {
    let plan = config.kill_plan();
    let transactional = run_pipeline(config, Variant::Transactional, &plan).await?;
    let at_least_once = run_pipeline(config, Variant::AtLeastOnce, &plan).await?;
    Ok(ExactlyOnceReport {
        plan,
        records: config.records,
        partitions: config.partitions,
        batch_size: config.batch_size,
        work_per_record_ms: config.work_per_record.as_secs_f64() * 1e3,
        transactional,
        at_least_once,
    })
}

/// One pipeline end to end: fresh input and output topics, the input
/// loaded, the transformer run and killed as `plan` says, the output read
/// back; topics and group deleted at the end (also when the run fails).
///
/// Progress goes to `tracing` at INFO level.
pub async fn run_pipeline(
    config: &ExactlyOnceConfig,
    variant: Variant,
    plan: &KillPlan,
) -> Result<PipelineRun> {
    config.validate()?;
    let base = format!(
        "{}.{}.{}",
        config.topic_prefix,
        Uuid::new_v4().simple(),
        variant.slug()
    );
    let job = transformer::TransformerJob {
        brokers: config.brokers.clone(),
        variant,
        input_topic: format!("{base}.input"),
        output_topic: format!("{base}.output"),
        partitions: config.partitions,
        group: format!("{base}.transformer"),
        // One slot, one fixed id: every restart of the slot fences the last.
        transactional_id: format!("{base}.transformer-0"),
        batch_size: config.batch_size,
        work_per_record_us: config.work_per_record.as_micros() as u64,
        linger_ms: config.linger.as_millis() as u64,
    };
    let admin = Admin::connect(&config.brokers)?;
    let topics = [job.input_topic.clone(), job.output_topic.clone()];
    let mut created = Vec::new();
    let outcome = async {
        for topic in &topics {
            admin.create_topic(topic, config.partitions).await?;
            created.push(topic.clone());
        }
        pipeline(config, &job, plan).await
    }
    .await;
    let deleted = admin.delete_topics(&created).await;
    let group_deleted = admin.delete_group(&job.group).await;
    let run = outcome?;
    deleted?;
    group_deleted?;
    Ok(run)
}

async fn pipeline(
    config: &ExactlyOnceConfig,
    job: &transformer::TransformerJob,
    plan: &KillPlan,
) -> Result<PipelineRun> {
    let (brokers, records, partitions) = (job.brokers.clone(), config.records, job.partitions);
    let input = job.input_topic.clone();
    blocking("loading the input", move || {
        readers::load_input(&brokers, &input, partitions, records)
    })
    .await?;
    tracing::info!(variant = job.variant.label(), records, "input loaded");

    let job_json = serde_json::to_string(job).expect("a job serialises");
    let started = Instant::now();
    let supervised = harness::supervise(
        &config.transformer,
        &job_json,
        &plan.after_acked,
        config.deadline,
    )
    .await?;
    let elapsed_s = started.elapsed().as_secs_f64();
    tracing::info!(
        variant = job.variant.label(),
        kills = supervised.kills.len(),
        finished = supervised.finished,
        elapsed_s,
        "transformer done"
    );

    let (brokers, group, input) = (
        job.brokers.clone(),
        job.group.clone(),
        job.input_topic.clone(),
    );
    let input_committed = blocking("checking the committed offsets", move || {
        readers::committed_input(&brokers, &group, &input, partitions)
    })
    .await?;
    let mut counts = Vec::new();
    for isolation in [Isolation::ReadCommitted, Isolation::ReadUncommitted] {
        let (brokers, output) = (job.brokers.clone(), job.output_topic.clone());
        counts.push(
            blocking("reading the output", move || {
                readers::count_output(&brokers, &output, partitions, isolation, records)
            })
            .await?,
        );
    }
    Ok(PipelineRun {
        variant: job.variant,
        records,
        finished: supervised.finished,
        input_committed,
        kills: supervised.kills,
        starts: supervised.starts,
        failures: supervised.failures,
        elapsed_s,
        read_committed: counts[0],
        read_uncommitted: counts[1],
    })
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| KafkaTransactionsError::Panicked(what))?
}
