//! The RabbitMQ backend (lapin).
//!
//! Leg 2 settings are explicit fields of [`Topology`] rather than hidden
//! defaults, because a later chapter turns them off on purpose: a durable
//! queue, persistent messages (delivery mode 2) and publisher confirms. The
//! queue also names a dead-letter exchange, so a message the consumer cannot
//! process is moved aside with its reason instead of being dropped or
//! redelivered forever.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::{Delivery, OutgoingMessage, QueueError, QueueInspector, Receipt};

/// The default matches `scripts/services-up` (RabbitMQ's guest user may only
/// log in from loopback, which is all we use).
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The header that carries why a message was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-dead-letter-reason";

/// `EO_AMQP_URL`, or the local default.
pub fn url_from_env() -> String {
    std::env::var("EO_AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// The header a quorum queue sets on a redelivered message: how many times
/// it was handed out before.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// RabbitMQ's queue types, as far as a consumer can tell them apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QueueType {
    /// The classic queue: it flags a redelivery, and counts nothing. An
    /// `x-delivery-count` header on one of its messages came from whoever
    /// published it.
    #[default]
    Classic,
    /// A quorum queue (`x-queue-type: quorum`, always durable): the broker
    /// sets `x-delivery-count` on each redelivery.
    Quorum,
}

/// One work queue, its dead-letter exchange and its dead-letter queue.
#[derive(Debug, Clone)]
pub struct Topology {
    pub queue: String,
    /// Leg 2: a durable queue survives a broker restart.
    pub durable: bool,
    /// Leg 2: persistent messages are written to disk before they are confirmed.
    pub persistent: bool,
    /// Which type is declared, and so whose `x-delivery-count` a delivery
    /// carries: the broker's (quorum) or a publisher's (classic).
    pub queue_type: QueueType,
}

impl Topology {
    /// The hardened defaults: durable classic queue, persistent messages.
    pub fn durable(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            durable: true,
            persistent: true,
            queue_type: QueueType::Classic,
        }
    }

    /// A quorum queue (durable by definition), persistent messages.
    pub fn quorum(queue: impl Into<String>) -> Self {
        Self {
            queue_type: QueueType::Quorum,
            ..Self::durable(queue)
        }
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.queue)
    }
}

/// One AMQP connection; publishers and receivers each open their own channel.
#[derive(Clone)]
pub struct RabbitBroker {
    connection: std::sync::Arc<Connection>,
    url: String,
}

