//! Integration tests of the outbox relay against the real Postgres and the
//! real RabbitMQ that `scripts/services-up` starts on loopback
//! (`EO_PG_ADMIN_URL` and `EO_AMQP_URL` override the URLs).
//!
//! Every test creates its own database and its own uniquely named queue and
//! removes both again, also when it fails (see [`TestDb`] and
//! [`TestQueue`]), so the tests run in parallel and leave nothing behind.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use databases::FreshDatabase;
use metrics_exporter_prometheus::PrometheusHandle;
use payments::PaymentEvent;
use queue::rabbitmq::{url_from_env, RabbitBroker, Topology};
use queue::{Delivery, OutgoingMessage, Publisher, QueueError, QueueInspector, Receiver};
use relay::outbox::{self, Backlog};
use relay::{Relay, RelayConfig, RelayObservation, RelayObserver, RoundReport, Wake};
use shop::naive_producer::NoFaults;
use shop::outbox_producer::place_order;
use shop::Order;
use sqlx::PgPool;
use uuid::Uuid;

/// How long a test waits for something that should arrive promptly.
const ARRIVES: Duration = Duration::from_secs(5);

// Cleanup guards ------------------------------------------------------------

/// Runs `cleanup` on a thread with a runtime of its own: a guard may be
/// dropped while a failed assertion unwinds inside the test's runtime.
fn clean_up_on_the_side<F, Fut>(cleanup: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(cleanup());
    })
    .join();
}

/// A fresh shop database with the schema applied; dropped again when the
/// guard goes away. A passing test calls [`TestDb::finish`].
struct TestDb {
    db: FreshDatabase,
    armed: bool,
}

impl TestDb {
    async fn create() -> Self {
        let db = FreshDatabase::create("relay_test", 8)
            .await
            .expect("Postgres should be up (run scripts/services-up)");
        let this = Self { db, armed: true };
        shop::migrate(&this.db.pool).await.expect("schema");
        this
    }

    fn pool(&self) -> PgPool {
        self.db.pool.clone()
    }

    async fn finish(mut self) {
        self.armed = false;
        self.db
            .clone()
            .drop_database()
            .await
            .expect("drop database");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.armed {
            let name = self.db.name.clone();
            clean_up_on_the_side(move || async move {
                let _ = databases::drop_database(&name).await;
            });
        }
    }
}

/// A declared, durable queue with a fresh name; deleted again when the guard
/// goes away. A passing test calls [`TestQueue::finish`].
struct TestQueue {
    broker: RabbitBroker,
    topology: Topology,
    armed: bool,
}

impl TestQueue {
    async fn declare() -> Self {
        let broker = RabbitBroker::connect(&url_from_env())
            .await
            .expect("RabbitMQ should be up (run scripts/services-up)");
        let topology = Topology::durable(format!("eo.test.{}", Uuid::new_v4().simple()));
        let this = Self {
            broker,
            topology,
            armed: true,
        };
        this.broker.declare(&this.topology).await.expect("declare");
        this
    }

    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(
            self.broker
                .publisher(&self.topology)
                .await
                .expect("publisher"),
        )
    }

    async fn ready(&self) -> u64 {
        self.broker
            .inspector(&self.topology)
            .ready_count()
            .await
            .expect("ready count")
    }

    /// Polls the ready count until it reaches `count`; how long it took, or
    /// `None` if it did not within `within`.
    async fn wait_for_ready(&self, count: u64, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        loop {
            if self.ready().await >= count {
                return Some(start.elapsed());
            }
            if start.elapsed() >= within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Receives and acks exactly `count` messages, in queue order.
    async fn take(&self, count: usize) -> Vec<Delivery> {
        let prefetch = u16::try_from(count.max(1)).expect("a small count");
        let mut receiver = self
            .broker
            .receiver(&self.topology, prefetch)
            .await
            .expect("receiver");
        let deadline = Instant::now() + ARRIVES;
        let mut taken = Vec::new();
        while taken.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "only {} of {count} messages arrived",
                taken.len()
            );
            let batch = receiver
                .receive(count - taken.len(), left)
                .await
                .expect("receive");
            for delivery in batch {
                receiver.ack(&delivery).await.expect("ack");
                taken.push(delivery);
            }
        }
        taken
    }

    async fn finish(mut self) {
        self.armed = false;
        self.broker
            .delete(&self.topology)
            .await
            .expect("delete topology");
        self.broker.close().await.expect("close");
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        if self.armed {
            let topology = self.topology.clone();
            clean_up_on_the_side(move || async move {
                if let Ok(broker) = RabbitBroker::connect(&url_from_env()).await {
                    let _ = broker.delete(&topology).await;
                    let _ = broker.close().await;
                }
            });
        }
    }
}

