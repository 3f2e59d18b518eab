//! How long the dedup table keeps a processed event, and how old rows go.
//!
//! The hardened consumer INSERTs each event's id into `processed_messages`
//! first, in the same transaction as the payment; a redelivery hits the
//! primary key and is acked as a duplicate. The table cannot grow forever,
//! but a row deleted too early is worse than a big table: the next
//! redelivery of that event finds nothing, and the customer is charged
//! again (Leg 3).
//!
//! # Layout
//!
//! - [`delete_expired`]: removes rows older than a [`RetentionPolicy`]'s
//!   window, in small batches, so that the consumer keeps inserting while
//!   cleanup runs.
//! - [`RedeliveryHorizon`] and [`check`]: how late the broker can still
//!   redeliver a message, and whether a window outlasts that.
//! - [`parse_duration`] and [`format_duration`]: the `30s` / `15m` / `4h` /
//!   `7d` spelling that the runbook, the CLI and the verdicts share (from
//!   `databases::cleanup`, which the outbox's cleanup shares too).

use std::fmt;
use std::time::{Duration, Instant};

use sqlx::PgPool;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("retention batch size must be at least 1, got {0}")]
    BatchSize(i64),
    #[error(
        "retention window must be longer than zero: a zero window deletes the dedup rows \
         of messages the broker may still redeliver"
    )]
    ZeroWindow,
    #[error("dedup table cleanup: {0}")]
    Database(#[from] sqlx::Error),
}

pub type Result<T, E = RetentionError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------
// Cleanup

/// What [`delete_expired`] deletes, and how much at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// A row older than this is deleted. Must outlast the broker's
    /// [`RedeliveryHorizon`]; see [`check`].
    pub window: Duration,
    /// Rows deleted per transaction.
    pub batch_size: i64,
}

impl RetentionPolicy {
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
    pub const DEFAULT_BATCH_SIZE: i64 = 5000;
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            window: Self::DEFAULT_WINDOW,
            batch_size: Self::DEFAULT_BATCH_SIZE,
        }
    }
}

/// What one [`delete_expired`] run did.
pub use databases::cleanup::CleanupReport;
/// The `30s` / `15m` / `4h` / `7d` spelling of a window, shared with the
/// outbox's cleanup.
pub use databases::cleanup::{format_duration, parse_duration, DurationError};

/// One batch: the oldest `$2` rows before the cutoff, found through the
/// `processed_at` index, then deleted by primary key.
///
/// `= ANY (ARRAY(...))`, not `IN (...)`: with `IN`, Postgres may hash-join
/// the few thousand ids against a sequential scan of the whole table, so
/// every batch reads every row and a big cleanup costs rows × batches.
/// `ARRAY(...)` runs the subquery once, first, and each id is then looked
/// up in the primary key: a batch costs the same on a table of any size.
///
/// The LIMIT is the point. One unbounded DELETE of millions of rows holds
/// its row locks until it commits, and a redelivery of one of those events
/// (an INSERT of the same `event_id`) would wait on it the whole time; it
/// also writes its whole WAL at once. A batch holds its locks for
/// milliseconds, and new rows (recent `processed_at`, the other end of the
/// index) are never touched.
const DELETE_BATCH: &str = "\
DELETE FROM processed_messages
 WHERE event_id = ANY (ARRAY(SELECT event_id
                               FROM processed_messages
                              WHERE processed_at < $1
                              ORDER BY processed_at
                              LIMIT $2))";

/// Deletes every dedup row processed more than `policy.window` ago, in
/// batches of `policy.batch_size`, until a batch deletes fewer than that.
///
/// Each batch is its own short transaction (an autocommitted statement), so
/// the consumer keeps inserting while cleanup runs, and an interrupted
/// cleanup keeps what it already deleted: running it again carries on.
///
/// The cutoff is fixed when the run starts, so the loop ends even while new
/// rows keep crossing the window.
pub async fn delete_expired(pool: &PgPool, policy: &RetentionPolicy) -> Result<CleanupReport> {
    if policy.batch_size < 1 {
        // LIMIT 0 deletes nothing and is never "fewer than 0": it would loop forever.
        return Err(RetentionError::BatchSize(policy.batch_size));
    }
    if policy.window.is_zero() {
        return Err(RetentionError::ZeroWindow);
    }
    let started = Instant::now();
    let cutoff = databases::cleanup::cutoff(pool, policy.window).await?;

    let mut rows_deleted = 0u64;
    let mut batches = 0u32;
    loop {
        let deleted = sqlx::query(DELETE_BATCH)
            .bind(cutoff)
            .bind(policy.batch_size)
            .execute(pool)
            .await?
            .rows_affected();
        rows_deleted += deleted;
        batches += 1;
        tracing::debug!(batch = batches, deleted, "dedup cleanup batch");
        // A short batch means nothing older than the cutoff is left.
        if deleted < policy.batch_size as u64 {
            break;
        }
    }
    Ok(CleanupReport {
        rows_deleted,
        batches,
        cutoff,
        elapsed: started.elapsed(),
    })
}

// ---------------------------------------------------------------------------
// How long is long enough

/// How late the broker can still hand the consumer a message it has
/// already processed, counted from the processing.
///
/// Fill it in from the broker's settings, not from what usually happens:
/// the window has to cover the worst legal case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedeliveryHorizon {
    /// Receives before the message is dead-lettered: SQS `maxReceiveCount`,
    /// RabbitMQ quorum queue `delivery-limit`.
    pub max_receives: u32,
    /// How long one receive may hold the message before the broker hands it
    /// out again: SQS visibility timeout (or the longest a heartbeat extends
    /// it), RabbitMQ `consumer_timeout` (30 min by default).
    pub redelivery_timeout: Duration,
    /// How long a dead-lettered message may still be redriven into the
    /// queue: the dead-letter queue's retention (SQS: 4 days by default).
    pub dead_letter_redrive_window: Duration,
}

