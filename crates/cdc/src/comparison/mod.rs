//! Chapter 7's comparison: the three relays of chapter 4 and Debezium, under
//! the same load, on the same broker, measured the same way.
//!
//! For each rate and each relay, [`compare_relays`] builds a stage of its
//! own (a fresh shop database, a Kafka topic, the relay, and for Debezium a
//! Connect worker and a replication slot), places orders through the outbox
//! at a steady rate, and reads the topic from this process. Latency is the
//! reader's wall clock at the first arrival minus the outbox row's
//! `created_at` (Postgres's `clock_timestamp()` at the INSERT): one machine,
//! one clock. Every row must arrive; one that did not within the drain's
//! deadline is reported as lost.
//!
//! The shop sends a NOTIFY with its orders only when the LISTEN/NOTIFY relay
//! is the one measured (see [`ComparisonConfig::notify_for_every_relay`]).
//!
//! # Layout
//!
//! - [`load`]: the shop placing orders at a steady rate.
//! - [`arrivals`]: the reader that notes each event's first arrival.
//! - [`cost`]: what the relay costs Postgres (`pg_stat_statements`, the CPU
//!   of its backends) and the machine (the slot's lag, Connect's memory).
//! - [`stage`]: one run's database, topic, relay and worker, and their
//!   removal.
//! - [`chart`]: the latency CDF.

pub(crate) mod arrivals;
mod chart;
pub mod cost;
pub(crate) mod load;
pub(crate) mod stage;

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use relay::Wake;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use uuid::Uuid;

use crate::connector::Tuning;
use crate::{CdcError, ConnectSettings};
use arrivals::Arrivals;
use cost::{RelayStatements, Sampler, Watched};
use load::{Load, LoadSpec, OutboxWrite};
use stage::Stage;

/// The goal the issue sets for Debezium on this machine.
pub const P99_GOAL_MS: u64 = 500;
/// The rate the goal is judged at.
pub const GOAL_RATE: u32 = 2_000;

/// Between the relay's start and the baseline of a run.
const SETTLE: Duration = Duration::from_secs(2);

/// How an outbox row reaches the topic: chapter 4's relay woken three ways,
/// and Debezium (tuned; untuned for contrast, on request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RelayKind {
    /// Chapter 4's relay, polling every second.
    #[serde(rename = "poll_1s")]
    Poll1s,
    /// Chapter 4's relay, polling every 100 ms.
    #[serde(rename = "poll_100ms")]
    Poll100ms,
    /// Chapter 4's relay woken by the producer's NOTIFY.
    #[serde(rename = "notify")]
    Notify,
    /// Debezium reading the WAL through a replication slot, with the
    /// configuration's [`Tuning`].
    #[serde(rename = "debezium")]
    Debezium,
    /// The same with Debezium's own defaults (`poll.interval.ms` 500):
    /// what the tuning bought. Not in [`RelayKind::ALL`]; ask for it.
    #[serde(rename = "debezium_defaults")]
    DebeziumDefaults,
}

impl RelayKind {
    pub const ALL: [RelayKind; 4] = [
        RelayKind::Poll1s,
        RelayKind::Poll100ms,
        RelayKind::Notify,
        RelayKind::Debezium,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RelayKind::Poll1s => "poll 1 s",
            RelayKind::Poll100ms => "poll 100 ms",
            RelayKind::Notify => "LISTEN/NOTIFY",
            RelayKind::Debezium => "Debezium",
            RelayKind::DebeziumDefaults => "Debezium, untuned",
        }
    }

    /// How chapter 4's relay is woken; `None` for Debezium.
    fn wake(self) -> Option<Wake> {
        match self {
            RelayKind::Poll1s => Some(Wake::Poll {
                interval: Duration::from_secs(1),
            }),
            RelayKind::Poll100ms => Some(Wake::Poll {
                interval: Duration::from_millis(100),
            }),
            RelayKind::Notify => Some(relay::RelayConfig::default().wake),
            RelayKind::Debezium | RelayKind::DebeziumDefaults => None,
        }
    }

    /// The connector's tuning for this kind; `None` for chapter 4's relays.
    fn tuning(self, tuned: Tuning) -> Option<Tuning> {
        match self {
            RelayKind::Debezium => Some(tuned),
            RelayKind::DebeziumDefaults => Some(DEBEZIUM_DEFAULTS),
            _ => None,
        }
    }
}

