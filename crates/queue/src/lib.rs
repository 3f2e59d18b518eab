//! The at-least-once queue behind one interface.
//!
//! # Layout
//!
//! - [`Publisher`]: sends one message and returns only once the broker has
//!   taken responsibility for it (a publisher confirm on RabbitMQ, a 200 from
//!   `SendMessage` on SQS, `acks=all` on Kafka).
//! - [`Receiver`]: hands out [`Delivery`] values and settles each one: `ack`,
//!   `requeue`, or `dead_letter` with a reason. `extend_lease` pushes back the
//!   redelivery deadline where the broker has one (SQS visibility).
//! - [`rabbitmq`]: the RabbitMQ backend (lapin).
//! - [`sqs`]: the SQS backend (aws-sdk-sqs), against ElasticMQ locally.
//! - [`kafka`]: the Kafka backend (rdkafka), against one KRaft broker.
//! - [`backend`]: any of the three, chosen at run time.
//!
//! # Why the interface looks like this
//!
//! Every broker of the book delivers at least once, and each remembers "who
//! still has this message" differently: RabbitMQ by a delivery tag on one
//! channel, SQS by a receipt handle that changes on every receive, Kafka by a
//! committed offset per partition. [`Receipt`] carries whichever one the
//! backend needs, so the consumer code above it never changes.
//!
//! Settling is explicit and nothing settles on drop: a consumer that dies
//! leaves its message unsettled, and the broker redelivers it. That is the
//! behaviour the chaos lab exists to exercise.

use std::time::Duration;

pub mod backend;
pub mod kafka;
pub mod rabbitmq;
pub mod redrive;
pub mod sqs;

/// How the broker identifies one delivery when it is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    /// RabbitMQ: the channel-scoped delivery tag.
    DeliveryTag(u64),
    /// SQS: the receipt handle of this receive (not of the message).
    ReceiptHandle(String),
    /// Kafka: acking commits `offset + 1` for the partition.
    Offset { partition: i32, offset: i64 },
}

impl Receipt {
    /// Where the message sits in the broker, when every delivery of it
    /// carries the same address: Kafka's partition and offset. A RabbitMQ
    /// delivery tag and an SQS receipt handle are new on each delivery.
    pub fn position(&self) -> Option<Position> {
        match *self {
            Receipt::Offset { partition, offset } => Some(Position { partition, offset }),
            Receipt::DeliveryTag(_) | Receipt::ReceiptHandle(_) => None,
        }
    }
}

/// A message's place in a Kafka topic. Two deliveries at the same position
/// are the same message delivered twice, whether or not the consumer that
/// got the second one could tell (see [`kafka`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// One delivery of one message. The same message may be delivered again.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub payload: Vec<u8>,
    /// The broker's or publisher's message id, when the backend has one.
    pub message_id: Option<String>,
    /// True when the broker says it handed this message out before (on
    /// Kafka: when this process received it before, see [`kafka`]).
    pub redelivered: bool,
    /// How many times it was handed out, where the broker counts (SQS
    /// `ApproximateReceiveCount`, RabbitMQ quorum `x-delivery-count`).
    pub delivery_count: Option<u32>,
    pub receipt: Receipt,
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// Ordering key: Kafka partitions by it, SQS FIFO groups by it; RabbitMQ
    /// keeps one queue's order and ignores it.
    pub key: String,
    pub message_id: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot connect to the broker at {url}: {reason} (is it up? run scripts/services-up)")]
    Connect { url: String, reason: String },
    #[error("the broker refused to take the message: {0}")]
    NotConfirmed(String),
    #[error("broker operation `{operation}` failed: {reason}")]
    Broker {
        operation: &'static str,
        reason: String,
    },
    /// The dead-letter queue refused the copy (on SQS: a message over the
    /// size limit). Nothing happened to the original, which is still
    /// unsettled: hand it back, and the broker's own redrive moves it.
    #[error("the dead-letter queue refused the message: {reason}")]
    DeadLetterRefused { reason: String },
    #[error("the delivery stream ended: the connection or channel closed")]
    StreamClosed,
    #[error("receipt {0:?} does not belong to this backend")]
    ForeignReceipt(Receipt),
    /// The delivery's lease ran out and the message was handed out again:
    /// this receipt can no longer settle it (SQS `ReceiptHandleIsInvalid`).
    /// The newer delivery settles it instead; the consumer's dedup makes
    /// sure the work is not done twice.
    #[error("`{operation}` came too late: the lease ran out and the message was handed out again ({reason})")]
    LeaseExpired {
        operation: &'static str,
        reason: String,
    },
}

