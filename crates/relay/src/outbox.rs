//! The relay's SQL: claim pending rows, mark them sent, give them back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// One pending event, claimed by this relay until its lease runs out.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: Uuid,
    pub aggregate_id: Uuid,
    pub payload: String,
    pub created_at: DateTime<Utc>,
    /// 1 on the first claim; more means an earlier claim published it (or
    /// tried to) without marking it sent: this publish is a republish.
    pub attempts: i32,
}

// ANCHOR: claim
/// Claims up to `batch` pending rows, oldest first, for `lease`.
///
/// `FOR UPDATE SKIP LOCKED` lets several relays claim at once without
/// waiting on each other or taking the same row. The claim commits before
/// anything is published, so the attempt count survives a relay that dies
/// mid-publish, and the lease hands its rows to another relay afterwards.
pub async fn claim(
    pool: &PgPool,
    batch: i64,
    lease: Duration,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let rows = sqlx::query(
        "UPDATE outbox SET attempts = attempts + 1, \
                leased_until = now() + make_interval(secs => $2) \
         WHERE id IN ( \
             SELECT id FROM outbox \
             WHERE sent_at IS NULL AND (leased_until IS NULL OR leased_until < now()) \
             ORDER BY id LIMIT $1 \
             FOR UPDATE SKIP LOCKED) \
         RETURNING id, event_id, aggregate_id, payload, created_at, attempts",
    )
    .bind(batch)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await?;
    let mut claimed = rows
        .into_iter()
        .map(|row| {
            Ok(OutboxRow {
                id: row.try_get("id")?,
                event_id: row.try_get("event_id")?,
                aggregate_id: row.try_get("aggregate_id")?,
                payload: row.try_get("payload")?,
                created_at: row.try_get("created_at")?,
                attempts: row.try_get("attempts")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    // RETURNING has no order; publish in id order.
    claimed.sort_by_key(|row| row.id);
    Ok(claimed)
}
// ANCHOR_END: claim

/// Marks rows sent. Only ever called with rows the broker confirmed.
pub async fn mark_sent(pool: &PgPool, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox SET sent_at = now(), leased_until = NULL WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Gives rows back at once (their publish failed), rather than letting them
/// wait for the lease to run out. Only leases still ours are released: if a
/// slow publish outlived its lease and another relay claimed the row since,
/// the attempt count has moved on and that relay's lease stays.
pub async fn release(pool: &PgPool, rows: &[OutboxRow]) -> Result<(), sqlx::Error> {
    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
    let attempts: Vec<i32> = rows.iter().map(|row| row.attempts).collect();
    sqlx::query(
        "UPDATE outbox SET leased_until = NULL \
         FROM unnest($1::int8[], $2::int4[]) AS ours(id, attempts) \
         WHERE outbox.id = ours.id AND outbox.attempts = ours.attempts \
           AND outbox.sent_at IS NULL",
    )
    .bind(&ids)
    .bind(&attempts)
    .execute(pool)
    .await?;
    Ok(())
}

/// What an on-call engineer asks first: how many are waiting, and how old
/// is the oldest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub pending: i64,
    pub oldest_age_seconds: f64,
}

pub async fn backlog(pool: &PgPool) -> Result<Backlog, sqlx::Error> {
    let row = sqlx::query(
        "SELECT count(*) AS pending, \
                coalesce(extract(epoch FROM now() - min(created_at))::float8, 0) AS oldest \
         FROM outbox WHERE sent_at IS NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok(Backlog {
        pending: row.try_get("pending")?,
        oldest_age_seconds: row.try_get("oldest")?,
    })
}

/// The state of one event's row, for traces: (attempts, sent).
pub async fn row_state(pool: &PgPool, event_id: Uuid) -> Result<Option<(i32, bool)>, sqlx::Error> {
    let row =
        sqlx::query("SELECT attempts, sent_at IS NOT NULL AS sent FROM outbox WHERE event_id = $1")
            .bind(event_id)
            .fetch_optional(pool)
            .await?;
    row.map(|row| Ok((row.try_get("attempts")?, row.try_get("sent")?)))
        .transpose()
}