/// Debezium's own defaults (`poll.interval.ms`, `max.batch.size`,
/// `max.queue.size`) and Kafka 4's producer `linger.ms`.
pub const DEBEZIUM_DEFAULTS: Tuning = Tuning {
    poll_interval: Duration::from_millis(500),
    max_batch_size: 2048,
    max_queue_size: 8192,
    producer_linger: Duration::from_millis(5),
};

/// What [`compare_relays`] runs.
#[derive(Debug, Clone)]
pub struct ComparisonConfig {
    /// Orders per second; each rate is a round of every relay.
    pub rates: Vec<u32>,
    /// The measured load of each run.
    pub duration: Duration,
    /// Load before the measured window, at the same rate: the relay's
    /// first claims and the JVM's first compilations are start-up, not
    /// steady state. Its rows must arrive too, but their latency is not
    /// counted.
    pub warmup: Duration,
    pub relays: Vec<RelayKind>,
    pub tuning: Tuning,
    /// Sessions placing orders (2,000/s needs several: each order is five
    /// round trips and a commit).
    pub load_connections: u32,
    /// How long, after the load stops, every row may take to arrive before
    /// the rest counts as lost.
    pub drain_limit: Duration,
    /// `false` (the default): the shop sends a NOTIFY with each order only
    /// when the LISTEN/NOTIFY relay runs, the one reader that needs it.
    /// Postgres commits notifying transactions one at a time (a server-wide
    /// lock held through the WAL flush), which caps the shop's rate: that
    /// cap is the LISTEN/NOTIFY relay's price, not the others'. `true`:
    /// chapter 4's `place_order`, NOTIFY included, for every relay.
    pub notify_for_every_relay: bool,
}

impl Default for ComparisonConfig {
    fn default() -> Self {
        Self {
            rates: vec![500, 2_000],
            duration: Duration::from_secs(60),
            warmup: Duration::from_secs(5),
            relays: RelayKind::ALL.to_vec(),
            tuning: Tuning::default(),
            load_connections: 16,
            drain_limit: Duration::from_secs(60),
            notify_for_every_relay: false,
        }
    }
}

impl ComparisonConfig {
    pub fn with_rates(mut self, rates: Vec<u32>) -> Self {
        self.rates = rates;
        self
    }

    pub fn with_duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    pub fn with_warmup(mut self, warmup: Duration) -> Self {
        self.warmup = warmup;
        self
    }

    pub fn with_relays(mut self, relays: Vec<RelayKind>) -> Self {
        self.relays = relays;
        self
    }

    pub fn with_tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }

    pub fn with_load_connections(mut self, connections: u32) -> Self {
        self.load_connections = connections;
        self
    }

    pub fn with_drain_limit(mut self, limit: Duration) -> Self {
        self.drain_limit = limit;
        self
    }

    pub fn with_notify_for_every_relay(mut self, notify: bool) -> Self {
        self.notify_for_every_relay = notify;
        self
    }

    fn check(&self) -> Result<(), CdcError> {
        let bad = |what: &str| Err(CdcError::Config(what.to_owned()));
        if self.rates.is_empty() || self.rates.contains(&0) {
            return bad("each rate must be at least 1 order/s, and there must be one");
        }
        if self.duration.is_zero() {
            return bad("the duration must be longer than 0");
        }
        if self.relays.is_empty() {
            return bad("there must be at least one relay to compare");
        }
        if self.load_connections == 0 {
            return bad("the load needs at least one connection");
        }
        Ok(())
    }
}

/// Connector settings as the report shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TuningReport {
    pub poll_interval_ms: u64,
    pub max_batch_size: u32,
    pub max_queue_size: u32,
    pub producer_linger_ms: u64,
}

impl From<Tuning> for TuningReport {
    fn from(tuning: Tuning) -> Self {
        Self {
            poll_interval_ms: tuning.poll_interval.as_millis() as u64,
            max_batch_size: tuning.max_batch_size,
            max_queue_size: tuning.max_queue_size,
            producer_linger_ms: tuning.producer_linger.as_millis() as u64,
        }
    }
}

