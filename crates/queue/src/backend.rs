//! Any broker, chosen at run time: what the chaos lab and the chapters'
//! `--backend` flag use, so that one run description works on all three.
//!
//! A [`QueueSpec`] names the queue and carries the settings only one broker
//! has (SQS's visibility timeout and `maxReceiveCount`, Kafka's partitions
//! and transactional ack); it serialises, so a lab can hand it to the
//! consumer processes it starts. [`Broker`] connects to whichever backend the
//! spec names, from the environment's settings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::kafka::{self, KafkaBroker, KafkaTopology};
use crate::rabbitmq::{self, RabbitBroker, Topology};
use crate::sqs::{self, ReceiveSettings, SqsBroker, SqsTopology};
use crate::{Publisher, QueueError, QueueInspector, Receiver};

/// The brokers of the book: the value of every `--backend` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Rabbitmq,
    Sqs,
    Kafka,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Rabbitmq => "rabbitmq",
            BackendKind::Sqs => "sqs",
            BackendKind::Kafka => "kafka",
        }
    }
}

/// One work queue (and its dead-letter queue) on one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSpec {
    pub backend: BackendKind,
    /// The queue's name on RabbitMQ and the topic's on Kafka; on SQS every
    /// character SQS refuses becomes `-` ([`sqs::queue_name`]).
    pub name: String,
    /// SQS: how long a received message stays hidden. RabbitMQ has no such
    /// timer per message: it redelivers when the consumer's channel closes.
    pub visibility_timeout_ms: u64,
    /// SQS: receives without a delete before the redrive policy moves the
    /// message to the dead-letter queue.
    pub max_receive_count: u32,
    /// Kafka: partitions of the topic, the most consumers that work at once.
    pub partitions: u32,
    /// Kafka: an ack commits the offset inside a Kafka transaction.
    pub transactional_ack: bool,
    /// Leg 2: what the broker promises about a message it confirmed.
    #[serde(default)]
    pub durability: Durability,
    /// Kafka: the cluster the topic lives on, if not `EO_KAFKA_BROKERS`'s
    /// (Leg 2 runs on a three-broker cluster beside the book's one broker).
    #[serde(default)]
    pub kafka_brokers: Option<String>,
}

/// Leg 2, loss inside the broker: the settings that decide whether a
/// message the broker confirmed survives the broker's own failure. Only
/// [`Durability::Durable`] (and a quorum queue) closes the leg; the others
/// exist to measure what it costs to get it wrong.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// The book's setting. RabbitMQ: a durable classic queue and persistent
    /// messages, confirmed once on disk. Kafka: `acks=all` with an
    /// idempotent producer; on a cluster of three or more brokers, three
    /// replicas and `min.insync.replicas=2`.
    #[default]
    Durable,
    /// RabbitMQ: a quorum queue (replicated Raft log, always durable),
    /// persistent messages.
    Quorum,
    /// RabbitMQ: a durable queue, but transient messages (delivery mode 1):
    /// the queue survives a restart, its messages do not.
    TransientMessages,
    /// RabbitMQ: a non-durable queue: it and every message in it are gone
    /// after a restart, persistent or not.
    NonDurableQueue,
    /// Kafka: `acks=1`: the leader confirms once the record is in its own
    /// log, before any follower has it.
    LeaderAckOnly,
}

