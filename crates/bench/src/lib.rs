//! The book's benchmarks, as libraries behind thin binaries.
//!
//! - [`outbox`]: what the outbox relay costs (`outbox-bench`).
//! - [`throughput`]: naive against hardened consumers, one message or a
//!   batch per receive, against the rate Postgres itself allows for the same
//!   transactions (`consumer-throughput`).
//!
//! Benchmarks are not tests: their figures go into the book, and a missed
//! goal is printed as MISS rather than failing the run.

mod goals;
pub mod outbox;
pub mod throughput;
