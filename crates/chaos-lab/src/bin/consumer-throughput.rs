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
        spec.psp_faults.latency = Duration::from_millis(args.psp_latency_ms);
        spec
    };
    eprintln!(
        "{}: {} messages, {} consumers, {} rounds, PSP latency {} ms",
        args.backend.name(),
        args.messages,
        args.consumers,
        args.rounds,
        args.psp_latency_ms
    );
    println!("| round | naive msg/s | hardened msg/s | hardened / naive | naive ms/msg | hardened ms/msg |");
    println!("|--:|--:|--:|--:|--:|--:|");
    let mut ratios = Vec::new();
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
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "\nMedian hardened/naive throughput ratio: {:.3}",
        ratios[ratios.len() / 2]
    );
    Ok(())
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
