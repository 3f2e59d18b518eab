//! The topics and consumer groups a run creates, and deletes again.
//!
//! The broker has `auto.create.topics.enable=false`, so every topic is
//! created here with an explicit partition count (replication factor 1: the
//! broker is a single node). Every run names its topics with a fresh UUID,
//! so two runs (or two tests) never share one.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;

use crate::error::{Doing, KafkaTransactionsError, Result};

/// How long the broker may take to create or delete a topic.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Admin {
    client: AdminClient<DefaultClientContext>,
}

impl Admin {
    pub(crate) fn connect(brokers: &str) -> Result<Self> {
        let client = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .doing(format!("connecting an admin client to {brokers}"))?;
        Ok(Self { client })
    }

    /// Creates `name` with `partitions` partitions and waits until it exists.
    pub(crate) async fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let results = self
            .client
            .create_topics([&topic], &options())
            .await
            .doing(format!("creating topic {name}"))?;
        for result in results {
            result.map_err(|(name, code)| KafkaTransactionsError::Admin {
                doing: "creating topic",
                name,
                code,
            })?;
        }
        Ok(())
    }

    /// Deletes the topics; one already gone is not an error.
    pub(crate) async fn delete_topics(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let results = self
            .client
            .delete_topics(&names, &options())
            .await
            .doing("deleting the run's topics")?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((name, code)) => {
                    return Err(KafkaTransactionsError::Admin {
                        doing: "deleting topic",
                        name,
                        code,
                    })
                }
            }
        }
        Ok(())
    }

    /// Deletes a consumer group's committed offsets; one never created is
    /// not an error.
    pub(crate) async fn delete_group(&self, group: &str) -> Result<()> {
        let results = self
            .client
            .delete_groups(&[group], &options())
            .await
            .doing(format!("deleting consumer group {group}"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                Err((name, code)) => {
                    return Err(KafkaTransactionsError::Admin {
                        doing: "deleting consumer group",
                        name,
                        code,
                    })
                }
            }
        }
        Ok(())
    }
}

fn options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(OPERATION_TIMEOUT))
}
