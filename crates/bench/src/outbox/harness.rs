//! The parts every run shares: its database and queue, the relays under
//! test, the publishers and the consumer that time them, the producer that
//! places orders, and the count of the relays' queries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use databases::FreshDatabase;
use payments::PaymentEvent;
use queue::rabbitmq::{url_from_env, RabbitBroker, RabbitReceiver, Topology};
use queue::{OutgoingMessage, Publisher, QueueError, Receiver};
use relay::{NoFaults, Relay, RelayConfig, RelayError, Unobserved};
use shop::Order;
use sqlx::PgPool;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use uuid::Uuid;

/// One run's database (with the shop schema) and queue; removed by
/// [`Stage::finish`] whether or not the run worked.
pub(crate) struct Stage {
    pub(crate) db: FreshDatabase,
    pub(crate) broker: RabbitBroker,
    pub(crate) topology: Topology,
}

impl Stage {
    pub(crate) async fn open(prefix: &str) -> anyhow::Result<Self> {
        let db = FreshDatabase::create(prefix, 8)
            .await
            .context("creating the run's database")?;
        let stage = async {
            shop::migrate(&db.pool)
                .await
                .context("applying the shop schema")?;
            let broker = RabbitBroker::connect(&url_from_env()).await?;
            let topology = Topology::durable(format!("eo.bench.{}", Uuid::new_v4().simple()));
            broker.declare(&topology).await?;
            anyhow::Ok((broker, topology))
        }
        .await;
        match stage {
            Ok((broker, topology)) => Ok(Self {
                db,
                broker,
                topology,
            }),
            Err(error) => {
                let _ = db.drop_database().await;
                Err(error)
            }
        }
    }

    pub(crate) async fn finish<T>(self, outcome: anyhow::Result<T>) -> anyhow::Result<T> {
        let deleted = self.broker.delete(&self.topology).await;
        let _ = self.broker.close().await;
        self.db.pool.close().await;
        let dropped = drop_database(&self.db.name).await;
        let value = outcome?;
        deleted.context("deleting the run's queue")?;
        dropped.context("dropping the run's database")?;
        Ok(value)
    }
}

