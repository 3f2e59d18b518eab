//! The outbox cleanup on a big outbox while a relay runs and orders keep
//! coming.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use databases::cleanup::format_duration;
use relay::RelayConfig;
use sqlx::PgPool;

use super::harness::{
    check_payloads, ArrivalConsumer, Commit, Producer, RelayGroup, Stage, TimedPublisher,
    EVENT_JSON,
};
use super::latency::{latencies, wait_delivered, Latencies, SETTLE};
use super::CleanupArgs;

pub(crate) struct CleanupMeasurement {
    pub(crate) rows: u64,
    pub(crate) old: u64,
    pub(crate) report: relay::cleanup::CleanupReport,
    pub(crate) before: Latencies,
    pub(crate) during: Latencies,
    /// Seeded rows that were not old, all still there afterwards.
    pub(crate) kept: i64,
    /// Orders placed during the run, every outbox row still there and sent.
    pub(crate) produced: usize,
    /// `pg_total_relation_size('outbox')` before, right after, and after a
    /// VACUUM.
    pub(crate) size_before: i64,
    pub(crate) size_after: i64,
    pub(crate) size_vacuumed: i64,
}

/// Loads rows `$1 ..= $2` of `$3` (0-based). The first `$4` were sent longer
/// ago than the window `$6` (seconds): created one second apart, the oldest
/// first, ending `$7` past the cutoff. The last `$5` are pending and a few
/// seconds old. The rest were sent within the window, spread over it and
/// clear of the cutoff by `$7`.
fn load_sql() -> String {
    format!(
        "INSERT INTO outbox (event_id, aggregate_id, payload, created_at, attempts, sent_at)
         SELECT event_id, order_id, {EVENT_JSON}, created_at,
                CASE WHEN pending THEN 0 ELSE 1 END,
                CASE WHEN pending THEN NULL ELSE created_at + interval '1 second' END
           FROM (SELECT gen_random_uuid() AS event_id, gen_random_uuid() AS order_id,
                        100 + i % 50000 AS amount_cents, 'EUR' AS currency,
                        i >= $3 - $5 AS pending,
                        now() - make_interval(secs => CASE
                            WHEN i < $4 THEN $6 + $7 + ($4 - 1 - i)
                            WHEN i >= $3 - $5 THEN ($3 - 1 - i) * 0.001
                            ELSE $7 + ($3 - $5 - 1 - i)::float8
                                 / GREATEST($3 - $5 - $4, 1) * ($6 - 2 * $7)
                        END) AS created_at
                   FROM generate_series($1::bigint, $2::bigint) AS i) AS rows"
    )
}

/// Rows per INSERT while loading: fast, and still shows progress.
const LOAD_CHUNK: u64 = 100_000;

pub(crate) async fn measure_cleanup(args: &CleanupArgs) -> anyhow::Result<CleanupMeasurement> {
    ensure!(args.rows > 0, "--rows must be at least 1");
    ensure!(args.rate > 0, "--rate must be at least 1");
    ensure!(
        args.window >= Duration::from_secs(3600),
        "--window must be at least 1h here, so that the loaded ages stay clear of the cutoff"
    );
    let old = (args.rows as f64 * args.old_share).round() as u64;
    ensure!(
        old + args.pending <= args.rows,
        "--old-share and --pending add up to more than --rows"
    );
    let stage = Stage::open("eo_bench_cleanup").await?;
    let outcome = cleanup_under_load(&stage, args, old).await;
    stage.finish(outcome).await
}

