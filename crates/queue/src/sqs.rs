//! The SQS backend (aws-sdk-sqs), run against ElasticMQ on loopback.
//!
//! # How SQS remembers who has a message
//!
//! SQS has no connections to watch. A `ReceiveMessage` hands a message out and
//! hides it for the queue's *visibility timeout*; a `DeleteMessage` with the
//! receipt handle of that receive is the ack. A consumer that dies, hangs or
//! simply takes longer than the timeout does not delete in time, so the
//! message becomes visible again and the next receive hands it out a second
//! time, to whichever consumer asks: the **timeout** leg of the book.
//! [`SqsReceiver::extend_lease`](crate::Receiver::extend_lease) is the
//! heartbeat that keeps a slow message hidden (`ChangeMessageVisibility`).
//!
//! [`SqsTopology::max_receive_count`] bounds the redeliveries: the queue's
//! redrive policy moves a message that was received that many times without
//! being deleted to `<queue>-dlq`. A consumer can also dead-letter a message
//! itself, with a reason, through [`crate::Receiver::dead_letter`]: the copy is
//! sent to the dead-letter queue first and the original deleted second, so a
//! crash in between leaves a duplicate in the DLQ, never a loss.
//!
//! A 200 from `SendMessage` is the broker taking responsibility (SQS stores
//! the message redundantly before it answers): that is the publish confirm.
//! The SDK retries a publish whose answer did not arrive (standard retry mode,
//! [`SqsSettings::max_attempts`]); a retry after a lost answer stores the
//! message twice, a Leg 1 duplicate the consumer's dedup absorbs.
//!
//! # Settings
//!
//! From the environment ([`SqsSettings::from_env`]), the same variables that
//! `scripts/services-up` uses: `EO_SQS_ENDPOINT` (default
//! `http://127.0.0.1:$EO_SQS_PORT`, port 9324), `EO_SQS_REGION` (default
//! `elasticmq`), `EO_SQS_ACCESS_KEY` and `EO_SQS_SECRET_KEY` (default `x`;
//! ElasticMQ checks neither, but the SDK signs every request).
//!
//! The client speaks plain `http://` only: the crate is built without a TLS
//! stack, because the book's SQS is ElasticMQ on loopback. Talking to real
//! SQS over `https://` needs aws-sdk-sqs's default features back.
//!
//! # What ElasticMQ does not reproduce
//!
//! ElasticMQ "follows the semantics of SQS" and "implements a subset of the
//! SQS query interface" (its README); with `sqs-limits = strict` (our
//! `scripts/elasticmq/elasticmq.conf`) it also enforces SQS's limits: at most
//! 10 messages per batch, a wait of at most 20 s, the message size. What one
//! in-memory process does differently, as `crates/queue/tests/sqs.rs` pins
//! down against ElasticMQ 1.6.11:
//!
//! - **No spontaneous duplicates.** SQS keeps each message on several
//!   servers; when one of them is unavailable during a receive or a delete,
//!   its copy can be handed out again later, even after a successful delete
//!   (AWS documents both). ElasticMQ is one process: it delivers again only
//!   when the visibility timeout runs out or the message is requeued. The
//!   chaos lab makes timeout duplicates on purpose; the consumer's dedup must
//!   also cover the spontaneous kind, which only real SQS shows.
//! - **Exact counts.** `ApproximateReceiveCount` and
//!   `ApproximateNumberOfMessages{,NotVisible}` are exact and immediate here;
//!   on SQS they are estimates (AWS calls a queue empty after several minutes
//!   of zeros). A drained run needs
//!   [`QueueInspector::ready_count`] and [`SqsInspector::in_flight`] at 0.
//! - **Order and short polls.** ElasticMQ hands messages out in send order,
//!   and a short poll (`WaitTimeSeconds=0`) sees every visible message. An
//!   SQS standard queue orders best-effort only, and a short poll samples a
//!   subset of its servers, so it may come back empty while messages wait.
//! - **Redrive timing.** A message over `maxReceiveCount` moves to the DLQ
//!   lazily: after its last lease runs out it stays in the main queue, counted
//!   as visible, until the next `ReceiveMessage`, which moves it instead of
//!   returning it (and so may return nothing). SQS also moves it during a
//!   receive; the visible count in between is not something to rely on.
//! - **Stale receipt handles.** After a redelivery, a delete with the earlier
//!   receipt handle fails on ElasticMQ (`ReceiptHandleIsInvalid`). SQS
//!   documents that such a request "will succeed, but the message might not
//!   be deleted": there a late ack from a consumer whose lease ran out reports
//!   success and may leave the message to be processed again.
//! - **Error codes.** ElasticMQ answers in the JSON protocol without SQS's
//!   query-compatibility header, so the SDK's typed errors (for example
//!   `is_queue_does_not_exist()`) do not match; this module compares the
//!   error codes of both ([`QueueError::Broker`] carries `code: message`).
//! - **No durability, no account.** Queues and messages live in memory: a
//!   restart (`scripts/services-down`) empties the server. Any credentials
//!   work, nothing is throttled, and a deleted queue's name can be declared
//!   again at once (SQS asks for 60 s).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::config::retry::RetryConfig;
use aws_sdk_sqs::config::timeout::TimeoutConfig;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, Message, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName,
};
use aws_sdk_sqs::Client;

