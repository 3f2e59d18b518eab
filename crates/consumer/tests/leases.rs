//! The consumer against SQS's leases, on the real ElasticMQ, Postgres and
//! PSP that `scripts/services-up` starts: a late ack is counted and tolerated,
//! the heartbeat keeps a slow message hidden, and the last allowed receive is
//! dead-lettered with a reason.
//!
//! Each test declares its own queue and creates its own databases.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use consumer::crash::NeverCrash;
use consumer::observe::{Observation, Observer, Outcome};
use consumer::{Heartbeat, PaymentConsumer, Variant};
use databases::FreshDatabase;
use payments::PaymentEvent;
use psp::{FaultConfig, PspConfig, PspServer, RunningPsp};
use queue::sqs::{queue_name, ReceiveSettings, SqsBroker, SqsReceiver, SqsTopology};
use queue::{Delivery, OutgoingMessage, Publisher, Receiver};
use uuid::Uuid;

#[derive(Default)]
struct Recorder(Mutex<Vec<Observation>>);

impl Observer for Recorder {
    fn observe(&self, observation: &Observation) {
        self.0.lock().unwrap().push(observation.clone());
    }
}

impl Recorder {
    fn count(&self, matches: impl Fn(&Observation) -> bool) -> usize {
        self.0.lock().unwrap().iter().filter(|o| matches(o)).count()
    }
}

struct Setup {
    broker: SqsBroker,
    topology: SqsTopology,
    shop: FreshDatabase,
    psp_db: FreshDatabase,
    psp: RunningPsp,
}

impl Setup {
    /// A queue with `visibility` and `max_receives`, and a PSP that takes
    /// `charge_latency` per charge.
    async fn start(visibility: Duration, max_receives: u32, charge_latency: Duration) -> Self {
        let broker = SqsBroker::connect()
            .await
            .expect("ElasticMQ is up (run scripts/services-up)");
        let topology = SqsTopology::new(
            queue_name(&format!("eo-lease-{}", Uuid::new_v4().simple())),
            visibility,
            max_receives,
        );
        broker.declare(&topology).await.expect("declare the queue");
        let shop = FreshDatabase::create("consumer_lease", 5)
            .await
            .expect("create the shop database");
        consumer::migrate(&shop.pool)
            .await
            .expect("consumer schema");
        let psp_db = FreshDatabase::create("consumer_lease_psp", 5)
            .await
            .expect("create the PSP database");
        let config = PspConfig {
            faults: FaultConfig {
                latency: charge_latency,
                ..FaultConfig::default()
            },
            ..PspConfig::default()
        };
        let psp = PspServer::start(psp_db.pool.clone(), config, "127.0.0.1:0")
            .await
            .expect("start the PSP");
        Self {
            broker,
            topology,
            shop,
            psp_db,
            psp,
        }
    }

    fn consumer(&self, observer: Arc<Recorder>) -> PaymentConsumer {
        PaymentConsumer {
            variant: Variant::Hardened,
            pool: self.shop.pool.clone(),
            psp: self.psp.client(Duration::from_secs(10)).expect("client"),
            crashes: Arc::new(NeverCrash),
            observer,
            requeue_delay: Duration::from_millis(10),
            metrics: Default::default(),
            heartbeat: None,
            max_receives: None,
            batch_size: 1,
        }
    }

    async fn receiver(&self) -> SqsReceiver {
        self.broker
            .receiver(&self.topology, ReceiveSettings::default())
            .await
            .expect("receiver")
    }

    async fn publish(&self) -> PaymentEvent {
        let event = PaymentEvent::new(Uuid::new_v4(), 1_234, "EUR", chrono::Utc::now());
        self.broker
            .publisher(&self.topology)
            .await
            .expect("publisher")
            .publish(&OutgoingMessage {
                key: event.order_id.to_string(),
                message_id: event.event_id.to_string(),
                payload: event.encode(),
            })
            .await
            .expect("publish");
        event
    }

    async fn charges(&self) -> i64 {
        psp::ledger::charge_counts_by_order(&self.psp_db.pool)
            .await
            .expect("read the ledger")
            .values()
            .sum()
    }

    async fn teardown(self) {
        self.psp.shutdown().await.expect("stop the PSP");
        self.broker.delete(&self.topology).await.expect("delete");
        self.shop.drop_database().await.expect("drop shop");
        self.psp_db.drop_database().await.expect("drop psp");
    }
}

async fn receive_one(receiver: &mut SqsReceiver, wait: Duration) -> Option<Delivery> {
    receiver
        .receive(1, wait)
        .await
        .expect("receive")
        .into_iter()
        .next()
}

