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
    consumer::migrate(&db.pool).await.unwrap();
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

#[tokio::test]
async fn keyed_on_the_order_a_second_event_for_it_is_a_duplicate() {
    use consumer::dedup::{claim, recorded, Identity};
    let db = fresh().await;
    let first = event();
    let mut second = first.clone();
    second.event_id = Uuid::new_v4();
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        claim(&mut tx, &first, Identity::Order).await.unwrap(),
        FirstSeen::New
    );
    tx.commit().await.unwrap();

    // Keyed on the event, the second event is new: the failure chapter 3 measures.
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        claim(&mut tx, &second, Identity::Event).await.unwrap(),
        FirstSeen::New
    );
    tx.rollback().await.unwrap();
    // Keyed on the order, it is a duplicate, of the same payment.
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        claim(&mut tx, &second, Identity::Order).await.unwrap(),
        FirstSeen::Duplicate
    );
    tx.rollback().await.unwrap();
    let row = recorded(&db.pool, &second)
        .await
        .unwrap()
        .expect("the first row");
    assert_eq!(row.event_id, first.event_id);
    assert!(row.matches(&second));

    let mut other_amount = second.clone();
    other_amount.amount_cents += 1;
    assert!(!row.matches(&other_amount));
    assert!(row.mismatch_reason(&other_amount).contains(&format!(
        "order {} was already charged by event",
        first.order_id
    )));
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn the_same_event_id_with_another_amount_does_not_match_its_row() {
    use consumer::dedup::recorded;
    let db = fresh().await;
    let event = event();
    let mut tx = db.pool.begin().await.unwrap();
    insert_first(&mut tx, &event).await.unwrap();
    tx.commit().await.unwrap();
    let mut altered = event.clone();
    altered.amount_cents = 9_999;
    let row = recorded(&db.pool, &altered).await.unwrap().unwrap();
    assert!(row.matches(&event));
    assert!(!row.matches(&altered));
    assert!(row
        .mismatch_reason(&altered)
        .starts_with("dedup fingerprint mismatch: event"));
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn a_database_from_before_fingerprints_upgrades_in_place() {
    let db = FreshDatabase::create("consumer_dedup_test", 2)
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE processed_messages (event_id uuid NOT NULL, order_id uuid NOT NULL, \
         processed_at timestamptz NOT NULL DEFAULT now(), \
         CONSTRAINT processed_messages_event_id_key PRIMARY KEY (event_id))",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let old = event();
    sqlx::query("INSERT INTO processed_messages (event_id, order_id) VALUES ($1, $2)")
        .bind(old.event_id)
        .bind(old.order_id)
        .execute(&db.pool)
        .await
        .unwrap();
    consumer::migrate(&db.pool).await.unwrap();
    consumer::migrate(&db.pool).await.unwrap();
    // An old row has no fingerprint: a redelivery of it is a plain duplicate.
    let row = consumer::dedup::recorded(&db.pool, &old)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.fingerprint, None);
    assert!(row.matches(&old));
    db.drop_database().await.unwrap();
}
