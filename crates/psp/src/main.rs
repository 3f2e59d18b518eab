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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let config = PspConfig::from_env().context("reading the PSP_* environment variables")?;
    let listen = std::env::var("PSP_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.to_owned());
    let database_url = match std::env::var("PSP_DATABASE_URL") {
        Ok(url) => url,
        Err(_) => default_database().await?,
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

    shutdown_signal().await?;
    running.shutdown().await.context("shutting the PSP down")?;
    Ok(())
}

/// The `psp` database on the book's Postgres, created on first use.
async fn default_database() -> Result<String> {
    match databases::create_database(DEFAULT_DATABASE).await {
        Ok(()) => {}
        Err(databases::DatabaseError::Sql(sqlx::Error::Database(e)))
            // 42P04: it already exists. 23505: another `psp` created it just now.
            if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
        Err(e) => return Err(e).context("creating the `psp` database"),
    }
    databases::url_for(DEFAULT_DATABASE).context("building the `psp` database URL")
}

async fn shutdown_signal() -> Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted.context("waiting for Ctrl-C")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