/// Commit → consumer-received, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// What the relay cost Postgres over the run's window (from the load's
/// start until every row had arrived).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PostgresLoad {
    pub window_seconds: f64,
    /// The relay's statements on the shop database (the load's INSERTs,
    /// NOTIFY and transaction statements, and the lab's own, excluded).
    /// Debezium's WAL decoding is not a statement: it shows as CPU.
    pub statements: RelayStatements,
    pub queries_per_second: f64,
    pub rows_per_second: f64,
    /// utime + stime of the backends serving the relay over the window:
    /// for chapter 4's relays their pooled sessions (and NOTIFY's
    /// listener), for Debezium the walsender decoding the WAL for its slot
    /// plus its JDBC sessions. Not counted: the shop's own backends (their
    /// INSERTs, and the NOTIFY each order sends whichever relay runs), and
    /// Postgres's shared background processes (WAL writer, checkpointer).
    /// `None` when Postgres's processes are not visible (a container).
    pub backend_cpu_seconds: Option<f64>,
    /// The backends counted, as `pid (application_name or backend type):
    /// CPU s` (a LISTEN/NOTIFY relay has its claiming session and its
    /// listener).
    pub backends: Vec<String>,
    /// WAL the statements on the run's database wrote over the window
    /// (`pg_stat_statements.wal_bytes`): the shop's inserts and the
    /// relay's updates (its share is `statements.wal_bytes`).
    pub wal_bytes: i64,
    /// WAL the whole server wrote over the window (`pg_current_wal_lsn`
    /// difference): the above, commit records, and whatever else ran on
    /// the server meanwhile. What a replication slot holds back is
    /// counted in this WAL.
    pub server_wal_bytes: i64,
}

/// A process the relay needs besides the shop's and Postgres's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExtraProcess {
    pub description: String,
    pub pid: Option<u32>,
    /// The highest `VmRSS` sampled.
    pub max_rss_bytes: Option<u64>,
    /// Its CPU time over the window.
    pub cpu_seconds: Option<f64>,
}

/// One relay at one rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelayRun {
    pub relay: RelayKind,
    pub label: String,
    /// Orders per second asked for.
    pub rate: u32,
    /// Whether the shop sent a NOTIFY with each order (chapter 4's
    /// `place_order`) or not (`place_order_without_notify`).
    pub shop_notifies: bool,
    /// Orders per second committed in the measured window.
    pub achieved_rate: f64,
    /// Rows committed in the measured window (their latencies are counted).
    pub measured_events: u64,
    /// Rows committed, warm-up included.
    pub committed: u64,
    pub received: u64,
    /// Committed rows that never reached the reader within the drain.
    pub lost: u64,
    /// Records the reader got, repeats included.
    pub records: u64,
    /// Records of an event already received.
    pub resent: u64,
    /// From the load's stop until the last row arrived (or the deadline).
    pub drain_seconds: f64,
    pub latency: Option<LatencySummary>,
    /// The warm-up's rows, not in `latency`: a JVM's first seconds show
    /// here.
    pub warmup_latency: Option<LatencySummary>,
    pub postgres: PostgresLoad,
    /// The highest `pg_current_wal_lsn() - confirmed_flush_lsn` of the
    /// slot, sampled every 250 ms (Debezium only).
    pub max_slot_lag_bytes: Option<i64>,
    /// The highest `pg_stat_replication.flush_lag` of the slot's
    /// walsender, sampled with it: Debezium confirms a position only once
    /// Connect has stored its offsets (every second), so this is the
    /// offset flush's rhythm more than the delivery's.
    pub max_flush_lag_ms: Option<f64>,
    /// `None`: the relay runs in the shop's process or a relay process of
    /// its own, with nothing else to run.
    pub extra_process: Option<ExtraProcess>,
    /// Sorted latencies of the measured window, for the chart.
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
}

/// Everything [`compare_relays`] measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparisonReport {
    pub rates: Vec<u32>,
    pub duration_seconds: f64,
    pub warmup_seconds: f64,
    pub tuning: TuningReport,
    pub notify_for_every_relay: bool,
    pub runs: Vec<RelayRun>,
}

