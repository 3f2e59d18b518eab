//! The Kafka backend (rdkafka, librdkafka built from source).
//!
//! # How Kafka remembers who has a message
//!
//! Kafka does not hand messages out one by one. A topic is split into
//! partitions, each an append-only log; the consumers of one *consumer group*
//! share the partitions out among themselves (each partition to exactly one
//! member at a time), and each member reads its partitions in order. What
//! the group remembers is one *committed offset* per partition: "everything
//! before this position is done". Acking a delivery here is committing
//! `offset + 1` for its partition, so every message before it on that
//! partition is acked with it. That is why the consumer settles what it
//! received before it receives again: one delivery at a time, or one batch
//! of up to `max` that one receive takes from what librdkafka has fetched
//! ([`crate::Receiver::ack_batch`] commits it once per partition).
//!
//! A consumer that dies leaves its position uncommitted. Once its session
//! times out (no heartbeat for [`SESSION_TIMEOUT`]), the group rebalances,
//! another member gets the partition and starts reading at the committed
//! offset: the unacked message is delivered again, and so is nothing else.
//! Until then the dead consumer's partitions wait, and during the rebalance
//! the whole group pauses (the classic protocol's eager rebalance).
//!
//! - **requeue** seeks the partition back to the message: the next receive
//!   delivers it again, and every later message of the partition waits
//!   behind it (Kafka's order per partition is also head-of-line blocking).
//!   Until it is received again, no commit on that partition goes past it:
//!   a batch that acks later messages, or dead-letters one, commits up to
//!   the handed-back message and not beyond, so a crash in between cannot
//!   skip it.
//! - **dead_letter** produces a copy to `<topic>.dlq` with the reason in the
//!   `dead-letter-reason` header, waits for the broker's delivery report,
//!   and only then commits: a crash in between leaves a duplicate in the
//!   DLQ, never a loss.
//! - A commit the group refuses because the partition has moved on (a
//!   rebalance) is [`QueueError::LeaseExpired`]: the new owner gets the
//!   message again, and the consumer's dedup absorbs it.
//! - With [`KafkaTopology::transactional_ack`], the commit is the offset
//!   sent inside a Kafka transaction instead (chapter 6): a transactional
//!   consumer whose side effect lives outside Kafka, which is why the dedup
//!   still carries the guarantee.
//!
//! # What Kafka cannot tell a consumer
//!
//! There is no redelivered flag and no delivery count: a record is only a
//! position in a log, and reading it twice is not an event the broker
//! records. The new owner of a dead consumer's partition reads the unacked
//! message exactly as if it were new. [`Delivery::redelivered`] is therefore
//! this process's own knowledge: true when it already received this offset
//! (or a later one) on this partition, after a requeue or after getting a
//! partition back. Across processes only the position tells: the chaos lab
//! counts a delivery as a redelivery when its [`crate::Position`] was
//! delivered before to any consumer of the run.
//!
//! # Settings
//!
//! `EO_KAFKA_BROKERS` (default `127.0.0.1:9092`, where `scripts/services-up`
//! starts a one-node KRaft broker).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::{Delivery, OutgoingMessage, QueueError, QueueInspector, Receipt};

/// Where `scripts/services-up` starts the Kafka broker.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";

/// `EO_KAFKA_BROKERS`, or the local default.
pub fn brokers_from_env() -> String {
    std::env::var("EO_KAFKA_BROKERS").unwrap_or_else(|_| DEFAULT_BROKERS.to_owned())
}

/// Partitions of a work topic unless the topology says otherwise: as many
/// as the chaos lab's default number of consumers, so each has one.
pub const DEFAULT_PARTITIONS: u32 = 3;

/// The header that carries [`OutgoingMessage::message_id`].
pub const MESSAGE_ID_HEADER: &str = "message-id";
/// The header that carries why a message was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "dead-letter-reason";
/// The header that names the topic a dead letter came from.
pub const ORIGINAL_TOPIC_HEADER: &str = "original-topic";

