//! The ledger: one row in `charges` per executed charge, that is, per money
//! movement. The book's audit reads it through the functions below and never
//! trusts a consumer's own counters.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgExecutor, PgPool, Row};

use crate::api::ChargeRequest;

/// One executed charge as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub id: String,
    pub order_id: String,
    pub amount_cents: i64,
    pub currency: String,
    /// The key the charging request carried, if any: shows at a glance whether
    /// a double charge came from a caller that sent no key.
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A fresh charge id: `ch_` and a UUID without dashes, like Stripe's `ch_...`.
pub fn new_charge_id() -> String {
    format!("ch_{}", uuid::Uuid::new_v4().simple())
}

/// Moves the money: inserts one ledger row. Callers that hold an idempotency
/// claim run this inside the transaction that also stores the response.
pub(crate) async fn insert_charge<'e>(
    executor: impl PgExecutor<'e>,
    request: &ChargeRequest,
    idempotency_key: Option<&str>,
) -> Result<LedgerEntry, sqlx::Error> {
    let id = new_charge_id();
    // created_at comes from the database so the response carries exactly the
    // stored value (Postgres keeps microseconds, Rust's clock has nanoseconds).
    let row = sqlx::query(
        "INSERT INTO charges (id, order_id, amount_cents, currency, idempotency_key) \
         VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
    )
    .bind(&id)
    .bind(&request.order_id)
    .bind(request.amount_cents)
    .bind(&request.currency)
    .bind(idempotency_key)
    .fetch_one(executor)
    .await?;
    Ok(LedgerEntry {
        id,
        order_id: request.order_id.clone(),
        amount_cents: request.amount_cents,
        currency: request.currency.clone(),
        idempotency_key: idempotency_key.map(str::to_owned),
        created_at: row.try_get("created_at")?,
    })
}

/// Executed charges per order: the input of `double_charges` and `lost_events`.
/// Orders that were never charged are absent.
pub async fn charge_counts_by_order(pool: &PgPool) -> Result<HashMap<String, i64>, sqlx::Error> {
    let rows = sqlx::query("SELECT order_id, count(*) AS n FROM charges GROUP BY order_id")
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("order_id")?, row.try_get("n")?)))
        .collect()
}

/// Every charge of one order, oldest first.
pub async fn charges_for_order(
    pool: &PgPool,
    order_id: &str,
) -> Result<Vec<LedgerEntry>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, order_id, amount_cents, currency, idempotency_key, created_at \
         FROM charges WHERE order_id = $1 ORDER BY created_at, id",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(LedgerEntry {
                id: row.try_get("id")?,
                order_id: row.try_get("order_id")?,
                amount_cents: row.try_get("amount_cents")?,
                currency: row.try_get("currency")?,
                idempotency_key: row.try_get("idempotency_key")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .collect()
}

/// Every money movement the PSP ever executed.
pub async fn total_charges(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM charges")
        .fetch_one(pool)
        .await
}
