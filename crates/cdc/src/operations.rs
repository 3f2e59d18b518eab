//! Chapter 7's operational load, measured: what CDC asks of the people who
//! run it.
//!
//! - [`measure_outage`]: Connect down for a minute while the shop keeps
//!   writing: the WAL the slot holds back, the catch-up after the restart,
//!   and that nothing was lost.
//! - [`measure_abandoned_slot`]: a slot nobody reads holds back WAL without
//!   end; `max_slot_wal_keep_size` is the guard, and what it costs when it
//!   fires (the slot is invalidated: its reader can never resume).
//! - [`measure_outbox_cleanup`]: with CDC the outbox row may be deleted in
//!   the transaction that wrote it, since the WAL carries it: the table's
//!   size against chapter 4's, which keeps its sent rows until a cleanup.
//!
//! Each part has its own database, topic, slot and Connect worker, removed
//! at the end whether or not it worked; the slot guard's server setting is
//! reset even when the part fails.

use std::time::{Duration, Instant};

use databases::FreshDatabase;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::comparison::arrivals::Arrivals;
use crate::comparison::cost::LAB_TAG;
use crate::comparison::load::{Load, LoadSpec, OutboxWrite};
use crate::comparison::stage::Stage;
use crate::comparison::{mib, thousands};
use crate::connector::Tuning;
use crate::{CdcError, ConnectSettings};

/// The goal for the catch-up after a minute of Connect being down.
pub const CATCH_UP_GOAL: Duration = Duration::from_secs(30);

/// What [`measure_operations`] runs.
#[derive(Debug, Clone)]
pub struct OperationsConfig {
    /// Orders per second while Connect is down (and around it).
    pub rate: u32,
    /// How long Connect stays down.
    pub outage: Duration,
    /// Steady writing, with Connect up, before the kill.
    pub before_outage: Duration,
    /// How long the catch-up may take before the rest counts as lost.
    pub catch_up_limit: Duration,
    pub tuning: Tuning,
    pub load_connections: u32,
    /// WAL written between two samples of the abandoned slot.
    pub abandoned_step_bytes: u64,
    /// Samples of the abandoned slot before the guard is set.
    pub abandoned_steps: u32,
    /// `max_slot_wal_keep_size` while the guard is demonstrated, in MiB.
    pub slot_guard_mib: u64,
    /// Orders through each outbox write of the cleanup comparison.
    pub cleanup_orders: u64,
    /// Orders per second of the cleanup comparison.
    pub cleanup_rate: u32,
}

impl Default for OperationsConfig {
    fn default() -> Self {
        Self {
            rate: 500,
            outage: Duration::from_secs(60),
            before_outage: Duration::from_secs(5),
            catch_up_limit: Duration::from_secs(120),
            tuning: Tuning::default(),
            load_connections: 8,
            abandoned_step_bytes: 32 * 1024 * 1024,
            abandoned_steps: 4,
            slot_guard_mib: 64,
            cleanup_orders: 20_000,
            cleanup_rate: 1_000,
        }
    }
}

impl OperationsConfig {
    pub fn with_rate(mut self, rate: u32) -> Self {
        self.rate = rate;
        self
    }

    pub fn with_outage(mut self, outage: Duration) -> Self {
        self.outage = outage;
        self
    }

    pub fn with_before_outage(mut self, before: Duration) -> Self {
        self.before_outage = before;
        self
    }

    pub fn with_catch_up_limit(mut self, limit: Duration) -> Self {
        self.catch_up_limit = limit;
        self
    }

    pub fn with_tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }

    pub fn with_abandoned_slot(mut self, step_bytes: u64, steps: u32, guard_mib: u64) -> Self {
        self.abandoned_step_bytes = step_bytes;
        self.abandoned_steps = steps;
        self.slot_guard_mib = guard_mib;
        self
    }

    pub fn with_cleanup_orders(mut self, orders: u64) -> Self {
        self.cleanup_orders = orders;
        self
    }

    pub fn with_cleanup_rate(mut self, rate: u32) -> Self {
        self.cleanup_rate = rate;
        self
    }

    fn check(&self) -> Result<(), CdcError> {
        let bad = |what: &str| Err(CdcError::Config(what.to_owned()));
        if self.rate == 0 || self.cleanup_rate == 0 {
            return bad("rates must be at least 1 order/s");
        }
        if self.cleanup_orders == 0 {
            return bad("the cleanup comparison needs at least one order");
        }
        if self.abandoned_steps == 0 || self.abandoned_step_bytes == 0 {
            return bad("the abandoned slot needs at least one step of WAL");
        }
        if self.slot_guard_mib == 0 {
            return bad("max_slot_wal_keep_size 0 would invalidate every slot at once");
        }
        if self.load_connections == 0 {
            return bad("the load needs at least one connection");
        }
        Ok(())
    }
}