/// A consumer that sends no heartbeat for this long is dead to the group,
/// and its partitions move on. Kafka's default is 45 s; a SIGKILLed
/// consumer's messages should come back within a chaos run, and the broker
/// allows it (`group.min.session.timeout.ms=1000` in
/// `scripts/kafka/server.properties`).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(3);
/// A sixth of the session: several heartbeats may be late before it ends.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Longest time between two receives before librdkafka leaves the group on
/// the consumer's behalf (a wedged handler). Also how long a rebalance waits
/// for a busy member. Far above the slowest charge of the book.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(30);
/// How long the broker holds a fetch that finds nothing new. A requeue's
/// seek waits for the fetch in flight before the message is read again, so
/// this bounds how late a requeued message comes back (Kafka's default is
/// 500 ms; an idle consumer asks ten times a second instead of twice).
const FETCH_WAIT: Duration = Duration::from_millis(100);
/// How long a publish may take before it fails, librdkafka's retries included.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Replicas of a topic on a cluster of at least this many brokers (Leg 2:
/// three copies, of which `min.insync.replicas` must have a write before
/// `acks=all` confirms it). A smaller cluster, like the book's one broker on
/// loopback, gets one replica per broker.
const REPLICATION_FACTOR: usize = 3;
/// In-sync replicas an `acks=all` write needs on a fully replicated topic:
/// one broker may be lost without refusing writes or losing confirmed ones.
const MIN_IN_SYNC_REPLICAS: usize = 2;
/// A dead-letter topic is read rarely and in full; one partition keeps it in
/// arrival order.
const DEAD_LETTER_PARTITIONS: i32 = 1;
/// Bound on a single request to the broker (metadata, commit, seek, ...).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`KafkaBroker::connect`] tries to reach the cluster.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`KafkaBroker::declare`] waits for new topics to show.
const TOPIC_PROPAGATION: Duration = Duration::from_secs(10);

/// One work topic, its dead-letter topic and its consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaTopology {
    pub topic: String,
    /// At most this many consumers of the group work at once.
    pub partitions: u32,
    /// Ack commits the offset inside a Kafka transaction (chapter 6).
    pub transactional_ack: bool,
    /// Leg 2: who must have a record before its publish is confirmed.
    pub acks: Acks,
}

/// The producer's `acks`: when the broker confirms a publish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Acks {
    /// `acks=all`: every in-sync replica has it (the book's setting).
    #[default]
    All,
    /// `acks=1`: the partition's leader has it in its own log. A leader
    /// that dies before a follower copied the record takes it along.
    Leader,
}

impl KafkaTopology {
    pub fn new(topic: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            partitions: DEFAULT_PARTITIONS,
            transactional_ack: false,
            acks: Acks::All,
        }
    }

    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dlq", self.topic)
    }

    /// The consumer group every receiver of this topology joins.
    pub fn group(&self) -> String {
        format!("{}.consumers", self.topic)
    }
}

/// Clients of one Kafka cluster: an admin client for topics, and one
/// idempotent producer shared by every publisher and dead-letter copy made
/// from this broker (and its clones).
#[derive(Clone)]
pub struct KafkaBroker {
    brokers: String,
    admin: Arc<AdminClient<DefaultClientContext>>,
    producer: FutureProducer,
}

impl KafkaBroker {
    /// Connects and checks that the cluster answers (a metadata request), so
    /// that a broker that is down is reported here and not at the first
    /// receive: librdkafka itself would retry in the background forever.
    pub async fn connect(brokers: &str) -> Result<Self, QueueError> {
        let config = client_config(brokers);
        let create_error = |error: KafkaError| QueueError::Connect {
            url: brokers.to_owned(),
            reason: error.to_string(),
        };
        let admin: AdminClient<DefaultClientContext> = config.create().map_err(create_error)?;
        let producer: FutureProducer = producer_config(brokers, Acks::All)
            .create()
            .map_err(create_error)?;
        let broker = Self {
            brokers: brokers.to_owned(),
            admin: Arc::new(admin),
            producer,
        };
        broker
            .metadata(None, CONNECT_TIMEOUT)
            .await
            .map_err(|error| match error {
                QueueError::Broker { reason, .. } => QueueError::Connect {
                    url: brokers.to_owned(),
                    reason,
                },
                other => other,
            })?;
        Ok(broker)
    }

    /// Cluster metadata, of one topic or of all.
    async fn metadata(
        &self,
        topic: Option<&str>,
        timeout: Duration,
    ) -> Result<Metadata, QueueError> {
        let admin = self.admin.clone();
        let topic = topic.map(str::to_owned);
        blocking("metadata", move || {
            admin.inner().fetch_metadata(topic.as_deref(), timeout)
        })
        .await
    }

