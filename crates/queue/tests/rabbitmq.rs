//! Integration tests of the RabbitMQ backend against the real broker that
//! `scripts/services-up` starts on loopback (`EO_AMQP_URL` overrides the URL).
//!
//! The contract every broker shares (receive and ack, requeue, dead letter,
//! a SIGKILLed consumer, declaring twice) is in `conformance.rs`; this file
//! pins down what is RabbitMQ's own.
//!
//! Every test declares its own uniquely named queue and deletes it again,
//! also when it fails (see [`TestQueue`]), so the tests run in parallel and
//! leave nothing behind.

mod support;

use std::time::{Duration, Instant};

use queue::rabbitmq::{url_from_env, RabbitBroker, Topology};
use queue::{Delivery, OutgoingMessage, Publisher, QueueError, QueueInspector, Receipt, Receiver};

/// How long a test waits for something that should arrive promptly.
const ARRIVES: Duration = Duration::from_secs(5);
/// How long a test waits to be reasonably sure something does NOT arrive.
const STAYS_AWAY: Duration = Duration::from_millis(300);

/// A queue name no other test (or earlier run) uses.
fn unique_queue() -> String {
    format!("eo.test.{}", uuid::Uuid::new_v4().simple())
}

async fn connect() -> RabbitBroker {
    RabbitBroker::connect(&url_from_env())
        .await
        .expect("RabbitMQ should be up (run scripts/services-up)")
}

fn message(id: &str, payload: &str) -> OutgoingMessage {
    OutgoingMessage {
        key: "order-1".into(),
        message_id: id.into(),
        payload: payload.as_bytes().to_vec(),
    }
}

/// Deletes the topology when dropped, so a failing test cleans up too.
/// A passing test calls [`TestQueue::delete`] and checks that it worked.
struct TestQueue {
    topology: Topology,
    armed: bool,
}

impl TestQueue {
    /// A declared, durable topology with a fresh name.
    async fn declared(broker: &RabbitBroker) -> Self {
        let this = Self::undeclared();
        broker.declare(&this.topology).await.expect("declare");
        this
    }

    /// A fresh name whose topology is never declared (deleted anyway at the end).
    fn undeclared() -> Self {
        Self {
            topology: Topology::durable(unique_queue()),
            armed: true,
        }
    }

    async fn delete(mut self) {
        self.armed = false;
        let broker = connect().await;
        broker
            .delete(&self.topology)
            .await
            .expect("delete topology");
        broker.close().await.expect("close");
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let topology = self.topology.clone();
        support::clean_up_on_own_runtime(|| async move {
            if let Ok(broker) = RabbitBroker::connect(&url_from_env()).await {
                let _ = broker.delete(&topology).await;
                let _ = broker.close().await;
            }
        });
    }
}

/// Receives exactly one delivery, failing the test if none arrives in time.
async fn receive_one(receiver: &mut impl Receiver) -> Delivery {
    let mut batch = receiver.receive(1, ARRIVES).await.expect("receive");
    assert_eq!(batch.len(), 1, "expected one delivery, got {batch:?}");
    batch.pop().unwrap()
}

async fn assert_nothing_arrives(receiver: &mut impl Receiver) {
    let batch = receiver.receive(10, STAYS_AWAY).await.expect("receive");
    assert!(batch.is_empty(), "expected no delivery, got {batch:?}");
}

// 1. ---------------------------------------------------------------------