/// Drops the database, waiting out an autovacuum worker in it: `DROP
/// DATABASE … WITH (FORCE)` may not end a superuser's process, and a big
/// load or cleanup is just what wakes autovacuum.
async fn drop_database(name: &str) -> Result<(), databases::DatabaseError> {
    let mut tries = 0;
    loop {
        match databases::drop_database(name).await {
            Err(databases::DatabaseError::Sql(error)) if tries < 60 && in_use(&error) => {
                tries += 1;
                if tries == 1 {
                    eprintln!("dropping {name}: {error}; retrying for up to a minute");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// Someone we may not end is still in the database: 42501 (not allowed to
/// signal that backend) or 55006 (object in use).
fn in_use(error: &sqlx::Error) -> bool {
    let code = error.as_database_error().and_then(|e| e.code());
    matches!(code.as_deref(), Some("42501" | "55006"))
}

/// A valid payment event as JSON text, built in SQL from the columns
/// `event_id`, `order_id`, `amount_cents`, `currency`, `created_at`.
pub(crate) const EVENT_JSON: &str = "json_build_object(
        'event_id', event_id, 'order_id', order_id, 'amount_cents', amount_cents,
        'currency', currency,
        'created_at', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
    )::text";

/// The generated payloads must be events the consumer accepts.
pub(crate) async fn check_payloads(pool: &PgPool) -> anyhow::Result<()> {
    let payloads: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
        "SELECT event_id, aggregate_id, payload FROM outbox ORDER BY random() LIMIT 100",
    )
    .fetch_all(pool)
    .await?;
    for (event_id, order_id, payload) in payloads {
        let event = PaymentEvent::decode(payload.as_bytes())
            .with_context(|| format!("generated payload {payload}"))?;
        ensure!(
            event.event_id == event_id && event.order_id == order_id,
            "generated payload {payload} does not match its row"
        );
    }
    Ok(())
}

/// Relays running in this process, each with its own pool and publisher.
pub(crate) struct RelayGroup {
    running: Vec<RunningRelay>,
}

struct RunningRelay {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), RelayError>>,
    pool: PgPool,
}

impl RelayGroup {
    pub(crate) async fn start(
        url: &str,
        publishers: Vec<Arc<dyn Publisher>>,
        config: RelayConfig,
    ) -> anyhow::Result<Self> {
        let mut running = Vec::new();
        for publisher in publishers {
            let pool = databases::connect(url, 2).await?;
            let relay = Relay {
                pool: pool.clone(),
                publisher,
                config,
                faults: Arc::new(NoFaults),
                observer: Arc::new(Unobserved),
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let handle = tokio::spawn(async move {
                relay
                    .run(async move {
                        let _ = stopped.await;
                    })
                    .await
            });
            running.push(RunningRelay { stop, handle, pool });
        }
        Ok(Self { running })
    }

    /// Fails if a relay returned (with an error: nothing told it to stop).
    pub(crate) fn check_running(&self) -> anyhow::Result<()> {
        if self.running.iter().any(|relay| relay.handle.is_finished()) {
            bail!("a relay stopped on its own");
        }
        Ok(())
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        let mut first_error = None;
        for RunningRelay { stop, handle, pool } in self.running {
            let _ = stop.send(());
            let outcome = match handle.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(anyhow::Error::new(error).context("the relay failed")),
                Err(panic) => Err(anyhow::anyhow!("the relay task panicked: {panic}")),
            };
            pool.close().await;
            if let Err(error) = outcome {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A publisher that notes when each order's confirm arrived (the relay's
/// publish future returned: the broker acked it).
pub(crate) struct TimedPublisher {
    pub(crate) inner: Arc<dyn Publisher>,
    pub(crate) confirmed: Arc<Mutex<HashMap<Uuid, Instant>>>,
}

#[async_trait::async_trait]
impl Publisher for TimedPublisher {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        self.inner.publish(message).await?;
        let at = Instant::now();
        // The relay's key is the order id (the outbox row's aggregate id).
        if let Ok(order_id) = message.key.parse::<Uuid>() {
            self.confirmed
                .lock()
                .expect("confirms lock")
                .entry(order_id)
                .or_insert(at);
        }
        Ok(())
    }
}

/// A publisher that counts confirms, and how long at least one publish
/// was waiting for its confirm: the rest of a drain is the relay's SQL
/// (claim and mark) and its loop.
pub(crate) struct CountingPublisher {
    pub(crate) inner: Arc<dyn Publisher>,
    pub(crate) confirmed: Arc<AtomicU64>,
    pub(crate) in_flight: Arc<Mutex<InFlight>>,
}

#[derive(Debug, Default)]
pub(crate) struct InFlight {
    publishes: usize,
    since: Option<Instant>,
    pub(crate) busy: Duration,
}

#[async_trait::async_trait]
impl Publisher for CountingPublisher {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            if in_flight.publishes == 0 {
                in_flight.since = Some(Instant::now());
            }
            in_flight.publishes += 1;
        }
        let published = self.inner.publish(message).await;
        {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            in_flight.publishes -= 1;
            if in_flight.publishes == 0 {
                if let Some(since) = in_flight.since.take() {
                    in_flight.busy += since.elapsed();
                }
            }
        }
        published?;
        self.confirmed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A consumer that notes when each order's event arrived, and acks it.
pub(crate) struct ArrivalConsumer {
    pub(crate) arrivals: Arc<Mutex<HashMap<Uuid, Instant>>>,
    stop: oneshot::Sender<()>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl ArrivalConsumer {
    pub(crate) fn spawn(mut receiver: RabbitReceiver) -> Self {
        let arrivals = Arc::new(Mutex::new(HashMap::new()));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let noted = arrivals.clone();
        let handle = tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    biased;
                    _ = &mut stopped => return Ok(()),
                    batch = receiver.receive(1000, Duration::from_millis(200)) => batch?,
                };
                let at = Instant::now();
                {
                    let mut noted = noted.lock().expect("arrivals lock");
                    for delivery in &batch {
                        let event = PaymentEvent::decode(&delivery.payload)
                            .context("a delivered payload is not a payment event")?;
                        noted.entry(event.order_id).or_insert(at);
                    }
                }
                for delivery in &batch {
                    receiver.ack(delivery).await?;
                }
            }
        });
        Self {
            arrivals,
            stop,
            handle,
        }
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.handle.await.context("the consumer task panicked")?
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Commit {
    pub(crate) order_id: Uuid,
    /// When `place_order` returned: its COMMIT was acknowledged.
    pub(crate) at: Instant,
}

/// Places orders at a steady pace until stopped, each in a task of its own:
/// an open loop, so a slow commit does not hold back the orders after it
/// (a stall shows as latency, not as a quietly lower rate).
///
/// The producer has a thread, a runtime and a pool of its own, so that the
/// instant it notes after each COMMIT is not late because the relay's or
/// the consumer's tasks were ahead of it in a shared run queue (a late
/// commit instant would make every latency look shorter than it was).
pub(crate) struct Producer {
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<anyhow::Result<Vec<Commit>>>,
}

impl Producer {
    pub(crate) fn spawn(url: &str, rate: u32) -> anyhow::Result<Self> {
        let (stop, stopped) = watch::channel(false);
        let url = url.to_owned();
        let thread = std::thread::Builder::new()
            .name("producer".to_owned())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("the producer's runtime")?
                    .block_on(produce(url, rate, stopped))
            })
            .context("starting the producer thread")?;
        Ok(Self { stop, thread })
    }

    pub(crate) async fn stop(self) -> anyhow::Result<Vec<Commit>> {
        let _ = self.stop.send(true);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("waiting for the producer thread")?
            .map_err(|_| anyhow::anyhow!("the producer thread panicked"))?
    }
}

async fn produce(
    url: String,
    rate: u32,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<Vec<Commit>> {
    let pool = databases::connect(&url, 8).await?;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let started = tokio::time::Instant::now();
    let commits = Arc::new(Mutex::new(Vec::new()));
    let mut placing = JoinSet::new();
    for n in 0u64.. {
        let due = started + period.mul_f64(n as f64);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stopped.changed() => break,
        }
        while let Some(placed) = placing.try_join_next() {
            placed??;
        }
        let pool = pool.clone();
        let commits = commits.clone();
        placing.spawn(async move {
            let order = Order {
                order_id: Uuid::new_v4(),
                amount_cents: 100 + (n % 50_000) as i64,
                currency: "EUR".to_owned(),
            };
            shop::outbox_producer::place_order(&pool, &shop::naive_producer::NoFaults, &order)
                .await
                .context("placing an order")?;
            let at = Instant::now();
            commits.lock().expect("commits lock").push(Commit {
                order_id: order.order_id,
                at,
            });
            anyhow::Ok(())
        });
    }
    while let Some(placed) = placing.join_next().await {
        placed??;
    }
    pool.close().await;
    let commits = std::mem::take(&mut *commits.lock().expect("commits lock"));
    Ok(commits)
}

/// Counts `relay_queries_total` increments, the relay's own count of the SQL
/// statements it sends; every other metric is dropped. The relay modes run
/// one after another, so the count between two readings is one relay's.
pub(crate) struct QueryCounter;

static QUERIES: AtomicU64 = AtomicU64::new(0);

pub(crate) fn queries_so_far() -> u64 {
    QUERIES.load(Ordering::Relaxed)
}

struct StaticCounter;

impl metrics::CounterFn for StaticCounter {
    fn increment(&self, value: u64) {
        QUERIES.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        QUERIES.fetch_max(value, Ordering::Relaxed);
    }
}

impl metrics::Recorder for QueryCounter {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        if key.name() == relay::metrics::QUERIES {
            metrics::Counter::from_arc(Arc::new(StaticCounter))
        } else {
            metrics::Counter::noop()
        }
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}