    /// Creates the topic and its dead-letter topic, and waits until the
    /// cluster's metadata shows both: a consumer that subscribes to a topic
    /// that does not exist yet waits forever without an assignment.
    /// Idempotent: a topic that already exists is kept with its messages;
    /// one with another number of partitions is an error.
    pub async fn declare(&self, topology: &KafkaTopology) -> Result<(), QueueError> {
        let partitions = i32::try_from(topology.partitions)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                QueueError::broker(
                    "validate topology",
                    format!(
                        "{} partitions: Kafka takes 1 to 2^31 - 1",
                        topology.partitions
                    ),
                )
            })?;
        let dead_letter_topic = topology.dead_letter_topic();
        let wanted = [
            (topology.topic.as_str(), partitions),
            (dead_letter_topic.as_str(), DEAD_LETTER_PARTITIONS),
        ];
        let brokers = self.metadata(None, REQUEST_TIMEOUT).await?.brokers().len();
        let replicas = REPLICATION_FACTOR.min(brokers).max(1);
        let min_in_sync = if replicas >= REPLICATION_FACTOR {
            MIN_IN_SYNC_REPLICAS
        } else {
            1
        }
        .to_string();
        let new_topics: Vec<NewTopic<'_>> = wanted
            .iter()
            .map(|&(name, partitions)| {
                NewTopic::new(name, partitions, TopicReplication::Fixed(replicas as i32))
                    .set("min.insync.replicas", &min_in_sync)
            })
            .collect();
        let results = self
            .admin
            .create_topics(&new_topics, &admin_options())
            .await
            .map_err(|e| QueueError::broker("CreateTopics", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(QueueError::broker(
                        "CreateTopics",
                        format!("{topic}: {code}"),
                    ))
                }
            }
        }
        for (topic, partitions) in wanted {
            self.wait_for_topic(topic, partitions).await?;
        }
        Ok(())
    }

    async fn wait_for_topic(&self, topic: &str, partitions: i32) -> Result<(), QueueError> {
        let deadline = Instant::now() + TOPIC_PROPAGATION;
        loop {
            let metadata = self.metadata(Some(topic), REQUEST_TIMEOUT).await?;
            let shown = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len());
            match shown {
                Some(n) if n == partitions as usize => return Ok(()),
                Some(n) if n > 0 => {
                    return Err(QueueError::broker(
                        "CreateTopics",
                        format!("{topic} exists with {n} partitions, not {partitions}"),
                    ))
                }
                _ if Instant::now() > deadline => {
                    return Err(QueueError::broker(
                        "CreateTopics",
                        format!("{topic} was created but is not in the metadata after {TOPIC_PROPAGATION:?}"),
                    ))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Deletes the topic and its dead-letter topic with their messages (the
    /// group's committed offsets of them go too). A topic that does not
    /// exist is not an error.
    pub async fn delete(&self, topology: &KafkaTopology) -> Result<(), QueueError> {
        let dead_letter_topic = topology.dead_letter_topic();
        let results = self
            .admin
            .delete_topics(
                &[topology.topic.as_str(), dead_letter_topic.as_str()],
                &admin_options(),
            )
            .await
            .map_err(|e| QueueError::broker("DeleteTopics", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((topic, code)) => {
                    return Err(QueueError::broker(
                        "DeleteTopics",
                        format!("{topic}: {code}"),
                    ))
                }
            }
        }
        Ok(())
    }

    pub async fn publisher(&self, topology: &KafkaTopology) -> Result<KafkaPublisher, QueueError> {
        let producer = match topology.acks {
            Acks::All => self.producer.clone(),
            Acks::Leader => producer_config(&self.brokers, Acks::Leader)
                .create()
                .map_err(|error| QueueError::Connect {
                    url: self.brokers.clone(),
                    reason: error.to_string(),
                })?,
        };
        Ok(KafkaPublisher {
            producer,
            topic: topology.topic.clone(),
        })
    }

    /// The leader and the replicas of one partition of `topic`, by broker
    /// id, from the cluster's metadata (Leg 2 kills that leader).
    pub async fn partition_replicas(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<PartitionReplicas, QueueError> {
        let metadata = self.metadata(Some(topic), REQUEST_TIMEOUT).await?;
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
            .map(|p| PartitionReplicas {
                leader: p.leader(),
                replicas: p.replicas().to_vec(),
            })
            .ok_or_else(|| {
                QueueError::broker("metadata", format!("{topic} has no partition {partition}"))
            })
    }

    /// A member of the topology's consumer group, subscribed to its topic.
    /// It gets partitions once the group has (re)balanced, which the first
    /// receive waits for.
    pub async fn receiver(&self, topology: &KafkaTopology) -> Result<KafkaReceiver, QueueError> {
        let consumer: StreamConsumer = client_config(&self.brokers)
            .set("group.id", topology.group())
            // The classic protocol, named because librdkafka also speaks
            // KIP-848's: its session timeout and eager rebalance are the
            // behaviour this module describes.
            .set("group.protocol", "classic")
            .set("session.timeout.ms", millis(SESSION_TIMEOUT))
            .set("heartbeat.interval.ms", millis(HEARTBEAT_INTERVAL))
            .set("max.poll.interval.ms", millis(MAX_POLL_INTERVAL))
            .set("fetch.wait.max.ms", millis(FETCH_WAIT))
            // Nothing is committed or stored behind the consumer's back:
            // only an ack moves the group's position.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A new group starts at the oldest message, not at the end: a
            // message published before the first consumer joined is work.
            .set("auto.offset.reset", "earliest")
            // Messages of aborted transactions are never work (chapter 6).
            .set("isolation.level", "read_committed")
            .create()
            .map_err(|e| QueueError::broker("create consumer", e))?;
        consumer
            .subscribe(&[&topology.topic])
            .map_err(|e| QueueError::broker("subscribe", e))?;
        let transactions = if topology.transactional_ack {
            Some(self.transactional_producer(topology).await?)
        } else {
            None
        };
        Ok(KafkaReceiver {
            consumer: Arc::new(consumer),
            producer: self.producer.clone(),
            transactions,
            topology: topology.clone(),
            highest_received: HashMap::new(),
            handed_back: HashMap::new(),
        })
    }

    /// A transactional producer whose `transactional.id` is unique to this
    /// process. Zombie fencing does not need a stable id here: since KIP-447
    /// the broker fences an offset commit by the consumer group's
    /// generation, which [`KafkaReceiver`] sends along with every ack.
    async fn transactional_producer(
        &self,
        topology: &KafkaTopology,
    ) -> Result<Arc<FutureProducer>, QueueError> {
        let transactional_id = format!(
            "{}.ack.{}.{}",
            topology.group(),
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        let producer: FutureProducer = producer_config(&self.brokers, Acks::All)
            .set("transactional.id", transactional_id)
            .create()
            .map_err(|e| QueueError::broker("create transactional producer", e))?;
        let producer = Arc::new(producer);
        let initialising = producer.clone();
        blocking("init_transactions", move || {
            initialising.init_transactions(REQUEST_TIMEOUT)
        })
        .await?;
        Ok(producer)
    }

    /// Looks at the topic, its dead letters and its group's position from
    /// the outside, through a client of its own that never joins the group.
    pub fn inspector(&self, topology: &KafkaTopology) -> Result<KafkaInspector, QueueError> {
        let consumer: BaseConsumer = client_config(&self.brokers)
            // Only to look up the group's committed offsets: this client
            // never subscribes, so it never joins the group.
            .set("group.id", topology.group())
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| QueueError::broker("create inspector", e))?;
        Ok(KafkaInspector {
            consumer: Arc::new(consumer),
            brokers: self.brokers.clone(),
            topology: topology.clone(),
        })
    }
}

fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    config
}

/// The producer's acknowledgement setting. `acks=all` with idempotence
/// closes Leg 1 and Leg 2 on the producer side: the broker confirms only once
/// every in-sync replica has the message, and librdkafka's retries of a
/// publish whose acknowledgement was lost are deduplicated by the broker by
/// producer id and sequence number instead of appended twice (librdkafka does
/// not turn idempotence on by default). `acks=1` is Leg 2's wrong setting,
/// kept for measuring it, with idempotence off: librdkafka refuses `acks`
/// other than `all` when it is on.
fn producer_config(brokers: &str, acks: Acks) -> ClientConfig {
    let (acks, idempotence) = match acks {
        Acks::All => ("all", "true"),
        Acks::Leader => ("1", "false"),
    };
    let mut config = client_config(brokers);
    config
        .set("enable.idempotence", idempotence)
        .set("acks", acks)
        .set("message.timeout.ms", millis(DELIVERY_TIMEOUT));
    config
}

/// Where one partition lives, by broker id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionReplicas {
    pub leader: i32,
    pub replicas: Vec<i32>,
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT))
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

/// Runs one of librdkafka's blocking calls (metadata, commit, seek,
/// transactions) off the async threads.
async fn blocking<T, F>(operation: &'static str, call: F) -> Result<T, QueueError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, KafkaError> + Send + 'static,
{
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| QueueError::broker(operation, e))?
        .map_err(|e| QueueError::broker(operation, e))
}

pub struct KafkaPublisher {
    producer: FutureProducer,
    topic: String,
}

#[async_trait::async_trait]
impl crate::Publisher for KafkaPublisher {
    /// Partitioned by [`OutgoingMessage::key`], so one order's events keep
    /// their order; returns once the delivery report says the broker has it.
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        let headers = OwnedHeaders::new().insert(Header {
            key: MESSAGE_ID_HEADER,
            value: Some(&message.message_id),
        });
        let record = FutureRecord::to(&self.topic)
            .key(&message.key)
            .payload(&message.payload)
            .headers(headers);
        produce(&self.producer, record).await
    }
}

