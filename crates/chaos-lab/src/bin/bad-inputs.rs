//! The book's table of bad inputs: each published by a plain client to its
//! own queue and handled by the hardened consumer, with what happened
//! measured (the settle, the dead-letter queue's copy, the PSP's ledger).
//! Exits non-zero when any row differs from what the book promises.
//!
//! `cargo run -p chaos-lab --bin bad-inputs -- --backend rabbitmq|sqs`

use std::process::ExitCode;

use chaos_lab::bad_input;
use chaos_lab::BackendKind;
use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// Which broker carries the messages (RabbitMQ or SQS).
    #[arg(long, value_enum, default_value = "rabbitmq")]
    backend: BackendKind,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let rows = match bad_input::run(args.backend).await {
        Ok(rows) => rows,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
    print!("{}", bad_input::markdown(args.backend, &rows));
    let deviations: Vec<String> = rows
        .iter()
        .flat_map(|row| {
            row.deviations
                .iter()
                .map(move |d| format!("{}: {d}", row.name))
        })
        .collect();
    if deviations.is_empty() {
        ExitCode::SUCCESS
    } else {
        for deviation in &deviations {
            eprintln!("not as promised: {deviation}");
        }
        ExitCode::FAILURE
    }
}
