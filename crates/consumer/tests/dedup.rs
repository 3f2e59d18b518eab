//! INSERT-first dedup against a real Postgres: what the primary key does to
//! a second transaction carrying the same event id.

use std::time::Duration;

use chrono::Utc;
use consumer::dedup::{insert_first, FirstSeen};
use databases::FreshDatabase;
use payments::PaymentEvent;
use uuid::Uuid;

async fn fresh() -> FreshDatabase {
    let db = FreshDatabase::create("consumer_dedup_test", 4)
        .await
        .expect("Postgres is up (scripts/services-up)");
    consumer::apply_schema(&db.pool).await.unwrap();
    db
}

fn event() -> PaymentEvent {
    PaymentEvent::new(Uuid::new_v4(), 4200, "EUR", Utc::now())
}

#[tokio::test]
async fn a_committed_event_is_a_duplicate_the_second_time() {
    let db = fresh().await;
    let event = event();
    let mut first = db.pool.begin().await.unwrap();
    assert_eq!(
        insert_first(&mut first, &event).await.unwrap(),
        FirstSeen::New
    );
    first.commit().await.unwrap();

    let mut second = db.pool.begin().await.unwrap();
    assert_eq!(
        insert_first(&mut second, &event).await.unwrap(),
        FirstSeen::Duplicate
    );
    second.rollback().await.unwrap();
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn a_concurrent_duplicate_waits_for_the_first_commit() {
    let db = fresh().await;
    let event = event();
    let mut first = db.pool.begin().await.unwrap();
    assert_eq!(
        insert_first(&mut first, &event).await.unwrap(),
        FirstSeen::New
    );

    let pool = db.pool.clone();
    let same = event.clone();
    let second = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        let seen = insert_first(&mut tx, &same).await.unwrap();
        tx.rollback().await.unwrap();
        seen
    });
    // The second INSERT cannot finish while the first holds the key.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "the second INSERT must block");

    first.commit().await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the second INSERT returns once the first commits")
        .unwrap();
    assert_eq!(seen, FirstSeen::Duplicate);
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn a_rolled_back_first_attempt_leaves_the_event_new() {
    let db = fresh().await;
    let event = event();
    let mut first = db.pool.begin().await.unwrap();
    insert_first(&mut first, &event).await.unwrap();

    let pool = db.pool.clone();
    let same = event.clone();
    let second = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        let seen = insert_first(&mut tx, &same).await.unwrap();
        tx.commit().await.unwrap();
        seen
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A consumer killed before COMMIT: Postgres rolls its transaction back.
    first.rollback().await.unwrap();
    assert_eq!(second.await.unwrap(), FirstSeen::New);
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn another_unique_violation_is_an_error_not_a_duplicate() {
    let db = fresh().await;
    // A unique index that has nothing to do with dedup: its violation must
    // surface as an error rather than be acked away as a duplicate.
    sqlx::raw_sql("CREATE UNIQUE INDEX one_row_per_order ON processed_messages (order_id)")
        .execute(&db.pool)
        .await
        .unwrap();
    let first = event();
    let mut other = event();
    other.order_id = first.order_id;
    let mut tx = db.pool.begin().await.unwrap();
    insert_first(&mut tx, &first).await.unwrap();
    assert!(insert_first(&mut tx, &other).await.is_err());
    tx.rollback().await.unwrap();
    db.drop_database().await.unwrap();
}

#[test]
fn the_idempotency_key_depends_on_the_event_id_only() {
    let event = event();
    let mut redelivered = event.clone();
    redelivered.created_at = Utc::now() + chrono::Duration::seconds(5);
    assert_eq!(
        consumer::dedup::idempotency_key(&event),
        consumer::dedup::idempotency_key(&redelivered)
    );
    assert_ne!(
        consumer::dedup::idempotency_key(&event),
        consumer::dedup::idempotency_key(&self::event())
    );
}
