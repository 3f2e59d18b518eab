//! The child side of the lab: the same executable, started again with
//! `EO_LAB_ROLE` set, becomes a consumer or a producer process.
//!
//! Re-executing the chapter's own binary (rather than a separate consumer
//! binary) means `cargo run -p chNN-…` builds everything a run needs, and
//! the process the lab kills is a real, separate OS process.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use consumer::crash::{CrashPoint, CrashSchedule};
use consumer::observe::StdoutObserver;
use consumer::Variant;
use queue::backend::{Broker, QueueSpec};
use queue::{OutgoingMessage, Publisher, QueueError};
use serde::{Deserialize, Serialize};
use shop::naive_producer::{self, ProducerFaults};
use shop::Order;
use uuid::Uuid;

use crate::plan::{ChaosPlan, Poison, ProducerFault};

pub const ROLE_ENV: &str = "EO_LAB_ROLE";

/// How the shop tells the payment consumer about an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProducerKind {
    /// Commit, then publish: the dual write.
    Naive,
    /// Order and outbox row in one transaction; relay processes publish.
    Outbox {
        relays: usize,
        relay: relay::RelayConfig,
    },
    /// Order and outbox row in one transaction; Debezium reads the row from
    /// the WAL and a Kafka Connect worker publishes it (chapter 7, Kafka
    /// only).
    Cdc { delivery: cdc::worker::Delivery },
}

impl ProducerKind {
    pub fn name(self) -> String {
        match self {
            ProducerKind::Naive => "naive (commit, then publish)".to_owned(),
            ProducerKind::Outbox { relays, relay } => format!(
                "outbox + {relays} relay{} ({})",
                if relays == 1 { "" } else { "s" },
                relay.wake.name()
            ),
            ProducerKind::Cdc { delivery } => format!("outbox + Debezium ({})", delivery.name()),
        }
    }
}
pub const CONFIG_ENV: &str = "EO_LAB_CONFIG";

fn one() -> usize {
    1
}

/// Everything a child process needs, written to a file by the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub run_id: String,
    pub variant: Variant,
    pub producer: ProducerKind,
    pub plan: ChaosPlan,
    pub shop_database_url: String,
    pub psp_base_url: String,
    pub psp_api_key: String,
    pub psp_timeout_ms: u64,
    pub queue: QueueSpec,
    pub prefetch: u16,
    /// Deliveries per receive (and per batch, for the hardened consumer).
    #[serde(default = "one")]
    pub batch_size: usize,
    /// The consumers' visibility heartbeat, if they keep one.
    pub heartbeat: Option<consumer::Heartbeat>,
    /// Milliseconds the producer waits between orders.
    pub publish_pace_ms: Option<u64>,
    /// The run's own folder: logs and crash markers.
    pub work_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Consumer,
    Producer,
    Relay,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Consumer => "consumer",
            Role::Producer => "producer",
            Role::Relay => "relay",
        }
    }

    /// The role this process was started in, if the lab started it.
    pub fn from_env() -> Option<Role> {
        match std::env::var(ROLE_ENV).ok()?.as_str() {
            "consumer" => Some(Role::Consumer),
            "producer" => Some(Role::Producer),
            "relay" => Some(Role::Relay),
            _ => None,
        }
    }

    /// Runs the role to completion and turns the result into an exit code.
    pub async fn run(self) -> ExitCode {
        telemetry::service::init_logging("warn");
        let result = async {
            let path = std::env::var(CONFIG_ENV).context("EO_LAB_CONFIG is not set")?;
            let config = load_config(Path::new(&path))?;
            match self {
                Role::Consumer => run_consumer(config).await,
                Role::Producer => run_producer(config).await,
                Role::Relay => run_relay(config).await,
            }
        }
        .await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("{} process failed: {error:#}", self.name());
                ExitCode::FAILURE
            }
        }
    }
}

fn load_config(path: &Path) -> anyhow::Result<RunConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the run config {}", path.display()))?;
    serde_json::from_str(&text).context("parsing the run config")
}