#[tokio::test]
async fn published_message_is_received_once_and_gone_after_ack() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker).await;
    let inspector = broker.inspector(&queue.topology);

    let publisher = broker.publisher(&queue.topology).await.unwrap();
    publisher
        .publish(&message("m-1", r#"{"order":1}"#))
        .await
        .expect("a confirmed publish");
    // The confirm means the broker has it: it is counted right away.
    assert_eq!(inspector.ready_count().await.unwrap(), 1);

    let mut receiver = broker.receiver(&queue.topology, 10).await.unwrap();
    let delivery = receive_one(&mut receiver).await;
    assert_eq!(delivery.payload, br#"{"order":1}"#);
    assert_eq!(delivery.message_id.as_deref(), Some("m-1"));
    assert!(!delivery.redelivered, "first delivery: {delivery:?}");
    assert_eq!(delivery.delivery_count, None, "classic queues do not count");
    assert!(matches!(delivery.receipt, Receipt::DeliveryTag(_)));

    receiver.ack(&delivery).await.expect("ack");
    assert_eq!(inspector.ready_count().await.unwrap(), 0);
    assert_nothing_arrives(&mut receiver).await;

    // The ack really reached the broker: closing the connection (which would
    // requeue an unacked delivery) brings nothing back.
    broker.close().await.unwrap();
    let fresh = connect().await;
    assert_eq!(
        fresh
            .inspector(&queue.topology)
            .ready_count()
            .await
            .unwrap(),
        0
    );
    fresh.close().await.unwrap();
    queue.delete().await;
}

// 2. ---------------------------------------------------------------------

#[tokio::test]
async fn requeued_message_comes_back_marked_redelivered() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker).await;
    let publisher = broker.publisher(&queue.topology).await.unwrap();
    publisher.publish(&message("m-2", "again")).await.unwrap();

    let mut receiver = broker.receiver(&queue.topology, 10).await.unwrap();
    let first = receive_one(&mut receiver).await;
    assert!(!first.redelivered);
    receiver.requeue(&first).await.expect("requeue");

    let second = receive_one(&mut receiver).await;
    assert_eq!(second.payload, b"again");
    assert_eq!(second.message_id.as_deref(), Some("m-2"));
    assert!(
        second.redelivered,
        "a requeued message is redelivered: {second:?}"
    );
    assert_ne!(
        first.receipt, second.receipt,
        "each delivery gets its own tag"
    );
    receiver.ack(&second).await.unwrap();
    assert_nothing_arrives(&mut receiver).await;

    broker.close().await.unwrap();
    queue.delete().await;
}

// 3. ---------------------------------------------------------------------

#[tokio::test]
async fn unacked_message_is_redelivered_when_the_connection_closes() {
    let setup = connect().await;
    let queue = TestQueue::declared(&setup).await;
    let inspector = setup.inspector(&queue.topology);
    setup
        .publisher(&queue.topology)
        .await
        .unwrap()
        .publish(&message("m-3", "charge me once"))
        .await
        .unwrap();

    // Consumer A takes the message and its connection goes away before it
    // acks: no ack, no nack, no cancel.
    let doomed = connect().await;
    let mut first = doomed.receiver(&queue.topology, 1).await.unwrap();
    let taken = receive_one(&mut first).await;
    assert!(!taken.redelivered);
    assert_eq!(inspector.ready_count().await.unwrap(), 0, "held by A");
    doomed.close().await.unwrap();

    // Consumer B, on a connection of its own, gets the very same message.
    let survivor = connect().await;
    let mut second = survivor.receiver(&queue.topology, 1).await.unwrap();
    let again = receive_one(&mut second).await;
    assert_eq!(again.payload, b"charge me once");
    assert_eq!(again.message_id.as_deref(), Some("m-3"));
    assert!(again.redelivered, "at-least-once: {again:?}");
    second.ack(&again).await.unwrap();
    assert_nothing_arrives(&mut second).await;

    // A's receiver is dead for good; it says so instead of waiting forever.
    let ended = first.receive(1, STAYS_AWAY).await;
    assert!(matches!(ended, Err(QueueError::StreamClosed)), "{ended:?}");
    // And a late ack fails loudly rather than pretending to settle.
    let late = first.ack(&taken).await;
    assert!(matches!(late, Err(QueueError::Broker { .. })), "{late:?}");

    survivor.close().await.unwrap();
    setup.close().await.unwrap();
    queue.delete().await;
}

