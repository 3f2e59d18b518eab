//! The transformer process: consume a batch of input records, transform
//! them, produce the results, and mark the input consumed — inside one
//! Kafka transaction, or (the at-least-once variant) produce first and
//! commit the offsets after the broker acknowledged.
//!
//! It is a separate OS process (the calling binary re-executed with
//! [`TRANSFORMER_ENV`] holding its job) so that the harness can SIGKILL it:
//! no destructor runs, no transaction is aborted politely, the broker just
//! sees a dead connection.
//!
//! # Why the transactional variant does not duplicate
//!
//! The output records and the input offsets are committed together: the
//! offsets go into the transaction with `send_offsets_to_transaction`. A
//! killed transformer leaves its transaction open; its successor uses the
//! same `transactional.id`, and its `init_transactions` fences the dead
//! one's producer epoch and aborts that transaction before returning. The
//! successor then reads the committed offsets (stable ones: a
//! `read_committed` consumer waits out a pending transactional commit) and
//! redoes exactly the batches whose transaction was aborted.
//!
//! # Why the input is assigned, not subscribed
//!
//! One transformer slot owns every input partition. With `subscribe`, each
//! restart would first wait for the killed member's session to time out
//! before the group rebalanced; manual assignment starts at once. The
//! consumer group is still the one the offsets are committed to, and the
//! zombie fencing comes from the fixed `transactional.id`.
//!
//! # What it tells the harness
//!
//! One line per event on stdout, prefixed with [`EVENT_PREFIX`]: a batch
//! begins, the broker acknowledged an output record, the commit is
//! requested, the commit returned, all input is done. Rust's stdout is
//! line-buffered, so each line is in the pipe before the next step runs:
//! after a SIGKILL the harness reads exactly what had happened.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use serde::{Deserialize, Serialize};

use super::Variant;
use crate::error::{Doing, KafkaTransactionsError, Result};
use crate::flush;

/// The environment variable that turns an executable into a transformer
/// process; its value is the job, as JSON.
pub const TRANSFORMER_ENV: &str = "EO_KAFKA_TRANSFORMER_JOB";

/// Every line the transformer prints for the harness starts with this (a
/// test binary's harness may print other text on the same stdout).
pub(crate) const EVENT_PREFIX: &str = "eo-kafka-transformer ";

/// Longest wait for the broker in any one call.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a batch waits for its next input record before it is sent as
/// it is.
const BATCH_FILL_WAIT: Duration = Duration::from_millis(100);
/// Input that exists but does not arrive for this long is an error.
const INPUT_STALL: Duration = Duration::from_secs(30);
/// An open transaction of a transformer that never comes back is aborted
/// by the broker after this long (the default, 60 s, would hold every
/// `read_committed` reader that long after a failed run).
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// What one transformer process does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TransformerJob {
    pub brokers: String,
    pub variant: Variant,
    pub input_topic: String,
    pub output_topic: String,
    pub partitions: i32,
    pub group: String,
    /// The slot's fixed id: every restart of the slot uses the same one.
    pub transactional_id: String,
    pub batch_size: usize,
    /// Time spent transforming each record (the "work" a kill interrupts).
    pub work_per_record_us: u64,
    pub linger_ms: u64,
}

/// What the transformer reports, one line each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum TransformerEvent {
    /// A batch (with transactions: a transaction) begins.
    Begin,
    /// The broker acknowledged the output record for input `seq`.
    Acked { seq: u64 },
    /// The commit is requested: `commit_transaction`, or the offset commit.
    Committing,
    /// The commit returned: the batch is done.
    Committed { records: usize },
    /// Every input record is consumed and committed.
    Done,
}

impl TransformerEvent {
    fn emit(&self) {
        let line = serde_json::to_string(self).expect("an event serialises");
        println!("{EVENT_PREFIX}{line}");
    }

    /// The event on `line`, if it carries one.
    pub(crate) fn parse(line: &str) -> Option<Self> {
        let (_, json) = line.split_once(EVENT_PREFIX)?;
        serde_json::from_str(json).ok()
    }
}

/// Call this first thing in `main`: when the process was started as a
/// transformer (by [`super::run_exactly_once`]), it does the job and returns
/// the exit code to end with; otherwise it returns `None` at once.
///
/// It blocks (librdkafka's consumer and transaction calls are blocking);
/// inside `#[tokio::main]` that is fine because nothing else runs yet.
pub fn run_transformer_if_requested() -> Option<ExitCode> {
    let job = std::env::var(TRANSFORMER_ENV).ok()?;
    let outcome = serde_json::from_str::<TransformerJob>(&job)
        .map_err(|source| KafkaTransactionsError::Job {
            env: TRANSFORMER_ENV,
            source,
        })
        .and_then(|job| transform(&job));
    Some(match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("transformer: {error}");
            ExitCode::FAILURE
        }
    })
}

/// One input record, as the transformer needs it.
struct InputRecord {
    partition: i32,
    offset: i64,
    seq: u64,
    value: String,
}

