//! The hardened consumer, a batch at a time (chapter 2's last section).
//!
//! [`crate::hardened::handle_insert_first`] pays one transaction, one
//! commit and one broker round trip per message. Nothing in the fix needs
//! that: the dedup row and the Idempotency-Key are per event, not per
//! transaction. [`handle_batch`] takes every delivery one receive handed out
//! and does each step once for all of them:
//!
//! 1. one `INSERT ... ON CONFLICT DO NOTHING RETURNING` claims every event's
//!    row (its event id and its order): what comes back is ours to charge,
//!    what does not is a duplicate;
//! 2. the charges go out concurrently, each with its own order's
//!    Idempotency-Key;
//! 3. one `INSERT` records every payment, and one `COMMIT` ends it;
//! 4. the broker hears once: one multiple ack, one `DeleteMessageBatch`,
//!    one offset commit per partition.
//!
//! # One failure does not take the batch with it
//!
//! A charge that fails gives its own dedup row back (deleted inside the
//! transaction, before the commit) and its own delivery back to the broker;
//! the others commit and are acked. A duplicate, or two deliveries of one
//! order in the same batch, take the duplicate path after the commit, with
//! the fingerprint check of the one-message consumer. A payload that does
//! not decode is dead-lettered. Deliveries handed back are settled first,
//! then dead letters, then the acks: a multiple ack or an offset commit
//! covers everything before it, and must not cover a message that is not
//! done.
//!
//! # Crash points, per batch
//!
//! The three crash points keep their meaning, for the whole batch: before
//! the charges (rows claimed, nothing charged: every delivery comes back and
//! is charged once), after the charges and before the commit (every
//! delivery comes back, and each key replays its charge), after the commit
//! and before the acks (every delivery comes back as a duplicate).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::time::Instant;

use payments::PaymentEvent;
use psp::{Charge, ChargeError};
use queue::{Delivery, Receiver};
use uuid::Uuid;

use crate::crash::CrashPoint;
use crate::dedup;
use crate::metrics::{step_took, Step};
use crate::naive::charge_request;
use crate::observe::Outcome;
use crate::{requeue_pause, ConsumerError, LateSettlements, PaymentConsumer};

/// How one delivery of the batch is to be settled.
enum Verdict {
    Ack(Outcome),
    /// Back to the broker, after the pause of a failure that may pass.
    HandBack {
        reason: String,
    },
    DeadLetter {
        reason: String,
    },
}