// Helpers -------------------------------------------------------------------

fn order(n: i64) -> Order {
    Order {
        order_id: Uuid::new_v4(),
        amount_cents: 1_000 + n,
        currency: "EUR".into(),
    }
}

/// Places `count` orders through the outbox producer, in order.
async fn place_orders(pool: &PgPool, count: i64) -> Vec<Order> {
    let mut orders = Vec::new();
    for n in 0..count {
        let order = order(n);
        place_order(pool, &NoFaults, &order)
            .await
            .expect("place order");
        orders.push(order);
    }
    orders
}

/// Batch size and a pure poll (these tests call `relay_once` themselves).
fn config(batch_size: i64) -> RelayConfig {
    RelayConfig {
        batch_size,
        wake: Wake::Poll {
            interval: Duration::from_secs(30),
        },
        ..RelayConfig::default()
    }
}

fn new_relay_observed(
    pool: PgPool,
    publisher: Arc<dyn Publisher>,
    config: RelayConfig,
    observer: Arc<dyn RelayObserver>,
) -> Relay {
    Relay {
        pool,
        publisher,
        config,
        faults: Arc::new(relay::NoFaults),
        observer,
    }
}

fn new_relay(pool: PgPool, publisher: Arc<dyn Publisher>, config: RelayConfig) -> Relay {
    new_relay_observed(pool, publisher, config, Arc::new(relay::Unobserved))
}

/// One outbox row as a test looks at it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RowState {
    id: i64,
    event_id: Uuid,
    aggregate_id: Uuid,
    attempts: i32,
    sent: bool,
    leased: bool,
}

async fn rows(pool: &PgPool) -> Vec<RowState> {
    let rows: Vec<(i64, Uuid, Uuid, i32, bool, bool)> = sqlx::query_as(
        "SELECT id, event_id, aggregate_id, attempts, sent_at IS NOT NULL, \
                leased_until IS NOT NULL \
         FROM outbox ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("read outbox");
    rows.into_iter()
        .map(
            |(id, event_id, aggregate_id, attempts, sent, leased)| RowState {
                id,
                event_id,
                aggregate_id,
                attempts,
                sent,
                leased,
            },
        )
        .collect()
}

fn decode(delivery: &Delivery) -> PaymentEvent {
    PaymentEvent::decode(&delivery.payload).expect("a payment event on the wire")
}

/// Records every observation, for the assertions.
#[derive(Default)]
struct Recorded(Mutex<Vec<RelayObservation>>);

impl Recorded {
    fn all(&self) -> Vec<RelayObservation> {
        self.0.lock().unwrap().clone()
    }

    fn publishing(&self) -> Vec<(Uuid, i32)> {
        self.all()
            .into_iter()
            .filter_map(|o| match o {
                RelayObservation::RelayPublishing { order_id, attempt } => {
                    Some((order_id, attempt))
                }
                _ => None,
            })
            .collect()
    }
}

impl RelayObserver for Recorded {
    fn observe(&self, observation: &RelayObservation) {
        self.0.lock().unwrap().push(observation.clone());
    }
}

/// Refuses the first publish of one order's event (as a broker nack would),
/// and passes everything else through.
struct FailOnce {
    inner: Arc<dyn Publisher>,
    key: String,
    failed: AtomicBool,
}

#[async_trait::async_trait]
impl Publisher for FailOnce {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        if message.key == self.key && !self.failed.swap(true, Ordering::SeqCst) {
            return Err(QueueError::NotConfirmed("test: nacked once".into()));
        }
        self.inner.publish(message).await
    }
}