impl QueueSpec {
    /// SQS defaults that never fire in a healthy run: a 30 s visibility
    /// timeout (SQS's own default) and 10 receives. Kafka: three partitions,
    /// plain offset commits.
    pub fn new(backend: BackendKind, name: impl Into<String>) -> Self {
        Self {
            backend,
            name: name.into(),
            visibility_timeout_ms: 30_000,
            max_receive_count: 10,
            partitions: kafka::DEFAULT_PARTITIONS,
            transactional_ack: false,
            durability: Durability::Durable,
            kafka_brokers: None,
        }
    }

    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout_ms = timeout.as_millis() as u64;
        self
    }

    pub fn with_max_receive_count(mut self, count: u32) -> Self {
        self.max_receive_count = count;
        self
    }

    pub fn visibility_timeout(&self) -> Duration {
        Duration::from_millis(self.visibility_timeout_ms)
    }

    fn rabbitmq(&self) -> Topology {
        let durable = Topology::durable(&self.name);
        match self.durability {
            Durability::Quorum => Topology::quorum(&self.name),
            Durability::TransientMessages => Topology {
                persistent: false,
                ..durable
            },
            Durability::NonDurableQueue => Topology {
                durable: false,
                ..durable
            },
            Durability::Durable | Durability::LeaderAckOnly => durable,
        }
    }

    fn kafka(&self) -> KafkaTopology {
        KafkaTopology {
            partitions: self.partitions,
            transactional_ack: self.transactional_ack,
            acks: match self.durability {
                Durability::LeaderAckOnly => kafka::Acks::Leader,
                _ => kafka::Acks::All,
            },
            ..KafkaTopology::new(&self.name)
        }
    }

    fn sqs(&self) -> SqsTopology {
        SqsTopology::new(
            sqs::queue_name(&self.name),
            self.visibility_timeout(),
            self.max_receive_count,
        )
    }
}

/// The queue flags every service of the book takes (the consumer, the
/// relay, the producer), with the same environment variables, so that two
/// processes started from one environment agree on the queue they share.
#[derive(Debug, Clone, clap::Args)]
pub struct QueueArgs {
    /// The broker.
    #[arg(long, env = "EO_BACKEND", value_enum, default_value = "rabbitmq")]
    pub backend: BackendKind,
    /// The queue (RabbitMQ, SQS) or topic (Kafka). Its dead-letter queue is
    /// `<name>.dlq`; SQS names swap `.` for `-`.
    #[arg(long, env = "EO_QUEUE", default_value = "payments")]
    pub queue: String,
    /// SQS: seconds a received message stays hidden from other consumers.
    #[arg(long, env = "EO_VISIBILITY_TIMEOUT_SECS", default_value_t = 30)]
    pub visibility_timeout_secs: u64,
    /// SQS: receives without a delete before the redrive policy moves a
    /// message to the dead-letter queue.
    #[arg(long, env = "EO_MAX_RECEIVES", default_value_t = 10)]
    pub max_receives: u32,
    /// Kafka: partitions of the topic, if this process creates it.
    #[arg(long, env = "EO_PARTITIONS", default_value_t = kafka::DEFAULT_PARTITIONS)]
    pub partitions: u32,
}

impl QueueArgs {
    pub fn spec(&self) -> QueueSpec {
        QueueSpec::new(self.backend, &self.queue)
            .with_visibility_timeout(Duration::from_secs(self.visibility_timeout_secs))
            .with_max_receive_count(self.max_receives)
            .with_partitions(self.partitions)
    }
}

/// A message in the dead-letter queue, on any backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Why the consumer dead-lettered it; empty when the broker moved it
    /// (SQS's redrive policy gives no reason).
    pub reason: String,
    pub payload: Vec<u8>,
    /// How often the dead letter itself was received, where the broker counts.
    pub receive_count: Option<u32>,
}

/// A connection to the backend a [`QueueSpec`] names.
#[derive(Clone)]
pub enum Broker {
    Rabbitmq(RabbitBroker),
    Sqs(SqsBroker),
    Kafka(KafkaBroker),
}

