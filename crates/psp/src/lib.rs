//! The payment service provider (PSP): another company's system.
//!
//! The book's consumers charge orders through this HTTP server, and its ledger
//! of executed charges is the ground truth of every run: one ledger row is one
//! money movement, whatever the consumer believes it did.
//!
//! # Layout
//!
//! - `migrations/`, run by [`migrate`]: the ledger and the idempotency-key
//!   table, in the PSP's own database.
//! - [`api`]: the wire format (the request body, the charge object, the error
//!   body), shared by the server and the client so the two cannot drift apart.
//! - [`ledger`]: writes one row per executed charge; read functions for the
//!   audit.
//! - [`idempotency`]: `Idempotency-Key` as Stripe and the IETF draft define it:
//!   claim, replay, 409 while in flight, 422 on a reused key, expiry.
//! - [`faults`]: seeded, reproducible latency, errors and lost responses.
//! - [`server`]: the axum router, [`PspConfig`] and [`PspServer::start`].
//! - [`client`]: [`PspClient`], a typed client whose errors say what the caller
//!   may do next (retry, never retry, or "money may have moved").
//!
//! The binary (`src/main.rs`) only reads the environment and starts the server.

pub mod api;
pub mod client;
pub mod faults;
pub mod idempotency;
pub mod ledger;
pub mod server;

pub use api::{Charge, ChargeRequest};
pub use client::{ChargeError, PspClient};
pub use faults::FaultConfig;
pub use ledger::LedgerEntry;
pub use server::{ConfigError, PspConfig, PspError, PspServer, RunningPsp};

use sqlx::PgPool;

/// Brings the PSP's tables up to date (sqlx migrations, each applied once
/// per database); safe to run on every start, by several processes at once:
/// the migrator holds an advisory lock while it works.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations").run(pool).await
}
