//! The fourth relay (chapter 7): Debezium reads the outbox from the WAL and
//! a Kafka Connect worker, a real JVM the lab may SIGKILL, writes it to the
//! consumers' topic.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use cdc::topic::TopicCount;
use cdc::worker::Delivery;
use cdc::{ConnectSettings, ConnectWorker, OutboxConnector};
use sqlx::PgPool;

/// Kafka Connect is SIGKILLed once `after_rows` outbox rows are committed,
/// and started again `down_for` later; the shop keeps committing meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOutage {
    pub after_rows: i64,
    pub down_for: Duration,
}

/// How often the lab asks Connect whether the connector's task failed.
const STATUS_EVERY: Duration = Duration::from_secs(2);

pub(crate) struct CdcRelay {
    worker: ConnectWorker,
    connector: OutboxConnector,
    admin: PgPool,
    outage: Option<ConnectOutage>,
    killed_at: Option<Instant>,
    restarted: bool,
    pub(crate) kills: u64,
    last_status: Instant,
}

impl CdcRelay {
    /// Starts a worker, registers the connector and returns once Debezium
    /// holds the replication slot: only rows committed after that are read
    /// (`snapshot.mode=no_data`), so the shop must not start before.
    pub(crate) async fn start(
        delivery: Delivery,
        run_id: &str,
        shop_database: &str,
        shop_url: &str,
        topic: &str,
        outage: Option<ConnectOutage>,
        work_dir: &Path,
    ) -> anyhow::Result<Self> {
        let admin = databases::connect(&databases::admin_url(), 2).await?;
        let worker = ConnectWorker::start(
            &ConnectSettings::from_env(),
            &work_dir.join("connect"),
            &format!("eo.{run_id}"),
            delivery,
        )
        .await
        .context("starting Kafka Connect")?;
        let connector = OutboxConnector {
            name: "outbox".into(),
            database_url: shop_url.to_owned(),
            slot: shop_database.to_owned(),
            topic: topic.to_owned(),
            delivery,
            tuning: Default::default(),
        };
        let relay = Self {
            worker,
            connector,
            admin,
            outage,
            killed_at: None,
            restarted: false,
            kills: 0,
            last_status: Instant::now(),
        };
        relay.connector.register(&relay.worker).await?;
        relay
            .connector
            .wait_running(&relay.worker, Duration::from_secs(90))
            .await?;
        cdc::slot::wait_active(&relay.admin, &relay.connector.slot, Duration::from_secs(60))
            .await?;
        Ok(relay)
    }

    /// Carries the outage out, step by step; returns what happened, if
    /// anything, for the traces.
    pub(crate) async fn tick(&mut self, shop: &PgPool) -> anyhow::Result<Option<String>> {
        if let Some(outage) = self.outage {
            match self.killed_at {
                None => {
                    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                        .fetch_one(shop)
                        .await?;
                    if committed >= outage.after_rows {
                        self.worker.kill().await?;
                        self.kills += 1;
                        self.killed_at = Some(Instant::now());
                        return Ok(Some(format!(
                            "Kafka Connect dies (signal 9) with {committed} outbox rows committed"
                        )));
                    }
                }
                Some(at) if !self.restarted && at.elapsed() >= outage.down_for => {
                    self.worker.restart_in_background()?;
                    self.restarted = true;
                    self.last_status = Instant::now();
                    return Ok(Some(format!(
                        "Kafka Connect starts again after {:.1} s down",
                        at.elapsed().as_secs_f64()
                    )));
                }
                Some(_) => {}
            }
        }
        if self.is_up() && self.last_status.elapsed() >= STATUS_EVERY {
            self.last_status = Instant::now();
            self.check_not_failed().await?;
        }
        Ok(None)
    }

    /// Not killed, or started again.
    pub(crate) fn is_up(&self) -> bool {
        self.killed_at.is_none() || self.restarted
    }

    async fn check_not_failed(&self) -> anyhow::Result<()> {
        // A worker still starting answers nothing yet: only a FAILED task
        // is an error.
        match self
            .connector
            .wait_running(&self.worker, Duration::ZERO)
            .await
        {
            Err(error @ cdc::CdcError::ConnectorFailed { .. }) => {
                Err(anyhow::Error::new(error).context(self.worker.log_tail()))
            }
            _ => Ok(()),
        }
    }

    /// What reached the topic, then the worker, its topics and the slot go.
    pub(crate) async fn finish(self, topic: &str) -> anyhow::Result<TopicCount> {
        let count = cdc::topic::count(&queue::kafka::brokers_from_env(), topic).await;
        self.remove().await?;
        Ok(count?)
    }

    /// Kills the worker, deletes its internal topics, drops the slot.
    pub(crate) async fn remove(self) -> anyhow::Result<()> {
        let slot = self.connector.slot.clone();
        let admin = self.admin.clone();
        let removed = self.worker.remove().await;
        cdc::slot::drop_slot(&admin, &slot).await?;
        removed?;
        Ok(())
    }
}
