//! The consumer as a service: what the `consumer` binary runs, and what the
//! chaos lab's consumer processes run with their crash points plugged in.
//!
//! It sets up what it needs (the tables through migrations, the queue with
//! its dead-letter queue and redrive policy or dead-letter exchange), serves
//! `/metrics` before anything else, and then consumes until it is asked to
//! stop. A broker or database that goes away is waited for with bounded
//! backoff and a log line per attempt, never a crash: `/metrics` stays up
//! and its `connected{to="broker"|"database"}` gauges say what is missing.
//!
//! Stopping (SIGTERM, Ctrl-C) lets the message in hand finish and settle,
//! then returns: nothing unfinished is acked. What the process prefetched
//! but never started is handed back by the broker when the connection
//! closes (RabbitMQ), when its lease runs out (SQS) or from the last
//! committed offset (Kafka).
//!
//! The one failure that stops it is one no retry can fix: the PSP refusing
//! the consumer's API key. The message in hand is handed back first.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use psp::client::PspClient;
use queue::backend::{Broker, QueueSpec};
use queue::Receiver;
use sqlx::PgPool;
use telemetry::service::{set_connected, sleep_or_stop, Backoff};

use crate::crash::{CrashSchedule, NeverCrash};
use crate::observe::{LogObserver, Observation, Observer};
use crate::{ConsumerError, Heartbeat, PaymentConsumer, Variant};

/// The consumer's Postgres pool. A delivery in hand holds one connection
/// for its transaction, across the PSP call; a duplicate's fingerprint check
/// reads on another.
pub const POOL_CONNECTIONS: u32 = 4;

/// Everything an operator configures. No `Debug`: it holds the PSP's API
/// key and a database URL that may carry a password.
#[derive(Clone)]
pub struct Settings {
    pub variant: Variant,
    /// The shop database, where the payments and the dedup table live.
    pub database: databases::Location,
    pub queue: QueueSpec,
    /// RabbitMQ: unacked messages this process may hold.
    pub prefetch: u16,
    pub psp_base_url: String,
    pub psp_api_key: String,
    pub psp_timeout: Duration,
    /// Extend each delivery's lease while it is handled (SQS).
    pub heartbeat: Option<Heartbeat>,
    /// Where `/metrics` is served; port 0 picks a free one.
    pub metrics_addr: String,
    /// Pause before handing back a delivery whose charge may succeed later.
    pub requeue_delay: Duration,
    /// Deliveries taken per receive and, for the hardened variant, handled
    /// as one batch. RabbitMQ's prefetch is raised to it when below.
    pub batch_size: usize,
}

/// What the chaos lab plugs in; an operator's process uses the defaults
/// (no crash points, outcomes in the log).
pub struct Hooks {
    pub crashes: Arc<dyn CrashSchedule>,
    pub observer: Arc<dyn Observer>,
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            crashes: Arc::new(NeverCrash),
            observer: Arc::new(LogObserver),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("building the PSP client: {0}")]
    PspClient(String),
    #[error(transparent)]
    Metrics(#[from] telemetry::MetricsError),
    /// Postgres answered and refused the login, or refused a migration:
    /// waiting will not help.
    #[error(transparent)]
    Database(databases::DatabaseError),
    #[error(transparent)]
    Consumer(ConsumerError),
}

