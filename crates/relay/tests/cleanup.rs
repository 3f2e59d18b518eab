//! The outbox cleanup against a real Postgres (the one `scripts/services-up`
//! starts on loopback): it deletes sent rows older than the window, batch
//! by batch, and never a pending row, however old.
//!
//! Every test creates its own database and drops it again, also when it
//! fails, so the tests run in parallel and leave nothing behind.

use std::collections::BTreeSet;
use std::future::Future;
use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Utc};
use databases::FreshDatabase;
use relay::cleanup::{delete_sent, CleanupError};
use sqlx::PgPool;
use uuid::Uuid;

const DAY: Duration = Duration::from_secs(24 * 3600);
const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);
const WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// Runs `test` on a fresh database with the shop's schema, then drops the
/// database whether the test passed or panicked.
async fn with_database<F, Fut>(test: F)
where
    F: FnOnce(PgPool, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let db = FreshDatabase::create("eo_test_outbox_cleanup", 4)
        .await
        .expect("a fresh database (is Postgres up? run scripts/services-up)");
    shop::migrate(&db.pool).await.expect("schema");
    let outcome = tokio::spawn(test(db.pool.clone(), db.url.clone())).await;
    db.drop_database().await.expect("drop the test database");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
}

/// One outbox row to insert: how long ago it was created, and how long ago
/// it was sent (`None`: still pending).
#[derive(Debug, Clone, Copy)]
struct Aged {
    created: Duration,
    sent: Option<Duration>,
}

fn sent(ago: Duration) -> Aged {
    Aged {
        created: ago + MINUTE,
        sent: Some(ago),
    }
}

fn pending(created: Duration) -> Aged {
    Aged {
        created,
        sent: None,
    }
}

/// Inserts the rows in order (ids ascending), relative to the database's
/// clock, and returns their event ids.
async fn insert(pool: &PgPool, rows: &[Aged]) -> Vec<Uuid> {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .unwrap();
    let at = |ago: Duration| now - chrono::Duration::from_std(ago).unwrap();
    let ids: Vec<Uuid> = rows.iter().map(|_| Uuid::new_v4()).collect();
    let created: Vec<DateTime<Utc>> = rows.iter().map(|row| at(row.created)).collect();
    let sent: Vec<Option<DateTime<Utc>>> = rows.iter().map(|row| row.sent.map(at)).collect();
    // A pending row may well be claimed right now: the lease must not matter.
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_id, payload, created_at, attempts, sent_at, leased_until)
         SELECT event_id, gen_random_uuid(), '{}', created_at,
                1, sent_at, CASE WHEN sent_at IS NULL THEN now() + interval '1 minute' END
           FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[])
                WITH ORDINALITY AS t(event_id, created_at, sent_at, n)
          ORDER BY n",
    )
    .bind(&ids)
    .bind(&created)
    .bind(&sent)
    .execute(pool)
    .await
    .unwrap();
    ids
}

async fn remaining(pool: &PgPool) -> BTreeSet<Uuid> {
    sqlx::query_scalar("SELECT event_id FROM outbox")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test]
async fn deletes_only_sent_rows_older_than_the_window_across_batches() {
    with_database(|pool, _| async move {
        // Old and new, sent and pending, interleaved in id order: the rows a
        // batch finds are never the first ones of the table.
        let pattern = [
            (sent(8 * DAY), true),
            (pending(30 * DAY), false),
            (sent(WINDOW + HOUR), true),
            (sent(DAY), false),
            (pending(MINUTE), false),
            (sent(WINDOW - HOUR), false),
        ];
        let rows: Vec<(Aged, bool)> = (0..10).flat_map(|_| pattern).collect();
        let ids = insert(&pool, &rows.iter().map(|(row, _)| *row).collect::<Vec<_>>()).await;
        let expected: BTreeSet<Uuid> = ids
            .iter()
            .zip(&rows)
            .filter(|(_, (_, old))| !old)
            .map(|(id, _)| *id)
            .collect();

        let report = delete_sent(&pool, WINDOW, 3).await.unwrap();

        assert_eq!(report.rows_deleted, 20);
        // 20 rows, 3 at a time: six full batches, then one that finds 2.
        assert_eq!(report.batches, 7);
        assert_eq!(remaining(&pool).await, expected);
        let pending_left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(pending_left, 20, "every pending row is still there");
    })
    .await;
}

#[tokio::test]
async fn old_pending_rows_are_never_deleted_even_with_a_zero_window() {
    with_database(|pool, _| async move {
        let ids = insert(
            &pool,
            &[
                pending(365 * DAY),
                sent(HOUR),
                pending(MINUTE),
                sent(MINUTE),
            ],
        )
        .await;

        let report = delete_sent(&pool, Duration::ZERO, 1).await.unwrap();

        assert_eq!(report.rows_deleted, 2);
        assert_eq!(remaining(&pool).await, BTreeSet::from([ids[0], ids[2]]));
    })
    .await;
}

#[tokio::test]
async fn a_full_last_batch_is_followed_by_one_that_finds_nothing() {
    with_database(|pool, _| async move {
        insert(&pool, &[sent(8 * DAY); 6]).await;

        let report = delete_sent(&pool, WINDOW, 3).await.unwrap();

        assert_eq!(report.rows_deleted, 6);
        assert_eq!(report.batches, 3);
        assert!(remaining(&pool).await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_second_run_finds_nothing_in_one_batch() {
    with_database(|pool, _| async move {
        insert(&pool, &[sent(8 * DAY), sent(DAY), pending(8 * DAY)]).await;
        delete_sent(&pool, WINDOW, 5000).await.unwrap();

        let again = delete_sent(&pool, WINDOW, 5000).await.unwrap();

        assert_eq!(again.rows_deleted, 0);
        assert_eq!(again.batches, 1);
        assert_eq!(remaining(&pool).await.len(), 2);
    })
    .await;
}

#[tokio::test]
async fn a_batch_size_below_one_is_refused() {
    with_database(|pool, _| async move {
        insert(&pool, &[sent(8 * DAY)]).await;
        for batch_size in [0, -1] {
            assert!(matches!(
                delete_sent(&pool, WINDOW, batch_size).await,
                Err(CleanupError::BatchSize(n)) if n == batch_size
            ));
        }
        assert_eq!(remaining(&pool).await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn the_binary_takes_the_documented_flags() {
    with_database(|pool, url| async move {
        let ids = insert(
            &pool,
            &[sent(8 * DAY), sent(8 * DAY), sent(DAY), pending(9 * DAY)],
        )
        .await;

        let output = Command::new(env!("CARGO_BIN_EXE_outbox-cleanup"))
            .env("EO_SHOP_DATABASE_URL", &url)
            .args(["--window", "7d", "--batch-size", "1"])
            .output()
            .expect("run outbox-cleanup");

        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "outbox-cleanup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("rows deleted: 2"), "{stdout}");
        assert!(stdout.contains("batches: 3"), "{stdout}");
        assert_eq!(remaining(&pool).await, BTreeSet::from([ids[2], ids[3]]));

        let refused = Command::new(env!("CARGO_BIN_EXE_outbox-cleanup"))
            .args(["--database-url", &url, "--batch-size", "0"])
            .output()
            .expect("run outbox-cleanup");
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("batch size"));
    })
    .await;
}
