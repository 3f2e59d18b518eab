//! The NAIVE payment consumer: chapter 1 of "Effectively Once", in Rust.
//!
//! Receive one message, decode it, charge the PSP (no Idempotency-Key),
//! insert a row into `payments`, then settle (RabbitMQ ack, SQS delete,
//! Kafka commit). It has no dedup, so the grader will catch it
//! double-charging: a process killed after the charge and before the settle
//! leaves the message to be delivered again, and the retry charges again.
//! Copy it and fix it: chapter 2 (INSERT-first dedup), chapter 3
//! (Idempotency-Key), and for SQS chapter 5 (the visibility heartbeat).
//!
//! Everything else is honest: a body that is not a payment event, or a
//! charge the PSP refuses (4xx), goes to the dead-letter queue with its
//! reason; a PSP timeout, connection error or 5xx hands the message back.
//! SIGTERM finishes the message in hand and exits 0. One log line per
//! message, on stderr. The environment is in book/consumer-contract.md.

/// One line on stderr: time, process, level, message.
macro_rules! log {
    ($level:literal, $($message:tt)+) => {
        eprintln!(
            "{} naive[{}] {} {}",
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            std::process::id(),
            $level,
            format_args!($($message)+)
        )
    };
}

mod brokers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

use brokers::{Broker, Kafka, Rabbit, Sqs};

/// The wire format (book/payment-event.md): exactly these five fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PaymentEvent {
    event_id: Uuid,
    order_id: Uuid,
    amount_cents: i64,
    currency: String,
    #[allow(dead_code)] // checked by decoding, not used after
    created_at: DateTime<Utc>,
}

/// Why a message was not charged, and so what the broker is told.
enum Failure {
    /// Can never succeed: dead-letter it with this reason.
    Refused(String),
    /// May succeed later: hand it back.
    TryLater(String),
    /// No message can succeed (a wrong API key): hand it back and stop.
    Fatal(String),
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

struct Consumer {
    db: PgPool,
    http: reqwest::Client,
    psp_url: String,
    api_key: String,
}

impl Consumer {
    /// What happened, for the log.
    async fn process(&self, body: &[u8]) -> Result<String, Failure> {
        let event = decode(body).map_err(Failure::Refused)?;
        let charge_id = self.charge(&event).await?;
        sqlx::query(
            "INSERT INTO payments (event_id, order_id, psp_charge_id, amount_cents, currency) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(event.event_id)
        .bind(event.order_id)
        .bind(&charge_id)
        .bind(event.amount_cents)
        .bind(&event.currency)
        .execute(&self.db)
        .await
        // Handed back, the message will be charged again.
        .map_err(|e| Failure::TryLater(format!("charged {charge_id} but not recorded: {e}")))?;
        Ok(format!("charged {charge_id} for order {}", event.order_id))
    }

    /// POST /v1/charges with NO Idempotency-Key: every call moves money.
    async fn charge(&self, event: &PaymentEvent) -> Result<String, Failure> {
        let answer = self
            .http
            .post(format!("{}/v1/charges", self.psp_url))
            .bearer_auth(&self.api_key)
            .json(&serde_json::json!({
                "order_id": event.order_id.to_string(),
                "amount_cents": event.amount_cents,
                "currency": event.currency,
            }))
            .send()
            .await;
        // A timeout or a broken connection: money may have moved.
        let no_answer = |e: reqwest::Error| {
            let why = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "could not connect"
            } else {
                "connection failed"
            };
            Failure::TryLater(format!("no answer from the PSP ({why}): {e}"))
        };
        let response = answer.map_err(no_answer)?;
        let status = response.status();
        let text = response.text().await.map_err(no_answer)?;
        let said = format!(
            "{} {}",
            status.as_u16(),
            text.chars().take(300).collect::<String>()
        );
        match status.as_u16() {
            200..=299 => serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|charge| charge["id"].as_str().map(str::to_owned))
                .ok_or_else(|| Failure::TryLater(format!("the PSP answered {said}"))),
            401 | 403 => Err(Failure::Fatal(format!(
                "the PSP refused our API key: {said}"
            ))),
            409 | 429 => Err(Failure::TryLater(format!("the PSP answered {said}"))),
            400..=499 => Err(Failure::Refused(format!(
                "the PSP refused the charge: {said}"
            ))),
            _ => Err(Failure::TryLater(format!("the PSP answered {said}"))),
        }
    }
}