/// Handles every delivery of one receive; returns their outcomes in order.
pub(crate) async fn handle_batch(
    consumer: &PaymentConsumer,
    receiver: &mut dyn Receiver,
    deliveries: &[Delivery],
) -> Result<Vec<Outcome>, ConsumerError> {
    let mut arrivals = Vec::with_capacity(deliveries.len());
    let mut events = Vec::with_capacity(deliveries.len());
    let mut verdicts: Vec<Option<Verdict>> = Vec::with_capacity(deliveries.len());
    let mut heartbeats = Vec::new();
    for delivery in deliveries {
        let (arrived, decoded) = consumer.arrived(delivery);
        heartbeats.push(consumer.start_heartbeat(&*receiver, delivery, arrived.order_id));
        let verdict = if consumer.last_receive(delivery) {
            Some(Verdict::DeadLetter {
                reason: consumer.last_receive_reason(delivery),
            })
        } else {
            match &decoded {
                Ok(_) => None,
                Err(error) => Some(Verdict::DeadLetter {
                    reason: format!("undecodable payment event: {error}"),
                }),
            }
        };
        events.push(decoded.ok().filter(|_| verdict.is_none()));
        verdicts.push(verdict);
        arrivals.push(arrived);
    }

    // Two deliveries of one order in the batch: the first claims it, the
    // others are its duplicates (checked once the first has committed).
    let mut claimant_of_order = HashMap::new();
    let mut claiming = Vec::new();
    let mut in_batch_duplicates = Vec::new();
    for (i, event) in events.iter().enumerate() {
        if let Some(event) = event {
            match claimant_of_order.entry(event.order_id) {
                Entry::Vacant(first) => {
                    first.insert(i);
                    claiming.push(i);
                }
                Entry::Occupied(first) => in_batch_duplicates.push((i, *first.get())),
            }
        }
    }

    // ANCHOR: batch_steps
    let claiming_at = Instant::now();
    let mut tx = consumer.pool.begin().await?;
    let claimed_events: Vec<&PaymentEvent> = claiming
        .iter()
        .filter_map(|&i| events[i].as_ref())
        .collect();
    let claimed = dedup::claim_batch(&mut tx, &claimed_events).await?;
    step_took(Step::Dedup, claiming_at);
    let (ours, theirs): (Vec<usize>, Vec<usize>) = claiming.into_iter().partition(|&i| {
        events[i]
            .as_ref()
            .is_some_and(|e| claimed.contains(&e.event_id))
    });
    let mut duplicates = theirs;
    let ours: Vec<(usize, &PaymentEvent)> = ours
        .into_iter()
        .filter_map(|i| Some((i, events[i].as_ref()?)))
        .collect();
    for (_, event) in &ours {
        consumer.crash_point(CrashPoint::BeforeCharge, event);
    }

    let charging = Instant::now();
    let charges = futures::future::join_all(ours.iter().map(|(_, event)| {
        let key = dedup::order_idempotency_key(event);
        async move {
            consumer
                .psp
                .charge(&charge_request(event), Some(&key))
                .await
        }
    }))
    .await;
    step_took(Step::Psp, charging);
    let mut charged: Vec<(usize, &PaymentEvent, Charge)> = Vec::new();
    let mut failed: Vec<(usize, &PaymentEvent, ChargeError)> = Vec::new();
    for ((i, event), result) in ours.into_iter().zip(charges) {
        match result {
            Ok(charge) => charged.push((i, event, charge)),
            Err(error) => failed.push((i, event, error)),
        }
    }
    let recording = Instant::now();
    if !failed.is_empty() {
        // Their retries must be processed as new: give their rows back.
        let failed_ids: Vec<Uuid> = failed.iter().map(|(_, e, _)| e.event_id).collect();
        dedup::release(&mut tx, &failed_ids).await?;
    }
    for (_, event, _) in &charged {
        consumer.crash_point(CrashPoint::AfterChargeBeforeCommit, event);
    }
    let payments: Vec<(&PaymentEvent, &str)> = charged
        .iter()
        .map(|(_, event, charge)| (*event, charge.id.as_str()))
        .collect();
    crate::insert_payments(&mut tx, &payments).await?;
    step_took(Step::Record, recording);
    let committing = Instant::now();
    tx.commit().await?;
    step_took(Step::Commit, committing);
    for (_, event, _) in &charged {
        consumer.crash_point(CrashPoint::AfterCommitBeforeAck, event);
    }
    // ANCHOR_END: batch_steps

    for (i, _, charge) in charged {
        verdicts[i] = Some(Verdict::Ack(Outcome::Charged {
            charge_id: charge.id,
        }));
    }
    let mut refused_credentials = false;
    for (i, _, error) in failed {
        verdicts[i] = Some(match error {
            ChargeError::KeyReused | ChargeError::Rejected { .. } => Verdict::DeadLetter {
                reason: format!("the PSP refused the charge: {error}"),
            },
            ChargeError::Unauthorized => {
                refused_credentials = true;
                Verdict::HandBack {
                    reason: error.to_string(),
                }
            }
            other => Verdict::HandBack {
                reason: other.to_string(),
            },
        });
    }
    for (i, claimant) in in_batch_duplicates {
        if matches!(
            verdicts[claimant],
            Some(Verdict::HandBack { .. } | Verdict::DeadLetter { .. })
        ) {
            // Nothing is committed for its order: it duplicates nothing, and
            // is tried again on its own.
            verdicts[i] = Some(Verdict::HandBack {
                reason: "the delivery of its order ahead of it in the batch was not charged"
                    .to_owned(),
            });
        } else {
            duplicates.push(i);
        }
    }
    for i in duplicates {
        let Some(event) = events[i].as_ref() else {
            continue;
        };
        verdicts[i] = Some(match dedup::recorded(&consumer.pool, event).await? {
            Some(recorded) if !recorded.matches(event) => {
                let reason = recorded.mismatch_reason(event);
                tracing::error!(event_id = %event.event_id, order_id = %event.order_id, %reason);
                crate::metrics::fingerprint_mismatch();
                Verdict::DeadLetter { reason }
            }
            recorded => {
                if recorded.is_some_and(|row| row.event_id != event.event_id) {
                    crate::metrics::order_duplicate();
                }
                Verdict::Ack(Outcome::Duplicate)
            }
        });
    }

    let verdicts: Vec<Verdict> = verdicts
        .into_iter()
        .map(|verdict| verdict.expect("every delivery of the batch has a verdict"))
        .collect();
    let mut settling = LateSettlements {
        inner: receiver,
        late: Vec::new(),
    };
    let settling_at = Instant::now();
    let outcomes = settle(
        consumer,
        &mut settling,
        deliveries,
        verdicts,
        refused_credentials,
    )
    .await;
    step_took(Step::Settle, settling_at);
    drop(heartbeats);
    consumer.settled_late(&settling.late, None);
    let outcomes = outcomes?;
    for (arrived, outcome) in arrivals.iter().zip(&outcomes) {
        consumer.finished(arrived, outcome);
    }
    if refused_credentials {
        return Err(ConsumerError::PspRefusedCredentials);
    }
    Ok(outcomes)
}

