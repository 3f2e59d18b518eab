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
//! - [`service`]: the consumer as a process an operator runs (set-up,
//!   reconnects, graceful stop); the chaos lab's consumers run it too.
//!
//! # Leases (chapter 5)
//!
//! [`PaymentConsumer::handle`] wraps every variant in the same shell: a
//! settle that arrives after the broker's lease ran out is counted, not
//! fatal ([`QueueError::LeaseExpired`]: the newer delivery settles the
//! message, and the dedup row decides whether it charges); an optional
//! [`Heartbeat`] extends the lease while the handler works; and the last
//! receive the queue allows is dead-lettered with a reason instead of being
//! handled once more.
//!
//! The consumer never trusts its own view of what was charged: the PSP's
//! ledger is the ground truth, and the chaos lab audits against it.

use std::sync::Arc;
use std::time::Duration;

use payments::PaymentEvent;
use psp::client::PspClient;
use queue::{Delivery, LeaseKeeper, QueueError, Receiver};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

mod batch;
pub use batch::BatchWindow;
pub mod crash;
pub mod dedup;
pub mod hardened;
pub mod metrics;
pub mod naive;
pub mod observe;
pub mod retention;
pub mod service;

use crash::{CrashPoint, CrashSchedule};
use hardened::ChargeKey;
use metrics::Step;
use observe::{Observation, Observer, Outcome};

/// Deliveries the `consumer` binary and the book's batched hardened runs
/// (chapter 8, the appendix) take per receive at most, and the hardened
/// consumer handles as one batch: what waits in the queue goes through in
/// one transaction and one settle per ten (see [`batch`]). A process earns
/// its batch: it starts at one per receive ([`BatchWindow`]).
pub const BATCH_SIZE: usize = 10;

/// Which consumer runs. Each variant is a whole, separate handler. The
/// `--variant` values are the names the chapters' tables use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Ack after commit; no dedup, no Idempotency-Key. Duplicates.
    Naive,
    /// Ack as soon as the message arrives (at-most-once). Loses.
    #[value(name = "naive-ack-on-receipt")]
    AckOnReceipt,
    /// INSERT-first dedup in the payment transaction; no Idempotency-Key.
    #[value(name = "dedup-without-key")]
    DedupOnly,
    /// INSERT-first dedup and a stable Idempotency-Key, both keyed on the
    /// event id (message identity): chapter 3's first version. A producer
    /// that emits a second event for one order gets it charged twice.
    #[value(name = "dedup-with-event-key")]
    EventKeyed,
    /// INSERT-first dedup and a stable Idempotency-Key, both keyed on the
    /// order (business identity): one order, one payment.
    #[value(name = "dedup-with-key", alias = "hardened")]
    Hardened,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Naive => "naive",
            Variant::AckOnReceipt => "naive-ack-on-receipt",
            Variant::DedupOnly => "dedup-without-key",
            Variant::EventKeyed => "dedup-with-event-key",
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

/// Brings the consumer's tables (payments, the dedup table) up to date:
/// sqlx migrations, safe on every start and by many processes at once (the
/// migrator takes an advisory lock). They share the shop's database and its
/// `_sqlx_migrations` table; the shop crate's `migrate` says how the two keep apart.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await
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
    /// Extend the delivery's lease while it is handled (SQS visibility).
    pub heartbeat: Option<Heartbeat>,
    /// The queue's `maxReceiveCount`, where the broker counts receives: the
    /// last receive is dead-lettered with a reason instead of handled.
    pub max_receives: Option<u32>,
    /// Deliveries taken per receive. Above 1, the hardened variant handles
    /// them as one batch (see [`batch`]); the others handle them one by one.
    pub batch_size: usize,
}

/// The visibility heartbeat: every `every`, push the delivery's lease out
/// to `extend_to` from now, for as long as the handler works on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub every: Duration,
    pub extend_to: Duration,
}

impl Heartbeat {
    /// Beats three times per lease: two beats may be late or lost before
    /// the lease runs out.
    pub fn for_lease(lease: Duration) -> Self {
        Self {
            every: lease / 3,
            extend_to: lease,
        }
    }
}

