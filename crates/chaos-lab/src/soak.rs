//! The soak (the appendix "Faults the pipeline rides out"): the hardened
//! pipeline at a steady rate for minutes on end, with a consumer SIGKILLed
//! from outside every so often, while the lab watches what a leak would
//! show: memory (RSS) and open file descriptors of every process, Postgres
//! connections, and the dedup table against its retention window.
//!
//! One consumer (the last slot) is never killed: its numbers span the whole
//! run. The others are SIGKILLed in turn at moments the lab picks by the
//! clock, not at a crash point. A retention job runs beside them, as the
//! runbook's cron entry would, with a short window so that the table
//! reaches its steady size within the run.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use consumer::retention::{self, RetentionPolicy};
use consumer::{Heartbeat, Variant};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use queue::backend::BackendKind;
use relay::RelayConfig;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::plan::{ChaosPlan, FaultMix};
use crate::report::{Claim, RunReport};
use crate::roles::{ProducerKind, Role};
use crate::run::RunSpec;
use crate::supervisor::ProcessId;

/// How long, how fast, how often.
#[derive(Debug, Clone, Copy)]
pub struct SoakSettings {
    pub duration: Duration,
    pub orders_per_second: u32,
    pub probe: SoakProbe,
}

/// What the lab does beside a soak run, on its clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoakProbe {
    /// SIGKILL one consumer (never the last slot) this often.
    pub kill_every: Duration,
    /// Sample every process and the database, and run the retention job,
    /// this often.
    pub sample_every: Duration,
    /// The retention job's window.
    pub retention: Duration,
    /// Consumers in the run; the last one is the survivor.
    pub consumers: usize,
}

/// Consumers of a soak: two take the kills in turn, one survives.
pub const CONSUMERS: usize = 3;
/// Samples before this are the warm-up: pools fill, caches grow.
pub const WARM_UP: Duration = Duration::from_secs(60);

/// The soak run on `backend`.
pub fn spec(backend: BackendKind, seed: u64, settings: &SoakSettings) -> RunSpec {
    let orders = (settings.duration.as_secs_f64() * f64::from(settings.orders_per_second)) as usize;
    let plan = ChaosPlan::generate(seed, orders.max(1), FaultMix::NONE);
    let mut spec = RunSpec::new(Variant::Hardened, plan, CONSUMERS);
    spec.batch_size = consumer::BATCH_SIZE;
    spec.scenario = "soak".to_owned();
    spec.producer = ProducerKind::Outbox {
        relays: 1,
        relay: RelayConfig::default(),
    };
    spec.publish_pace = Some(Duration::from_secs(1) / settings.orders_per_second.max(1));
    if backend == BackendKind::Sqs {
        spec.heartbeat = Some(Heartbeat::for_lease(spec.visibility_timeout));
    }
    spec.deadline = settings.duration + Duration::from_secs(300);
    spec.soak = Some(SoakProbe {
        consumers: CONSUMERS,
        ..settings.probe
    });
    spec
}

/// One process at one sample.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessSample {
    pub role: String,
    pub slot: usize,
    pub pid: u32,
    pub rss_kib: u64,
    pub open_fds: u64,
}

/// Everything the lab looked at, at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakSample {
    /// Seconds since the run started.
    pub at_s: u64,
    pub processes: Vec<ProcessSample>,
    /// Connections to the run's databases (the shop's, the PSP's), every
    /// client counted: consumers, relay, producer, the PSP, the lab.
    pub postgres_connections: u64,
    /// The same, by the `application_name` the lab gave each process
    /// (`consumer-0`, `relay-0`, ...), a killed process's leftovers
    /// included; the lab's own and the PSP's are under "".
    #[serde(default)]
    pub postgres_by_process: BTreeMap<String, u64>,
    pub dedup_rows: u64,
    pub dedup_bytes: u64,
}

/// What a soak run reports beside its audit.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SoakReport {
    pub samples: Vec<SoakSample>,
    /// Consumers the lab SIGKILLed from outside.
    pub kills: u64,
    pub retention_ms: u64,
    /// Dedup rows the retention job deleted.
    pub retention_deleted: u64,
    pub sample_every_ms: u64,
}