impl RabbitBroker {
    pub async fn connect(url: &str) -> Result<Self, QueueError> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(|error| QueueError::Connect {
                url: redact(url),
                // A parse error may quote the URL it could not parse.
                reason: error.to_string().replace(url, &redact(url)),
            })?;
        Ok(Self {
            connection: std::sync::Arc::new(connection),
            url: url.to_owned(),
        })
    }

    pub fn url(&self) -> String {
        redact(&self.url)
    }

    /// Closes the connection, and with it every channel opened from it (by
    /// any clone of this broker). The broker requeues every delivery still
    /// unacked on those channels, exactly as if the process had died.
    ///
    /// Dropping a `RabbitBroker` alone does not close anything while a
    /// publisher, receiver or other clone still holds a channel: lapin closes
    /// the connection only when the last handle on it goes away.
    pub async fn close(&self) -> Result<(), QueueError> {
        self.connection
            .close(200, "closed by the client")
            .await
            .map_err(|e| QueueError::broker("connection.close", e))
    }

    async fn channel(&self) -> Result<Channel, QueueError> {
        self.connection
            .create_channel()
            .await
            .map_err(|e| QueueError::broker("channel.open", e))
    }

    /// Declares the queue, its dead-letter exchange and dead-letter queue.
    /// Idempotent: declaring twice with the same settings is a no-op.
    pub async fn declare(&self, topology: &Topology) -> Result<(), QueueError> {
        let channel = self.channel().await?;
        let dlx = topology.dead_letter_exchange();
        let dlq = topology.dead_letter_queue();
        // The dead-letter side is always durable: it holds the messages we
        // promised never to lose.
        channel
            .exchange_declare(
                &dlx,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| QueueError::broker("exchange.declare", e))?;
        channel
            .queue_declare(
                &dlq,
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| QueueError::broker("queue.declare", e))?;
        channel
            .queue_bind(
                &dlq,
                &dlx,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| QueueError::broker("queue.bind", e))?;

        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dlx.into()),
        );
        if topology.queue_type == QueueType::Quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        channel
            .queue_declare(
                &topology.queue,
                QueueDeclareOptions {
                    durable: topology.durable,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .map_err(|e| QueueError::broker("queue.declare", e))?;
        let _ = channel.close(200, "declared").await;
        Ok(())
    }

    /// Deletes everything [`RabbitBroker::declare`] created.
    pub async fn delete(&self, topology: &Topology) -> Result<(), QueueError> {
        // Deleting is idempotent, so a channel the broker refused mid-way
        // ("expected 'channel.open'", seen once in CI on a connection whose
        // other channels were closing) is retried once on a fresh one.
        match self.delete_on_new_channel(topology).await {
            Err(QueueError::Broker { .. }) => self.delete_on_new_channel(topology).await,
            done => done,
        }
    }

    async fn delete_on_new_channel(&self, topology: &Topology) -> Result<(), QueueError> {
        let channel = self.channel().await?;
        for queue in [topology.queue.clone(), topology.dead_letter_queue()] {
            channel
                .queue_delete(&queue, QueueDeleteOptions::default())
                .await
                .map_err(|e| QueueError::broker("queue.delete", e))?;
        }
        channel
            .exchange_delete(
                &topology.dead_letter_exchange(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .map_err(|e| QueueError::broker("exchange.delete", e))?;
        let _ = channel.close(200, "deleted").await;
        Ok(())
    }

    pub async fn publisher(&self, topology: &Topology) -> Result<RabbitPublisher, QueueError> {
        let channel = self.confirming_channel().await?;
        Ok(RabbitPublisher {
            channel,
            topology: topology.clone(),
        })
    }

    /// A receiver with manual acks and at most `prefetch` unacked deliveries.
    pub async fn receiver(
        &self,
        topology: &Topology,
        prefetch: u16,
    ) -> Result<RabbitReceiver, QueueError> {
        let channel = self.channel().await?;
        // The prefetch bounds how many messages sit unacked in this process:
        // all of them come back if the process dies.
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| QueueError::broker("basic.qos", e))?;
        let consumer = channel
            .basic_consume(
                &topology.queue,
                "",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| QueueError::broker("basic.consume", e))?;
        let dead_letters = self.confirming_channel().await?;
        Ok(RabbitReceiver {
            broker: self.clone(),
            channel,
            consumer,
            dead_letters,
            topology: topology.clone(),
        })
    }

    pub fn inspector(&self, topology: &Topology) -> RabbitInspector {
        RabbitInspector {
            broker: self.clone(),
            topology: topology.clone(),
        }
    }

    async fn confirming_channel(&self) -> Result<Channel, QueueError> {
        let channel = self.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| QueueError::broker("confirm.select", e))?;
        Ok(channel)
    }
}

pub struct RabbitPublisher {
    channel: Channel,
    topology: Topology,
}

#[async_trait::async_trait]
impl crate::Publisher for RabbitPublisher {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        let mut properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(message.message_id.clone()));
        if self.topology.persistent {
            properties = properties.with_delivery_mode(2);
        }
        publish_confirmed(
            &self.channel,
            "",
            &self.topology.queue,
            &message.payload,
            properties,
        )
        .await
    }
}

/// Publishes with `mandatory` set and waits for the confirm, so that both an
/// unroutable message and a broker nack surface as errors.
async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<(), QueueError> {
    let confirm = channel
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            payload,
            properties,
        )
        .await
        .map_err(|e| QueueError::broker("basic.publish", e))?
        .await
        .map_err(|e| QueueError::broker("publisher confirm", e))?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(QueueError::NotConfirmed(format!(
            "unroutable: {}",
            returned.reply_text
        ))),
        Confirmation::Nack(_) => Err(QueueError::NotConfirmed("broker nack".into())),
        Confirmation::NotRequested => Err(QueueError::NotConfirmed(
            "channel is not in confirm mode".into(),
        )),
    }
}

