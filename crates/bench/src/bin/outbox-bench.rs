//! `outbox-bench`: what the relay costs, measured on the machine at hand
//! (the benchmarks themselves: [`bench::outbox`]).
//!
//! `cargo run --release -p bench --bin outbox-bench -- all --chart target/relay-latency.svg`

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "outbox-bench",
    about = "Benchmarks of the outbox relay: latency, idle queries, backlog drain, cleanup",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: bench::outbox::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = bench::outbox::count_relay_queries() {
        eprintln!("outbox-bench: {error:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("outbox-bench: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench::outbox::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("outbox-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}