use crate::{Delivery, OutgoingMessage, QueueError, QueueInspector, Receipt};

/// Where `scripts/services-up` starts ElasticMQ.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:9324";
/// Any region works with ElasticMQ; this one says what it is.
pub const DEFAULT_REGION: &str = "elasticmq";

/// The message attribute that carries [`OutgoingMessage::message_id`].
pub const MESSAGE_ID_ATTRIBUTE: &str = "message-id";
/// The message attribute that carries why a message was dead-lettered.
pub const DEAD_LETTER_REASON_ATTRIBUTE: &str = "dead-letter-reason";
/// The message attribute that names the queue a dead letter came from.
pub const ORIGINAL_QUEUE_ATTRIBUTE: &str = "original-queue";

/// The largest message SQS takes (256 KiB), counting the body and every
/// message attribute's name, data type and value (AWS: "the message size
/// includes the message body and any message attributes").
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// The data type every attribute of ours has.
const STRING_TYPE: &str = "String";
/// What a shortened dead-letter reason ends with.
const TRUNCATED: &str = " [truncated: the full reason is in the consumer's log]";

/// SQS hands out and deletes at most 10 messages per call.
pub const MAX_BATCH: usize = 10;
/// The longest long poll SQS allows (`WaitTimeSeconds`).
pub const MAX_WAIT: Duration = Duration::from_secs(20);
/// The longest visibility timeout SQS allows (12 hours).
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);
/// Queue names: at most 80 characters (the `-dlq` suffix included).
const MAX_QUEUE_NAME: usize = 80;
const DEAD_LETTER_SUFFIX: &str = "-dlq";
/// The DLQ keeps its messages as long as SQS allows (14 days).
const DEAD_LETTER_RETENTION_SECONDS: u32 = 14 * 24 * 60 * 60;

/// How to reach the SQS endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqsSettings {
    /// `http://host:port` of the SQS API.
    pub endpoint: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// Attempts per call, the first included (the SDK's standard retry mode
    /// with backoff). 1 turns retries off.
    pub max_attempts: u32,
}

impl Default for SqsSettings {
    /// The local defaults, ignoring the environment.
    fn default() -> Self {
        Self {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            region: DEFAULT_REGION.to_owned(),
            access_key: "x".to_owned(),
            secret_key: "x".to_owned(),
            max_attempts: 3,
        }
    }
}

impl SqsSettings {
    /// `EO_SQS_ENDPOINT` (else `http://127.0.0.1:$EO_SQS_PORT`, else the
    /// default), `EO_SQS_REGION`, `EO_SQS_ACCESS_KEY`, `EO_SQS_SECRET_KEY`.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let defaults = Self::default();
        let endpoint = var("EO_SQS_ENDPOINT")
            .or_else(|| var("EO_SQS_PORT").map(|port| format!("http://127.0.0.1:{port}")))
            .unwrap_or(defaults.endpoint);
        Self {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            region: var("EO_SQS_REGION").unwrap_or(defaults.region),
            access_key: var("EO_SQS_ACCESS_KEY").unwrap_or(defaults.access_key),
            secret_key: var("EO_SQS_SECRET_KEY").unwrap_or(defaults.secret_key),
            max_attempts: defaults.max_attempts,
        }
    }
}

/// One work queue and its dead-letter queue `<queue>-dlq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqsTopology {
    /// 1 to 76 characters of `[A-Za-z0-9_-]` (SQS allows 80, the DLQ's
    /// suffix takes 4). [`queue_name`] turns any name into a valid one.
    pub queue: String,
    /// How long a received message stays hidden before it is handed out
    /// again. Whole seconds (rounded up), at most 12 hours.
    pub visibility_timeout: Duration,
    /// After this many receives without a delete, the queue's redrive policy
    /// moves the message to the DLQ. 1 to 1000.
    pub max_receive_count: u32,
}

impl SqsTopology {
    pub fn new(
        queue: impl Into<String>,
        visibility_timeout: Duration,
        max_receive_count: u32,
    ) -> Self {
        Self {
            queue: queue.into(),
            visibility_timeout,
            max_receive_count,
        }
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}{DEAD_LETTER_SUFFIX}", self.queue)
    }

    /// Checks what SQS would refuse, before asking it.
    pub fn validate(&self) -> Result<(), QueueError> {
        let invalid = |reason: String| QueueError::Broker {
            operation: "validate topology",
            reason,
        };
        let name = &self.queue;
        if name.is_empty() || name.len() + DEAD_LETTER_SUFFIX.len() > MAX_QUEUE_NAME {
            return Err(invalid(format!(
                "queue name {name:?} must have 1 to {} characters (SQS allows {MAX_QUEUE_NAME}, \
                 the dead-letter queue adds {DEAD_LETTER_SUFFIX:?})",
                MAX_QUEUE_NAME - DEAD_LETTER_SUFFIX.len()
            )));
        }
        if let Some(bad) = name.chars().find(|c| !is_queue_name_char(*c)) {
            return Err(invalid(format!(
                "queue name {name:?} contains {bad:?}: SQS allows only A-Z, a-z, 0-9, '-' and '_' \
                 (queue::sqs::queue_name turns any name into a valid one)"
            )));
        }
        if self.visibility_timeout > MAX_VISIBILITY {
            return Err(invalid(format!(
                "visibility timeout {:?} is longer than SQS's maximum of 12 hours",
                self.visibility_timeout
            )));
        }
        if !(1..=1000).contains(&self.max_receive_count) {
            return Err(invalid(format!(
                "max_receive_count {} is outside SQS's 1..=1000",
                self.max_receive_count
            )));
        }
        Ok(())
    }
}

