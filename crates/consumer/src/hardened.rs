//! THE FIX for Leg 3, in two steps that chapters 2 and 3 measure apart.
//!
//! [`handle_insert_first`] opens a transaction, inserts the event id first
//! (see [`crate::dedup`]), charges, records the payment, commits, and only
//! then acks. With [`ChargeKey::None`] it is chapter 2's consumer: a crash
//! after the commit is now harmless (the redelivery is a duplicate), but a
//! crash after the charge and before the commit still rolls the dedup row
//! back, and the redelivery charges again. With [`ChargeKey::FromEvent`] it
//! is chapter 3's: the PSP sees the same Idempotency-Key on the retry and
//! replays the first charge instead of moving money twice.
//!
//! The transaction stays open across the PSP call. That holds one pooled
//! connection and one row lock per in-flight message for the PSP's latency;
//! in exchange, a concurrent duplicate waits on the row lock instead of
//! racing to the PSP. Chapter 2 discusses the price and the alternative.

use payments::{DecodeError, PaymentEvent};
use queue::{Delivery, Receiver};

use crate::crash::CrashPoint;
use crate::dedup::{self, FirstSeen};
use crate::naive::{charge_request, dead_letter, settle_failed_charge};
use crate::observe::Outcome;
use crate::{ConsumerError, PaymentConsumer};

/// Whether the charge carries an Idempotency-Key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeKey {
    /// Chapter 2: dedup only. Every PSP call may move money.
    None,
    /// Chapter 3: a key derived from the event, the same on every retry.
    FromEvent,
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
        Err(error) => return dead_letter(receiver, delivery, error).await,
    };
    let mut tx = consumer.pool.begin().await?;
    if dedup::insert_first(&mut tx, &event).await? == FirstSeen::Duplicate {
        // Already charged and committed by someone: nothing left to do but
        // tell the broker, so it stops redelivering.
        tx.rollback().await?;
        receiver.ack(delivery).await?;
        return Ok(Outcome::Duplicate);
    }
    consumer.crash_point(CrashPoint::BeforeCharge, &event);

    // ANCHOR: charge_with_key
    let idempotency_key = match key {
        ChargeKey::None => None,
        ChargeKey::FromEvent => Some(dedup::idempotency_key(&event)),
    };
    let charged = consumer
        .psp
        .charge(&charge_request(&event), idempotency_key.as_deref())
        .await;
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

    crate::insert_payment(&mut tx, &event, &charge.id).await?;
    tx.commit().await?;
    consumer.crash_point(CrashPoint::AfterCommitBeforeAck, &event);

    receiver.ack(delivery).await?;
    Ok(Outcome::Charged {
        charge_id: charge.id,
    })
}
// ANCHOR_END: insert_first_consumer
