//! Chapter 6's measurements: what Kafka's idempotent producer and its
//! transactions cost, and where their guarantee ends.
//!
//! Two questions, each answered by a run against the real broker that
//! `scripts/services-up` starts:
//!
//! - **What does the guarantee cost the producer?** [`producer_cost`] sends
//!   the same messages with `acks=1`, `acks=all`, the idempotent producer and
//!   transactions committed at four intervals, and reports throughput and
//!   send → ack latency as ratios to `acks=all`.
//! - **What does it buy, and where does it stop?** [`exactly_once`] runs a
//!   consume–transform–produce pipeline inside Kafka, SIGKILLs the
//!   transforming process at seeded moments, and counts what a
//!   `read_committed` and a `read_uncommitted` reader of the output see, with
//!   transactions and without them.
//!
//! # Layout
//!
//! - [`producer_cost`]: the producer benchmark, its table and its chart.
//! - [`exactly_once`]: the pipeline, the transformer process, the harness
//!   that kills it, and the readers that count the output.
//! - [`error`]: the one error type of the crate.
//! - `admin`, `flush` and `text`: the topics each run creates and
//!   deletes; a prompt "wait until every record is acknowledged" (why it
//!   is needed is in its docs); numbers as the tables print them.

mod admin;
pub mod error;
pub mod exactly_once;
mod flush;
pub mod producer_cost;
mod text;

pub use error::KafkaTransactionsError;
pub use exactly_once::{
    run_exactly_once, run_transformer_if_requested, ExactlyOnceConfig, ExactlyOnceReport,
    TransformerCommand, TRANSFORMER_ENV,
};
pub use producer_cost::{measure_producer_cost, ProducerCostConfig, ProducerCostReport};