impl QueueError {
    pub(crate) fn broker(operation: &'static str, error: impl std::fmt::Display) -> Self {
        Self::Broker {
            operation,
            reason: error.to_string(),
        }
    }
}

#[async_trait::async_trait]
pub trait Publisher: Send + Sync {
    /// Returns once the broker confirmed the message, never earlier.
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), QueueError>;
}

#[async_trait::async_trait]
pub trait Receiver: Send {
    /// Waits up to `wait` for at least one delivery and returns at most
    /// `max` (SQS receives in batches of up to 10; RabbitMQ is bounded by the
    /// prefetch). An empty vector means nothing arrived in time.
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError>;

    /// Done: the broker forgets the message.
    async fn ack(&mut self, delivery: &Delivery) -> Result<(), QueueError>;

    /// Done, for every delivery of a batch that one receive handed out:
    /// RabbitMQ in one `multiple` ack up to the highest delivery tag, SQS
    /// in `DeleteMessageBatch` calls of ten, Kafka in one commit per
    /// partition. A multiple ack and a commit also cover what came before
    /// the highest delivery, so the caller settles the batch's other
    /// deliveries (handed back, dead-lettered) first, and settles a batch
    /// before it receives the next.
    async fn ack_batch(&mut self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        for delivery in deliveries {
            self.ack(delivery).await?;
        }
        Ok(())
    }

    /// Returns once the broker has processed every settlement sent before
    /// it. RabbitMQ answers no ack, so a process killed right after `ack`
    /// can take the ack down with it (the kernel resets a socket that still
    /// holds unread deliveries); SQS and Kafka settle with a reply already.
    async fn settled(&mut self) -> Result<(), QueueError> {
        Ok(())
    }

    /// Not done: hand it out again (now, or when the lease runs out).
    async fn requeue(&mut self, delivery: &Delivery) -> Result<(), QueueError>;

    /// Never processable: moved to the dead-letter queue with `reason`, and
    /// only then removed from the main queue, so it is never lost.
    async fn dead_letter(&mut self, delivery: &Delivery, reason: &str) -> Result<(), QueueError>;

    /// Still working: push the redelivery deadline `by` further out. A no-op
    /// where the broker waits for the connection instead (RabbitMQ).
    async fn extend_lease(&mut self, delivery: &Delivery, by: Duration) -> Result<(), QueueError>;

    /// A handle that extends leases from another task while this receiver is
    /// busy handling the delivery (the visibility heartbeat). `None` where
    /// the broker has no lease to extend (RabbitMQ).
    fn lease_keeper(&self) -> Option<std::sync::Arc<dyn LeaseKeeper>> {
        None
    }
}

/// Extends a delivery's lease while its handler works (see
/// [`Receiver::lease_keeper`]).
#[async_trait::async_trait]
pub trait LeaseKeeper: Send + Sync {
    /// Keeps the message hidden for `by` from now.
    async fn extend(&self, delivery: &Delivery, by: Duration) -> Result<(), QueueError>;
}

/// What a chaos run or a test can observe about a queue from the outside.
#[async_trait::async_trait]
pub trait QueueInspector: Send + Sync {
    /// Messages waiting to be handed out (not counting those held by consumers).
    async fn ready_count(&self) -> Result<u64, QueueError>;
    /// Messages in the dead-letter queue.
    async fn dead_letter_count(&self) -> Result<u64, QueueError>;
}
