//! What reached a topic, read from its start by a reader of its own.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::CdcError;

/// Records a consumer in `read_committed` mode sees on a topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicCount {
    pub records: u64,
    /// Distinct `message-id` headers: one per outbox event.
    pub distinct_events: u64,
}

impl TopicCount {
    /// Records of an event that was already on the topic: what the relay
    /// sent again.
    pub fn resent(&self) -> u64 {
        self.records - self.distinct_events
    }
}

/// Reads `topic` from the beginning to its end, as a consumer with
/// `isolation.level=read_committed` would (records of aborted transactions
/// are not counted), without joining any group.
pub async fn count(brokers: &str, topic: &str) -> Result<TopicCount, CdcError> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}.count"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(10);
        let metadata = reader.fetch_metadata(Some(&topic), timeout)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut assignment = TopicPartitionList::new();
        for &partition in &partitions {
            assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
        }
        reader.assign(&assignment)?;
        let mut count = TopicCount::default();
        let mut seen = HashSet::new();
        let mut at_end = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while at_end.len() < partitions.len() {
            if Instant::now() > deadline {
                return Err(CdcError::Topic(format!(
                    "{topic} was not read to its end within 120 s"
                )));
            }
            match reader.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    at_end.insert(partition);
                }
                Some(Err(error)) => return Err(CdcError::Kafka(error)),
                Some(Ok(message)) => {
                    at_end.remove(&message.partition());
                    count.records += 1;
                    let id = message.headers().and_then(|headers| {
                        headers
                            .iter()
                            .find(|h| h.key == queue::kafka::MESSAGE_ID_HEADER)
                            .and_then(|h| h.value.map(<[u8]>::to_vec))
                    });
                    if seen.insert(
                        id.unwrap_or_else(|| message.payload().unwrap_or_default().to_vec()),
                    ) {
                        count.distinct_events += 1;
                    }
                }
            }
        }
        Ok(count)
    })
    .await
    .map_err(|e| CdcError::Rest(format!("the topic reader panicked: {e}")))?
}

/// Deletes topics; one that does not exist is not an error.
pub async fn delete_topics(brokers: &str, topics: &[String]) -> Result<(), CdcError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.delete_topics(&names, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => return Err(CdcError::Topic(format!("deleting {topic}: {code}"))),
        }
    }
    Ok(())
}
