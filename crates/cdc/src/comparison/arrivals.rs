//! The reader at the end of the pipe: a Kafka consumer in this process that
//! notes when each event first arrived.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use uuid::Uuid;

use crate::CdcError;

/// What the reader saw.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// Each event's first arrival, by the `message-id` header (the outbox
    /// row's event id), on the wall clock the database's `created_at` uses.
    pub first: HashMap<Uuid, DateTime<Utc>>,
    /// Every record, repeats included.
    pub records: u64,
    /// Records without a readable event id (none are expected).
    pub unreadable: u64,
}

/// A reader on its own thread, assigned every partition of the topic from
/// the beginning: it joins no group, so it needs no rebalance before its
/// first record, and reads what a `read_committed` consumer would.
pub(crate) struct Arrivals {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    /// `None` once stopped.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Arrivals {
    pub async fn start(brokers: &str, topic: &str) -> Result<Self, CdcError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("{topic}.arrivals"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            // The broker answers a fetch as soon as a record is there; this
            // only bounds an idle fetch, so it adds no latency.
            .set("fetch.wait.max.ms", "100")
            .create()?;
        let topic = topic.to_owned();
        let consumer = tokio::task::spawn_blocking(move || {
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let mut assignment = TopicPartitionList::new();
            for partition in metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic)
                .flat_map(|t| t.partitions())
            {
                assignment.add_partition_offset(&topic, partition.id(), Offset::Beginning)?;
            }
            if assignment.count() == 0 {
                return Err(CdcError::Topic(format!("{topic} has no partitions")));
            }
            consumer.assign(&assignment)?;
            Ok(consumer)
        })
        .await
        .map_err(|e| CdcError::Measurement(format!("assigning the reader: {e}")))??;

        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let seen = seen.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("arrivals".to_owned())
                .spawn(move || read(&consumer, &seen, &stop))?
        };
        Ok(Self {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// Distinct events seen so far.
    pub fn distinct(&self) -> u64 {
        self.seen.lock().expect("arrivals lock").first.len() as u64
    }

    /// How many of `events` have not arrived yet.
    pub fn missing(&self, events: &[Uuid]) -> usize {
        let seen = self.seen.lock().expect("arrivals lock");
        events
            .iter()
            .filter(|id| !seen.first.contains_key(id))
            .count()
    }

    pub async fn stop(mut self) -> Result<Seen, CdcError> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|e| CdcError::Measurement(format!("stopping the reader: {e}")))?
                .map_err(|_| CdcError::Measurement("the reader's thread panicked".into()))?;
        }
        let seen = std::mem::take(&mut *self.seen.lock().expect("arrivals lock"));
        Ok(seen)
    }
}

impl Drop for Arrivals {
    /// A run that failed half-way still ends its reader (within one poll).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read(consumer: &BaseConsumer, seen: &Mutex<Seen>, stop: &AtomicBool) {
    let mut reported_error = false;
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => {
                let at = Utc::now();
                let id = message.headers().and_then(|headers| {
                    headers
                        .iter()
                        .find(|h| h.key == queue::kafka::MESSAGE_ID_HEADER)
                        .and_then(|h| h.value)
                        .and_then(|value| std::str::from_utf8(value).ok())
                        .and_then(|text| text.parse::<Uuid>().ok())
                });
                let mut seen = seen.lock().expect("arrivals lock");
                seen.records += 1;
                match id {
                    Some(id) => {
                        seen.first.entry(id).or_insert(at);
                    }
                    None => seen.unreadable += 1,
                }
            }
            // librdkafka reports broker hiccups here and retries by itself;
            // the drain's deadline catches a reader that never recovers.
            Some(Err(error)) if !reported_error => {
                eprintln!("  reader: {error} (librdkafka retries)");
                reported_error = true;
            }
            Some(Err(_)) => {}
        }
    }
}
