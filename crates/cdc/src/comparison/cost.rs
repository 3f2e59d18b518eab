//! What a relay costs Postgres and the machine: its statements (from
//! `pg_stat_statements`), the CPU of the backends that serve it (from
//! `/proc`), the slot's lag, and the memory of any process it brings.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{PgPool, Row};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::CdcError;

/// Marks the lab's own statements on the shop database, so they are never
/// counted as the relay's (`pg_stat_statements` keeps the comment).
pub(crate) const LAB_TAG: &str = "/* eo-lab */";

/// The statements the shop's load sends: the order, its outbox row, the
/// NOTIFY, the DELETE of the forgetting write, and the transaction around
/// them. Everything else on the shop database during a run is the relay's.
const SHOP_STATEMENTS: [&str; 6] = [
    "INSERT INTO orders",
    "INSERT INTO outbox",
    "SELECT pg_notify",
    "DELETE FROM outbox WHERE event_id",
    "BEGIN",
    "COMMIT",
];

fn is_relays(query: &str) -> bool {
    let query = query.trim_start();
    !query.starts_with(LAB_TAG)
        && !SHOP_STATEMENTS.iter().any(|shop| {
            query
                .get(..shop.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(shop))
        })
}

#[derive(Debug, Clone, Default)]
struct Counts {
    calls: i64,
    rows: i64,
    wal_bytes: i64,
}

/// `pg_stat_statements` of one database at one moment. The book's role may
/// not reset the statistics, so a run is the difference of two snapshots.
#[derive(Debug, Clone, Default)]
pub(crate) struct Statements {
    by_statement: HashMap<(i64, i64, bool), (String, Counts)>,
}

pub(crate) async fn statements(admin: &PgPool, database: &str) -> Result<Statements, CdcError> {
    let rows = sqlx::query(
        "SELECT s.userid::int8 AS userid, coalesce(s.queryid, 0) AS queryid, s.toplevel, \
                s.query, s.calls, s.rows, s.wal_bytes::int8 AS wal_bytes \
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = $1",
    )
    .bind(database)
    .fetch_all(admin)
    .await
    .map_err(CdcError::Postgres)?;
    let mut by_statement = HashMap::new();
    for row in rows {
        let key = (
            row.try_get("userid").map_err(CdcError::Postgres)?,
            row.try_get("queryid").map_err(CdcError::Postgres)?,
            row.try_get("toplevel").map_err(CdcError::Postgres)?,
        );
        let counts = Counts {
            calls: row.try_get("calls").map_err(CdcError::Postgres)?,
            rows: row.try_get("rows").map_err(CdcError::Postgres)?,
            wal_bytes: row.try_get("wal_bytes").map_err(CdcError::Postgres)?,
        };
        let query: String = row.try_get("query").map_err(CdcError::Postgres)?;
        by_statement.insert(key, (query, counts));
    }
    Ok(Statements { by_statement })
}

/// The relay's statements between two snapshots.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RelayStatements {
    /// Statements executed.
    pub calls: i64,
    /// Rows they returned or changed (`pg_stat_statements.rows`).
    pub rows: i64,
    /// WAL they wrote (a poller's claims and marks are UPDATEs).
    pub wal_bytes: i64,
    /// The busiest statements, most calls first, for the curious.
    pub top: Vec<StatementLine>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StatementLine {
    pub query: String,
    pub calls: i64,
    pub rows: i64,
}

pub(crate) fn relay_share(before: &Statements, after: &Statements) -> RelayStatements {
    let mut share = RelayStatements::default();
    for (key, (query, end)) in &after.by_statement {
        if !is_relays(query) {
            continue;
        }
        let start = before
            .by_statement
            .get(key)
            .map(|(_, counts)| counts.clone())
            .unwrap_or_default();
        let calls = end.calls - start.calls;
        if calls <= 0 {
            continue;
        }
        let rows = end.rows - start.rows;
        share.calls += calls;
        share.rows += rows;
        share.wal_bytes += end.wal_bytes - start.wal_bytes;
        share.top.push(StatementLine {
            query: query.split_whitespace().collect::<Vec<_>>().join(" "),
            calls,
            rows,
        });
    }
    share.top.sort_by_key(|line| std::cmp::Reverse(line.calls));
    share.top.truncate(5);
    share
}

/// WAL written by every statement on the database between two snapshots:
/// the shop's and the relay's, and nobody else's (unlike the server's WAL
/// position, which other databases move too). Commit records are not a
/// statement's and are not in it.
pub(crate) fn database_wal_bytes(before: &Statements, after: &Statements) -> i64 {
    after
        .by_statement
        .iter()
        .map(|(key, (_, end))| {
            let start = before.by_statement.get(key).map_or(0, |(_, c)| c.wal_bytes);
            end.wal_bytes - start
        })
        .sum()
}