/// The lab's side of a soak: kills on its clock, samples, retention.
pub(crate) struct Prober {
    probe: SoakProbe,
    started: Instant,
    next_kill: Instant,
    next_sample: Instant,
    next_victim: usize,
    report: SoakReport,
}

impl Prober {
    pub(crate) fn new(probe: SoakProbe, started: Instant) -> Self {
        Self {
            probe,
            started,
            next_kill: Instant::now() + probe.kill_every,
            next_sample: Instant::now(),
            next_victim: 0,
            report: SoakReport {
                retention_ms: probe.retention.as_millis() as u64,
                sample_every_ms: probe.sample_every.as_millis() as u64,
                ..SoakReport::default()
            },
        }
    }

    /// Does whatever is due. `crashing` is told which consumer the lab is
    /// about to kill, so that its exit counts as the lab's kill.
    pub(crate) async fn tick(
        &mut self,
        pids: &HashMap<ProcessId, u32>,
        crashing: &mut HashMap<ProcessId, &'static str>,
        shop: &PgPool,
        databases: &[String],
    ) -> anyhow::Result<()> {
        let now = Instant::now();
        if now >= self.next_kill {
            self.next_kill += self.probe.kill_every;
            let victims = self.probe.consumers.saturating_sub(1).max(1);
            let victim = ProcessId {
                role: Role::Consumer,
                slot: self.next_victim % victims,
            };
            self.next_victim += 1;
            if let Some(&pid) = pids.get(&victim) {
                crashing.insert(victim, "SIGKILL from outside (soak)");
                if kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() {
                    self.report.kills += 1;
                }
            }
        }
        if now >= self.next_sample {
            self.next_sample += self.probe.sample_every;
            let policy = RetentionPolicy {
                window: self.probe.retention,
                batch_size: RetentionPolicy::DEFAULT_BATCH_SIZE,
            };
            let cleanup = retention::delete_expired(shop, &policy).await?;
            self.report.retention_deleted += cleanup.rows_deleted;
            self.sample(pids, shop, databases).await?;
        }
        Ok(())
    }

    /// Samples every live process and the database now.
    pub(crate) async fn sample(
        &mut self,
        pids: &HashMap<ProcessId, u32>,
        shop: &PgPool,
        databases: &[String],
    ) -> anyhow::Result<()> {
        let mut processes: Vec<ProcessSample> = pids
            .iter()
            .filter_map(|(process, &pid)| {
                Some(ProcessSample {
                    role: process.role.name().to_owned(),
                    slot: process.slot,
                    pid,
                    rss_kib: rss_kib(pid)?,
                    open_fds: open_fds(pid)?,
                })
            })
            .collect();
        processes.sort_by(|a, b| (&a.role, a.slot).cmp(&(&b.role, b.slot)));
        let by_process: Vec<(String, i64)> = sqlx::query_as(
            "SELECT coalesce(application_name, ''), count(*) FROM pg_stat_activity \
             WHERE datname = ANY($1) GROUP BY 1",
        )
        .bind(databases)
        .fetch_all(shop)
        .await?;
        let postgres_by_process: BTreeMap<String, u64> = by_process
            .into_iter()
            .map(|(name, count)| (name, count as u64))
            .collect();
        let (dedup_rows, dedup_bytes): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM processed_messages), \
                    pg_total_relation_size('processed_messages')",
        )
        .fetch_one(shop)
        .await?;
        self.report.samples.push(SoakSample {
            at_s: self.started.elapsed().as_secs(),
            processes,
            postgres_connections: postgres_by_process.values().sum(),
            postgres_by_process,
            dedup_rows: dedup_rows as u64,
            dedup_bytes: dedup_bytes as u64,
        });
        Ok(())
    }

    pub(crate) fn finish(self) -> SoakReport {
        self.report
    }
}

/// Resident memory of `pid`, from `/proc/PID/status` (Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
}

/// Open file descriptors of `pid` (sockets included), from `/proc/PID/fd`.
fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// First and last of one measure over a run: after the warm-up, and at the
/// end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub warm: u64,
    pub end: u64,
}

