//! What the book's two cleanups share (the dedup table's retention and the
//! outbox's): a cutoff on the database's clock, and the report of a run
//! that deleted old rows in short batches.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// What one cleanup run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupReport {
    pub rows_deleted: u64,
    /// DELETE statements run, each its own transaction. The last one is the
    /// one that found fewer rows than the batch size (possibly none), so a
    /// table with nothing to delete still takes one batch.
    pub batches: u32,
    /// Rows stamped before this instant (database clock) were eligible.
    pub cutoff: DateTime<Utc>,
    pub elapsed: Duration,
}

impl CleanupReport {
    pub fn rows_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.rows_deleted as f64 / secs
        } else {
            0.0
        }
    }
}

/// `window` ago, on the database's clock. The rows are stamped by the
/// database's `now()`, so the application's clock (which may be skewed) must
/// not decide which of them are old enough. Computed once per run, so the
/// run ends even while new rows keep crossing the window.
pub async fn cutoff(pool: &PgPool, window: Duration) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar("SELECT now() - make_interval(secs => $1)")
        .bind(window.as_secs_f64())
        .fetch_one(pool)
        .await
}
