//! In-process tests of the naive consumers (chapter 1) against the real
//! services that `scripts/services-up` starts on loopback: Postgres for the
//! shop and for the PSP, the PSP's HTTP server, and RabbitMQ.
//!
//! Nothing is killed here (the crash points are exercised by the chaos lab);
//! these tests drive `PaymentConsumer::handle` and `PaymentConsumer::run` on
//! real deliveries and judge them by the PSP's ledger, never by the
//! consumer's own view.
//!
//! Every test creates its own databases and its own uniquely named queue and
//! removes them again, also when it fails (see [`Cleanup`]), so the tests run
//! in parallel and leave nothing behind.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use consumer::crash::NeverCrash;
use consumer::observe::{Observation, Observer, Outcome};
use consumer::{PaymentConsumer, Variant};
use databases::FreshDatabase;
use payments::PaymentEvent;
use psp::ledger::{self, LedgerEntry};
use psp::{FaultConfig, PspConfig, PspServer, RunningPsp};
use queue::rabbitmq::{url_from_env, RabbitBroker, RabbitPublisher, RabbitReceiver, Topology};
use queue::{Delivery, OutgoingMessage, Publisher, QueueError, QueueInspector, Receiver};
use uuid::Uuid;

/// How long a test waits for something that should arrive promptly.
const ARRIVES: Duration = Duration::from_secs(5);
/// How long a test waits to be reasonably sure something does NOT arrive.
const STAYS_AWAY: Duration = Duration::from_millis(300);
/// The consumer's pause before handing a failed delivery back.
const REQUEUE_DELAY: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------
// The observer

/// Records every observation, in order.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Observation>>,
}

impl Observer for Recorder {
    fn observe(&self, observation: &Observation) {
        let mut observation = observation.clone();
        // Timings differ on every run; the tests compare what happened.
        if let Observation::Settled { elapsed_ms, .. } = &mut observation {
            *elapsed_ms = 0;
        }
        self.seen.lock().unwrap().push(observation);
    }
}

impl Recorder {
    fn all(&self) -> Vec<Observation> {
        self.seen.lock().unwrap().clone()
    }

    fn settled(&self) -> Vec<Outcome> {
        self.all()
            .into_iter()
            .filter_map(|o| match o {
                Observation::Settled { outcome, .. } => Some(outcome),
                _ => None,
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The harness

/// Removes what a test created when dropped before [`Harness::teardown`]:
/// a failing test cleans up too.
struct Cleanup {
    databases: Vec<String>,
    topology: Topology,
    armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // We may be unwinding from a failed assertion inside a runtime, so
        // clean up on a thread with a runtime of its own.
        let databases = std::mem::take(&mut self.databases);
        let topology = self.topology.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                for name in &databases {
                    let _ = databases::drop_database(name).await;
                }
                if let Ok(broker) = RabbitBroker::connect(&url_from_env()).await {
                    let _ = broker.delete(&topology).await;
                    let _ = broker.close().await;
                }
            });
        })
        .join();
    }
}

/// One shop database, one PSP with its own database, one queue, and a
/// consumer wired to all three with a recording observer.
struct Harness {
    consumer: PaymentConsumer,
    observer: Arc<Recorder>,
    shop: FreshDatabase,
    psp_db: FreshDatabase,
    psp: RunningPsp,
    topology: Topology,
    /// The test's own connection: declares, publishes, inspects.
    broker: RabbitBroker,
    publisher: RabbitPublisher,
    /// The consumer's connection. Closing it is the consumer going away: the
    /// broker then requeues whatever the consumer had not acked.
    consumer_broker: RabbitBroker,
    cleanup: Cleanup,
}