/// Takes a while before each publish, so that a relay's claim stays held
/// long enough for another relay to run into it.
struct Slow {
    inner: Arc<dyn Publisher>,
    delay: Duration,
}

#[async_trait::async_trait]
impl Publisher for Slow {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        tokio::time::sleep(self.delay).await;
        self.inner.publish(message).await
    }
}

/// The process-wide Prometheus recorder (installed once for this binary).
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| relay::metrics::install_recorder().expect("install recorder"))
}

fn counter(name: &str) -> f64 {
    recorder()
        .render()
        .lines()
        .find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0.0)
}

// 1. Claim, publish, mark ---------------------------------------------------

#[tokio::test]
async fn a_round_publishes_every_pending_row_in_id_order_and_marks_it_sent() {
    let db = TestDb::create().await;
    let queue = TestQueue::declare().await;
    let orders = place_orders(&db.pool(), 5).await;
    let relay = new_relay(db.pool(), queue.publisher().await, config(500));

    let round = relay.relay_once().await.expect("round");
    assert_eq!(
        round,
        RoundReport {
            claimed: 5,
            published: 5,
            failed: 0
        }
    );

    let rows = rows(&db.pool()).await;
    assert_eq!(rows.len(), 5);
    for row in &rows {
        assert!(row.sent, "marked sent: {row:?}");
        assert!(!row.leased, "lease cleared on mark: {row:?}");
        assert_eq!(row.attempts, 1, "claimed once: {row:?}");
    }
    assert_eq!(
        shop::outbox_producer::pending_count(&db.pool())
            .await
            .unwrap(),
        0
    );

    // The broker has exactly the five, in outbox id order, in wire format.
    assert_eq!(queue.ready().await, 5);
    let delivered = queue.take(5).await;
    let events: Vec<PaymentEvent> = delivered.iter().map(decode).collect();
    let by_id: Vec<(Uuid, Uuid)> = rows.iter().map(|r| (r.event_id, r.aggregate_id)).collect();
    let on_wire: Vec<(Uuid, Uuid)> = events.iter().map(|e| (e.event_id, e.order_id)).collect();
    assert_eq!(on_wire, by_id, "published in outbox id order");
    let placed: Vec<Uuid> = orders.iter().map(|o| o.order_id).collect();
    let published: Vec<Uuid> = events.iter().map(|e| e.order_id).collect();
    assert_eq!(published, placed);
    for (event, order) in events.iter().zip(&orders) {
        assert_eq!(event.amount_cents, order.amount_cents);
        assert_eq!(event.currency, order.currency);
    }
    for (delivery, event) in delivered.iter().zip(&events) {
        let message_id = event.event_id.to_string();
        assert_eq!(delivery.message_id.as_deref(), Some(message_id.as_str()));
    }

    // Nothing is left to claim.
    assert_eq!(
        relay.relay_once().await.expect("second round"),
        RoundReport::default()
    );
    assert_eq!(queue.ready().await, 0);

    queue.finish().await;
    db.finish().await;
}

// 2. Batches ----------------------------------------------------------------

