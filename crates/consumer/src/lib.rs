//! The payment consumer: receive a payment event, charge the PSP, record the
//! payment, ack.
//!
//! # Layout
//!
//! - [`naive`]: THE BROKEN VERSIONS, kept runnable because chapter 1 measures
//!   them: ack after commit with no dedup and no Idempotency-Key (duplicates on
//!   every redelivery), and ack on receipt (at-most-once: losses on a crash).
//! - [`crash`]: the crash points and the real SIGKILL behind them.
//! - [`observe`]: the line protocol a consumer process uses to tell its
//!   supervisor what it received and how each delivery ended.
//!
//! The consumer never trusts its own view of what was charged: the PSP's
//! ledger is the ground truth, and the chaos lab audits against it.

use std::sync::Arc;
use std::time::Duration;

use payments::PaymentEvent;
use psp::client::PspClient;
use queue::{Delivery, QueueError, Receiver};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

pub mod crash;
pub mod dedup;
pub mod hardened;
pub mod metrics;
pub mod naive;
pub mod observe;
pub mod retention;

use crash::{CrashPoint, CrashSchedule};
use hardened::ChargeKey;
use observe::{Observation, Observer, Outcome};

/// Which consumer runs. Each variant is a whole, separate handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Ack after commit; no dedup, no Idempotency-Key. Duplicates.
    Naive,
    /// Ack as soon as the message arrives (at-most-once). Loses.
    AckOnReceipt,
    /// INSERT-first dedup in the payment transaction; no Idempotency-Key.
    DedupOnly,
    /// INSERT-first dedup and a stable Idempotency-Key on the charge.
    Hardened,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Naive => "naive",
            Variant::AckOnReceipt => "naive-ack-on-receipt",
            Variant::DedupOnly => "dedup-without-key",
            Variant::Hardened => "dedup-with-key",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    #[error("shop database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the PSP refused our API key (401): check the consumer's PSP API key setting")]
    PspRefusedCredentials,
}

pub async fn apply_schema(pool: &PgPool) -> Result<(), ConsumerError> {
    sqlx::raw_sql(include_str!("schema.sql"))
        .execute(pool)
        .await?;
    Ok(())
}

/// Everything a consumer needs, shared by every variant.
pub struct PaymentConsumer {
    pub variant: Variant,
    pub pool: PgPool,
    pub psp: PspClient,
    pub crashes: Arc<dyn CrashSchedule>,
    pub observer: Arc<dyn Observer>,
    /// How long to wait before handing a failed delivery back, so that a
    /// PSP outage does not turn into a hot redelivery loop.
    pub requeue_delay: Duration,
    pub metrics: metrics::DeliveryMetrics,
}

impl PaymentConsumer {
    /// Receives and handles deliveries until `stop` resolves. Deliveries are
    /// handled one at a time, in arrival order.
    pub async fn run(
        &self,
        receiver: &mut dyn Receiver,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), ConsumerError> {
        tokio::pin!(stop);
        loop {
            let batch = tokio::select! {
                _ = &mut stop => return Ok(()),
                batch = receiver.receive(1, Duration::from_millis(500)) => batch?,
            };
            for delivery in batch {
                self.handle(receiver, delivery).await?;
            }
        }
    }

    /// Handles one delivery with this consumer's variant.
    pub async fn handle(
        &self,
        receiver: &mut dyn Receiver,
        delivery: Delivery,
    ) -> Result<Outcome, ConsumerError> {
        let started = std::time::Instant::now();
        let decoded = PaymentEvent::decode(&delivery.payload);
        let order_id = decoded.as_ref().ok().map(|event| event.order_id);
        let redelivered = !is_first_delivery(&delivery);
        self.metrics.received(redelivered);
        self.observer.observe(&Observation::Received {
            message_id: delivery.message_id.clone(),
            order_id,
            redelivered,
        });
        let outcome = match self.variant {
            Variant::Naive => {
                naive::handle_ack_after_commit(self, receiver, &delivery, decoded).await?
            }
            Variant::AckOnReceipt => {
                naive::handle_ack_on_receipt(self, receiver, &delivery, decoded).await?
            }
            Variant::DedupOnly => {
                hardened::handle_insert_first(self, receiver, &delivery, decoded, ChargeKey::None)
                    .await?
            }
            Variant::Hardened => {
                hardened::handle_insert_first(
                    self,
                    receiver,
                    &delivery,
                    decoded,
                    ChargeKey::FromEvent,
                )
                .await?
            }
        };
        self.metrics.settled(&outcome, started.elapsed());
        self.observer.observe(&Observation::Settled {
            order_id,
            outcome: outcome.clone(),
        });
        Ok(outcome)
    }

    /// SIGKILLs this process if the chaos schedule says so.
    pub(crate) fn crash_point(&self, point: CrashPoint, event: &PaymentEvent) {
        if self.crashes.should_crash(point, event.order_id) {
            self.observer.observe(&Observation::Crashing {
                order_id: event.order_id,
                point,
            });
            crash::kill_this_process();
        }
    }

    /// Hands a delivery back after a pause, for failures that may pass.
    pub(crate) async fn requeue_later(
        &self,
        receiver: &mut dyn Receiver,
        delivery: &Delivery,
        reason: String,
    ) -> Result<Outcome, ConsumerError> {
        tokio::time::sleep(self.requeue_delay).await;
        receiver.requeue(delivery).await?;
        Ok(Outcome::Requeued { reason })
    }
}

/// True on the first hand-out of a message. Brokers that count deliveries
/// (SQS) say so exactly; RabbitMQ's classic queues only flag a redelivery.
pub fn is_first_delivery(delivery: &Delivery) -> bool {
    !delivery.redelivered && delivery.delivery_count.is_none_or(|count| count <= 1)
}

/// Records what the consumer believes it charged, in one transaction.
pub(crate) async fn record_payment(
    pool: &PgPool,
    event: &PaymentEvent,
    charge_id: &str,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    insert_payment(&mut tx, event, charge_id).await?;
    tx.commit().await
}

/// The payment row, on a transaction the caller commits.
pub(crate) async fn insert_payment(
    tx: &mut sqlx::PgConnection,
    event: &PaymentEvent,
    charge_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payments (order_id, event_id, psp_charge_id, amount_cents, currency) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(event.order_id)
    .bind(event.event_id)
    .bind(charge_id)
    .bind(event.amount_cents)
    .bind(&event.currency)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
