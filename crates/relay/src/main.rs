//! `relay`: the outbox relay as a service an operator runs.
//!
//! Every flag has an environment variable and a local default that matches
//! `scripts/services-up`; `--help` lists them. It creates the outbox table
//! and the queue if they are missing, rides out broker and database
//! outages, and stops cleanly on SIGTERM or Ctrl-C. Run several: they share
//! the outbox through `FOR UPDATE SKIP LOCKED` claims.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use queue::backend::QueueArgs;
use relay::service::{Hooks, Settings};
use relay::{RelayConfig, Wake};

/// Publishes the shop's pending outbox rows to the broker, with publisher
/// confirms, and marks each row sent only after the broker confirmed it.
#[derive(Parser)]
#[command(name = "relay", version)]
struct Args {
    /// The shop database, where the outbox is. Default: the `shop` database
    /// on the book's Postgres (`EO_PG_ADMIN_URL`), created if missing.
    #[arg(long, env = "EO_SHOP_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(flatten)]
    queue: QueueArgs,
    /// How the relay learns there is work: `notify` (LISTEN, woken by each
    /// commit, with a fallback poll) or `poll` (look every interval).
    #[arg(long, env = "EO_RELAY_WAKE", value_enum, default_value = "notify")]
    wake: WakeArg,
    /// Milliseconds between looks: the poll interval with `--wake poll`, the
    /// fallback poll with `--wake notify`.
    #[arg(long, env = "EO_RELAY_POLL_MS")]
    poll_ms: Option<u64>,
    /// Rows claimed and published per round.
    #[arg(long, env = "EO_RELAY_BATCH_SIZE", default_value_t = 500)]
    batch_size: i64,
    /// Milliseconds a claim keeps other relays off its rows: longer than a
    /// round takes, or two relays publish the same rows.
    #[arg(long, env = "EO_RELAY_LEASE_MS", default_value_t = 5_000)]
    lease_ms: u64,
    /// Where `GET /metrics` is served.
    #[arg(long, env = "EO_RELAY_METRICS_ADDR", default_value = "127.0.0.1:9465")]
    metrics_addr: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum WakeArg {
    Notify,
    Poll,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::service::init_logging("info");
    let args = Args::parse();
    let wake = match args.wake {
        WakeArg::Notify => Wake::Notify {
            fallback_poll: Duration::from_millis(args.poll_ms.unwrap_or(5_000)),
        },
        WakeArg::Poll => Wake::Poll {
            interval: Duration::from_millis(args.poll_ms.unwrap_or(100)),
        },
    };
    let settings = Settings {
        database: databases::Location::given_or(args.database_url, "shop"),
        queue: args.queue.spec(),
        relay: RelayConfig {
            batch_size: args.batch_size,
            lease: Duration::from_millis(args.lease_ms),
            wake,
            ..RelayConfig::default()
        },
        metrics_addr: args.metrics_addr,
    };
    relay::service::run(
        settings,
        Hooks::default(),
        telemetry::service::shutdown_signal(),
    )
    .await
    .context("relay")
}