/// Sends one record and waits for its delivery report.
async fn produce(
    producer: &FutureProducer,
    record: FutureRecord<'_, String, Vec<u8>>,
) -> Result<(), QueueError> {
    let topic = record.topic.to_owned();
    producer
        .send(record, Timeout::After(DELIVERY_TIMEOUT))
        .await
        .map(|_delivered| ())
        .map_err(|(error, _message)| QueueError::NotConfirmed(format!("{topic}: {error}")))
}

/// A member of the consumer group. Deliveries come one per receive, and the
/// consumer settles each before it receives the next: an ack commits a
/// position, which settles everything before it on the partition too.
pub struct KafkaReceiver {
    consumer: Arc<StreamConsumer>,
    /// For dead-letter copies (the broker's idempotent producer).
    producer: FutureProducer,
    /// For the transactional ack, when the topology asks for it.
    transactions: Option<Arc<FutureProducer>>,
    topology: KafkaTopology,
    /// Per partition, the highest offset this process has received: the
    /// only memory of a redelivery that Kafka leaves a consumer.
    highest_received: HashMap<i32, i64>,
    /// Per partition, the oldest message handed back (sought to) and not
    /// received again yet: no commit may pass it.
    handed_back: HashMap<i32, i64>,
}

impl KafkaReceiver {
    /// A received message as a delivery, remembering how far this process
    /// has read the partition (its only sign of a redelivery).
    fn delivery(&mut self, message: &BorrowedMessage<'_>) -> Delivery {
        let (partition, offset) = (message.partition(), message.offset());
        let highest = self.highest_received.entry(partition).or_insert(-1);
        let redelivered = offset <= *highest;
        *highest = (*highest).max(offset);
        // In hand again: the commits of its batch settle it.
        if self
            .handed_back
            .get(&partition)
            .is_some_and(|&back| offset <= back)
        {
            self.handed_back.remove(&partition);
        }
        Delivery {
            payload: message.payload().unwrap_or_default().to_vec(),
            message_id: header(message, MESSAGE_ID_HEADER),
            redelivered,
            delivery_count: None,
            receipt: Receipt::Offset { partition, offset },
        }
    }

