//! Integration tests of the SQS backend against the real ElasticMQ that
//! `scripts/services-up` starts on loopback (`EO_SQS_ENDPOINT` overrides it).
//! The contract every broker shares is in `conformance.rs`; this file pins
//! down what is SQS's own (and where ElasticMQ differs from SQS).
//!
//! Every test declares its own uniquely named queue pair and deletes it again,
//! also when it fails (see [`TestQueue`]), so the tests run in parallel and
//! leave nothing behind. Timeouts are real: a 1 s visibility timeout really
//! runs out, which keeps the whole file at a few seconds of waiting.

mod support;

use std::time::{Duration, Instant};

use queue::sqs::{ReceiveSettings, SqsBroker, SqsReceiver, SqsSettings, SqsTopology};
use queue::{Delivery, OutgoingMessage, Publisher, QueueError, QueueInspector, Receipt, Receiver};

/// How long a test waits for something that should arrive promptly.
const ARRIVES: Duration = Duration::from_secs(5);
/// The shortest visibility timeout SQS takes besides 0.
const ONE_SECOND: Duration = Duration::from_secs(1);
/// Long enough that it never runs out during a test.
const LONG: Duration = Duration::from_secs(60);

fn unique_queue() -> String {
    format!("eo-test-{}", uuid::Uuid::new_v4().simple())
}

async fn connect() -> SqsBroker {
    SqsBroker::connect()
        .await
        .expect("ElasticMQ should be up (run scripts/services-up)")
}

fn message(id: &str, payload: &str) -> OutgoingMessage {
    OutgoingMessage {
        key: "order-1".into(),
        message_id: id.into(),
        payload: payload.as_bytes().to_vec(),
    }
}

/// Deletes the queue pair when dropped, so a failing test cleans up too.
/// A passing test calls [`TestQueue::delete`] and checks that it worked.
struct TestQueue {
    topology: SqsTopology,
    armed: bool,
}

impl TestQueue {
    async fn declared(broker: &SqsBroker, visibility: Duration, max_receive_count: u32) -> Self {
        let this = Self {
            topology: SqsTopology::new(unique_queue(), visibility, max_receive_count),
            armed: true,
        };
        broker.declare(&this.topology).await.expect("declare");
        this
    }

    /// Publishes one message; the test fails if SQS does not take it.
    async fn publish(&self, broker: &SqsBroker, message: &OutgoingMessage) {
        broker
            .publisher(&self.topology)
            .await
            .expect("publisher")
            .publish(message)
            .await
            .expect("a 200 from SendMessage");
    }

    /// A receiver with the queue's own visibility timeout.
    async fn receiver(&self, broker: &SqsBroker) -> SqsReceiver {
        broker
            .receiver(&self.topology, ReceiveSettings::default())
            .await
            .expect("receiver")
    }

    async fn delete(mut self) {
        self.armed = false;
        let broker = connect().await;
        broker
            .delete(&self.topology)
            .await
            .expect("delete topology");
        for queue in [
            self.topology.queue.clone(),
            self.topology.dead_letter_queue(),
        ] {
            let result = broker.queue_url(&queue).await;
            assert!(result.is_err(), "{queue} still exists: {result:?}");
        }
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let topology = self.topology.clone();
        support::clean_up_on_own_runtime(|| async move {
            let _ = SqsBroker::new(SqsSettings::from_env())
                .delete(&topology)
                .await;
        });
    }
}

async fn receive_one(receiver: &mut impl Receiver, wait: Duration) -> Delivery {
    let mut batch = receiver.receive(1, wait).await.expect("receive");
    assert_eq!(batch.len(), 1, "expected one delivery, got {batch:?}");
    batch.pop().unwrap()
}

/// A short poll: returns at once with whatever is visible right now.
async fn assert_nothing_visible(receiver: &mut impl Receiver) {
    let batch = receiver.receive(10, Duration::ZERO).await.expect("receive");
    assert!(batch.is_empty(), "expected no delivery, got {batch:?}");
}

async fn counts(inspector: &queue::sqs::SqsInspector) -> (u64, u64, u64) {
    (
        inspector.ready_count().await.unwrap(),
        inspector.in_flight().await.unwrap(),
        inspector.dead_letter_count().await.unwrap(),
    )
}