#[tokio::test]
async fn unacked_message_is_redelivered_when_every_handle_is_dropped() {
    let setup = connect().await;
    let queue = TestQueue::declared(&setup).await;
    setup
        .publisher(&queue.topology)
        .await
        .unwrap()
        .publish(&message("m-3b", "dropped"))
        .await
        .unwrap();

    {
        let doomed = connect().await;
        let mut receiver = doomed.receiver(&queue.topology, 1).await.unwrap();
        let taken = receive_one(&mut receiver).await;
        assert!(!taken.redelivered);
        // Dropping the broker and the receiver without a word: lapin closes
        // the connection once its last handle is gone.
    }

    let survivor = connect().await;
    let mut receiver = survivor.receiver(&queue.topology, 1).await.unwrap();
    let again = receive_one(&mut receiver).await;
    assert_eq!(again.message_id.as_deref(), Some("m-3b"));
    assert!(again.redelivered, "{again:?}");
    receiver.ack(&again).await.unwrap();

    survivor.close().await.unwrap();
    setup.close().await.unwrap();
    queue.delete().await;
}

// 4. ---------------------------------------------------------------------

#[tokio::test]
async fn dead_lettered_message_moves_to_the_dlq_with_its_reason() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker).await;
    let inspector = broker.inspector(&queue.topology);
    let publisher = broker.publisher(&queue.topology).await.unwrap();
    publisher.publish(&message("m-4", "poison")).await.unwrap();

    let mut receiver = broker.receiver(&queue.topology, 10).await.unwrap();
    let delivery = receive_one(&mut receiver).await;
    receiver
        .dead_letter(&delivery, "amount is negative")
        .await
        .expect("dead_letter");

    assert_eq!(inspector.ready_count().await.unwrap(), 0);
    assert_eq!(inspector.dead_letter_count().await.unwrap(), 1);
    assert_nothing_arrives(&mut receiver).await;

    let peeked = inspector.peek_dead_letters(10).await.expect("peek");
    assert_eq!(peeked.len(), 1, "{peeked:?}");
    assert_eq!(peeked[0].payload, b"poison");
    assert_eq!(peeked[0].reason, "amount is negative");
    // Peeking twice sees the same message: the look does not remove it.
    assert_eq!(inspector.dead_letter_count().await.unwrap(), 1);
    let again = inspector.peek_dead_letters(10).await.expect("peek again");
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(inspector.dead_letter_count().await.unwrap(), 1);

    // Closing the receiver's connection does not bring the original back:
    // it was acked after the copy was confirmed.
    broker.close().await.unwrap();
    let fresh = connect().await;
    let inspector = fresh.inspector(&queue.topology);
    assert_eq!(inspector.ready_count().await.unwrap(), 0);
    assert_eq!(inspector.dead_letter_count().await.unwrap(), 1);
    fresh.close().await.unwrap();
    queue.delete().await;
}

#[tokio::test]
async fn dead_letter_that_cannot_be_copied_fails_and_keeps_the_message() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker).await;
    broker
        .publisher(&queue.topology)
        .await
        .unwrap()
        .publish(&message("m-4b", "nowhere to go"))
        .await
        .unwrap();
    let mut receiver = broker.receiver(&queue.topology, 10).await.unwrap();
    let delivery = receive_one(&mut receiver).await;

    // Misconfiguration: the dead-letter queue is gone, so the copy is
    // unroutable. The original must not be acked.
    delete_queue(&queue.topology.dead_letter_queue()).await;
    let result = receiver.dead_letter(&delivery, "bad").await;
    assert!(
        matches!(result, Err(QueueError::NotConfirmed(_))),
        "{result:?}"
    );

    // The receiver is still usable after the refusal.
    receiver.requeue(&delivery).await.unwrap();
    let again = receive_one(&mut receiver).await;
    assert!(again.redelivered);

    broker.close().await.unwrap();
    let admin = connect().await;
    assert_eq!(
        admin
            .inspector(&queue.topology)
            .ready_count()
            .await
            .unwrap(),
        1,
        "the message is back in the main queue, not lost"
    );
    admin.close().await.unwrap();
    queue.delete().await;
}

