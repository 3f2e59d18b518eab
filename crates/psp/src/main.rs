//! `psp`: the payment service provider as a process of its own.
//!
//! Environment: `PSP_LISTEN` (default 127.0.0.1:4242), `PSP_DATABASE_URL`
//! (default: the `psp` database on the book's Postgres, created if missing),
//! and the `PSP_*` knobs read by `PspConfig::from_env`.

use anyhow::{Context, Result};
use psp::{PspConfig, PspServer};

const DEFAULT_LISTEN: &str = "127.0.0.1:4242";
const DEFAULT_DATABASE: &str = "psp";

#[tokio::main]
async fn main() -> Result<()> {
    telemetry::service::init_logging("info");

    let config = PspConfig::from_env().context("reading the PSP_* environment variables")?;
    let listen = std::env::var("PSP_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.to_owned());
    let database_url = match std::env::var("PSP_DATABASE_URL") {
        Ok(url) => url,
        // The `psp` database on the book's Postgres, created on first use.
        Err(_) => databases::ensure_database(DEFAULT_DATABASE)
            .await
            .context("creating the `psp` database")?,
    };
    let pool = databases::connect(&database_url, 16)
        .await
        .context("connecting to the PSP's database")?;
    let running = PspServer::start(pool, config, listen.as_str())
        .await
        .with_context(|| format!("starting the PSP on {listen}"))?;
    let faults = &running.config().faults;
    tracing::info!(
        "psp listening on {} (database {}, latency {} ms, error rate {}, lost-response rate {}, seed {})",
        running.base_url(),
        // Every credential hidden, the userinfo's and the query string's.
        databases::redact(&database_url),
        faults.latency.as_millis(),
        faults.error_rate,
        faults.lost_response_rate,
        faults.seed,
    );

    telemetry::service::shutdown_signal().await;
    running.shutdown().await.context("shutting the PSP down")?;
    tracing::info!("psp stopped");
    Ok(())
}
