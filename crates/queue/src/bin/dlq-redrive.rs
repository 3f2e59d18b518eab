//! `dlq-redrive`: moves an SQS queue's dead letters back to the queue,
//! following `runbook/dlq-redrive.md`: snapshot, sample, then a rate-limited
//! move that deletes from the DLQ only what it sent.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use queue::redrive::{Redrive, RedriveOptions};
use queue::sqs::{SqsBroker, SqsTopology};

#[derive(Debug, Parser)]
#[command(about = "Redrive an SQS dead-letter queue back to its main queue")]
struct Args {
    /// The main queue; its dead-letter queue is `<queue>-dlq`.
    #[arg(long)]
    queue: String,
    /// The dead-letter queue, when it is not `<queue>-dlq`.
    #[arg(long)]
    dlq: Option<String>,
    /// JSON-lines file for the snapshot of the DLQ (must not exist yet).
    #[arg(long)]
    snapshot: PathBuf,
    /// How many snapshot entries to print for the audit.
    #[arg(long, default_value_t = 5)]
    sample: usize,
    /// Snapshot and sample only; move nothing.
    #[arg(long)]
    dry_run: bool,
    /// Messages moved per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Move at most this many messages.
    #[arg(long)]
    max: Option<usize>,
    /// Seconds each receive hides a DLQ message.
    #[arg(long, default_value_t = 30)]
    visibility_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dlq = args.dlq.clone().unwrap_or_else(|| {
        SqsTopology::new(args.queue.clone(), Duration::ZERO, 1).dead_letter_queue()
    });
    let options = RedriveOptions {
        snapshot: args.snapshot.clone(),
        sample: args.sample,
        rate: args.rate,
        max: args.max,
        visibility_timeout: Duration::from_secs(args.visibility_secs),
    };
    let broker = SqsBroker::connect().await.context("connecting to SQS")?;
    let redrive = Redrive::by_name(&broker, &dlq, &args.queue, options).await?;

    let snapshot = redrive.snapshot().await.context("snapshot of the DLQ")?;
    println!(
        "snapshot: {} message(s) from {dlq} written to {}",
        snapshot.entries.len(),
        snapshot.path.display()
    );
    for entry in snapshot.sample() {
        println!(
            "  sample: id={} receives={} reason={:?} body={:?}",
            entry.message_id.as_deref().unwrap_or(&entry.sqs_message_id),
            entry.receive_count.map_or("?".into(), |c| c.to_string()),
            entry.reason,
            entry.body
        );
    }
    if args.dry_run {
        println!("dry run: nothing moved");
        return Ok(());
    }

    let report = redrive.run(&snapshot).await.context("redrive")?;
    for error in &report.errors {
        eprintln!("  {error}");
    }
    println!(
        "snapshotted={} moved={} failed={} duplicates_possible={}",
        report.snapshotted, report.moved, report.failed, report.duplicates_possible
    );
    if report.failed > 0 || report.duplicates_possible > 0 {
        bail!(
            "{} failed (still in the DLQ), {} moved but still in the DLQ (duplicate possible)",
            report.failed,
            report.duplicates_possible
        );
    }
    Ok(())
}