impl Harness {
    async fn start(variant: Variant, psp_config: PspConfig) -> Self {
        let topology = Topology::durable(format!("eo.test.{}", Uuid::new_v4().simple()));
        let mut cleanup = Cleanup {
            databases: Vec::new(),
            topology: topology.clone(),
            armed: true,
        };
        let shop = FreshDatabase::create("consumer_test", 5)
            .await
            .expect("create the shop database (is Postgres up? run scripts/services-up)");
        cleanup.databases.push(shop.name.clone());
        let psp_db = FreshDatabase::create("consumer_test_psp", 5)
            .await
            .expect("create the PSP database");
        cleanup.databases.push(psp_db.name.clone());
        consumer::migrate(&shop.pool)
            .await
            .expect("apply the consumer schema");
        let psp = PspServer::start(psp_db.pool.clone(), psp_config, "127.0.0.1:0")
            .await
            .expect("start the PSP");

        let broker = connect().await;
        broker.declare(&topology).await.expect("declare the queue");
        let publisher = broker.publisher(&topology).await.expect("publisher");
        let consumer_broker = connect().await;

        let observer = Arc::new(Recorder::default());
        let consumer = PaymentConsumer {
            variant,
            pool: shop.pool.clone(),
            psp: psp.client(Duration::from_secs(5)).expect("PSP client"),
            crashes: Arc::new(NeverCrash),
            observer: observer.clone(),
            requeue_delay: REQUEUE_DELAY,
            metrics: Default::default(),
            heartbeat: None,
            max_receives: None,
            batch_size: 1,
        };
        Self {
            consumer,
            observer,
            shop,
            psp_db,
            psp,
            topology,
            broker,
            publisher,
            consumer_broker,
            cleanup,
        }
    }

    /// Stops the PSP, drops both databases, deletes the queue, and checks
    /// that each step worked.
    async fn teardown(self) {
        let Self {
            consumer,
            shop,
            psp_db,
            psp,
            topology,
            broker,
            publisher,
            consumer_broker,
            mut cleanup,
            ..
        } = self;
        cleanup.armed = false;
        drop(consumer);
        drop(publisher);
        psp.shutdown().await.expect("stop the PSP");
        shop.drop_database().await.expect("drop the shop database");
        psp_db.drop_database().await.expect("drop the PSP database");
        // Possibly closed already by `consumer_goes_away`.
        let _ = consumer_broker.close().await;
        broker.delete(&topology).await.expect("delete the queue");
        broker.close().await.expect("close the test connection");
    }

    async fn receiver(&self) -> RabbitReceiver {
        self.consumer_broker
            .receiver(&self.topology, 1)
            .await
            .expect("receiver")
    }

    async fn publish(&self, message_id: &str, payload: &[u8]) {
        self.publisher
            .publish(&OutgoingMessage {
                key: message_id.to_owned(),
                message_id: message_id.to_owned(),
                payload: payload.to_vec(),
            })
            .await
            .expect("a confirmed publish");
    }

    async fn publish_event(&self, event: &PaymentEvent) {
        self.publish(&event.event_id.to_string(), &event.encode())
            .await;
    }

    async fn ledger(&self, order_id: Uuid) -> Vec<LedgerEntry> {
        ledger::charges_for_order(self.psp.pool(), &order_id.to_string())
            .await
            .expect("read the ledger")
    }

    async fn total_charges(&self) -> i64 {
        ledger::total_charges(self.psp.pool())
            .await
            .expect("count the ledger")
    }

    /// The consumer's own record for one order: (event_id, psp_charge_id).
    async fn payments(&self, order_id: Uuid) -> Vec<(Uuid, String)> {
        sqlx::query_as(
            "SELECT event_id, psp_charge_id FROM payments WHERE order_id = $1 ORDER BY payment_id",
        )
        .bind(order_id)
        .fetch_all(&self.shop.pool)
        .await
        .expect("read payments")
    }

    async fn total_payments(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM payments")
            .fetch_one(&self.shop.pool)
            .await
            .expect("count payments")
    }

    async fn ready_count(&self) -> u64 {
        self.broker
            .inspector(&self.topology)
            .ready_count()
            .await
            .expect("ready count")
    }

