//! Outbox rows reach the consumers' topic through Debezium, on a real
//! Postgres, a real Kafka and a real Kafka Connect worker.

use std::time::{Duration, Instant};

use cdc::connector::Tuning;
use cdc::worker::Delivery;
use cdc::{ConnectSettings, ConnectWorker, OutboxConnector};
use databases::FreshDatabase;
use queue::kafka::{KafkaBroker, KafkaTopology};
use shop::naive_producer::NoFaults;
use shop::Order;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_become_one_record_each_on_the_consumers_topic() {
    let shop_db = FreshDatabase::create("eo_cdc_test", 3).await.unwrap();
    shop::apply_schema(&shop_db.pool).await.unwrap();
    let admin = databases::connect(&databases::admin_url(), 1)
        .await
        .unwrap();
    let brokers = queue::kafka::brokers_from_env();
    let kafka = KafkaBroker::connect(&brokers).await.unwrap();
    let topology = KafkaTopology::new(format!("eo.{}.payments", shop_db.name));
    kafka.declare(&topology).await.unwrap();
    let work_dir = std::env::temp_dir().join(format!("effectively-once-{}", shop_db.name));

    let result = async {
        let mut worker = ConnectWorker::start(
            &ConnectSettings::from_env(),
            &work_dir,
            &format!("eo.{}", shop_db.name),
            Delivery::ExactlyOnce,
        )
        .await?;
        let connector = OutboxConnector {
            name: "outbox".into(),
            database_url: shop_db.url.clone(),
            slot: shop_db.name.clone(),
            topic: topology.topic.clone(),
            delivery: Delivery::ExactlyOnce,
            tuning: Tuning::default(),
        };
        connector.register(&worker).await?;
        connector
            .wait_running(&worker, Duration::from_secs(60))
            .await?;
        cdc::slot::wait_active(&admin, &shop_db.name, Duration::from_secs(30)).await?;
        let orders: Vec<Order> = (0..20)
            .map(|i| Order {
                order_id: uuid::Uuid::new_v4(),
                amount_cents: 100 + i,
                currency: "EUR".into(),
            })
            .collect();
        for order in &orders {
            shop::outbox_producer::place_order(&shop_db.pool, &NoFaults, order).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let count = loop {
            let count = cdc::topic::count(&brokers, &topology.topic).await?;
            if count.distinct_events >= 20 || Instant::now() > deadline {
                break count;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        worker.kill().await?;
        anyhow::Ok((count, worker))
    }
    .await;

    cdc::slot::drop_slots_of_database(&admin, &shop_db.name)
        .await
        .unwrap();
    let _ = kafka.delete(&topology).await;
    let (count, worker) = result.unwrap();
    let _ = worker.remove().await;
    if count.distinct_events == 20 {
        let _ = std::fs::remove_dir_all(&work_dir);
    } else {
        eprintln!("Connect's log kept in {}", work_dir.display());
    }
    shop_db.drop_database().await.unwrap();
    assert_eq!(count.distinct_events, 20, "{count:?}");
    assert_eq!(
        count.records, 20,
        "no record twice without a crash: {count:?}"
    );
}
