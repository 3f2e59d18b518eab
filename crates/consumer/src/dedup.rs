//! INSERT-first deduplication: the processed-messages table.
//!
//! The event's id is inserted *first*, inside the transaction that will also
//! record the payment. Three things follow from the primary key alone:
//!
//! - a redelivery of an event whose transaction committed hits the key,
//!   the transaction rolls back, and the delivery is acked as a duplicate;
//! - a second consumer handed the same event while the first still works
//!   blocks on the INSERT (the first holds the uncommitted key) until the
//!   first commits, and then takes the duplicate path;
//! - a consumer that dies before COMMIT leaves nothing behind: Postgres rolls
//!   its transaction back, and the redelivery is processed as new.
//!
//! # Message identity and business identity
//!
//! The event id is the *message's* identity: it says "this message again".
//! A producer that retries by emitting a fresh event for the same order
//! makes a second message for the same payment, and the event id cannot
//! tell. The order id is the *business* identity of a `payment_requested`
//! event: one order, one payment. [`Identity::Order`] claims it too (the
//! `charged_order` column, unique), so a second event for a charged order
//! is a duplicate like a redelivery; chapter 3 measures the difference.
//!
//! # The fingerprint
//!
//! Each row keeps a [`fingerprint`] of what was charged (order, amount,
//! currency). A dedup hit whose fingerprint differs is not a redelivery but
//! a producer bug (an event id or an order re-sent with other contents):
//! [`Recorded::matches`] tells the two apart, and the consumer dead-letters
//! the mismatch with its reason instead of acking it away in silence.

use std::collections::HashSet;

use payments::PaymentEvent;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// The constraint whose violation means "this event was already processed".
/// Matched by name, so a different unique violation is never mistaken for a
/// duplicate delivery.
pub const PROCESSED_CONSTRAINT: &str = "processed_messages_event_id_key";

/// The unique index whose violation means "this order was already charged"
/// ([`Identity::Order`]). Postgres reports a unique index by its name.
pub const ORDER_CONSTRAINT: &str = "processed_messages_charged_order_key";

/// Which identity a dedup row claims: what counts as "the same payment".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// The event id only: a redelivery or a republish of the same message.
    Event,
    /// The event id and the order id: also a second event for one order.
    Order,
}

/// What the INSERT-first step found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstSeen {
    /// Ours to process: the key is held by our transaction until it ends.
    New,
    /// Already processed by a committed transaction: a duplicate delivery.
    Duplicate,
}

// ANCHOR: insert_first
/// Inserts the event's id into `processed_messages` on `tx`. A violation of
/// [`PROCESSED_CONSTRAINT`] is a duplicate delivery, returned as a value;
/// after it the transaction is aborted and must be rolled back.
pub async fn insert_first(
    tx: &mut PgConnection,
    event: &PaymentEvent,
) -> Result<FirstSeen, sqlx::Error> {
    claim(tx, event, Identity::Event).await
}
// ANCHOR_END: insert_first

// ANCHOR: claim
/// [`insert_first`] for either identity. With [`Identity::Order`] the row
/// also claims the order (`charged_order`), and a violation of
/// [`ORDER_CONSTRAINT`] is a duplicate too: this order is already paid.
pub async fn claim(
    tx: &mut PgConnection,
    event: &PaymentEvent,
    identity: Identity,
) -> Result<FirstSeen, sqlx::Error> {
    let charged_order = (identity == Identity::Order).then_some(event.order_id);
    let inserted = sqlx::query(
        "INSERT INTO processed_messages (event_id, order_id, fingerprint, charged_order) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(event.event_id)
    .bind(event.order_id)
    .bind(fingerprint(event).as_slice())
    .bind(charged_order)
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => Ok(FirstSeen::New),
        Err(sqlx::Error::Database(error))
            if matches!(
                error.constraint(),
                Some(PROCESSED_CONSTRAINT | ORDER_CONSTRAINT)
            ) =>
        {
            Ok(FirstSeen::Duplicate)
        }
        Err(error) => Err(error),
    }
}
// ANCHOR_END: claim