/// Runs every relay at every rate, one after another, and reports.
pub async fn compare_relays(config: &ComparisonConfig) -> Result<ComparisonReport, CdcError> {
    config.check()?;
    let settings = ConnectSettings::from_env();
    let mut runs = Vec::new();
    for (round, &rate) in config.rates.iter().enumerate() {
        for &relay in &config.relays {
            eprintln!(
                "{} at {rate} orders/s: {} s warm-up, {} s measured",
                relay.label(),
                config.warmup.as_secs(),
                config.duration.as_secs()
            );
            // The same series for every relay of a round: the same orders.
            let series = 0x0c07_0000 + round as u64;
            let run = measure_relay(config, &settings, relay, rate, series).await?;
            eprintln!(
                "  {}: p99 {}, {} lost, {:.0} orders/s achieved",
                relay.label(),
                run.latency.map_or("–".to_owned(), |l| ms(l.p99_ms)),
                run.lost,
                run.achieved_rate
            );
            runs.push(run);
        }
    }
    Ok(ComparisonReport {
        rates: config.rates.clone(),
        duration_seconds: config.duration.as_secs_f64(),
        warmup_seconds: config.warmup.as_secs_f64(),
        tuning: config.tuning.into(),
        notify_for_every_relay: config.notify_for_every_relay,
        runs,
    })
}

async fn measure_relay(
    config: &ComparisonConfig,
    settings: &ConnectSettings,
    relay: RelayKind,
    rate: u32,
    series: u64,
) -> Result<RelayRun, CdcError> {
    let mut stage = Stage::open("eo_ch07_cmp").await?;
    let outcome = measure_on(&mut stage, config, settings, relay, rate, series).await;
    let closed = stage.close(outcome.is_err()).await;
    let run = outcome?;
    closed?;
    Ok(run)
}