#[tokio::test]
async fn published_message_is_received_once_and_gone_after_ack() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, LONG, 5).await;
    let inspector = broker.inspector(&queue.topology);
    let publisher = broker.publisher(&queue.topology).await.unwrap();
    publisher
        .publish(&message("m-1", r#"{"order":1}"#))
        .await
        .expect("a 200 from SendMessage");
    assert_eq!(counts(&inspector).await, (1, 0, 0));

    let mut receiver = queue.receiver(&broker).await;
    let delivery = receive_one(&mut receiver, ARRIVES).await;
    assert_eq!(delivery.payload, br#"{"order":1}"#);
    assert_eq!(delivery.message_id.as_deref(), Some("m-1"));
    assert_eq!(delivery.delivery_count, Some(1));
    assert!(!delivery.redelivered);
    assert!(matches!(delivery.receipt, Receipt::ReceiptHandle(_)));
    // Held by us: not ready, in flight.
    assert_eq!(counts(&inspector).await, (0, 1, 0));

    receiver.ack(&delivery).await.expect("ack");
    assert_eq!(counts(&inspector).await, (0, 0, 0));
    assert_nothing_visible(&mut receiver).await;
    queue.delete().await;
}

#[tokio::test]
async fn an_unacked_message_comes_back_when_the_visibility_timeout_runs_out() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, ONE_SECOND, 5).await;
    queue.publish(&broker, &message("m-2", "slow")).await;
    let mut first_consumer = queue.receiver(&broker).await;
    let mut second_consumer = queue.receiver(&broker).await;

    let first = receive_one(&mut first_consumer, ARRIVES).await;
    let received_at = Instant::now();
    assert_eq!(first.delivery_count, Some(1));
    // Hidden while the first consumer "works" on it.
    assert_nothing_visible(&mut second_consumer).await;

    // No ack: after the 1 s timeout the other consumer gets it again.
    let second = receive_one(&mut second_consumer, ARRIVES).await;
    let hidden_for = received_at.elapsed();
    assert!(
        hidden_for >= Duration::from_millis(900),
        "came back after only {hidden_for:?}"
    );
    assert_eq!(second.message_id.as_deref(), Some("m-2"));
    assert_eq!(second.payload, b"slow");
    assert_eq!(second.delivery_count, Some(2));
    assert!(second.redelivered);
    assert_ne!(
        first.receipt, second.receipt,
        "each receive has a receipt handle of its own"
    );

    // The first consumer finishes late and acks with its stale receipt:
    // ElasticMQ refuses it, and the message stays with the second consumer.
    let late = first_consumer.ack(&first).await;
    assert!(
        matches!(late, Err(QueueError::LeaseExpired { .. })),
        "{late:?}"
    );
    let late_heartbeat = first_consumer
        .lease_keeper()
        .expect("SQS has leases")
        .extend(&first, Duration::from_secs(5))
        .await;
    assert!(
        matches!(late_heartbeat, Err(QueueError::LeaseExpired { .. })),
        "{late_heartbeat:?}"
    );
    let inspector = broker.inspector(&queue.topology);
    assert_eq!(counts(&inspector).await, (0, 1, 0));

    second_consumer.ack(&second).await.expect("current receipt");
    assert_eq!(counts(&inspector).await, (0, 0, 0));
    queue.delete().await;
}

#[tokio::test]
async fn requeue_makes_the_message_visible_at_once() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, LONG, 5).await;
    queue.publish(&broker, &message("m-3", "again")).await;
    let mut receiver = queue.receiver(&broker).await;
    let first = receive_one(&mut receiver, ARRIVES).await;
    receiver.requeue(&first).await.expect("requeue");

    // Short poll: no waiting for the 60 s visibility timeout.
    let again = receive_one(&mut receiver, Duration::ZERO).await;
    assert_eq!(again.message_id.as_deref(), Some("m-3"));
    assert_eq!(again.delivery_count, Some(2));
    assert!(again.redelivered);
    receiver.ack(&again).await.unwrap();
    queue.delete().await;
}

#[tokio::test]
async fn extend_lease_keeps_the_message_hidden_past_the_original_timeout() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, ONE_SECOND, 5).await;
    queue.publish(&broker, &message("m-4", "long job")).await;
    let mut worker = queue.receiver(&broker).await;
    let mut other = queue.receiver(&broker).await;
    let delivery = receive_one(&mut worker, ARRIVES).await;
    let received_at = Instant::now();
    worker
        .extend_lease(&delivery, Duration::from_secs(3))
        .await
        .expect("extend_lease");

    // Well past the queue's 1 s, still hidden.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_nothing_visible(&mut other).await;

    // Once the extended lease runs out it is handed out again.
    let again = receive_one(&mut other, ARRIVES).await;
    assert!(
        received_at.elapsed() >= Duration::from_millis(2900),
        "came back after {:?}",
        received_at.elapsed()
    );
    assert_eq!(again.delivery_count, Some(2));
    other.ack(&again).await.unwrap();
    queue.delete().await;
}