    fn offset_of(delivery: &Delivery) -> Result<(i32, i64), QueueError> {
        match delivery.receipt {
            Receipt::Offset { partition, offset } => Ok((partition, offset)),
            ref other => Err(QueueError::ForeignReceipt(other.clone())),
        }
    }

    /// The partition still belongs to this member, or the settle is too
    /// late: a rebalance gave it to another one, which reads the message
    /// again from the group's committed offset.
    fn ensure_assigned(&self, operation: &'static str, partition: i32) -> Result<(), QueueError> {
        let assignment = self
            .consumer
            .assignment()
            .map_err(|e| QueueError::broker(operation, e))?;
        if assignment
            .find_partition(&self.topology.topic, partition)
            .is_some()
            && !self.consumer.assignment_lost()
        {
            Ok(())
        } else {
            Err(QueueError::LeaseExpired {
                operation,
                reason: format!(
                    "partition {partition} of {} is no longer assigned to this consumer",
                    self.topology.topic
                ),
            })
        }
    }

    /// Commits `next` (the offset after the settled message) as the group's
    /// position on `partition`: synchronously, or inside a transaction.
    async fn commit(
        &self,
        operation: &'static str,
        partition: i32,
        next: i64,
    ) -> Result<(), QueueError> {
        self.commit_positions(operation, &HashMap::from([(partition, next)]))
            .await
    }