async fn measure_on(
    stage: &mut Stage,
    config: &ComparisonConfig,
    settings: &ConnectSettings,
    relay: RelayKind,
    rate: u32,
    series: u64,
) -> Result<RelayRun, CdcError> {
    let label = relay.label();
    let arrivals = Arrivals::start(&stage.brokers, &stage.topology.topic).await?;
    let watched = match relay.wake() {
        Some(wake) => {
            stage.start_relay(wake).await?;
            Watched {
                database: stage.db.name.clone(),
                applications: vec![stage::RELAY_APPLICATION.to_owned()],
                application_prefix: None,
                slot: None,
                process: None,
            }
        }
        None => {
            let tuning = relay.tuning(config.tuning).unwrap_or(config.tuning);
            stage.start_debezium(settings, tuning).await?;
            Watched {
                database: stage.db.name.clone(),
                applications: vec![],
                application_prefix: Some("Debezium".to_owned()),
                slot: Some(stage.slot().to_owned()),
                process: stage.worker.as_ref().and_then(|w| w.pid()),
            }
        }
    };

    // Let a freshly started JVM finish its start-up compilations before
    // anything is counted (the same pause for every relay).
    tokio::time::sleep(SETTLE).await;
    let before = cost::statements(&stage.admin, &stage.db.name).await?;
    let wal_before = crate::slot::current_wal_bytes(&stage.admin).await?;
    let sampler = Sampler::start(stage.admin.clone(), watched.clone()).await?;
    let shop_notifies = config.notify_for_every_relay || relay == RelayKind::Notify;
    let window_start = Instant::now();
    let load = Load::start(LoadSpec {
        url: stage.db.url.clone(),
        rate,
        connections: config.load_connections,
        series,
        limit: None,
        write: if shop_notifies {
            OutboxWrite::KeepAndNotify
        } else {
            OutboxWrite::Keep
        },
    })?;
    let progress = Progress::new(label, config.warmup + config.duration);
    progress
        .run_for(config.warmup, &load, &arrivals, stage)
        .await?;
    let measure_from = Utc::now();
    progress
        .run_for(config.duration, &load, &arrivals, stage)
        .await?;
    let measure_to = Utc::now();
    load.stop().await?;
    let load_stopped = Instant::now();

    let committed: i64 =
        sqlx::query_scalar(&format!("{} SELECT count(*) FROM outbox", cost::LAB_TAG))
            .fetch_one(&stage.db.pool)
            .await
            .map_err(CdcError::Postgres)?;
    let committed = committed as u64;
    let deadline = load_stopped + config.drain_limit;
    let mut last_line = Instant::now();
    while arrivals.distinct() < committed && Instant::now() < deadline {
        stage.check_relay()?;
        if last_line.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "  {label}: draining, {} of {committed} received",
                arrivals.distinct()
            );
            last_line = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_seconds = load_stopped.elapsed().as_secs_f64();
    if arrivals.distinct() < committed {
        // The rows stay counted as lost; say what Connect thinks of it.
        if let (Some(worker), Some(connector)) = (&stage.worker, &stage.connector) {
            if let Err(error) = connector.wait_running(worker, Duration::from_secs(1)).await {
                eprintln!("  {label}: {error}");
            }
        }
    }
    // The last CPU sample before any relay session ends.
    let sampled = sampler.stop().await?;
    let window = window_start.elapsed();
    let after = cost::statements(&stage.admin, &stage.db.name).await?;
    let wal_after = crate::slot::current_wal_bytes(&stage.admin).await?;
    stage.stop_relay().await?;
    let seen = arrivals.stop().await?;
    if seen.unreadable > 0 {
        eprintln!(
            "  {label}: {} records without a readable message-id header",
            seen.unreadable
        );
    }

    let rows = sqlx::query(&format!(
        "{} SELECT event_id, created_at FROM outbox",
        cost::LAB_TAG
    ))
    .fetch_all(&stage.db.pool)
    .await
    .map_err(CdcError::Postgres)?;
    let mut latencies = Vec::new();
    let mut warmup_latencies = Vec::new();
    let mut received = 0u64;
    let mut measured_events = 0u64;
    for row in &rows {
        let event_id: Uuid = row.try_get("event_id").map_err(CdcError::Postgres)?;
        let created_at: DateTime<Utc> = row.try_get("created_at").map_err(CdcError::Postgres)?;
        let measured = created_at >= measure_from && created_at < measure_to;
        measured_events += u64::from(measured);
        if let Some(at) = seen.first.get(&event_id) {
            received += 1;
            let latency = (*at - created_at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3;
            if measured {
                latencies.push(latency);
            } else if created_at < measure_from {
                warmup_latencies.push(latency);
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    warmup_latencies.sort_by(f64::total_cmp);
    let measured_seconds = (measure_to - measure_from).num_microseconds().unwrap_or(1) as f64 / 1e6;
    let statements = cost::relay_share(&before, &after);
    let window_seconds = window.as_secs_f64();
    Ok(RelayRun {
        relay,
        label: label.to_owned(),
        rate,
        shop_notifies,
        achieved_rate: measured_events as f64 / measured_seconds,
        measured_events,
        committed: rows.len() as u64,
        received,
        lost: rows.len() as u64 - received,
        records: seen.records,
        resent: seen.records - seen.first.len() as u64 - seen.unreadable,
        drain_seconds,
        latency: summary(&latencies),
        warmup_latency: summary(&warmup_latencies),
        postgres: PostgresLoad {
            window_seconds,
            queries_per_second: statements.calls as f64 / window_seconds,
            rows_per_second: statements.rows as f64 / window_seconds,
            statements,
            backend_cpu_seconds: sampled.backend_cpu_seconds,
            backends: sampled.backends,
            wal_bytes: cost::database_wal_bytes(&before, &after),
            server_wal_bytes: wal_after - wal_before,
        },
        max_slot_lag_bytes: sampled.max_slot_lag_bytes,
        max_flush_lag_ms: sampled.max_flush_lag_ms,
        extra_process: watched.process.map(|pid| ExtraProcess {
            description: "Kafka Connect worker (JVM) with Debezium".to_owned(),
            pid: Some(pid),
            max_rss_bytes: sampled.max_process_rss_bytes,
            cpu_seconds: sampled.process_cpu_seconds,
        }),
        latencies_ms: latencies,
    })
}

fn summary(sorted: &[f64]) -> Option<LatencySummary> {
    Some(LatencySummary {
        p50_ms: telemetry::nearest_rank(sorted, 0.50)?,
        p99_ms: telemetry::nearest_rank(sorted, 0.99)?,
        max_ms: *sorted.last()?,
    })
}

/// One line on stderr every few seconds while the load runs.
struct Progress {
    label: &'static str,
    total: Duration,
    started: Instant,
}

impl Progress {
    fn new(label: &'static str, total: Duration) -> Self {
        Self {
            label,
            total,
            started: Instant::now(),
        }
    }

    /// Lets the load run for `span`, checking that the relay and the load
    /// are still alive.
    async fn run_for(
        &self,
        span: Duration,
        load: &Load,
        arrivals: &Arrivals,
        stage: &Stage,
    ) -> Result<(), CdcError> {
        let until = Instant::now() + span;
        let mut next_line =
            self.started + Duration::from_secs(5 * (self.started.elapsed().as_secs() / 5 + 1));
        while Instant::now() < until {
            stage.check_relay()?;
            if load.is_finished() {
                return Err(CdcError::Measurement(
                    "the load stopped early (its error follows at the stop)".into(),
                ));
            }
            if Instant::now() >= next_line {
                eprintln!(
                    "  {}: {:>3} s of {}, {} committed, {} received",
                    self.label,
                    self.started.elapsed().as_secs(),
                    self.total.as_secs(),
                    load.committed(),
                    arrivals.distinct()
                );
                next_line += Duration::from_secs(5);
            }
            tokio::time::sleep(
                until
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(200)),
            )
            .await;
        }
        Ok(())
    }
}

impl ComparisonReport {
    /// The run of `relay` at `rate`.
    pub fn run(&self, relay: RelayKind, rate: u32) -> Option<&RelayRun> {
        self.runs
            .iter()
            .find(|r| r.relay == relay && r.rate == rate)
    }

    /// p99 of `relay` at `rate`, whole milliseconds rounded up.
    pub fn p99_ms(&self, relay: RelayKind, rate: u32) -> Option<u64> {
        self.run(relay, rate)?
            .latency
            .map(|l| l.p99_ms.ceil() as u64)
    }

    pub fn debezium_p99_ms(&self, rate: u32) -> Option<u64> {
        self.p99_ms(RelayKind::Debezium, rate)
    }

    /// Rows that never arrived, over every run.
    pub fn lost(&self) -> u64 {
        self.runs.iter().map(|r| r.lost).sum()
    }

    /// Records sent again, over every run.
    pub fn resent(&self) -> u64 {
        self.runs.iter().map(|r| r.resent).sum()
    }

    pub fn highest_rate(&self) -> Option<u32> {
        self.rates.iter().copied().max()
    }

    /// The rate the goal is judged at: 2,000/s, or the highest rate run
    /// when 2,000/s was not.
    pub fn goal_rate(&self) -> Option<u32> {
        if self.rates.contains(&GOAL_RATE) {
            Some(GOAL_RATE)
        } else {
            self.highest_rate()
        }
    }

    /// Whether Debezium's p99 at the goal rate is under 500 ms, with
    /// nothing lost; `None` when Debezium did not run there.
    pub fn debezium_goal_met(&self) -> Option<bool> {
        let rate = self.goal_rate()?;
        let run = self.run(RelayKind::Debezium, rate)?;
        Some(run.lost == 0 && run.latency.is_some_and(|l| l.p99_ms < P99_GOAL_MS as f64))
    }

    /// The comparison as a Markdown table, a goal line and the notes the
    /// table's numbers need.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "| relay | rate /s | achieved /s | p50 | p99 | max | lost | resent \
             | relay queries/s | relay rows/s | relay PG CPU s | WAL MiB (relay's) | max slot lag \
             | extra process |\n",
        );
        out.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n");
        for run in &self.runs {
            let (p50, p99, max) = run
                .latency
                .map_or(("–".into(), "–".into(), "–".into()), |l| {
                    (ms(l.p50_ms), ms(l.p99_ms), ms(l.max_ms))
                });
            out.push_str(&format!(
                "| {} | {} | {:.0} | {p50} | {p99} | {max} | {} | {} | {:.1} | {:.0} | {} | {:.1} ({:.1}) | {} | {} |\n",
                run.label,
                thousands(u64::from(run.rate)),
                run.achieved_rate,
                run.lost,
                run.resent,
                run.postgres.queries_per_second,
                run.postgres.rows_per_second,
                run.postgres
                    .backend_cpu_seconds
                    .map_or("n/a".to_owned(), |s| format!("{s:.1}")),
                mib(run.postgres.wal_bytes),
                mib(run.postgres.statements.wal_bytes),
                match (run.max_slot_lag_bytes, run.max_flush_lag_ms) {
                    (Some(bytes), Some(lag)) => format!("{:.1} MiB, {}", mib(bytes), ms(lag)),
                    (Some(bytes), None) => format!("{:.1} MiB", mib(bytes)),
                    _ => "–".to_owned(),
                },
                match &run.extra_process {
                    Some(extra) => format!(
                        "Connect JVM: {} RSS, {} CPU s",
                        extra
                            .max_rss_bytes
                            .map_or("n/a".to_owned(), |b| format!("{:.0} MiB", mib(b as i64))),
                        extra
                            .cpu_seconds
                            .map_or("n/a".to_owned(), |s| format!("{s:.1}")),
                    ),
                    None => "none (in the shop's process or a relay process)".to_owned(),
                },
            ));
        }
        out.push('\n');
        if let Some(rate) = self.goal_rate() {
            let measured = self.debezium_p99_ms(rate);
            let verdict = match self.debezium_goal_met() {
                Some(true) => "PASS",
                _ => "MISS",
            };
            out.push_str(&format!(
                "Debezium p99 at {}/s: {} (goal < {P99_GOAL_MS} ms, nothing lost): {verdict}\n\n",
                thousands(u64::from(rate)),
                measured.map_or("not measured".to_owned(), |p| format!("{p} ms")),
            ));
        }
        let notify = if self.notify_for_every_relay {
            "The shop sent a NOTIFY with every order (chapter 4's `place_order`), whichever \
             relay ran."
        } else {
            "The shop sent a NOTIFY with each order only for the LISTEN/NOTIFY relay \
             (`place_order`); the others got the same rows without it \
             (`place_order_without_notify`): Postgres commits notifying transactions one at \
             a time, so the NOTIFY's cap on the shop's rate is that relay's price."
        };
        out.push_str(&format!(
            "Each run: {} s of orders after {} s of warm-up at the same rate, on a fresh \
             database and topic. Latency: outbox row `created_at` → first arrival at a \
             `read_committed` Kafka reader. Relay queries and rows: `pg_stat_statements` \
             of the run's database minus the shop's own statements, over the load and \
             the drain. PG CPU: utime + stime of the backends serving the relay (its \
             pooled sessions; for Debezium the walsender decoding the WAL and its JDBC \
             sessions), not the shop's backends nor Postgres's background processes. WAL: \
             written by the statements on the run's database (`pg_stat_statements`: the \
             shop's inserts and the relay's updates), in brackets the relay's share. Max slot \
             lag: `pg_current_wal_lsn() - confirmed_flush_lsn` (WAL of the whole server, \
             other databases included) and the walsender's `flush_lag`, sampled every 250 ms; \
             Debezium confirms a position once Connect has stored its offsets (every second). \
             {} Debezium tuning: poll.interval.ms {}, \
             max.batch.size {}, max.queue.size {}, producer linger.ms {}.\n",
            self.duration_seconds,
            self.warmup_seconds,
            notify,
            self.tuning.poll_interval_ms,
            self.tuning.max_batch_size,
            self.tuning.max_queue_size,
            self.tuning.producer_linger_ms,
        ));
        if self
            .runs
            .iter()
            .any(|r| r.relay == RelayKind::DebeziumDefaults)
        {
            let d = TuningReport::from(DEBEZIUM_DEFAULTS);
            out.push_str(&format!(
                "Debezium, untuned: Debezium's defaults, poll.interval.ms {}, max.batch.size {}, \
                 max.queue.size {}, producer linger.ms {}.\n",
                d.poll_interval_ms, d.max_batch_size, d.max_queue_size, d.producer_linger_ms,
            ));
        }
        out
    }

    /// An SVG of the latency CDF of every relay at the highest rate.
    pub fn write_cdf_chart(&self, path: &Path) -> Result<(), CdcError> {
        let rate = self
            .highest_rate()
            .ok_or_else(|| CdcError::Chart("no run to chart".into()))?;
        let series: Vec<(&str, &[f64])> = self
            .runs
            .iter()
            .filter(|r| r.rate == rate)
            .map(|r| (r.label.as_str(), r.latencies_ms.as_slice()))
            .collect();
        chart::draw_cdf(
            path,
            &format!(
                "Outbox → Kafka reader at {} orders/s",
                thousands(u64::from(rate))
            ),
            &series,
        )
    }
}

pub(crate) fn ms(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.1} ms")
    } else if value < 10_000.0 {
        format!("{value:.0} ms")
    } else {
        format!("{:.1} s", value / 1e3)
    }
}

pub(crate) fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(2000), "2,000");
        assert_eq!(thousands(500), "500");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn a_config_without_rates_is_refused() {
        assert!(ComparisonConfig::default()
            .with_rates(vec![])
            .check()
            .is_err());
        assert!(ComparisonConfig::default().check().is_ok());
    }
}