impl Broker {
    /// Connects to the broker `spec` lives on: the environment's, unless the
    /// spec names a Kafka cluster of its own.
    pub fn connect_for(
        spec: &QueueSpec,
    ) -> impl std::future::Future<Output = Result<Self, QueueError>> + Send + 'static {
        Self::connect_to(spec.backend, spec.kafka_brokers.clone())
    }

    /// Connects with the environment's settings (`EO_AMQP_URL`, `EO_SQS_*`,
    /// `EO_KAFKA_BROKERS`).
    pub fn connect(
        backend: BackendKind,
    ) -> impl std::future::Future<Output = Result<Self, QueueError>> + Send + 'static {
        Self::connect_to(backend, None)
    }

    // Both constructors hand out this future itself rather than awaiting it
    // in one of their own: every chapter's future nests it, and each level
    // of async nesting counts against the compiler's layout depth.
    async fn connect_to(
        backend: BackendKind,
        kafka_brokers: Option<String>,
    ) -> Result<Self, QueueError> {
        Ok(match backend {
            BackendKind::Rabbitmq => {
                Broker::Rabbitmq(RabbitBroker::connect(&rabbitmq::url_from_env()).await?)
            }
            BackendKind::Sqs => Broker::Sqs(SqsBroker::connect().await?),
            BackendKind::Kafka => {
                let brokers = kafka_brokers.unwrap_or_else(kafka::brokers_from_env);
                Broker::Kafka(KafkaBroker::connect(&brokers).await?)
            }
        })
    }

    /// Lets go of the connection: on RabbitMQ every delivery still unacked
    /// on it goes back to the queue now. SQS has no connection to close
    /// (leases run out), and Kafka's clients close when dropped.
    pub async fn close(&self) {
        if let Broker::Rabbitmq(broker) = self {
            let _ = broker.close().await;
        }
    }

    pub async fn declare(&self, spec: &QueueSpec) -> Result<(), QueueError> {
        match self {
            Broker::Rabbitmq(broker) => broker.declare(&spec.rabbitmq()).await,
            Broker::Sqs(broker) => broker.declare(&spec.sqs()).await,
            Broker::Kafka(broker) => broker.declare(&spec.kafka()).await,
        }
    }

    /// Deletes the queue and its dead-letter queue with their messages.
    pub async fn delete(&self, spec: &QueueSpec) -> Result<(), QueueError> {
        match self {
            Broker::Rabbitmq(broker) => broker.delete(&spec.rabbitmq()).await,
            Broker::Sqs(broker) => broker.delete(&spec.sqs()).await,
            Broker::Kafka(broker) => broker.delete(&spec.kafka()).await,
        }
    }

    pub async fn publisher(&self, spec: &QueueSpec) -> Result<Box<dyn Publisher>, QueueError> {
        Ok(match self {
            Broker::Rabbitmq(broker) => Box::new(broker.publisher(&spec.rabbitmq()).await?),
            Broker::Sqs(broker) => Box::new(broker.publisher(&spec.sqs()).await?),
            Broker::Kafka(broker) => Box::new(broker.publisher(&spec.kafka()).await?),
        })
    }

    /// A receiver holding at most `prefetch` unsettled messages (RabbitMQ's
    /// prefetch; an SQS receiver holds what it asked for, one at a time in
    /// the consumer; Kafka settles positions, not messages, so its receiver
    /// hands out one at a time whatever the prefetch).
    pub async fn receiver(
        &self,
        spec: &QueueSpec,
        prefetch: u16,
    ) -> Result<Box<dyn Receiver>, QueueError> {
        Ok(match self {
            Broker::Rabbitmq(broker) => {
                Box::new(broker.receiver(&spec.rabbitmq(), prefetch).await?)
            }
            Broker::Sqs(broker) => Box::new(
                broker
                    .receiver(&spec.sqs(), ReceiveSettings::default())
                    .await?,
            ),
            Broker::Kafka(broker) => Box::new(broker.receiver(&spec.kafka()).await?),
        })
    }

    pub fn inspector(&self, spec: &QueueSpec) -> Result<Inspector, QueueError> {
        Ok(match self {
            Broker::Rabbitmq(broker) => Inspector::Rabbitmq(broker.inspector(&spec.rabbitmq())),
            Broker::Sqs(broker) => Inspector::Sqs(broker.inspector(&spec.sqs())),
            Broker::Kafka(broker) => Inspector::Kafka(broker.inspector(&spec.kafka())?),
        })
    }
}

pub enum Inspector {
    Rabbitmq(rabbitmq::RabbitInspector),
    Sqs(sqs::SqsInspector),
    Kafka(kafka::KafkaInspector),
}