/// Everything [`measure_operations`] measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OperationsReport {
    pub outage: OutageRun,
    pub abandoned_slot: AbandonedSlot,
    pub cleanup: Vec<CleanupRun>,
}

/// Runs the three parts one after another.
pub async fn measure_operations(config: &OperationsConfig) -> Result<OperationsReport, CdcError> {
    config.check()?;
    let settings = ConnectSettings::from_env();
    let outage = measure_outage(config, &settings).await?;
    let abandoned_slot = measure_abandoned_slot(config).await?;
    let cleanup = measure_outbox_cleanup(config, &settings).await?;
    Ok(OperationsReport {
        outage,
        abandoned_slot,
        cleanup,
    })
}

// ---------------------------------------------------------------------------
// (a) Connect down

/// Connect killed for a while, the shop writing all along.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutageRun {
    pub rate: u32,
    pub outage_seconds: f64,
    /// Orders committed while Connect was down.
    pub written_while_down: u64,
    /// The slot's retained WAL over the outage: (seconds since the kill,
    /// bytes), a few points.
    pub retained_over_time: Vec<(f64, i64)>,
    /// WAL Postgres kept for the slot at the end of the outage.
    pub retained_bytes: i64,
    /// The slot's `wal_status` then.
    pub wal_status: String,
    /// Restart → Connect's REST API answers.
    pub restart_to_serving_seconds: f64,
    /// Restart → every row committed before the restart had reached the
    /// reader (the shop still writing meanwhile). `None`: not within the
    /// limit.
    pub catch_up_seconds: Option<f64>,
    /// Rows committed, over the whole run.
    pub committed: u64,
    pub lost: u64,
    /// Records and distinct events on the topic (`cdc::topic::count`).
    pub records: u64,
    pub distinct_events: u64,
    /// Records Debezium sent again after the restart (from its last
    /// stored offset).
    pub resent: u64,
}

pub async fn measure_outage(
    config: &OperationsConfig,
    settings: &ConnectSettings,
) -> Result<OutageRun, CdcError> {
    eprintln!(
        "Connect down for {} s at {} orders/s",
        config.outage.as_secs(),
        config.rate
    );
    let mut stage = Stage::open("eo_ch07_down").await?;
    let outcome = outage_on(&mut stage, config, settings).await;
    let closed = stage.close(outcome.is_err()).await;
    let run = outcome?;
    closed?;
    Ok(run)
}

