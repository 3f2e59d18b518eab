//! THE FIX for the dual write: the transactional outbox.
//!
//! The order and its event are written in ONE transaction. Nothing is
//! published here: a relay (crate `relay`) reads the pending rows and
//! publishes them. A crash anywhere in this function either loses the whole
//! order (nothing committed: no promise was made) or keeps both the order and
//! its event, which the relay will publish whenever it next runs.

use chrono::Utc;
use payments::PaymentEvent;
use sqlx::{PgConnection, PgPool};

use crate::naive_producer::ProducerFaults;
use crate::{Order, ShopError};

/// The channel the producer notifies on commit and the relay listens to.
pub const OUTBOX_CHANNEL: &str = "outbox_pending";

// ANCHOR: outbox_write
/// Commits the order and its outbox row together; the relay does the rest.
pub async fn place_order(
    pool: &PgPool,
    faults: &dyn ProducerFaults,
    order: &Order,
) -> Result<(), ShopError> {
    let mut tx = pool.begin().await?;
    insert_order_and_event(&mut tx, order).await?;
    // Delivered to listeners only when (and if) this transaction commits.
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(OUTBOX_CHANNEL)
        .execute(&mut *tx)
        .await?;
    faults.before_commit(order); // a crash here rolls back both rows: no promise made
    tx.commit().await?;

    faults.after_commit(order); // a crash here loses nothing: the row is pending
    Ok(())
}

/// The order and its payment event, in the caller's transaction.
async fn insert_order_and_event(
    tx: &mut PgConnection,
    order: &Order,
) -> Result<PaymentEvent, ShopError> {
    let created_at = Utc::now();
    let event = order.payment_event(created_at);
    sqlx::query(
        "INSERT INTO orders (order_id, amount_cents, currency, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(order.order_id)
    .bind(order.amount_cents)
    .bind(&order.currency)
    .bind(created_at)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO outbox (event_id, aggregate_id, payload) VALUES ($1, $2, $3)")
        .bind(event.event_id)
        .bind(order.order_id)
        .bind(String::from_utf8(event.encode()).expect("the wire format is UTF-8 JSON"))
        .execute(&mut *tx)
        .await?;
    Ok(event)
}
// ANCHOR_END: outbox_write

// ANCHOR: outbox_write_without_notify
/// What [`place_order_without_notify`] leaves in the outbox table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowAfterCommit {
    /// The row stays, for a relay that polls the table (or for an audit).
    Kept,
    /// The row is deleted again before the commit (chapter 7): Debezium
    /// reads the event from the write-ahead log, where the INSERT is
    /// recorded whatever happens to the row afterwards, and its EventRouter
    /// drops the DELETE. The table never holds more than the transactions
    /// in flight, and no cleanup job is needed. Only for CDC: a polling
    /// relay would never see the row.
    Deleted,
}

/// The outbox write for readers that do not LISTEN: a polling relay, or
/// Debezium reading the WAL. The order and its outbox row in one
/// transaction, as in [`place_order`], but without the NOTIFY.
///
/// A NOTIFY is not free: to keep the notification queue in commit order,
/// Postgres lets one notifying transaction commit at a time (a lock held
/// from before the commit until after its WAL flush, for the whole server),
/// so notifying orders cannot share a WAL flush. Only the LISTEN/NOTIFY
/// relay needs it.
pub async fn place_order_without_notify(
    pool: &PgPool,
    faults: &dyn ProducerFaults,
    order: &Order,
    row: RowAfterCommit,
) -> Result<(), ShopError> {
    let mut tx = pool.begin().await?;
    let event = insert_order_and_event(&mut tx, order).await?;
    if row == RowAfterCommit::Deleted {
        sqlx::query("DELETE FROM outbox WHERE event_id = $1")
            .bind(event.event_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;

    faults.after_commit(order); // a crash here loses nothing: the WAL has the event
    Ok(())
}
// ANCHOR_END: outbox_write_without_notify

/// Outbox rows not yet marked sent.
pub async fn pending_count(pool: &PgPool) -> Result<i64, ShopError> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
            .fetch_one(pool)
            .await?,
    )
}