#[tokio::test]
async fn rounds_claim_at_most_one_batch_each() {
    let db = TestDb::create().await;
    let queue = TestQueue::declare().await;
    place_orders(&db.pool(), 5).await;
    let relay = new_relay(db.pool(), queue.publisher().await, config(2));

    let mut claimed = Vec::new();
    loop {
        let round = relay.relay_once().await.expect("round");
        assert_eq!(round.published, round.claimed, "{round:?}");
        assert_eq!(round.failed, 0, "{round:?}");
        if round.claimed == 0 {
            break;
        }
        claimed.push(round.claimed);
        assert!(claimed.len() <= 3, "too many rounds: {claimed:?}");
    }
    assert_eq!(claimed, [2, 2, 1]);
    assert_eq!(queue.ready().await, 5);
    assert!(rows(&db.pool())
        .await
        .iter()
        .all(|r| r.sent && r.attempts == 1));

    queue.finish().await;
    db.finish().await;
}

// 3. Two relays at once -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_never_claim_the_same_row() {
    const ROWS: usize = 200;
    let db = TestDb::create().await;
    let queue = TestQueue::declare().await;
    place_orders(&db.pool(), ROWS as i64).await;

    // Two relay processes: each its own pool, channel and observer.
    let pool_b = databases::connect(&db.db.url, 4).await.expect("pool b");
    let slow = |inner: Arc<dyn Publisher>| -> Arc<dyn Publisher> {
        Arc::new(Slow {
            inner,
            delay: Duration::from_millis(20),
        })
    };
    let seen_a = Arc::new(Recorded::default());
    let seen_b = Arc::new(Recorded::default());
    let relay_a = new_relay_observed(
        db.pool(),
        slow(queue.publisher().await),
        config(50),
        seen_a.clone(),
    );
    let relay_b = new_relay_observed(
        pool_b.clone(),
        slow(queue.publisher().await),
        config(50),
        seen_b.clone(),
    );

    async fn until_empty(relay: &Relay) -> Vec<usize> {
        let mut rounds = Vec::new();
        loop {
            let round = relay.relay_once().await.expect("round");
            assert_eq!(round.failed, 0, "{round:?}");
            if round.claimed == 0 {
                return rounds;
            }
            rounds.push(round.claimed);
        }
    }
    let (rounds_a, rounds_b) = tokio::join!(until_empty(&relay_a), until_empty(&relay_b));
    let total: usize = rounds_a.iter().chain(&rounds_b).sum();
    assert_eq!(
        total, ROWS,
        "A claimed {rounds_a:?}, B claimed {rounds_b:?}"
    );
    assert!(
        !rounds_a.is_empty() && !rounds_b.is_empty(),
        "both relays worked: A {rounds_a:?}, B {rounds_b:?}"
    );

    // No row was claimed by both: disjoint claims, one claim per row.
    let claimed_a: HashSet<Uuid> = seen_a.publishing().into_iter().map(|(o, _)| o).collect();
    let claimed_b: HashSet<Uuid> = seen_b.publishing().into_iter().map(|(o, _)| o).collect();
    assert_eq!(claimed_a.len() + claimed_b.len(), ROWS);
    assert!(claimed_a.is_disjoint(&claimed_b), "a row claimed twice");
    let rows = rows(&db.pool()).await;
    assert_eq!(rows.len(), ROWS);
    for row in &rows {
        assert!(row.sent, "{row:?}");
        assert_eq!(row.attempts, 1, "claimed exactly once: {row:?}");
    }

    // Every row published exactly once overall.
    assert_eq!(queue.ready().await, ROWS as u64);
    let delivered = queue.take(ROWS).await;
    let events: HashSet<Uuid> = delivered.iter().map(|d| decode(d).event_id).collect();
    assert_eq!(events.len(), ROWS, "no event id twice on the queue");
    let expected: HashSet<Uuid> = rows.iter().map(|r| r.event_id).collect();
    assert_eq!(events, expected);

    pool_b.close().await;
    queue.finish().await;
    db.finish().await;
}

// 4. A failed publish -------------------------------------------------------