impl RedeliveryHorizon {
    /// `max_receives × redelivery_timeout + dead_letter_redrive_window`:
    /// the last moment a redelivery can arrive, if every receive times out
    /// and the dead letter is redriven at the end of its window.
    pub fn horizon(&self) -> Duration {
        self.redelivery_timeout
            .saturating_mul(self.max_receives)
            .saturating_add(self.dead_letter_redrive_window)
    }
}

impl fmt::Display for RedeliveryHorizon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} receives × {} + redrive window {})",
            format_duration(self.horizon()),
            self.max_receives,
            format_duration(self.redelivery_timeout),
            format_duration(self.dead_letter_redrive_window),
        )
    }
}

/// Whether a retention window outlasts the redelivery horizon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionVerdict {
    /// Every redelivery arrives while its dedup row still exists.
    Safe {
        window: Duration,
        horizon: RedeliveryHorizon,
        margin: Duration,
    },
    /// A redelivery can arrive after its dedup row is gone.
    Unsafe {
        window: Duration,
        horizon: RedeliveryHorizon,
        shortfall: Duration,
    },
}

impl RetentionVerdict {
    pub fn is_safe(&self) -> bool {
        matches!(self, RetentionVerdict::Safe { .. })
    }
}

/// Compares a retention window with the redelivery horizon.
///
/// A window equal to the horizon is safe: cleanup deletes only rows
/// strictly older than the window, and a row lives until the next cleanup
/// after that, never less.
pub fn check(window: Duration, horizon: &RedeliveryHorizon) -> RetentionVerdict {
    let last_redelivery = horizon.horizon();
    if window >= last_redelivery {
        RetentionVerdict::Safe {
            window,
            horizon: *horizon,
            margin: window - last_redelivery,
        }
    } else {
        RetentionVerdict::Unsafe {
            window,
            horizon: *horizon,
            shortfall: last_redelivery - window,
        }
    }
}

impl fmt::Display for RetentionVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetentionVerdict::Safe {
                window,
                horizon,
                margin,
            } if margin.is_zero() => write!(
                f,
                "safe, with no margin: window {} equals the redelivery horizon {horizon}; \
                 any longer receive timeout or redrive window makes it unsafe",
                format_duration(*window),
            ),
            RetentionVerdict::Safe {
                window,
                horizon,
                margin,
            } => write!(
                f,
                "safe: window {} outlasts the redelivery horizon {horizon} by {}",
                format_duration(*window),
                format_duration(*margin),
            ),
            RetentionVerdict::Unsafe {
                window,
                horizon,
                shortfall,
            } => write!(
                f,
                "UNSAFE: window {} is {} shorter than the redelivery horizon {horizon}; \
                 a message redelivered after {} finds no dedup row and would be charged \
                 again; raise the window to at least {}",
                format_duration(*window),
                format_duration(*shortfall),
                format_duration(*window),
                format_duration(horizon.horizon()),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Duration {
        parse_duration(text).unwrap()
    }

    fn sqs_defaults() -> RedeliveryHorizon {
        RedeliveryHorizon {
            max_receives: 5,
            redelivery_timeout: d("10m"),
            dead_letter_redrive_window: d("4d"),
        }
    }

    #[test]
    fn the_horizon_is_every_receive_timing_out_then_a_late_redrive() {
        assert_eq!(sqs_defaults().horizon(), d("4d 50m"));
        let endless = RedeliveryHorizon {
            max_receives: u32::MAX,
            redelivery_timeout: Duration::MAX,
            dead_letter_redrive_window: Duration::MAX,
        };
        assert_eq!(endless.horizon(), Duration::MAX, "saturates, never panics");
    }

    #[test]
    fn a_window_past_the_horizon_is_safe_with_its_margin() {
        let verdict = check(d("7d"), &sqs_defaults());
        assert!(verdict.is_safe());
        assert_eq!(
            verdict,
            RetentionVerdict::Safe {
                window: d("7d"),
                horizon: sqs_defaults(),
                margin: d("2d 23h 10m"),
            }
        );
        assert_eq!(
            verdict.to_string(),
            "safe: window 7d outlasts the redelivery horizon 4d 0h 50m \
             (5 receives × 10m + redrive window 4d) by 2d 23h 10m"
        );
    }

    #[test]
    fn a_window_equal_to_the_horizon_is_safe_but_says_there_is_no_margin() {
        let verdict = check(d("4d 50m"), &sqs_defaults());
        assert!(verdict.is_safe());
        assert!(verdict.to_string().starts_with("safe, with no margin"));
    }

    #[test]
    fn a_window_short_of_the_horizon_is_unsafe_and_says_how_far_to_raise_it() {
        let verdict = check(d("3d"), &sqs_defaults());
        assert!(!verdict.is_safe());
        assert_eq!(
            verdict,
            RetentionVerdict::Unsafe {
                window: d("3d"),
                horizon: sqs_defaults(),
                shortfall: d("1d 50m"),
            }
        );
        assert_eq!(
            verdict.to_string(),
            "UNSAFE: window 3d is 1d 0h 50m shorter than the redelivery horizon 4d 0h 50m \
             (5 receives × 10m + redrive window 4d); a message redelivered after 3d finds \
             no dedup row and would be charged again; raise the window to at least 4d 0h 50m"
        );
    }
}