impl Span {
    fn show(self, unit: impl Fn(u64) -> String) -> String {
        format!("{} → {}", unit(self.warm), unit(self.end))
    }
}

impl SoakReport {
    /// The first sample after the warm-up (or the first, in a short run).
    fn warm(&self) -> Option<&SoakSample> {
        self.samples
            .iter()
            .find(|s| s.at_s >= WARM_UP.as_secs())
            .or(self.samples.first())
    }

    /// One process's measure, warm and at the end, if the same process
    /// (same pid) was there at both.
    pub fn process_span(
        &self,
        role: Role,
        slot: usize,
        measure: fn(&ProcessSample) -> u64,
    ) -> Option<Span> {
        let find = |sample: &SoakSample| {
            sample
                .processes
                .iter()
                .find(|p| p.role == role.name() && p.slot == slot)
                .cloned()
        };
        let warm = find(self.warm()?)?;
        let end = find(self.samples.last()?)?;
        (warm.pid == end.pid).then(|| Span {
            warm: measure(&warm),
            end: measure(&end),
        })
    }

    pub fn postgres_span(&self) -> Option<Span> {
        Some(Span {
            warm: self.warm()?.postgres_connections,
            end: self.samples.last()?.postgres_connections,
        })
    }

    /// The connections carrying one process's name, warm and at the end.
    pub fn process_postgres_span(&self, process: ProcessId) -> Option<Span> {
        let name = process.application_name();
        let count =
            |sample: &SoakSample| sample.postgres_by_process.get(&name).copied().unwrap_or(0);
        Some(Span {
            warm: count(self.warm()?),
            end: count(self.samples.last()?),
        })
    }

    /// Every sample at which a process's name held more connections than
    /// its pools allow: a pool built again on each reconnect without the
    /// old one closed, or a killed process's connections that Postgres
    /// never let go, would show here.
    pub fn over_pool_limit(&self) -> Vec<String> {
        self.samples
            .iter()
            .flat_map(|sample| {
                sample
                    .postgres_by_process
                    .iter()
                    .filter_map(move |(name, &count)| {
                        let limit = pool_limit(name)?;
                        (count > limit)
                            .then(|| format!("{name}: {count} > {limit} at {} s", sample.at_s))
                    })
            })
            .collect()
    }

    pub fn most_dedup_rows(&self) -> u64 {
        self.samples.iter().map(|s| s.dedup_rows).max().unwrap_or(0)
    }

    /// The most rows the table may hold with the retention job keeping up:
    /// every order of one window, plus those of one interval between runs
    /// of the job, with a tenth for the rate's jitter.
    pub fn dedup_bound(&self, orders_per_second: f64) -> u64 {
        let seconds = (self.retention_ms + self.sample_every_ms) as f64 / 1000.0;
        (orders_per_second * seconds * 1.1).ceil() as u64
    }
}

/// The most Postgres connections one lab process may hold: its pool, and
/// the relay's `LISTEN` connection. `None` for a name the lab did not give.
fn pool_limit(application_name: &str) -> Option<u64> {
    let role = application_name.rsplit_once('-')?.0;
    let limit = match role {
        "consumer" => consumer::service::POOL_CONNECTIONS,
        "relay" => relay::service::POOL_CONNECTIONS + 1,
        "producer" => crate::roles::PRODUCER_POOL_CONNECTIONS,
        _ => return None,
    };
    Some(u64::from(limit))
}

pub const HEADER: [&str; 11] = [
    "broker",
    "minutes",
    "orders",
    "lost events",
    "double charges",
    "consumers SIGKILLed",
    "survivor RSS (MiB, warm → end)",
    "relay RSS (MiB)",
    "survivor open fds",
    "survivor's Postgres connections",
    "all Postgres connections",
];