    async fn dead_letter_count(&self) -> u64 {
        self.broker
            .inspector(&self.topology)
            .dead_letter_count()
            .await
            .expect("dead-letter count")
    }

    /// Closes the consumer's connection, so the broker takes back anything
    /// it still holds unacked.
    async fn consumer_goes_away(&self) {
        self.consumer_broker
            .close()
            .await
            .expect("close the consumer's connection");
    }

    /// Proves every delivery was settled: nothing more arrives, and after
    /// the consumer's connection is gone (which would requeue anything left
    /// unacked) the queue stays empty.
    async fn assert_drained(&self, receiver: &mut RabbitReceiver) {
        assert_nothing_arrives(receiver).await;
        self.consumer_goes_away().await;
        let deadline = Instant::now() + STAYS_AWAY;
        loop {
            assert_eq!(self.ready_count().await, 0, "a message came back");
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the queue holds `expected` ready messages.
    async fn await_ready_count(&self, expected: u64) {
        let deadline = Instant::now() + ARRIVES;
        loop {
            let ready = self.ready_count().await;
            if ready == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected {expected} ready messages, still {ready}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn connect() -> RabbitBroker {
    RabbitBroker::connect(&url_from_env())
        .await
        .expect("RabbitMQ should be up (run scripts/services-up)")
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

fn new_event(amount_cents: i64) -> PaymentEvent {
    PaymentEvent::new(Uuid::new_v4(), amount_cents, "EUR", chrono::Utc::now())
}

/// A PSP that fails every charge with a 503 and charges nothing.
fn failing_psp() -> PspConfig {
    PspConfig {
        faults: FaultConfig {
            error_rate: 1.0,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The payloads a consumer must refuse, each with a word its reason must
/// contain.
fn bad_payloads() -> Vec<(Vec<u8>, &'static str)> {
    let mut zero = serde_json::to_value(new_event(4200)).unwrap();
    zero["amount_cents"] = 0.into();
    let mut extra = serde_json::to_value(new_event(4200)).unwrap();
    extra["coupon"] = "FREE".into();
    vec![
        (b"{not json".to_vec(), "not a payment event"),
        (serde_json::to_vec(&zero).unwrap(), "amount_cents"),
        (
            serde_json::to_vec(&extra).unwrap(),
            "unknown field `coupon`",
        ),
    ]
}

fn received(order_id: Option<Uuid>, message_id: &str, redelivered: bool) -> Observation {
    Observation::Received {
        message_id: Some(message_id.to_owned()),
        order_id,
        redelivered,
        position: None,
    }
}

fn settled(order_id: Option<Uuid>, outcome: Outcome) -> Observation {
    Observation::Settled {
        order_id,
        outcome,
        elapsed_ms: 0,
    }
}

fn charge_id(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Charged { charge_id } => charge_id.clone(),
        other => panic!("expected Charged, got {other:?}"),
    }
}

// 1. ---------------------------------------------------------------------

#[tokio::test]
async fn naive_consumer_charges_a_valid_event_once_and_acks_it() {
    let h = Harness::start(Variant::Naive, PspConfig::default()).await;
    let event = new_event(4200);
    h.publish_event(&event).await;

    let mut receiver = h.receiver().await;
    let delivery = receive_one(&mut receiver).await;
    let outcome = h.consumer.handle(&mut receiver, delivery).await.unwrap();
    let charge = charge_id(&outcome);

    // The ground truth: one money movement, for the event's amount, with no
    // Idempotency-Key (the naive consumer sends none).
    let ledger = h.ledger(event.order_id).await;
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0].id, charge);
    assert_eq!(ledger[0].amount_cents, 4200);
    assert_eq!(ledger[0].currency, "EUR");
    assert_eq!(ledger[0].idempotency_key, None);
    // The consumer's own record agrees.
    assert_eq!(
        h.payments(event.order_id).await,
        vec![(event.event_id, charge.clone())]
    );

    h.assert_drained(&mut receiver).await;
    assert_eq!(h.dead_letter_count().await, 0);

    // 6. Received, then Settled, both naming the order.
    let message_id = event.event_id.to_string();
    assert_eq!(
        h.observer.all(),
        vec![
            received(Some(event.order_id), &message_id, false),
            settled(Some(event.order_id), Outcome::Charged { charge_id: charge }),
        ]
    );
    drop(receiver);
    h.teardown().await;
}

#[tokio::test]
async fn ack_on_receipt_consumer_charges_a_valid_event_once_when_nothing_fails() {
    let h = Harness::start(Variant::AckOnReceipt, PspConfig::default()).await;
    let event = new_event(990);
    h.publish_event(&event).await;

    let mut receiver = h.receiver().await;
    let delivery = receive_one(&mut receiver).await;
    let outcome = h.consumer.handle(&mut receiver, delivery).await.unwrap();
    let charge = charge_id(&outcome);

    let ledger = h.ledger(event.order_id).await;
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0].id, charge);
    assert_eq!(
        h.payments(event.order_id).await,
        vec![(event.event_id, charge)]
    );
    h.assert_drained(&mut receiver).await;
    drop(receiver);
    h.teardown().await;
}

// 2. ---------------------------------------------------------------------

/// Bad messages first, then a good one, each through `handle`: every bad one
/// is dead-lettered with its reason, nothing is charged for them, and the
/// good one behind them is still charged.
async fn malformed_payloads_are_dead_lettered(variant: Variant) {
    let h = Harness::start(variant, PspConfig::default()).await;
    let bad = bad_payloads();
    for (i, (payload, _)) in bad.iter().enumerate() {
        h.publish(&format!("bad-{i}"), payload).await;
    }
    let good = new_event(1500);
    h.publish_event(&good).await;

    let mut receiver = h.receiver().await;
    let mut reasons = Vec::new();
    for (i, (payload, names)) in bad.iter().enumerate() {
        let delivery = receive_one(&mut receiver).await;
        assert_eq!(&delivery.payload, payload, "classic queues keep order");
        let outcome = h.consumer.handle(&mut receiver, delivery).await.unwrap();
        let Outcome::DeadLettered { reason } = outcome else {
            panic!("bad message {i} should be dead-lettered, got {outcome:?}");
        };
        assert!(
            reason.starts_with("undecodable payment event: ") && reason.contains(names),
            "reason {reason:?} should name {names:?}"
        );
        reasons.push(reason);
    }
    // The consumer keeps going: the good message behind them is charged.
    let delivery = receive_one(&mut receiver).await;
    let outcome = h.consumer.handle(&mut receiver, delivery).await.unwrap();
    let charge = charge_id(&outcome);

    assert_eq!(h.dead_letter_count().await, bad.len() as u64);
    let dead = h
        .broker
        .inspector(&h.topology)
        .peek_dead_letters(10)
        .await
        .expect("peek the dead letters");
    assert_eq!(
        dead.iter().map(|d| d.reason.clone()).collect::<Vec<_>>(),
        reasons,
        "the reason header travels with each dead letter"
    );
    assert_eq!(
        dead.iter().map(|d| d.payload.clone()).collect::<Vec<_>>(),
        bad.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        "the dead letters keep the original bytes"
    );
    // Peeking gave them back.
    assert_eq!(h.dead_letter_count().await, bad.len() as u64);

    // Nothing was charged but the good one.
    assert_eq!(h.total_charges().await, 1);
    assert_eq!(h.ledger(good.order_id).await.len(), 1);
    assert_eq!(h.total_payments().await, 1);
    h.assert_drained(&mut receiver).await;

    // 6. No order id for what did not decode, the order id for what did.
    let mut expected = Vec::new();
    for (i, reason) in reasons.into_iter().enumerate() {
        expected.push(received(None, &format!("bad-{i}"), false));
        expected.push(settled(None, Outcome::DeadLettered { reason }));
    }
    expected.push(received(
        Some(good.order_id),
        &good.event_id.to_string(),
        false,
    ));
    expected.push(settled(
        Some(good.order_id),
        Outcome::Charged { charge_id: charge },
    ));
    assert_eq!(h.observer.all(), expected);
    drop(receiver);
    h.teardown().await;
}

#[tokio::test]
async fn naive_consumer_dead_letters_malformed_payloads_and_keeps_going() {
    malformed_payloads_are_dead_lettered(Variant::Naive).await;
}

#[tokio::test]
async fn ack_on_receipt_consumer_dead_letters_malformed_payloads_and_keeps_going() {
    malformed_payloads_are_dead_lettered(Variant::AckOnReceipt).await;
}

#[tokio::test]
async fn run_settles_bad_and_good_messages_without_a_crash_loop() {
    let h = Harness::start(Variant::Naive, PspConfig::default()).await;
    let bad = bad_payloads();
    let good = [new_event(100), new_event(200)];
    // Interleaved: bad, good, bad, good, bad.
    h.publish("bad-0", &bad[0].0).await;
    h.publish_event(&good[0]).await;
    h.publish("bad-1", &bad[1].0).await;
    h.publish_event(&good[1]).await;
    h.publish("bad-2", &bad[2].0).await;
    let messages = bad.len() + good.len();

    let mut receiver = h.receiver().await;
    let observer = h.observer.clone();
    let all_settled = async move {
        let deadline = Instant::now() + ARRIVES;
        while observer.settled().len() < messages && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(ARRIVES * 2, h.consumer.run(&mut receiver, all_settled))
        .await
        .expect("run returns once stopped")
        .expect("run ends without an error");

    // Each message was received once and settled once: no redelivery loop.
    let observations = h.observer.all();
    let receptions: Vec<_> = observations
        .iter()
        .filter_map(|o| match o {
            Observation::Received { redelivered, .. } => Some(*redelivered),
            _ => None,
        })
        .collect();
    assert_eq!(receptions, vec![false; messages], "{observations:#?}");
    let outcomes = h.observer.settled();
    assert_eq!(outcomes.len(), messages, "{observations:#?}");
    let dead_lettered = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::DeadLettered { .. }))
        .count();
    let charged = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Charged { .. }))
        .count();
    assert_eq!((dead_lettered, charged), (bad.len(), good.len()));

    assert_eq!(h.dead_letter_count().await, bad.len() as u64);
    for event in &good {
        assert_eq!(h.ledger(event.order_id).await.len(), 1);
        assert_eq!(h.payments(event.order_id).await.len(), 1);
    }
    assert_eq!(h.total_charges().await, good.len() as i64);
    h.assert_drained(&mut receiver).await;
    drop(receiver);
    h.teardown().await;
}

// 3. ---------------------------------------------------------------------

/// THE BUG CHAPTER 1 MEASURES. The broker delivers at least once; handed the
/// same event twice, the naive consumer moves the money twice.
#[tokio::test]
async fn naive_consumer_charges_a_duplicate_delivery_twice() {
    let h = Harness::start(Variant::Naive, PspConfig::default()).await;
    let event = new_event(4200);
    // The identical bytes and message id twice, as a redelivery brings them.
    h.publish_event(&event).await;
    h.publish_event(&event).await;

    let mut receiver = h.receiver().await;
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let delivery = receive_one(&mut receiver).await;
        assert_eq!(delivery.payload, event.encode());
        outcomes.push(h.consumer.handle(&mut receiver, delivery).await.unwrap());
    }
    let [first, second] = <[Outcome; 2]>::try_from(outcomes).unwrap();
    let (first, second) = (charge_id(&first), charge_id(&second));
    assert_ne!(first, second, "two separate charges");