/// Crashes at the point the plan names for an order, once per run.
///
/// "Once" is remembered in a marker file shared by every consumer process
/// of the run, not in the broker's redelivered flag: a message prefetched by
/// a process that dies is redelivered before it was ever handled, and its
/// planned crash must still happen exactly once for a seed to replay.
struct PlannedCrashes {
    points: HashMap<Uuid, CrashPoint>,
    /// Poison events that kill whoever handles them, every time.
    every_time: HashSet<Uuid>,
    marker_dir: PathBuf,
}

impl CrashSchedule for PlannedCrashes {
    fn should_crash(&self, point: CrashPoint, order_id: Uuid) -> bool {
        if self.every_time.contains(&order_id) {
            return point == CrashPoint::BeforeCharge;
        }
        self.points.get(&order_id) == Some(&point)
            && first_time(&self.marker_dir, "crashed", order_id)
    }
}

/// True the first time any process of the run asks about `what` for
/// `order_id`: `create_new` is atomic, so of two racing processes one wins.
fn first_time(marker_dir: &Path, what: &str, order_id: impl std::fmt::Display) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(marker_dir.join(format!("{what}-{order_id}")))
        .is_ok()
}

/// The same service an operator starts with the `consumer` binary, with
/// the run's crash points and the observation lines plugged in.
async fn run_consumer(config: RunConfig) -> anyhow::Result<()> {
    let crashes = PlannedCrashes {
        points: config
            .plan
            .orders
            .iter()
            .filter_map(|o| o.consumer_crash.map(|point| (o.order_id, point)))
            .collect(),
        every_time: config
            .plan
            .poison
            .iter()
            .filter_map(|poison| match poison {
                Poison::KillsEveryConsumer { order_id } => Some(*order_id),
                Poison::Malformed { .. } => None,
            })
            .collect(),
        marker_dir: config.work_dir.clone(),
    };
    let settings = consumer::service::Settings {
        variant: config.variant,
        database: databases::Location::Url(config.shop_database_url.clone()),
        queue: config.queue.clone(),
        prefetch: config.prefetch,
        psp_base_url: config.psp_base_url.clone(),
        psp_api_key: config.psp_api_key.clone(),
        psp_timeout: Duration::from_millis(config.psp_timeout_ms),
        heartbeat: config.heartbeat,
        // Many consumers run at once: each picks a free port and tells the
        // supervisor which.
        metrics_addr: std::env::var("EO_CONSUMER_METRICS_ADDR")
            .unwrap_or_else(|_| "127.0.0.1:0".into()),
        requeue_delay: Duration::from_millis(200),
        batch_size: config.batch_size,
    };
    let hooks = consumer::service::Hooks {
        crashes: Arc::new(crashes),
        observer: Arc::new(StdoutObserver),
    };
    consumer::service::run(settings, hooks, telemetry::service::shutdown_signal())
        .await
        .context("consumer")?;
    Ok(())
}

/// Publishes as the plan says. A planned drop loses the message on its way
/// to the broker, once per run: the broker never confirms it, so the publish
/// fails (the naive producer logs that and moves on; a relay retries). A
/// planned duplicate is sent twice, as by a producer that retried a publish
/// whose confirm it never saw.
struct ChaosPublisher {
    inner: Box<dyn Publisher>,
    dropped: HashSet<String>,
    duplicated: HashSet<String>,
    altered: HashSet<String>,
    renewed: HashSet<String>,
    marker_dir: PathBuf,
}

#[async_trait::async_trait]
impl Publisher for ChaosPublisher {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        if self.dropped.contains(&message.key)
            && first_time(&self.marker_dir, "dropped", &message.key)
        {
            return Err(QueueError::NotConfirmed(
                "dropped on the way to the broker (chaos schedule)".into(),
            ));
        }
        if self.duplicated.contains(&message.key) {
            self.inner.publish(message).await?;
        }
        self.inner.publish(message).await?;
        if self.altered.contains(&message.key) {
            // Same event id, another amount: what a producer bug that
            // re-sends an amended order under its old event looks like.
            if let Ok(mut event) = payments::PaymentEvent::decode(&message.payload) {
                event.amount_cents += 1;
                let altered = OutgoingMessage {
                    payload: event.encode(),
                    ..message.clone()
                };
                self.inner.publish(&altered).await?;
            }
        }
        if self.renewed.contains(&message.key) {
            // Same order, same amount, a new event id: a producer whose
            // retry builds a fresh message instead of re-sending the old one.
            if let Ok(mut event) = payments::PaymentEvent::decode(&message.payload) {
                event.event_id = Uuid::new_v4();
                let renewed = OutgoingMessage {
                    message_id: event.event_id.to_string(),
                    payload: event.encode(),
                    ..message.clone()
                };
                self.inner.publish(&renewed).await?;
            }
        }
        Ok(())
    }
}

