//! What only the Kafka backend does, against the real broker that
//! `scripts/services-up` starts (`EO_KAFKA_BROKERS` overrides the address).
//! The contract every broker shares is in `conformance.rs`.
//!
//! Every test declares its own uniquely named topic and deletes it again,
//! also when it fails (see [`TestTopic`]), so the tests run in parallel.

mod support;

use std::time::{Duration, Instant};

use queue::kafka::{brokers_from_env, KafkaBroker, KafkaReceiver, KafkaTopology};
use queue::{Delivery, OutgoingMessage, Publisher, QueueError, QueueInspector, Receipt, Receiver};

/// Long enough for a consumer to join its group and get its partitions.
const ARRIVES: Duration = Duration::from_secs(20);

async fn connect() -> KafkaBroker {
    KafkaBroker::connect(&brokers_from_env())
        .await
        .expect("Kafka should be up (run scripts/services-up)")
}

fn message(key: &str, id: &str) -> OutgoingMessage {
    OutgoingMessage {
        key: key.into(),
        message_id: id.into(),
        payload: id.as_bytes().to_vec(),
    }
}

/// Deletes the topics when dropped, so a failing test cleans up too.
struct TestTopic {
    topology: KafkaTopology,
    armed: bool,
}

impl TestTopic {
    async fn declared(broker: &KafkaBroker, topology: KafkaTopology) -> Self {
        broker.declare(&topology).await.expect("declare");
        Self {
            topology,
            armed: true,
        }
    }

    fn unique() -> KafkaTopology {
        KafkaTopology::new(format!("eo-test-{}", uuid::Uuid::new_v4().simple()))
    }

    async fn publish(&self, broker: &KafkaBroker, messages: &[OutgoingMessage]) {
        let publisher = broker.publisher(&self.topology).await.expect("publisher");
        for message in messages {
            publisher.publish(message).await.expect("a delivery report");
        }
    }

    async fn receiver(&self, broker: &KafkaBroker) -> KafkaReceiver {
        broker.receiver(&self.topology).await.expect("receiver")
    }

    async fn delete(mut self, broker: &KafkaBroker) {
        self.armed = false;
        broker.delete(&self.topology).await.expect("delete");
    }
}

impl Drop for TestTopic {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let topology = self.topology.clone();
        support::clean_up_on_own_runtime(|| async move {
            if let Ok(broker) = KafkaBroker::connect(&brokers_from_env()).await {
                let _ = broker.delete(&topology).await;
            }
        });
    }
}

async fn receive_one(receiver: &mut impl Receiver) -> Delivery {
    let mut batch = receiver.receive(1, ARRIVES).await.expect("receive");
    assert_eq!(batch.len(), 1, "one delivery per receive of one: {batch:?}");
    batch.pop().unwrap()
}

fn offset(delivery: &Delivery) -> (i32, i64) {
    match delivery.receipt {
        Receipt::Offset { partition, offset } => (partition, offset),
        ref other => panic!("not a Kafka receipt: {other:?}"),
    }
}

#[tokio::test]
async fn one_keys_messages_arrive_in_order_and_a_requeue_holds_back_the_rest() {
    let broker = connect().await;
    let topic = TestTopic::declared(&broker, TestTopic::unique()).await;
    let ids = ["m-1", "m-2", "m-3"];
    let messages: Vec<_> = ids.iter().map(|id| message("order-7", id)).collect();
    topic.publish(&broker, &messages).await;
    let mut receiver = topic.receiver(&broker).await;

    let first = receive_one(&mut receiver).await;
    assert_eq!(first.message_id.as_deref(), Some("m-1"));
    receiver.requeue(&first).await.expect("requeue");
    // The requeued message comes back before anything behind it.
    let again = receive_one(&mut receiver).await;
    assert_eq!(again.message_id.as_deref(), Some("m-1"));
    assert_eq!(offset(&again), offset(&first), "the same position");
    assert!(again.redelivered, "this process saw the offset before");
    receiver.ack(&again).await.unwrap();

    let mut positions = vec![offset(&first)];
    for id in &ids[1..] {
        let next = receive_one(&mut receiver).await;
        assert_eq!(next.message_id.as_deref(), Some(*id));
        assert!(!next.redelivered);
        positions.push(offset(&next));
        receiver.ack(&next).await.unwrap();
    }
    let partition = positions[0].0;
    assert!(
        positions.iter().all(|&(p, _)| p == partition),
        "one key, one partition: {positions:?}"
    );
    assert!(
        positions.windows(2).all(|w| w[0].1 < w[1].1),
        "{positions:?}"
    );
    assert_eq!(
        broker
            .inspector(&topic.topology)
            .unwrap()
            .lag()
            .await
            .unwrap(),
        0
    );
    topic.delete(&broker).await;
}