async fn outage_on(
    stage: &mut Stage,
    config: &OperationsConfig,
    settings: &ConnectSettings,
) -> Result<OutageRun, CdcError> {
    let arrivals = Arrivals::start(&stage.brokers, &stage.topology.topic).await?;
    stage.start_debezium(settings, config.tuning).await?;
    let load = Load::start(LoadSpec {
        url: stage.db.url.clone(),
        rate: config.rate,
        connections: config.load_connections,
        series: 0x0c07_0a00,
        limit: None,
        write: OutboxWrite::Keep,
    })?;
    sleep_while_loading(config.before_outage, &load).await?;
    eprintln!(
        "  {} committed, {} received; killing Connect (SIGKILL)",
        load.committed(),
        arrivals.distinct()
    );
    let worker = stage
        .worker
        .as_mut()
        .ok_or_else(|| CdcError::Measurement("no Connect worker".into()))?;
    worker.kill().await?;
    let killed = Instant::now();
    let committed_at_kill = load.committed();

    let mut retained_over_time = Vec::new();
    let mut next_sample = Duration::ZERO;
    while killed.elapsed() < config.outage {
        if load.is_finished() {
            return Err(CdcError::Measurement("the load stopped early".into()));
        }
        if killed.elapsed() >= next_sample {
            let state = crate::slot::state(&stage.admin, stage.slot()).await?;
            let retained = state.map_or(0, |s| s.retained_bytes);
            retained_over_time.push((killed.elapsed().as_secs_f64(), retained));
            eprintln!(
                "  Connect down {:>3} s: the slot holds {:.1} MiB of WAL, {} orders written since",
                killed.elapsed().as_secs(),
                mib(retained),
                load.committed() - committed_at_kill
            );
            next_sample += Duration::from_secs(5);
        }
        let left = config.outage.saturating_sub(killed.elapsed());
        tokio::time::sleep(left.min(Duration::from_millis(200))).await;
    }
    let state = crate::slot::state(&stage.admin, stage.slot())
        .await?
        .ok_or_else(|| CdcError::Measurement("the slot disappeared during the outage".into()))?;
    retained_over_time.push((killed.elapsed().as_secs_f64(), state.retained_bytes));
    let written_while_down = load.committed() - committed_at_kill;
    let before_restart = event_ids(&stage.db.pool).await?;

    eprintln!(
        "  restarting Connect: {} rows to catch up, {:.1} MiB of WAL held",
        before_restart.len() as u64 - arrivals.distinct().min(before_restart.len() as u64),
        mib(state.retained_bytes)
    );
    let restarted = Instant::now();
    let worker = stage
        .worker
        .as_mut()
        .ok_or_else(|| CdcError::Measurement("no Connect worker".into()))?;
    worker.restart().await?;
    let restart_to_serving_seconds = restarted.elapsed().as_secs_f64();
    let mut catch_up_seconds = None;
    let mut last_line = Instant::now();
    while restarted.elapsed() < config.catch_up_limit {
        let missing = arrivals.missing(&before_restart);
        if missing == 0 {
            catch_up_seconds = Some(restarted.elapsed().as_secs_f64());
            break;
        }
        if last_line.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "  {:>3} s after the restart: {missing} rows still to arrive",
                restarted.elapsed().as_secs()
            );
            last_line = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match catch_up_seconds {
        Some(seconds) => eprintln!("  caught up {seconds:.1} s after the restart"),
        None => eprintln!(
            "  not caught up within {} s",
            config.catch_up_limit.as_secs()
        ),
    }
    // A little steady state after the catch-up, then the rest must arrive.
    sleep_while_loading(Duration::from_secs(2), &load).await?;
    load.stop().await?;
    let all = event_ids(&stage.db.pool).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrivals.missing(&all) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lost = arrivals.missing(&all) as u64;
    let seen = arrivals.stop().await?;
    let count = crate::topic::count(&stage.brokers, &stage.topology.topic).await?;
    if seen.unreadable > 0 {
        return Err(CdcError::Measurement(format!(
            "{} records without an event id",
            seen.unreadable
        )));
    }
    Ok(OutageRun {
        rate: config.rate,
        outage_seconds: config.outage.as_secs_f64(),
        written_while_down,
        retained_over_time,
        retained_bytes: state.retained_bytes,
        wal_status: state.wal_status,
        restart_to_serving_seconds,
        catch_up_seconds,
        committed: all.len() as u64,
        lost,
        records: count.records,
        distinct_events: count.distinct_events,
        resent: count.resent(),
    })
}

