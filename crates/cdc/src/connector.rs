//! Debezium's Postgres connector, reading the outbox table, with the outbox
//! EventRouter turning each inserted row into one payment event.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::worker::{ConnectWorker, Delivery};
use crate::CdcError;

/// The knobs chapter 7 tunes for latency (see its page for why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// How long Debezium's task gathers changes before it hands them to
    /// Connect: a poll returns when `max_batch_size` changes are there or
    /// when this has passed, so below a full batch per interval every change
    /// waits up to this long (Debezium's default is 500 ms; chapter 7's
    /// comparison measures it as `RelayKind::DebeziumDefaults`).
    pub poll_interval: Duration,
    /// Changes handed to Connect per poll.
    pub max_batch_size: u32,
    /// Changes buffered between the WAL reader and Connect.
    pub max_queue_size: u32,
    /// The connector's producer waits this long to fill a batch.
    pub producer_linger: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            // Chapter 7's comparison: at 2,000 changes/s a batch of 2,048
            // never fills, so the interval, not the batch, ends every poll
            // and is the latency floor. 10 ms instead of Debezium's 500 ms
            // (and of the 50 ms tried first) is the one knob that moved p50
            // and p99; the price is a task that wakes 100 times a second.
            // The batch and queue stay at Debezium's defaults: they only
            // matter while a backlog drains (the restart after an outage).
            poll_interval: Duration::from_millis(10),
            max_batch_size: 2048,
            max_queue_size: 8192,
            // Kafka 4's producer default: a record waits at most 5 ms for
            // others to share its request.
            producer_linger: Duration::from_millis(5),
        }
    }
}

/// Everything that names one connector: where it reads, where it writes.
#[derive(Debug, Clone)]
pub struct OutboxConnector {
    pub name: String,
    /// The shop database, as a `postgres://` URL.
    pub database_url: String,
    /// The replication slot (and publication) name: `[a-z0-9_]`.
    pub slot: String,
    /// Every outbox row becomes a record here, keyed by its aggregate (the
    /// order), with the event id in the `message-id` header.
    pub topic: String,
    pub delivery: Delivery,
    pub tuning: Tuning,
}

impl OutboxConnector {
    /// Connect's configuration of this connector.
    pub fn config(&self) -> Result<Value, CdcError> {
        let url = url::Url::parse(&self.database_url)
            .map_err(|_| CdcError::DatabaseUrl(redacted(&self.database_url)))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(CdcError::DatabaseUrl(redacted(&self.database_url)));
        }
        let decode = |text: &str| {
            url::form_urlencoded::parse(format!("x={text}").as_bytes())
                .next()
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default()
        };
        // ANCHOR: connector_config
        let mut config = json!({
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "tasks.max": "1",
            "plugin.name": "pgoutput",
            "database.hostname": url.host_str().unwrap_or("127.0.0.1"),
            "database.port": url.port().unwrap_or(5432).to_string(),
            "database.user": decode(url.username()),
            "database.password": decode(url.password().unwrap_or_default()),
            "database.dbname": url.path().trim_start_matches('/'),
            "topic.prefix": self.slot,
            "table.include.list": "public.outbox",
            "slot.name": self.slot,
            "publication.name": self.slot,
            // Only the outbox table is published, and the connector creates
            // the publication itself (the book's role owns the table).
            "publication.autocreate.mode": "filtered",
            // Rows inserted before the slot existed are not read: the lab
            // starts the shop only once the slot is there.
            "snapshot.mode": "no_data",
            "poll.interval.ms": self.tuning.poll_interval.as_millis().to_string(),
            "max.batch.size": self.tuning.max_batch_size.to_string(),
            "max.queue.size": self.tuning.max_queue_size.to_string(),
            "producer.override.linger.ms": self.tuning.producer_linger.as_millis().to_string(),
            "topic.creation.default.replication.factor": "1",
            "topic.creation.default.partitions": "1",
            "transforms": "outbox",
            "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
            "transforms.outbox.table.field.event.id": "event_id",
            "transforms.outbox.table.field.event.key": "aggregate_id",
            "transforms.outbox.table.field.event.payload": "payload",
            "transforms.outbox.route.by.field": "aggregate_type",
            // One topic, the consumers' own (no `${routedByValue}`).
            "transforms.outbox.route.topic.replacement": self.topic,
            // The header the book's Kafka consumers read the message id from.
            "transforms.outbox.table.fields.additional.placement":
                format!("event_id:header:{}", queue::kafka::MESSAGE_ID_HEADER),
        });
        if self.delivery == Delivery::ExactlyOnce {
            config["exactly.once.support"] = json!("required");
            // One transaction per batch the task hands to Connect.
            config["transaction.boundary"] = json!("poll");
        }
        // ANCHOR_END: connector_config
        Ok(config)
    }

    /// Creates (or updates) the connector on `worker`.
    pub async fn register(&self, worker: &ConnectWorker) -> Result<(), CdcError> {
        worker
            .put(
                &format!("/connectors/{}/config", self.name),
                &self.config()?,
            )
            .await?;
        Ok(())
    }

    /// Waits until the connector and its task run, failing early with
    /// Connect's stack trace when the task failed.
    pub async fn wait_running(
        &self,
        worker: &ConnectWorker,
        limit: Duration,
    ) -> Result<(), CdcError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(status) = worker
                .get(&format!("/connectors/{}/status", self.name))
                .await
            {
                let task = &status["tasks"][0];
                if task["state"] == "FAILED" {
                    return Err(CdcError::ConnectorFailed {
                        name: self.name.clone(),
                        trace: task["trace"]
                            .as_str()
                            .unwrap_or("no trace")
                            .lines()
                            .take(3)
                            .collect::<Vec<_>>()
                            .join(" / "),
                    });
                }
                if status["connector"]["state"] == "RUNNING" && task["state"] == "RUNNING" {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(CdcError::Timeout {
                    what: format!("connector {} running", self.name),
                    seconds: limit.as_secs(),
                    log: worker.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(start), Some(at)) if at > start => format!("{}://***{}", &url[..start], &url[at..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(delivery: Delivery) -> OutboxConnector {
        OutboxConnector {
            name: "outbox".into(),
            database_url: "postgres://eo:p%40ss@127.0.0.1:5433/eo_shop_1".into(),
            slot: "eo_shop_1".into(),
            topic: "eo.1.payments".into(),
            delivery,
            tuning: Tuning::default(),
        }
    }

    #[test]
    fn the_database_comes_from_the_url_and_the_topic_is_the_consumers() {
        let config = connector(Delivery::AtLeastOnce).config().unwrap();
        assert_eq!(config["database.port"], "5433");
        assert_eq!(config["database.password"], "p@ss");
        assert_eq!(config["database.dbname"], "eo_shop_1");
        assert_eq!(
            config["transforms.outbox.route.topic.replacement"],
            "eo.1.payments"
        );
        assert!(config.get("exactly.once.support").is_none());
        let config = connector(Delivery::ExactlyOnce).config().unwrap();
        assert_eq!(config["exactly.once.support"], "required");
    }

    #[test]
    fn a_url_that_is_not_postgres_is_refused_without_its_password() {
        let mut bad = connector(Delivery::AtLeastOnce);
        bad.database_url = "mysql://eo:secret@127.0.0.1/x".into();
        let error = bad.config().unwrap_err().to_string();
        assert!(!error.contains("secret"), "{error}");
    }
}
