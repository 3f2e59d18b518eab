//! The outbox row may be deleted in the transaction that wrote it: Debezium
//! reads the INSERT from the WAL, and its EventRouter drops the DELETE (and
//! the tombstone after it), so each event still becomes exactly one record
//! and the connector keeps running.

use std::time::{Duration, Instant};

use cdc::connector::Tuning;
use cdc::worker::Delivery;
use cdc::{ConnectSettings, ConnectWorker, OutboxConnector};
use databases::FreshDatabase;
use queue::kafka::{KafkaBroker, KafkaTopology};
use shop::naive_producer::NoFaults;
use shop::outbox_producer::place_order_without_notify;
use shop::outbox_producer::RowAfterCommit::Deleted;
use shop::Order;

const EVENTS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_in_its_own_transaction_still_becomes_one_record() {
    let shop_db = FreshDatabase::create("eo_cdc_forget", 3).await.unwrap();
    shop::apply_schema(&shop_db.pool).await.unwrap();
    let admin = databases::connect(&databases::admin_url(), 1)
        .await
        .unwrap();
    let brokers = queue::kafka::brokers_from_env();
    let kafka = KafkaBroker::connect(&brokers).await.unwrap();
    let topology = KafkaTopology::new(format!("eo.{}.payments", shop_db.name));
    kafka.declare(&topology).await.unwrap();
    let work_dir = std::env::temp_dir().join(format!("effectively-once-{}", shop_db.name));
    let mut worker = None;

    let result = async {
        let started = worker.insert(
            ConnectWorker::start(
                &ConnectSettings::from_env(),
                &work_dir,
                &format!("eo.{}", shop_db.name),
                Delivery::AtLeastOnce,
            )
            .await?,
        );
        let connector = OutboxConnector {
            name: "outbox".into(),
            database_url: shop_db.url.clone(),
            slot: shop_db.name.clone(),
            topic: topology.topic.clone(),
            delivery: Delivery::AtLeastOnce,
            tuning: Tuning::default(),
        };
        connector.register(started).await?;
        connector
            .wait_running(started, Duration::from_secs(60))
            .await?;
        cdc::slot::wait_active(&admin, &shop_db.name, Duration::from_secs(30)).await?;
        for i in 0..EVENTS {
            let order = Order {
                order_id: uuid::Uuid::new_v4(),
                amount_cents: 100 + i as i64,
                currency: "EUR".into(),
            };
            place_order_without_notify(&shop_db.pool, &NoFaults, &order, Deleted).await?;
        }
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&shop_db.pool)
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let count = loop {
            let count = cdc::topic::count(&brokers, &topology.topic).await?;
            if count.distinct_events >= EVENTS || Instant::now() > deadline {
                break count;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        // Orders placed after the deletes still arrive: the DELETEs and
        // their tombstones did not fail the task.
        let order = Order {
            order_id: uuid::Uuid::new_v4(),
            amount_cents: 999,
            currency: "EUR".into(),
        };
        place_order_without_notify(&shop_db.pool, &NoFaults, &order, Deleted).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let after = loop {
            let after = cdc::topic::count(&brokers, &topology.topic).await?;
            if after.distinct_events > EVENTS || Instant::now() > deadline {
                break after;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        connector
            .wait_running(started, Duration::from_secs(5))
            .await?;
        anyhow::Ok((left, count, after))
    }
    .await;

    if let Some(worker) = worker.as_mut() {
        let _ = worker.kill().await;
    }
    cdc::slot::drop_slots_of_database(&admin, &shop_db.name)
        .await
        .unwrap();
    let _ = kafka.delete(&topology).await;
    if let Some(worker) = worker {
        let _ = worker.remove().await;
    }
    shop_db.drop_database().await.unwrap();
    let (left, count, after) = result.unwrap();
    let _ = std::fs::remove_dir_all(&work_dir);
    assert_eq!(left, 0, "the table keeps nothing");
    assert_eq!(count.distinct_events, EVENTS, "{count:?}");
    assert_eq!(count.records, EVENTS, "one record per event: {count:?}");
    assert_eq!(after.records, EVENTS + 1, "{after:?}");
}