fn is_queue_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Turns any name (`eo.ch05.payments`) into a valid SQS queue name
/// (`eo-ch05-payments`): every character SQS refuses becomes `-`. Names
/// longer than SQS allows are left long, so that [`SqsTopology::validate`]
/// reports them instead of two names silently colliding.
pub fn queue_name(raw: &str) -> String {
    raw.chars()
        .map(|c| if is_queue_name_char(c) { c } else { '-' })
        .collect()
}

/// Per-receiver settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveSettings {
    /// Hide each received message this long instead of the queue's
    /// [`SqsTopology::visibility_timeout`] (`VisibilityTimeout` on the
    /// receive; whole seconds, rounded up).
    pub visibility_timeout: Option<Duration>,
}

/// One SQS client: cheap to clone, shared by every publisher, receiver and
/// inspector made from it. SQS has no connection state to lose: each call is
/// an HTTP request of its own.
#[derive(Clone)]
pub struct SqsBroker {
    client: Client,
    endpoint: String,
}

impl SqsBroker {
    /// From [`SqsSettings::from_env`], checking that the endpoint answers.
    pub async fn connect() -> Result<Self, QueueError> {
        Self::connect_with(SqsSettings::from_env()).await
    }

    /// With explicit settings, checking that the endpoint answers
    /// (`ListQueues`), so a server that is down is reported here and not at
    /// the first receive.
    pub async fn connect_with(settings: SqsSettings) -> Result<Self, QueueError> {
        let broker = Self::new(settings);
        broker
            .client
            .list_queues()
            .max_results(1)
            .send()
            .await
            .map_err(|e| broker.error("ListQueues", e))?;
        Ok(broker)
    }