#[tokio::test]
async fn receive_settings_override_the_queue_visibility_timeout() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, LONG, 5).await;
    queue
        .publish(&broker, &message("m-4b", "short lease"))
        .await;
    let mut short = broker
        .receiver(
            &queue.topology,
            ReceiveSettings {
                visibility_timeout: Some(ONE_SECOND),
            },
        )
        .await
        .unwrap();
    let first = receive_one(&mut short, ARRIVES).await;
    // Back after 1 s, not after the queue's 60 s.
    let again = receive_one(&mut short, ARRIVES).await;
    assert_eq!(first.message_id, again.message_id);
    assert_eq!(again.delivery_count, Some(2));
    short.ack(&again).await.unwrap();
    queue.delete().await;
}

#[tokio::test]
async fn batches_are_received_ten_at_a_time_and_deleted_in_batches() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, LONG, 5).await;
    let publisher = broker.publisher(&queue.topology).await.unwrap();
    for i in 0..15 {
        publisher
            .publish(&message(&format!("m-5-{i}"), &i.to_string()))
            .await
            .unwrap();
    }
    let inspector = broker.inspector(&queue.topology);
    assert_eq!(counts(&inspector).await, (15, 0, 0));

    let mut receiver = queue.receiver(&broker).await;
    let mut held = receiver.receive(100, ARRIVES).await.unwrap();
    assert!(
        (1..=10).contains(&held.len()),
        "at most 10 per receive: {}",
        held.len()
    );
    // No order is asserted: a standard queue only tries to keep one, and
    // ElasticMQ under a loaded machine does not always either.
    while held.len() < 15 {
        let more = receiver.receive(100, ARRIVES).await.unwrap();
        assert!(!more.is_empty(), "only {} of 15 arrived", held.len());
        held.extend(more);
    }
    let mut ids: Vec<_> = held.iter().filter_map(|d| d.message_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 15, "15 distinct messages");
    assert_eq!(counts(&inspector).await, (0, 15, 0));

    // 15 deletes: two DeleteMessageBatch calls (10 + 5).
    receiver.delete_batch(&held).await.expect("ack_batch");
    assert_eq!(counts(&inspector).await, (0, 0, 0));
    assert_nothing_visible(&mut receiver).await;

    // Deleting the same receipts again: ElasticMQ reports each one, and a
    // receipt that no longer holds the message is a lease that ran out.
    let again = receiver.delete_batch(&held[..2]).await;
    match again {
        Err(QueueError::LeaseExpired { operation, reason }) => {
            assert_eq!(operation, "DeleteMessageBatch");
            assert!(reason.contains("2 of 2 deletes failed"), "{reason}")
        }
        other => panic!("expected the batch's receipts to be stale, got {other:?}"),
    }
    queue.delete().await;
}

#[tokio::test]
async fn the_redrive_policy_moves_a_message_to_the_dlq_after_max_receives() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, ONE_SECOND, 2).await;
    let inspector = broker.inspector(&queue.topology);
    queue.publish(&broker, &message("m-6", "never acked")).await;
    let mut receiver = queue.receiver(&broker).await;

    let first = receive_one(&mut receiver, ARRIVES).await;
    assert_eq!(first.delivery_count, Some(1));
    let second = receive_one(&mut receiver, ARRIVES).await;
    assert_eq!(second.delivery_count, Some(2));

    // The second lease runs out. ElasticMQ does not move the message on its
    // own: until someone receives again, it sits in the main queue, visible.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(counts(&inspector).await, (1, 0, 0));

    // The third receive attempt finds it over maxReceiveCount and moves it to
    // the DLQ instead of handing it out: that receive returns nothing.
    let third = receiver.receive(10, ONE_SECOND).await.unwrap();
    assert!(third.is_empty(), "{third:?}");
    assert_eq!(counts(&inspector).await, (0, 0, 1));

    let peeked = inspector.peek_dead_letters(10).await.unwrap();
    assert_eq!(peeked.len(), 1, "{peeked:?}");
    assert_eq!(peeked[0].payload, b"never acked");
    assert_eq!(peeked[0].reason, "", "the redrive gives no reason");
    // The message attributes travel along with the moved message.
    assert_eq!(peeked[0].message_id.as_deref(), Some("m-6"));
    queue.delete().await;
}