/// The soak's row for one broker.
pub fn cells(run: &RunReport) -> Vec<String> {
    let soak = run.soak.clone().unwrap_or_default();
    let mib = |kib: u64| format!("{:.0}", kib as f64 / 1024.0);
    let count = |n: u64| n.to_string();
    let span = |span: Option<Span>, unit: &dyn Fn(u64) -> String| {
        span.map_or_else(|| "—".to_owned(), |s| s.show(unit))
    };
    let survivor = CONSUMERS - 1;
    let survivor_id = ProcessId {
        role: Role::Consumer,
        slot: survivor,
    };
    vec![
        run.backend.clone(),
        format!("{:.0}", run.elapsed_ms as f64 / 60_000.0),
        run.audit.orders_committed.to_string(),
        run.lost_events.to_string(),
        run.double_charges.to_string(),
        soak.kills.to_string(),
        span(
            soak.process_span(Role::Consumer, survivor, |p| p.rss_kib),
            &mib,
        ),
        span(soak.process_span(Role::Relay, 0, |p| p.rss_kib), &mib),
        span(
            soak.process_span(Role::Consumer, survivor, |p| p.open_fds),
            &count,
        ),
        span(soak.process_postgres_span(survivor_id), &count),
        span(soak.postgres_span(), &count),
    ]
}

pub const DEDUP_HEADER: [&str; 5] = [
    "broker",
    "retention window",
    "dedup rows (most)",
    "bound: orders in one window and one job interval",
    "table size at the end (kB)",
];

pub fn dedup_cells(run: &RunReport, orders_per_second: f64) -> Vec<String> {
    let soak = run.soak.clone().unwrap_or_default();
    vec![
        run.backend.clone(),
        retention::format_duration(Duration::from_millis(soak.retention_ms)),
        soak.most_dedup_rows().to_string(),
        soak.dedup_bound(orders_per_second).to_string(),
        soak.samples
            .last()
            .map_or(0, |s| s.dedup_bytes / 1024)
            .to_string(),
    ]
}

/// How much the survivor's memory may grow between the warm-up and the
/// end before the soak calls it a leak: half again, plus 16 MiB for an
/// allocator's arenas on a small process.
const RSS_GROWTH_ALLOWED: f64 = 1.5;
const RSS_SLACK_KIB: u64 = 16 * 1024;
/// Descriptors a process may open beyond its warm count (a reconnect in
/// progress, a log file rotated) before the soak calls it a leak.
const FD_SLACK: u64 = 4;