impl Inspector {
    /// Nothing waiting and, where the broker can say so, nothing held by a
    /// consumer. On SQS a message whose consumer was SIGKILLed is invisible
    /// until its visibility timeout runs out, and then comes back: a run is
    /// not drained while one is in flight. RabbitMQ returns a dead
    /// consumer's messages at once, so its ready count is enough there (the
    /// lab knows which live consumer is busy). On Kafka the group's lag
    /// counts every message not yet committed, held by a consumer or not.
    pub async fn is_empty(&self) -> Result<bool, QueueError> {
        Ok(match self {
            Inspector::Rabbitmq(inspector) => inspector.ready_count().await? == 0,
            Inspector::Sqs(inspector) => inspector.is_empty().await?,
            Inspector::Kafka(inspector) => inspector.is_empty().await?,
        })
    }

    /// Messages waiting to be handed out (on Kafka: the group's lag).
    pub async fn ready_count(&self) -> Result<u64, QueueError> {
        match self {
            Inspector::Rabbitmq(inspector) => inspector.ready_count().await,
            Inspector::Sqs(inspector) => inspector.ready_count().await,
            Inspector::Kafka(inspector) => inspector.ready_count().await,
        }
    }

    pub async fn dead_letter_count(&self) -> Result<u64, QueueError> {
        match self {
            Inspector::Rabbitmq(inspector) => inspector.dead_letter_count().await,
            Inspector::Sqs(inspector) => inspector.dead_letter_count().await,
            Inspector::Kafka(inspector) => inspector.dead_letter_count().await,
        }
    }

    /// Up to `max` dead letters (at most 10 on SQS), left where they are.
    pub async fn peek_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(match self {
            Inspector::Rabbitmq(inspector) => into_all(inspector.peek_dead_letters(max).await?),
            Inspector::Sqs(inspector) => into_all(inspector.peek_dead_letters(max).await?),
            Inspector::Kafka(inspector) => into_all(inspector.peek_dead_letters(max).await?),
        })
    }
}

fn into_all<T: Into<DeadLetter>>(letters: Vec<T>) -> Vec<DeadLetter> {
    letters.into_iter().map(Into::into).collect()
}

impl From<rabbitmq::DeadLetter> for DeadLetter {
    fn from(letter: rabbitmq::DeadLetter) -> Self {
        Self {
            reason: letter.reason,
            payload: letter.payload,
            receive_count: None,
        }
    }
}

impl From<kafka::DeadLetter> for DeadLetter {
    fn from(letter: kafka::DeadLetter) -> Self {
        Self {
            reason: letter.reason,
            payload: letter.payload,
            receive_count: None,
        }
    }
}

impl From<sqs::DeadLetter> for DeadLetter {
    fn from(letter: sqs::DeadLetter) -> Self {
        Self {
            reason: letter.reason,
            payload: letter.payload,
            receive_count: letter.receive_count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_durability_sets_what_its_broker_declares_and_publishes() {
        let spec =
            |durability| QueueSpec::new(BackendKind::Rabbitmq, "q").with_durability(durability);
        let durable = spec(Durability::Durable).rabbitmq();
        assert!(durable.durable && durable.persistent);
        assert_eq!(durable.queue_type, rabbitmq::QueueType::Classic);
        let transient = spec(Durability::TransientMessages).rabbitmq();
        assert!(transient.durable && !transient.persistent);
        let non_durable = spec(Durability::NonDurableQueue).rabbitmq();
        assert!(!non_durable.durable && non_durable.persistent);
        assert_eq!(
            spec(Durability::Quorum).rabbitmq().queue_type,
            rabbitmq::QueueType::Quorum
        );
        let kafka = |durability| {
            QueueSpec::new(BackendKind::Kafka, "t")
                .with_durability(durability)
                .kafka()
                .acks
        };
        assert_eq!(kafka(Durability::Durable), kafka::Acks::All);
        assert_eq!(kafka(Durability::LeaderAckOnly), kafka::Acks::Leader);
    }

    #[test]
    fn a_spec_from_before_leg_2_reads_as_the_books_durable_setting() {
        let json = r#"{"backend":"kafka","name":"t","visibility_timeout_ms":30000,
            "max_receive_count":10,"partitions":3,"transactional_ack":false}"#;
        let spec: QueueSpec = serde_json::from_str(json).unwrap();
        assert_eq!(spec.durability, Durability::Durable);
        assert_eq!(spec.kafka_brokers, None);
    }
}
