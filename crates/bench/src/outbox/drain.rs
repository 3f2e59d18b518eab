//! How fast relays drain a backlog of pending rows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use queue::{Publisher, QueueInspector};
use relay::RelayConfig;

use super::harness::{
    check_payloads, queries_so_far, CountingPublisher, InFlight, RelayGroup, Stage, EVENT_JSON,
};
use super::DrainArgs;

pub(crate) struct DrainResult {
    pub(crate) relays: usize,
    pub(crate) batch_size: i64,
    pub(crate) rows: u64,
    pub(crate) elapsed: Duration,
    pub(crate) queries: u64,
    /// Rows claimed more than once (a lease ran out mid-batch): republishes.
    pub(crate) republished: i64,
    /// Messages in the queue afterwards.
    pub(crate) in_queue: u64,
    /// How long at least one publish was waiting for its confirm.
    pub(crate) publishing: Duration,
}

impl DrainResult {
    pub(crate) fn events_per_second(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }
}

/// The drain goal, events per second.
pub(crate) const DRAIN_GOAL: f64 = 5_000.0;

pub(crate) async fn drains(args: &DrainArgs) -> anyhow::Result<Vec<DrainResult>> {
    ensure!(args.rows > 0, "--rows must be at least 1");
    ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let mut runs = Vec::new();
    for &relays in &args.relays {
        ensure!(relays > 0, "--relays must be at least 1");
        let stage = Stage::open("eo_bench_drain").await?;
        let outcome = drain(&stage, args, relays).await;
        runs.push(stage.finish(outcome).await?);
    }
    Ok(runs)
}
/// `$1` orders and their pending outbox rows, in one statement.
fn backlog_sql() -> String {
    format!(
        "WITH placed AS (
             INSERT INTO orders (order_id, amount_cents, currency, created_at)
             SELECT gen_random_uuid(), 100 + i % 50000, 'EUR', clock_timestamp()
               FROM generate_series(1, $1::bigint) AS i
             RETURNING order_id, amount_cents, currency, created_at
         )
         INSERT INTO outbox (event_id, aggregate_id, payload, created_at)
         SELECT event_id, order_id, {EVENT_JSON}, created_at
           FROM (SELECT gen_random_uuid() AS event_id, * FROM placed) AS events"
    )
}

async fn drain(stage: &Stage, args: &DrainArgs, relays: usize) -> anyhow::Result<DrainResult> {
    let pool = &stage.db.pool;
    eprintln!("drain: loading {} pending rows", args.rows);
    let loading = Instant::now();
    sqlx::query(&backlog_sql())
        .bind(args.rows as i64)
        .execute(pool)
        .await
        .context("loading the backlog")?;
    sqlx::raw_sql("ANALYZE orders, outbox")
        .execute(pool)
        .await
        .context("ANALYZE")?;
    check_payloads(pool).await?;
    eprintln!(
        "drain: loaded in {:.1} s; {relays} relay(s), batch {}",
        loading.elapsed().as_secs_f64(),
        args.batch_size
    );

    let confirmed = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(Mutex::new(InFlight::default()));
    let mut publishers: Vec<Arc<dyn Publisher>> = Vec::new();
    for _ in 0..relays {
        publishers.push(Arc::new(CountingPublisher {
            inner: Arc::new(stage.broker.publisher(&stage.topology).await?),
            confirmed: confirmed.clone(),
            in_flight: in_flight.clone(),
        }));
    }
    let config = RelayConfig {
        batch_size: args.batch_size,
        ..RelayConfig::default()
    };
    let before = queries_so_far();
    let started = Instant::now();
    let group = RelayGroup::start(&stage.db.url, publishers, config).await?;
    let drained = async {
        // Counting rows in the database while the relays work would take a
        // share of the two cores from them: wait for the confirms first,
        // then for the last marks.
        while confirmed.load(Ordering::Relaxed) < args.rows {
            group.check_running()?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        loop {
            let pending = shop::outbox_producer::pending_count(pool).await?;
            if pending == 0 {
                return anyhow::Ok(started.elapsed());
            }
            group.check_running()?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    .await;
    let queries = queries_so_far() - before;
    let publishing = in_flight.lock().expect("in-flight lock").busy;
    let stopped = group.stop().await;
    let elapsed = drained?;
    stopped?;
    eprintln!(
        "drain: {} rows in {:.2} s",
        args.rows,
        elapsed.as_secs_f64()
    );

    let republished: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE attempts > 1")
        .fetch_one(pool)
        .await?;
    let in_queue = stage
        .broker
        .inspector(&stage.topology)
        .ready_count()
        .await?;
    ensure!(
        in_queue == args.rows + republished as u64,
        "{in_queue} messages in the queue after draining {} rows ({republished} republished)",
        args.rows
    );
    Ok(DrainResult {
        relays,
        batch_size: args.batch_size,
        rows: args.rows,
        elapsed,
        queries,
        republished,
        in_queue,
        publishing,
    })
}
