//! Benchmark: hardened against naive consumer throughput, on the same broker
//! and the same message set, in one run.
//!
//! Each round fills a fresh queue with the same orders, then starts the
//! consumers and times them from the first receive to the last settle. The
//! variants alternate within every round so that a slow moment of the
//! machine hits both. The mean processing time per message comes from the
//! consumers' own `processing_seconds` histograms.
//!
//! `cargo run --release -p chaos-lab --bin consumer-throughput -- --messages 2000 [--backend sqs|kafka]`

use std::process::ExitCode;
use std::time::Duration;

use chaos_lab::plan::{ChaosPlan, FaultMix};
use chaos_lab::run::{execute, RunSpec};
use chaos_lab::{BackendKind, Role, RunReport};
use clap::Parser;
use consumer::metrics::Step;
use consumer::Variant;

#[derive(Debug, Parser)]
struct Args {
    /// Which broker carries the messages.
    #[arg(long, value_enum, default_value = "rabbitmq")]
    backend: BackendKind,
    /// Orders per variant and round.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Competing consumer processes.
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Deliveries each consumer takes per receive, for both variants; the
    /// hardened one handles them as one batch.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Latency the PSP adds to every charge, in milliseconds.
    #[arg(long, default_value_t = 0)]
    psp_latency_ms: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    if let Some(role) = Role::from_env() {
        return role.run().await;
    }
    match benchmark(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn benchmark(args: Args) -> anyhow::Result<()> {
    let plan = ChaosPlan::generate(args.seed, args.messages, FaultMix::NONE);
    let spec = |variant| {
        let mut spec = RunSpec::new(variant, plan.clone(), args.consumers);
        spec.scenario = "throughput".into();
        spec.prefill = true;
        spec.batch_size = args.batch_size;
        spec.psp_faults.latency = Duration::from_millis(args.psp_latency_ms);
        spec
    };
    eprintln!(
        "{}: {} messages, {} consumers, {} rounds, PSP latency {} ms, batches of {}",
        args.backend.name(),
        args.messages,
        args.consumers,
        args.rounds,
        args.psp_latency_ms,
        args.batch_size
    );
    println!("| round | naive msg/s | hardened msg/s | hardened / naive | naive ms/msg | hardened ms/msg |");
    println!("|--:|--:|--:|--:|--:|--:|");
    let mut ratios = Vec::new();
    let mut last = None;
    for round in 1..=args.rounds {
        let naive = measured(execute(&spec(Variant::Naive), args.backend).await?)?;
        let hardened = measured(execute(&spec(Variant::Hardened), args.backend).await?)?;
        let ratio = hardened.throughput_per_second / naive.throughput_per_second;
        ratios.push(ratio);
        println!(
            "| {round} | {:.0} | {:.0} | {ratio:.3} | {:.2} | {:.2} |",
            naive.throughput_per_second,
            hardened.throughput_per_second,
            mean_processing_ms(&naive),
            mean_processing_ms(&hardened),
        );
        last = Some((naive, hardened));
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "\nMedian hardened/naive throughput ratio: {:.3}",
        ratios[ratios.len() / 2]
    );
    if let Some((naive, hardened)) = last {
        println!("\nWhere each message's time went in the last round (ms per message, from the consumers' `step_seconds`; a batch's step counts once for all its messages):\n");
        let steps = Step::ALL.map(Step::name);
        println!("| consumer | {} | total |", steps.join(" | "));
        println!("|---|{}--:|", "--:|".repeat(steps.len()));
        for report in [&naive, &hardened] {
            let per_message = step_ms_per_message(report);
            let cells: Vec<String> = per_message.iter().map(|ms| format!("{ms:.3}")).collect();
            println!(
                "| {} | {} | {:.3} |",
                report.variant,
                cells.join(" | "),
                per_message.iter().sum::<f64>()
            );
        }
    }
    Ok(())
}

/// Σ step_seconds_sum per step over the consumers, in ms, divided by the
/// messages they handled (Σ processing_seconds_count).
fn step_ms_per_message(report: &RunReport) -> [f64; 6] {
    let mut sums = [0.0; 6];
    let mut messages = 0.0;
    for scrape in &report.consumer_metrics {
        for line in scrape.text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(value)) = (
                parts.next(),
                parts.next().and_then(|v| v.parse::<f64>().ok()),
            ) else {
                continue;
            };
            if name == "processing_seconds_count" {
                messages += value;
            }
            for (i, step) in Step::ALL.iter().enumerate() {
                if name == format!("step_seconds_sum{{step=\"{}\"}}", step.name()) {
                    sums[i] += value;
                }
            }
        }
    }
    if messages == 0.0 {
        return sums;
    }
    sums.map(|seconds| 1000.0 * seconds / messages)
}

fn measured(report: RunReport) -> anyhow::Result<RunReport> {
    anyhow::ensure!(report.drained, "{} did not drain", report.variant);
    anyhow::ensure!(
        report.double_charges == 0 && report.lost_events == 0,
        "{}: a fault-free run must charge every order once",
        report.variant
    );
    Ok(report)
}

/// Σ processing_seconds_sum / Σ processing_seconds_count over the consumers.
fn mean_processing_ms(report: &RunReport) -> f64 {
    let (mut sum, mut count) = (0.0, 0.0);
    for scrape in &report.consumer_metrics {
        for line in scrape.text.lines() {
            let mut parts = line.split_whitespace();
            match (
                parts.next(),
                parts.next().and_then(|v| v.parse::<f64>().ok()),
            ) {
                (Some("processing_seconds_sum"), Some(v)) => sum += v,
                (Some("processing_seconds_count"), Some(v)) => count += v,
                _ => {}
            }
        }
    }
    if count == 0.0 {
        0.0
    } else {
        1000.0 * sum / count
    }
}
