//! The soak: the hardened pipeline at a steady rate for minutes on each
//! broker, a consumer SIGKILLed from outside every so often, and the lab
//! watching memory, descriptors, Postgres connections and the dedup table.
//!
//! `cargo run -p chaos-lab --bin soak -- [--backend B | --every-backend]
//!  [--minutes M] [--orders-per-second R] [--kill-every-secs K]
//!  [--sample-every-secs S] [--retention-secs W]`
//!
//! A benchmark for the book, not a test: ten minutes per broker by default.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chaos_lab::chapter::EVERY_BACKEND;
use chaos_lab::soak::{self, SoakProbe, SoakSettings};
use chaos_lab::{Chapter, ChapterReport, Lab};

static SOAK: Chapter = Chapter {
    id: "soak",
    title: "the pipeline for minutes on end",
    default_messages: 0,
    backends: EVERY_BACKEND,
};

#[derive(Debug, Clone, clap::Args)]
struct SoakArgs {
    /// Run on RabbitMQ, SQS and Kafka at the same time.
    #[arg(long)]
    every_backend: bool,
    /// How long the shop places orders, per broker.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// The shop's steady rate.
    #[arg(long, default_value_t = 20)]
    orders_per_second: u32,
    /// SIGKILL one consumer this often (never the survivor).
    #[arg(long, default_value_t = 60)]
    kill_every_secs: u64,
    /// Sample the processes and the database, and run the retention job,
    /// this often.
    #[arg(long, default_value_t = 30)]
    sample_every_secs: u64,
    /// The retention job's window: short, so that the dedup table reaches
    /// its steady size within the run.
    #[arg(long, default_value_t = 120)]
    retention_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    chaos_lab::chapter::main_with_args(&SOAK, run_soak).await
}

async fn run_soak(lab: Lab, args: SoakArgs) -> anyhow::Result<ChapterReport> {
    anyhow::ensure!(
        args.kill_every_secs > 0 && args.sample_every_secs > 0 && args.retention_secs > 0,
        "--kill-every-secs, --sample-every-secs and --retention-secs take at least 1"
    );
    let backends = if args.every_backend {
        EVERY_BACKEND.to_vec()
    } else {
        vec![lab.backend]
    };
    let settings = SoakSettings {
        duration: Duration::from_secs(args.minutes * 60),
        orders_per_second: args.orders_per_second,
        probe: SoakProbe {
            kill_every: Duration::from_secs(args.kill_every_secs),
            sample_every: Duration::from_secs(args.sample_every_secs),
            retention: Duration::from_secs(args.retention_secs),
            consumers: soak::CONSUMERS,
        },
    };
    // The brokers soak side by side: a leak shows in minutes whether or not
    // the machine is shared, and the book's command takes ten minutes, not
    // thirty.
    let runs = futures::future::try_join_all(backends.iter().map(|&backend| {
        eprintln!(
            "soak on {}: {} min at {} orders/s",
            backend.name(),
            args.minutes,
            args.orders_per_second
        );
        let lab = lab.on(backend);
        let spec = soak::spec(backend, lab.seed, &settings);
        async move {
            lab.run(spec)
                .await
                .with_context(|| format!("the soak on {}", backend.name()))
        }
    }))
    .await?;
    let rate = f64::from(args.orders_per_second);
    let claims = soak::claims(&runs, rate);
    let rows = runs.iter().map(soak::cells).collect();
    let dedup_rows = runs
        .iter()
        .map(|run| soak::dedup_cells(run, rate))
        .collect();
    let mut report = lab
        .report(Vec::new(), claims)
        .with_table(
            "Hardened pipeline at a steady rate, a consumer SIGKILLed from outside on the lab's clock; \
             warm is the first sample after one minute",
            &soak::HEADER,
            rows,
        )
        .with_table(
            "The dedup table against its retention job",
            &soak::DEDUP_HEADER,
            dedup_rows,
        );
    report.messages = runs.iter().map(|r| r.messages).sum();
    report
        .measurements
        .insert("runs".to_owned(), serde_json::to_value(&runs)?);
    Ok(report)
}