/// What the soak promises, checked on its runs.
pub fn claims(runs: &[RunReport], orders_per_second: f64) -> Vec<Claim> {
    let survivor = CONSUMERS - 1;
    let soaks: Vec<SoakReport> = runs.iter().filter_map(|r| r.soak.clone()).collect();
    vec![
        Claim::new(
            "every committed order charged exactly once on every broker (PSP ledger)",
            runs.iter()
                .all(|run| run.drained && run.audit.every_order_charged_once()),
        ),
        Claim::new(
            "no process exited on its own (restarts seen: 0); every exit was the lab's SIGKILL",
            runs.iter().all(|run| run.unplanned_exits == 0),
        ),
        Claim::new(
            "the surviving consumer's memory did not grow like a leak \
             (at the end, at most 1.5× its warm RSS + 16 MiB)",
            soaks.iter().all(|soak| {
                soak.process_span(Role::Consumer, survivor, |p| p.rss_kib)
                    .is_some_and(|s| {
                        (s.end as f64) <= s.warm as f64 * RSS_GROWTH_ALLOWED + RSS_SLACK_KIB as f64
                    })
            }),
        ),
        Claim::new(
            "no descriptor leak: the surviving consumer's open fds at the end at most 4 above warm",
            soaks.iter().all(|soak| {
                soak.process_span(Role::Consumer, survivor, |p| p.open_fds)
                    .is_some_and(|s| s.end <= s.warm + FD_SLACK)
            }),
        ),
        Claim::new(
            format!(
                "no process held more Postgres connections than its pool allows \
                 (consumer {}, relay {} and its LISTEN, producer {}), a killed one's leftovers counted",
                consumer::service::POOL_CONNECTIONS,
                relay::service::POOL_CONNECTIONS,
                crate::roles::PRODUCER_POOL_CONNECTIONS
            ),
            soaks.iter().all(|soak| {
                let over = soak.over_pool_limit();
                for line in &over {
                    eprintln!("over its pool: {line}");
                }
                over.is_empty()
            }),
        ),
        Claim::new(
            "the retention job kept the dedup table within one window of orders",
            soaks
                .iter()
                .all(|soak| soak.most_dedup_rows() <= soak.dedup_bound(orders_per_second)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::sample_run;

    fn sample(at_s: u64, survivor_rss: u64, survivor_pid: u32, rows: u64) -> SoakSample {
        SoakSample {
            at_s,
            processes: vec![ProcessSample {
                role: "consumer".to_owned(),
                slot: CONSUMERS - 1,
                pid: survivor_pid,
                rss_kib: survivor_rss,
                open_fds: 20,
            }],
            postgres_connections: 12,
            postgres_by_process: BTreeMap::from([
                ("consumer-2".to_owned(), 3),
                ("relay-0".to_owned(), 4),
                (String::new(), 5),
            ]),
            dedup_rows: rows,
            dedup_bytes: 8192,
        }
    }

    fn soaked(samples: Vec<SoakSample>) -> RunReport {
        let mut run = sample_run(0);
        run.audit.charges_per_order = [0, 10, 0, 0];
        run.audit.orders_committed = 10;
        run.audit.offending_orders = Vec::new();
        run.drained = true;
        run.unplanned_exits = 0;
        run.soak = Some(SoakReport {
            samples,
            kills: 3,
            retention_ms: 60_000,
            retention_deleted: 0,
            sample_every_ms: 30_000,
        });
        run
    }

    fn holding(run: RunReport) -> Vec<bool> {
        claims(&[run], 10.0).iter().map(|c| c.holds).collect()
    }

    #[test]
    fn a_steady_process_holds_every_claim_and_the_warm_sample_is_after_the_warm_up() {
        let run = soaked(vec![
            sample(0, 10_000, 7, 0),
            sample(60, 40_000, 7, 500),
            sample(600, 45_000, 7, 900),
        ]);
        assert_eq!(holding(run.clone()), [true; 6]);
        let cells = cells(&run);
        assert_eq!(cells.len(), HEADER.len());
        // Warm is the sample at 60 s, not the start-up one.
        assert_eq!(cells[6], "39 → 44");
    }

    #[test]
    fn growth_like_a_leak_or_a_table_past_its_bound_fails_its_claim() {
        let leaking = soaked(vec![sample(60, 40_000, 7, 0), sample(600, 200_000, 7, 0)]);
        assert_eq!(holding(leaking), [true, true, false, true, true, true]);
        // 10 orders/s over 60 s + 30 s is 900 rows, 990 with the margin.
        let unbounded = soaked(vec![sample(60, 40_000, 7, 0), sample(600, 40_000, 7, 5000)]);
        assert_eq!(holding(unbounded), [true, true, true, true, true, false]);
    }

    #[test]
    fn a_survivor_that_was_restarted_has_no_span_and_fails_the_memory_claim() {
        let restarted = soaked(vec![sample(60, 40_000, 7, 0), sample(600, 40_000, 8, 0)]);
        let soak = restarted.soak.clone().unwrap();
        assert_eq!(
            soak.process_span(Role::Consumer, CONSUMERS - 1, |p| p.rss_kib),
            None
        );
        assert!(!holding(restarted)[2]);
    }

    #[test]
    fn a_process_over_its_pool_fails_the_connection_claim_and_is_named() {
        let mut samples = vec![sample(60, 40_000, 7, 0), sample(600, 40_000, 7, 0)];
        // consumer-0's old connections lingering beside its restart's pool.
        samples[1]
            .postgres_by_process
            .insert("consumer-0".to_owned(), 6);
        // The lab's own pools have no limit here.
        samples[1].postgres_by_process.insert(String::new(), 40);
        let run = soaked(samples);
        assert_eq!(holding(run.clone()), [true, true, true, true, false, true]);
        let soak = run.soak.unwrap();
        assert_eq!(soak.over_pool_limit(), ["consumer-0: 6 > 4 at 600 s"]);
        let survivor = ProcessId {
            role: Role::Consumer,
            slot: CONSUMERS - 1,
        };
        assert_eq!(
            soak.process_postgres_span(survivor),
            Some(Span { warm: 3, end: 3 })
        );
    }
}