#[tokio::test]
async fn a_failed_publish_releases_the_row_for_the_next_round() {
    let db = TestDb::create().await;
    let queue = TestQueue::declare().await;
    let orders = place_orders(&db.pool(), 3).await;
    let chosen = orders[1].order_id;
    let seen = Arc::new(Recorded::default());
    let relay = new_relay_observed(
        db.pool(),
        Arc::new(FailOnce {
            inner: queue.publisher().await,
            key: chosen.to_string(),
            failed: AtomicBool::new(false),
        }),
        config(500),
        seen.clone(),
    );

    let first = relay.relay_once().await.expect("first round");
    assert_eq!(
        first,
        RoundReport {
            claimed: 3,
            published: 2,
            failed: 1
        }
    );
    for row in rows(&db.pool()).await {
        assert_eq!(row.attempts, 1, "{row:?}");
        if row.aggregate_id == chosen {
            assert!(!row.sent, "the refused row stays pending: {row:?}");
            assert!(!row.leased, "and is released at once: {row:?}");
        } else {
            assert!(row.sent, "the others are marked: {row:?}");
        }
    }
    assert_eq!(queue.ready().await, 2);
    let failures: Vec<RelayObservation> = seen
        .all()
        .into_iter()
        .filter(|o| matches!(o, RelayObservation::RelayPublishFailed { .. }))
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    match &failures[0] {
        RelayObservation::RelayPublishFailed {
            order_id,
            reason,
            attempts,
            still_pending,
        } => {
            assert_eq!(*order_id, chosen);
            assert_eq!(*attempts, 1);
            assert!(*still_pending);
            assert!(reason.contains("nacked once"), "{reason}");
        }
        other => unreachable!("{other:?}"),
    }

    // Released, not leased: the very next round takes it again.
    let second = relay.relay_once().await.expect("second round");
    assert_eq!(
        second,
        RoundReport {
            claimed: 1,
            published: 1,
            failed: 0
        }
    );
    let row = rows(&db.pool())
        .await
        .into_iter()
        .find(|r| r.aggregate_id == chosen)
        .unwrap();
    assert!(row.sent && !row.leased, "{row:?}");
    assert_eq!(row.attempts, 2, "{row:?}");
    assert!(seen.publishing().contains(&(chosen, 2)));
    assert_eq!(
        relay.relay_once().await.expect("third round"),
        RoundReport::default()
    );

    // Each event once on the queue; the chosen one last (it went out late).
    let events: Vec<PaymentEvent> = queue.take(3).await.iter().map(decode).collect();
    let order_ids: Vec<Uuid> = events.iter().map(|e| e.order_id).collect();
    assert_eq!(
        order_ids,
        [orders[0].order_id, orders[2].order_id, orders[1].order_id]
    );

    queue.finish().await;
    db.finish().await;
}

// 5. A relay that dies between publish and mark -----------------------------

#[tokio::test]
async fn rows_of_a_dead_relay_are_republished_once_its_lease_runs_out() {
    let db = TestDb::create().await;
    let queue = TestQueue::declare().await;
    place_orders(&db.pool(), 3).await;
    let republished_before = counter(relay::metrics::REPUBLISHED);

    // The dead relay: it claimed with a 1 s lease and published, and died
    // before it marked anything.
    let lease = Duration::from_secs(1);
    let dead = outbox::claim(&db.pool(), 500, lease).await.expect("claim");
    assert_eq!(dead.len(), 3);
    assert!(dead.iter().all(|row| row.attempts == 1));
    let publisher = queue.publisher().await;
    for row in &dead {
        publisher
            .publish(&OutgoingMessage {
                key: row.aggregate_id.to_string(),
                message_id: row.event_id.to_string(),
                payload: row.payload.clone().into_bytes(),
            })
            .await
            .expect("the dead relay's publish");
    }

    // While the lease holds, a live relay keeps away from those rows.
    let relay = new_relay(db.pool(), publisher, config(500));
    assert_eq!(
        relay.relay_once().await.expect("round under lease"),
        RoundReport::default()
    );
    assert!(rows(&db.pool()).await.iter().all(|r| !r.sent && r.leased));

    // After it, the rows come back as republishes.
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    assert_eq!(
        relay.relay_once().await.expect("round after lease"),
        RoundReport {
            claimed: 3,
            published: 3,
            failed: 0
        }
    );
    let rows = rows(&db.pool()).await;
    for row in &rows {
        assert!(row.sent && !row.leased, "{row:?}");
        assert_eq!(row.attempts, 2, "a republish: {row:?}");
    }
    assert!(
        counter(relay::metrics::REPUBLISHED) - republished_before >= 3.0,
        "the republish counter counts them"
    );

    // Every event is on the queue twice: the duplicate the consumer absorbs.
    let delivered = queue.take(6).await;
    for row in &rows {
        let copies = delivered
            .iter()
            .filter(|d| decode(d).event_id == row.event_id)
            .count();
        assert_eq!(copies, 2, "{row:?}");
    }

    queue.finish().await;
    db.finish().await;
}