impl PaymentConsumer {
    /// Receives and handles deliveries until `stop` resolves: up to
    /// [`Self::batch_size`] per receive, as one batch where the variant has
    /// a batched handler, else one at a time in arrival order.
    ///
    /// A redelivery is never part of a batch: it is handled on its own,
    /// before the batch. A message that kills whoever handles it would
    /// otherwise take its batch-mates down with it on every receive, and use
    /// up their `maxReceiveCount` too. For the same reason the receives
    /// start at one delivery and grow ([`BatchWindow`]).
    pub async fn run(
        &self,
        receiver: &mut dyn Receiver,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), ConsumerError> {
        self.run_from(BatchWindow::new(self.batch_size), receiver, stop)
            .await
    }

    /// [`Self::run`], with the receives starting at `window`'s size rather
    /// than at one: for a test of what a batch does, not of how a process
    /// earns one.
    pub async fn run_from(
        &self,
        mut window: BatchWindow,
        receiver: &mut dyn Receiver,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), ConsumerError> {
        tokio::pin!(stop);
        loop {
            let receiving = std::time::Instant::now();
            let batch = tokio::select! {
                _ = &mut stop => return Ok(()),
                batch = receiver.receive(window.size(), Duration::from_millis(500)) => batch?,
            };
            if batch.is_empty() {
                continue;
            }
            metrics::step_took(Step::Receive, receiving);
            let any_redelivered = batch.iter().any(|d| !is_first_delivery(d));
            // Redeliveries first and one at a time, in arrival order (on a
            // Kafka partition they come before anything new); then the rest.
            let (singly, together): (Vec<Delivery>, Vec<Delivery>) = if self.batches() {
                batch.into_iter().partition(|d| !is_first_delivery(d))
            } else {
                (batch, Vec::new())
            };
            for (i, delivery) in singly.iter().enumerate() {
                let result = self.handle(receiver, delivery.clone()).await;
                if let Err(ConsumerError::Database(error)) = result {
                    let in_hand: Vec<Delivery> =
                        singly[i..].iter().chain(&together).cloned().collect();
                    hand_back(receiver, &in_hand).await;
                    return Err(ConsumerError::Database(error));
                }
                result?;
            }
            let result = match together.as_slice() {
                [] => Ok(()),
                [one] => self.handle(receiver, one.clone()).await.map(drop),
                many => batch::handle_batch(self, receiver, many).await.map(drop),
            };
            if let Err(ConsumerError::Database(error)) = result {
                hand_back(receiver, &together).await;
                return Err(ConsumerError::Database(error));
            }
            result?;
            if any_redelivered {
                window.redelivered();
            } else {
                window.handled();
            }
        }
    }

    /// True when deliveries received together are handled as one batch.
    fn batches(&self) -> bool {
        self.batch_size > 1 && self.variant == Variant::Hardened
    }

    /// Handles one delivery with this consumer's variant.
    pub async fn handle(
        &self,
        receiver: &mut dyn Receiver,
        delivery: Delivery,
    ) -> Result<Outcome, ConsumerError> {
        let (arrived, decoded) = self.arrived(&delivery);
        let _heartbeat = self.start_heartbeat(&*receiver, &delivery, arrived.order_id);
        let mut settling = LateSettlements {
            inner: receiver,
            late: Vec::new(),
        };
        let outcome = self.dispatch(&mut settling, &delivery, decoded).await?;
        self.settled_late(&settling.late, arrived.order_id);
        self.finished(&arrived, &outcome);
        Ok(outcome)
    }

    /// Decodes a delivery, and counts and reports its arrival.
    fn arrived(
        &self,
        delivery: &Delivery,
    ) -> (Arrived, Result<PaymentEvent, payments::DecodeError>) {
        let decoded = PaymentEvent::decode(&delivery.payload);
        let order_id = decoded.as_ref().ok().map(|event| event.order_id);
        let redelivered = !is_first_delivery(delivery);
        self.metrics.received(redelivered);
        self.observer.observe(&Observation::Received {
            message_id: delivery.message_id.clone(),
            order_id,
            redelivered,
            position: delivery.receipt.position(),
        });
        let arrived = Arrived {
            started: std::time::Instant::now(),
            order_id,
        };
        (arrived, decoded)
    }

