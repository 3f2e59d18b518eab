//! THE BROKEN VERSION: the dual write.
//!
//! The order is committed in Postgres, then the event is published to the
//! broker. These are two writes to two systems with nothing tying them
//! together (the dual-write failure leg, part of Leg 1):
//!
//! - if the process dies after the commit and before the publish, the order
//!   exists and no event will ever be sent;
//! - if the publish is dropped or fails, the commit cannot be taken back, so
//!   the producer can only log it and move on.
//!
//! Either way the customer's order is never charged, and no consumer-side fix
//! can recover an event that was never sent. Chapter 4 replaces this with a
//! transactional outbox.

use chrono::Utc;
use queue::{OutgoingMessage, Publisher};
use sqlx::PgPool;

use crate::{Order, ShopError};

/// Where the chaos lab may interrupt the naive producer.
pub trait ProducerFaults: Send + Sync {
    /// Called between the commit and the publish. A crash fault never returns.
    fn after_commit(&self, order: &Order);

    /// Called inside the order's transaction, just before its COMMIT (the
    /// outbox producer). A crash fault never returns.
    fn before_commit(&self, _order: &Order) {}
}

/// No faults: the producer as it runs in production.
pub struct NoFaults;

impl ProducerFaults for NoFaults {
    fn after_commit(&self, _order: &Order) {}
}

/// What became of one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Committed and published (as far as the publisher could tell).
    Published,
    /// Committed, but the publish failed: the event is lost.
    PublishFailed,
}

// ANCHOR: dual_write
/// Commits the order, then publishes its payment event.
pub async fn place_order(
    pool: &PgPool,
    publisher: &dyn Publisher,
    faults: &dyn ProducerFaults,
    order: &Order,
) -> Result<Placed, ShopError> {
    let created_at = Utc::now();
    sqlx::query(
        "INSERT INTO orders (order_id, amount_cents, currency, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(order.order_id)
    .bind(order.amount_cents)
    .bind(&order.currency)
    .bind(created_at)
    .execute(pool) // autocommit: the order is now a promise to the customer
    .await?;

    faults.after_commit(order); // a crash here loses the event

    let event = order.payment_event(created_at);
    let message = OutgoingMessage {
        key: order.order_id.to_string(),
        message_id: event.event_id.to_string(),
        payload: event.encode(),
    };
    match publisher.publish(&message).await {
        Ok(()) => Ok(Placed::Published),
        Err(error) => {
            // The order is committed and cannot be un-committed. All the
            // naive producer can do is log and move on: the event is lost.
            tracing::warn!(order_id = %order.order_id, %error, "publish failed after commit");
            Ok(Placed::PublishFailed)
        }
    }
}
// ANCHOR_END: dual_write
