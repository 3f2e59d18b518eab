//! `outbox-cleanup`: delete outbox rows sent longer ago than the window, in
//! short batches. Pending rows are never touched, however old.
//!
//! Run it from cron or a scheduler as often as you like: each run carries
//! on where the last stopped, and one that finds nothing to delete costs a
//! single statement.
//!
//! `outbox-cleanup --database-url postgres://… --window 7d --batch-size 5000`

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use databases::cleanup::{format_duration, parse_duration};
use relay::cleanup::{delete_sent, DEFAULT_BATCH_SIZE};

#[derive(Debug, Parser)]
#[command(
    name = "outbox-cleanup",
    about = "Delete outbox rows sent longer ago than the window; pending rows stay",
    version
)]
struct Cli {
    /// The shop database that holds the `outbox` table.
    #[arg(long, env = "EO_SHOP_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Rows sent longer ago than this are deleted (30s, 15m, 4h, 7d).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    window: Duration,
    /// Rows deleted per statement (each its own short transaction).
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    batch_size: i64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("outbox-cleanup: {error:#}");
            ExitCode::FAILURE
        }
    }
}

impl Cli {
    async fn run(self) -> anyhow::Result<()> {
        let pool = databases::connect(&self.database_url, 1)
            .await
            .context("connecting to the shop database")?;
        let report = delete_sent(&pool, self.window, self.batch_size).await;
        pool.close().await;
        let report = report.context("deleting sent outbox rows")?;
        println!("rows deleted: {}", report.rows_deleted);
        println!(
            "batches: {} (up to {} rows each)",
            report.batches, self.batch_size
        );
        println!(
            "time: {:.3} s ({:.0} rows/s)",
            report.elapsed.as_secs_f64(),
            report.rows_per_second()
        );
        println!(
            "cutoff: {} (sent more than {} ago)",
            report.cutoff.format("%Y-%m-%dT%H:%M:%SZ"),
            format_duration(self.window)
        );
        Ok(())
    }
}