// 6. NOTIFY wakes the relay -------------------------------------------------

/// Runs a relay with `wake`, lets it go idle, places one order and returns
/// how long the order took to reach the queue, or `None` if it did not
/// within a second.
async fn arrival_after_idle(wake: Wake) -> Option<Duration> {
    let db = TestDb::create().await;
    let queue = TestQueue::declare().await;
    let config = RelayConfig {
        wake,
        ..RelayConfig::default()
    };
    let relay = Arc::new(new_relay(db.pool(), queue.publisher().await, config));

    // An order placed before the relay starts goes out in its startup
    // drain; once it is on the queue, that round's claim is over and the
    // relay waits for its wake.
    place_orders(&db.pool(), 1).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        let relay = relay.clone();
        async move {
            relay
                .run(async move {
                    let _ = stopped.await;
                })
                .await
        }
    });
    assert!(
        queue.wait_for_ready(1, ARRIVES).await.is_some(),
        "the startup drain publishes what was pending ({})",
        wake.name()
    );

    let placed = Instant::now();
    place_orders(&db.pool(), 1).await;
    let arrived = queue.wait_for_ready(2, Duration::from_secs(1)).await;
    let latency = arrived.map(|_| placed.elapsed());

    stop.send(()).expect("the relay is still running");
    tokio::time::timeout(ARRIVES, task)
        .await
        .expect("the relay stops when asked")
        .expect("the relay task did not panic")
        .expect("the relay ran without error");
    queue.finish().await;
    db.finish().await;
    latency
}

#[tokio::test]
async fn notify_wakes_an_idle_relay_where_a_poll_would_wait() {
    let (notify, poll) = tokio::join!(
        arrival_after_idle(Wake::Notify {
            fallback_poll: Duration::from_secs(30),
        }),
        arrival_after_idle(Wake::Poll {
            interval: Duration::from_secs(30),
        }),
    );
    assert!(
        notify.is_some(),
        "NOTIFY should wake the relay within 1 s (its fallback poll is 30 s)"
    );
    assert_eq!(
        poll, None,
        "a 30 s poll must not publish within 1 s: the NOTIFY relay's speed came from the notification"
    );
}

// 7. Backlog ----------------------------------------------------------------

