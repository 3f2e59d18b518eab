//! The outbox relay: publishes pending outbox rows and marks them sent.
//!
//! # Layout
//!
//! - [`outbox`]: the SQL: claim a batch (`FOR UPDATE SKIP LOCKED`, with a
//!   lease), mark sent, release, and the backlog an on-call engineer watches.
//! - [`Relay`]: the loop: claim → publish with confirms → mark sent, woken by
//!   `LISTEN/NOTIFY` with a fallback poll, or by a pure poll ([`Wake`]).
//! - [`metrics`]: `/metrics` for the relay: backlog, oldest pending age,
//!   publish latency, republishes, queries issued.
//! - [`RelayObservation`]: what a relay process tells the chaos lab.
//! - [`service`]: the relay as a process an operator runs (set-up,
//!   reconnects, graceful stop); the chaos lab's relays run it too.
//!
//! # What it guarantees
//!
//! Every committed outbox row is published at least once: a row is marked
//! sent only after the broker confirmed it, and a relay that dies before the
//! mark leaves the row pending for the next claim. A relay that dies after
//! the publish and before the mark causes a duplicate publish; the hardened
//! consumer absorbs it. Within one relay, rows go out in id order. Across
//! several relays there is no order: relay B may publish row 8 while relay A
//! still holds row 7 (chapter 4 discusses the price of more).

use std::sync::Arc;
use std::time::{Duration, Instant};

use queue::{OutgoingMessage, Publisher};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use uuid::Uuid;

pub mod cleanup;
pub mod metrics;
pub mod outbox;
pub mod service;

use outbox::OutboxRow;

/// How the relay learns that there is something to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wake {
    /// `LISTEN outbox_pending`; the producer's commit wakes the relay at
    /// once. The fallback poll catches a notification lost while the
    /// listener reconnected.
    Notify { fallback_poll: Duration },
    /// Look every `interval`, whether or not anything happened.
    Poll { interval: Duration },
}

