//! THE BROKEN VERSIONS. Both are real, runnable consumers, and chapter 1
//! measures what they do to customers' money under crashes.
//!
//! [`handle_ack_after_commit`] is at-least-once without protection: any crash
//! after the charge and before the ack (Leg 3) makes the broker redeliver,
//! and the redelivery charges again, because nothing remembers the first
//! charge and the PSP call carries no Idempotency-Key.
//!
//! [`handle_ack_on_receipt`] "fixes" the duplicates by acking first, which
//! makes it at-most-once: a crash anywhere after the ack loses the payment.

use payments::{DecodeError, PaymentEvent};
use psp::{ChargeError, ChargeRequest};
use queue::{Delivery, Receiver};

use std::time::Instant;

use crate::crash::CrashPoint;
use crate::metrics::{step_took, Step};
use crate::observe::Outcome;
use crate::{record_payment, ConsumerError, PaymentConsumer};

// ANCHOR: ack_after_commit
/// receive → charge (no Idempotency-Key) → record → commit → ack.
pub async fn handle_ack_after_commit(
    consumer: &PaymentConsumer,
    receiver: &mut dyn Receiver,
    delivery: &Delivery,
    decoded: Result<PaymentEvent, DecodeError>,
) -> Result<Outcome, ConsumerError> {
    let event = match decoded {
        Ok(event) => event,
        Err(error) => return dead_letter(consumer, receiver, delivery, error).await,
    };
    consumer.crash_point(CrashPoint::BeforeCharge, &event);

    // No Idempotency-Key: every call moves money, including a retry.
    let charging = Instant::now();
    let charged = consumer.psp.charge(&charge_request(&event), None).await;
    step_took(Step::Psp, charging);
    let charge = match charged {
        Ok(charge) => charge,
        Err(error) => return settle_failed_charge(consumer, receiver, delivery, error).await,
    };
    consumer.crash_point(CrashPoint::AfterChargeBeforeCommit, &event);

    record_payment(&consumer.pool, &event, &charge.id).await?;
    consumer.crash_point(CrashPoint::AfterCommitBeforeAck, &event);

    let settling = Instant::now();
    receiver.ack(delivery).await?;
    step_took(Step::Settle, settling);
    Ok(Outcome::Charged {
        charge_id: charge.id,
    })
}
// ANCHOR_END: ack_after_commit

// ANCHOR: ack_on_receipt
/// ack → charge → record → commit. At-most-once.
pub async fn handle_ack_on_receipt(
    consumer: &PaymentConsumer,
    receiver: &mut dyn Receiver,
    delivery: &Delivery,
    decoded: Result<PaymentEvent, DecodeError>,
) -> Result<Outcome, ConsumerError> {
    let event = match decoded {
        Ok(event) => event,
        Err(error) => return dead_letter(consumer, receiver, delivery, error).await,
    };
    // The broker forgets the message now. From here on, a crash loses it.
    receiver.ack(delivery).await?;
    receiver.settled().await?;
    consumer.crash_point(CrashPoint::BeforeCharge, &event);

    let charge = match consumer.psp.charge(&charge_request(&event), None).await {
        Ok(charge) => charge,
        // Already acked: there is nothing to requeue. The payment is lost,
        // and all this variant can do is say so.
        Err(error) => {
            tracing::error!(order_id = %event.order_id, %error, "charge failed after ack: payment lost");
            return Ok(Outcome::Lost {
                reason: format!("charge failed after the ack: {error}"),
            });
        }
    };
    consumer.crash_point(CrashPoint::AfterChargeBeforeCommit, &event);

    record_payment(&consumer.pool, &event, &charge.id).await?;
    consumer.crash_point(CrashPoint::AfterCommitBeforeAck, &event);
    Ok(Outcome::Charged {
        charge_id: charge.id,
    })
}
// ANCHOR_END: ack_on_receipt

pub(crate) fn charge_request(event: &PaymentEvent) -> ChargeRequest {
    ChargeRequest {
        order_id: event.order_id.to_string(),
        amount_cents: event.amount_cents,
        currency: event.currency.clone(),
    }
}

/// A payload that is not a payment event can never succeed: dead-letter it
/// with the decoder's reason rather than crash or redeliver it forever.
pub(crate) async fn dead_letter(
    consumer: &PaymentConsumer,
    receiver: &mut dyn Receiver,
    delivery: &Delivery,
    error: DecodeError,
) -> Result<Outcome, ConsumerError> {
    let reason = format!("undecodable payment event: {error}");
    consumer.dead_letter(receiver, delivery, reason).await
}

/// The PSP said no, or said nothing. Permanent refusals go to the
/// dead-letter queue; anything that may pass is handed back for later.
pub(crate) async fn settle_failed_charge(
    consumer: &PaymentConsumer,
    receiver: &mut dyn Receiver,
    delivery: &Delivery,
    error: ChargeError,
) -> Result<Outcome, ConsumerError> {
    match error {
        ChargeError::KeyReused | ChargeError::Rejected { .. } => {
            let reason = format!("the PSP refused the charge: {error}");
            consumer.dead_letter(receiver, delivery, reason).await
        }
        // Not this message's fault, and no retry will fix it: hand the
        // message back and stop this process with a clear error, rather than
        // spin through the queue refusing every payment.
        ChargeError::Unauthorized => {
            receiver.requeue(delivery).await?;
            Err(ConsumerError::PspRefusedCredentials)
        }
        other => {
            consumer
                .requeue_later(receiver, delivery, other.to_string())
                .await
        }
    }
}
