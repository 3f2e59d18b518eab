//! One run's stage: its own shop database, topic, relay and (for CDC)
//! Connect worker and replication slot, all removed afterwards.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use databases::FreshDatabase;
use queue::kafka::{KafkaBroker, KafkaTopology};
use relay::{Relay, RelayConfig, RelayError, Wake};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::connector::Tuning;
use crate::worker::Delivery;
use crate::{CdcError, ConnectSettings, ConnectWorker, OutboxConnector};

/// The `application_name` of an in-process relay's sessions: how its
/// statements' backends are found in `pg_stat_activity`.
pub(crate) const RELAY_APPLICATION: &str = "eo_relay";

/// How long Connect may take to run the connector and hold the slot.
const CONNECTOR_START: Duration = Duration::from_secs(90);

pub(crate) struct Stage {
    pub db: FreshDatabase,
    /// On the server's `postgres` database: the lab's own statements there
    /// never count against the shop database.
    pub admin: PgPool,
    pub brokers: String,
    pub kafka: KafkaBroker,
    pub topology: KafkaTopology,
    pub worker: Option<ConnectWorker>,
    pub connector: Option<OutboxConnector>,
    work_dir: PathBuf,
    relay: Option<InProcessRelay>,
}

struct InProcessRelay {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), RelayError>>,
    pool: PgPool,
}

impl Stage {
    /// A fresh shop database (`<prefix>_<random>`) with the shop schema, and
    /// a topic named after it.
    pub async fn open(prefix: &str) -> Result<Self, CdcError> {
        let db = FreshDatabase::create(prefix, 2).await?;
        let rest = async {
            shop::migrate(&db.pool).await?;
            let admin = databases::connect(&databases::admin_url(), 2).await?;
            let brokers = queue::kafka::brokers_from_env();
            let kafka = KafkaBroker::connect(&brokers).await?;
            let topology = KafkaTopology::new(format!("eo.{}.payments", db.name));
            kafka.declare(&topology).await?;
            Ok::<_, CdcError>((admin, brokers, kafka, topology))
        }
        .await;
        match rest {
            Ok((admin, brokers, kafka, topology)) => Ok(Self {
                work_dir: std::env::temp_dir().join(format!("effectively-once-{}", db.name)),
                db,
                admin,
                brokers,
                kafka,
                topology,
                worker: None,
                connector: None,
                relay: None,
            }),
            Err(error) => {
                let _ = db.drop_database().await;
                Err(error)
            }
        }
    }

    /// The replication slot's name (Debezium's, when it runs).
    pub fn slot(&self) -> &str {
        &self.db.name
    }

    /// Chapter 4's relay in this process, publishing to the topic through
    /// the same Kafka publisher the rest of the book uses.
    pub async fn start_relay(&mut self, wake: Wake) -> Result<(), CdcError> {
        let options: PgConnectOptions = self
            .db
            .url
            .parse::<PgConnectOptions>()
            .map_err(CdcError::Postgres)?
            .application_name(RELAY_APPLICATION);
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(CdcError::Postgres)?;
        let relay = Relay {
            pool: pool.clone(),
            publisher: Arc::new(self.kafka.publisher(&self.topology).await?),
            config: RelayConfig {
                wake,
                ..RelayConfig::default()
            },
            faults: Arc::new(relay::NoFaults),
            observer: Arc::new(relay::Unobserved),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stopped.await;
                })
                .await
        });
        self.relay = Some(InProcessRelay { stop, handle, pool });
        Ok(())
    }

    /// Fails when the in-process relay returned without being told to.
    pub fn check_relay(&self) -> Result<(), CdcError> {
        match &self.relay {
            Some(relay) if relay.handle.is_finished() => Err(CdcError::Measurement(
                "the relay stopped on its own (its error follows at the stop)".into(),
            )),
            _ => Ok(()),
        }
    }

    pub async fn stop_relay(&mut self) -> Result<(), CdcError> {
        let Some(InProcessRelay { stop, handle, pool }) = self.relay.take() else {
            return Ok(());
        };
        let _ = stop.send(());
        let outcome = handle
            .await
            .map_err(|e| CdcError::Measurement(format!("the relay task: {e}")));
        pool.close().await;
        Ok(outcome??)
    }

    /// A Connect worker of its own with Debezium's outbox connector,
    /// returning once the connector runs and holds the replication slot.
    pub async fn start_debezium(
        &mut self,
        settings: &ConnectSettings,
        tuning: Tuning,
    ) -> Result<(), CdcError> {
        let worker = self.worker.insert(
            ConnectWorker::start(
                settings,
                &self.work_dir,
                &format!("eo.{}", self.db.name),
                Delivery::AtLeastOnce,
            )
            .await?,
        );
        let connector = OutboxConnector {
            name: "outbox".into(),
            database_url: self.db.url.clone(),
            slot: self.db.name.clone(),
            topic: self.topology.topic.clone(),
            delivery: Delivery::AtLeastOnce,
            tuning,
        };
        connector.register(worker).await?;
        connector.wait_running(worker, CONNECTOR_START).await?;
        crate::slot::wait_active(&self.admin, &self.db.name, CONNECTOR_START).await?;
        self.connector = Some(connector);
        Ok(())
    }

    /// Removes everything the run made: the relay, the worker, the slot
    /// (before the database: a slot keeps its database from being dropped),
    /// the topics and the database. Connect's log is kept when the run
    /// failed, and its folder named.
    pub async fn close(mut self, run_failed: bool) -> Result<(), CdcError> {
        let relay = self.stop_relay().await;
        let mut killed = Ok(());
        if let Some(worker) = self.worker.as_mut() {
            killed = worker.kill().await;
        }
        let slot = crate::slot::drop_slots_of_database(&self.admin, &self.db.name).await;
        let topic = self
            .kafka
            .delete(&self.topology)
            .await
            .map_err(CdcError::from);
        let internal = match self.worker.take() {
            Some(worker) => worker.remove().await,
            None => Ok(()),
        };
        self.admin.close().await;
        let database = self.db.drop_database().await.map_err(CdcError::from);
        if run_failed && self.work_dir.exists() {
            eprintln!("  Connect's log kept in {}", self.work_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
        // A relay error is the run's; the rest is clean-up.
        relay
            .and(killed)
            .and(slot)
            .and(topic)
            .and(internal)
            .and(database)
    }
}
