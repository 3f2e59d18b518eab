//! THE FIX for Leg 3, in two steps that chapters 2 and 3 measure apart.
//!
//! [`handle_insert_first`] opens a transaction, inserts the event id first
//! (see [`crate::dedup`]), charges, records the payment, commits, and only
//! then acks. With [`ChargeKey::None`] it is chapter 2's consumer: a crash
//! after the commit is now harmless (the redelivery is a duplicate), but a
//! crash after the charge and before the commit still rolls the dedup row
//! back, and the redelivery charges again. With [`ChargeKey::FromEvent`] it
//! is chapter 3's first consumer: the PSP sees the same Idempotency-Key on
//! the retry and replays the first charge instead of moving money twice.
//! With [`ChargeKey::FromOrder`] it is the hardened consumer: the dedup row
//! and the key are both the order's, so a second event for one order (a
//! producer that retries with a fresh event id) is not a second payment.
//!
//! Every dedup hit compares the fingerprint of what was charged with what
//! this delivery asks for. A mismatch is a producer bug: it is dead-lettered
//! with its reason and counted (`dedup_fingerprint_mismatches_total`), never
//! acked as an ordinary duplicate.
//!
//! The transaction stays open across the PSP call. That holds one pooled
//! connection and one row lock per in-flight message for the PSP's latency;
//! in exchange, a concurrent duplicate waits on the row lock instead of
//! racing to the PSP. Chapter 2 discusses the price and the alternative.

use payments::{DecodeError, PaymentEvent};
use queue::{Delivery, Receiver};

use std::time::Instant;

use crate::crash::CrashPoint;
use crate::dedup::{self, FirstSeen, Identity};
use crate::metrics::{step_took, Step};
use crate::naive::{charge_request, dead_letter, settle_failed_charge};
use crate::observe::Outcome;
use crate::{ConsumerError, PaymentConsumer};

/// Whether the charge carries an Idempotency-Key, and which identity the
/// dedup row and the key stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeKey {
    /// Chapter 2: dedup by event id only. Every PSP call may move money.
    None,
    /// Chapter 3, first version: dedup and key by the event id (message
    /// identity). Two events for one order are two payments.
    FromEvent,
    /// The hardened consumer: dedup and key by the order (business
    /// identity). One order, one payment, whatever its events' ids.
    FromOrder,
}

impl ChargeKey {
    /// What counts as "already done" for this consumer.
    pub fn identity(self) -> Identity {
        match self {
            ChargeKey::None | ChargeKey::FromEvent => Identity::Event,
            ChargeKey::FromOrder => Identity::Order,
        }
    }
}

// ANCHOR: insert_first_consumer
/// BEGIN → INSERT event id → charge → record → COMMIT → ack.
pub async fn handle_insert_first(
    consumer: &PaymentConsumer,
    receiver: &mut dyn Receiver,
    delivery: &Delivery,
    decoded: Result<PaymentEvent, DecodeError>,
    key: ChargeKey,
) -> Result<Outcome, ConsumerError> {
    let event = match decoded {
        Ok(event) => event,
        Err(error) => return dead_letter(consumer, receiver, delivery, error).await,
    };
    let claiming = Instant::now();
    let mut tx = consumer.pool.begin().await?;
    let first_seen = dedup::claim(&mut tx, &event, key.identity()).await?;
    step_took(Step::Dedup, claiming);
    if first_seen == FirstSeen::Duplicate {
        tx.rollback().await?;
        return settle_duplicate(consumer, receiver, delivery, &event).await;
    }
    consumer.crash_point(CrashPoint::BeforeCharge, &event);

    // ANCHOR: charge_with_key
    let idempotency_key = match key {
        ChargeKey::None => None,
        ChargeKey::FromEvent => Some(dedup::idempotency_key(&event)),
        ChargeKey::FromOrder => Some(dedup::order_idempotency_key(&event)),
    };
    let charging = Instant::now();
    let charged = consumer
        .psp
        .charge(&charge_request(&event), idempotency_key.as_deref())
        .await;
    step_took(Step::Psp, charging);
    let charge = match charged {
        Ok(charge) => charge,
        Err(error) => {
            // Give the dedup row back so the retry is processed as new.
            tx.rollback().await?;
            return settle_failed_charge(consumer, receiver, delivery, error).await;
        }
    };
    // ANCHOR_END: charge_with_key
    consumer.crash_point(CrashPoint::AfterChargeBeforeCommit, &event);

    let recording = Instant::now();
    crate::insert_payment(&mut tx, &event, &charge.id).await?;
    step_took(Step::Record, recording);
    let committing = Instant::now();
    tx.commit().await?;
    step_took(Step::Commit, committing);
    consumer.crash_point(CrashPoint::AfterCommitBeforeAck, &event);

    let settling = Instant::now();
    receiver.ack(delivery).await?;
    step_took(Step::Settle, settling);
    Ok(Outcome::Charged {
        charge_id: charge.id,
    })
}
// ANCHOR_END: insert_first_consumer

// ANCHOR: settle_duplicate
/// Already charged and committed by someone. If it was charged for what
/// this delivery asks, there is nothing left to do but tell the broker, so
/// it stops redelivering. If not, the producer sent one event id (or one
/// order) with two different contents: acking would hide that bug, and
/// charging would pay twice, so the delivery goes to the dead-letter queue
/// with both sides named, and the mismatch is counted for an alert.
async fn settle_duplicate(
    consumer: &PaymentConsumer,
    receiver: &mut dyn Receiver,
    delivery: &Delivery,
    event: &PaymentEvent,
) -> Result<Outcome, ConsumerError> {
    match dedup::recorded(&consumer.pool, event).await? {
        Some(recorded) if !recorded.matches(event) => {
            let reason = recorded.mismatch_reason(event);
            tracing::error!(event_id = %event.event_id, order_id = %event.order_id, %reason);
            crate::metrics::fingerprint_mismatch();
            consumer.dead_letter(receiver, delivery, reason).await
        }
        recorded => {
            if recorded.is_some_and(|row| row.event_id != event.event_id) {
                // A second event for a charged order, same contents: the
                // producer retried with a fresh event id.
                crate::metrics::order_duplicate();
            }
            receiver.ack(delivery).await?;
            Ok(Outcome::Duplicate)
        }
    }
}
// ANCHOR_END: settle_duplicate
