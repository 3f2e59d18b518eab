//! `outbox-bench`: what the relay costs, measured on the machine at hand.
//!
//! - `latency`: commit → broker confirm and commit → consumer receive, at a
//!   steady order rate, for the NOTIFY relay and for pollers at 100 ms and
//!   1 s; with `--chart PATH`, an SVG of the three distributions.
//! - `idle-queries`: SQL statements per second each relay sends while there
//!   is nothing to publish.
//! - `drain`: how fast one relay (and two) empty a backlog of pending rows.
//! - `cleanup`: the outbox cleanup job on a big outbox, while a relay runs
//!   and the shop keeps placing orders: its speed, and what it costs the
//!   relay's latency.
//! - `all`: everything above, with the defaults (under two minutes in
//!   release on two cores).
//!
//! Markdown tables go to stdout, for the book to embed as they are; progress
//! goes to stderr. A failed run is an error (the binary exits non-zero); a
//! missed goal is not (each goal line says PASS or MISS).
//!
//! Every run gets its own database and its own queue, both removed at the
//! end.
//!
//! The binary (`crates/bench/src/bin/outbox-bench.rs`) parses a [`Command`],
//! calls [`count_relay_queries`] once, then [`run`].

mod chart;
mod cleanup;
mod drain;
mod harness;
mod latency;
mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use databases::cleanup::{parse_duration, parse_share};

use chart::chart_if_asked;
use cleanup::measure_cleanup;
use drain::drains;
use harness::QueryCounter;
use latency::relay_modes;
use report::{print_cleanup, print_drains, print_latency, print_mode_goals, print_queries};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Commit → confirm and commit → receive latency of each relay mode
    /// under a steady order rate, and the queries each sends meanwhile.
    Latency(LatencyArgs),
    /// Queries per second each relay mode sends with nothing to publish.
    IdleQueries(IdleArgs),
    /// How fast relays drain a backlog of pending rows.
    Drain(DrainArgs),
    /// The outbox cleanup on a big outbox while a relay runs and orders
    /// keep coming.
    Cleanup(CleanupArgs),
    /// Everything, with the defaults.
    All(AllArgs),
}

#[derive(Debug, Clone, Args)]
pub struct LatencyArgs {
    /// Orders placed per second.
    #[arg(long, default_value_t = 500)]
    pub(crate) rate: u32,
    /// How long each relay mode is measured.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    /// Orders placed before the measurement starts (not counted).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub(crate) warmup: Duration,
    /// Write an SVG chart of the latency distributions here.
    #[arg(long)]
    pub(crate) chart: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// How long each relay mode sits idle while its queries are counted.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) duration: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    /// Pending outbox rows to drain.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) rows: u64,
    /// Rows per claim.
    #[arg(long, default_value_t = 500)]
    pub(crate) batch_size: i64,
    /// Relays draining at once; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub(crate) relays: Vec<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    /// Outbox rows loaded before the cleanup.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) rows: u64,
    /// Share of the loaded rows that were sent longer ago than the window.
    #[arg(long, default_value_t = 0.5, value_parser = parse_share)]
    pub(crate) old_share: f64,
    /// Loaded rows still pending (the newest ones).
    #[arg(long, default_value_t = 1_000)]
    pub(crate) pending: u64,
    /// Sent rows older than this are deleted (at least 1h here).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub(crate) window: Duration,
    /// Rows deleted per statement.
    #[arg(long, default_value_t = relay::cleanup::DEFAULT_BATCH_SIZE)]
    pub(crate) batch_size: i64,
    /// Orders placed per second throughout.
    #[arg(long, default_value_t = 200)]
    pub(crate) rate: u32,
    /// How long the relay runs under load before the cleanup starts.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) baseline: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct AllArgs {
    /// Write an SVG chart of the latency distributions here.
    #[arg(long)]
    pub(crate) chart: Option<PathBuf>,
}

impl Default for LatencyArgs {
    fn default() -> Self {
        Self {
            rate: 500,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            chart: None,
        }
    }
}

impl Default for IdleArgs {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(10),
        }
    }
}

impl Default for DrainArgs {
    fn default() -> Self {
        Self {
            rows: 100_000,
            batch_size: 500,
            relays: vec![1, 2],
        }
    }
}

impl Default for CleanupArgs {
    fn default() -> Self {
        Self {
            rows: 1_000_000,
            old_share: 0.5,
            pending: 1_000,
            window: relay::cleanup::DEFAULT_WINDOW,
            batch_size: relay::cleanup::DEFAULT_BATCH_SIZE,
            rate: 200,
            baseline: Duration::from_secs(5),
        }
    }
}

/// Installs the process's metrics recorder, which counts the relays' SQL
/// statements for the tables' query columns: without it every count reads
/// 0. Call it once, before [`run`]; it fails when the process already has a
/// recorder.
pub fn count_relay_queries() -> anyhow::Result<()> {
    metrics::set_global_recorder(QueryCounter)
        .map_err(|_| anyhow::anyhow!("a metrics recorder was already installed"))
}

/// Runs one command, printing its tables to stdout as each measurement ends.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Latency(args) => {
            let modes = relay_modes(None, Some(&args)).await?;
            print_latency(&args, &modes);
            print_queries(&modes);
            print_mode_goals(&modes);
            chart_if_asked(args.chart.as_deref(), &modes)
        }
        Command::IdleQueries(args) => {
            let modes = relay_modes(Some(&args), None).await?;
            print_queries(&modes);
            print_mode_goals(&modes);
            Ok(())
        }
        Command::Drain(args) => {
            let runs = drains(&args).await?;
            print_drains(&runs);
            Ok(())
        }
        Command::Cleanup(args) => {
            let measured = measure_cleanup(&args).await?;
            print_cleanup(&args, &measured);
            Ok(())
        }
        Command::All(all) => {
            let started = Instant::now();
            let latency = LatencyArgs {
                chart: all.chart,
                ..LatencyArgs::default()
            };
            let modes = relay_modes(Some(&IdleArgs::default()), Some(&latency)).await?;
            print_latency(&latency, &modes);
            print_queries(&modes);
            print_mode_goals(&modes);
            chart_if_asked(latency.chart.as_deref(), &modes)?;
            let runs = drains(&DrainArgs::default()).await?;
            print_drains(&runs);
            let cleanup = CleanupArgs::default();
            let measured = measure_cleanup(&cleanup).await?;
            print_cleanup(&cleanup, &measured);
            eprintln!("all done in {:.0} s", started.elapsed().as_secs_f64());
            Ok(())
        }
    }
}