/// Deletes one queue behind the backend's back (a misconfiguration the
/// backend must survive), straight through lapin.
async fn delete_queue(name: &str) {
    use lapin::{options::QueueDeleteOptions, Connection, ConnectionProperties};
    let connection = Connection::connect(&url_from_env(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(name, QueueDeleteOptions::default())
        .await
        .unwrap();
    connection.close(200, "done").await.unwrap();
}

/// Deletes one exchange the same way.
async fn delete_exchange(name: &str) {
    use lapin::{options::ExchangeDeleteOptions, Connection, ConnectionProperties};
    let connection = Connection::connect(&url_from_env(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_delete(name, ExchangeDeleteOptions::default())
        .await
        .unwrap();
    connection.close(200, "done").await.unwrap();
}

#[tokio::test]
async fn dead_letter_to_a_missing_exchange_fails_then_recovers() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker).await;
    let publisher = broker.publisher(&queue.topology).await.unwrap();
    publisher.publish(&message("m-4c", "poison")).await.unwrap();
    let mut receiver = broker.receiver(&queue.topology, 10).await.unwrap();
    let delivery = receive_one(&mut receiver).await;

    // The dead-letter exchange is gone: the broker closes the channel the
    // copy went out on, and the original stays unacked.
    delete_exchange(&queue.topology.dead_letter_exchange()).await;
    let result = receiver.dead_letter(&delivery, "first try").await;
    assert!(
        matches!(result, Err(QueueError::Broker { .. })),
        "{result:?}"
    );

    // Once the topology is back, the same receiver dead-letters again (on a
    // fresh channel) and the message lands in the DLQ exactly once.
    broker.declare(&queue.topology).await.unwrap();
    receiver
        .dead_letter(&delivery, "second try")
        .await
        .expect("dead_letter after the exchange is back");
    let inspector = broker.inspector(&queue.topology);
    assert_eq!(inspector.ready_count().await.unwrap(), 0);
    assert_eq!(inspector.dead_letter_count().await.unwrap(), 1);
    let peeked = inspector.peek_dead_letters(10).await.unwrap();
    assert_eq!(peeked.len(), 1, "{peeked:?}");
    assert_eq!(peeked[0].reason, "second try");

    broker.close().await.unwrap();
    queue.delete().await;
}

/// AMQP acks are not answered: acking a delivery twice succeeds locally, and
/// the broker closes the whole channel (PRECONDITION_FAILED, unknown delivery
/// tag), returning every other unacked delivery on it to the queue. The
/// receiver reports it on the next receive.
#[tokio::test]
async fn double_ack_closes_the_channel_and_the_next_receive_says_so() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker).await;
    let publisher = broker.publisher(&queue.topology).await.unwrap();
    publisher.publish(&message("m-d1", "one")).await.unwrap();
    publisher.publish(&message("m-d2", "two")).await.unwrap();
    let mut receiver = broker.receiver(&queue.topology, 10).await.unwrap();
    let one = receive_one(&mut receiver).await;
    let two = receive_one(&mut receiver).await;

    receiver.ack(&one).await.unwrap();
    receiver
        .ack(&one)
        .await
        .expect("no reply to wait for, so Ok");
    let result = receiver.receive(1, ARRIVES).await;
    assert!(
        matches!(result, Err(QueueError::Broker { .. })),
        "{result:?}"
    );

    // `two` was never acked and the channel is gone: it is back in the queue.
    let fresh = connect().await;
    let mut other = fresh.receiver(&queue.topology, 10).await.unwrap();
    let again = receive_one(&mut other).await;
    assert_eq!(again.message_id, two.message_id);
    assert!(again.redelivered);
    other.ack(&again).await.unwrap();

    fresh.close().await.unwrap();
    broker.close().await.unwrap();
    queue.delete().await;
}

// 5. ---------------------------------------------------------------------

#[tokio::test]
async fn prefetch_bounds_the_unacked_deliveries() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker).await;
    let publisher = broker.publisher(&queue.topology).await.unwrap();
    for i in 0..5 {
        publisher
            .publish(&message(&format!("m-5-{i}"), &i.to_string()))
            .await
            .unwrap();
    }

    let mut receiver = broker.receiver(&queue.topology, 2).await.unwrap();
    let mut held = receiver.receive(10, ARRIVES).await.unwrap();
    assert!(
        (1..=2).contains(&held.len()),
        "prefetch 2 hands out at most 2: {held:?}"
    );
    // Even waiting longer, nothing beyond the prefetch arrives before an ack.
    loop {
        let more = receiver.receive(10, STAYS_AWAY).await.unwrap();
        if more.is_empty() {
            break;
        }
        held.extend(more);
        assert!(held.len() <= 2, "more than the prefetch: {held:?}");
    }
    assert_eq!(held.len(), 2);
    assert_eq!(
        broker
            .inspector(&queue.topology)
            .ready_count()
            .await
            .unwrap(),
        3
    );

    // One ack frees one slot.
    receiver.ack(&held[0]).await.unwrap();
    let next = receive_one(&mut receiver).await;
    assert_eq!(next.message_id.as_deref(), Some("m-5-2"), "in queue order");
    assert_nothing_arrives(&mut receiver).await;

    broker.close().await.unwrap();
    queue.delete().await;
}

