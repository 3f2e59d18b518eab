//! `dedup-retention`: keep the consumer's dedup table (`processed_messages`)
//! small without deleting a row the broker may still need.
//!
//! - `cleanup` deletes rows older than the window, in short batches.
//! - `check` says whether the window outlasts the broker's redelivery
//!   horizon; exit 0 when safe, 1 when unsafe (2 on any other error).
//! - `measure` loads a throwaway database and reports what a cleanup costs,
//!   including the latency a concurrent consumer's INSERTs see meanwhile.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::{Args, Parser, Subcommand};
use consumer::retention::{
    check, delete_expired, format_duration, parse_duration, CleanupReport, RedeliveryHorizon,
    RetentionPolicy,
};
use databases::cleanup::parse_share;
use databases::FreshDatabase;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "dedup-retention",
    about = "Keep the dedup table small without deleting a row the broker may still redeliver",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Delete dedup rows older than the window, in short batches.
    Cleanup(CleanupArgs),
    /// Say whether the window outlasts the redelivery horizon (exit 1 if not).
    Check(CheckArgs),
    /// Measure a cleanup on a throwaway database: speed, and what a
    /// concurrent consumer's INSERTs pay meanwhile.
    Measure(MeasureArgs),
}

#[derive(Debug, Args)]
struct CleanupArgs {
    /// The shop database that holds `processed_messages`.
    #[arg(long, env = "EO_SHOP_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Rows processed longer ago than this are deleted (30s, 15m, 4h, 7d).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    window: Duration,
    /// Rows deleted per transaction.
    #[arg(long, default_value_t = RetentionPolicy::DEFAULT_BATCH_SIZE)]
    batch_size: i64,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The retention window that cleanup uses.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    window: Duration,
    /// Receives before dead-lettering (SQS maxReceiveCount, RabbitMQ delivery-limit).
    #[arg(long, default_value_t = 5)]
    max_receives: u32,
    /// How long one receive may hold a message (SQS visibility timeout,
    /// RabbitMQ consumer_timeout).
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    redelivery_timeout: Duration,
    /// How long a dead-lettered message may still be redriven (the DLQ's retention).
    #[arg(long, default_value = "4d", value_parser = parse_duration)]
    redrive_window: Duration,
}

#[derive(Debug, Args)]
struct MeasureArgs {
    /// Rows to load before the cleanup.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Share of the loaded rows older than the window (0 to 1).
    #[arg(long, default_value_t = 0.5, value_parser = parse_share)]
    expired_share: f64,
    /// Rows deleted per transaction.
    #[arg(long, default_value_t = RetentionPolicy::DEFAULT_BATCH_SIZE)]
    batch_size: i64,
    /// The retention window.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    window: Duration,
    /// The concurrent writer's pace, INSERTs per second.
    #[arg(long, default_value_t = 200)]
    writer_rate: u32,
    /// How long the writer runs alone before the cleanup starts.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    baseline: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.run().await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("dedup-retention: {}", describe(&error));
            // 1 means "unsafe" for `check`; anything that went wrong is 2.
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each said once: sqlx repeats a
/// database error's message in its source, and an on-call engineer should
/// read it once.
fn describe(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if line.contains(&part) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&part);
    }
    line
}

impl Command {
    async fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Command::Cleanup(args) => args.run().await,
            Command::Check(args) => Ok(args.run()),
            Command::Measure(args) => args.run().await,
        }
    }
}

impl CleanupArgs {
    async fn run(self) -> anyhow::Result<ExitCode> {
        let pool = databases::connect(&self.database_url, 1)
            .await
            .context("connecting to the shop database")?;
        let policy = RetentionPolicy {
            window: self.window,
            batch_size: self.batch_size,
        };
        let report = delete_expired(&pool, &policy)
            .await
            .context("deleting expired dedup rows")?;
        pool.close().await;
        println!("rows deleted: {}", report.rows_deleted);
        println!(
            "batches: {} (up to {} rows each)",
            report.batches, policy.batch_size
        );
        println!(
            "time: {:.3} s ({:.0} rows/s)",
            report.elapsed.as_secs_f64(),
            report.rows_per_second()
        );
        println!(
            "cutoff: {} (processed more than {} ago)",
            report.cutoff.format("%Y-%m-%dT%H:%M:%SZ"),
            format_duration(policy.window)
        );
        Ok(ExitCode::SUCCESS)
    }
}

