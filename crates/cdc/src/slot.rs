//! The replication slot: Postgres keeps every WAL segment a slot has not
//! confirmed, whether or not anything still reads it.

use std::time::{Duration, Instant};

use sqlx::{PgPool, Row};

use crate::CdcError;

/// One slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotState {
    pub active: bool,
    /// `reserved`, `extended`, `unreserved` or `lost` (invalidated by
    /// `max_slot_wal_keep_size`).
    pub wal_status: String,
    /// WAL Postgres keeps for this slot: from its restart position to now.
    pub retained_bytes: i64,
    /// WAL written since the position the reader last confirmed.
    pub confirmed_lag_bytes: i64,
}

/// The slot named `slot`, if it exists.
pub async fn state(pool: &PgPool, slot: &str) -> Result<Option<SlotState>, CdcError> {
    let row = sqlx::query(
        "SELECT active, coalesce(wal_status, '') AS wal_status, \
                coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8 AS retained, \
                coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8 AS lag \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    row.map(|row| {
        Ok(SlotState {
            active: row.try_get("active")?,
            wal_status: row.try_get("wal_status")?,
            retained_bytes: row.try_get("retained")?,
            confirmed_lag_bytes: row.try_get("lag")?,
        })
    })
    .transpose()
}

/// Waits until a reader holds the slot (Debezium streams from it).
pub async fn wait_active(pool: &PgPool, slot: &str, limit: Duration) -> Result<(), CdcError> {
    let deadline = Instant::now() + limit;
    loop {
        if state(pool, slot).await?.is_some_and(|s| s.active) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CdcError::Timeout {
                what: format!("replication slot {slot} active"),
                seconds: limit.as_secs(),
                log: "pg_replication_slots".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Drops the slot, ending the session that still holds it (a killed
/// worker's walsender may take a moment to notice). A slot that does not
/// exist is not an error. Until this runs, Postgres keeps WAL for it.
pub async fn drop_slot(pool: &PgPool, slot: &str) -> Result<(), CdcError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
        )
        .bind(slot)
        .execute(pool)
        .await?;
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1",
        )
        .bind(slot)
        .execute(pool)
        .await;
        match dropped {
            Ok(_) => return Ok(()),
            // 55006: still active; the terminated walsender is on its way out.
            Err(sqlx::Error::Database(error))
                if error.code().as_deref() == Some("55006") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Drops every slot on database `database`: a slot keeps its database from
/// being dropped, and its WAL from being recycled.
pub async fn drop_slots_of_database(pool: &PgPool, database: &str) -> Result<(), CdcError> {
    let slots: Vec<String> =
        sqlx::query_scalar("SELECT slot_name::text FROM pg_replication_slots WHERE database = $1")
            .bind(database)
            .fetch_all(pool)
            .await?;
    for slot in slots {
        drop_slot(pool, &slot).await?;
    }
    Ok(())
}

/// The server's current WAL position, in bytes since the start.
pub async fn current_wal_bytes(pool: &PgPool) -> Result<i64, CdcError> {
    Ok(
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8")
            .fetch_one(pool)
            .await?,
    )
}