    /// Counts and reports settles that came after the lease ran out.
    fn settled_late(&self, late: &[&'static str], order_id: Option<uuid::Uuid>) {
        for operation in late {
            self.metrics.settled_late();
            self.observer.observe(&Observation::SettledLate {
                order_id,
                operation: (*operation).to_owned(),
            });
        }
    }

    /// Counts and reports how a delivery ended.
    fn finished(&self, arrived: &Arrived, outcome: &Outcome) {
        self.metrics.settled(outcome, arrived.started.elapsed());
        self.observer.observe(&Observation::Settled {
            order_id: arrived.order_id,
            outcome: outcome.clone(),
            elapsed_ms: arrived.started.elapsed().as_millis() as u64,
        });
    }

    /// The variant's handler, or the dead letter of a last receive.
    async fn dispatch(
        &self,
        receiver: &mut dyn Receiver,
        delivery: &Delivery,
        decoded: Result<PaymentEvent, payments::DecodeError>,
    ) -> Result<Outcome, ConsumerError> {
        let outcome = match self.variant {
            _ if self.last_receive(delivery) => {
                let reason = self.last_receive_reason(delivery);
                self.dead_letter(receiver, delivery, reason).await?
            }
            Variant::Naive => {
                naive::handle_ack_after_commit(self, receiver, delivery, decoded).await?
            }
            Variant::AckOnReceipt => {
                naive::handle_ack_on_receipt(self, receiver, delivery, decoded).await?
            }
            Variant::DedupOnly => {
                hardened::handle_insert_first(self, receiver, delivery, decoded, ChargeKey::None)
                    .await?
            }
            Variant::EventKeyed => {
                hardened::handle_insert_first(
                    self,
                    receiver,
                    delivery,
                    decoded,
                    ChargeKey::FromEvent,
                )
                .await?
            }
            Variant::Hardened => {
                hardened::handle_insert_first(
                    self,
                    receiver,
                    delivery,
                    decoded,
                    ChargeKey::FromOrder,
                )
                .await?
            }
        };
        Ok(outcome)
    }

    /// True on the receive that the broker's redrive policy would not allow
    /// again: a message that has come back this often keeps killing or
    /// stalling whoever handles it, and handling it once more only adds one
    /// more crash. Dead-lettering it here, rather than letting the policy
    /// move it on the next receive, puts a reason next to it.
    fn last_receive(&self, delivery: &Delivery) -> bool {
        matches!(
            (self.max_receives, delivery.delivery_count),
            (Some(limit), Some(count)) if count >= limit
        )
    }

    /// The dead letter's reason on the last receive the queue allows.
    fn last_receive_reason(&self, delivery: &Delivery) -> String {
        format!(
            "received {} times without being settled (the queue's maxReceiveCount is {}): \
             every earlier attempt died or gave up",
            delivery.delivery_count.unwrap_or_default(),
            self.max_receives.unwrap_or_default()
        )
    }

    /// Starts the visibility heartbeat for this delivery, if the consumer
    /// has one and the broker has leases. It stops when the guard drops.
    fn start_heartbeat(
        &self,
        receiver: &dyn Receiver,
        delivery: &Delivery,
        order_id: Option<uuid::Uuid>,
    ) -> Option<AbortOnDrop> {
        let heartbeat = self.heartbeat?;
        let keeper = receiver.lease_keeper()?;
        let delivery = delivery.clone();
        let observer = self.observer.clone();
        Some(AbortOnDrop(tokio::spawn(async move {
            beat(keeper, delivery, heartbeat, observer, order_id).await
        })))
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

    /// Moves a delivery to the dead-letter queue with `reason`. If the
    /// dead-letter queue refuses the copy (SQS: over the size limit even
    /// without attributes), the original is untouched: it is handed back,
    /// never dropped, and the consumer carries on; the broker's redrive
    /// policy moves it once it has been received too often.
    pub(crate) async fn dead_letter(
        &self,
        receiver: &mut dyn Receiver,
        delivery: &Delivery,
        reason: String,
    ) -> Result<Outcome, ConsumerError> {
        match receiver.dead_letter(delivery, &reason).await {
            Ok(()) => Ok(Outcome::DeadLettered { reason }),
            Err(QueueError::DeadLetterRefused { reason: refused }) => {
                tracing::error!(%reason, %refused, "the dead-letter queue refused the message; handed back");
                self.requeue_later(
                    receiver,
                    delivery,
                    format!("the dead-letter queue refused it ({refused}); it was: {reason}"),
                )
                .await
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Hands a delivery back after a pause, for failures that may pass.
    pub(crate) async fn requeue_later(
        &self,
        receiver: &mut dyn Receiver,
        delivery: &Delivery,
        reason: String,
    ) -> Result<Outcome, ConsumerError> {
        tokio::time::sleep(requeue_pause(self.requeue_delay, delivery)).await;
        receiver.requeue(delivery).await?;
        Ok(Outcome::Requeued { reason })
    }
}

/// The shop database went away mid-delivery: nothing of `deliveries` was
/// committed, or what was is a duplicate when it comes back, so hand them
/// back now rather than hold them until the connection closes or the lease
/// ends.
async fn hand_back(receiver: &mut dyn Receiver, deliveries: &[Delivery]) {
    for delivery in deliveries {
        if let Err(requeue) = receiver.requeue(delivery).await {
            tracing::warn!(%requeue, "could not hand the message back; the broker will");
        }
    }
}

async fn beat(
    keeper: Arc<dyn LeaseKeeper>,
    delivery: Delivery,
    heartbeat: Heartbeat,
    observer: Arc<dyn Observer>,
    order_id: Option<uuid::Uuid>,
) {
    loop {
        tokio::time::sleep(heartbeat.every).await;
        match keeper.extend(&delivery, heartbeat.extend_to).await {
            Ok(()) => {
                metrics::lease_extended();
                observer.observe(&Observation::LeaseExtended { order_id });
            }
            // Too late: someone else has the message now. Nothing to keep.
            Err(QueueError::LeaseExpired { .. }) => return,
            // A beat that failed may succeed next time; the lease still has
            // two beats' worth of time left.
            Err(error) => tracing::warn!(%error, "visibility heartbeat failed"),
        }
    }
}

/// When a delivery arrived, and for which order.
struct Arrived {
    started: std::time::Instant,
    order_id: Option<uuid::Uuid>,
}

/// Stops a spawned task when dropped, however the handler returned.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Settles through the real receiver, but treats a settle that came after
/// the lease ran out as done rather than as a failure of this consumer: the
/// broker has handed the message to someone else, whose delivery settles
/// it, and the dedup row makes sure that one does not charge again. Each
/// such late settle is recorded, because it means the lease was too short.
struct LateSettlements<'a> {
    inner: &'a mut dyn Receiver,
    late: Vec<&'static str>,
}

impl LateSettlements<'_> {
    fn tolerate(&mut self, result: Result<(), QueueError>) -> Result<(), QueueError> {
        match result {
            Err(QueueError::LeaseExpired { operation, reason }) => {
                tracing::warn!(operation, %reason, "settled after the lease ran out");
                self.late.push(operation);
                Ok(())
            }
            other => other,
        }
    }
}

#[async_trait::async_trait]
impl Receiver for LateSettlements<'_> {
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        self.inner.receive(max, wait).await
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), QueueError> {
        let result = self.inner.ack(delivery).await;
        self.tolerate(result)
    }

    async fn ack_batch(&mut self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        let result = self.inner.ack_batch(deliveries).await;
        self.tolerate(result)
    }

    async fn settled(&mut self) -> Result<(), QueueError> {
        self.inner.settled().await
    }

    async fn requeue(&mut self, delivery: &Delivery) -> Result<(), QueueError> {
        let result = self.inner.requeue(delivery).await;
        self.tolerate(result)
    }

    async fn dead_letter(&mut self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        let result = self.inner.dead_letter(delivery, reason).await;
        self.tolerate(result)
    }

    async fn extend_lease(&mut self, delivery: &Delivery, by: Duration) -> Result<(), QueueError> {
        self.inner.extend_lease(delivery, by).await
    }

    fn lease_keeper(&self) -> Option<Arc<dyn LeaseKeeper>> {
        self.inner.lease_keeper()
    }
}

/// The longest pause before a failed delivery goes back.
pub const MAX_REQUEUE_PAUSE: Duration = Duration::from_secs(10);

/// The pause before handing `delivery` back: `first`, doubled for each
/// earlier receive the broker counted (SQS), up to [`MAX_REQUEUE_PAUSE`].
/// With a fixed pause, a PSP that is down for ten seconds would use up a
/// queue's `maxReceiveCount` of 10 in two, and the redrive policy would
/// move a payment that only had to wait to the dead-letter queue.
pub fn requeue_pause(first: Duration, delivery: &Delivery) -> Duration {
    let earlier = delivery
        .delivery_count
        .unwrap_or(1)
        .saturating_sub(1)
        .min(16);
    (first * 2u32.pow(earlier)).min(MAX_REQUEUE_PAUSE)
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
    let recording = std::time::Instant::now();
    let mut tx = pool.begin().await?;
    insert_payment(&mut tx, event, charge_id).await?;
    metrics::step_took(Step::Record, recording);
    let committing = std::time::Instant::now();
    tx.commit().await?;
    metrics::step_took(Step::Commit, committing);
    Ok(())
}

/// Every payment row of a batch in one statement, on a transaction the
/// caller commits.
pub(crate) async fn insert_payments(
    tx: &mut sqlx::PgConnection,
    payments: &[(&PaymentEvent, &str)],
) -> Result<(), sqlx::Error> {
    if payments.is_empty() {
        return Ok(());
    }
    let order_ids: Vec<uuid::Uuid> = payments.iter().map(|(event, _)| event.order_id).collect();
    let event_ids: Vec<uuid::Uuid> = payments.iter().map(|(event, _)| event.event_id).collect();
    let charge_ids: Vec<&str> = payments.iter().map(|(_, charge)| *charge).collect();
    let amounts: Vec<i64> = payments
        .iter()
        .map(|(event, _)| event.amount_cents)
        .collect();
    let currencies: Vec<&str> = payments
        .iter()
        .map(|(event, _)| event.currency.as_str())
        .collect();
    sqlx::query(
        "INSERT INTO payments (order_id, event_id, psp_charge_id, amount_cents, currency) \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::text[])",
    )
    .bind(&order_ids)
    .bind(&event_ids)
    .bind(&charge_ids)
    .bind(&amounts)
    .bind(&currencies)
    .execute(&mut *tx)
    .await?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn received(delivery_count: Option<u32>) -> Delivery {
        Delivery {
            payload: Vec::new(),
            message_id: None,
            redelivered: delivery_count.is_some_and(|count| count > 1),
            delivery_count,
            receipt: queue::Receipt::DeliveryTag(1),
        }
    }

    #[test]
    fn the_requeue_pause_doubles_with_each_counted_receive_up_to_its_ceiling() {
        let first = Duration::from_millis(200);
        let pause = |count| requeue_pause(first, &received(count));
        assert_eq!(pause(None), first);
        assert_eq!(pause(Some(1)), first);
        assert_eq!(pause(Some(2)), first * 2);
        assert_eq!(pause(Some(6)), first * 32);
        assert_eq!(pause(Some(7)), MAX_REQUEUE_PAUSE);
        assert_eq!(pause(Some(u32::MAX)), MAX_REQUEUE_PAUSE);
        // Ten receives wait out more than a ten-second outage.
        let waited: Duration = (1..10).map(|count| pause(Some(count))).sum();
        assert!(waited > Duration::from_secs(30), "{waited:?}");
    }
}