impl CheckArgs {
    fn run(self) -> ExitCode {
        let horizon = RedeliveryHorizon {
            max_receives: self.max_receives,
            redelivery_timeout: self.redelivery_timeout,
            dead_letter_redrive_window: self.redrive_window,
        };
        let verdict = check(self.window, &horizon);
        println!("{verdict}");
        if verdict.is_safe() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}

// ---------------------------------------------------------------------------
// measure

/// Rows per INSERT while loading: big enough to be fast, small enough to
/// show progress.
const LOAD_CHUNK: u64 = 100_000;

/// Loads rows `$1 ..= $2` of `$3`, the first `$4` of them older than the
/// window. Ages in seconds, oldest first, as a real table fills: expired rows
/// spread over [window + margin, 2 × window], kept rows over
/// [0, window − margin]. The margin keeps every row clear of the cutoff,
/// which is taken seconds later, so "expired" is exact.
const LOAD: &str = "\
INSERT INTO processed_messages (event_id, order_id, processed_at)
SELECT gen_random_uuid(), gen_random_uuid(),
       now() - make_interval(secs => CASE
           WHEN i < $4 THEN $5 + $6 + ($4 - 1 - i)::float8 / GREATEST($4, 1) * ($5 - $6)
           ELSE ($3 - 1 - i)::float8 / GREATEST($3 - $4, 1) * ($5 - $6)
       END)
  FROM generate_series($1::bigint, $2::bigint) AS i";

/// What the concurrent writer is doing; it times every INSERT under the
/// phase in which the INSERT started.
const BEFORE: u8 = 0;
const DURING: u8 = 1;
const STOP: u8 = 2;

/// One writer INSERT: the same statement the hardened consumer runs first
/// in its payment transaction, committed on its own.
const WRITER_INSERT: &str = "INSERT INTO processed_messages (event_id, order_id) VALUES ($1, $2)";

impl MeasureArgs {
    async fn run(self) -> anyhow::Result<ExitCode> {
        ensure!(self.rows > 0, "--rows must be at least 1");
        ensure!(self.writer_rate > 0, "--writer-rate must be at least 1");
        let db = FreshDatabase::create("eo_retention", 4)
            .await
            .context("creating the measurement database")?;
        eprintln!("measuring in database {}", db.name);
        let measured = self.measure(&db.pool).await;
        // The database goes whether or not the measurement worked.
        let dropped = db
            .drop_database()
            .await
            .context("dropping the measurement database");
        let measurement = measured?;
        dropped?;
        print!("{}", measurement.markdown());
        Ok(ExitCode::SUCCESS)
    }

    async fn measure(&self, pool: &PgPool) -> anyhow::Result<Measurement> {
        consumer::migrate(pool)
            .await
            .context("applying the consumer schema")?;
        let expired = (self.rows as f64 * self.expired_share).round() as u64;
        self.load(pool, expired).await?;
        sqlx::raw_sql("ANALYZE processed_messages")
            .execute(pool)
            .await
            .context("ANALYZE")?;

        let older: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM processed_messages \
             WHERE processed_at < now() - make_interval(secs => $1)",
        )
        .bind(self.window.as_secs_f64())
        .fetch_one(pool)
        .await?;
        ensure!(
            older as u64 == expired,
            "loaded {older} rows older than the window, meant {expired}"
        );
        let size_before = table_size(pool).await?;

        // The writer starts first and runs alone for the baseline, then on
        // through the whole cleanup.
        let phase = Arc::new(AtomicU8::new(BEFORE));
        let writer = tokio::spawn(writer(pool.clone(), phase.clone(), self.writer_rate));
        eprintln!(
            "writer alone for {}, then cleanup",
            format_duration(self.baseline)
        );
        tokio::time::sleep(self.baseline).await;
        phase.store(DURING, Ordering::SeqCst);
        let policy = RetentionPolicy {
            window: self.window,
            batch_size: self.batch_size,
        };
        let cleanup = delete_expired(pool, &policy).await;
        phase.store(STOP, Ordering::SeqCst);
        let timings = writer.await.context("the writer task panicked")??;
        let cleanup = cleanup.context("deleting expired dedup rows")?;
        ensure!(
            cleanup.rows_deleted == expired,
            "cleanup deleted {} rows, {expired} were older than the window",
            cleanup.rows_deleted
        );

        let size_after = table_size(pool).await?;
        eprintln!("VACUUM");
        // VACUUM refuses to run inside a transaction block; a simple query runs it alone.
        sqlx::raw_sql("VACUUM processed_messages")
            .execute(pool)
            .await
            .context("VACUUM")?;
        let size_vacuumed = table_size(pool).await?;

        Ok(Measurement {
            rows: self.rows,
            expired,
            window: self.window,
            batch_size: self.batch_size,
            writer_rate: self.writer_rate,
            cleanup,
            before: Latencies::of(&timings, BEFORE),
            during: Latencies::of(&timings, DURING),
            size_before,
            size_after,
            size_vacuumed,
        })
    }

