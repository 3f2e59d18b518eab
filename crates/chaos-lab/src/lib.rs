//! The chaos lab: runs the payment pipeline as real processes, kills them on
//! a seeded schedule, waits for the run to drain, and audits the result
//! against the PSP's ledger.
//!
//! # Layout
//!
//! - [`plan`]: the seeded fault schedule (which order meets which fault).
//! - [`roles`]: the child side: the chapter binary re-executed as a consumer
//!   or a producer process.
//! - [`supervisor`]: starts those processes, restarts them after a SIGKILL,
//!   and collects what they report.
//! - [`run`]: one run end to end: fresh databases and queue, processes,
//!   drain, audit, clean-up.
//! - [`cdc_relay`]: chapter 7's relay: a Kafka Connect worker with Debezium,
//!   started, SIGKILLed and started again by the lab itself.
//! - [`audit`]: double charges and lost events from the shop's orders and the
//!   PSP's ledger, as the design defines them.
//! - [`report`]: the Markdown table and the JSON object a chapter prints.
//! - [`chart`]: the before/after chart of chapters' runs, from the same
//!   reports.
//! - [`outage`]: a broker, Postgres or the PSP taken away mid-run, from
//!   outside the run's processes.
//! - [`reliability`]: the fault matrix of the appendix, outages and slow
//!   or competing services against the hardened pipeline.
//! - [`broker_loss`]: Leg 2, loss inside the broker, setting against
//!   setting on RabbitMQ and on a three-broker Kafka cluster.
//! - [`soak`]: the hardened pipeline for minutes at a steady rate, with
//!   kills on the lab's clock, watched for leaks.
//! - [`chapter`]: the command line every chapter shares.
//! - [`bad_input`]: the table of bad inputs from outside, each published by
//!   a plain client and handled by the hardened consumer.

pub mod audit;
pub mod bad_input;
pub mod broker_loss;
pub mod cdc_relay;
pub mod chapter;
pub mod chart;
pub mod outage;
pub mod plan;
pub mod reliability;
pub mod report;
pub mod roles;
pub mod run;
pub mod soak;
pub mod supervisor;

pub use chapter::{Chapter, Lab};
pub use plan::{ChaosPlan, FaultMix};
pub use queue::backend::BackendKind;
pub use report::{ChapterReport, Claim, RunReport};
pub use roles::Role;