    /// [`Self::commit`] for several partitions in one request. A partition
    /// with a message handed back commits up to that message, not past it.
    async fn commit_positions(
        &self,
        operation: &'static str,
        positions: &HashMap<i32, i64>,
    ) -> Result<(), QueueError> {
        let mut offsets = TopicPartitionList::new();
        for (&partition, &next) in positions {
            self.ensure_assigned(operation, partition)?;
            let next = self
                .handed_back
                .get(&partition)
                .map_or(next, |&back| next.min(back));
            offsets
                .add_partition_offset(&self.topology.topic, partition, Offset::Offset(next))
                .map_err(|e| QueueError::broker(operation, e))?;
        }
        let consumer = self.consumer.clone();
        let result = match &self.transactions {
            None => {
                tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync))
                    .await
                    .map_err(|e| QueueError::broker(operation, e))?
            }
            Some(producer) => {
                let producer = producer.clone();
                tokio::task::spawn_blocking(move || {
                    commit_in_transaction(&consumer, &producer, &offsets)
                })
                .await
                .map_err(|e| QueueError::broker(operation, e))?
            }
        };
        result.map_err(|error| settle_error(operation, error))
    }
}

/// begin → send_offsets_to_transaction (with the group's generation, so a
/// member that lost the partition is fenced) → commit; aborted on an error
/// that leaves the transaction open.
fn commit_in_transaction(
    consumer: &StreamConsumer,
    producer: &FutureProducer,
    offsets: &TopicPartitionList,
) -> Result<(), KafkaError> {
    let group = consumer
        .group_metadata()
        .ok_or(KafkaError::Rebalance(RDKafkaErrorCode::UnknownMemberId))?;
    producer.begin_transaction()?;
    let committed = producer
        .send_offsets_to_transaction(offsets, &group, REQUEST_TIMEOUT)
        .and_then(|()| producer.commit_transaction(REQUEST_TIMEOUT));
    if let Err(KafkaError::Transaction(error)) = &committed {
        if error.txn_requires_abort() {
            producer.abort_transaction(REQUEST_TIMEOUT)?;
        }
    }
    committed
}

/// A settle refused because the group has moved on (a rebalance, or this
/// member was dropped from the group) is a lease that ran out; anything else
/// is a broker error.
fn settle_error(operation: &'static str, error: KafkaError) -> QueueError {
    let rebalanced = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::FencedInstanceId
                | RDKafkaErrorCode::StaleMemberEpoch
                | RDKafkaErrorCode::AssignmentLost
        )
    );
    if rebalanced {
        QueueError::LeaseExpired {
            operation,
            reason: error.to_string(),
        }
    } else {
        QueueError::broker(operation, error)
    }
}

/// A consume error that a wait rides out: librdkafka reconnects and
/// refetches by itself. Fatal errors and a topic that does not exist end
/// the receive instead.
fn passes(error: &KafkaError) -> bool {
    match error {
        KafkaError::MessageConsumption(code) => !matches!(
            code,
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
        ),
        _ => false,
    }
}

fn header(message: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|header| header.key == name)
        .and_then(|header| header.value)
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