    let ledger = h.ledger(event.order_id).await;
    assert_eq!(
        ledger.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        vec![first.clone(), second.clone()],
        "one order, two money movements: a double charge"
    );
    assert!(ledger.iter().all(|e| e.amount_cents == 4200));
    // The consumer's table records both too: nothing in it is unique per event.
    assert_eq!(
        h.payments(event.order_id).await,
        vec![(event.event_id, first), (event.event_id, second)]
    );
    h.assert_drained(&mut receiver).await;
    drop(receiver);
    h.teardown().await;
}

/// A receiver whose acks never reach the broker, as when the connection
/// drops (or the process dies) between the commit and the ack.
struct AckLost(RabbitReceiver);

#[async_trait::async_trait]
impl Receiver for AckLost {
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        self.0.receive(max, wait).await
    }
    async fn ack(&mut self, _delivery: &Delivery) -> Result<(), QueueError> {
        Ok(())
    }
    async fn requeue(&mut self, delivery: &Delivery) -> Result<(), QueueError> {
        self.0.requeue(delivery).await
    }
    async fn dead_letter(&mut self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        self.0.dead_letter(delivery, reason).await
    }
    async fn extend_lease(&mut self, delivery: &Delivery, by: Duration) -> Result<(), QueueError> {
        self.0.extend_lease(delivery, by).await
    }
}