/// The payment event, or the reason it is none.
fn decode(body: &[u8]) -> Result<PaymentEvent, String> {
    let event: PaymentEvent = serde_json::from_slice(body)
        .map_err(|e| format!("undecodable payment event: not a payment event: {e}"))?;
    if !(1..=100_000_000).contains(&event.amount_cents) {
        return Err(format!(
            "undecodable payment event: amount_cents must be 1 to 100000000, got {}",
            event.amount_cents
        ));
    }
    let currency = &event.currency;
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "undecodable payment event: currency must be three upper-case letters, got {currency:?}"
        ));
    }
    Ok(event)
}

async fn open_database(url: &str) -> anyhow::Result<PgPool> {
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .context("connecting to EO_SHOP_DATABASE_URL")?;
    // Several processes start at once on a fresh database: one creates.
    let mut tx = db.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(4242)")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS payments (
            payment_id bigserial PRIMARY KEY, event_id uuid NOT NULL,
            order_id uuid NOT NULL, psp_charge_id text NOT NULL,
            amount_cents bigint NOT NULL, currency text NOT NULL,
            recorded_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(db)
}

/// One message at a time until SIGTERM.
async fn run<B: Broker>(
    mut broker: B,
    consumer: Consumer,
    stopping: &AtomicBool,
) -> anyhow::Result<()> {
    while !stopping.load(Ordering::SeqCst) {
        let Some(received) = broker.receive().await? else {
            continue;
        };
        let id = received.message_id.as_deref().unwrap_or("-");
        match consumer.process(&received.body).await {
            Ok(outcome) => match broker.ack(&received).await {
                Ok(()) => log!("INFO", "{id}: {outcome}; settled"),
                // A Kafka commit after a rebalance, an SQS receipt too old.
                Err(e) => log!(
                    "ERROR",
                    "{id}: {outcome}; NOT settled, it will come again: {e:#}"
                ),
            },
            Err(Failure::Refused(reason)) => match broker.dead_letter(&received, &reason).await {
                Ok(()) => log!("WARN", "{id}: dead-lettered: {reason}"),
                Err(e) => {
                    // Never dropped: hand it back instead.
                    broker.hand_back(&received).await?;
                    log!(
                        "ERROR",
                        "{id}: handed back, the dead-letter queue failed ({e:#}): {reason}"
                    );
                }
            },
            Err(Failure::TryLater(reason)) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                broker.hand_back(&received).await?;
                log!("WARN", "{id}: handed back: {reason}");
            }
            Err(Failure::Fatal(reason)) => {
                broker.hand_back(&received).await?;
                bail!("{id}: handed back, and stopping: {reason}");
            }
        }
    }
    broker.close().await;
    log!("INFO", "stopped on SIGTERM, between two messages");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stopping = Arc::new(AtomicBool::new(false));
    let flag = stopping.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        flag.store(true, Ordering::SeqCst);
    });

    let queue = std::env::var("EO_QUEUE").context("EO_QUEUE is not set")?;
    let backend = env("EO_BACKEND", "rabbitmq");
    let timeout = env("EO_PSP_TIMEOUT_MS", "5000")
        .parse()
        .context("EO_PSP_TIMEOUT_MS")?;
    let database_url =
        std::env::var("EO_SHOP_DATABASE_URL").context("EO_SHOP_DATABASE_URL is not set")?;
    let consumer = Consumer {
        db: open_database(&database_url).await?,
        http: reqwest::Client::builder()
            .timeout(Duration::from_millis(timeout))
            .build()?,
        psp_url: env("EO_PSP_URL", "http://127.0.0.1:4242"),
        api_key: env("EO_PSP_API_KEY", "sk_test_effectively_once"),
    };
    log!("INFO", "consuming {queue} on {backend}");
    match backend.as_str() {
        "rabbitmq" => run(Rabbit::connect(&queue).await?, consumer, &stopping).await,
        "sqs" => run(Sqs::connect(&queue).await?, consumer, &stopping).await,
        "kafka" => run(Kafka::connect(&queue)?, consumer, &stopping).await,
        other => bail!("EO_BACKEND must be rabbitmq, sqs or kafka, not {other:?}"),
    }
}