/// Linux reports process times in USER_HZ ticks, which it fixes at 100 a
/// second for userspace on every architecture.
const TICKS_PER_SECOND: f64 = 100.0;

/// utime + stime of a process, in ticks, from `/proc/<pid>/stat`.
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    parse_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces;
    // the fields after it start with the state (field 3), so utime and
    // stime (fields 14 and 15) are the 12th and 13th after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory of a process, from `/proc/<pid>/status`.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    parse_rss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Whose backends serve the relay.
#[derive(Debug, Clone)]
pub(crate) struct Watched {
    pub database: String,
    /// Sessions on the shop database with these `application_name`s.
    pub applications: Vec<String>,
    /// Sessions whose `application_name` starts with this (Debezium names
    /// its JDBC sessions "Debezium General", "Debezium Streaming", ...).
    pub application_prefix: Option<String>,
    /// The replication slot whose walsender (`active_pid`) decodes the WAL.
    pub slot: Option<String>,
    /// A process outside Postgres that the relay needs (Connect's JVM).
    pub process: Option<u32>,
}

/// What the sampler saw between its first and last sample.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sampled {
    /// CPU seconds of the relay's backends; `None` when no backend's
    /// `/proc` entry could be read (Postgres in a container).
    pub backend_cpu_seconds: Option<f64>,
    /// Backends seen, as `pid (application or backend type): CPU s`.
    pub backends: Vec<String>,
    pub max_slot_lag_bytes: Option<i64>,
    /// The highest `pg_stat_replication.flush_lag` of the slot's walsender,
    /// in milliseconds: how long ago the WAL the reader last confirmed
    /// was written.
    pub max_flush_lag_ms: Option<f64>,
    pub max_process_rss_bytes: Option<u64>,
    pub process_cpu_seconds: Option<f64>,
}

/// Samples every 250 ms until stopped, and once more on the way out.
pub(crate) struct Sampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<Sampled, CdcError>>,
}

impl Sampler {
    /// Takes the first sample (the baseline) before returning.
    pub async fn start(admin: PgPool, watched: Watched) -> Result<Self, CdcError> {
        let mut state = SamplerState::default();
        state.sample(&admin, &watched, true).await?;
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = stopped.changed() => break,
                }
                state.sample(&admin, &watched, false).await?;
            }
            state.sample(&admin, &watched, false).await?;
            Ok(state.finish(&watched))
        });
        Ok(Self { stop, task })
    }

    /// The last sample, then what was seen. Call while the relay still
    /// runs: a backend's CPU time is gone with its session.
    pub async fn stop(self) -> Result<Sampled, CdcError> {
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| CdcError::Measurement(format!("the sampler failed: {e}")))?
    }
}

#[derive(Debug, Default)]
struct SamplerState {
    /// Per backend: (ticks at the first sample it was seen in, ticks at
    /// the last, how it is named).
    backends: HashMap<u32, (u64, u64, String)>,
    max_lag: Option<i64>,
    max_flush_lag: Option<f64>,
    max_rss: Option<u64>,
    process_ticks: Option<(u64, u64)>,
}

impl SamplerState {
    async fn sample(
        &mut self,
        admin: &PgPool,
        watched: &Watched,
        baseline: bool,
    ) -> Result<(), CdcError> {
        let rows = sqlx::query(
            "SELECT a.pid, coalesce(nullif(a.application_name, ''), a.backend_type) AS name \
             FROM pg_stat_activity a \
             WHERE a.datname = $1 \
               AND (a.application_name = ANY($2) \
                    OR ($3::text IS NOT NULL AND a.application_name LIKE $3::text || '%') \
                    OR a.pid IN (SELECT active_pid FROM pg_replication_slots \
                                 WHERE slot_name = $4 AND active_pid IS NOT NULL))",
        )
        .bind(&watched.database)
        .bind(&watched.applications)
        .bind(&watched.application_prefix)
        .bind(&watched.slot)
        .fetch_all(admin)
        .await
        .map_err(CdcError::Postgres)?;
        for row in rows {
            let pid: i32 = row.try_get("pid").map_err(CdcError::Postgres)?;
            let name: String = row.try_get("name").map_err(CdcError::Postgres)?;
            let Some(ticks) = cpu_ticks(pid as u32) else {
                continue;
            };
            // A backend that was there at the baseline counts from then; one
            // that came later (a new pooled session, a walsender after a
            // restart) counts whole.
            let start = if baseline { ticks } else { 0 };
            let entry = self
                .backends
                .entry(pid as u32)
                .or_insert((start, ticks, name));
            entry.1 = ticks;
        }
        if let Some(slot) = &watched.slot {
            if let Some(state) = crate::slot::state(admin, slot).await? {
                let lag = state.confirmed_lag_bytes;
                self.max_lag = Some(self.max_lag.map_or(lag, |max| max.max(lag)));
            }
            let flush_lag: Option<f64> = sqlx::query_scalar(
                "SELECT extract(epoch FROM r.flush_lag)::float8 * 1000 \
                 FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid \
                 WHERE s.slot_name = $1",
            )
            .bind(slot)
            .fetch_optional(admin)
            .await
            .map_err(CdcError::Postgres)?
            .flatten();
            if let Some(lag) = flush_lag {
                self.max_flush_lag = Some(self.max_flush_lag.map_or(lag, |max| max.max(lag)));
            }
        }
        if let Some(pid) = watched.process {
            if let Some(rss) = rss_bytes(pid) {
                self.max_rss = Some(self.max_rss.map_or(rss, |max| max.max(rss)));
            }
            if let Some(ticks) = cpu_ticks(pid) {
                let first = self.process_ticks.map_or(ticks, |(first, _)| first);
                self.process_ticks = Some((first, ticks));
            }
        }
        Ok(())
    }