/// SIGKILLs the producer after the commit of each order planned to crash
/// there, and inside the transaction of each planned to crash mid-way (once:
/// the restarted producer places that order again).
struct PlannedProducerCrashes {
    after_commit: HashSet<Uuid>,
    mid_transaction: HashSet<Uuid>,
    marker_dir: PathBuf,
}

impl ProducerFaults for PlannedProducerCrashes {
    fn after_commit(&self, order: &Order) {
        if self.after_commit.contains(&order.order_id) {
            consumer::crash::kill_this_process();
        }
    }

    fn before_commit(&self, order: &Order) {
        if self.mid_transaction.contains(&order.order_id)
            && first_time(&self.marker_dir, "producer-mid-transaction", order.order_id)
        {
            consumer::crash::kill_this_process();
        }
    }
}

fn orders_with(config: &RunConfig, fault: ProducerFault) -> impl Iterator<Item = Uuid> + '_ {
    config
        .plan
        .orders
        .iter()
        .filter(move |o| o.producer_fault == Some(fault))
        .map(|o| o.order_id)
}

/// Wraps a real publisher in the run's planned producer faults.
fn chaos_publisher(config: &RunConfig, inner: Box<dyn Publisher>) -> ChaosPublisher {
    let keys = |fault| {
        orders_with(config, fault)
            .map(|id| id.to_string())
            .collect()
    };
    ChaosPublisher {
        inner,
        dropped: keys(ProducerFault::PublishDropped),
        duplicated: keys(ProducerFault::PublishedTwice),
        altered: keys(ProducerFault::RepublishedAltered),
        renewed: keys(ProducerFault::RepublishedNewId),
        marker_dir: config.work_dir.clone(),
    }
}

/// The lab's producer's Postgres pool: it writes one order at a time.
pub const PRODUCER_POOL_CONNECTIONS: u32 = 2;

async fn run_producer(config: RunConfig) -> anyhow::Result<()> {
    let pool = ride_out("connecting to the shop's database", || {
        databases::connect(&config.shop_database_url, PRODUCER_POOL_CONNECTIONS)
    })
    .await?;
    let broker = ride_out("connecting to the broker", || {
        Broker::connect_for(&config.queue)
    })
    .await?;
    let publisher = chaos_publisher(
        &config,
        ride_out("opening a publisher", || broker.publisher(&config.queue)).await?,
    );
    let crashes = PlannedProducerCrashes {
        after_commit: orders_with(&config, ProducerFault::CrashAfterCommit).collect(),
        mid_transaction: orders_with(&config, ProducerFault::CrashMidTransaction).collect(),
        marker_dir: config.work_dir.clone(),
    };

    // A restarted producer carries on after the last order it committed,
    // like a web shop that keeps taking orders after a restart. An order
    // committed but not published before the crash is never looked at again.
    let committed: HashSet<Uuid> = ride_out("reading the committed orders", || {
        shop::committed_order_ids(&pool)
    })
    .await?
    .into_iter()
    .collect();
    for planned in config
        .plan
        .orders
        .iter()
        .filter(|o| !committed.contains(&o.order_id))
    {
        if let Some(pace) = config.publish_pace_ms {
            tokio::time::sleep(Duration::from_millis(pace)).await;
        }
        let order = Order {
            order_id: planned.order_id,
            amount_cents: planned.amount_cents,
            currency: planned.currency.clone(),
        };
        // The shop's database going away (a restart) fails the order: like
        // a web shop, try it again once the database is back, unless its
        // COMMIT got through before the connection broke.
        ride_out(&format!("placing order {}", order.order_id), || async {
            let placed = match config.producer {
                ProducerKind::Naive => {
                    naive_producer::place_order(&pool, &publisher, &crashes, &order)
                        .await
                        .map(|_| ())
                }
                ProducerKind::Outbox { .. } | ProducerKind::Cdc { .. } => {
                    shop::outbox_producer::place_order(&pool, &crashes, &order).await
                }
            };
            match placed {
                Err(_)
                    if shop::committed_order_ids(&pool)
                        .await
                        .is_ok_and(|ids| ids.contains(&order.order_id)) =>
                {
                    Ok(())
                }
                other => other,
            }
        })
        .await?;
    }
    publish_poison(&config, &*publisher.inner).await?;
    Ok(())
}