pub struct RabbitReceiver {
    /// To reopen the dead-letter channel after the broker closed it.
    broker: RabbitBroker,
    channel: Channel,
    consumer: lapin::Consumer,
    /// A separate confirming channel: the dead-letter copy must be confirmed
    /// before the original is acked. Reopened when the broker has closed it
    /// (a publish to a missing dead-letter exchange is a channel error).
    dead_letters: Channel,
    topology: Topology,
}

impl RabbitReceiver {
    fn delivery_tag(delivery: &Delivery) -> Result<u64, QueueError> {
        match &delivery.receipt {
            Receipt::DeliveryTag(tag) => Ok(*tag),
            other => Err(QueueError::ForeignReceipt(other.clone())),
        }
    }
}

/// The delivery as the consumer sees it. Its `delivery_count` is only ever
/// a count the broker set: a classic queue sets none, so a header of that
/// name there is a publisher's and is ignored (trusting it let a valid event
/// carrying `x-delivery-count: 99` be dead-lettered as "received too often"
/// without ever being charged). A quorum queue sets it on redeliveries only,
/// so on a first delivery any value is again a publisher's.
fn to_delivery(message: lapin::message::Delivery, queue_type: QueueType) -> Delivery {
    let properties = &message.properties;
    let broker_counts = queue_type == QueueType::Quorum && message.redelivered;
    let delivery_count = properties
        .headers()
        .as_ref()
        .filter(|_| broker_counts)
        .and_then(|headers| match headers.inner().get(DELIVERY_COUNT_HEADER) {
            // The header counts earlier deliveries; ours counts this one too,
            // as SQS's ApproximateReceiveCount does.
            Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).ok(),
            Some(AMQPValue::LongInt(n)) => u32::try_from(*n).ok(),
            _ => None,
        })
        .map(|earlier| earlier.saturating_add(1));
    Delivery {
        message_id: properties.message_id().as_ref().map(|id| id.to_string()),
        redelivered: message.redelivered,
        delivery_count,
        receipt: Receipt::DeliveryTag(message.delivery_tag),
        payload: message.data,
    }
}