    /// Without contacting the server: the first call reports whether it is up.
    pub fn new(settings: SqsSettings) -> Self {
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(settings.endpoint.clone())
            .region(Region::new(settings.region))
            .credentials_provider(Credentials::new(
                settings.access_key,
                settings.secret_key,
                None,
                None,
                "queue::sqs::SqsSettings",
            ))
            // Plain HTTP on hyper 1, no TLS stack compiled in. `build_http`
            // is public but doc(hidden) in aws-smithy-http-client (its own
            // tests use it); should it go, enable aws-sdk-sqs's default
            // features and drop this line.
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    // Longer than the longest long poll (20 s).
                    .operation_attempt_timeout(MAX_WAIT + Duration::from_secs(10))
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1)))
            .build();
        Self {
            client: Client::from_conf(config),
            endpoint: settings.endpoint,
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The SDK client, for what this module does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn error<E, R>(&self, operation: &'static str, error: SdkError<E, R>) -> QueueError
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
        R: std::fmt::Debug,
    {
        sdk_error(&self.endpoint, operation, error)
    }

    /// The URL of an existing queue.
    pub async fn queue_url(&self, queue: &str) -> Result<String, QueueError> {
        let output = self
            .client
            .get_queue_url()
            .queue_name(queue)
            .send()
            .await
            .map_err(|e| self.error("GetQueueUrl", e))?;
        output.queue_url.ok_or_else(|| QueueError::Broker {
            operation: "GetQueueUrl",
            reason: format!("no URL returned for queue {queue:?}"),
        })
    }

    /// The URL, or `None` when the queue does not exist.
    async fn queue_url_if_exists(&self, queue: &str) -> Result<Option<String>, QueueError> {
        match self.client.get_queue_url().queue_name(queue).send().await {
            Ok(output) => Ok(output.queue_url),
            Err(error) if is_missing_queue(&error) => Ok(None),
            Err(error) => Err(self.error("GetQueueUrl", error)),
        }
    }

    /// Creates the dead-letter queue, then the queue with its visibility
    /// timeout and a redrive policy pointing at the DLQ. Idempotent: declaring
    /// again with the same settings changes nothing and keeps the messages;
    /// with different settings SQS refuses (`QueueAlreadyExists`).
    pub async fn declare(&self, topology: &SqsTopology) -> Result<(), QueueError> {
        topology.validate()?;
        let dlq_url = self
            .client
            .create_queue()
            .queue_name(topology.dead_letter_queue())
            .attributes(
                QueueAttributeName::MessageRetentionPeriod,
                DEAD_LETTER_RETENTION_SECONDS.to_string(),
            )
            .send()
            .await
            .map_err(|e| self.error("CreateQueue", e))?
            .queue_url
            .ok_or_else(|| QueueError::broker("CreateQueue", "no queue URL returned"))?;
        let dlq_arn = self
            .client
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| self.error("GetQueueAttributes", e))?
            .attributes
            .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
            .ok_or_else(|| {
                QueueError::broker(
                    "GetQueueAttributes",
                    "the dead-letter queue has no QueueArn",
                )
            })?;
        let redrive_policy = format!(
            r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":{}}}"#,
            topology.max_receive_count
        );
        self.client
            .create_queue()
            .queue_name(&topology.queue)
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                whole_seconds(topology.visibility_timeout).to_string(),
            )
            .attributes(QueueAttributeName::RedrivePolicy, redrive_policy)
            .send()
            .await
            .map_err(|e| self.error("CreateQueue", e))?;
        Ok(())
    }

    /// Deletes the queue and its DLQ, with every message in them. A queue
    /// that does not exist is not an error.
    pub async fn delete(&self, topology: &SqsTopology) -> Result<(), QueueError> {
        for queue in [topology.queue.clone(), topology.dead_letter_queue()] {
            let Some(url) = self.queue_url_if_exists(&queue).await? else {
                continue;
            };
            match self.client.delete_queue().queue_url(url).send().await {
                Ok(_) => {}
                Err(error) if is_missing_queue(&error) => {}
                Err(error) => return Err(self.error("DeleteQueue", error)),
            }
        }
        Ok(())
    }

    /// A publisher to the (existing) queue.
    pub async fn publisher(&self, topology: &SqsTopology) -> Result<SqsPublisher, QueueError> {
        topology.validate()?;
        Ok(SqsPublisher {
            queue_url: self.queue_url(&topology.queue).await?,
            broker: self.clone(),
        })
    }

    /// A receiver of the (existing) queue.
    pub async fn receiver(
        &self,
        topology: &SqsTopology,
        settings: ReceiveSettings,
    ) -> Result<SqsReceiver, QueueError> {
        topology.validate()?;
        if let Some(visibility) = settings.visibility_timeout {
            if visibility > MAX_VISIBILITY {
                return Err(QueueError::broker(
                    "validate receive settings",
                    format!("visibility timeout {visibility:?} is longer than 12 hours"),
                ));
            }
        }
        Ok(SqsReceiver {
            queue_url: self.queue_url(&topology.queue).await?,
            broker: self.clone(),
            topology: topology.clone(),
            settings,
        })
    }

    /// Hides a received message for `seconds` from now
    /// (`ChangeMessageVisibility`; 0 makes it visible at once).
    async fn change_visibility(
        &self,
        queue_url: &str,
        delivery: &Delivery,
        seconds: i32,
    ) -> Result<(), QueueError> {
        self.client
            .change_message_visibility()
            .queue_url(queue_url)
            .receipt_handle(SqsReceiver::receipt_handle(delivery)?)
            .visibility_timeout(seconds)
            .send()
            .await
            .map_err(|e| self.error("ChangeMessageVisibility", e))?;
        Ok(())
    }

    /// Looks at the queue and its DLQ from the outside. Resolves the queue
    /// URLs on each look, so it may be made before [`SqsBroker::declare`].
    pub fn inspector(&self, topology: &SqsTopology) -> SqsInspector {
        SqsInspector {
            broker: self.clone(),
            topology: topology.clone(),
        }
    }
}

/// Maps an SDK error: a server that cannot be reached is a
/// [`QueueError::Connect`] (which says to run `scripts/services-up`), anything
/// the server answered is a [`QueueError::Broker`] with the SDK's full text.
fn sdk_error<E, R>(endpoint: &str, operation: &'static str, error: SdkError<E, R>) -> QueueError
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    let unreachable = match &error {
        SdkError::DispatchFailure(failure) => failure.is_io() || failure.is_timeout(),
        SdkError::TimeoutError(_) => true,
        _ => false,
    };
    // What the server said; anything else (connection, timeout, signing)
    // with its chain of causes. Both without the raw response and the Debug
    // dump that the SDK's `DisplayErrorContext` appends.
    let reason = match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => error_chain(&error),
    };
    if is_stale_receipt(&error) {
        return QueueError::LeaseExpired { operation, reason };
    }
    if unreachable {
        QueueError::Connect {
            url: telemetry::redact::redact_url(endpoint),
            reason: format!("{operation}: {reason}"),
        }
    } else {
        QueueError::Broker { operation, reason }
    }
}

/// `outer: cause: root cause`, skipping a cause whose text its parent
/// already repeats.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// SQS answers `AWS.SimpleQueueService.NonExistentQueue` in its
/// query-compatibility header, which the SDK maps to `QueueDoesNotExist`;
/// ElasticMQ sends only the JSON error type, which the SDK leaves unmapped.
/// Both are the same answer.
fn is_missing_queue<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> bool {
    matches!(
        error.code(),
        Some("QueueDoesNotExist" | "AWS.SimpleQueueService.NonExistentQueue")
    )
}

