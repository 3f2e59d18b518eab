//! `sqs-batch-bench`: consuming one message per call (receive 1, delete 1)
//! against batches (receive 10, `DeleteMessageBatch`), each on a fresh queue.
//! The goal: batched at least 5x one-by-one. Table on stdout, progress on
//! stderr.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use clap::Parser;
use queue::sqs::{ReceiveSettings, SqsBroker, SqsTopology, MAX_BATCH};
use queue::Receiver;

/// The goal: batched consumption at least this many times faster.
const GOAL: f64 = 5.0;

#[derive(Debug, Parser)]
#[command(about = "SQS consume throughput: one-by-one vs batched")]
struct Args {
    /// Messages per mode.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
}

#[derive(Clone, Copy)]
enum Mode {
    OneByOne,
    Batched,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::OneByOne => "one-by-one (receive 1 + DeleteMessage)",
            Mode::Batched => "batched (receive 10 + DeleteMessageBatch)",
        }
    }
}

async fn fill(broker: &SqsBroker, topology: &SqsTopology, n: usize) -> anyhow::Result<()> {
    let url = broker.queue_url(&topology.queue).await?;
    let mut sent = 0;
    while sent < n {
        let mut request = broker.client().send_message_batch().queue_url(&url);
        let count = (n - sent).min(MAX_BATCH);
        for i in 0..count {
            request = request.entries(
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(format!("bench-{}", sent + i))
                    .build()
                    .context("batch entry")?,
            );
        }
        let output = request
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", aws_sdk_sqs::error::DisplayErrorContext(e)))
            .context("SendMessageBatch")?;
        if !output.failed().is_empty() {
            bail!(
                "{} entries of a SendMessageBatch failed",
                output.failed().len()
            );
        }
        sent += count;
    }
    Ok(())
}

/// Consumes `n` messages; returns messages per second.
async fn consume(broker: &SqsBroker, mode: Mode, n: usize) -> anyhow::Result<f64> {
    let topology = SqsTopology::new(
        format!("eo-bench-{}", uuid::Uuid::new_v4().simple()),
        Duration::from_secs(60),
        10,
    );
    broker.declare(&topology).await?;
    let result = async {
        eprintln!(
            "{}: filling {} with {n} messages",
            mode.label(),
            topology.queue
        );
        fill(broker, &topology, n).await?;
        let mut receiver = broker
            .receiver(&topology, ReceiveSettings::default())
            .await?;
        let started = Instant::now();
        let mut done = 0;
        while done < n {
            let max = match mode {
                Mode::OneByOne => 1,
                Mode::Batched => MAX_BATCH,
            };
            let batch = receiver.receive(max, Duration::from_secs(1)).await?;
            if batch.is_empty() {
                bail!("the queue ran dry after {done} of {n} messages");
            }
            match mode {
                Mode::OneByOne => {
                    for delivery in &batch {
                        receiver.ack(delivery).await?;
                    }
                }
                Mode::Batched => receiver.delete_batch(&batch).await?,
            }
            done += batch.len();
            if done % 500 < batch.len() {
                eprintln!("{}: {done}/{n}", mode.label());
            }
        }
        Ok(n as f64 / started.elapsed().as_secs_f64())
    }
    .await;
    broker.delete(&topology).await?;
    result
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.messages == 0 {
        bail!("--messages must be at least 1");
    }
    let broker = SqsBroker::connect().await.context("connecting to SQS")?;
    let one = consume(&broker, Mode::OneByOne, args.messages).await?;
    let batched = consume(&broker, Mode::Batched, args.messages).await?;
    let ratio = batched / one;
    println!("| mode | messages | messages/s |");
    println!("|---|---:|---:|");
    println!(
        "| {} | {} | {one:.0} |",
        Mode::OneByOne.label(),
        args.messages
    );
    println!(
        "| {} | {} | {batched:.0} |",
        Mode::Batched.label(),
        args.messages
    );
    println!(
        "| **ratio** | | **{ratio:.1}x** ({}: goal >= {GOAL}x) |",
        if ratio >= GOAL { "PASS" } else { "MISS" }
    );
    Ok(())
}