#[tokio::test]
async fn the_lag_counts_what_is_not_committed_held_or_not() {
    let broker = connect().await;
    let topic = TestTopic::declared(&broker, TestTopic::unique()).await;
    let inspector = broker.inspector(&topic.topology).unwrap();
    assert_eq!(inspector.lag().await.unwrap(), 0);
    topic
        .publish(&broker, &[message("a", "m-1"), message("a", "m-2")])
        .await;
    assert_eq!(inspector.lag().await.unwrap(), 2, "nothing committed yet");

    let mut receiver = topic.receiver(&broker).await;
    let held = receive_one(&mut receiver).await;
    assert_eq!(
        inspector.ready_count().await.unwrap(),
        2,
        "received is not committed"
    );
    receiver.ack(&held).await.unwrap();
    assert_eq!(inspector.lag().await.unwrap(), 1);
    let next = receive_one(&mut receiver).await;
    receiver.ack(&next).await.unwrap();
    assert_eq!(inspector.lag().await.unwrap(), 0);
    topic.delete(&broker).await;
}

/// The batched consumer's side: one receive takes what librdkafka has
/// fetched, one commit acks the batch, and a message handed back in the
/// middle holds the commit at itself, so a crash before it is received
/// again cannot skip it.
#[tokio::test]
async fn a_batch_commits_once_and_never_past_a_message_handed_back() {
    let broker = connect().await;
    let topology = KafkaTopology {
        partitions: 1,
        ..TestTopic::unique()
    };
    let topic = TestTopic::declared(&broker, topology).await;
    let messages: Vec<_> = (1..=6).map(|i| message("a", &format!("m-{i}"))).collect();
    topic.publish(&broker, &messages).await;
    let inspector = broker.inspector(&topic.topology).unwrap();
    let mut receiver = topic.receiver(&broker).await;

    let mut batch = receiver.receive(10, ARRIVES).await.expect("receive");
    // The first receive may come before the whole topic is fetched.
    while batch.len() < 6 {
        let more = receiver.receive(10 - batch.len(), ARRIVES).await.unwrap();
        assert!(!more.is_empty(), "only {} of 6 arrived", batch.len());
        batch.extend(more);
    }
    let offsets: Vec<i64> = batch.iter().map(|d| offset(d).1).collect();
    assert_eq!(offsets, [0, 1, 2, 3, 4, 5], "in offset order");

    // m-3 goes back; the batch acks the other five.
    receiver.requeue(&batch[2]).await.unwrap();
    let others: Vec<_> = batch
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, d)| d.clone())
        .collect();
    receiver.ack_batch(&others).await.unwrap();
    assert_eq!(
        inspector.lag().await.unwrap(),
        4,
        "committed up to m-3, not past it: m-3 and what follows are not done as far as a restart knows"
    );
    let again = receive_one(&mut receiver).await;
    assert_eq!(again.message_id.as_deref(), Some("m-3"));
    let mut rest = vec![again];
    while rest.len() < 4 {
        rest.extend(receiver.receive(4 - rest.len(), ARRIVES).await.unwrap());
    }
    receiver.ack_batch(&rest).await.unwrap();
    assert_eq!(
        inspector.lag().await.unwrap(),
        0,
        "all six done, one commit"
    );
    topic.delete(&broker).await;
}