#[tokio::test]
async fn dead_lettered_message_moves_to_the_dlq_with_its_reason() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, LONG, 5).await;
    let inspector = broker.inspector(&queue.topology);
    queue.publish(&broker, &message("m-7", "poison")).await;
    let mut receiver = queue.receiver(&broker).await;
    let delivery = receive_one(&mut receiver, ARRIVES).await;
    receiver
        .dead_letter(&delivery, "amount is negative")
        .await
        .expect("dead_letter");

    // Gone from the main queue (not merely hidden), present in the DLQ.
    assert_eq!(counts(&inspector).await, (0, 0, 1));
    let peeked = inspector.peek_dead_letters(10).await.unwrap();
    assert_eq!(peeked.len(), 1, "{peeked:?}");
    assert_eq!(peeked[0].payload, b"poison");
    assert_eq!(peeked[0].reason, "amount is negative");
    assert_eq!(peeked[0].message_id.as_deref(), Some("m-7"));
    // A peek hides nothing: the next one sees it again.
    assert_eq!(inspector.dead_letter_count().await.unwrap(), 1);
    let again = inspector.peek_dead_letters(10).await.unwrap();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].reason, "amount is negative");
    queue.delete().await;
}

#[tokio::test]
async fn dead_letter_without_a_dlq_fails_and_keeps_the_message() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, LONG, 5).await;
    queue
        .publish(&broker, &message("m-8", "nowhere to go"))
        .await;
    let mut receiver = queue.receiver(&broker).await;
    let delivery = receive_one(&mut receiver, ARRIVES).await;

    // Misconfiguration: the DLQ is gone. The copy fails, so the original
    // must not be deleted.
    let dlq_url = broker
        .queue_url(&queue.topology.dead_letter_queue())
        .await
        .unwrap();
    broker
        .client()
        .delete_queue()
        .queue_url(dlq_url)
        .send()
        .await
        .unwrap();
    let result = receiver.dead_letter(&delivery, "bad").await;
    match result {
        Err(QueueError::Broker { operation, reason }) => {
            assert_eq!(operation, "GetQueueUrl");
            assert!(reason.contains("QueueDoesNotExist"), "{reason}");
            assert!(!reason.contains("raw: Response"), "too noisy: {reason}");
        }
        other => panic!("expected a broker error, got {other:?}"),
    }

    // Still ours and still in the main queue: requeue and receive it again.
    receiver.requeue(&delivery).await.unwrap();
    let again = receive_one(&mut receiver, ARRIVES).await;
    assert_eq!(again.message_id.as_deref(), Some("m-8"));

    // Declaring again recreates the DLQ (at once on ElasticMQ; SQS makes a
    // deleted name wait 60 s), and the same receiver dead-letters it.
    broker.declare(&queue.topology).await.expect("redeclare");
    receiver
        .dead_letter(&again, "second try")
        .await
        .expect("dead_letter once the DLQ is back");
    let inspector = broker.inspector(&queue.topology);
    assert_eq!(counts(&inspector).await, (0, 0, 1));
    let peeked = inspector.peek_dead_letters(10).await.unwrap();
    assert_eq!(peeked.len(), 1, "{peeked:?}");
    assert_eq!(peeked[0].reason, "second try");
    queue.delete().await;
}

#[tokio::test]
async fn declaring_twice_is_harmless_and_a_different_timeout_is_refused() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, LONG, 5).await;
    queue.publish(&broker, &message("m-9", "kept")).await;
    broker
        .declare(&queue.topology)
        .await
        .expect("second declare");
    let inspector = broker.inspector(&queue.topology);
    assert_eq!(counts(&inspector).await, (1, 0, 0), "nothing purged");

    let mut changed = queue.topology.clone();
    changed.visibility_timeout = Duration::from_secs(5);
    match broker.declare(&changed).await {
        Err(QueueError::Broker { operation, reason }) => {
            assert_eq!(operation, "CreateQueue");
            assert!(reason.contains("QueueNameExists"), "{reason}");
        }
        other => panic!("expected QueueNameExists, got {other:?}"),
    }
    assert_eq!(counts(&inspector).await, (1, 0, 0));
    queue.delete().await;
}

