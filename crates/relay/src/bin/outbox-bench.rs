//! `outbox-bench`: what the relay costs, measured on the machine at hand.
//!
//! - `latency`: commit → broker confirm and commit → consumer receive, at a
//!   steady order rate, for the NOTIFY relay and for pollers at 100 ms and
//!   1 s; with `--chart PATH`, an SVG of the three distributions.
//! - `idle-queries`: SQL statements per second each relay sends while there
//!   is nothing to publish.
//! - `drain`: how fast one relay (and two) empty a backlog of pending rows.
//! - `cleanup`: the outbox cleanup job on a big outbox, while a relay runs
//!   and the shop keeps placing orders: its speed, and what it costs the
//!   relay's latency.
//! - `all`: everything above, with the defaults (under two minutes in
//!   release on two cores).
//!
//! Markdown tables go to stdout, for the book to embed as they are; progress
//! goes to stderr. A failed run exits non-zero; a missed goal does not (each
//! goal line says PASS or MISS).
//!
//! Every run gets its own database and its own queue, both removed at the
//! end.
//!
//! `cargo run --release -p relay --bin outbox-bench -- all --chart target/relay-latency.svg`

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Args, Parser, Subcommand};
use databases::cleanup::{format_duration, parse_duration};
use databases::FreshDatabase;
use payments::PaymentEvent;
use queue::rabbitmq::{url_from_env, RabbitBroker, RabbitReceiver, Topology};
use queue::{OutgoingMessage, Publisher, QueueError, QueueInspector, Receiver};
use relay::{NoFaults, Relay, RelayConfig, RelayError, Unobserved, Wake};
use shop::Order;
use sqlx::PgPool;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "outbox-bench",
    about = "Benchmarks of the outbox relay: latency, idle queries, backlog drain, cleanup",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Commit → confirm and commit → receive latency of each relay mode
    /// under a steady order rate, and the queries each sends meanwhile.
    Latency(LatencyArgs),
    /// Queries per second each relay mode sends with nothing to publish.
    IdleQueries(IdleArgs),
    /// How fast relays drain a backlog of pending rows.
    Drain(DrainArgs),
    /// The outbox cleanup on a big outbox while a relay runs and orders
    /// keep coming.
    Cleanup(CleanupArgs),
    /// Everything, with the defaults.
    All(AllArgs),
}

#[derive(Debug, Clone, Args)]
struct LatencyArgs {
    /// Orders placed per second.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// How long each relay mode is measured.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Orders placed before the measurement starts (not counted).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Write an SVG chart of the latency distributions here.
    #[arg(long)]
    chart: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
struct IdleArgs {
    /// How long each relay mode sits idle while its queries are counted.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
}

#[derive(Debug, Clone, Args)]
struct DrainArgs {
    /// Pending outbox rows to drain.
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Rows per claim.
    #[arg(long, default_value_t = 500)]
    batch_size: i64,
    /// Relays draining at once; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    relays: Vec<usize>,
}

#[derive(Debug, Clone, Args)]
struct CleanupArgs {
    /// Outbox rows loaded before the cleanup.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Share of the loaded rows that were sent longer ago than the window.
    #[arg(long, default_value_t = 0.5, value_parser = parse_share)]
    old_share: f64,
    /// Loaded rows still pending (the newest ones).
    #[arg(long, default_value_t = 1_000)]
    pending: u64,
    /// Sent rows older than this are deleted (at least 1h here).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    window: Duration,
    /// Rows deleted per statement.
    #[arg(long, default_value_t = relay::cleanup::DEFAULT_BATCH_SIZE)]
    batch_size: i64,
    /// Orders placed per second throughout.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// How long the relay runs under load before the cleanup starts.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    baseline: Duration,
}

#[derive(Debug, Clone, Args)]
struct AllArgs {
    /// Write an SVG chart of the latency distributions here.
    #[arg(long)]
    chart: Option<PathBuf>,
}

impl Default for LatencyArgs {
    fn default() -> Self {
        Self {
            rate: 500,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            chart: None,
        }
    }
}

impl Default for IdleArgs {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(10),
        }
    }
}

impl Default for DrainArgs {
    fn default() -> Self {
        Self {
            rows: 100_000,
            batch_size: 500,
            relays: vec![1, 2],
        }
    }
}

