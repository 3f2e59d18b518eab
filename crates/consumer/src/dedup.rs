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

use payments::PaymentEvent;
use sqlx::PgConnection;

/// The constraint whose violation means "this event was already processed".
/// Matched by name, so a different unique violation is never mistaken for a
/// duplicate delivery.
pub const PROCESSED_CONSTRAINT: &str = "processed_messages_event_id_key";

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
    let inserted =
        sqlx::query("INSERT INTO processed_messages (event_id, order_id) VALUES ($1, $2)")
            .bind(event.event_id)
            .bind(event.order_id)
            .execute(&mut *tx)
            .await;
    match inserted {
        Ok(_) => Ok(FirstSeen::New),
        Err(sqlx::Error::Database(error)) if error.constraint() == Some(PROCESSED_CONSTRAINT) => {
            Ok(FirstSeen::Duplicate)
        }
        Err(error) => Err(error),
    }
}
// ANCHOR_END: insert_first

// ANCHOR: idempotency_key
/// The Idempotency-Key the hardened consumer sends with every charge for
/// `event`: derived from the event id only, so every redelivery, every
/// consumer process and every retry after a timeout sends the same key.
pub fn idempotency_key(event: &PaymentEvent) -> String {
    format!("payment-event-{}", event.event_id)
}
// ANCHOR_END: idempotency_key