/// How long the producer keeps retrying a service that went away before it
/// gives up and exits (the lab then restarts it).
const RIDE_OUT: Duration = Duration::from_secs(60);

/// Retries `attempt` with backoff while it fails, for up to [`RIDE_OUT`],
/// logging each failure: the broker or the database restarting is an
/// outage to wait out, not a reason to exit.
async fn ride_out<T, E, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display + Into<anyhow::Error>,
{
    let mut backoff = telemetry::service::Backoff::default();
    let started = std::time::Instant::now();
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if started.elapsed() < RIDE_OUT => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, "{what} failed; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
            }
            Err(error) => return Err(error.into()).context(what.to_owned()),
        }
    }
}

/// Publishes the plan's poison messages after the orders, once per run (a
/// restarted producer does not publish them again).
async fn publish_poison(config: &RunConfig, publisher: &dyn Publisher) -> anyhow::Result<()> {
    for (index, poison) in config.plan.poison.iter().enumerate() {
        let marker = config.work_dir.join(format!("poison-{index}"));
        if marker.exists() {
            continue;
        }
        let message = poison.message(index);
        publisher
            .publish(&message)
            .await
            .with_context(|| format!("publishing poison message {}", message.message_id))?;
        std::fs::write(&marker, b"published")
            .with_context(|| format!("writing {}", marker.display()))?;
    }
    Ok(())
}

/// SIGKILLs a relay after it published a planned order's event, before the
/// row is marked sent: once per run.
struct PlannedRelayCrashes {
    orders: HashSet<Uuid>,
    marker_dir: PathBuf,
}

impl relay::RelayFaults for PlannedRelayCrashes {
    fn after_publish(&self, published: &[relay::outbox::OutboxRow]) {
        let planned = published.iter().any(|row| {
            self.orders.contains(&row.aggregate_id)
                && first_time(&self.marker_dir, "relay-crashed", row.aggregate_id)
        });
        if planned {
            consumer::crash::kill_this_process();
        }
    }
}

struct StdoutRelayObserver;

impl relay::RelayObserver for StdoutRelayObserver {
    fn observe(&self, observation: &relay::RelayObservation) {
        use std::io::Write;
        let line = serde_json::to_string(observation).expect("observations serialise");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// The same service an operator starts with the `relay` binary, with the
/// run's planned drops and crashes plugged in.
async fn run_relay(config: RunConfig) -> anyhow::Result<()> {
    let ProducerKind::Outbox {
        relay: relay_config,
        ..
    } = config.producer
    else {
        anyhow::bail!("a relay process needs an outbox producer in the run config");
    };
    let settings = relay::service::Settings {
        database: databases::Location::Url(config.shop_database_url.clone()),
        queue: config.queue.clone(),
        relay: relay_config,
        metrics_addr: "127.0.0.1:0".into(),
    };
    let faults = PlannedRelayCrashes {
        orders: orders_with(&config, ProducerFault::RelayCrashAfterPublish).collect(),
        marker_dir: config.work_dir.clone(),
    };
    let wrap_config = config.clone();
    let hooks = relay::service::Hooks {
        faults: Arc::new(faults),
        observer: Arc::new(StdoutRelayObserver),
        wrap_publisher: Box::new(move |inner| Arc::new(chaos_publisher(&wrap_config, inner))),
        metrics_served: Box::new(|addr| {
            relay::RelayObserver::observe(
                &StdoutRelayObserver,
                &relay::RelayObservation::RelayMetricsServed {
                    addr: addr.to_string(),
                },
            )
        }),
    };
    relay::service::run(settings, hooks, telemetry::service::shutdown_signal())
        .await
        .context("relay")?;
    Ok(())
}
