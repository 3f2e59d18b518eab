//! Change data capture of the outbox (chapter 7): Debezium reads the
//! outbox's inserts from Postgres's write-ahead log and Kafka Connect writes
//! them to the topic the payment consumers read. No relay queries the table.
//!
//! # Layout
//!
//! - [`worker`]: a Kafka Connect worker as a real child process (a JVM) that
//!   the lab can SIGKILL and start again, and Connect's REST API.
//! - [`connector`]: Debezium's Postgres connector with the outbox
//!   EventRouter, as this book configures it, with or without Connect's
//!   exactly-once source support.
//! - [`slot`]: the replication slot: the WAL it holds back, its lag, and
//!   dropping it safely.
//! - [`topic`]: what reached the topic: records, distinct events, and so
//!   the records Debezium sent more than once.
//! - [`comparison`]: chapter 7's measurement of the four relays (pollers at
//!   1 s and 100 ms, LISTEN/NOTIFY, Debezium) under one load: latency,
//!   Postgres's share, WAL, the extra processes.
//! - [`operations`]: what CDC costs an operator: Connect down for a minute,
//!   the abandoned slot and `max_slot_wal_keep_size`, the outbox's size.
//!
//! # What it guarantees
//!
//! Debezium tells Postgres how far it has read (the slot's confirmed flush
//! position) only after Connect has stored its source offsets. A worker that
//! dies in between resumes from the stored offset, so every committed outbox
//! row reaches Kafka at least once. With exactly-once source support, the
//! records and the offsets commit in one Kafka transaction, and a restart
//! sends nothing twice *to Kafka*: the consumer's dedup is still what makes
//! the charge happen once (the consumer's own crashes, chapter 2).

pub mod comparison;
pub mod connector;
pub mod operations;
pub mod slot;
pub mod topic;
pub mod worker;

pub use connector::OutboxConnector;
pub use worker::{ConnectSettings, ConnectWorker};

#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    #[error(
        "Kafka Connect's jars are not at {path} (run scripts/services-up, which resolves them, \
         or set {variable})"
    )]
    JarsMissing {
        path: String,
        variable: &'static str,
    },
    #[error("starting Kafka Connect (java): {0}")]
    Spawn(std::io::Error),
    #[error("Kafka Connect {what} did not happen within {seconds} s; its log: {log}")]
    Timeout {
        what: String,
        seconds: u64,
        log: String,
    },
    #[error("Kafka Connect exited during startup ({status}); its log: {log}")]
    Exited { status: String, log: String },
    #[error("Kafka Connect's REST API: {0}")]
    Rest(String),
    #[error("connector {name} failed: {trace}")]
    ConnectorFailed { name: String, trace: String },
    #[error("the connection string {0} is not a postgres:// URL")]
    DatabaseUrl(String),
    #[error("replication slot: {0}")]
    Slot(#[from] sqlx::Error),
    #[error("migrating the shop's tables: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("topic: {0}")]
    Topic(String),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("Postgres: {0}")]
    Postgres(sqlx::Error),
    #[error("{0}")]
    Database(#[from] databases::DatabaseError),
    #[error("{0}")]
    Shop(#[from] shop::ShopError),
    #[error("{0}")]
    Queue(#[from] queue::QueueError),
    #[error("{0}")]
    Relay(#[from] relay::RelayError),
    #[error("drawing the chart {0}")]
    Chart(String),
    #[error("measurement: {0}")]
    Measurement(String),
    #[error("configuration: {0}")]
    Config(String),
}