/// The receipt handle belongs to an earlier receive: the visibility timeout
/// ran out and the message was received again (ElasticMQ refuses the old
/// handle; SQS may accept it and do nothing), or it is already deleted.
fn is_stale_receipt<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> bool {
    error
        .code()
        .is_some_and(|code| STALE_RECEIPT_CODES.contains(&code))
}

/// The error codes of a receipt handle that a later receive replaced.
const STALE_RECEIPT_CODES: [&str; 4] = [
    "ReceiptHandleIsInvalid",
    "AWS.SimpleQueueService.ReceiptHandleIsInvalid",
    "MessageNotInflight",
    "AWS.SimpleQueueService.MessageNotInflight",
];

/// Whole seconds, rounded up (SQS takes whole seconds), capped at 12 hours.
fn whole_seconds(duration: Duration) -> i32 {
    let capped = duration.min(MAX_VISIBILITY);
    let seconds = capped.as_secs() + u64::from(capped.subsec_nanos() > 0);
    i32::try_from(seconds).unwrap_or(i32::MAX)
}

/// The attributes a dead letter carries, fitted around a body of
/// `body_bytes` so that the whole message stays within
/// [`MAX_MESSAGE_BYTES`]. In order of what an operator needs most: the
/// reason (shortened at a character boundary when it does not fit whole,
/// left out when not even a short one fits), the message id, the original
/// queue. The body is never touched: without it the dead letter is useless.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterAttributes {
    pub reason: Option<String>,
    pub message_id: Option<String>,
    pub original_queue: Option<String>,
}

impl DeadLetterAttributes {
    fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            (DEAD_LETTER_REASON_ATTRIBUTE, self.reason.as_deref()),
            (MESSAGE_ID_ATTRIBUTE, self.message_id.as_deref()),
            (ORIGINAL_QUEUE_ATTRIBUTE, self.original_queue.as_deref()),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|value| (name, value)))
    }

    /// Bytes these attributes add to a message, as SQS counts them.
    pub fn size(&self) -> usize {
        self.pairs()
            .map(|(name, value)| attribute_size(name, value))
            .sum()
    }
}

/// One String attribute's share of the message size: name, type, value.
fn attribute_size(name: &str, value: &str) -> usize {
    name.len() + STRING_TYPE.len() + value.len()
}

pub fn dead_letter_attributes(
    body_bytes: usize,
    reason: &str,
    message_id: Option<&str>,
    original_queue: &str,
) -> DeadLetterAttributes {
    let mut budget = MAX_MESSAGE_BYTES.saturating_sub(body_bytes);
    // SQS refuses empty attribute values: nothing to say, no attribute.
    let mut take = |name: &str, value: &str, shorten: bool| -> Option<String> {
        if value.is_empty() {
            return None;
        }
        let whole = attribute_size(name, value);
        if whole <= budget {
            budget -= whole;
            return Some(value.to_owned());
        }
        let room = budget.checked_sub(name.len() + STRING_TYPE.len() + TRUNCATED.len())?;
        if !shorten || room < 16 {
            return None;
        }
        let mut cut = room.min(value.len());
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        let shortened = format!("{}{TRUNCATED}", &value[..cut]);
        budget -= attribute_size(name, &shortened);
        Some(shortened)
    };
    DeadLetterAttributes {
        reason: take(DEAD_LETTER_REASON_ATTRIBUTE, reason, true),
        message_id: message_id.and_then(|id| take(MESSAGE_ID_ATTRIBUTE, id, false)),
        original_queue: take(ORIGINAL_QUEUE_ATTRIBUTE, original_queue, false),
    }
}

fn string_attribute(value: &str) -> Result<MessageAttributeValue, QueueError> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| QueueError::broker("MessageAttributeValue", e))
}

fn text_body(payload: &[u8], operation: &'static str) -> Result<String, QueueError> {
    String::from_utf8(payload.to_vec()).map_err(|_| QueueError::Broker {
        operation,
        reason: "the payload is not UTF-8 text, and an SQS message body must be".into(),
    })
}

pub struct SqsPublisher {
    broker: SqsBroker,
    queue_url: String,
}

impl SqsPublisher {
    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }
}

#[async_trait::async_trait]
impl crate::Publisher for SqsPublisher {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        let body = text_body(&message.payload, "SendMessage")?;
        let mut request = self
            .broker
            .client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body);
        // SQS refuses empty attribute values: no id, no attribute.
        if !message.message_id.is_empty() {
            request = request
                .message_attributes(MESSAGE_ID_ATTRIBUTE, string_attribute(&message.message_id)?);
        }
        // The 200 is the confirm: SQS has stored the message.
        request
            .send()
            .await
            .map_err(|e| self.broker.error("SendMessage", e))?;
        Ok(())
    }
}

pub struct SqsReceiver {
    broker: SqsBroker,
    queue_url: String,
    topology: SqsTopology,
    settings: ReceiveSettings,
}

impl SqsReceiver {
    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    fn receipt_handle(delivery: &Delivery) -> Result<&str, QueueError> {
        match &delivery.receipt {
            Receipt::ReceiptHandle(handle) => Ok(handle),
            other => Err(QueueError::ForeignReceipt(other.clone())),
        }
    }