async fn sleep_while_loading(span: Duration, load: &Load) -> Result<(), CdcError> {
    let until = Instant::now() + span;
    while Instant::now() < until {
        if load.is_finished() {
            return Err(CdcError::Measurement("the load stopped early".into()));
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

async fn event_ids(pool: &PgPool) -> Result<Vec<Uuid>, CdcError> {
    sqlx::query_scalar(&format!("{LAB_TAG} SELECT event_id FROM outbox"))
        .fetch_all(pool)
        .await
        .map_err(CdcError::Postgres)
}

// ---------------------------------------------------------------------------
// (b) The abandoned slot

/// One sample of a slot nobody reads.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotPoint {
    /// WAL the server wrote since the slot was created.
    pub written_bytes: i64,
    /// WAL Postgres keeps for the slot.
    pub retained_bytes: i64,
    pub wal_status: String,
}

/// A slot nobody reads, then `max_slot_wal_keep_size` as the guard.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AbandonedSlot {
    /// The retained WAL growing while nothing reads the slot.
    pub growing: Vec<SlotPoint>,
    /// The guard that was set, MiB.
    pub guard_mib: u64,
    /// Right after the guard was set (before a checkpoint).
    pub after_guard: SlotPoint,
    /// After more WAL than the guard and a CHECKPOINT.
    pub after_checkpoint: SlotPoint,
    /// `wal_status = 'lost'`: Postgres removed WAL the slot still needed.
    pub invalidated: bool,
    /// Rows the slot's reader can never get from it: everything written
    /// since its last confirmed position (here, since it was created).
    pub rows_beyond_reach: i64,
    /// What a reader gets when it asks the invalidated slot for changes.
    pub reader_error: Option<String>,
    /// `max_slot_wal_keep_size` before the part and after its reset.
    pub setting_before: String,
    pub setting_after: String,
}

pub async fn measure_abandoned_slot(config: &OperationsConfig) -> Result<AbandonedSlot, CdcError> {
    eprintln!("The abandoned slot");
    let db = FreshDatabase::create("eo_ch07_slot", 2).await?;
    let admin = databases::connect(&databases::admin_url(), 2).await?;
    let outcome = abandoned_slot_on(&db, &admin, config).await;
    // Whatever happened: the guard off again, the slot gone, then the
    // database (a slot keeps its database from being dropped).
    let restored = restore_guard(&admin).await;
    let dropped = crate::slot::drop_slots_of_database(&admin, &db.name).await;
    admin.close().await;
    let database = db.drop_database().await.map_err(CdcError::from);
    let mut report = outcome?;
    report.setting_after = restored?;
    dropped?;
    database?;
    eprintln!("  max_slot_wal_keep_size reset to {}", report.setting_after);
    Ok(report)
}

async fn abandoned_slot_on(
    db: &FreshDatabase,
    admin: &PgPool,
    config: &OperationsConfig,
) -> Result<AbandonedSlot, CdcError> {
    let slot = db.name.as_str();
    let setting_before = keep_size(admin).await?;
    if setting_before != "-1" {
        // Someone (or an interrupted run) left a guard on: the numbers
        // below would not show an unguarded slot.
        return Err(CdcError::Measurement(format!(
            "max_slot_wal_keep_size is already {setting_before}; reset it first \
             (ALTER SYSTEM RESET max_slot_wal_keep_size; SELECT pg_reload_conf())"
        )));
    }
    sqlx::raw_sql("CREATE TABLE padding (id bigserial PRIMARY KEY, pad text NOT NULL)")
        .execute(&db.pool)
        .await
        .map_err(CdcError::Postgres)?;
    // Identifiers cannot be parameters; the name is the database's, which
    // `FreshDatabase` makes from [a-z0-9_] only.
    sqlx::raw_sql(&format!("CREATE PUBLICATION {slot} FOR TABLE padding"))
        .execute(&db.pool)
        .await
        .map_err(CdcError::Postgres)?;
    // A logical slot belongs to the database it is created in.
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(slot)
        .execute(&db.pool)
        .await
        .map_err(CdcError::Postgres)?;
    let created_at = crate::slot::current_wal_bytes(admin).await?;
    let point = |written: i64, state: Option<crate::slot::SlotState>| SlotPoint {
        written_bytes: written,
        retained_bytes: state.as_ref().map_or(0, |s| s.retained_bytes),
        wal_status: state.map_or("gone".to_owned(), |s| s.wal_status),
    };
    let mut growing = vec![point(0, crate::slot::state(admin, slot).await?)];
    for _ in 0..config.abandoned_steps {
        write_wal(&db.pool, admin, config.abandoned_step_bytes as i64).await?;
        let written = crate::slot::current_wal_bytes(admin).await? - created_at;
        let sample = point(written, crate::slot::state(admin, slot).await?);
        eprintln!(
            "  {:.0} MiB written, nobody reading: the slot holds {:.0} MiB ({})",
            mib(sample.written_bytes),
            mib(sample.retained_bytes),
            sample.wal_status
        );
        growing.push(sample);
    }

    eprintln!(
        "  ALTER SYSTEM SET max_slot_wal_keep_size = '{}MB'",
        config.slot_guard_mib
    );
    // A number we formatted ourselves: no quoting to break out of.
    sqlx::raw_sql(&format!(
        "ALTER SYSTEM SET max_slot_wal_keep_size = '{}MB'",
        config.slot_guard_mib
    ))
    .execute(admin)
    .await
    .map_err(CdcError::Postgres)?;
    reload_until(admin, &format!("{}MB", config.slot_guard_mib)).await?;
    let written = crate::slot::current_wal_bytes(admin).await? - created_at;
    let after_guard = point(written, crate::slot::state(admin, slot).await?);
    eprintln!(
        "  guard set: the slot is {} ({:.0} MiB held)",
        after_guard.wal_status,
        mib(after_guard.retained_bytes)
    );
    write_wal(
        &db.pool,
        admin,
        (config.slot_guard_mib as i64 + 16) * 1024 * 1024,
    )
    .await?;
    sqlx::raw_sql("CHECKPOINT")
        .execute(admin)
        .await
        .map_err(CdcError::Postgres)?;
    let written = crate::slot::current_wal_bytes(admin).await? - created_at;
    let after_checkpoint = point(written, crate::slot::state(admin, slot).await?);
    let invalidated = after_checkpoint.wal_status == "lost";
    eprintln!(
        "  after CHECKPOINT: the slot is {} ({:.0} MiB held)",
        after_checkpoint.wal_status,
        mib(after_checkpoint.retained_bytes)
    );
    // What the slot's reader would get now.
    let reader_error = sqlx::query(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
         'proto_version', '1', 'publication_names', $1)",
    )
    .bind(slot)
    .execute(&db.pool)
    .await
    .err()
    .map(|error| {
        let postgres = error
            .as_database_error()
            .and_then(|e| e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>());
        match postgres {
            Some(e) => match e.detail() {
                Some(detail) => format!("{} ({detail})", e.message()),
                None => e.message().to_owned(),
            },
            None => error.to_string(),
        }
    });
    let rows_beyond_reach: i64 =
        sqlx::query_scalar(&format!("{LAB_TAG} SELECT count(*) FROM padding"))
            .fetch_one(&db.pool)
            .await
            .map_err(CdcError::Postgres)?;
    Ok(AbandonedSlot {
        growing,
        guard_mib: config.slot_guard_mib,
        after_guard,
        after_checkpoint,
        invalidated,
        rows_beyond_reach,
        reader_error,
        setting_before,
        setting_after: String::new(),
    })
}