/// Chapter 6's consumer side: the ack is the offset sent inside a Kafka
/// transaction, and the group's committed position moves only when the
/// transaction commits.
#[tokio::test]
async fn a_transactional_ack_commits_the_offset_in_a_transaction() {
    let broker = connect().await;
    let topology = KafkaTopology {
        transactional_ack: true,
        ..TestTopic::unique()
    };
    let topic = TestTopic::declared(&broker, topology).await;
    topic
        .publish(&broker, &[message("a", "m-1"), message("a", "m-2")])
        .await;
    let inspector = broker.inspector(&topic.topology).unwrap();

    let mut receiver = topic.receiver(&broker).await;
    let first = receive_one(&mut receiver).await;
    receiver.ack(&first).await.expect("transactional ack");
    assert_eq!(inspector.lag().await.unwrap(), 1);
    let second = receive_one(&mut receiver).await;
    receiver
        .dead_letter(&second, "refused")
        .await
        .expect("dead letter, then a transactional ack");
    assert_eq!(inspector.lag().await.unwrap(), 0);
    assert_eq!(inspector.dead_letter_count().await.unwrap(), 1);

    // A new member of the group starts after the committed offsets.
    drop(receiver);
    let mut fresh = topic.receiver(&broker).await;
    let nothing = fresh.receive(1, Duration::from_secs(5)).await.unwrap();
    assert!(nothing.is_empty(), "{nothing:?}");
    topic.delete(&broker).await;
}

#[tokio::test]
async fn redeclaring_with_another_partition_count_is_refused() {
    let broker = connect().await;
    let topic = TestTopic::declared(&broker, TestTopic::unique()).await;
    let wider = KafkaTopology {
        partitions: topic.topology.partitions + 1,
        ..topic.topology.clone()
    };
    match broker.declare(&wider).await {
        Err(QueueError::Broker { reason, .. }) => {
            assert!(
                reason.contains("exists with 3 partitions, not 4"),
                "{reason}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    topic.delete(&broker).await;
}

#[tokio::test]
async fn connecting_to_a_closed_port_says_how_to_start_the_broker() {
    let started = Instant::now();
    let error = match KafkaBroker::connect("127.0.0.1:1").await {
        Err(error) => error,
        Ok(_) => panic!("connected to port 1?"),
    };
    assert!(matches!(error, QueueError::Connect { .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(text.contains("scripts/services-up"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn settling_with_a_foreign_receipt_is_refused() {
    let broker = connect().await;
    let topic = TestTopic::declared(&broker, TestTopic::unique()).await;
    let mut receiver = topic.receiver(&broker).await;
    let foreign = Delivery {
        payload: b"x".to_vec(),
        message_id: None,
        redelivered: false,
        delivery_count: None,
        receipt: Receipt::DeliveryTag(7),
    };
    assert!(matches!(
        receiver.ack(&foreign).await,
        Err(QueueError::ForeignReceipt(_))
    ));
    assert!(matches!(
        receiver.requeue(&foreign).await,
        Err(QueueError::ForeignReceipt(_))
    ));
    assert!(matches!(
        receiver.dead_letter(&foreign, "x").await,
        Err(QueueError::ForeignReceipt(_))
    ));
    assert_eq!(
        broker
            .inspector(&topic.topology)
            .unwrap()
            .dead_letter_count()
            .await
            .unwrap(),
        0,
        "nothing was copied to the DLQ on the way"
    );
    topic.delete(&broker).await;
}

/// Leg 2's wrong setting still delivers on a healthy broker: `acks=1`
/// differs only in what survives the leader's death. On the book's one
/// broker the topic has one replica, led by that broker, and every
/// setting's topic says so in the cluster's metadata.
#[tokio::test]
async fn a_leader_ack_publisher_delivers_and_the_metadata_names_the_partitions_leader() {
    let broker = connect().await;
    let topic = TestTopic::declared(
        &broker,
        KafkaTopology {
            acks: queue::kafka::Acks::Leader,
            partitions: 1,
            ..TestTopic::unique()
        },
    )
    .await;
    topic.publish(&broker, &[message("order-1", "m-1")]).await;
    let mut receiver = topic.receiver(&broker).await;
    let delivery = receive_one(&mut receiver).await;
    assert_eq!(delivery.message_id.as_deref(), Some("m-1"));
    let replicas = broker
        .partition_replicas(&topic.topology.topic, 0)
        .await
        .expect("metadata");
    assert!(
        replicas.leader >= 0,
        "a partition with a leader: {replicas:?}"
    );
    assert_eq!(
        replicas.replicas,
        [replicas.leader],
        "one broker, one replica"
    );
    let missing = broker.partition_replicas(&topic.topology.topic, 7).await;
    assert!(missing.is_err(), "partition 7 does not exist: {missing:?}");
    drop(receiver);
    topic.delete(&broker).await;
}