/// Settles the batch: what goes back first (after one pause for all, unless
/// the PSP refused our key, which no wait fixes), then the dead letters,
/// then one ack for the rest.
async fn settle(
    consumer: &PaymentConsumer,
    receiver: &mut dyn Receiver,
    deliveries: &[Delivery],
    verdicts: Vec<Verdict>,
    refused_credentials: bool,
) -> Result<Vec<Outcome>, ConsumerError> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; deliveries.len()];
    let handed_back: Vec<usize> = (0..deliveries.len())
        .filter(|&i| matches!(verdicts[i], Verdict::HandBack { .. }))
        .collect();
    if !refused_credentials {
        let pause = handed_back
            .iter()
            .map(|&i| requeue_pause(consumer.requeue_delay, &deliveries[i]))
            .max();
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    // On a Kafka partition, the messages after one handed back come again
    // after it: one that would be dead-lettered now is dead-lettered then,
    // once, instead of copied to the dead-letter topic twice.
    let behind_hand_back = |i: usize| {
        deliveries[i].receipt.position().is_some_and(|at| {
            handed_back.iter().any(|&j| {
                deliveries[j]
                    .receipt
                    .position()
                    .is_some_and(|back| back.partition == at.partition && back.offset < at.offset)
            })
        })
    };
    let mut acks = Vec::new();
    let mut acked = Vec::new();
    let mut dead = Vec::new();
    for (i, verdict) in verdicts.into_iter().enumerate() {
        let verdict = match verdict {
            Verdict::DeadLetter { reason } if behind_hand_back(i) => Verdict::HandBack {
                reason: format!(
                    "comes again behind a message handed back on its partition, and is \
                     dead-lettered then: {reason}"
                ),
            },
            other => other,
        };
        match verdict {
            Verdict::HandBack { reason } => {
                receiver.requeue(&deliveries[i]).await?;
                outcomes[i] = Some(Outcome::Requeued { reason });
            }
            Verdict::DeadLetter { reason } => dead.push((i, reason)),
            Verdict::Ack(outcome) => {
                acks.push(deliveries[i].clone());
                acked.push((i, outcome));
            }
        }
    }
    for (i, reason) in dead {
        outcomes[i] = Some(
            consumer
                .dead_letter(receiver, &deliveries[i], reason)
                .await?,
        );
    }
    if !acks.is_empty() {
        receiver.ack_batch(&acks).await?;
    }
    for (i, outcome) in acked {
        outcomes[i] = Some(outcome);
    }
    Ok(outcomes
        .into_iter()
        .map(|outcome| outcome.expect("every delivery was settled"))
        .collect())
}

// ANCHOR: batch_window
/// How many deliveries the next receive asks for: slow start, as TCP does.
///
/// Every delivery a consumer holds is one a kill sends back, and on SQS it
/// comes back only when its lease runs out, with one more receive counted
/// against its `maxReceiveCount`. So a batch is earned: a process starts at
/// one delivery per receive, doubles after each receive whose deliveries
/// were all new and all handled, up to its batch size, and falls back to
/// one as soon as a receive brings a redelivery, the sign that someone died
/// holding it. A queue that keeps its consumers alive is at full size after
/// a handful of receives; one whose consumers keep dying holds a few
/// deliveries hostage per kill, not a full batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchWindow {
    size: usize,
    limit: usize,
}

impl BatchWindow {
    /// A window that starts at one and may grow to `limit`.
    pub fn new(limit: usize) -> Self {
        Self {
            size: 1,
            limit: limit.max(1),
        }
    }

    /// A window already at `limit`.
    pub fn full(limit: usize) -> Self {
        Self {
            size: limit.max(1),
            limit: limit.max(1),
        }
    }

    /// Deliveries to ask for now.
    pub fn size(self) -> usize {
        self.size
    }

    /// A receive brought a redelivery: back to one at a time.
    pub(crate) fn redelivered(&mut self) {
        self.size = 1;
    }

    /// A receive's deliveries were all new and all handled.
    pub(crate) fn handled(&mut self) {
        self.size = (self.size * 2).min(self.limit);
    }
}
// ANCHOR_END: batch_window

#[cfg(test)]
mod tests {
    use super::BatchWindow;

    #[test]
    fn a_window_starts_at_one_doubles_to_its_limit_and_falls_back_on_a_redelivery() {
        let mut window = BatchWindow::new(10);
        let mut sizes = vec![window.size()];
        for _ in 0..5 {
            window.handled();
            sizes.push(window.size());
        }
        assert_eq!(sizes, [1, 2, 4, 8, 10, 10]);
        window.redelivered();
        assert_eq!(window.size(), 1);
        window.handled();
        assert_eq!(window.size(), 2);
        assert_eq!(BatchWindow::new(0).size(), 1);
        assert_eq!(BatchWindow::full(10).size(), 10);
        let mut one = BatchWindow::new(1);
        one.handled();
        assert_eq!(one.size(), 1);
    }
}
