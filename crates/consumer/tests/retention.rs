//! Retention of the dedup table against a real Postgres (the one that
//! `scripts/services-up` starts on loopback), and the `dedup-retention`
//! binary's `check` exit codes.
//!
//! Every test creates its own database and drops it again, also when it
//! fails, so the tests run in parallel and leave nothing behind.

use std::collections::BTreeSet;
use std::future::Future;
use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Utc};
use consumer::retention::{delete_expired, parse_duration, RetentionError, RetentionPolicy};
use databases::FreshDatabase;
use sqlx::PgPool;
use uuid::Uuid;

/// Runs `test` on a fresh database with the consumer's schema, then drops
/// the database whether the test passed or panicked.
async fn with_database<F, Fut>(test: F)
where
    F: FnOnce(PgPool) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let db = FreshDatabase::create("eo_test_retention", 4)
        .await
        .expect("a fresh database (is Postgres up? run scripts/services-up)");
    consumer::migrate(&db.pool).await.expect("schema");
    let outcome = tokio::spawn(test(db.pool.clone())).await;
    db.drop_database().await.expect("drop the test database");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
}

/// The database's clock: `processed_at` is written by its `now()`.
async fn db_now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Inserts one row per age, `processed_at = reference - age`, and returns
/// their event ids.
async fn insert_aged(pool: &PgPool, reference: DateTime<Utc>, ages: &[Duration]) -> Vec<Uuid> {
    let ids: Vec<Uuid> = ages.iter().map(|_| Uuid::new_v4()).collect();
    let times: Vec<DateTime<Utc>> = ages
        .iter()
        .map(|age| reference - chrono::Duration::from_std(*age).unwrap())
        .collect();
    sqlx::query(
        "INSERT INTO processed_messages (event_id, order_id, processed_at)
         SELECT event_id, gen_random_uuid(), processed_at
           FROM unnest($1::uuid[], $2::timestamptz[]) AS t(event_id, processed_at)",
    )
    .bind(&ids)
    .bind(&times)
    .execute(pool)
    .await
    .unwrap();
    ids
}