    /// One `ReceiveMessage` call.
    async fn receive_once(
        &self,
        max: usize,
        wait_seconds: i32,
    ) -> Result<Vec<Delivery>, QueueError> {
        let output = self
            .broker
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(max.clamp(1, MAX_BATCH) as i32)
            .wait_time_seconds(wait_seconds)
            .set_visibility_timeout(self.settings.visibility_timeout.map(whole_seconds))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| self.broker.error("ReceiveMessage", e))?;
        output
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(to_delivery)
            .collect()
    }

    /// Deletes up to any number of deliveries, 10 per `DeleteMessageBatch`.
    /// Fails when any delete failed, naming each (the others are deleted):
    /// [`QueueError::LeaseExpired`] when every failure is a receipt that a
    /// later receive replaced, as for one delete.
    pub async fn delete_batch(&self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        let mut failures = Vec::new();
        let mut all_stale = true;
        for chunk in deliveries.chunks(MAX_BATCH) {
            let mut request = self
                .broker
                .client
                .delete_message_batch()
                .queue_url(&self.queue_url);
            for (i, delivery) in chunk.iter().enumerate() {
                request = request.entries(
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(Self::receipt_handle(delivery)?)
                        .build()
                        .map_err(|e| QueueError::broker("DeleteMessageBatch", e))?,
                );
            }
            let output = request
                .send()
                .await
                .map_err(|e| self.broker.error("DeleteMessageBatch", e))?;
            for failed in output.failed() {
                let who = failed
                    .id()
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| chunk.get(i))
                    .and_then(|d| d.message_id.clone())
                    .unwrap_or_else(|| format!("entry {}", failed.id()));
                all_stale &= STALE_RECEIPT_CODES.contains(&failed.code());
                failures.push(format!(
                    "{who}: {} {}",
                    failed.code(),
                    failed.message().unwrap_or_default()
                ));
            }
        }
        if failures.is_empty() {
            return Ok(());
        }
        let reason = format!(
            "{} of {} deletes failed: {}",
            failures.len(),
            deliveries.len(),
            failures.join("; ")
        );
        let operation = "DeleteMessageBatch";
        Err(if all_stale {
            QueueError::LeaseExpired { operation, reason }
        } else {
            QueueError::Broker { operation, reason }
        })
    }

    async fn change_visibility(&self, delivery: &Delivery, seconds: i32) -> Result<(), QueueError> {
        self.broker
            .change_visibility(&self.queue_url, delivery, seconds)
            .await
    }

    async fn delete(&self, delivery: &Delivery) -> Result<(), QueueError> {
        self.broker
            .client
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(Self::receipt_handle(delivery)?)
            .send()
            .await
            .map_err(|e| self.broker.error("DeleteMessage", e))?;
        Ok(())
    }
}

fn string_attribute_of(message: &Message, name: &str) -> Option<String> {
    message
        .message_attributes()
        .and_then(|attributes| attributes.get(name))
        .and_then(|value| value.string_value())
        .map(str::to_owned)
}

fn to_delivery(message: Message) -> Result<Delivery, QueueError> {
    let delivery_count = message
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|count| count.parse::<u32>().ok());
    let message_id = string_attribute_of(&message, MESSAGE_ID_ATTRIBUTE)
        .or_else(|| message.message_id().map(str::to_owned));
    let receipt_handle = message.receipt_handle.ok_or_else(|| {
        QueueError::broker(
            "ReceiveMessage",
            "a message arrived without a receipt handle",
        )
    })?;
    Ok(Delivery {
        payload: message.body.unwrap_or_default().into_bytes(),
        message_id,
        redelivered: delivery_count.is_some_and(|count| count > 1),
        delivery_count,
        receipt: Receipt::ReceiptHandle(receipt_handle),
    })
}

/// Extends visibility from a task of its own while the receiver's owner is
/// busy with the delivery: the visibility heartbeat.
struct SqsLeaseKeeper {
    broker: SqsBroker,
    queue_url: String,
}

#[async_trait::async_trait]
impl crate::LeaseKeeper for SqsLeaseKeeper {
    async fn extend(&self, delivery: &Delivery, by: Duration) -> Result<(), QueueError> {
        self.broker
            .change_visibility(&self.queue_url, delivery, whole_seconds(by))
            .await
    }
}

