//! The shop's load: orders placed through the outbox at a steady rate.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shop::naive_producer::NoFaults;
use shop::outbox_producer;
use shop::outbox_producer::RowAfterCommit::{Deleted, Kept};
use shop::Order;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::CdcError;

/// How each order's outbox row is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutboxWrite {
    /// [`shop::outbox_producer::place_order`]: the row stays for a relay,
    /// and a NOTIFY wakes the LISTEN/NOTIFY relay.
    KeepAndNotify,
    /// The row stays, no NOTIFY (a poller or Debezium reads it).
    Keep,
    /// Deleted before the commit, no NOTIFY: only the WAL has it.
    Forget,
}

/// The `application_name` of the load's sessions: their statements and
/// their backends are the shop's, not the relay's.
pub(crate) const LOAD_APPLICATION: &str = "eo_shop_load";

#[derive(Debug, Clone)]
pub(crate) struct LoadSpec {
    pub url: String,
    /// Orders per second.
    pub rate: u32,
    /// Sessions placing orders at once: one session manages a few hundred
    /// orders a second (each order is five round trips and a commit).
    pub connections: u32,
    /// Order `n` of series `s` has the same id in every run, so every relay
    /// gets the same orders.
    pub series: u64,
    /// Stop after this many orders (or when told).
    pub limit: Option<u64>,
    pub write: OutboxWrite,
}

/// A load running on a thread of its own.
pub(crate) struct Load {
    stop: watch::Sender<bool>,
    committed: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<u64, CdcError>>,
}

impl Load {
    /// Starts placing orders.
    ///
    /// The load has a thread, a runtime and a pool of its own, so that the
    /// relay's and the reader's tasks never hold back an order that is due
    /// (a late order would shift the load, not show as latency).
    pub fn start(spec: LoadSpec) -> Result<Self, CdcError> {
        let (stop, stopped) = watch::channel(false);
        let committed = Arc::new(AtomicU64::new(0));
        let counter = committed.clone();
        let thread = std::thread::Builder::new()
            .name("shop-load".to_owned())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(place_orders(spec, stopped, counter))
            })?;
        Ok(Self {
            stop,
            committed,
            thread,
        })
    }

    /// Orders committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Whether the load has stopped by itself (its limit, or an error).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops placing orders, waits for those in flight, and returns how
    /// many committed.
    pub async fn stop(self) -> Result<u64, CdcError> {
        let _ = self.stop.send(true);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| CdcError::Measurement(format!("waiting for the load: {e}")))?
            .map_err(|_| CdcError::Measurement("the load's thread panicked".into()))?
    }
}

/// An order id that is the same for the same `(series, n)` in every run.
pub(crate) fn order_id(series: u64, n: u64) -> Uuid {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&series.to_be_bytes());
    bytes[8..].copy_from_slice(&n.to_be_bytes());
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

async fn place_orders(
    spec: LoadSpec,
    mut stopped: watch::Receiver<bool>,
    committed: Arc<AtomicU64>,
) -> Result<u64, CdcError> {
    let options = PgConnectOptions::from_str(&spec.url)
        .map_err(CdcError::Postgres)?
        .application_name(LOAD_APPLICATION);
    let pool = PgPoolOptions::new()
        .max_connections(spec.connections)
        .min_connections(spec.connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .map_err(CdcError::Postgres)?;
    let period = Duration::from_secs_f64(1.0 / f64::from(spec.rate.max(1)));
    // An open loop (each order in a task of its own, due at its time), so a
    // slow commit does not delay the orders after it; bounded, so that a
    // database that cannot keep up lowers the achieved rate (reported)
    // instead of piling up tasks without end.
    let in_flight_limit = spec.connections as usize * 8;
    let started = tokio::time::Instant::now();
    let mut placing = JoinSet::new();
    let mut outcome = Ok(());
    for n in 0u64.. {
        if spec.limit.is_some_and(|limit| n >= limit) || *stopped.borrow() {
            break;
        }
        let due = started + period.mul_f64(n as f64);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stopped.changed() => break,
        }
        while placing.len() >= in_flight_limit {
            if let Some(placed) = placing.join_next().await {
                outcome = outcome.and(flatten(placed));
            }
        }
        while let Some(placed) = placing.try_join_next() {
            outcome = outcome.and(flatten(placed));
        }
        if outcome.is_err() {
            break;
        }
        let pool = pool.clone();
        let committed = committed.clone();
        let order = Order {
            order_id: order_id(spec.series, n),
            amount_cents: 100 + (n % 50_000) as i64,
            currency: "EUR".to_owned(),
        };
        let write = spec.write;
        placing.spawn(async move {
            match write {
                OutboxWrite::KeepAndNotify => {
                    outbox_producer::place_order(&pool, &NoFaults, &order).await?
                }
                OutboxWrite::Keep => {
                    outbox_producer::place_order_without_notify(&pool, &NoFaults, &order, Kept)
                        .await?
                }
                OutboxWrite::Forget => {
                    outbox_producer::place_order_without_notify(&pool, &NoFaults, &order, Deleted)
                        .await?
                }
            }
            committed.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
    }
    while let Some(placed) = placing.join_next().await {
        outcome = outcome.and(flatten(placed));
    }
    pool.close().await;
    outcome.map(|()| committed.load(Ordering::Relaxed))
}

fn flatten(
    placed: Result<Result<(), shop::ShopError>, tokio::task::JoinError>,
) -> Result<(), CdcError> {
    placed
        .map_err(|e| CdcError::Measurement(format!("an order's task failed: {e}")))?
        .map_err(CdcError::Shop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_order_has_the_same_id_in_every_run() {
        assert_eq!(order_id(7, 42), order_id(7, 42));
        assert_ne!(order_id(7, 42), order_id(7, 43));
        assert_ne!(order_id(7, 42), order_id(8, 42));
        assert_eq!(order_id(7, 42).get_version_num(), 4);
    }
}
