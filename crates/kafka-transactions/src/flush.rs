//! Waiting until every produced record is acknowledged, without waiting
//! any longer than that.
//!
//! rdkafka's `Producer::flush` asks librdkafka with a zero timeout and,
//! while records are still out, polls for up to 100 ms before asking again;
//! its `commit_transaction` begins with that flush. A transaction committed
//! every 10 ms would then sit out most of 100 ms per commit, and the
//! benchmark would measure the Rust wrapper, not Kafka.
//!
//! librdkafka's own `rd_kafka_flush`, given the real timeout, is what every
//! other client's commit does: it tells the broker threads to send what is
//! lingering now (not after `linger.ms`) and returns the moment the last
//! acknowledgement is in. The delivery reports that make that count reach
//! zero are served by the `ThreadedProducer`'s polling thread meanwhile.
//! After it, rdkafka's `commit_transaction` finds nothing left to flush and
//! goes straight to the commit.

use std::time::Duration;

use rdkafka::bindings::{rd_kafka_flush, rd_kafka_resp_err_t};
use rdkafka::producer::{Producer, ProducerContext, ThreadedProducer};

/// Waits until every record sent so far is acknowledged (or failed), for
/// up to `timeout`; true when none is left.
pub(crate) fn until_acknowledged<C>(producer: &ThreadedProducer<C>, timeout: Duration) -> bool
where
    C: ProducerContext + 'static,
{
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the pointer is the live librdkafka handle owned by `producer`,
    // which outlives the call; rd_kafka_flush is thread-safe and only waits.
    let flushed = unsafe { rd_kafka_flush(producer.client().native_ptr(), timeout_ms) };
    flushed == rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && producer.in_flight_count() == 0
}
