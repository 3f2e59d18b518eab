//! The pipeline's inputs and its judges: loading the numbered input
//! records, checking the transformer group's committed offsets, and
//! reading the whole output topic back as a `read_committed` or a
//! `read_uncommitted` consumer would.
//!
//! These are blocking (librdkafka's consumer calls are); the pipeline runs
//! them on tokio's blocking threads.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::error::{Doing, KafkaTransactionsError, Result};

/// Longest wait for the broker in any one call.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// A reader that has not reached the end of every partition by then fails.
const READ_DEADLINE: Duration = Duration::from_secs(60);

/// Which records a reader is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Only records of committed transactions (and non-transactional ones).
    ReadCommitted,
    /// Every record in the log, aborted transactions' included.
    ReadUncommitted,
}

impl Isolation {
    pub fn setting(self) -> &'static str {
        match self {
            Isolation::ReadCommitted => "read_committed",
            Isolation::ReadUncommitted => "read_uncommitted",
        }
    }
}

/// What one reader of the output topic saw, by input sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReaderCount {
    pub isolation: Isolation,
    /// Records read.
    pub records: u64,
    /// Different sequence numbers among them.
    pub distinct: u64,
    /// Records beyond the first for their sequence number.
    pub duplicates: u64,
    /// Input sequence numbers with no output record.
    pub missing: u64,
}

/// Writes input records 0..`records`, sequence number as the key,
/// round-robin over the partitions, with the idempotent producer.
pub(crate) fn load_input(brokers: &str, topic: &str, partitions: i32, records: u64) -> Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .doing("creating the input loader")?;
    for seq in 0..records {
        let key = seq.to_string();
        let value = format!("payment {seq}");
        let mut record = BaseRecord::to(topic)
            .partition((seq % partitions as u64) as i32)
            .key(&key)
            .payload(&value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    // The client's queue is full: let deliveries drain.
                    record = returned;
                    producer.poll(Duration::from_millis(10));
                }
                Err((source, _)) => {
                    return Err(KafkaTransactionsError::Kafka {
                        doing: format!("loading input record {seq}"),
                        source,
                    })
                }
            }
        }
    }
    producer
        .flush(BROKER_TIMEOUT)
        .doing("waiting for the input to be acknowledged")
}

/// The sum over the input partitions of the group's committed offsets: the
/// input records the pipeline has marked consumed.
pub(crate) fn committed_input(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Result<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .doing("creating the offset checker")?;
    let mut wanted = TopicPartitionList::new();
    for partition in 0..partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(wanted, BROKER_TIMEOUT)
        .doing(format!("reading group {group}'s committed offsets"))?;
    Ok(committed
        .elements()
        .iter()
        .map(|entry| match entry.offset() {
            Offset::Offset(offset) => offset.max(0) as u64,
            _ => 0,
        })
        .sum())
}

/// Reads `topic` from the beginning to the end of every partition with
/// the given isolation, and counts sequence numbers 0..`expected`.
pub(crate) fn count_output(
    brokers: &str,
    topic: &str,
    partitions: i32,
    isolation: Isolation,
    expected: u64,
) -> Result<ReaderCount> {
    let reader_error = |detail: String| KafkaTransactionsError::Reader {
        topic: topic.to_owned(),
        detail,
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // librdkafka wants a group even for assigned partitions; this one
        // never joins or commits, so the broker never stores it.
        .set(
            "group.id",
            format!("{topic}.{}-reader", isolation.setting()),
        )
        .set("isolation.level", isolation.setting())
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .create()
        .doing(format!("creating a {} reader", isolation.setting()))?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .doing("building the reader's assignment")?;
    }
    consumer
        .assign(&assignment)
        .doing("assigning the output partitions")?;

    let mut seen = vec![0u64; expected as usize];
    let mut records = 0u64;
    let mut at_end = HashSet::new();
    let started = Instant::now();
    while at_end.len() < partitions as usize {
        if started.elapsed() > READ_DEADLINE {
            return Err(reader_error(format!(
                "{} partitions of {partitions} reached their end in {} s",
                at_end.len(),
                READ_DEADLINE.as_secs()
            )));
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(message)) => {
                let seq: u64 = message
                    .key()
                    .and_then(|key| std::str::from_utf8(key).ok())
                    .and_then(|key| key.parse().ok())
                    .ok_or_else(|| {
                        reader_error(format!(
                            "partition {} offset {} has no sequence-number key",
                            message.partition(),
                            message.offset()
                        ))
                    })?;
                let slot = seen.get_mut(seq as usize).ok_or_else(|| {
                    reader_error(format!("sequence number {seq} was never an input"))
                })?;
                *slot += 1;
                records += 1;
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition);
            }
            Some(Err(source)) => {
                return Err(KafkaTransactionsError::Kafka {
                    doing: format!("reading {topic}"),
                    source,
                })
            }
            None => {}
        }
    }
    let distinct = seen.iter().filter(|&&n| n > 0).count() as u64;
    Ok(ReaderCount {
        isolation,
        records,
        distinct,
        duplicates: records - distinct,
        missing: expected - distinct,
    })
}
