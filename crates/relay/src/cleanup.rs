//! Keeping the outbox small: delete rows that were sent long enough ago.
//!
//! A sent row has done its job: the broker confirmed it, and no relay ever
//! reads it again (the claim looks only at pending rows, through an index
//! that holds only them). It stays for a while because an engineer on call
//! asks "was order X's event published, and when?", and the outbox is where
//! the answer is. After the window it is only weight: a bigger table, bigger
//! indexes, longer vacuums.
//!
//! A pending row is never deleted, however old: it is an event that has
//! not reached the broker yet, and deleting it loses it (the dual write's
//! failure, brought back by a cleanup job).

use std::time::{Duration, Instant};

use sqlx::{PgPool, Row};

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("outbox cleanup batch size must be at least 1, got {0}")]
    BatchSize(i64),
    #[error("outbox cleanup: {0}")]
    Database(#[from] sqlx::Error),
}

/// Sent rows are kept this long unless told otherwise.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// Rows deleted per statement (one short transaction each).
pub const DEFAULT_BATCH_SIZE: i64 = 5000;

/// What one [`delete_sent`] run did.
pub use databases::cleanup::CleanupReport;

// ANCHOR: delete_batch
/// One batch: the next `$2` sent rows before the cutoff, in id order after
/// the last id the previous batch looked at, found through the primary key
/// and deleted by it.
///
/// - `sent_at < $1` is false for a pending row (`sent_at IS NULL`), so no
///   pending row is ever in a batch, however old it is.
/// - `= ANY (ARRAY(...))` runs the subquery once, first; each id is then a
///   primary-key lookup. With `IN (...)` the planner may instead join the
///   ids against a scan of the whole table, once per batch.
/// - `id > $3` carries on where the previous batch stopped instead of
///   stepping again over the rows (kept or just deleted) at the front of
///   the table, so a batch costs the same at the end of a big cleanup as at
///   its start.
/// - The LIMIT keeps each transaction short: the relay marks rows and the
///   producer inserts them throughout, and neither waits on a cleanup that
///   holds half a million row locks or writes its whole WAL in one go.
const DELETE_BATCH: &str = "\
WITH batch AS (
    SELECT ARRAY(SELECT id FROM outbox
                  WHERE id > $3 AND sent_at < $1
                  ORDER BY id
                  LIMIT $2) AS ids
), deleted AS (
    DELETE FROM outbox
     WHERE id = ANY ((SELECT ids FROM batch)::int8[])
    RETURNING 1
)
SELECT cardinality(ids)::int8 AS found,
       (SELECT count(*) FROM deleted) AS deleted,
       ids[cardinality(ids)] AS last_id
  FROM batch";
// ANCHOR_END: delete_batch

// ANCHOR: delete_sent
/// Deletes every outbox row sent more than `window` ago, `batch_size` rows
/// per transaction, until a batch finds fewer than that. Pending rows stay.
///
/// The cutoff is fixed when the run starts, so the loop ends even while
/// the relay keeps marking rows sent. An interrupted run keeps what it
/// deleted; running it again carries on.
pub async fn delete_sent(
    pool: &PgPool,
    window: Duration,
    batch_size: i64,
) -> Result<CleanupReport, CleanupError> {
    if batch_size < 1 {
        // LIMIT 0 finds nothing and is never "fewer than 0": it would loop forever.
        return Err(CleanupError::BatchSize(batch_size));
    }
    let started = Instant::now();
    let cutoff = databases::cleanup::cutoff(pool, window).await?;

    let mut rows_deleted = 0u64;
    let mut batches = 0u32;
    let mut after_id = 0i64;
    loop {
        let row = sqlx::query(DELETE_BATCH)
            .bind(cutoff)
            .bind(batch_size)
            .bind(after_id)
            .fetch_one(pool)
            .await?;
        let found: i64 = row.try_get("found")?;
        let deleted: i64 = row.try_get("deleted")?;
        batches += 1;
        rows_deleted += deleted as u64;
        tracing::debug!(batch = batches, found, deleted, "outbox cleanup batch");
        // Fewer found than asked for: nothing sent before the cutoff is
        // left past `after_id`. (Counting what was found, not what was
        // deleted, keeps a concurrent cleanup that took some of the same
        // rows from ending this one early.)
        if found < batch_size {
            break;
        }
        after_id = row.try_get("last_id")?;
    }
    Ok(CleanupReport {
        rows_deleted,
        batches,
        cutoff,
        elapsed: started.elapsed(),
    })
}
// ANCHOR_END: delete_sent