#[async_trait::async_trait]
impl crate::Receiver for RabbitReceiver {
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let mut batch = Vec::new();
        let first = match tokio::time::timeout(wait, self.consumer.next()).await {
            Err(_elapsed) => return Ok(batch),
            Ok(None) => return Err(QueueError::StreamClosed),
            Ok(Some(result)) => result.map_err(|e| QueueError::broker("basic.deliver", e))?,
        };
        let queue_type = self.topology.queue_type;
        batch.push(to_delivery(first, queue_type));
        // Take whatever else is already buffered, without waiting for more.
        while batch.len() < max {
            match self.consumer.next().now_or_never() {
                Some(Some(result)) => {
                    batch.push(to_delivery(
                        result.map_err(|e| QueueError::broker("basic.deliver", e))?,
                        queue_type,
                    ));
                }
                Some(None) | None => break,
            }
        }
        Ok(batch)
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), QueueError> {
        let tag = Self::delivery_tag(delivery)?;
        self.channel
            .basic_ack(tag, BasicAckOptions::default())
            .await
            .map_err(|e| QueueError::broker("basic.ack", e))
    }

    /// One `basic.ack` with `multiple` set, up to the batch's highest tag:
    /// it acks every unacked delivery of the channel up to that tag, which
    /// is this batch once its other deliveries are settled.
    async fn ack_batch(&mut self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        let mut highest = None;
        for delivery in deliveries {
            highest = highest.max(Some(Self::delivery_tag(delivery)?));
        }
        let Some(tag) = highest else {
            return Ok(());
        };
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await
            .map_err(|e| QueueError::broker("basic.ack (multiple)", e))
    }

    /// The broker handles a channel's frames in order, so the reply to a
    /// passive declare on this channel means every ack before it arrived.
    async fn settled(&mut self) -> Result<(), QueueError> {
        self.channel
            .queue_declare(
                &self.topology.queue,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|_| ())
            .map_err(|e| QueueError::broker("queue.declare (passive)", e))
    }

    async fn requeue(&mut self, delivery: &Delivery) -> Result<(), QueueError> {
        let tag = Self::delivery_tag(delivery)?;
        self.channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| QueueError::broker("basic.nack", e))
    }

    async fn dead_letter(&mut self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        let tag = Self::delivery_tag(delivery)?;
        let mut headers = FieldTable::default();
        headers.insert(
            DEAD_LETTER_REASON_HEADER.into(),
            AMQPValue::LongString(reason.to_owned().into()),
        );
        headers.insert(
            "x-original-queue".into(),
            AMQPValue::LongString(self.topology.queue.clone().into()),
        );
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(id) = &delivery.message_id {
            properties = properties.with_message_id(ShortString::from(id.clone()));
        }
        if !self.dead_letters.status().connected() {
            self.dead_letters = self.broker.confirming_channel().await?;
        }
        // Copy first, ack second: if we die in between, the message is in
        // both places, which is a duplicate in the DLQ, never a loss.
        publish_confirmed(
            &self.dead_letters,
            &self.topology.dead_letter_exchange(),
            "",
            &delivery.payload,
            properties,
        )
        .await?;
        self.channel
            .basic_ack(tag, BasicAckOptions::default())
            .await
            .map_err(|e| QueueError::broker("basic.ack", e))
    }

    async fn extend_lease(
        &mut self,
        _delivery: &Delivery,
        _by: Duration,
    ) -> Result<(), QueueError> {
        // RabbitMQ keeps an unacked message for as long as the channel lives
        // (up to its consumer_timeout, 30 minutes by default); there is no
        // lease to extend.
        Ok(())
    }
}

pub struct RabbitInspector {
    broker: RabbitBroker,
    topology: Topology,
}

impl RabbitInspector {
    async fn passive_count(&self, queue: &str) -> Result<u64, QueueError> {
        // A passive declare of a missing queue closes the channel, so each
        // look gets a channel of its own.
        let channel = self.broker.channel().await?;
        let declared = channel
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| QueueError::broker("queue.declare(passive)", e))?;
        let _ = channel.close(200, "inspected").await;
        Ok(u64::from(declared.message_count()))
    }

    /// The reasons and payloads in the dead-letter queue, without removing
    /// them (each is requeued after the look).
    pub async fn peek_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let channel = self.broker.channel().await?;
        let mut seen = Vec::new();
        for _ in 0..max {
            let got = channel
                .basic_get(
                    &self.topology.dead_letter_queue(),
                    lapin::options::BasicGetOptions::default(),
                )
                .await
                .map_err(|e| QueueError::broker("basic.get", e))?;
            let Some(message) = got else { break };
            let reason = message
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get(DEAD_LETTER_REASON_HEADER) {
                    Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                    _ => None,
                })
                .unwrap_or_default();
            seen.push(DeadLetter {
                reason,
                payload: message.delivery.data.clone(),
            });
        }
        // Closing the channel returns every message we fetched but did not ack.
        let _ = channel.close(200, "peeked").await;
        Ok(seen)
    }
}

/// A message as it sits in the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: String,
    pub payload: Vec<u8>,
}

#[async_trait::async_trait]
impl QueueInspector for RabbitInspector {
    async fn ready_count(&self) -> Result<u64, QueueError> {
        self.passive_count(&self.topology.queue).await
    }

    async fn dead_letter_count(&self) -> Result<u64, QueueError> {
        self.passive_count(&self.topology.dead_letter_queue()).await
    }
}

/// The URL as it may be printed: AMQP URLs carry the password in the
/// userinfo and may carry more credentials in the query string.
fn redact(url: &str) -> String {
    telemetry::redact::redact_url(url)
}