#[tokio::test]
async fn backlog_counts_pending_rows_and_ages_the_oldest() {
    let db = TestDb::create().await;
    let pool = db.pool();
    assert_eq!(
        outbox::backlog(&pool).await.expect("backlog"),
        Backlog {
            pending: 0,
            oldest_age_seconds: 0.0
        }
    );

    let orders = place_orders(&pool, 2).await;
    sqlx::query(
        "UPDATE outbox SET created_at = now() - interval '10 seconds' WHERE aggregate_id = $1",
    )
    .bind(orders[0].order_id)
    .execute(&pool)
    .await
    .expect("age the first row");
    let backlog = outbox::backlog(&pool).await.expect("backlog");
    assert_eq!(backlog.pending, 2);
    assert!(
        (10.0..60.0).contains(&backlog.oldest_age_seconds),
        "the oldest row is about 10 s old: {backlog:?}"
    );

    // Leased rows are still pending; sent ones are not.
    let claimed = outbox::claim(&pool, 500, Duration::from_secs(5))
        .await
        .expect("claim");
    assert_eq!(outbox::backlog(&pool).await.unwrap().pending, 2);
    let ids: Vec<i64> = claimed.iter().map(|row| row.id).collect();
    outbox::mark_sent(&pool, &ids).await.expect("mark sent");
    assert_eq!(
        outbox::backlog(&pool).await.expect("backlog"),
        Backlog {
            pending: 0,
            oldest_age_seconds: 0.0
        }
    );

    db.finish().await;
}

// 8. Stopping a relay whose publishes keep failing --------------------------

/// A broker that refuses everything (down, or the queue is gone).
struct AlwaysRefuses;

#[async_trait::async_trait]
impl Publisher for AlwaysRefuses {
    async fn publish(&self, _: &OutgoingMessage) -> Result<(), QueueError> {
        Err(QueueError::NotConfirmed("test: the broker refuses".into()))
    }
}

#[tokio::test]
async fn a_relay_stops_when_asked_while_its_publishes_keep_failing() {
    let db = TestDb::create().await;
    place_orders(&db.pool(), 1).await;
    let seen = Arc::new(Recorded::default());
    // A long pause between failed rounds: the stop arrives during one.
    let config = RelayConfig {
        retry_delay: Duration::from_secs(30),
        ..config(500)
    };
    let relay = Arc::new(new_relay_observed(
        db.pool(),
        Arc::new(AlwaysRefuses),
        config,
        seen.clone(),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        let relay = relay.clone();
        async move {
            relay
                .run(async move {
                    let _ = stopped.await;
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).expect("the relay is still running");
    tokio::time::timeout(ARRIVES, task)
        .await
        .expect("the relay stops when asked, failing publishes or not")
        .expect("the relay task did not panic")
        .expect("the relay ran without error");

    let failures = seen
        .all()
        .iter()
        .filter(|o| matches!(o, RelayObservation::RelayPublishFailed { .. }))
        .count();
    assert_eq!(failures, 1, "one failed round before the pause");
    let row = rows(&db.pool()).await.pop().unwrap();
    assert!(!row.sent && !row.leased, "{row:?}");

    db.finish().await;
}

/// A publisher that fails round after round is given up, so that the
/// service around the relay connects a new one; the rows stay pending.
#[tokio::test]
async fn a_relay_gives_up_a_publisher_that_keeps_failing() {
    let db = TestDb::create().await;
    place_orders(&db.pool(), 1).await;
    let seen = Arc::new(Recorded::default());
    let config = RelayConfig {
        retry_delay: Duration::from_millis(20),
        ..config(500)
    };
    let relay = new_relay_observed(db.pool(), Arc::new(AlwaysRefuses), config, seen.clone());
    let result = tokio::time::timeout(ARRIVES, relay.run(std::future::pending::<()>()))
        .await
        .expect("the relay returns on its own");
    assert!(
        matches!(
            result,
            Err(relay::RelayError::PublisherFailing { rounds }) if rounds == relay::FAILED_ROUNDS_BEFORE_RECONNECT
        ),
        "{result:?}"
    );
    let failures = seen
        .all()
        .iter()
        .filter(|o| matches!(o, RelayObservation::RelayPublishFailed { .. }))
        .count();
    assert_eq!(failures, relay::FAILED_ROUNDS_BEFORE_RECONNECT as usize);
    let row = rows(&db.pool()).await.pop().unwrap();
    assert!(!row.sent && !row.leased, "{row:?}");
    assert_eq!(
        shop::outbox_producer::pending_count(&db.pool())
            .await
            .unwrap(),
        1
    );

    db.finish().await;
}
