//! The fault matrix: the hardened pipeline against a broker or Postgres
//! restart, an unreachable or slow PSP, competing consumers with a short
//! lease, and the shop killed inside its transaction, on every broker.
//!
//! `cargo run -p chaos-lab --bin reliability -- [--backend B | --every-backend]
//!  [--seeds N] [--seed S] [--messages M] [--hold-secs H] [--only FAULT]`
//!
//! It restarts the shared broker and Postgres (scripts/outage): run it
//! alone, never beside the tests or a chapter.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chaos_lab::chapter::EVERY_BACKEND;
use chaos_lab::reliability::{self, Fault, MatrixRow, MatrixSettings, MATRIX_HEADER};
use chaos_lab::{Chapter, ChapterReport, Lab};

static MATRIX: Chapter = Chapter {
    id: "reliability",
    title: "faults the pipeline rides out",
    default_messages: 60,
    backends: EVERY_BACKEND,
};

#[derive(Debug, Clone, clap::Args)]
struct MatrixArgs {
    /// Run on RabbitMQ, SQS and Kafka in turn.
    #[arg(long)]
    every_backend: bool,
    /// Seeds per fault and broker: --seed, --seed + 1, ...
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// How long an outage keeps its service away, in seconds.
    #[arg(long, default_value_t = 10)]
    hold_secs: u64,
    /// Only this fault (broker-restart, postgres-restart, psp-unreachable,
    /// psp-slow, short-lease, producer-mid-transaction).
    #[arg(long)]
    only: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    chaos_lab::chapter::main_with_args(&MATRIX, matrix).await
}

async fn matrix(lab: Lab, args: MatrixArgs) -> anyhow::Result<ChapterReport> {
    let faults = match &args.only {
        Some(id) => vec![Fault::from_id(id).with_context(|| format!("no fault named {id}"))?],
        None => Fault::ALL.to_vec(),
    };
    let backends = if args.every_backend {
        EVERY_BACKEND.to_vec()
    } else {
        vec![lab.backend]
    };
    let settings = MatrixSettings {
        messages: lab.messages,
        hold: Duration::from_secs(args.hold_secs),
    };
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for &backend in &backends {
        let lab = lab.on(backend);
        for &fault in &faults {
            if let Some(reason) = fault.not_on(backend) {
                skipped.push(format!(
                    "{} on {}: not run. {reason}.",
                    fault.id(),
                    backend.name()
                ));
                continue;
            }
            for seed in lab.seed..lab.seed + args.seeds {
                let spec = reliability::spec(fault, backend, seed, &settings);
                eprintln!("{} on {}, seed {seed}", fault.id(), backend.name());
                let run = lab.run(spec).await.with_context(|| {
                    format!("{} on {}, seed {seed}", fault.id(), backend.name())
                })?;
                runs.push((fault, run));
            }
        }
    }
    let rows: Vec<Vec<String>> = backends
        .iter()
        .flat_map(|&backend| faults.iter().map(move |&fault| (fault, backend)))
        .map(|(fault, backend)| MatrixRow {
            backend,
            runs: runs
                .iter()
                .filter(|(f, run)| *f == fault && run.backend == backend.name())
                .map(|(_, run)| run)
                .collect(),
        })
        .filter(|row| !row.runs.is_empty())
        .map(|row| row.cells())
        .collect();
    let runs: Vec<_> = runs.into_iter().map(|(_, run)| run).collect();
    let claims = reliability::claims(&runs);
    let mut report = lab.report(Vec::new(), claims).with_table(
        "Hardened pipeline, each fault alone; counted from the PSP's ledger and the shop's orders",
        &MATRIX_HEADER,
        rows,
    );
    if !skipped.is_empty() {
        report = report.with_section("Where a fault does not apply", skipped);
    }
    report.messages = lab.messages;
    report
        .measurements
        .insert("runs".to_owned(), serde_json::to_value(&runs)?);
    Ok(report)
}