// 6. ---------------------------------------------------------------------

#[tokio::test]
async fn publishing_to_an_undeclared_queue_is_not_confirmed() {
    let broker = connect().await;
    let queue = TestQueue::undeclared();
    let publisher = broker.publisher(&queue.topology).await.unwrap();
    let result = publisher.publish(&message("m-6", "lost?")).await;
    match result {
        Err(QueueError::NotConfirmed(reason)) => {
            assert!(reason.contains("unroutable"), "{reason}");
            assert!(reason.contains("NO_ROUTE"), "{reason}");
        }
        other => panic!("expected NotConfirmed(unroutable), got {other:?}"),
    }
    // The channel survives an unroutable message: once the queue exists the
    // same publisher works.
    broker.declare(&queue.topology).await.unwrap();
    publisher.publish(&message("m-6b", "found")).await.unwrap();
    assert_eq!(
        broker
            .inspector(&queue.topology)
            .ready_count()
            .await
            .unwrap(),
        1
    );

    broker.close().await.unwrap();
    queue.delete().await;
}

#[tokio::test]
async fn concurrent_publishes_are_each_confirmed_or_each_refused() {
    let broker = connect().await;
    let declared = TestQueue::declared(&broker).await;
    let missing = TestQueue::undeclared();
    let good = broker.publisher(&declared.topology).await.unwrap();
    let bad = broker.publisher(&missing.topology).await.unwrap();

    let messages: Vec<_> = (0..20)
        .map(|i| message(&format!("m-6c-{i}"), "x"))
        .collect();
    let results = futures::future::join_all(
        messages
            .iter()
            .flat_map(|m| [good.publish(m), bad.publish(m)]),
    )
    .await;
    for (i, result) in results.iter().enumerate() {
        if i % 2 == 0 {
            assert!(result.is_ok(), "routable #{i}: {result:?}");
        } else {
            assert!(
                matches!(result, Err(QueueError::NotConfirmed(_))),
                "unroutable #{i}: {result:?}"
            );
        }
    }
    assert_eq!(
        broker
            .inspector(&declared.topology)
            .ready_count()
            .await
            .unwrap(),
        20
    );

    broker.close().await.unwrap();
    declared.delete().await;
    missing.delete().await;
}

// 7. ---------------------------------------------------------------------

#[tokio::test]
async fn redeclaring_with_different_durability_is_an_error_not_a_silent_change() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker).await;
    let mut flimsy = queue.topology.clone();
    flimsy.durable = false;
    let result = broker.declare(&flimsy).await;
    assert!(
        matches!(result, Err(QueueError::Broker { .. })),
        "{result:?}"
    );
    // The connection is still usable after the channel-level refusal.
    assert_eq!(
        broker
            .inspector(&queue.topology)
            .ready_count()
            .await
            .unwrap(),
        0
    );
    broker.close().await.unwrap();
    queue.delete().await;
}

// 8. ---------------------------------------------------------------------

#[tokio::test]
async fn receive_on_an_empty_queue_returns_nothing_after_the_wait() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker).await;
    let mut receiver = broker.receiver(&queue.topology, 10).await.unwrap();

    let wait = Duration::from_millis(400);
    let started = Instant::now();
    let batch = receiver.receive(10, wait).await.unwrap();
    let took = started.elapsed();
    assert!(batch.is_empty(), "{batch:?}");
    assert!(took >= wait, "returned early after {took:?}");
    assert!(took < wait + Duration::from_millis(500), "took {took:?}");

    broker.close().await.unwrap();
    queue.delete().await;
}

// Errors -------------------------------------------------------------------