    fn finish(self, watched: &Watched) -> Sampled {
        let mut backends: Vec<(u32, String, u64)> = self
            .backends
            .iter()
            .map(|(pid, (start, end, name))| (*pid, name.clone(), end.saturating_sub(*start)))
            .collect();
        backends.sort();
        let ticks: u64 = self
            .backends
            .values()
            .map(|(start, end, _)| end.saturating_sub(*start))
            .sum();
        Sampled {
            backend_cpu_seconds: (!self.backends.is_empty())
                .then(|| ticks as f64 / TICKS_PER_SECOND),
            backends: backends
                .into_iter()
                .map(|(pid, name, ticks)| {
                    format!("{pid} ({name}): {:.2} s", ticks as f64 / TICKS_PER_SECOND)
                })
                .collect(),
            max_slot_lag_bytes: watched.slot.as_ref().and(self.max_lag),
            max_flush_lag_ms: watched.slot.as_ref().and(self.max_flush_lag),
            max_process_rss_bytes: self.max_rss,
            process_cpu_seconds: self
                .process_ticks
                .map(|(first, last)| last.saturating_sub(first) as f64 / TICKS_PER_SECOND),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shops_and_the_labs_statements_are_not_the_relays() {
        assert!(!is_relays("INSERT INTO outbox (event_id) VALUES ($1)"));
        assert!(!is_relays("begin"));
        assert!(!is_relays("SELECT pg_notify($1, $2)"));
        assert!(!is_relays("/* eo-lab */ SELECT count(*) FROM outbox"));
        assert!(is_relays(
            "UPDATE outbox SET attempts = attempts + $1 WHERE id IN (SELECT id FROM outbox)"
        ));
        assert!(is_relays("LISTEN outbox_pending"));
    }

    #[test]
    fn cpu_time_comes_after_a_command_name_with_spaces() {
        let stat = "6735 (postgres: eo x) S 6734 6735 6735 0 -1 4194368 266 0 0 0 \
                    17 4 0 0 20 0 1 0 851438 239386624 2870";
        assert_eq!(parse_cpu_ticks(stat), Some(21));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn resident_memory_is_read_in_kib() {
        let status = "Name:\tjava\nVmPeak:\t 9 kB\nVmRSS:\t  524288 kB\nThreads:\t40\n";
        assert_eq!(parse_rss(status), Some(512 * 1024 * 1024));
    }

    #[test]
    fn a_snapshot_difference_counts_only_the_relays_new_calls() {
        let snapshot = |claims: i64| Statements {
            by_statement: HashMap::from([
                (
                    (1, 10, true),
                    (
                        "UPDATE outbox SET attempts = attempts + $1".to_owned(),
                        Counts {
                            calls: claims,
                            rows: claims * 3,
                            wal_bytes: claims * 100,
                        },
                    ),
                ),
                (
                    (1, 11, true),
                    (
                        "INSERT INTO outbox (event_id) VALUES ($1)".to_owned(),
                        Counts {
                            calls: 1000 + claims,
                            rows: 1000,
                            wal_bytes: 5,
                        },
                    ),
                ),
            ]),
        };
        let share = relay_share(&snapshot(5), &snapshot(12));
        assert_eq!((share.calls, share.rows, share.wal_bytes), (7, 21, 700));
        assert_eq!(share.top.len(), 1);
    }
}