/// Leg 3 without a kill: the ack is lost, the connection closes, the broker
/// redelivers (flagged as such), and the naive consumer charges again.
#[tokio::test]
async fn naive_consumer_charges_again_when_the_broker_redelivers_after_a_lost_ack() {
    let h = Harness::start(Variant::Naive, PspConfig::default()).await;
    let event = new_event(4200);
    h.publish_event(&event).await;

    let first_connection = connect().await;
    let mut lossy = AckLost(
        first_connection
            .receiver(&h.topology, 1)
            .await
            .expect("receiver"),
    );
    let delivery = receive_one(&mut lossy).await;
    let first = h.consumer.handle(&mut lossy, delivery).await.unwrap();
    first_connection.close().await.expect("close");
    drop(lossy);

    let mut receiver = h.receiver().await;
    let redelivery = receive_one(&mut receiver).await;
    assert!(redelivery.redelivered, "the broker flags the redelivery");
    assert_eq!(redelivery.payload, event.encode());
    let second = h.consumer.handle(&mut receiver, redelivery).await.unwrap();

    let (first, second) = (charge_id(&first), charge_id(&second));
    assert_eq!(
        h.ledger(event.order_id)
            .await
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>(),
        vec![first.clone(), second.clone()],
        "the redelivery charged again"
    );
    h.assert_drained(&mut receiver).await;

    // 6. The second reception is observed as a redelivery.
    let message_id = event.event_id.to_string();
    let order = Some(event.order_id);
    assert_eq!(
        h.observer.all(),
        vec![
            received(order, &message_id, false),
            settled(order, Outcome::Charged { charge_id: first }),
            received(order, &message_id, true),
            settled(order, Outcome::Charged { charge_id: second }),
        ]
    );
    drop(receiver);
    h.teardown().await;
}