async fn remaining(pool: &PgPool) -> BTreeSet<Uuid> {
    sqlx::query_scalar("SELECT event_id FROM processed_messages")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

fn d(text: &str) -> Duration {
    parse_duration(text).unwrap()
}

#[tokio::test]
async fn cleanup_deletes_exactly_the_rows_older_than_the_window_in_batches() {
    with_database(|pool| async move {
        let now = db_now(&pool).await;
        // 250 rows from just past the window (7d + 1m) back to ~7d 4h old,
        // and 50 from just inside it (7d - 1m) to brand new.
        let old: Vec<Duration> = (0..250u64)
            .map(|i| d("7d 1m") + Duration::from_secs(i * 60))
            .collect();
        let young: Vec<Duration> = (0..50u64)
            .map(|i| d("7d") - d("1m") - Duration::from_secs(i * 3 * 3600))
            .collect();
        let old_ids = insert_aged(&pool, now, &old).await;
        let young_ids = insert_aged(&pool, now, &young).await;

        let policy = RetentionPolicy {
            window: d("7d"),
            batch_size: 100,
        };
        let report = delete_expired(&pool, &policy).await.unwrap();

        assert_eq!(report.rows_deleted, 250);
        assert_eq!(report.batches, 3, "100 + 100 + 50");
        assert!(report.cutoff >= now - chrono::Duration::days(7));
        let left = remaining(&pool).await;
        assert_eq!(left, young_ids.iter().copied().collect());
        assert!(old_ids.iter().all(|id| !left.contains(id)));

        // A second run finds nothing left to delete, in one batch.
        let again = delete_expired(&pool, &policy).await.unwrap();
        assert_eq!((again.rows_deleted, again.batches), (0, 1));
        assert_eq!(remaining(&pool).await.len(), 50);
    })
    .await;
}

#[tokio::test]
async fn an_exact_multiple_of_the_batch_size_ends_on_an_empty_batch() {
    with_database(|pool| async move {
        let now = db_now(&pool).await;
        let old: Vec<Duration> = (0..200u64)
            .map(|i| d("2h") + Duration::from_secs(i))
            .collect();
        insert_aged(&pool, now, &old).await;
        let kept = insert_aged(&pool, now, &[d("30m")]).await;

        let report = delete_expired(
            &pool,
            &RetentionPolicy {
                window: d("1h"),
                batch_size: 100,
            },
        )
        .await
        .unwrap();

        assert_eq!((report.rows_deleted, report.batches), (200, 3));
        assert_eq!(remaining(&pool).await, kept.into_iter().collect());
    })
    .await;
}

#[tokio::test]
async fn rows_the_consumer_inserts_now_are_never_deleted() {
    with_database(|pool| async move {
        // processed_at from the column default, exactly as the consumer writes it.
        let event_id = Uuid::new_v4();
        sqlx::query("INSERT INTO processed_messages (event_id, order_id) VALUES ($1, $2)")
            .bind(event_id)
            .bind(Uuid::new_v4())
            .execute(&pool)
            .await
            .unwrap();

        let report = delete_expired(
            &pool,
            &RetentionPolicy {
                window: d("30s"),
                batch_size: 10,
            },
        )
        .await
        .unwrap();

        assert_eq!(report.rows_deleted, 0);
        assert_eq!(remaining(&pool).await, BTreeSet::from([event_id]));
    })
    .await;
}

#[tokio::test]
async fn a_policy_that_would_loop_forever_or_delete_everything_is_refused() {
    with_database(|pool| async move {
        let now = db_now(&pool).await;
        insert_aged(&pool, now, &[d("1d")]).await;

        let zero_batch = delete_expired(
            &pool,
            &RetentionPolicy {
                window: d("1h"),
                batch_size: 0,
            },
        )
        .await;
        assert!(matches!(zero_batch, Err(RetentionError::BatchSize(0))));

        let zero_window = delete_expired(
            &pool,
            &RetentionPolicy {
                window: Duration::ZERO,
                batch_size: 10,
            },
        )
        .await;
        assert!(matches!(zero_window, Err(RetentionError::ZeroWindow)));
        assert_eq!(remaining(&pool).await.len(), 1, "nothing was deleted");
    })
    .await;
}

#[test]
fn durations_parse_as_the_runbook_writes_them() {
    assert_eq!(d("30s"), Duration::from_secs(30));
    assert_eq!(d("15m"), Duration::from_secs(900));
    assert_eq!(d("4h"), Duration::from_secs(14_400));
    assert_eq!(d("7d"), Duration::from_secs(604_800));
    assert_eq!(d("4d 2h 30m"), Duration::from_secs(4 * 86_400 + 9_000));
    assert!(parse_duration("7").is_err());
    assert!(parse_duration("7 days").is_err());
}

fn dedup_retention(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_dedup-retention"))
        .args(args)
        .output()
        .expect("run dedup-retention");
    (
        output.status.code(),
        String::from_utf8(output.stdout).unwrap(),
    )
}

#[test]
fn check_exits_zero_when_the_window_outlasts_the_horizon() {
    let (code, out) = dedup_retention(&[
        "check",
        "--window",
        "7d",
        "--max-receives",
        "5",
        "--redelivery-timeout",
        "30m",
        "--redrive-window",
        "4d",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        out.trim(),
        "safe: window 7d outlasts the redelivery horizon 4d 2h 30m \
         (5 receives × 30m + redrive window 4d) by 2d 21h 30m"
    );
}

#[test]
fn check_exits_one_and_names_the_minimum_when_the_window_is_too_short() {
    let (code, out) = dedup_retention(&["check", "--window", "24h", "--redrive-window", "4d"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.starts_with("UNSAFE: window 1d is 3d 2h 30m shorter"),
        "{out}"
    );
    assert!(
        out.contains("raise the window to at least 4d 2h 30m"),
        "{out}"
    );
}

#[test]
fn check_refuses_a_duration_without_a_unit() {
    let (code, _) = dedup_retention(&["check", "--window", "7"]);
    assert_eq!(code, Some(2), "a usage error, not a verdict");
}