// ANCHOR: claim_batch
/// [`claim`] for a batch of events in one statement, with
/// [`Identity::Order`]: returns the event ids whose rows this transaction
/// inserted. An event left out collided with a row already committed, or
/// held by another consumer's transaction that then committed (the INSERT
/// waits for it, as a single claim does): a duplicate. Rows go in ordered
/// by order id, so two consumers claiming overlapping batches take the
/// rows' locks in the same order and do not deadlock.
pub async fn claim_batch(
    tx: &mut PgConnection,
    events: &[&PaymentEvent],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    if events.is_empty() {
        return Ok(HashSet::new());
    }
    let event_ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let order_ids: Vec<Uuid> = events.iter().map(|e| e.order_id).collect();
    let fingerprints: Vec<Vec<u8>> = events.iter().map(|e| fingerprint(e).to_vec()).collect();
    let claimed: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO processed_messages (event_id, order_id, fingerprint, charged_order) \
         SELECT event_id, order_id, fingerprint, order_id \
         FROM unnest($1::uuid[], $2::uuid[], $3::bytea[]) AS claim(event_id, order_id, fingerprint) \
         ORDER BY order_id, event_id \
         ON CONFLICT DO NOTHING \
         RETURNING event_id",
    )
    .bind(&event_ids)
    .bind(&order_ids)
    .bind(&fingerprints)
    .fetch_all(&mut *tx)
    .await?;
    Ok(claimed.into_iter().collect())
}
// ANCHOR_END: claim_batch

/// Deletes the rows of `event_ids` that this transaction claimed, for the
/// charges that failed: their retries must be processed as new.
pub async fn release(tx: &mut PgConnection, event_ids: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM processed_messages WHERE event_id = ANY($1)")
        .bind(event_ids)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// sha256 of what a charge is for: order, amount and currency (the same
/// three the PSP fingerprints an Idempotency-Key's request by). The event
/// id and the timestamp are left out: a republish may carry a new
/// `created_at` and is still the same payment.
pub fn fingerprint(event: &PaymentEvent) -> [u8; 32] {
    let mut hash = Sha256::new();
    // Separated, so that no two different triples hash the same bytes.
    hash.update(event.order_id.as_bytes());
    hash.update(event.amount_cents.to_be_bytes());
    hash.update(event.currency.as_bytes());
    hash.finalize().into()
}

/// The committed dedup row that made an event a duplicate.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Recorded {
    pub event_id: Uuid,
    pub order_id: Uuid,
    /// `None` on rows written before fingerprints existed.
    pub fingerprint: Option<Vec<u8>>,
}

impl Recorded {
    /// True unless the row knows a fingerprint and it is not `event`'s. A
    /// row from before fingerprints cannot tell, and is taken as a match
    /// (the old behaviour) rather than dead-lettering every old redelivery.
    pub fn matches(&self, event: &PaymentEvent) -> bool {
        self.fingerprint
            .as_deref()
            .is_none_or(|stored| stored == fingerprint(event).as_slice())
    }

    /// Why `event` is not a duplicate of this row but a conflict with it:
    /// the reason its dead letter carries.
    pub fn mismatch_reason(&self, event: &PaymentEvent) -> String {
        let asks = format!(
            "{} {} for order {}",
            event.amount_cents, event.currency, event.order_id
        );
        if self.event_id == event.event_id {
            format!(
                "dedup fingerprint mismatch: event {} was already processed with another \
                 order, amount or currency; this copy asks for {asks} (a producer re-sent the \
                 event id with changed contents)",
                event.event_id
            )
        } else {
            format!(
                "dedup fingerprint mismatch: order {} was already charged by event {} with \
                 another amount or currency; event {} asks for {asks}",
                self.order_id, self.event_id, event.event_id
            )
        }
    }
}

/// The committed row that [`claim`] collided with: the event's own, or the
/// one that claimed its order. Read after the aborted transaction rolled
/// back. `None` if it is gone (retention deleted it in between).
pub async fn recorded(
    pool: &PgPool,
    event: &PaymentEvent,
) -> Result<Option<Recorded>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, order_id, fingerprint FROM processed_messages \
         WHERE event_id = $1 OR charged_order = $2 \
         ORDER BY event_id = $1 DESC LIMIT 1",
    )
    .bind(event.event_id)
    .bind(event.order_id)
    .fetch_optional(pool)
    .await
}

// ANCHOR: idempotency_key
/// The Idempotency-Key chapter 3's first consumer sends with every charge
/// for `event`: derived from the event id only, so every redelivery, every
/// consumer process and every retry after a timeout sends the same key. A
/// second event for the same order sends another key.
pub fn idempotency_key(event: &PaymentEvent) -> String {
    format!("payment-event-{}", event.event_id)
}

/// The key the hardened consumer sends: derived from the order, the
/// business identity of a payment. The same on every redelivery too, and
/// also for a second event the producer emitted for the same order.
pub fn order_idempotency_key(event: &PaymentEvent) -> String {
    format!("order-{}/payment", event.order_id)
}
// ANCHOR_END: idempotency_key