#[tokio::test]
async fn connecting_to_a_closed_port_says_how_to_start_the_broker() {
    let result = RabbitBroker::connect("amqp://guest:guest@127.0.0.1:1/%2f").await;
    let error = match result {
        Err(error) => error,
        Ok(_) => panic!("connected to port 1?"),
    };
    assert!(matches!(error, QueueError::Connect { .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("scripts/services-up"), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("guest:guest"), "password leaked: {text}");
}

#[tokio::test]
async fn a_password_in_the_query_string_never_reaches_the_error() {
    for url in [
        "amqp://guest@127.0.0.1:1/%2f?password=s3cret-in-query",
        "amqp://guest:s3cret-in-query@127.0.0.1:1/%2f?auth_token=s3cret-in-query",
    ] {
        let error = match RabbitBroker::connect(url).await {
            Err(error) => error,
            Ok(_) => panic!("connected to port 1?"),
        };
        let text = format!("{error} {error:?}");
        assert!(!text.contains("s3cret-in-query"), "password leaked: {text}");
    }
}

// Delivery counts ------------------------------------------------------------

/// Publishes `payload` with an `x-delivery-count` header of the publisher's
/// own, the way any AMQP client can.
async fn publish_with_delivery_count_header(queue: &str, payload: &[u8], count: i64) {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let connection =
        lapin::Connection::connect(&url_from_env(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        queue::rabbitmq::DELIVERY_COUNT_HEADER.into(),
        AMQPValue::LongLongInt(count),
    );
    channel
        .basic_publish(
            "",
            queue,
            BasicPublishOptions::default(),
            payload,
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    connection.close(200, "published").await.unwrap();
}

/// A classic queue counts nothing: a publisher's `x-delivery-count` is not
/// the broker's count, on the first delivery or on a redelivery.
#[tokio::test]
async fn a_publisher_set_delivery_count_on_a_classic_queue_is_ignored() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker).await;
    publish_with_delivery_count_header(&queue.topology.queue, b"counted?", 99).await;

    let mut receiver = broker.receiver(&queue.topology, 1).await.unwrap();
    let first = receive_one(&mut receiver).await;
    assert_eq!(first.payload, b"counted?");
    assert_eq!(first.delivery_count, None, "{first:?}");
    receiver.requeue(&first).await.unwrap();
    let again = receive_one(&mut receiver).await;
    assert!(again.redelivered);
    assert_eq!(again.delivery_count, None, "{again:?}");
    receiver.ack(&again).await.unwrap();
    broker.close().await.unwrap();
    queue.delete().await;
}

/// A quorum queue counts: its own `x-delivery-count` on each redelivery
/// replaces whatever the publisher put there.
#[tokio::test]
async fn a_quorum_queue_counts_deliveries_itself() {
    let broker = connect().await;
    let queue = TestQueue {
        topology: Topology::quorum(unique_queue()),
        armed: true,
    };
    broker.declare(&queue.topology).await.expect("declare");
    publish_with_delivery_count_header(&queue.topology.queue, b"counted", 99).await;

    let mut receiver = broker.receiver(&queue.topology, 1).await.unwrap();
    let first = receive_one(&mut receiver).await;
    assert_eq!(first.delivery_count, None, "first delivery: {first:?}");
    receiver.requeue(&first).await.unwrap();
    let second = receive_one(&mut receiver).await;
    assert_eq!(second.delivery_count, Some(2), "{second:?}");
    receiver.requeue(&second).await.unwrap();
    let third = receive_one(&mut receiver).await;
    assert_eq!(third.delivery_count, Some(3), "{third:?}");
    receiver.ack(&third).await.unwrap();
    broker.close().await.unwrap();
    queue.delete().await;
}

#[tokio::test]
async fn settling_with_a_foreign_receipt_is_refused() {
    let broker = connect().await;
    let queue = TestQueue::declared(&broker).await;
    let mut receiver = broker.receiver(&queue.topology, 1).await.unwrap();
    let foreign = Delivery {
        payload: Vec::new(),
        message_id: None,
        redelivered: false,
        delivery_count: None,
        receipt: Receipt::ReceiptHandle("sqs-handle".into()),
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
    broker.close().await.unwrap();
    queue.delete().await;
}