impl Wake {
    pub fn name(self) -> String {
        match self {
            Wake::Notify { .. } => "notify".to_owned(),
            Wake::Poll { interval } => format!("poll {} ms", interval.as_millis()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayConfig {
    pub batch_size: i64,
    /// How long a claim keeps other relays away from its rows.
    pub lease: Duration,
    pub wake: Wake,
    /// Pause after a failed publish before the rows are tried again.
    pub retry_delay: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            lease: Duration::from_secs(5),
            wake: Wake::Notify {
                fallback_poll: Duration::from_secs(5),
            },
            retry_delay: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox database: {0}")]
    Database(#[from] sqlx::Error),
    /// Every publish of the last rounds failed: the broker connection is
    /// probably gone, and a new one is worth more than another retry.
    #[error("the last {rounds} rounds published nothing")]
    PublisherFailing { rounds: u32 },
}

/// Rounds in a row in which every publish failed before [`Relay::run`]
/// gives the publisher up. A single refused publish (a full queue, a
/// dropped confirm) is retried by the next round; this many in a row is a
/// dead connection.
pub const FAILED_ROUNDS_BEFORE_RECONNECT: u32 = 5;

/// Where the chaos lab may interrupt a relay.
pub trait RelayFaults: Send + Sync {
    /// Called after a batch was published and confirmed, before it is marked
    /// sent. A crash fault never returns.
    fn after_publish(&self, published: &[OutboxRow]);
}

pub struct NoFaults;

impl RelayFaults for NoFaults {
    fn after_publish(&self, _: &[OutboxRow]) {}
}

/// What a relay process reports to the chaos lab, one JSON line each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "observed", rename_all = "snake_case")]
pub enum RelayObservation {
    /// About to publish (written before the publish, so it precedes any
    /// delivery of this attempt in the lab's log).
    RelayPublishing {
        order_id: Uuid,
        attempt: i32,
    },
    RelayPublishFailed {
        order_id: Uuid,
        reason: String,
        /// The row as the database has it after the failure.
        attempts: i32,
        still_pending: bool,
    },
    RelayMetricsServed {
        addr: String,
    },
}

pub trait RelayObserver: Send + Sync {
    fn observe(&self, observation: &RelayObservation);
}

pub struct Unobserved;

impl RelayObserver for Unobserved {
    fn observe(&self, _: &RelayObservation) {}
}

pub struct Relay {
    pub pool: PgPool,
    pub publisher: Arc<dyn Publisher>,
    pub config: RelayConfig,
    pub faults: Arc<dyn RelayFaults>,
    pub observer: Arc<dyn RelayObserver>,
}

/// What one claim-publish-mark round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    pub claimed: usize,
    pub published: usize,
    pub failed: usize,
}

impl RoundReport {
    fn published_nothing(&self) -> bool {
        self.failed > 0 && self.published == 0
    }
}

impl Relay {
    /// Relays until `stop` resolves.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) -> Result<(), RelayError> {
        tokio::pin!(stop);
        let mut listener = match self.config.wake {
            Wake::Notify { .. } => {
                let mut listener = PgListener::connect_with(&self.pool).await?;
                listener
                    .listen(shop::outbox_producer::OUTBOX_CHANNEL)
                    .await?;
                metrics::query_issued();
                Some(listener)
            }
            Wake::Poll { .. } => None,
        };
        let mut failed_rounds = 0;
        loop {
            // Drain: keep claiming while batches come back full. A stop
            // ends the drain too: a relay whose publishes keep failing (or
            // whose batches keep coming back full) still stops when asked.
            loop {
                if futures::FutureExt::now_or_never(&mut stop).is_some() {
                    return Ok(());
                }
                let round = self.relay_once().await?;
                failed_rounds = if round.published_nothing() {
                    failed_rounds + 1
                } else {
                    0
                };
                if failed_rounds >= FAILED_ROUNDS_BEFORE_RECONNECT {
                    return Err(RelayError::PublisherFailing {
                        rounds: failed_rounds,
                    });
                }
                if round.failed > 0 {
                    tokio::select! {
                        _ = &mut stop => return Ok(()),
                        _ = tokio::time::sleep(self.config.retry_delay) => {}
                    }
                    continue;
                }
                if (round.claimed as i64) < self.config.batch_size {
                    break;
                }
            }
            let wait = async {
                match (&mut listener, self.config.wake) {
                    (Some(listener), Wake::Notify { fallback_poll }) => {
                        // Any notification (or the fallback) means "look".
                        let _ = tokio::time::timeout(fallback_poll, listener.recv()).await;
                    }
                    (_, Wake::Poll { interval }) => tokio::time::sleep(interval).await,
                    (None, Wake::Notify { fallback_poll }) => {
                        tokio::time::sleep(fallback_poll).await
                    }
                }
            };
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = wait => {}
            }
        }
    }

    // ANCHOR: relay_once
    /// Claims a batch, publishes it with confirms, marks what was confirmed.
    pub async fn relay_once(&self) -> Result<RoundReport, RelayError> {
        let rows = outbox::claim(&self.pool, self.config.batch_size, self.config.lease).await?;
        metrics::query_issued();
        if rows.is_empty() {
            return Ok(RoundReport::default());
        }
        for row in &rows {
            self.observer.observe(&RelayObservation::RelayPublishing {
                order_id: row.aggregate_id,
                attempt: row.attempts,
            });
        }
        // Publish the whole batch at once and wait for every confirm: the
        // broker confirms in order, and one round trip serves many rows.
        let results = futures::future::join_all(rows.iter().map(|row| {
            let message = OutgoingMessage {
                key: row.aggregate_id.to_string(),
                message_id: row.event_id.to_string(),
                payload: row.payload.clone().into_bytes(),
            };
            let publisher = self.publisher.clone();
            async move { publisher.publish(&message).await }
        }))
        .await;
        let confirmed_at = Instant::now();

        let mut published = Vec::new();
        let mut failed = Vec::new();
        for (row, result) in rows.iter().zip(results) {
            match result {
                Ok(()) => published.push(row.clone()),
                Err(error) => failed.push((row, error)),
            }
        }
        for row in &published {
            metrics::published(row, confirmed_at);
        }
        self.faults.after_publish(&published); // a crash here republishes later

        let published_ids: Vec<i64> = published.iter().map(|row| row.id).collect();
        if !published_ids.is_empty() {
            outbox::mark_sent(&self.pool, &published_ids).await?;
            metrics::query_issued();
        }
        if !failed.is_empty() {
            let failed_rows: Vec<OutboxRow> =
                failed.iter().map(|(row, _)| (*row).clone()).collect();
            outbox::release(&self.pool, &failed_rows).await?;
            metrics::query_issued();
            for (row, error) in &failed {
                metrics::publish_failed();
                tracing::warn!(order_id = %row.aggregate_id, %error, "publish failed; the row stays pending");
                let state = outbox::row_state(&self.pool, row.event_id).await?;
                self.observer
                    .observe(&RelayObservation::RelayPublishFailed {
                        order_id: row.aggregate_id,
                        reason: error.to_string(),
                        attempts: state.map_or(0, |(attempts, _)| attempts),
                        still_pending: state.is_some_and(|(_, sent)| !sent),
                    });
            }
        }
        Ok(RoundReport {
            claimed: rows.len(),
            published: published.len(),
            failed: failed.len(),
        })
    }
    // ANCHOR_END: relay_once
}