#[async_trait::async_trait]
impl crate::Receiver for KafkaReceiver {
    /// Waits for one message, then takes up to `max` in all from what
    /// librdkafka has already fetched, without waiting for more. Settle them
    /// before the next receive: an ack is a position.
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + wait;
        let consumer = self.consumer.clone();
        let first = loop {
            let received = match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Err(_elapsed) => return Ok(Vec::new()),
                Ok(received) => received,
            };
            match received {
                Ok(message) => break self.delivery(&message),
                Err(error) if passes(&error) => {
                    tracing::warn!(%error, topic = %self.topology.topic, "consume error, still waiting")
                }
                Err(error) => return Err(QueueError::broker("consume", error)),
            }
        };
        let mut batch = vec![first];
        while batch.len() < max {
            let Some(Ok(message)) = consumer.recv().now_or_never() else {
                break;
            };
            batch.push(self.delivery(&message));
        }
        Ok(batch)
    }

    async fn ack_batch(&mut self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        let mut positions: HashMap<i32, i64> = HashMap::new();
        for delivery in deliveries {
            let (partition, offset) = Self::offset_of(delivery)?;
            let next = positions.entry(partition).or_insert(offset + 1);
            *next = (*next).max(offset + 1);
        }
        if positions.is_empty() {
            return Ok(());
        }
        self.commit_positions("commit (batch)", &positions).await
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), QueueError> {
        let (partition, offset) = Self::offset_of(delivery)?;
        self.commit("commit", partition, offset + 1).await
    }

    /// Seeks the partition back to the message, so the next receive
    /// delivers it again; the messages after it wait. Of several handed
    /// back from one batch, the oldest is where the partition resumes.
    async fn requeue(&mut self, delivery: &Delivery) -> Result<(), QueueError> {
        let (partition, offset) = Self::offset_of(delivery)?;
        self.ensure_assigned("seek", partition)?;
        let back = self.handed_back.entry(partition).or_insert(offset);
        *back = (*back).min(offset);
        let offset = *back;
        let consumer = self.consumer.clone();
        let topic = self.topology.topic.clone();
        blocking("seek", move || {
            consumer.seek(&topic, partition, Offset::Offset(offset), REQUEST_TIMEOUT)
        })
        .await
    }

    async fn dead_letter(&mut self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        let (partition, offset) = Self::offset_of(delivery)?;
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: DEAD_LETTER_REASON_HEADER,
                value: Some(reason),
            })
            .insert(Header {
                key: ORIGINAL_TOPIC_HEADER,
                value: Some(&self.topology.topic),
            });
        if let Some(id) = &delivery.message_id {
            headers = headers.insert(Header {
                key: MESSAGE_ID_HEADER,
                value: Some(id),
            });
        }
        let dead_letter_topic = self.topology.dead_letter_topic();
        let record = FutureRecord::to(&dead_letter_topic)
            .payload(&delivery.payload)
            .headers(headers);
        // Copy first, commit second: if we die in between, the message is in
        // both topics, which is a duplicate in the DLQ, never a loss.
        produce(&self.producer, record).await?;
        self.commit("commit (dead letter)", partition, offset + 1)
            .await
    }

    async fn extend_lease(
        &mut self,
        _delivery: &Delivery,
        _by: Duration,
    ) -> Result<(), QueueError> {
        // Kafka leases partitions, not messages, and keeps the lease alive by
        // itself: librdkafka's own thread sends the session heartbeat while
        // the handler works, and the only bound on a slow handler is
        // `max.poll.interval.ms` between two receives. There is nothing to
        // extend per delivery.
        Ok(())
    }
}

/// A message as it sits in the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: String,
    pub payload: Vec<u8>,
    pub message_id: Option<String>,
}

pub struct KafkaInspector {
    consumer: Arc<BaseConsumer>,
    brokers: String,
    topology: KafkaTopology,
}

impl KafkaInspector {
    /// The group's lag: over the topic's partitions, the high watermark
    /// minus the committed offset (minus the low watermark where the group
    /// has committed nothing). Messages handed to a consumer and not yet
    /// acked are part of it: Kafka only knows what was committed. A topic
    /// that transactional producers write to also holds their commit
    /// markers, one offset each and never delivered: after the last message
    /// of a transaction is acked (`offset + 1`), its marker still counts.
    pub async fn lag(&self) -> Result<u64, QueueError> {
        let consumer = self.consumer.clone();
        let topic = self.topology.topic.clone();
        blocking("lag", move || {
            let partitions = partition_ids(&*consumer, &topic)?;
            let mut wanted = TopicPartitionList::new();
            for &partition in &partitions {
                wanted.add_partition(&topic, partition);
            }
            let committed = consumer.committed_offsets(wanted, REQUEST_TIMEOUT)?;
            let mut lag = 0;
            for partition in partitions {
                let (low, high) = while_leader_settles(|| {
                    consumer.fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)
                })?;
                let position = match committed
                    .find_partition(&topic, partition)
                    .map(|element| element.offset())
                {
                    Some(Offset::Offset(offset)) => offset.max(low),
                    _ => low,
                };
                lag += u64::try_from(high - position).unwrap_or(0);
            }
            Ok(lag)
        })
        .await
    }

    /// Nothing left for the group: lag 0.
    pub async fn is_empty(&self) -> Result<bool, QueueError> {
        Ok(self.lag().await? == 0)
    }

    /// Up to `max` dead letters with their reasons, read from the start of
    /// the dead-letter topic by a consumer of its own that is assigned the
    /// partitions directly, joins no group and commits nothing: the letters
    /// stay where they are for the next look.
    pub async fn peek_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let topic = self.topology.dead_letter_topic();
        let reader: BaseConsumer<PeekContext> = client_config(&self.brokers)
            // librdkafka wants a group even for assign(); this reader never
            // joins it and commits nothing to it.
            .set("group.id", format!("{}.peek", topic))
            .set("enable.auto.commit", "false")
            // Says when a partition has been read to its end.
            .set("enable.partition.eof", "true")
            .create_with_context(PeekContext)
            .map_err(|e| QueueError::broker("create dead-letter reader", e))?;
        blocking("peek dead letters", move || {
            let partitions = partition_ids(&reader, &topic)?;
            let mut assignment = TopicPartitionList::new();
            for &partition in &partitions {
                assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
            }
            reader.assign(&assignment)?;
            let mut letters = Vec::new();
            let mut at_end = 0;
            let deadline = Instant::now() + REQUEST_TIMEOUT;
            while letters.len() < max && at_end < partitions.len() && Instant::now() < deadline {
                match reader.poll(Duration::from_millis(100)) {
                    None => {}
                    Some(Err(KafkaError::PartitionEOF(_))) => at_end += 1,
                    Some(Err(error)) => return Err(error),
                    Some(Ok(message)) => letters.push(DeadLetter {
                        reason: header(&message, DEAD_LETTER_REASON_HEADER).unwrap_or_default(),
                        message_id: header(&message, MESSAGE_ID_HEADER),
                        payload: message.payload().unwrap_or_default().to_vec(),
                    }),
                }
            }
            Ok(letters)
        })
        .await
    }

    /// Records in a topic, over its partitions (high minus low watermark).
    async fn record_count(&self, topic: String) -> Result<u64, QueueError> {
        let consumer = self.consumer.clone();
        blocking("watermarks", move || {
            let mut count = 0;
            for partition in partition_ids(&*consumer, &topic)? {
                let (low, high) = while_leader_settles(|| {
                    consumer.fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)
                })?;
                count += u64::try_from(high - low).unwrap_or(0);
            }
            Ok(count)
        })
        .await
    }
}