fn transform(job: &TransformerJob) -> Result<()> {
    let producer: ThreadedProducer<AckReporter> = producer_config(job)
        .create_with_context(AckReporter::default())
        .doing("creating the transformer's producer")?;
    if job.variant == Variant::Transactional {
        // Fences the killed predecessor (same transactional.id) and aborts
        // its open transaction before returning.
        producer
            .init_transactions(BROKER_TIMEOUT)
            .doing("init_transactions")?;
    }
    output_ready(&producer, job)?;
    let consumer: BaseConsumer = consumer_config(job)
        .create()
        .doing("creating the transformer's consumer")?;
    let ends = input_ends(&consumer, job)?;
    let mut next = committed_positions(&consumer, job)?;
    let mut assignment = TopicPartitionList::new();
    for (partition, offset) in next.iter().enumerate() {
        assignment
            .add_partition_offset(&job.input_topic, partition as i32, Offset::Offset(*offset))
            .doing("building the assignment")?;
    }
    consumer
        .assign(&assignment)
        .doing("assigning the input partitions")?;

    loop {
        if next.iter().zip(&ends).all(|(next, end)| next >= end) {
            TransformerEvent::Done.emit();
            return Ok(());
        }
        let batch = poll_batch(&consumer, job.batch_size, &next, &ends)?;
        TransformerEvent::Begin.emit();
        if job.variant == Variant::Transactional {
            producer.begin_transaction().doing("begin_transaction")?;
        }
        produce_outputs(&producer, job, &batch)?;
        let consumed = advance(&mut next, &batch, &job.input_topic)?;
        commit(&producer, &consumer, job, &consumed)?;
        TransformerEvent::Committed {
            records: batch.len(),
        }
        .emit();
    }
}

/// Checks that the output topic exists with its partitions, before any
/// input is taken. It also means the producer's connection is up when the
/// first batch is sent: otherwise the first batch of every life would sit
/// in the client until the connection and producer id arrive, and all its
/// acknowledgements would come at once at its end.
fn output_ready(producer: &ThreadedProducer<AckReporter>, job: &TransformerJob) -> Result<()> {
    let metadata = producer
        .client()
        .fetch_metadata(Some(&job.output_topic), BROKER_TIMEOUT)
        .doing(format!("reading the metadata of {}", job.output_topic))?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|topic| topic.name() == job.output_topic && topic.error().is_none())
        .map_or(0, |topic| topic.partitions().len());
    if partitions == job.partitions as usize {
        Ok(())
    } else {
        Err(KafkaTransactionsError::Reader {
            topic: job.output_topic.clone(),
            detail: format!(
                "has {partitions} partitions, the job says {}",
                job.partitions
            ),
        })
    }
}