/// Inserts padded rows until the server's WAL position moved `bytes`.
async fn write_wal(pool: &PgPool, admin: &PgPool, bytes: i64) -> Result<(), CdcError> {
    let start = crate::slot::current_wal_bytes(admin).await?;
    while crate::slot::current_wal_bytes(admin).await? - start < bytes {
        // About 8 MiB of WAL: 1 KiB of text per row, under the size at
        // which Postgres would compress it.
        sqlx::query(
            "INSERT INTO padding (pad) SELECT repeat(md5(g::text || random()::text), 32) \
             FROM generate_series(1, $1) AS g",
        )
        .bind(7_000_i32)
        .execute(pool)
        .await
        .map_err(CdcError::Postgres)?;
    }
    Ok(())
}

async fn keep_size(admin: &PgPool) -> Result<String, CdcError> {
    sqlx::query_scalar("SELECT current_setting('max_slot_wal_keep_size')")
        .fetch_one(admin)
        .await
        .map_err(CdcError::Postgres)
}

/// Reloads the configuration and waits until a new session sees `wanted`
/// (sessions take a reload at their next statement, the postmaster first).
async fn reload_until(admin: &PgPool, wanted: &str) -> Result<(), CdcError> {
    sqlx::query("SELECT pg_reload_conf()")
        .execute(admin)
        .await
        .map_err(CdcError::Postgres)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = keep_size(admin).await?;
        if seen == wanted {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CdcError::Measurement(format!(
                "max_slot_wal_keep_size is {seen}, not {wanted}, 10 s after the reload"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `ALTER SYSTEM RESET max_slot_wal_keep_size` and a reload; returns the
/// setting afterwards.
async fn restore_guard(admin: &PgPool) -> Result<String, CdcError> {
    sqlx::raw_sql("ALTER SYSTEM RESET max_slot_wal_keep_size")
        .execute(admin)
        .await
        .map_err(CdcError::Postgres)?;
    reload_until(admin, "-1").await?;
    keep_size(admin).await
}

// ---------------------------------------------------------------------------
// (c) Outbox cleanup under CDC

/// How the outbox row is written, and who reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CleanupVariant {
    /// Chapter 4: the shop writes with `place_order` (row and NOTIFY), the
    /// NOTIFY relay marks rows sent; they stay until the cleanup job
    /// deletes them.
    RelayKeepsSentRows,
    /// Chapter 7: Debezium reads the WAL; the shop deletes the row in the
    /// transaction that wrote it (`place_order_without_notify` with
    /// `RowAfterCommit::Deleted`).
    CdcDeletesAtOnce,
}

impl CleanupVariant {
    pub fn label(self) -> &'static str {
        match self {
            CleanupVariant::RelayKeepsSentRows => "ch04 relay, sent rows kept",
            CleanupVariant::CdcDeletesAtOnce => "CDC, row deleted in its transaction",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CleanupRun {
    pub variant: CleanupVariant,
    pub orders: u64,
    /// Distinct events and records on the topic.
    pub events_on_topic: u64,
    pub records_on_topic: u64,
    /// Orders whose event is not on the topic.
    pub lost: u64,
    pub outbox_rows_left: i64,
    /// `pg_total_relation_size('outbox')`: table, indexes and TOAST.
    pub outbox_bytes: i64,
    /// Of which the table itself (`pg_relation_size`) and its indexes.
    pub outbox_table_bytes: i64,
    pub outbox_index_bytes: i64,
    /// The same after a plain `VACUUM outbox` (what autovacuum does).
    pub outbox_bytes_after_vacuum: i64,
    pub outbox_table_bytes_after_vacuum: i64,
}

pub async fn measure_outbox_cleanup(
    config: &OperationsConfig,
    settings: &ConnectSettings,
) -> Result<Vec<CleanupRun>, CdcError> {
    let mut runs = Vec::new();
    for variant in [
        CleanupVariant::RelayKeepsSentRows,
        CleanupVariant::CdcDeletesAtOnce,
    ] {
        eprintln!(
            "Outbox size: {} orders, {}",
            thousands(config.cleanup_orders),
            variant.label()
        );
        let mut stage = Stage::open("eo_ch07_size").await?;
        let outcome = cleanup_on(&mut stage, config, settings, variant).await;
        let closed = stage.close(outcome.is_err()).await;
        runs.push(outcome?);
        closed?;
    }
    Ok(runs)
}

async fn cleanup_on(
    stage: &mut Stage,
    config: &OperationsConfig,
    settings: &ConnectSettings,
    variant: CleanupVariant,
) -> Result<CleanupRun, CdcError> {
    let arrivals = Arrivals::start(&stage.brokers, &stage.topology.topic).await?;
    let write = match variant {
        CleanupVariant::RelayKeepsSentRows => {
            stage
                .start_relay(relay::RelayConfig::default().wake)
                .await?;
            OutboxWrite::KeepAndNotify
        }
        CleanupVariant::CdcDeletesAtOnce => {
            stage.start_debezium(settings, config.tuning).await?;
            OutboxWrite::Forget
        }
    };
    let load = Load::start(LoadSpec {
        url: stage.db.url.clone(),
        rate: config.cleanup_rate,
        connections: config.load_connections,
        series: 0x0c07_0c00,
        limit: Some(config.cleanup_orders),
        write,
    })?;
    let mut last_line = Instant::now();
    while !load.is_finished() {
        stage.check_relay()?;
        if last_line.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "  {} committed, {} received",
                load.committed(),
                arrivals.distinct()
            );
            last_line = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let orders = load.stop().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrivals.distinct() < orders && Instant::now() < deadline {
        stage.check_relay()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stage.stop_relay().await?;
    arrivals.stop().await?;
    let count = crate::topic::count(&stage.brokers, &stage.topology.topic).await?;
    let pool = &stage.db.pool;
    let (outbox_bytes, outbox_table_bytes, outbox_index_bytes) = outbox_size(pool).await?;
    let outbox_rows_left: i64 =
        sqlx::query_scalar(&format!("{LAB_TAG} SELECT count(*) FROM outbox"))
            .fetch_one(pool)
            .await
            .map_err(CdcError::Postgres)?;
    sqlx::raw_sql("VACUUM outbox")
        .execute(pool)
        .await
        .map_err(CdcError::Postgres)?;
    let (outbox_bytes_after_vacuum, outbox_table_bytes_after_vacuum, _) = outbox_size(pool).await?;
    // Orders with their event on the topic: every order's event is its
    // only record there, so the distinct count is the delivered count.
    let orders_committed: i64 =
        sqlx::query_scalar(&format!("{LAB_TAG} SELECT count(*) FROM orders"))
            .fetch_one(pool)
            .await
            .map_err(CdcError::Postgres)?;
    let run = CleanupRun {
        variant,
        orders: orders_committed as u64,
        events_on_topic: count.distinct_events,
        records_on_topic: count.records,
        lost: (orders_committed as u64).saturating_sub(count.distinct_events),
        outbox_rows_left,
        outbox_bytes,
        outbox_table_bytes,
        outbox_index_bytes,
        outbox_bytes_after_vacuum,
        outbox_table_bytes_after_vacuum,
    };
    eprintln!(
        "  outbox {:.1} MiB ({} rows), {:.1} MiB after VACUUM; {} of {} events on the topic",
        mib(run.outbox_bytes),
        run.outbox_rows_left,
        mib(run.outbox_bytes_after_vacuum),
        run.events_on_topic,
        run.orders
    );
    Ok(run)
}

/// The outbox's size: (table + indexes + TOAST, table, indexes).
async fn outbox_size(pool: &PgPool) -> Result<(i64, i64, i64), CdcError> {
    sqlx::query_as(&format!(
        "{LAB_TAG} SELECT pg_total_relation_size('outbox'), pg_relation_size('outbox'), \
                pg_indexes_size('outbox')"
    ))
    .fetch_one(pool)
    .await
    .map_err(CdcError::Postgres)
}

// ---------------------------------------------------------------------------
// The report

impl OperationsReport {
    /// Restart → every row written before it received; `None` when the
    /// catch-up did not finish within its limit.
    pub fn catch_up_seconds(&self) -> Option<f64> {
        self.outage.catch_up_seconds
    }

    pub fn catch_up_goal_met(&self) -> bool {
        self.outage
            .catch_up_seconds
            .is_some_and(|s| s < CATCH_UP_GOAL.as_secs_f64())
    }

    /// Events lost: in the outage and in the cleanup runs.
    pub fn lost(&self) -> u64 {
        self.outage.lost + self.cleanup.iter().map(|r| r.lost).sum::<u64>()
    }

    /// Records sent twice after the restart.
    pub fn resent(&self) -> u64 {
        self.outage.resent
    }

    /// WAL the slot held back at the end of the outage.
    pub fn retained_bytes(&self) -> i64 {
        self.outage.retained_bytes
    }

    pub fn slot_invalidated(&self) -> bool {
        self.abandoned_slot.invalidated
    }

    pub fn cleanup_run(&self, variant: CleanupVariant) -> Option<&CleanupRun> {
        self.cleanup.iter().find(|r| r.variant == variant)
    }

    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let o = &self.outage;
        out.push_str("**Connect down while the shop keeps writing**\n\n");
        out.push_str(
            "| down | orders/s | written while down | WAL held by the slot | restart → REST up \
             | restart → caught up | lost | sent twice |\n",
        );
        out.push_str("|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        out.push_str(&format!(
            "| {:.0} s | {} | {} | {:.1} MiB ({}) | {:.1} s | {} | {} | {} |\n\n",
            o.outage_seconds,
            thousands(u64::from(o.rate)),
            thousands(o.written_while_down),
            mib(o.retained_bytes),
            o.wal_status,
            o.restart_to_serving_seconds,
            o.catch_up_seconds
                .map_or("not within the limit".to_owned(), |s| format!("{s:.1} s")),
            o.lost,
            o.resent,
        ));
        out.push_str(
            "WAL held: `pg_current_wal_lsn() - restart_lsn` of the slot when Connect came \
             back: the whole server's WAL since the oldest position Debezium may still need, \
             other databases' writes included. Caught up: every row committed before the \
             restart had reached the reader, the shop still writing. Sent twice: the records \
             after Connect's last stored offset (it stores them every second), sent again \
             after the restart; the consumer's dedup absorbs them.\n\n",
        );
        out.push_str(&format!(
            "Catch-up after {:.0} s down: {} (goal < {} s, 0 lost): {}\n\n",
            o.outage_seconds,
            o.catch_up_seconds
                .map_or("not within the limit".to_owned(), |s| format!("{s:.1} s")),
            CATCH_UP_GOAL.as_secs(),
            if self.catch_up_goal_met() && o.lost == 0 {
                "PASS"
            } else {
                "MISS"
            }
        ));

        let a = &self.abandoned_slot;
        out.push_str("**A slot nobody reads**\n\n");
        out.push_str(
            "| step | WAL written since the slot was made | WAL held by the slot | wal_status |\n",
        );
        out.push_str("|---|--:|--:|---|\n");
        for (i, p) in a.growing.iter().enumerate() {
            out.push_str(&format!(
                "| {} | {:.0} MiB | {:.0} MiB | {} |\n",
                if i == 0 {
                    "slot created".to_owned()
                } else {
                    format!("write {i}")
                },
                mib(p.written_bytes),
                mib(p.retained_bytes),
                p.wal_status
            ));
        }
        for (step, p) in [
            (
                format!("max_slot_wal_keep_size = {} MB", a.guard_mib),
                &a.after_guard,
            ),
            (
                format!("{} MB more, then CHECKPOINT", a.guard_mib + 16),
                &a.after_checkpoint,
            ),
        ] {
            out.push_str(&format!(
                "| {step} | {:.0} MiB | {:.0} MiB | {} |\n",
                mib(p.written_bytes),
                mib(p.retained_bytes),
                p.wal_status
            ));
        }
        out.push('\n');
        out.push_str(&format!(
            "Slot invalidated: {}. Its reader can no longer resume: {} rows written since \
             its last confirmed position are beyond its reach (a new slot and a re-snapshot, \
             or those events are lost to CDC). Postgres answers the reader: \"{}\". \
             max_slot_wal_keep_size: {} before, {} after the reset.\n\n",
            if a.invalidated { "yes" } else { "no" },
            thousands(a.rows_beyond_reach.max(0) as u64),
            a.reader_error.as_deref().unwrap_or("(no error)"),
            a.setting_before,
            a.setting_after,
        ));

        out.push_str(&format!(
            "**The outbox table after {} orders**\n\n",
            self.cleanup
                .first()
                .map_or("0".to_owned(), |r| thousands(r.orders))
        ));
        out.push_str(
            "| outbox write | orders | events on the topic | lost | rows left | outbox size \
             (table + indexes) | after VACUUM (table) |\n",
        );
        out.push_str("|---|--:|--:|--:|--:|--:|--:|\n");
        for r in &self.cleanup {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.2} MiB ({:.2} + {:.2}) | {:.2} MiB ({:.2}) |\n",
                r.variant.label(),
                thousands(r.orders),
                thousands(r.events_on_topic),
                r.lost,
                thousands(r.outbox_rows_left.max(0) as u64),
                mib(r.outbox_bytes),
                mib(r.outbox_table_bytes),
                mib(r.outbox_index_bytes),
                mib(r.outbox_bytes_after_vacuum),
                mib(r.outbox_table_bytes_after_vacuum),
            ));
        }
        out.push_str(
            "\nOutbox size: `pg_total_relation_size('outbox')` (table, indexes, TOAST) \
             right after the run, and after a plain `VACUUM` as autovacuum would run it: \
             VACUUM gives the deleted rows' pages back to the table's free space and cuts \
             empty pages off its end; index pages stay allocated.\n",
        );
        out
    }
}