// 4. ---------------------------------------------------------------------

/// At-most-once: the ack went first, the charge failed, and the payment is
/// gone: not charged, not in the queue, not dead-lettered.
#[tokio::test]
async fn ack_on_receipt_consumer_loses_the_payment_when_the_charge_fails() {
    let h = Harness::start(Variant::AckOnReceipt, failing_psp()).await;
    let event = new_event(4200);
    h.publish_event(&event).await;

    let mut receiver = h.receiver().await;
    let delivery = receive_one(&mut receiver).await;
    let outcome = h.consumer.handle(&mut receiver, delivery).await.unwrap();
    let Outcome::Lost { reason } = &outcome else {
        panic!("expected Lost, got {outcome:?}");
    };
    assert!(reason.contains("503"), "{reason}");

    assert_eq!(h.ledger(event.order_id).await, vec![]);
    assert_eq!(h.total_payments().await, 0);
    h.assert_drained(&mut receiver).await;
    assert_eq!(h.dead_letter_count().await, 0);

    let order = Some(event.order_id);
    assert_eq!(
        h.observer.all(),
        vec![
            received(order, &event.event_id.to_string(), false),
            settled(order, outcome),
        ]
    );
    drop(receiver);
    h.teardown().await;
}

// 5. ---------------------------------------------------------------------