/// Runs the consumer until `stop` resolves. Returns an error only for what
/// no retry can fix (a refused login, a refused PSP API key, a metrics
/// address in use).
pub async fn run(
    settings: Settings,
    hooks: Hooks,
    stop: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    tokio::pin!(stop);
    // Metrics first: a process that waits for its broker is visible, and a
    // supervisor learns where to scrape before any delivery is counted.
    let recorder = crate::metrics::install_recorder()?;
    let served = crate::metrics::serve(recorder, &settings.metrics_addr).await?;
    hooks.observer.observe(&Observation::MetricsServed {
        addr: served.to_string(),
    });
    tracing::info!(
        "consumer {} on {} queue {}; metrics on http://{served}/metrics",
        settings.variant.name(),
        settings.queue.backend.name(),
        settings.queue.name
    );
    set_connected("database", false);
    set_connected("broker", false);

    let mut backoff = Backoff::default();
    let migrate = |pool: PgPool| async move { crate::migrate(&pool).await };
    let Some(pool) = databases::wait_for(
        &settings.database,
        POOL_CONNECTIONS,
        migrate,
        &mut backoff,
        &mut stop,
    )
    .await
    .map_err(ServiceError::Database)?
    else {
        return Ok(());
    };
    set_connected("database", true);
    let psp = PspClient::new(
        &settings.psp_base_url,
        &settings.psp_api_key,
        settings.psp_timeout,
    )
    .map_err(|e| ServiceError::PspClient(e.to_string()))?;
    let consumer = PaymentConsumer {
        variant: settings.variant,
        pool,
        psp,
        crashes: hooks.crashes,
        observer: hooks.observer,
        requeue_delay: settings.requeue_delay,
        metrics: Default::default(),
        heartbeat: settings.heartbeat,
        // Where the broker counts receives (SQS), the last one it allows is
        // dead-lettered with a reason; elsewhere this never fires.
        max_receives: Some(settings.queue.max_receive_count),
        batch_size: settings.batch_size.max(1),
    };

    loop {
        let Some((broker, mut receiver)) = connect_broker(&settings, &mut backoff, &mut stop).await
        else {
            return Ok(());
        };
        let result = consumer.run(&mut *receiver, &mut stop).await;
        // Whatever ended the loop, this connection is done with: closing it
        // hands back (RabbitMQ) whatever it still held.
        drop(receiver);
        broker.close().await;
        match result {
            Ok(()) => {
                tracing::info!(
                    "stopped: the message in hand was settled; what was prefetched \
                     and not started goes back to the queue"
                );
                return Ok(());
            }
            Err(ConsumerError::PspRefusedCredentials) => {
                return Err(ServiceError::Consumer(ConsumerError::PspRefusedCredentials))
            }
            Err(ConsumerError::Database(error)) => {
                set_connected("database", false);
                consumer.observer.observe(&Observation::Reconnecting {
                    dependency: "database".to_owned(),
                    reason: error.to_string(),
                });
                let delay = backoff.next_delay();
                tracing::warn!(
                    "shop database error: {error}; the message was handed back, \
                     retrying in {delay:?}"
                );
                if sleep_or_stop(delay, &mut stop).await {
                    return Ok(());
                }
                set_connected("database", true);
            }
            Err(error) => {
                set_connected("broker", false);
                consumer.observer.observe(&Observation::Reconnecting {
                    dependency: "broker".to_owned(),
                    reason: error.to_string(),
                });
                let delay = backoff.next_delay();
                tracing::warn!("lost the broker: {error}; reconnecting in {delay:?}");
                if sleep_or_stop(delay, &mut stop).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Connects to the broker, declares the queue (idempotent) and opens a
/// receiver, waiting out a broker that is down. `None` when asked to stop.
async fn connect_broker<F: Future<Output = ()> + Unpin>(
    settings: &Settings,
    backoff: &mut Backoff,
    stop: &mut F,
) -> Option<(Broker, Box<dyn Receiver>)> {
    loop {
        let attempt = async {
            let broker = Broker::connect_for(&settings.queue).await?;
            broker.declare(&settings.queue).await?;
            // A batch is what one receive finds waiting: it can be no bigger
            // than what the broker lets this process hold.
            let prefetch = settings
                .prefetch
                .max(u16::try_from(settings.batch_size).unwrap_or(u16::MAX));
            let receiver = broker.receiver(&settings.queue, prefetch).await?;
            Ok::<_, queue::QueueError>((broker, receiver))
        };
        match attempt.await {
            Ok(connected) => {
                set_connected("broker", true);
                backoff.reset();
                return Some(connected);
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    "waiting for the {} broker: {error}; retrying in {delay:?}",
                    settings.queue.backend.name()
                );
                if sleep_or_stop(delay, stop).await {
                    return None;
                }
            }
        }
    }
}
