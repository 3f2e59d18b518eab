//! `consumer-throughput`: the naive and the hardened consumer on the same
//! orders and broker, as real processes (the measurements themselves:
//! [`bench::throughput`]).
//!
//! - with no subcommand: one setting, a few rounds, and where each
//!   message's time went;
//! - `sweep`: every broker, batch sizes 1, 10 and 50, a PSP answering in
//!   0 and in 20 ms, against pgbench's rate of the same transactions, with
//!   the goals and (`--chart PATH`) an SVG.
//!
//! `cargo run --release -p bench --bin consumer-throughput -- --messages 2000 [--backend sqs|kafka] [--batch-size 10]`
//! `cargo run --release -p bench --bin consumer-throughput -- sweep --chart target/consumer-throughput.svg`

use std::process::ExitCode;
use std::time::Duration;

use bench::throughput::{compare, sweep, Setting, SweepArgs, Workload};
use chaos_lab::{BackendKind, Role};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "consumer-throughput",
    about = "Naive against hardened consumer throughput, as real processes on a real broker",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    one: OneSetting,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every broker, batch size and PSP latency, against pgbench's rate of
    /// the same transactions.
    Sweep(SweepArgs),
}

#[derive(Debug, clap::Args)]
struct OneSetting {
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
    // The lab starts its consumers as this same executable.
    if let Some(role) = Role::from_env() {
        return role.run().await;
    }
    let cli = Cli::parse();
    let measured = match cli.command {
        Some(Command::Sweep(args)) => sweep(args).await,
        None => {
            let one = cli.one;
            let setting = Setting {
                backend: one.backend,
                batch_size: one.batch_size,
                psp_latency: Duration::from_millis(one.psp_latency_ms),
            };
            let workload = Workload {
                messages: one.messages,
                consumers: one.consumers,
                seed: one.seed,
            };
            compare(setting, workload, one.rounds).await
        }
    };
    match measured {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}