    async fn load(&self, pool: &PgPool, expired: u64) -> anyhow::Result<()> {
        let window = self.window.as_secs_f64();
        // Keeps generated ages clear of the cutoff without leaving the window.
        let margin = (window / 10.0).min(3600.0);
        let started = Instant::now();
        let mut first = 0u64;
        while first < self.rows {
            let last = (first + LOAD_CHUNK).min(self.rows) - 1;
            sqlx::query(LOAD)
                .bind(first as i64)
                .bind(last as i64)
                .bind(self.rows as i64)
                .bind(expired as i64)
                .bind(window)
                .bind(margin)
                .execute(pool)
                .await
                .context("loading rows")?;
            first = last + 1;
            eprintln!(
                "loaded {first}/{} rows ({:.1} s)",
                self.rows,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }
}

/// Inserts one row per transaction at `rate` per second on its own
/// connection, like a consumer, and times each INSERT + COMMIT.
async fn writer(
    pool: PgPool,
    phase: Arc<AtomicU8>,
    rate: u32,
) -> anyhow::Result<Vec<(u8, Duration)>> {
    let mut connection = pool.acquire().await.context("writer connection")?;
    // One untimed INSERT first: the first one also prepares the statement,
    // which no later INSERT pays for.
    insert_one(&mut connection).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    // A slow INSERT delays the next one instead of causing a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut timings = Vec::new();
    loop {
        tick.tick().await;
        let now = phase.load(Ordering::SeqCst);
        if now == STOP {
            return Ok(timings);
        }
        let started = Instant::now();
        insert_one(&mut connection).await?;
        timings.push((now, started.elapsed()));
    }
}

async fn insert_one(connection: &mut PgConnection) -> anyhow::Result<()> {
    let mut tx = connection.begin().await.context("writer BEGIN")?;
    sqlx::query(WRITER_INSERT)
        .bind(Uuid::new_v4())
        .bind(Uuid::new_v4())
        .execute(&mut *tx)
        .await
        .context("writer INSERT")?;
    tx.commit().await.context("writer COMMIT")
}

async fn table_size(pool: &PgPool) -> anyhow::Result<i64> {
    sqlx::query_scalar("SELECT pg_total_relation_size($1::regclass)")
        .bind("processed_messages")
        .fetch_one(pool)
        .await
        .context("reading the table size")
}

struct Latencies {
    count: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Latencies {
    fn of(timings: &[(u8, Duration)], phase: u8) -> Self {
        let mut sorted: Vec<Duration> = timings
            .iter()
            .filter(|(p, _)| *p == phase)
            .map(|(_, d)| *d)
            .collect();
        sorted.sort();
        Self {
            count: sorted.len(),
            p50: telemetry::nearest_rank(&sorted, 0.50).unwrap_or_default(),
            p99: telemetry::nearest_rank(&sorted, 0.99).unwrap_or_default(),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}

struct Measurement {
    rows: u64,
    expired: u64,
    window: Duration,
    batch_size: i64,
    writer_rate: u32,
    cleanup: CleanupReport,
    before: Latencies,
    during: Latencies,
    size_before: i64,
    size_after: i64,
    size_vacuumed: i64,
}

impl Measurement {
    fn markdown(&self) -> String {
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
        let mib = |bytes: i64| format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0));
        let rows = [
            ("rows loaded".to_owned(), thousands(self.rows)),
            (
                format!(
                    "rows older than the window ({})",
                    format_duration(self.window)
                ),
                thousands(self.expired),
            ),
            ("batch size".to_owned(), thousands(self.batch_size as u64)),
            (
                "rows deleted".to_owned(),
                thousands(self.cleanup.rows_deleted),
            ),
            ("batches".to_owned(), self.cleanup.batches.to_string()),
            (
                "cleanup wall time".to_owned(),
                format!("{:.2} s", self.cleanup.elapsed.as_secs_f64()),
            ),
            (
                "delete rate".to_owned(),
                format!(
                    "{} rows/s",
                    thousands(self.cleanup.rows_per_second().round() as u64)
                ),
            ),
            (
                format!(
                    "writer INSERTs timed, before / during cleanup ({} per s)",
                    self.writer_rate
                ),
                format!("{} / {}", self.before.count, self.during.count),
            ),
            (
                "writer INSERT+COMMIT p50, before / during".to_owned(),
                format!("{} / {}", ms(self.before.p50), ms(self.during.p50)),
            ),
            (
                "writer INSERT+COMMIT p99, before / during".to_owned(),
                format!("{} / {}", ms(self.before.p99), ms(self.during.p99)),
            ),
            (
                "writer INSERT+COMMIT max, before / during".to_owned(),
                format!("{} / {}", ms(self.before.max), ms(self.during.max)),
            ),
            (
                "table size before cleanup".to_owned(),
                mib(self.size_before),
            ),
            ("table size after cleanup".to_owned(), mib(self.size_after)),
            (
                "table size after VACUUM".to_owned(),
                mib(self.size_vacuumed),
            ),
        ];
        let mut out = String::from("| measure | value |\n|---|---:|\n");
        for (name, value) in rows {
            out.push_str(&format!("| {name} | {value} |\n"));
        }
        out
    }
}

/// `1000000` → `1,000,000`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
