//! Outbox rows reach the consumers' topic through Debezium, on a real
//! Postgres, a real Kafka and a real Kafka Connect worker: one record per
//! event, also when the row is deleted in the transaction that wrote it
//! (Debezium reads the INSERT from the WAL, and its EventRouter drops the
//! DELETE and the tombstone after it).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cdc::connector::Tuning;
use cdc::topic::TopicCount;
use cdc::worker::Delivery;
use cdc::{ConnectSettings, ConnectWorker, OutboxConnector};
use databases::FreshDatabase;
use queue::kafka::{KafkaBroker, KafkaTopology};
use shop::naive_producer::NoFaults;
use shop::outbox_producer::RowAfterCommit::Deleted;
use shop::Order;
use sqlx::PgPool;

const EVENTS: u64 = 20;

/// One test's outbox → Debezium → topic, with its own database, topic,
/// Connect worker and slot, all removed by [`Pipeline::remove`].
struct Pipeline {
    shop: FreshDatabase,
    admin: PgPool,
    brokers: String,
    kafka: KafkaBroker,
    topology: KafkaTopology,
    work_dir: PathBuf,
    worker: Option<ConnectWorker>,
    connector: Option<OutboxConnector>,
}

impl Pipeline {
    async fn new(prefix: &str) -> Self {
        let shop = FreshDatabase::create(prefix, 3).await.unwrap();
        shop::migrate(&shop.pool).await.unwrap();
        let admin = databases::connect(&databases::admin_url(), 1)
            .await
            .unwrap();
        let brokers = queue::kafka::brokers_from_env();
        let kafka = KafkaBroker::connect(&brokers).await.unwrap();
        let topology = KafkaTopology::new(format!("eo.{}.payments", shop.name));
        kafka.declare(&topology).await.unwrap();
        let work_dir = std::env::temp_dir().join(format!("effectively-once-{}", shop.name));
        Self {
            shop,
            admin,
            brokers,
            kafka,
            topology,
            work_dir,
            worker: None,
            connector: None,
        }
    }

    /// Starts Connect, registers the connector, and returns once Debezium
    /// holds the slot (rows committed before it are not read).
    async fn connect(&mut self, delivery: Delivery) -> anyhow::Result<()> {
        let worker = self.worker.insert(
            ConnectWorker::start(
                &ConnectSettings::from_env(),
                &self.work_dir,
                &format!("eo.{}", self.shop.name),
                delivery,
            )
            .await?,
        );
        let connector = self.connector.insert(OutboxConnector {
            name: "outbox".into(),
            database_url: self.shop.url.clone(),
            slot: self.shop.name.clone(),
            topic: self.topology.topic.clone(),
            delivery,
            tuning: Tuning::default(),
        });
        connector.register(worker).await?;
        connector
            .wait_running(worker, Duration::from_secs(60))
            .await?;
        cdc::slot::wait_active(&self.admin, &self.shop.name, Duration::from_secs(30)).await?;
        Ok(())
    }

    /// What a read_committed reader finds, once `events` have arrived or
    /// 60 s have passed.
    async fn topic_once(&self, events: u64) -> anyhow::Result<TopicCount> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let count = cdc::topic::count(&self.brokers, &self.topology.topic).await?;
            if count.distinct_events >= events || Instant::now() > deadline {
                return Ok(count);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Everything goes: the worker, the slot (before its database), the
    /// topics. Connect's log stays when the test failed.
    async fn remove(mut self, passed: bool) {
        if let Some(worker) = self.worker.as_mut() {
            let _ = worker.kill().await;
        }
        cdc::slot::drop_slots_of_database(&self.admin, &self.shop.name)
            .await
            .unwrap();
        let _ = self.kafka.delete(&self.topology).await;
        if let Some(worker) = self.worker {
            let _ = worker.remove().await;
        }
        if passed {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        } else {
            eprintln!("Connect's log kept in {}", self.work_dir.display());
        }
        self.shop.drop_database().await.unwrap();
    }
}

fn order(i: u64) -> Order {
    Order {
        order_id: uuid::Uuid::new_v4(),
        amount_cents: 100 + i as i64,
        currency: "EUR".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_become_one_record_each_on_the_consumers_topic() {
    let mut pipeline = Pipeline::new("eo_cdc_test").await;
    let result = async {
        pipeline.connect(Delivery::ExactlyOnce).await?;
        for i in 0..EVENTS {
            shop::outbox_producer::place_order(&pipeline.shop.pool, &NoFaults, &order(i)).await?;
        }
        pipeline.topic_once(EVENTS).await
    }
    .await;
    let passed = result
        .as_ref()
        .is_ok_and(|count| count.distinct_events == EVENTS);
    pipeline.remove(passed).await;
    let count = result.unwrap();
    assert_eq!(count.distinct_events, EVENTS, "{count:?}");
    assert_eq!(
        count.records, EVENTS,
        "no record twice without a crash: {count:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_in_its_own_transaction_still_becomes_one_record() {
    let mut pipeline = Pipeline::new("eo_cdc_forget").await;
    let result = async {
        pipeline.connect(Delivery::AtLeastOnce).await?;
        let pool = pipeline.shop.pool.clone();
        for i in 0..EVENTS {
            shop::outbox_producer::place_order_without_notify(&pool, &NoFaults, &order(i), Deleted)
                .await?;
        }
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await?;
        let count = pipeline.topic_once(EVENTS).await?;
        // An order placed after the deletes still arrives: the DELETEs and
        // their tombstones did not fail the task.
        shop::outbox_producer::place_order_without_notify(&pool, &NoFaults, &order(999), Deleted)
            .await?;
        let after = pipeline.topic_once(EVENTS + 1).await?;
        if let (Some(connector), Some(worker)) = (&pipeline.connector, &pipeline.worker) {
            connector
                .wait_running(worker, Duration::from_secs(5))
                .await?;
        }
        anyhow::Ok((left, count, after))
    }
    .await;
    pipeline.remove(result.is_ok()).await;
    let (left, count, after) = result.unwrap();
    assert_eq!(left, 0, "the table keeps nothing");
    assert_eq!(count.distinct_events, EVENTS, "{count:?}");
    assert_eq!(count.records, EVENTS, "one record per event: {count:?}");
    assert_eq!(after.distinct_events, EVENTS + 1, "{after:?}");
    assert_eq!(after.records, EVENTS + 1, "{after:?}");
}