/// A failing PSP does not lose the message with ack-after-commit: it goes
/// back to the broker and comes again, flagged as a redelivery.
#[tokio::test]
async fn naive_consumer_requeues_when_the_psp_fails_and_the_message_comes_back() {
    let h = Harness::start(Variant::Naive, failing_psp()).await;
    let event = new_event(4200);
    h.publish_event(&event).await;

    let mut receiver = h.receiver().await;
    let first = receive_one(&mut receiver).await;
    assert!(!first.redelivered);
    let started = Instant::now();
    let outcome = h.consumer.handle(&mut receiver, first).await.unwrap();
    assert!(
        started.elapsed() >= REQUEUE_DELAY,
        "waits before requeueing"
    );
    let Outcome::Requeued { reason } = &outcome else {
        panic!("expected Requeued, got {outcome:?}");
    };
    assert!(reason.contains("503"), "{reason}");

    let again = receive_one(&mut receiver).await;
    assert!(again.redelivered, "the broker flags the redelivery");
    assert_eq!(again.payload, event.encode());
    assert_eq!(again.message_id, Some(event.event_id.to_string()));
    let outcome_again = h.consumer.handle(&mut receiver, again).await.unwrap();
    assert!(
        matches!(outcome_again, Outcome::Requeued { .. }),
        "{outcome_again:?}"
    );

    // Nothing charged, nothing recorded, nothing dead-lettered, and the
    // message is still there for when the PSP recovers.
    assert_eq!(h.ledger(event.order_id).await, vec![]);
    assert_eq!(h.total_payments().await, 0);
    assert_eq!(h.dead_letter_count().await, 0);
    h.consumer_goes_away().await;
    h.await_ready_count(1).await;

    let message_id = event.event_id.to_string();
    let order = Some(event.order_id);
    assert_eq!(
        h.observer.all(),
        vec![
            received(order, &message_id, false),
            settled(order, outcome),
            received(order, &message_id, true),
            settled(order, outcome_again),
        ]
    );
    drop(receiver);
    h.teardown().await;
}

// 6. ---------------------------------------------------------------------

/// The supervisor reads observations back from the consumer's stdout and
/// skips any line it cannot parse, so every observation must survive the
/// JSON line protocol unchanged.
#[test]
fn every_observation_survives_the_line_protocol() {
    let order_id = Uuid::new_v4();
    let outcomes = [
        Outcome::Charged {
            charge_id: "ch_1".into(),
        },
        Outcome::Duplicate,
        Outcome::Requeued {
            reason: "503: the PSP failed".into(),
        },
        Outcome::DeadLettered {
            reason: "undecodable payment event: \"quoted\"\nand a newline".into(),
        },
        Outcome::Lost {
            reason: "charge failed after the ack".into(),
        },
    ];
    let mut observations = vec![
        received(Some(order_id), "m-1", false),
        Observation::Received {
            message_id: None,
            order_id: None,
            redelivered: true,
            position: Some(queue::Position {
                partition: 2,
                offset: 41,
            }),
        },
    ];
    for crash_point in consumer::crash::CrashPoint::ALL {
        observations.push(Observation::Crashing {
            order_id,
            point: crash_point,
        });
    }
    for outcome in outcomes {
        observations.push(settled(Some(order_id), outcome.clone()));
        observations.push(settled(None, outcome));
    }
    for observation in observations {
        let line = serde_json::to_string(&observation).unwrap();
        assert!(!line.contains('\n'), "one observation, one line: {line}");
        let back: Observation = serde_json::from_str(&line).unwrap();
        assert_eq!(back, observation, "{line}");
    }
}