#[async_trait::async_trait]
impl crate::Receiver for SqsReceiver {
    /// A long poll: `WaitTimeSeconds` is whole seconds, so `wait` is rounded
    /// up (300 ms waits up to 1 s; zero is a short poll), and a wait longer
    /// than SQS's 20 s is several polls. At most 10 messages per call.
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let poll = remaining.min(MAX_WAIT);
            let batch = self.receive_once(max, whole_seconds(poll)).await?;
            if !batch.is_empty() || remaining <= MAX_WAIT {
                return Ok(batch);
            }
        }
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), QueueError> {
        self.delete(delivery).await
    }

    async fn ack_batch(&mut self, deliveries: &[Delivery]) -> Result<(), QueueError> {
        self.delete_batch(deliveries).await
    }

    /// Visible again at once (`ChangeMessageVisibility` to 0). The receive
    /// still counts: the next delivery has a higher receive count.
    async fn requeue(&mut self, delivery: &Delivery) -> Result<(), QueueError> {
        self.change_visibility(delivery, 0).await
    }

    async fn dead_letter(&mut self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        let receipt_handle = Self::receipt_handle(delivery)?.to_owned();
        let body = text_body(&delivery.payload, "SendMessage(dead letter)")?;
        // Resolved each time: a DLQ deleted behind our back fails here, before
        // anything happened to the original.
        let dlq_url = self
            .broker
            .queue_url(&self.topology.dead_letter_queue())
            .await?;
        // The body travels byte for byte; the attributes get what is left of
        // the 256 KiB (see `dead_letter_attributes`).
        let attributes = dead_letter_attributes(
            body.len(),
            reason,
            delivery.message_id.as_deref(),
            &self.topology.queue,
        );
        if attributes.reason.as_deref() != Some(reason) && !reason.is_empty() {
            tracing::warn!(
                body_bytes = body.len(),
                reason,
                "dead-letter reason shortened to fit SQS's 256 KiB with the body"
            );
        }
        let mut request = self
            .broker
            .client
            .send_message()
            .queue_url(dlq_url)
            .message_body(body);
        for (name, value) in attributes.pairs() {
            request = request.message_attributes(name, string_attribute(value)?);
        }
        // Copy first, delete second: if we die in between, the message is in
        // both queues, which is a duplicate in the DLQ, never a loss.
        request.send().await.map_err(|error| {
            let error = self.broker.error("SendMessage(dead letter)", error);
            match error {
                // The DLQ refused the copy itself: the original stays where it
                // is, and the consumer must not die of it.
                QueueError::Broker { reason, .. } => QueueError::DeadLetterRefused { reason },
                other => other,
            }
        })?;
        self.broker
            .client
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt_handle)
            .send()
            .await
            .map_err(|e| self.broker.error("DeleteMessage", e))?;
        Ok(())
    }

    /// Keeps the message hidden for `by` from now (`ChangeMessageVisibility`;
    /// whole seconds, rounded up, at most 12 hours). It replaces the current
    /// deadline rather than adding to it, as SQS does.
    async fn extend_lease(&mut self, delivery: &Delivery, by: Duration) -> Result<(), QueueError> {
        self.change_visibility(delivery, whole_seconds(by)).await
    }

    fn lease_keeper(&self) -> Option<std::sync::Arc<dyn crate::LeaseKeeper>> {
        Some(std::sync::Arc::new(SqsLeaseKeeper {
            broker: self.broker.clone(),
            queue_url: self.queue_url.clone(),
        }))
    }
}

/// A message as it sits in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The reason given to `dead_letter`; empty for a message the redrive
    /// policy moved (SQS gives no reason).
    pub reason: String,
    pub payload: Vec<u8>,
    /// The publisher's message id where it travelled along, else SQS's.
    pub message_id: Option<String>,
    /// How often the DLQ copy has been received (peeks included).
    pub receive_count: Option<u32>,
}

pub struct SqsInspector {
    broker: SqsBroker,
    topology: SqsTopology,
}

impl SqsInspector {
    async fn counts(&self, queue: &str) -> Result<QueueCounts, QueueError> {
        let url = self.broker.queue_url(queue).await?;
        let attributes = self
            .broker
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| self.broker.error("GetQueueAttributes", e))?
            .attributes
            .unwrap_or_default();
        let count = |name: QueueAttributeName| -> Result<u64, QueueError> {
            parse_count(&attributes, &name)
        };
        Ok(QueueCounts {
            visible: count(QueueAttributeName::ApproximateNumberOfMessages)?,
            in_flight: count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?,
        })
    }

    /// Messages received but neither deleted nor visible again yet
    /// (`ApproximateNumberOfMessagesNotVisible`). A drained SQS run needs
    /// this and [`QueueInspector::ready_count`] both at 0.
    pub async fn in_flight(&self) -> Result<u64, QueueError> {
        Ok(self.counts(&self.topology.queue).await?.in_flight)
    }

    /// Nothing visible and nothing in flight, from one look: what a drained
    /// run needs on SQS.
    pub async fn is_empty(&self) -> Result<bool, QueueError> {
        let counts = self.counts(&self.topology.queue).await?;
        Ok(counts.visible == 0 && counts.in_flight == 0)
    }

    /// Up to `max` (at most 10: one receive) reasons and payloads from the
    /// DLQ, without hiding them: they are received with a visibility timeout
    /// of 0, so they stay visible and are seen again by the next peek.
    pub async fn peek_dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let url = self
            .broker
            .queue_url(&self.topology.dead_letter_queue())
            .await?;
        let output = self
            .broker
            .client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(max.min(MAX_BATCH) as i32)
            .visibility_timeout(0)
            .wait_time_seconds(0)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| self.broker.error("ReceiveMessage(peek)", e))?;
        Ok(output
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(|message| DeadLetter {
                reason: string_attribute_of(&message, DEAD_LETTER_REASON_ATTRIBUTE)
                    .unwrap_or_default(),
                message_id: string_attribute_of(&message, MESSAGE_ID_ATTRIBUTE)
                    .or_else(|| message.message_id().map(str::to_owned)),
                receive_count: message
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|count| count.parse().ok()),
                payload: message.body.unwrap_or_default().into_bytes(),
            })
            .collect())
    }
}

