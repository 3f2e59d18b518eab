//! The producer side: the shop commits orders and tells the payment consumer.
//!
//! # Layout
//!
//! - [`Order`] and [`migrate`]: the `orders` table (and the outbox), the
//!   ground truth for what was promised to customers.
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

/// Brings the shop's tables up to date (sqlx migrations); safe on every
/// start, by several processes at once (the migrator takes an advisory lock).
///
/// The consumer's tables live in the same database under their own
/// migrations, recorded in the same `_sqlx_migrations` table: each side
/// ignores the versions it does not know, and the two use distinct version
/// ranges (the shop's end in `01xx`, the consumer's in `02xx`).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await
}

/// The ids of every committed order: the "expected" side of the audit.
pub async fn committed_order_ids(pool: &PgPool) -> Result<Vec<Uuid>, ShopError> {
    let ids = sqlx::query_scalar("SELECT order_id FROM orders ORDER BY created_at")
        .fetch_all(pool)
        .await?;
    Ok(ids)
}