/// The dead-letter reader's context. librdkafka also reports the end of a
/// partition as a client error, which the default context logs at ERROR;
/// for this reader the end is the expected answer, not an error to show a
/// reader of the logs. Every other error is logged as before.
struct PeekContext;

impl rdkafka::ClientContext for PeekContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for PeekContext {}

/// Runs `call` again while it fails because a partition has no leader yet
/// (a topic created a moment ago) or its leader just moved: both pass
/// within a second or two, and a look at the topic must not fail on them.
fn while_leader_settles<T>(
    mut call: impl FnMut() -> Result<T, KafkaError>,
) -> Result<T, KafkaError> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        match call() {
            Err(error) if leader_settling(&error) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            result => return result,
        }
    }
}

fn leader_settling(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::LeaderNotAvailable | RDKafkaErrorCode::NotLeaderForPartition)
    )
}

/// The partitions of `topic`, from the cluster's metadata.
fn partition_ids<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
) -> Result<Vec<i32>, KafkaError> {
    while_leader_settles(|| partition_ids_once(consumer, topic))
}

fn partition_ids_once<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
) -> Result<Vec<i32>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    match found {
        Some(t) if t.error().is_none() => Ok(t.partitions().iter().map(|p| p.id()).collect()),
        Some(t) => Err(KafkaError::MetadataFetch(
            t.error()
                .map(Into::into)
                .unwrap_or(RDKafkaErrorCode::UnknownTopic),
        )),
        None => Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopic)),
    }
}

#[async_trait::async_trait]
impl QueueInspector for KafkaInspector {
    /// The group's lag ([`KafkaInspector::lag`]).
    async fn ready_count(&self) -> Result<u64, QueueError> {
        self.lag().await
    }

    async fn dead_letter_count(&self) -> Result<u64, QueueError> {
        self.record_count(self.topology.dead_letter_topic()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_names_follow_the_topic() {
        let topology = KafkaTopology::new("eo.test.payments");
        assert_eq!(topology.dead_letter_topic(), "eo.test.payments.dlq");
        assert_eq!(topology.group(), "eo.test.payments.consumers");
        assert_eq!(topology.partitions, DEFAULT_PARTITIONS);
        assert!(!topology.transactional_ack);
    }

    #[test]
    fn a_refused_commit_after_a_rebalance_is_a_lease_that_ran_out() {
        for code in [
            RDKafkaErrorCode::RebalanceInProgress,
            RDKafkaErrorCode::IllegalGeneration,
            RDKafkaErrorCode::UnknownMemberId,
        ] {
            let error = settle_error("commit", KafkaError::ConsumerCommit(code));
            assert!(
                matches!(error, QueueError::LeaseExpired { .. }),
                "{error:?}"
            );
        }
        let other = settle_error(
            "commit",
            KafkaError::ConsumerCommit(RDKafkaErrorCode::RequestTimedOut),
        );
        assert!(matches!(other, QueueError::Broker { .. }), "{other:?}");
    }
}