#[tokio::test]
async fn a_late_ack_is_counted_and_the_redelivery_is_a_dedup_hit() {
    // The lease (1 s) is shorter than the charge (1.5 s).
    let setup = Setup::start(Duration::from_secs(1), 5, Duration::from_millis(1500)).await;
    setup.publish().await;
    let first_seen = Arc::new(Recorder::default());
    let second_seen = Arc::new(Recorder::default());
    let first = setup.consumer(first_seen.clone());
    let second = setup.consumer(second_seen.clone());
    let mut first_receiver = setup.receiver().await;
    let mut second_receiver = setup.receiver().await;

    let delivery = receive_one(&mut first_receiver, Duration::from_secs(5))
        .await
        .expect("the message arrives");
    let (first_outcome, second_outcome) = tokio::join!(
        async { first.handle(&mut first_receiver, delivery).await },
        async {
            // Visible again after 1 s, while the first consumer still charges.
            let again = receive_one(&mut second_receiver, Duration::from_secs(3))
                .await
                .expect("the lease runs out and the message comes back");
            assert_eq!(again.delivery_count, Some(2));
            second.handle(&mut second_receiver, again).await
        }
    );
    assert!(
        matches!(first_outcome, Ok(Outcome::Charged { .. })),
        "{first_outcome:?}"
    );
    assert!(
        matches!(second_outcome, Ok(Outcome::Duplicate)),
        "{second_outcome:?}"
    );
    assert_eq!(
        first_seen.count(|o| matches!(o, Observation::SettledLate { operation, .. } if operation == "DeleteMessage")),
        1,
        "the first consumer's ack came too late and was counted"
    );
    assert_eq!(setup.charges().await, 1, "the ledger has one charge");
    let inspector = setup.broker.inspector(&setup.topology);
    assert_eq!(
        inspector.in_flight().await.unwrap(),
        0,
        "the redelivery settled it"
    );
    setup.teardown().await;
}

#[tokio::test]
async fn the_heartbeat_keeps_a_slow_message_hidden() {
    // The charge (2.5 s) outlasts the lease (1 s) twice over.
    let setup = Setup::start(Duration::from_secs(1), 5, Duration::from_millis(2500)).await;
    setup.publish().await;
    let seen = Arc::new(Recorder::default());
    let mut consumer = setup.consumer(seen.clone());
    consumer.heartbeat = Some(Heartbeat::for_lease(Duration::from_secs(1)));
    let mut receiver = setup.receiver().await;
    let mut rival = setup.receiver().await;

    let delivery = receive_one(&mut receiver, Duration::from_secs(5))
        .await
        .expect("the message arrives");
    let (outcome, stolen) = tokio::join!(
        async { consumer.handle(&mut receiver, delivery).await },
        // Polls the whole time the charge takes: nothing may come back.
        receive_one(&mut rival, Duration::from_secs(2))
    );
    assert!(
        matches!(outcome, Ok(Outcome::Charged { .. })),
        "{outcome:?}"
    );
    assert!(
        stolen.is_none(),
        "redelivered despite the heartbeat (receive count {:?})",
        stolen.and_then(|d| d.delivery_count)
    );
    assert!(
        seen.count(|o| matches!(o, Observation::LeaseExtended { .. })) >= 3,
        "a beat every third of a second for 2.5 s"
    );
    assert_eq!(
        seen.count(|o| matches!(o, Observation::SettledLate { .. })),
        0
    );
    assert_eq!(setup.charges().await, 1);
    setup.teardown().await;
}

#[tokio::test]
async fn the_last_allowed_receive_is_dead_lettered_with_a_reason() {
    let setup = Setup::start(Duration::from_secs(30), 2, Duration::ZERO).await;
    let event = setup.publish().await;
    let seen = Arc::new(Recorder::default());
    let mut consumer = setup.consumer(seen.clone());
    consumer.max_receives = Some(2);
    let mut receiver = setup.receiver().await;

    // The first receive is handed back unsettled, as by a consumer that
    // gave up on it.
    let first = receive_one(&mut receiver, Duration::from_secs(5))
        .await
        .expect("the message arrives");
    receiver.requeue(&first).await.expect("requeue");
    let last = receive_one(&mut receiver, Duration::from_secs(5))
        .await
        .expect("the message comes back");
    assert_eq!(last.delivery_count, Some(2));
    let outcome = consumer.handle(&mut receiver, last).await.expect("handled");
    let Outcome::DeadLettered { reason } = outcome else {
        panic!("expected a dead letter, got {outcome:?}");
    };
    assert!(reason.contains("maxReceiveCount is 2"), "{reason}");

    let letters = setup
        .broker
        .inspector(&setup.topology)
        .peek_dead_letters(10)
        .await
        .expect("peek the DLQ");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, reason);
    assert_eq!(
        PaymentEvent::decode(&letters[0].payload).unwrap().event_id,
        event.event_id
    );
    assert_eq!(setup.charges().await, 0, "the last receive is not handled");
    setup.teardown().await;
}
