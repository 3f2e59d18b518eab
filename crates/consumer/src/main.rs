//! `consumer`: the payment consumer as a service an operator runs.
//!
//! Every flag has an environment variable and a local default that matches
//! `scripts/services-up`; `--help` lists them. It creates what it needs
//! (the tables, the queue and its dead-letter queue), rides out broker and
//! database outages, and stops cleanly on SIGTERM or Ctrl-C.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use consumer::service::{Hooks, Settings};
use consumer::{Heartbeat, Variant};
use queue::backend::QueueArgs;

/// The payment consumer: receive a payment event, charge the PSP, record
/// the payment, ack. Hardened (INSERT-first dedup and an Idempotency-Key,
/// keyed on the order) unless `--variant` picks one of the broken versions
/// the book measures.
#[derive(Parser)]
#[command(name = "consumer", version)]
struct Args {
    /// Which handler runs. The naive ones are for teaching: they double-charge
    /// (naive) or lose payments (naive-ack-on-receipt).
    #[arg(
        long,
        env = "EO_CONSUMER_VARIANT",
        value_enum,
        default_value = "dedup-with-key"
    )]
    variant: Variant,
    /// The shop database (payments and the dedup table live there). Default:
    /// the `shop` database on the book's Postgres (`EO_PG_ADMIN_URL`),
    /// created if missing.
    #[arg(long, env = "EO_SHOP_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(flatten)]
    queue: QueueArgs,
    /// RabbitMQ: unacked messages this process may hold. All of them go
    /// back to the queue if it dies.
    #[arg(long, env = "EO_PREFETCH", default_value_t = 10)]
    prefetch: u16,
    /// Deliveries taken per receive, at most. Above 1, the hardened
    /// consumer claims, charges, records and acks them as one batch
    /// (chapter 2); a process starts at one per receive and doubles after
    /// each clean batch. SQS hands out at most 10 per receive.
    #[arg(long, env = "EO_CONSUMER_BATCH_SIZE", default_value_t = consumer::BATCH_SIZE)]
    batch_size: usize,
    /// The PSP's base URL.
    #[arg(long, env = "EO_PSP_URL", default_value = "http://127.0.0.1:4242")]
    psp_url: String,
    /// The PSP API key, sent as `Authorization: Bearer <key>`.
    #[arg(
        long,
        env = "EO_PSP_API_KEY",
        default_value = psp::server::DEFAULT_API_KEY,
        hide_default_value = true,
        hide_env_values = true
    )]
    psp_api_key: String,
    /// Milliseconds to wait for the PSP's answer before handing the message
    /// back (the retry carries the same Idempotency-Key).
    #[arg(long, env = "EO_PSP_TIMEOUT_MS", default_value_t = 5_000)]
    psp_timeout_ms: u64,
    /// SQS: do not extend a message's visibility while it is handled. Only
    /// to show chapter 5's failure; the heartbeat is what keeps a slow charge
    /// from being handed to a second consumer.
    #[arg(long)]
    no_heartbeat: bool,
    /// Where `GET /metrics` is served.
    #[arg(
        long,
        env = "EO_CONSUMER_METRICS_ADDR",
        default_value = "127.0.0.1:9464"
    )]
    metrics_addr: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::service::init_logging("info");
    let args = Args::parse();
    let queue = args.queue.spec();
    let settings = Settings {
        variant: args.variant,
        database: databases::Location::given_or(args.database_url, "shop"),
        heartbeat: (!args.no_heartbeat).then(|| Heartbeat::for_lease(queue.visibility_timeout())),
        queue,
        prefetch: args.prefetch,
        psp_base_url: args.psp_url,
        psp_api_key: args.psp_api_key,
        psp_timeout: Duration::from_millis(args.psp_timeout_ms),
        metrics_addr: args.metrics_addr,
        requeue_delay: Duration::from_millis(500),
        batch_size: args.batch_size,
    };
    consumer::service::run(
        settings,
        Hooks::default(),
        telemetry::service::shutdown_signal(),
    )
    .await
    .context("consumer")
}