async fn cleanup_under_load(
    stage: &Stage,
    args: &CleanupArgs,
    old: u64,
) -> anyhow::Result<CleanupMeasurement> {
    let pool = &stage.db.pool;
    let window = args.window.as_secs_f64();
    // Keeps every loaded row clear of the cutoff, which is taken later.
    let margin = (window / 10.0).min(86_400.0);
    let loading = Instant::now();
    let mut first = 0u64;
    while first < args.rows {
        let last = (first + LOAD_CHUNK).min(args.rows) - 1;
        sqlx::query(&load_sql())
            .bind(first as i64)
            .bind(last as i64)
            .bind(args.rows as i64)
            .bind(old as i64)
            .bind(args.pending as i64)
            .bind(window)
            .bind(margin)
            .execute(pool)
            .await
            .context("loading the outbox")?;
        first = last + 1;
        eprintln!(
            "cleanup: loaded {first}/{} rows ({:.1} s)",
            args.rows,
            loading.elapsed().as_secs_f64()
        );
    }
    sqlx::raw_sql("ANALYZE outbox")
        .execute(pool)
        .await
        .context("ANALYZE")?;
    check_payloads(pool).await?;
    let last_loaded: i64 = sqlx::query_scalar("SELECT max(id) FROM outbox")
        .fetch_one(pool)
        .await?;
    let older: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE sent_at < now() - make_interval(secs => $1)",
    )
    .bind(window)
    .fetch_one(pool)
    .await?;
    ensure!(
        older as u64 == old,
        "loaded {older} rows sent before the window, meant {old}"
    );

    let size_before = table_size(pool).await?;

    let confirms = Arc::new(Mutex::new(HashMap::new()));
    let publisher = TimedPublisher {
        inner: Arc::new(stage.broker.publisher(&stage.topology).await?),
        confirmed: confirms.clone(),
    };
    let consumer = ArrivalConsumer::spawn(stage.broker.receiver(&stage.topology, 1000).await?);
    let relays = RelayGroup::start(
        &stage.db.url,
        vec![Arc::new(publisher)],
        RelayConfig::default(),
    )
    .await?;
    let measured = async {
        // The loaded pending rows go first; the baseline starts after.
        while shop::outbox_producer::pending_count(pool).await? > 0 {
            relays.check_running()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "cleanup: relay running, {} orders/s; baseline {} then cleanup",
            args.rate,
            format_duration(args.baseline)
        );
        // The cleanup job's own connection, as a cron job would have.
        let cleanup_pool = databases::connect(&stage.db.url, 1).await?;
        let producer = Producer::spawn(&stage.db.url, args.rate)?;
        tokio::time::sleep(SETTLE).await;
        let baseline_from = Instant::now();
        tokio::time::sleep(args.baseline).await;
        let cleanup_from = Instant::now();
        let report = relay::cleanup::delete_sent(&cleanup_pool, args.window, args.batch_size)
            .await
            .context("deleting sent rows");
        let cleanup_to = Instant::now();
        cleanup_pool.close().await;
        let commits = producer.stop().await?;
        let report = report?;
        eprintln!(
            "cleanup: deleted {} rows in {:.1} s; waiting for the orders' delivery",
            report.rows_deleted,
            report.elapsed.as_secs_f64()
        );
        wait_delivered(&commits, &confirms, &consumer.arrivals, &relays).await?;
        let phase = |from: Instant, to: Instant| {
            let inside: Vec<&Commit> = commits
                .iter()
                .filter(|c| c.at >= from && c.at < to)
                .collect();
            latencies(&inside, &confirms, &consumer.arrivals)
        };
        let before = phase(baseline_from, cleanup_from);
        let during = phase(cleanup_from, cleanup_to);
        anyhow::Ok((report, before, during, commits.len()))
    }
    .await;
    let relays_stopped = relays.stop().await;
    let consumer_stopped = consumer.stop().await;
    let (report, before, during, produced) = measured?;
    relays_stopped?;
    consumer_stopped?;

    ensure!(
        report.rows_deleted == old,
        "cleanup deleted {} rows, {old} were sent before the window",
        report.rows_deleted
    );
    let size_after = table_size(pool).await?;
    eprintln!("cleanup: VACUUM outbox");
    // VACUUM refuses to run inside a transaction block; a simple query runs it alone.
    sqlx::raw_sql("VACUUM outbox")
        .execute(pool)
        .await
        .context("VACUUM")?;
    let size_vacuumed = table_size(pool).await?;
    let (kept, new_rows, new_pending): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE id <= $1),
                count(*) FILTER (WHERE id > $1),
                count(*) FILTER (WHERE id > $1 AND sent_at IS NULL)
           FROM outbox",
    )
    .bind(last_loaded)
    .fetch_one(pool)
    .await?;
    ensure!(
        kept as u64 == args.rows - old,
        "{kept} of the {} loaded rows that were not old are left",
        args.rows - old
    );
    ensure!(
        new_rows as usize == produced && new_pending == 0,
        "{new_rows} outbox rows of the {produced} orders placed during the run ({new_pending} pending)"
    );
    Ok(CleanupMeasurement {
        rows: args.rows,
        old,
        report,
        before,
        during,
        kept,
        produced,
        size_before,
        size_after,
        size_vacuumed,
    })
}

async fn table_size(pool: &PgPool) -> anyhow::Result<i64> {
    sqlx::query_scalar("SELECT pg_total_relation_size('outbox')")
        .fetch_one(pool)
        .await
        .context("reading the outbox's size")
}
