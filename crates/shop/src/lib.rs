//! The producer side: the shop commits orders and tells the payment consumer.
//!
//! # Layout
//!
//! - [`Order`] and [`apply_schema`]: the `orders` table, the ground truth for
//!   what was promised to customers.
//! - [`naive_producer`]: the broken version, a dual write (commit the order,
//!   then publish). Chapter 1 shows it losing events.
//! - [`outbox_producer`]: the fix, the order and its event in one
//!   transaction; the `relay` crate publishes the event. Chapter 4.

use chrono::{DateTime, Utc};
use payments::PaymentEvent;
use sqlx::PgPool;
use uuid::Uuid;

pub mod naive_producer;
pub mod outbox_producer;

/// One order as the shop stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub order_id: Uuid,
    pub amount_cents: i64,
    pub currency: String,
}

impl Order {
    /// The event that asks the payment consumer to charge this order.
    pub fn payment_event(&self, created_at: DateTime<Utc>) -> PaymentEvent {
        PaymentEvent::new(self.order_id, self.amount_cents, &self.currency, created_at)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShopError {
    #[error("shop database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("publishing the payment event for order {order_id}: {source}")]
    Publish {
        order_id: Uuid,
        source: queue::QueueError,
    },
}

pub async fn apply_schema(pool: &PgPool) -> Result<(), ShopError> {
    sqlx::raw_sql(include_str!("schema.sql"))
        .execute(pool)
        .await?;
    Ok(())
}

/// The ids of every committed order: the "expected" side of the audit.
pub async fn committed_order_ids(pool: &PgPool) -> Result<Vec<Uuid>, ShopError> {
    let ids = sqlx::query_scalar("SELECT order_id FROM orders ORDER BY created_at")
        .fetch_all(pool)
        .await?;
    Ok(ids)
}