#[tokio::test]
async fn receive_on_an_empty_queue_long_polls_for_the_rounded_up_wait() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, LONG, 5).await;
    let mut receiver = queue.receiver(&broker).await;
    // 300 ms is rounded up to SQS's whole second.
    let started = Instant::now();
    let batch = receiver
        .receive(10, Duration::from_millis(300))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(batch.is_empty(), "{batch:?}");
    assert!(
        took >= Duration::from_millis(900),
        "returned after {took:?}"
    );
    assert!(took < Duration::from_millis(2500), "took {took:?}");

    // A long poll returns as soon as a message arrives.
    let publisher = broker.publisher(&queue.topology).await.unwrap();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        publisher.publish(&message("m-10", "late")).await.unwrap();
    });
    let started = Instant::now();
    let delivery = receive_one(&mut receiver, ARRIVES).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(delivery.message_id.as_deref(), Some("m-10"));
    receiver.ack(&delivery).await.unwrap();
    sender.await.unwrap();
    queue.delete().await;
}

#[tokio::test]
async fn queue_names_sqs_refuses_are_rejected_before_any_call() {
    // Not even a server is needed.
    let broker = SqsBroker::new(SqsSettings {
        endpoint: "http://127.0.0.1:1".into(),
        max_attempts: 1,
        ..SqsSettings::default()
    });
    let topology = SqsTopology::new("eo.test.dotted", LONG, 5);
    let result = broker.declare(&topology).await;
    match result {
        Err(QueueError::Broker { reason, .. }) => assert!(reason.contains("'.'"), "{reason}"),
        other => panic!("expected a validation error, got {other:?}"),
    }
    let fixed = SqsTopology::new(queue::sqs::queue_name("eo.test.dotted"), LONG, 5);
    assert_eq!(fixed.queue, "eo-test-dotted");
    assert!(fixed.validate().is_ok());
}

#[tokio::test]
async fn a_closed_port_says_how_to_start_the_broker() {
    let settings = SqsSettings {
        endpoint: "http://127.0.0.1:1".into(),
        max_attempts: 1,
        ..SqsSettings::default()
    };
    let error = match SqsBroker::connect_with(settings.clone()).await {
        Err(error) => error,
        Ok(_) => panic!("connected to port 1?"),
    };
    assert!(matches!(error, QueueError::Connect { .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("scripts/services-up"), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(text.contains("Connection refused"), "{text}");
    assert!(!text.contains("DispatchFailure {"), "no Debug dump: {text}");

    // The same for a broker made without the check, at its first call.
    let broker = SqsBroker::new(settings);
    let topology = SqsTopology::new("eo-test-closed", LONG, 5);
    let result = broker.receiver(&topology, ReceiveSettings::default()).await;
    match result {
        Err(error @ QueueError::Connect { .. }) => {
            assert!(error.to_string().contains("scripts/services-up"), "{error}")
        }
        Err(other) => panic!("expected Connect, got {other:?}"),
        Ok(_) => panic!("a receiver of a closed port?"),
    }
    let result = broker.inspector(&topology).ready_count().await;
    assert!(
        matches!(result, Err(QueueError::Connect { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn settling_with_a_foreign_receipt_is_refused() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, LONG, 5).await;
    let mut receiver = queue.receiver(&broker).await;
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
        receiver.extend_lease(&foreign, LONG).await,
        Err(QueueError::ForeignReceipt(_))
    ));
    assert!(matches!(
        receiver.dead_letter(&foreign, "x").await,
        Err(QueueError::ForeignReceipt(_))
    ));
    assert!(matches!(
        receiver.delete_batch(std::slice::from_ref(&foreign)).await,
        Err(QueueError::ForeignReceipt(_))
    ));
    // Nothing was sent to the DLQ on the way.
    assert_eq!(
        broker
            .inspector(&queue.topology)
            .dead_letter_count()
            .await
            .unwrap(),
        0
    );
    queue.delete().await;
}

#[tokio::test]
async fn a_payload_that_is_not_text_is_refused_before_sending() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker, LONG, 5).await;
    let publisher = broker.publisher(&queue.topology).await.unwrap();
    let result = publisher
        .publish(&OutgoingMessage {
            key: "k".into(),
            message_id: "m-11".into(),
            payload: vec![0xff, 0xfe],
        })
        .await;
    assert!(
        matches!(result, Err(QueueError::Broker { .. })),
        "{result:?}"
    );
    assert_eq!(
        broker
            .inspector(&queue.topology)
            .ready_count()
            .await
            .unwrap(),
        0
    );
    queue.delete().await;
}