/// Transforms and produces each record of the batch, then waits until
/// the broker has acknowledged them all.
fn produce_outputs(
    producer: &ThreadedProducer<AckReporter>,
    job: &TransformerJob,
    batch: &[InputRecord],
) -> Result<()> {
    let work = Duration::from_micros(job.work_per_record_us);
    for record in batch {
        std::thread::sleep(work);
        let output = record.value.to_uppercase();
        let key = record.seq.to_string();
        producer
            .send(
                BaseRecord::with_opaque_to(&job.output_topic, record.seq as usize)
                    .partition(record.partition)
                    .key(&key)
                    .payload(&output),
            )
            .map_err(|(source, _)| KafkaTransactionsError::Kafka {
                doing: format!("producing the output for input {}", record.seq),
                source,
            })?;
    }
    let failure = if !flush::until_acknowledged(producer, BROKER_TIMEOUT) {
        Some("not acknowledged in time".to_owned())
    } else {
        producer.context().first_failure()
    };
    match failure {
        Some(reason) => Err(KafkaTransactionsError::Delivery {
            doing: "the transformer's batch".to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Moves `next` past the batch; returns the offsets that mark it consumed.
fn advance(next: &mut [i64], batch: &[InputRecord], topic: &str) -> Result<TopicPartitionList> {
    let mut touched = BTreeSet::new();
    for record in batch {
        let partition = record.partition as usize;
        next[partition] = next[partition].max(record.offset + 1);
        touched.insert(record.partition);
    }
    let mut consumed = TopicPartitionList::new();
    for partition in touched {
        consumed
            .add_partition_offset(topic, partition, Offset::Offset(next[partition as usize]))
            .doing("building the offsets to commit")?;
    }
    Ok(consumed)
}

/// Commits the batch: the offsets inside the transaction and the
/// transaction with them, or (at-least-once) the offsets on their own.
fn commit(
    producer: &ThreadedProducer<AckReporter>,
    consumer: &BaseConsumer,
    job: &TransformerJob,
    consumed: &TopicPartitionList,
) -> Result<()> {
    match job.variant {
        Variant::Transactional => {
            let group = consumer
                .group_metadata()
                .expect("a consumer with a group.id has group metadata");
            producer
                .send_offsets_to_transaction(consumed, &group, BROKER_TIMEOUT)
                .doing("send_offsets_to_transaction")?;
            TransformerEvent::Committing.emit();
            producer
                .commit_transaction(BROKER_TIMEOUT)
                .doing("commit_transaction")
        }
        Variant::AtLeastOnce => {
            TransformerEvent::Committing.emit();
            consumer
                .commit(consumed, CommitMode::Sync)
                .doing("committing the input offsets")
        }
    }
}

fn producer_config(job: &TransformerJob) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &job.brokers)
        .set("linger.ms", job.linger_ms.to_string())
        .set("acks", "all")
        .set("enable.idempotence", "true");
    if job.variant == Variant::Transactional {
        config.set("transactional.id", &job.transactional_id).set(
            "transaction.timeout.ms",
            TRANSACTION_TIMEOUT.as_millis().to_string(),
        );
    }
    config
}

fn consumer_config(job: &TransformerJob) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &job.brokers)
        .set("group.id", &job.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed");
    config
}

/// The input's end per partition: the input is loaded before any
/// transformer starts, so its high watermarks are where the work ends.
fn input_ends(consumer: &BaseConsumer, job: &TransformerJob) -> Result<Vec<i64>> {
    (0..job.partitions)
        .map(|partition| {
            consumer
                .fetch_watermarks(&job.input_topic, partition, BROKER_TIMEOUT)
                .map(|(_, high)| high)
                .doing(format!("reading the end of input partition {partition}"))
        })
        .collect()
}

/// Where the group's committed offsets say to resume (0 where none).
fn committed_positions(consumer: &BaseConsumer, job: &TransformerJob) -> Result<Vec<i64>> {
    let mut wanted = TopicPartitionList::new();
    for partition in 0..job.partitions {
        wanted.add_partition(&job.input_topic, partition);
    }
    let committed = consumer
        .committed_offsets(wanted, BROKER_TIMEOUT)
        .doing("reading the group's committed offsets")?;
    Ok((0..job.partitions)
        .map(|partition| {
            match committed
                .find_partition(&job.input_topic, partition)
                .map(|entry| entry.offset())
            {
                Some(Offset::Offset(offset)) => offset,
                _ => 0,
            }
        })
        .collect())
}

/// Up to `size` input records: waits for the first, then takes what
/// arrives within [`BATCH_FILL_WAIT`] of the previous one.
fn poll_batch(
    consumer: &BaseConsumer,
    size: usize,
    next: &[i64],
    ends: &[i64],
) -> Result<Vec<InputRecord>> {
    let mut batch: Vec<InputRecord> = Vec::with_capacity(size);
    let mut reached: Vec<i64> = next.to_vec();
    let waiting_since = Instant::now();
    while batch.len() < size && reached.iter().zip(ends).any(|(at, end)| at < end) {
        match consumer.poll(BATCH_FILL_WAIT) {
            Some(Ok(message)) => {
                let seq = message
                    .key()
                    .and_then(|key| std::str::from_utf8(key).ok())
                    .and_then(|key| key.parse().ok())
                    .ok_or_else(|| KafkaTransactionsError::Reader {
                        topic: message.topic().to_owned(),
                        detail: format!("offset {} has no sequence-number key", message.offset()),
                    })?;
                let value = message
                    .payload()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                reached[message.partition() as usize] = message.offset() + 1;
                batch.push(InputRecord {
                    partition: message.partition(),
                    offset: message.offset(),
                    seq,
                    value,
                });
            }
            Some(Err(source)) => {
                return Err(KafkaTransactionsError::Kafka {
                    doing: "consuming the input".to_owned(),
                    source,
                })
            }
            None if !batch.is_empty() => break,
            None if waiting_since.elapsed() > INPUT_STALL => {
                return Err(KafkaTransactionsError::Reader {
                    topic: "the input".to_owned(),
                    detail: format!("no record arrived for {} s", INPUT_STALL.as_secs()),
                })
            }
            None => {}
        }
    }
    Ok(batch)
}

/// The producer's context: reports each acknowledged output record to the
/// harness and remembers the first failed one.
#[derive(Default)]
struct AckReporter {
    failure: Mutex<Option<String>>,
}

impl AckReporter {
    fn first_failure(&self) -> Option<String> {
        self.failure.lock().expect("failure lock").clone()
    }
}

impl ClientContext for AckReporter {}

impl ProducerContext for AckReporter {
    /// The input's sequence number.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let seq = seq as u64;
        match result {
            Ok(_) => TransformerEvent::Acked { seq }.emit(),
            Err((error, _)) => {
                self.failure
                    .lock()
                    .expect("failure lock")
                    .get_or_insert_with(|| format!("output for input {seq}: {error}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{TransformerEvent, EVENT_PREFIX};

    #[test]
    fn events_survive_a_line_shared_with_the_test_harness() {
        let line = format!(
            "test transformer_process ... {EVENT_PREFIX}{}",
            serde_json::to_string(&TransformerEvent::Acked { seq: 41 }).unwrap()
        );
        assert_eq!(
            TransformerEvent::parse(&line),
            Some(TransformerEvent::Acked { seq: 41 })
        );
        assert_eq!(TransformerEvent::parse("running 1 test"), None);
    }
}
