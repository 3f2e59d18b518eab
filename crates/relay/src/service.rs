//! The relay as a service: what the `relay` binary runs, and what the
//! chaos lab's relay processes run with their faults plugged in.
//!
//! It serves `/metrics` first (the backlog gauges are read per scrape), then
//! brings the shop's tables up to date, connects to the broker and declares
//! the queue, and relays until asked to stop. A database or broker that
//! goes away is waited for with bounded backoff and a log line per attempt;
//! `connected{to="broker"|"database"}` says which one is missing. Stopping
//! finishes the round in hand: a row is marked sent only after its confirm,
//! so whatever was not confirmed stays pending for the next relay.

use std::future::Future;
use std::sync::Arc;

use queue::backend::{Broker, QueueSpec};
use queue::Publisher;
use sqlx::PgPool;
use telemetry::service::{set_connected, sleep_or_stop, Backoff};

use crate::{NoFaults, Relay, RelayConfig, RelayError, RelayFaults, RelayObserver, Unobserved};

/// The relay's Postgres pool. With `--wake notify` it holds one more
/// connection outside the pool, for `LISTEN`.
pub const POOL_CONNECTIONS: u32 = 3;

/// Everything an operator configures. No `Debug`: the database URL may
/// carry a password.
#[derive(Clone)]
pub struct Settings {
    /// The shop database, where the outbox is.
    pub database: databases::Location,
    pub queue: QueueSpec,
    pub relay: RelayConfig,
    /// Where `/metrics` is served; port 0 picks a free one.
    pub metrics_addr: String,
}

/// Wraps the broker's publisher (the chaos lab's planned drops).
pub type WrapPublisher = Box<dyn Fn(Box<dyn Publisher>) -> Arc<dyn Publisher> + Send + Sync>;

/// What the chaos lab plugs in; an operator's relay uses the defaults.
pub struct Hooks {
    pub faults: Arc<dyn RelayFaults>,
    pub observer: Arc<dyn RelayObserver>,
    pub wrap_publisher: WrapPublisher,
    /// Told where `/metrics` is served, once it is.
    pub metrics_served: Box<dyn FnOnce(std::net::SocketAddr) + Send>,
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            faults: Arc::new(NoFaults),
            observer: Arc::new(Unobserved),
            wrap_publisher: Box::new(Arc::from),
            metrics_served: Box::new(|_| {}),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Metrics(#[from] telemetry::MetricsError),
    #[error(transparent)]
    Database(#[from] databases::DatabaseError),
}

/// Relays until `stop` resolves. Returns an error only for what no retry
/// fixes (a URL that does not parse, a migration a reachable server
/// refuses, a metrics address in use).
pub async fn run(
    settings: Settings,
    hooks: Hooks,
    stop: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    tokio::pin!(stop);
    let scraped_pool = Arc::new(std::sync::OnceLock::new());
    let recorder = crate::metrics::install_recorder()?;
    let served =
        crate::metrics::serve(recorder, scraped_pool.clone(), &settings.metrics_addr).await?;
    (hooks.metrics_served)(served);
    tracing::info!(
        "relay ({}) to {} queue {}; metrics on http://{served}/metrics",
        settings.relay.wake.name(),
        settings.queue.backend.name(),
        settings.queue.name
    );
    set_connected("database", false);
    set_connected("broker", false);

    let mut backoff = Backoff::default();
    // The outbox table must exist before the first claim.
    let migrate = |pool: PgPool| async move { shop::migrate(&pool).await };
    let Some(pool) = databases::wait_for(
        &settings.database,
        POOL_CONNECTIONS,
        migrate,
        &mut backoff,
        &mut stop,
    )
    .await?
    else {
        return Ok(());
    };
    let _ = scraped_pool.set(pool.clone());
    set_connected("database", true);
    backoff.reset();

    loop {
        let broker = loop {
            let attempt = async {
                let broker = Broker::connect_for(&settings.queue).await?;
                broker.declare(&settings.queue).await?;
                let publisher = broker.publisher(&settings.queue).await?;
                Ok::<_, queue::QueueError>((broker, publisher))
            };
            match attempt.await {
                Ok(connected) => break connected,
                Err(error) => {
                    set_connected("broker", false);
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        "waiting for the {} broker: {error}; retrying in {delay:?}",
                        settings.queue.backend.name()
                    );
                    if sleep_or_stop(delay, &mut stop).await {
                        return Ok(());
                    }
                }
            }
        };
        let (broker, publisher) = broker;
        set_connected("broker", true);
        let relay = Relay {
            pool: pool.clone(),
            publisher: (hooks.wrap_publisher)(publisher),
            config: settings.relay,
            faults: hooks.faults.clone(),
            observer: hooks.observer.clone(),
        };
        let result = relay.run(&mut stop).await;
        drop(relay);
        broker.close().await;
        let delay = match result {
            Ok(()) => {
                tracing::info!("stopped: every row not confirmed stays pending");
                return Ok(());
            }
            Err(RelayError::Database(error)) => {
                set_connected("database", false);
                let delay = backoff.next_delay();
                tracing::warn!("shop database error: {error}; retrying in {delay:?}");
                delay
            }
            Err(error @ RelayError::PublisherFailing { .. }) => {
                set_connected("broker", false);
                let delay = backoff.next_delay();
                tracing::warn!("{error}: reconnecting to the broker in {delay:?}");
                delay
            }
        };
        if sleep_or_stop(delay, &mut stop).await {
            return Ok(());
        }
        set_connected("database", true);
    }
}