struct QueueCounts {
    visible: u64,
    in_flight: u64,
}

fn parse_count(
    attributes: &HashMap<QueueAttributeName, String>,
    name: &QueueAttributeName,
) -> Result<u64, QueueError> {
    let value = attributes.get(name).ok_or_else(|| {
        QueueError::broker("GetQueueAttributes", format!("{} missing", name.as_str()))
    })?;
    value.parse().map_err(|_| {
        QueueError::broker(
            "GetQueueAttributes",
            format!("{} is not a count: {value:?}", name.as_str()),
        )
    })
}

#[async_trait::async_trait]
impl QueueInspector for SqsInspector {
    /// Visible messages (`ApproximateNumberOfMessages`); those held by
    /// consumers are [`SqsInspector::in_flight`].
    async fn ready_count(&self) -> Result<u64, QueueError> {
        Ok(self.counts(&self.topology.queue).await?.visible)
    }

    /// Every message in the DLQ, visible or not (nothing should be receiving
    /// from it but a peek, which hides nothing).
    async fn dead_letter_count(&self) -> Result<u64, QueueError> {
        let counts = self.counts(&self.topology.dead_letter_queue()).await?;
        Ok(counts.visible + counts.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_seconds_rounds_up_and_caps() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(86_400)), 43_200);
    }

    #[test]
    fn queue_names_are_sanitised_and_validated() {
        assert_eq!(queue_name("eo.ch05.payments"), "eo-ch05-payments");
        assert_eq!(queue_name("a_b-C9"), "a_b-C9");
        let topology = |name: &str| SqsTopology::new(name, Duration::from_secs(30), 5);
        assert!(topology("eo-ch05-payments").validate().is_ok());
        assert!(topology("eo.ch05").validate().is_err());
        assert!(topology("").validate().is_err());
        assert!(topology(&"q".repeat(76)).validate().is_ok());
        assert!(topology(&"q".repeat(77)).validate().is_err());
        let mut bad = topology("ok");
        bad.max_receive_count = 0;
        assert!(bad.validate().is_err());
        bad.max_receive_count = 1001;
        assert!(bad.validate().is_err());
        let mut slow = topology("ok");
        slow.visibility_timeout = Duration::from_secs(43_201);
        assert!(slow.validate().is_err());
    }

    #[test]
    fn a_dead_letter_of_a_small_body_keeps_every_attribute() {
        let attributes = dead_letter_attributes(100, "bad amount", Some("m-1"), "eo-q");
        assert_eq!(attributes.reason.as_deref(), Some("bad amount"));
        assert_eq!(attributes.message_id.as_deref(), Some("m-1"));
        assert_eq!(attributes.original_queue.as_deref(), Some("eo-q"));
        let empty = dead_letter_attributes(100, "", Some(""), "eo-q");
        assert_eq!((empty.reason, empty.message_id), (None, None));
    }

    #[test]
    fn a_maximal_body_leaves_no_room_and_the_body_wins() {
        let reason = "undecodable payment event: ".repeat(20);
        let full = dead_letter_attributes(MAX_MESSAGE_BYTES, &reason, Some("m-1"), "eo-q");
        assert_eq!(full.size(), 0, "{full:?}");
        assert_eq!(full.reason, None);

        // Near the limit: the reason is shortened, and the total never
        // exceeds 256 KiB, whatever the body's size.
        for body in (MAX_MESSAGE_BYTES - 400)..=MAX_MESSAGE_BYTES {
            let fitted = dead_letter_attributes(body, &reason, Some("m-1"), "eo-q");
            assert!(body + fitted.size() <= MAX_MESSAGE_BYTES, "body {body}");
        }
        let near = dead_letter_attributes(MAX_MESSAGE_BYTES - 200, &reason, Some("m-1"), "eo-q");
        let shortened = near.reason.expect("a shortened reason fits in 200 bytes");
        assert!(shortened.ends_with(TRUNCATED), "{shortened}");
        assert!(shortened.starts_with("undecodable payment event: "));
    }

    #[test]
    fn a_shortened_reason_is_cut_at_a_character_boundary() {
        let reason = "é".repeat(1000);
        for body in (MAX_MESSAGE_BYTES - 300)..(MAX_MESSAGE_BYTES - 100) {
            let fitted = dead_letter_attributes(body, &reason, None, "q");
            // Building the String would have panicked on a split character.
            assert!(body + fitted.size() <= MAX_MESSAGE_BYTES);
        }
    }

    #[test]
    fn settings_default_to_the_local_elasticmq() {
        let settings = SqsSettings::default();
        assert_eq!(settings.endpoint, "http://127.0.0.1:9324");
        assert_eq!(settings.region, "elasticmq");
        assert_eq!(
            (settings.access_key.as_str(), settings.secret_key.as_str()),
            ("x", "x")
        );
    }
}