impl Default for CleanupArgs {
    fn default() -> Self {
        Self {
            rows: 1_000_000,
            old_share: 0.5,
            pending: 1_000,
            window: relay::cleanup::DEFAULT_WINDOW,
            batch_size: relay::cleanup::DEFAULT_BATCH_SIZE,
            rate: 200,
            baseline: Duration::from_secs(5),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if metrics::set_global_recorder(QueryCounter).is_err() {
        eprintln!("outbox-bench: a metrics recorder was already installed");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("outbox-bench: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.command.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("outbox-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

impl Command {
    async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Latency(args) => {
                let modes = relay_modes(None, Some(&args)).await?;
                print_latency(&args, &modes);
                print_queries(&modes);
                print_mode_goals(&modes);
                chart_if_asked(args.chart.as_deref(), &modes)
            }
            Command::IdleQueries(args) => {
                let modes = relay_modes(Some(&args), None).await?;
                print_queries(&modes);
                print_mode_goals(&modes);
                Ok(())
            }
            Command::Drain(args) => {
                let runs = drains(&args).await?;
                print_drains(&runs);
                Ok(())
            }
            Command::Cleanup(args) => {
                let measured = measure_cleanup(&args).await?;
                print_cleanup(&args, &measured);
                Ok(())
            }
            Command::All(all) => {
                let started = Instant::now();
                let latency = LatencyArgs {
                    chart: all.chart,
                    ..LatencyArgs::default()
                };
                let modes = relay_modes(Some(&IdleArgs::default()), Some(&latency)).await?;
                print_latency(&latency, &modes);
                print_queries(&modes);
                print_mode_goals(&modes);
                chart_if_asked(latency.chart.as_deref(), &modes)?;
                let runs = drains(&DrainArgs::default()).await?;
                print_drains(&runs);
                let cleanup = CleanupArgs::default();
                let measured = measure_cleanup(&cleanup).await?;
                print_cleanup(&cleanup, &measured);
                eprintln!("all done in {:.0} s", started.elapsed().as_secs_f64());
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A and B: latency and queries of each relay mode

/// The three relays the chapter compares, with how the tables name them.
fn wake_modes() -> [(&'static str, Wake); 3] {
    [
        ("NOTIFY", RelayConfig::default().wake),
        (
            "poll 100 ms",
            Wake::Poll {
                interval: Duration::from_millis(100),
            },
        ),
        (
            "poll 1 s",
            Wake::Poll {
                interval: Duration::from_secs(1),
            },
        ),
    ]
}

/// How long a relay runs before anything is counted: its LISTEN and first
/// (empty) claim are start-up, not steady state.
const SETTLE: Duration = Duration::from_secs(1);
/// How long the orders of a run may take to arrive before the run fails.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(30);

struct ModeResult {
    label: &'static str,
    wake: Wake,
    idle: Option<QueryWindow>,
    load: Option<LoadResult>,
}

#[derive(Debug, Clone, Copy)]
struct QueryWindow {
    queries: u64,
    over: Duration,
}

impl QueryWindow {
    fn per_second(&self) -> f64 {
        self.queries as f64 / self.over.as_secs_f64()
    }
}

struct LoadResult {
    /// Orders placed in the measured window.
    events: usize,
    latencies: Latencies,
    queries: QueryWindow,
}

async fn relay_modes(
    idle: Option<&IdleArgs>,
    load: Option<&LatencyArgs>,
) -> anyhow::Result<Vec<ModeResult>> {
    if let Some(load) = load {
        ensure!(load.rate > 0, "--rate must be at least 1");
        ensure!(!load.duration.is_zero(), "--duration must be longer than 0");
    }
    let mut results = Vec::new();
    for (label, wake) in wake_modes() {
        let stage = Stage::open("eo_bench_relay").await?;
        let outcome = relay_mode(&stage, label, wake, idle, load).await;
        results.push(stage.finish(outcome).await?);
    }
    Ok(results)
}

async fn relay_mode(
    stage: &Stage,
    label: &'static str,
    wake: Wake,
    idle: Option<&IdleArgs>,
    load: Option<&LatencyArgs>,
) -> anyhow::Result<ModeResult> {
    let confirms = Arc::new(Mutex::new(HashMap::new()));
    let publisher = TimedPublisher {
        inner: Arc::new(stage.broker.publisher(&stage.topology).await?),
        confirmed: confirms.clone(),
    };
    let consumer = ArrivalConsumer::spawn(stage.broker.receiver(&stage.topology, 1000).await?);
    let config = RelayConfig {
        wake,
        ..RelayConfig::default()
    };
    let relays = RelayGroup::start(&stage.db.url, vec![Arc::new(publisher)], config).await?;

    let measured = async {
        tokio::time::sleep(SETTLE).await;
        let idle = match idle {
            Some(idle) => {
                eprintln!(
                    "{label}: idle for {}, counting queries",
                    format_duration(idle.duration)
                );
                Some(count_queries(idle.duration).await)
            }
            None => None,
        };
        let load = match load {
            Some(load) => {
                Some(relay_under_load(stage, label, load, &confirms, &consumer, &relays).await?)
            }
            None => None,
        };
        relays.check_running()?;
        anyhow::Ok(ModeResult {
            label,
            wake,
            idle,
            load,
        })
    }
    .await;
    let relays_stopped = relays.stop().await;
    let consumer_stopped = consumer.stop().await;
    let result = measured?;
    relays_stopped?;
    consumer_stopped?;
    Ok(result)
}

async fn count_queries(over: Duration) -> QueryWindow {
    let before = queries_so_far();
    let started = Instant::now();
    tokio::time::sleep(over).await;
    QueryWindow {
        queries: queries_so_far() - before,
        over: started.elapsed(),
    }
}

async fn relay_under_load(
    stage: &Stage,
    label: &str,
    load: &LatencyArgs,
    confirms: &Arc<Mutex<HashMap<Uuid, Instant>>>,
    consumer: &ArrivalConsumer,
    relays: &RelayGroup,
) -> anyhow::Result<LoadResult> {
    eprintln!(
        "{label}: {} orders/s, {} warm-up then {} measured",
        load.rate,
        format_duration(load.warmup),
        format_duration(load.duration)
    );
    let producer = Producer::spawn(&stage.db.url, load.rate)?;
    tokio::time::sleep(load.warmup).await;
    let (from, before) = (Instant::now(), queries_so_far());
    tokio::time::sleep(load.duration).await;
    let to = Instant::now();
    let queries = QueryWindow {
        queries: queries_so_far() - before,
        over: to - from,
    };
    let commits = producer.stop().await?;
    eprintln!(
        "{label}: {} orders committed, waiting for their delivery",
        commits.len()
    );
    wait_delivered(&commits, confirms, &consumer.arrivals, relays).await?;

    let measured: Vec<&Commit> = commits
        .iter()
        .filter(|commit| commit.at >= from && commit.at < to)
        .collect();
    Ok(LoadResult {
        events: measured.len(),
        latencies: latencies(&measured, confirms, &consumer.arrivals),
        queries,
    })
}

/// Commit → confirm and commit → receive of each commit, in milliseconds,
/// each sorted.
///
/// An instant before the commit's (the producer noted its commit late) counts
/// as 0 ms; `early` says how many of those there were.
fn latencies(
    commits: &[&Commit],
    confirms: &Mutex<HashMap<Uuid, Instant>>,
    arrivals: &Mutex<HashMap<Uuid, Instant>>,
) -> Latencies {
    let confirms = confirms.lock().expect("confirms lock");
    let arrivals = arrivals.lock().expect("arrivals lock");
    let mut early = 0;
    let mut since = |commit: &Commit, at: Option<&Instant>| {
        at.map(|at| {
            if *at < commit.at {
                early += 1;
            }
            at.saturating_duration_since(commit.at).as_secs_f64() * 1e3
        })
    };
    let mut confirm: Vec<f64> = commits
        .iter()
        .filter_map(|c| since(c, confirms.get(&c.order_id)))
        .collect();
    let mut receive: Vec<f64> = commits
        .iter()
        .filter_map(|c| since(c, arrivals.get(&c.order_id)))
        .collect();
    confirm.sort_by(f64::total_cmp);
    receive.sort_by(f64::total_cmp);
    Latencies {
        confirm,
        receive,
        early,
    }
}

/// Commit → confirm and commit → receive, milliseconds, each sorted.
struct Latencies {
    confirm: Vec<f64>,
    receive: Vec<f64>,
    /// Confirms and receives that came before the producer noted the
    /// commit, counted as 0 ms.
    early: usize,
}

/// Waits until every commit was confirmed to the relay and received by the
/// consumer; fails after [`DELIVERY_DEADLINE`] or when a relay stopped.
async fn wait_delivered(
    commits: &[Commit],
    confirms: &Mutex<HashMap<Uuid, Instant>>,
    arrivals: &Mutex<HashMap<Uuid, Instant>>,
    relays: &RelayGroup,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + DELIVERY_DEADLINE;
    loop {
        let missing = {
            let confirms = confirms.lock().expect("confirms lock");
            let arrivals = arrivals.lock().expect("arrivals lock");
            commits
                .iter()
                .filter(|c| {
                    !confirms.contains_key(&c.order_id) || !arrivals.contains_key(&c.order_id)
                })
                .count()
        };
        if missing == 0 {
            return Ok(());
        }
        relays.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{missing} of {} committed orders were not delivered within {}",
                commits.len(),
                format_duration(DELIVERY_DEADLINE)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// C: draining a backlog

struct DrainResult {
    relays: usize,
    batch_size: i64,
    rows: u64,
    elapsed: Duration,
    queries: u64,
    /// Rows claimed more than once (a lease ran out mid-batch): republishes.
    republished: i64,
    /// Messages in the queue afterwards.
    in_queue: u64,
    /// How long at least one publish was waiting for its confirm.
    publishing: Duration,
}

impl DrainResult {
    fn events_per_second(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }
}

/// The drain goal, events per second.
const DRAIN_GOAL: f64 = 5_000.0;

async fn drains(args: &DrainArgs) -> anyhow::Result<Vec<DrainResult>> {
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

/// A valid payment event as JSON text, built in SQL from the columns
/// `event_id`, `order_id`, `amount_cents`, `currency`, `created_at`.
const EVENT_JSON: &str = "json_build_object(
        'event_id', event_id, 'order_id', order_id, 'amount_cents', amount_cents,
        'currency', currency,
        'created_at', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
    )::text";

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

/// The generated payloads must be events the consumer accepts.
async fn check_payloads(pool: &PgPool) -> anyhow::Result<()> {
    let payloads: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
        "SELECT event_id, aggregate_id, payload FROM outbox ORDER BY random() LIMIT 100",
    )
    .fetch_all(pool)
    .await?;
    for (event_id, order_id, payload) in payloads {
        let event = PaymentEvent::decode(payload.as_bytes())
            .with_context(|| format!("generated payload {payload}"))?;
        ensure!(
            event.event_id == event_id && event.order_id == order_id,
            "generated payload {payload} does not match its row"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// E: cleanup under load

struct CleanupMeasurement {
    rows: u64,
    old: u64,
    report: relay::cleanup::CleanupReport,
    before: Latencies,
    during: Latencies,
    /// Seeded rows that were not old, all still there afterwards.
    kept: i64,
    /// Orders placed during the run, every outbox row still there and sent.
    produced: usize,
    /// `pg_total_relation_size('outbox')` before, right after, and after a
    /// VACUUM.
    size_before: i64,
    size_after: i64,
    size_vacuumed: i64,
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

async fn measure_cleanup(args: &CleanupArgs) -> anyhow::Result<CleanupMeasurement> {
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

// ---------------------------------------------------------------------------
// Markdown

fn print_latency(args: &LatencyArgs, modes: &[ModeResult]) {
    println!(
        "Latency at {} orders/s, {} per relay mode (after {} of warm-up). \
         Commit: the producer's COMMIT returned; confirm: the broker's \
         publisher confirm reached the relay; receive: a consumer on the \
         queue got the message. One process, one clock:\n",
        args.rate,
        format_duration(args.duration),
        format_duration(args.warmup),
    );
    println!(
        "| relay | events | commit → confirm p50 | p99 | max | commit → receive p50 | p99 | max |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|");
    for mode in modes {
        let Some(load) = &mode.load else { continue };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            mode.label,
            load.events,
            ms(quantile(&load.latencies.confirm, 0.50)),
            ms(quantile(&load.latencies.confirm, 0.99)),
            ms(quantile(&load.latencies.confirm, 1.0)),
            ms(quantile(&load.latencies.receive, 0.50)),
            ms(quantile(&load.latencies.receive, 0.99)),
            ms(quantile(&load.latencies.receive, 1.0)),
        );
    }
    println!();
    print_early(
        modes
            .iter()
            .filter_map(|mode| Some((mode.label, mode.load.as_ref()?.latencies.early))),
    );
}

/// Says how many confirms or receives came before the producer noted the
/// commit, if any did: a bound on how late that note can be.
fn print_early<'a>(counts: impl Iterator<Item = (&'a str, usize)>) {
    let early: Vec<String> = counts
        .filter(|(_, early)| *early > 0)
        .map(|(label, early)| format!("{label}: {early}"))
        .collect();
    if !early.is_empty() {
        println!(
            "Confirms or receives that came before the producer had noted its \
             COMMIT, counted as 0 ms ({}).\n",
            early.join(", ")
        );
    }
}

fn print_queries(modes: &[ModeResult]) {
    let when = match (
        modes.iter().any(|m| m.idle.is_some()),
        modes.iter().any(|m| m.load.is_some()),
    ) {
        (true, true) => "idle, and during the latency run",
        (true, false) => "idle",
        _ => "during the latency run",
    };
    println!("SQL statements sent by each relay (its `relay_queries_total`), {when}:\n");
    println!("| relay | idle: queries | idle: queries/s | under load: queries/s | under load: queries per event |");
    println!("|---|--:|--:|--:|--:|");
    for mode in modes {
        let (idle_count, idle_rate) = match mode.idle {
            Some(idle) => (
                format!("{} in {:.0} s", idle.queries, idle.over.as_secs_f64()),
                format!("{:.1}", idle.per_second()),
            ),
            None => ("–".to_owned(), "–".to_owned()),
        };
        let (load_rate, per_event) = match &mode.load {
            Some(load) => (
                format!("{:.0}", load.queries.per_second()),
                format!(
                    "{:.2}",
                    load.queries.queries as f64 / load.events.max(1) as f64
                ),
            ),
            None => ("–".to_owned(), "–".to_owned()),
        };
        println!(
            "| {} | {idle_count} | {idle_rate} | {load_rate} | {per_event} |",
            mode.label
        );
    }
    println!();
}

fn print_mode_goals(modes: &[ModeResult]) {
    let find = |wanted: Wake| modes.iter().find(|mode| mode.wake == wanted);
    let notify = find(RelayConfig::default().wake);
    let poll_100 = find(Wake::Poll {
        interval: Duration::from_millis(100),
    });
    let mut lines = Vec::new();
    if let Some(load) = notify.and_then(|m| m.load.as_ref()) {
        let p99 = quantile(&load.latencies.confirm, 0.99);
        lines.push(goal_line(
            "NOTIFY relay: commit → confirm p99 < 25 ms",
            ms(p99),
            p99 < 25.0,
        ));
    }
    if let (Some(notify), Some(poll)) = (
        notify.and_then(|m| m.load.as_ref()),
        poll_100.and_then(|m| m.load.as_ref()),
    ) {
        let (n, p) = (
            quantile(&notify.latencies.confirm, 0.5),
            quantile(&poll.latencies.confirm, 0.5),
        );
        lines.push(goal_line(
            "NOTIFY relay: commit → confirm p50 ≤ 1/20 of the 100 ms poller's",
            format!("{} vs {} (1/{:.0})", ms(n), ms(p), p / n),
            n * 20.0 <= p,
        ));
    }
    if let (Some(notify), Some(poll)) = (notify.and_then(|m| m.idle), poll_100.and_then(|m| m.idle))
    {
        let (n, p) = (notify.per_second(), poll.per_second());
        lines.push(goal_line(
            "NOTIFY relay idle: queries/s ≤ 1/10 of the 100 ms poller's",
            format!("{n:.1}/s vs {p:.1}/s"),
            n * 10.0 <= p,
        ));
    }
    print_goals(&lines);
}

fn print_drains(runs: &[DrainResult]) {
    println!(
        "Draining a backlog of pending rows (loaded in one statement, then the relays started):\n"
    );
    println!(
        "| relays | batch | rows | time | events/s | queries | publishes awaiting confirms | republished | in queue after |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for run in runs {
        println!(
            "| {} | {} | {} | {:.2} s | {:.0} | {} | {:.0}% of the time | {} | {} |",
            run.relays,
            run.batch_size,
            run.rows,
            run.elapsed.as_secs_f64(),
            run.events_per_second(),
            run.queries,
            100.0 * run.publishing.as_secs_f64() / run.elapsed.as_secs_f64(),
            run.republished,
            run.in_queue,
        );
    }
    println!();
    println!(
        "In the rest of the time no publish was in flight: the relays were \
         claiming a batch, marking one sent, or between the two.\n"
    );
    let lines: Vec<String> = runs
        .iter()
        .map(|run| {
            goal_line(
                &format!(
                    "drain with {} relay{}: ≥ {DRAIN_GOAL:.0} events/s",
                    run.relays,
                    if run.relays == 1 { "" } else { "s" }
                ),
                format!("{:.0} events/s", run.events_per_second()),
                run.events_per_second() >= DRAIN_GOAL,
            )
        })
        .collect();
    print_goals(&lines);
}

fn print_cleanup(args: &CleanupArgs, measured: &CleanupMeasurement) {
    let report = &measured.report;
    println!(
        "Outbox cleanup (window {}, batches of {}) on {} rows, {} of them sent \
         before the window, while a NOTIFY relay publishes {} orders/s:\n",
        format_duration(args.window),
        args.batch_size,
        measured.rows,
        measured.old,
        args.rate,
    );
    println!("| rows deleted | batches | wall time | rows/s | rows kept (not old) | orders placed meanwhile, all published |");
    println!("|--:|--:|--:|--:|--:|--:|");
    println!(
        "| {} | {} | {:.2} s | {:.0} | {} | {} |",
        report.rows_deleted,
        report.batches,
        report.elapsed.as_secs_f64(),
        report.rows_per_second(),
        measured.kept,
        measured.produced,
    );
    println!();
    println!(
        "The outbox's size on disk (table and indexes): {} before, {} right \
         after the cleanup, {} after a VACUUM. DELETE only marks rows dead; \
         VACUUM makes their space reusable for new rows, and returns to the \
         file system only empty pages at the end of the table.\n",
        mib(measured.size_before),
        mib(measured.size_after),
        mib(measured.size_vacuumed),
    );
    println!("The relay's latency before and during the cleanup:\n");
    println!("| phase | events | commit → confirm p50 | p99 | commit → receive p50 | p99 |");
    println!("|---|--:|--:|--:|--:|--:|");
    for (name, phase) in [
        ("before cleanup", &measured.before),
        ("during cleanup", &measured.during),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            phase.confirm.len(),
            ms(quantile(&phase.confirm, 0.50)),
            ms(quantile(&phase.confirm, 0.99)),
            ms(quantile(&phase.receive, 0.50)),
            ms(quantile(&phase.receive, 0.99)),
        );
    }
    println!();
    print_early(
        [
            ("before cleanup", measured.before.early),
            ("during cleanup", measured.during.early),
        ]
        .into_iter(),
    );
}

fn goal_line(goal: &str, measured: String, met: bool) -> String {
    format!(
        "| {goal} | {measured} | {} |",
        if met { "PASS" } else { "MISS" }
    )
}

fn print_goals(lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    println!("| goal | measured | result |");
    println!("|---|--:|---|");
    for line in lines {
        println!("{line}");
    }
    println!();
}

/// Nearest-rank quantile of sorted values; NaN when there are none.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    telemetry::nearest_rank(sorted, q).unwrap_or(f64::NAN)
}

fn ms(value: f64) -> String {
    if value.is_nan() {
        "–".to_owned()
    } else if value < 10.0 {
        format!("{value:.2} ms")
    } else if value < 100.0 {
        format!("{value:.1} ms")
    } else {
        format!("{value:.0} ms")
    }
}

fn mib(bytes: i64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn parse_share(text: &str) -> Result<f64, String> {
    let share: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number between 0 and 1"))?;
    if (0.0..=1.0).contains(&share) {
        Ok(share)
    } else {
        Err(format!("`{text}` is not between 0 and 1"))
    }
}

// ---------------------------------------------------------------------------
// D: the chart

fn chart_if_asked(path: Option<&Path>, modes: &[ModeResult]) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    draw_chart(path, modes).with_context(|| format!("drawing the chart {}", path.display()))?;
    eprintln!("chart written to {}", path.display());
    Ok(())
}

fn draw_chart(path: &Path, modes: &[ModeResult]) -> anyhow::Result<()> {
    use plotters::prelude::*;

    let series: Vec<(&str, &LoadResult)> = modes
        .iter()
        .filter_map(|mode| mode.load.as_ref().map(|load| (mode.label, load)))
        .collect();
    ensure!(!series.is_empty(), "no latency run to chart");
    let samples = || {
        series
            .iter()
            .flat_map(|(_, load)| [&load.latencies.confirm, &load.latencies.receive])
    };
    // From the decade below the fastest 0.1% (a rare 0 ms would otherwise
    // stretch the axis over empty decades) to just past the slowest.
    let fastest = samples()
        .map(|values| quantile(values, 0.001))
        .fold(f64::INFINITY, f64::min);
    let slowest = samples()
        .map(|values| quantile(values, 1.0))
        .fold(0.0, f64::max);
    let x_min = 10f64.powf(fastest.clamp(0.01, 1.0).log10().floor());
    let x_max = slowest.max(x_min * 10.0) * 1.3;
    let colors = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
    ];

    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (charts, legend) = root.split_vertically(440);
    let panels = charts.split_evenly((1, 2));
    let titles = ["commit → broker confirm", "commit → consumer receive"];
    for (panel, (title, pick)) in panels.iter().zip(titles.into_iter().zip([0, 1])) {
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d((x_min..x_max).log_scale(), 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_desc("latency, ms (log scale)")
            .y_desc("share of events at or below")
            .x_label_formatter(&|v| {
                if *v >= 1.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v}")
                }
            })
            .y_label_formatter(&|v| format!("{:.0}%", v * 100.0))
            .draw()?;
        for (i, (_, load)) in series.iter().enumerate() {
            let values = if pick == 0 {
                &load.latencies.confirm
            } else {
                &load.latencies.receive
            };
            chart.draw_series(LineSeries::new(
                telemetry::cdf_steps(values, x_min),
                colors[i % colors.len()].stroke_width(2),
            ))?;
        }
    }
    // One legend for both panels, below them, where it hides no curve.
    for (i, (label, _)) in series.iter().enumerate() {
        let x = 330 + 170 * i as i32;
        let color = colors[i % colors.len()];
        legend.draw(&PathElement::new(
            vec![(x, 18), (x + 28, 18)],
            color.stroke_width(3),
        ))?;
        legend.draw(&Text::new(
            label.to_string(),
            (x + 36, 11),
            ("sans-serif", 15).into_font(),
        ))?;
    }
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The parts every run shares

/// One run's database (with the shop schema) and queue; removed by
/// [`Stage::finish`] whether or not the run worked.
struct Stage {
    db: FreshDatabase,
    broker: RabbitBroker,
    topology: Topology,
}

impl Stage {
    async fn open(prefix: &str) -> anyhow::Result<Self> {
        let db = FreshDatabase::create(prefix, 8)
            .await
            .context("creating the run's database")?;
        let stage = async {
            shop::migrate(&db.pool)
                .await
                .context("applying the shop schema")?;
            let broker = RabbitBroker::connect(&url_from_env()).await?;
            let topology = Topology::durable(format!("eo.bench.{}", Uuid::new_v4().simple()));
            broker.declare(&topology).await?;
            anyhow::Ok((broker, topology))
        }
        .await;
        match stage {
            Ok((broker, topology)) => Ok(Self {
                db,
                broker,
                topology,
            }),
            Err(error) => {
                let _ = db.drop_database().await;
                Err(error)
            }
        }
    }

    async fn finish<T>(self, outcome: anyhow::Result<T>) -> anyhow::Result<T> {
        let deleted = self.broker.delete(&self.topology).await;
        let _ = self.broker.close().await;
        self.db.pool.close().await;
        let dropped = drop_database(&self.db.name).await;
        let value = outcome?;
        deleted.context("deleting the run's queue")?;
        dropped.context("dropping the run's database")?;
        Ok(value)
    }
}

/// Drops the database, waiting out an autovacuum worker in it: `DROP
/// DATABASE … WITH (FORCE)` may not end a superuser's process, and a big
/// load or cleanup is just what wakes autovacuum.
async fn drop_database(name: &str) -> Result<(), databases::DatabaseError> {
    let mut tries = 0;
    loop {
        match databases::drop_database(name).await {
            Err(databases::DatabaseError::Sql(error)) if tries < 60 && in_use(&error) => {
                tries += 1;
                if tries == 1 {
                    eprintln!("dropping {name}: {error}; retrying for up to a minute");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// Someone we may not end is still in the database: 42501 (not allowed to
/// signal that backend) or 55006 (object in use).
fn in_use(error: &sqlx::Error) -> bool {
    let code = error.as_database_error().and_then(|e| e.code());
    matches!(code.as_deref(), Some("42501" | "55006"))
}

/// Relays running in this process, each with its own pool and publisher.
struct RelayGroup {
    running: Vec<RunningRelay>,
}

struct RunningRelay {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), RelayError>>,
    pool: PgPool,
}

impl RelayGroup {
    async fn start(
        url: &str,
        publishers: Vec<Arc<dyn Publisher>>,
        config: RelayConfig,
    ) -> anyhow::Result<Self> {
        let mut running = Vec::new();
        for publisher in publishers {
            let pool = databases::connect(url, 2).await?;
            let relay = Relay {
                pool: pool.clone(),
                publisher,
                config,
                faults: Arc::new(NoFaults),
                observer: Arc::new(Unobserved),
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let handle = tokio::spawn(async move {
                relay
                    .run(async move {
                        let _ = stopped.await;
                    })
                    .await
            });
            running.push(RunningRelay { stop, handle, pool });
        }
        Ok(Self { running })
    }

    /// Fails if a relay returned (with an error: nothing told it to stop).
    fn check_running(&self) -> anyhow::Result<()> {
        if self.running.iter().any(|relay| relay.handle.is_finished()) {
            bail!("a relay stopped on its own");
        }
        Ok(())
    }

    async fn stop(self) -> anyhow::Result<()> {
        let mut first_error = None;
        for RunningRelay { stop, handle, pool } in self.running {
            let _ = stop.send(());
            let outcome = match handle.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(anyhow::Error::new(error).context("the relay failed")),
                Err(panic) => Err(anyhow::anyhow!("the relay task panicked: {panic}")),
            };
            pool.close().await;
            if let Err(error) = outcome {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A publisher that notes when each order's confirm arrived (the relay's
/// publish future returned: the broker acked it).
struct TimedPublisher {
    inner: Arc<dyn Publisher>,
    confirmed: Arc<Mutex<HashMap<Uuid, Instant>>>,
}

#[async_trait::async_trait]
impl Publisher for TimedPublisher {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        self.inner.publish(message).await?;
        let at = Instant::now();
        // The relay's key is the order id (the outbox row's aggregate id).
        if let Ok(order_id) = message.key.parse::<Uuid>() {
            self.confirmed
                .lock()
                .expect("confirms lock")
                .entry(order_id)
                .or_insert(at);
        }
        Ok(())
    }
}

/// A publisher that counts confirms, and how long at least one publish
/// was waiting for its confirm: the rest of a drain is the relay's SQL
/// (claim and mark) and its loop.
struct CountingPublisher {
    inner: Arc<dyn Publisher>,
    confirmed: Arc<AtomicU64>,
    in_flight: Arc<Mutex<InFlight>>,
}

#[derive(Debug, Default)]
struct InFlight {
    publishes: usize,
    since: Option<Instant>,
    busy: Duration,
}

#[async_trait::async_trait]
impl Publisher for CountingPublisher {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            if in_flight.publishes == 0 {
                in_flight.since = Some(Instant::now());
            }
            in_flight.publishes += 1;
        }
        let published = self.inner.publish(message).await;
        {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            in_flight.publishes -= 1;
            if in_flight.publishes == 0 {
                if let Some(since) = in_flight.since.take() {
                    in_flight.busy += since.elapsed();
                }
            }
        }
        published?;
        self.confirmed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A consumer that notes when each order's event arrived, and acks it.
struct ArrivalConsumer {
    arrivals: Arc<Mutex<HashMap<Uuid, Instant>>>,
    stop: oneshot::Sender<()>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl ArrivalConsumer {
    fn spawn(mut receiver: RabbitReceiver) -> Self {
        let arrivals = Arc::new(Mutex::new(HashMap::new()));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let noted = arrivals.clone();
        let handle = tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    biased;
                    _ = &mut stopped => return Ok(()),
                    batch = receiver.receive(1000, Duration::from_millis(200)) => batch?,
                };
                let at = Instant::now();
                {
                    let mut noted = noted.lock().expect("arrivals lock");
                    for delivery in &batch {
                        let event = PaymentEvent::decode(&delivery.payload)
                            .context("a delivered payload is not a payment event")?;
                        noted.entry(event.order_id).or_insert(at);
                    }
                }
                for delivery in &batch {
                    receiver.ack(delivery).await?;
                }
            }
        });
        Self {
            arrivals,
            stop,
            handle,
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.handle.await.context("the consumer task panicked")?
    }
}

#[derive(Debug, Clone, Copy)]
struct Commit {
    order_id: Uuid,
    /// When `place_order` returned: its COMMIT was acknowledged.
    at: Instant,
}

/// Places orders at a steady pace until stopped, each in a task of its own:
/// an open loop, so a slow commit does not hold back the orders after it
/// (a stall shows as latency, not as a quietly lower rate).
///
/// The producer has a thread, a runtime and a pool of its own, so that the
/// instant it notes after each COMMIT is not late because the relay's or
/// the consumer's tasks were ahead of it in a shared run queue (a late
/// commit instant would make every latency look shorter than it was).
struct Producer {
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<anyhow::Result<Vec<Commit>>>,
}

impl Producer {
    fn spawn(url: &str, rate: u32) -> anyhow::Result<Self> {
        let (stop, stopped) = watch::channel(false);
        let url = url.to_owned();
        let thread = std::thread::Builder::new()
            .name("producer".to_owned())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("the producer's runtime")?
                    .block_on(produce(url, rate, stopped))
            })
            .context("starting the producer thread")?;
        Ok(Self { stop, thread })
    }

    async fn stop(self) -> anyhow::Result<Vec<Commit>> {
        let _ = self.stop.send(true);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("waiting for the producer thread")?
            .map_err(|_| anyhow::anyhow!("the producer thread panicked"))?
    }
}

async fn produce(
    url: String,
    rate: u32,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<Vec<Commit>> {
    let pool = databases::connect(&url, 8).await?;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let started = tokio::time::Instant::now();
    let commits = Arc::new(Mutex::new(Vec::new()));
    let mut placing = JoinSet::new();
    for n in 0u64.. {
        let due = started + period.mul_f64(n as f64);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stopped.changed() => break,
        }
        while let Some(placed) = placing.try_join_next() {
            placed??;
        }
        let pool = pool.clone();
        let commits = commits.clone();
        placing.spawn(async move {
            let order = Order {
                order_id: Uuid::new_v4(),
                amount_cents: 100 + (n % 50_000) as i64,
                currency: "EUR".to_owned(),
            };
            shop::outbox_producer::place_order(&pool, &shop::naive_producer::NoFaults, &order)
                .await
                .context("placing an order")?;
            let at = Instant::now();
            commits.lock().expect("commits lock").push(Commit {
                order_id: order.order_id,
                at,
            });
            anyhow::Ok(())
        });
    }
    while let Some(placed) = placing.join_next().await {
        placed??;
    }
    pool.close().await;
    let commits = std::mem::take(&mut *commits.lock().expect("commits lock"));
    Ok(commits)
}

/// Counts `relay_queries_total` increments, the relay's own count of the SQL
/// statements it sends; every other metric is dropped. The relay modes run
/// one after another, so the count between two readings is one relay's.
struct QueryCounter;

static QUERIES: AtomicU64 = AtomicU64::new(0);

fn queries_so_far() -> u64 {
    QUERIES.load(Ordering::Relaxed)
}

struct StaticCounter;

impl metrics::CounterFn for StaticCounter {
    fn increment(&self, value: u64) {
        QUERIES.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        QUERIES.fetch_max(value, Ordering::Relaxed);
    }
}

impl metrics::Recorder for QueryCounter {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        if key.name() == relay::metrics::QUERIES {
            metrics::Counter::from_arc(Arc::new(StaticCounter))
        } else {
            metrics::Counter::noop()
        }
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}
