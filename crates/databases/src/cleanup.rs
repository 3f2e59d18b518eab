//! What the book's two cleanups share (the dedup table's retention and the
//! outbox's): a cutoff on the database's clock, the report of a run that
//! deleted old rows in short batches, and the `30s` / `15m` / `4h` / `7d`
//! spelling of a window that their command lines and verdicts print, and
//! the share of old rows their measurements load.

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

// ---------------------------------------------------------------------------
// Durations as people write them

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration: write e.g. 30s, 15m, 4h or 7d")]
    Empty,
    #[error("`{0}` has no unit: write e.g. {0}s, {0}m, {0}h or {0}d")]
    MissingUnit(String),
    #[error("`{0}` is not a duration: write a number then a unit, e.g. 30s, 15m, 4h, 7d or 4d 2h")]
    Malformed(String),
    #[error("unknown unit `{unit}` in `{input}`: use s, m, h or d")]
    UnknownUnit { input: String, unit: String },
    #[error("`{0}` is too long a duration")]
    Overflow(String),
}

/// Parses `30s`, `15m`, `4h`, `7d`, and sums of them such as `4d 2h 30m`
/// or `1h30m` (what [`format_duration`] prints reads back in).
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let text = input.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total = 0u64;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return Err(DurationError::Malformed(input.to_owned()));
        }
        let (number, after) = rest.split_at(digits);
        let letters = after.len() - after.trim_start_matches(|c: char| c.is_alphabetic()).len();
        let (unit, after) = after.split_at(letters);
        let scale = match unit {
            "s" => 1,
            "m" => MINUTE,
            "h" => HOUR,
            "d" => DAY,
            "" if after.trim().is_empty() && total == 0 => {
                return Err(DurationError::MissingUnit(number.to_owned()))
            }
            "" => return Err(DurationError::Malformed(input.to_owned())),
            other => {
                return Err(DurationError::UnknownUnit {
                    input: input.to_owned(),
                    unit: other.to_owned(),
                })
            }
        };
        let overflow = || DurationError::Overflow(input.to_owned());
        let value: u64 = number.parse().map_err(|_| overflow())?;
        total = value
            .checked_mul(scale)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(overflow)?;
        rest = after.trim_start();
    }
    Ok(Duration::from_secs(total))
}

/// `7d`, `4d 0h 50m`, `2h 30m`, `45s`: days, hours, minutes, seconds, with
/// the zero parts at either end left out and the ones in between kept, so
/// that the magnitude is visible at a glance. Below one second: `250ms`.
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs == 0 {
        return match duration.subsec_millis() {
            0 => "0s".to_owned(),
            ms => format!("{ms}ms"),
        };
    }
    let parts = [
        (secs / DAY, "d"),
        (secs % DAY / HOUR, "h"),
        (secs % HOUR / MINUTE, "m"),
        (secs % MINUTE, "s"),
    ];
    let first = parts.iter().position(|(n, _)| *n > 0).unwrap_or(0);
    let last = parts.iter().rposition(|(n, _)| *n > 0).unwrap_or(0);
    parts[first..=last]
        .iter()
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses a share between 0 and 1 (`0.5`): how much of a measurement's
/// table is old enough to delete.
pub fn parse_share(text: &str) -> Result<f64, String> {
    let share: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number between 0 and 1"))?;
    if (0.0..=1.0).contains(&share) {
        Ok(share)
    } else {
        Err(format!("`{text}` is not between 0 and 1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Duration {
        parse_duration(text).unwrap()
    }

    #[test]
    fn a_share_is_a_number_from_0_to_1() {
        assert_eq!(parse_share("0.5"), Ok(0.5));
        assert_eq!(parse_share("1"), Ok(1.0));
        assert!(parse_share("1.5")
            .unwrap_err()
            .contains("not between 0 and 1"));
        assert!(parse_share("half").unwrap_err().contains("not a number"));
    }

    #[test]
    fn durations_parse_in_every_unit_and_as_sums() {
        assert_eq!(d("30s"), Duration::from_secs(30));
        assert_eq!(d("15m"), Duration::from_secs(15 * 60));
        assert_eq!(d("4h"), Duration::from_secs(4 * 3600));
        assert_eq!(d("7d"), Duration::from_secs(7 * 86_400));
        assert_eq!(d("1h30m"), Duration::from_secs(5400));
        assert_eq!(d(" 4d 0h 50m "), Duration::from_secs(4 * 86_400 + 50 * 60));
        assert_eq!(d("0s"), Duration::ZERO);
    }

    #[test]
    fn malformed_durations_say_what_to_write() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert_eq!(
            parse_duration("30"),
            Err(DurationError::MissingUnit("30".into()))
        );
        assert!(matches!(
            parse_duration("3w"),
            Err(DurationError::UnknownUnit { unit, .. }) if unit == "w"
        ));
        assert!(matches!(
            parse_duration("1.5h"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("h"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("-1d"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("4d 30"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("99999999999999999999d"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse_duration("999999999999999999d"),
            Err(DurationError::Overflow(_))
        ));
        assert_eq!(
            DurationError::MissingUnit("30".into()).to_string(),
            "`30` has no unit: write e.g. 30s, 30m, 30h or 30d"
        );
    }

    #[test]
    fn durations_format_with_inner_zeros_kept() {
        assert_eq!(format_duration(d("7d")), "7d");
        assert_eq!(format_duration(d("4d 50m")), "4d 0h 50m");
        assert_eq!(format_duration(d("150m")), "2h 30m");
        assert_eq!(format_duration(d("45s")), "45s");
        assert_eq!(format_duration(d("1d 5s")), "1d 0h 0m 5s");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        for text in ["7d", "4d 0h 50m", "2h 30m", "1d 0h 0m 5s"] {
            assert_eq!(format_duration(d(text)), text, "round trip");
        }
    }
}
