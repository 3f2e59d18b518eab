//! Bad input from outside: what the hardened consumer does with each kind
//! of message a plain client can publish, on one broker.
//!
//! Every [`Case`] gets a queue of its own on the broker, published to the
//! way any client would (the queue seam's plain publish, or raw AMQP for a
//! header), and one hardened consumer in this process handles what arrives.
//! The outcome is measured, not assumed: the consumer's settle, the
//! dead-letter queue's copy (reason and body, byte for byte), and the PSP's
//! ledger for the order. [`run`] returns one [`Row`] per case; a row whose
//! outcome differs from the case's expectation says so, and the binary
//! `bad-inputs` fails on it, so the book's table cannot drift.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use consumer::crash::NeverCrash;
use consumer::observe::{Outcome, Unobserved};
use consumer::{PaymentConsumer, Variant};
use databases::FreshDatabase;
use payments::PaymentEvent;
use psp::{PspConfig, PspServer, RunningPsp};
use queue::backend::{BackendKind, Broker, QueueSpec};
use queue::{OutgoingMessage, QueueError};
use uuid::Uuid;

/// SQS's limit on one message; the table uses it on both brokers
/// (RabbitMQ's own default limit is 128 MiB).
pub const SIZE_LIMIT: usize = queue::sqs::MAX_MESSAGE_BYTES;

/// One message as a plain client publishes it.
#[derive(Debug, Clone)]
pub struct Input {
    pub payload: Vec<u8>,
    /// Empty: published without a message id (on SQS, without any message
    /// attribute, so the body alone may use the whole size limit).
    pub message_id: String,
    /// RabbitMQ: an `x-delivery-count` header set by the publisher.
    pub delivery_count_header: Option<i64>,
}

impl Input {
    fn body(payload: impl Into<Vec<u8>>) -> Self {
        Self {
            payload: payload.into(),
            message_id: Uuid::new_v4().to_string(),
            delivery_count_header: None,
        }
    }

    fn event(event: &PaymentEvent) -> Self {
        Self {
            payload: event.encode(),
            message_id: event.event_id.to_string(),
            delivery_count_header: None,
        }
    }
}

/// What should become of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Dead-lettered, with a reason that contains this text.
    DeadLettered(&'static str),
    /// Charged, recorded and acked.
    Charged,
    /// Acked as a duplicate: nothing charged.
    Duplicate,
    /// The broker's client refuses to publish it.
    RefusedAtPublish,
}

/// One row of the table: messages published one after the other, each
/// handled before the next is published.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    pub inputs: Vec<Input>,
    pub expect: Vec<Expect>,
    /// The order whose ledger rows are counted, with the count expected.
    pub ledger: Option<(Uuid, usize)>,
    /// Which brokers the case applies to, with why not where it does not.
    pub not_on: Option<(BackendKind, &'static str)>,
}

/// What a case measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub name: &'static str,
    /// One text per message: "dead-lettered: <reason>", "charged", ...
    pub outcomes: Vec<String>,
    /// The reason the dead-letter queue's copy carries, where it differs
    /// from the consumer's (SQS leaves it out when the body fills 256 KiB).
    pub dead_letter_notes: Vec<String>,
    /// Ledger rows the case added at the PSP, all orders together.
    pub charges: Option<i64>,
    /// Empty when the outcome is the expected one.
    pub deviations: Vec<String>,
}

/// Ids fixed per case, so the table reads the same on every run (each run
/// has fresh databases and queues, so nothing collides).
fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0000 | n)
}

fn event(n: u128, amount_cents: i64, currency: &str) -> PaymentEvent {
    let created_at: DateTime<Utc> = "2026-11-27T10:15:00Z".parse().expect("a timestamp");
    PaymentEvent {
        event_id: id(0xe000 + n),
        ..PaymentEvent::new(id(n), amount_cents, currency, created_at)
    }
}

/// `event` as JSON with `field` replaced by `value` (or removed, for null).
fn with_field(field: &str, value: serde_json::Value) -> Vec<u8> {
    let mut json = serde_json::to_value(event(0, 4200, "EUR")).expect("json");
    if value.is_null() {
        json.as_object_mut().expect("an object").remove(field);
    } else {
        json[field] = value;
    }
    serde_json::to_vec(&json).expect("json")
}

/// `json` padded with spaces to exactly `size` bytes: still the same JSON.
fn padded(mut json: Vec<u8>, size: usize) -> Vec<u8> {
    json.resize(size, b' ');
    json
}

/// The rows of the book's table, in its order.
pub fn cases() -> Vec<Case> {
    let one = |name, input: Input, expect: Expect| Case {
        name,
        inputs: vec![input],
        expect: vec![expect],
        ledger: None,
        not_on: None,
    };
    let mut cases = vec![
        one(
            "invalid JSON",
            Input::body(r#"{"event_id": "6f1c2a9e"#),
            Expect::DeadLettered("not a payment event: EOF while parsing"),
        ),
        one(
            "missing field (`currency`)",
            Input::body(with_field("currency", serde_json::Value::Null)),
            Expect::DeadLettered("missing field `currency`"),
        ),
        one(
            "wrong type (`amount_cents` as a string)",
            Input::body(with_field("amount_cents", "4200".into())),
            Expect::DeadLettered("invalid type: string \"4200\", expected i64"),
        ),
        one(
            "negative amount",
            Input::body(with_field("amount_cents", (-500).into())),
            Expect::DeadLettered("amount_cents must be between 1 and 100000000, got -500"),
        ),
        one(
            "zero amount",
            Input::body(with_field("amount_cents", 0.into())),
            Expect::DeadLettered("amount_cents must be between 1 and 100000000, got 0"),
        ),
        one(
            "absurd amount (10^12 cents)",
            Input::body(with_field("amount_cents", 1_000_000_000_000_i64.into())),
            Expect::DeadLettered("amount_cents must be between 1 and 100000000, got 1000000000000"),
        ),
        one(
            "unknown currency `QQQ`",
            Input::body(with_field("currency", "QQQ".into())),
            Expect::DeadLettered("unknown currency QQQ (not an ISO 4217 code)"),
        ),
    ];

    // At the size limit: the body alone is 256 KiB (JSON padded with
    // spaces), published without attributes.
    let big = event(2, 4200, "EUR");
    cases.push(Case {
        ledger: Some((big.order_id, 1)),
        ..one(
            "valid event, body at the size limit (256 KiB)",
            Input {
                payload: padded(big.encode(), SIZE_LIMIT),
                message_id: String::new(),
                delivery_count_header: None,
            },
            Expect::Charged,
        )
    });
    cases.push(one(
        "invalid event, body at the size limit (256 KiB)",
        Input {
            payload: padded(with_field("amount_cents", 0.into()), SIZE_LIMIT),
            message_id: String::new(),
            delivery_count_header: None,
        },
        Expect::DeadLettered("amount_cents must be between 1 and 100000000, got 0"),
    ));

    let mut not_utf8 = one(
        "not UTF-8",
        Input::body(vec![0xff, 0xfe, b'{', 0x80]),
        Expect::DeadLettered("not a payment event"),
    );
    not_utf8.not_on = Some((
        BackendKind::Sqs,
        "refused at publish: an SQS message body is text",
    ));
    cases.push(not_utf8);

    // The same event id, another amount: the second is a producer bug.
    let first = event(3, 4200, "EUR");
    let mut altered = first.clone();
    altered.amount_cents = 4300;
    cases.push(Case {
        name: "reused event id, other amount",
        inputs: vec![Input::event(&first), Input::event(&altered)],
        expect: vec![
            Expect::Charged,
            Expect::DeadLettered("dedup fingerprint mismatch: event"),
        ],
        ledger: Some((first.order_id, 1)),
        not_on: None,
    });

    // One order, a second event under a fresh event id.
    let order = event(4, 4200, "EUR");
    let mut again = order.clone();
    again.event_id = id(0xe100);
    cases.push(Case {
        name: "second event for one order (fresh event id)",
        inputs: vec![Input::event(&order), Input::event(&again)],
        expect: vec![Expect::Charged, Expect::Duplicate],
        ledger: Some((order.order_id, 1)),
        not_on: None,
    });
    let order = event(5, 4200, "EUR");
    let mut other = order.clone();
    other.event_id = id(0xe101);
    other.amount_cents = 9900;
    cases.push(Case {
        name: "second event for one order, other amount",
        inputs: vec![Input::event(&order), Input::event(&other)],
        expect: vec![
            Expect::Charged,
            Expect::DeadLettered("dedup fingerprint mismatch: order"),
        ],
        ledger: Some((order.order_id, 1)),
        not_on: None,
    });

    let counted = event(6, 4200, "EUR");
    cases.push(Case {
        name: "valid event with a publisher-set `x-delivery-count: 99`",
        inputs: vec![Input {
            delivery_count_header: Some(99),
            ..Input::event(&counted)
        }],
        expect: vec![Expect::Charged],
        ledger: Some((counted.order_id, 1)),
        not_on: Some((
            BackendKind::Sqs,
            "n/a: SQS's receive count is a system attribute no publisher can set",
        )),
    });
    cases
}

/// The services one backend's cases share.
struct Services {
    shop: FreshDatabase,
    psp_db: FreshDatabase,
    psp: RunningPsp,
    broker: Broker,
}

impl Services {
    async fn start(backend: BackendKind) -> anyhow::Result<Self> {
        let shop = FreshDatabase::create("bad_input_shop", 4).await?;
        consumer::migrate(&shop.pool).await?;
        let psp_db = FreshDatabase::create("bad_input_psp", 4).await?;
        let psp = PspServer::start(psp_db.pool.clone(), PspConfig::default(), "127.0.0.1:0")
            .await
            .context("starting the PSP")?;
        let broker = Broker::connect(backend).await?;
        Ok(Self {
            shop,
            psp_db,
            psp,
            broker,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.psp.shutdown().await?;
        self.shop.drop_database().await?;
        self.psp_db.drop_database().await?;
        Ok(())
    }

    fn consumer(&self) -> anyhow::Result<PaymentConsumer> {
        Ok(PaymentConsumer {
            variant: Variant::Hardened,
            pool: self.shop.pool.clone(),
            psp: self.psp.client(Duration::from_secs(5))?,
            crashes: Arc::new(NeverCrash),
            observer: Arc::new(Unobserved),
            requeue_delay: Duration::from_millis(10),
            metrics: Default::default(),
            heartbeat: None,
            // As in every chaos run: the last receive the queue allows is
            // dead-lettered. A count no broker set must never reach it.
            max_receives: Some(10),
            batch_size: 1,
        })
    }
}

/// Runs every case of [`cases`] on `backend` and returns the measured rows.
pub async fn run(backend: BackendKind) -> anyhow::Result<Vec<Row>> {
    let services = Services::start(backend).await?;
    let mut rows = Vec::new();
    let mut failure = None;
    for case in cases() {
        match run_case(&services, backend, &case).await {
            Ok(row) => rows.push(row),
            Err(error) => {
                failure = Some(error.context(format!("case {:?}", case.name)));
                break;
            }
        }
    }
    services.stop().await?;
    match failure {
        Some(error) => Err(error),
        None => Ok(rows),
    }
}

async fn run_case(services: &Services, backend: BackendKind, case: &Case) -> anyhow::Result<Row> {
    let mut row = Row {
        name: case.name,
        outcomes: Vec::new(),
        dead_letter_notes: Vec::new(),
        charges: None,
        deviations: Vec::new(),
    };
    if let Some((_, why)) = case.not_on.filter(|(on, _)| *on == backend) {
        row.outcomes.push(why.to_owned());
        // Where the broker refuses the message, check that it does.
        if case.expect.first() != Some(&Expect::Charged) {
            let spec = QueueSpec::new(backend, format!("eo.bad.{}", Uuid::new_v4().simple()));
            services.broker.declare(&spec).await?;
            let published = publish(&services.broker, &spec, &case.inputs[0]).await;
            services.broker.delete(&spec).await?;
            if published.is_ok() {
                row.deviations
                    .push("expected the publish to be refused".to_owned());
            }
        }
        return Ok(row);
    }
    let spec = QueueSpec::new(backend, format!("eo.bad.{}", Uuid::new_v4().simple()));
    services.broker.declare(&spec).await?;
    let before = psp::ledger::total_charges(services.psp.pool()).await?;
    let result = run_declared(services, &spec, case, &mut row).await;
    services.broker.delete(&spec).await?;
    result?;
    let charges = psp::ledger::total_charges(services.psp.pool()).await? - before;
    row.charges = Some(charges);
    let expected = case
        .expect
        .iter()
        .filter(|e| **e == Expect::Charged)
        .count() as i64;
    if charges != expected {
        row.deviations
            .push(format!("{charges} charges at the PSP, expected {expected}"));
    }
    if let Some((order_id, expected)) = case.ledger {
        let rows = psp::ledger::charges_for_order(services.psp.pool(), &order_id.to_string())
            .await?
            .len();
        if rows != expected {
            row.deviations.push(format!(
                "{rows} ledger rows for the order, expected {expected}"
            ));
        }
    }
    Ok(row)
}

async fn run_declared(
    services: &Services,
    spec: &QueueSpec,
    case: &Case,
    row: &mut Row,
) -> anyhow::Result<()> {
    let consumer = services.consumer()?;
    let mut receiver = services.broker.receiver(spec, 1).await?;
    let mut dead_lettered = Vec::new();
    for (input, expect) in case.inputs.iter().zip(&case.expect) {
        if let Err(error) = publish(&services.broker, spec, input).await {
            row.outcomes.push(format!("refused at publish: {error}"));
            if *expect != Expect::RefusedAtPublish {
                row.deviations.push(format!("expected {expect:?}"));
            }
            continue;
        }
        let outcome = handle_one(&consumer, &mut *receiver).await?;
        let (text, matches) = match &outcome {
            Outcome::Charged { .. } => ("charged".to_owned(), *expect == Expect::Charged),
            Outcome::Duplicate => (
                "acked as a duplicate, not charged".to_owned(),
                *expect == Expect::Duplicate,
            ),
            Outcome::DeadLettered { reason } => {
                dead_lettered.push((input.payload.clone(), reason.clone()));
                (
                    format!("dead-lettered: {reason}"),
                    matches!(expect, Expect::DeadLettered(text) if reason.contains(text)),
                )
            }
            other => (format!("{other:?}"), false),
        };
        if !matches {
            row.deviations
                .push(format!("got {text:?}, expected {expect:?}"));
        }
        row.outcomes.push(text);
    }
    check_dead_letters(services, spec, &dead_lettered, row).await
}

/// Receives and handles exactly one delivery.
async fn handle_one(
    consumer: &PaymentConsumer,
    receiver: &mut dyn queue::Receiver,
) -> anyhow::Result<Outcome> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut batch = receiver.receive(1, Duration::from_secs(1)).await?;
        if let Some(delivery) = batch.pop() {
            return Ok(consumer.handle(receiver, delivery).await?);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "nothing arrived within 10 s"
        );
    }
}

/// Every dead letter is in the dead-letter queue with its body intact, and
/// with the consumer's reason where the broker had room for it.
async fn check_dead_letters(
    services: &Services,
    spec: &QueueSpec,
    expected: &[(Vec<u8>, String)],
    row: &mut Row,
) -> anyhow::Result<()> {
    let inspector = services.broker.inspector(spec)?;
    let letters = inspector.peek_dead_letters(10).await?;
    if letters.len() != expected.len() {
        row.deviations.push(format!(
            "{} messages in the dead-letter queue, expected {}",
            letters.len(),
            expected.len()
        ));
    }
    for (payload, reason) in expected {
        match letters.iter().find(|letter| &letter.payload == payload) {
            None => row
                .deviations
                .push("the dead-letter queue lost or changed the body".to_owned()),
            Some(letter) if letter.reason == *reason => {}
            Some(letter) if letter.reason.is_empty() => row.dead_letter_notes.push(
                "the body fills the 256 KiB: the copy carries no reason attribute (the reason is \
                 in the consumer's log)"
                    .to_owned(),
            ),
            Some(letter) => row.dead_letter_notes.push(format!(
                "the copy's reason is shortened: {:?}",
                letter.reason
            )),
        }
    }
    Ok(())
}

async fn publish(broker: &Broker, spec: &QueueSpec, input: &Input) -> Result<(), QueueError> {
    if let (Some(count), Broker::Rabbitmq(_)) = (input.delivery_count_header, broker) {
        return publish_with_delivery_count(&spec.name, &input.payload, count).await;
    }
    broker
        .publisher(spec)
        .await?
        .publish(&OutgoingMessage {
            key: "bad-input".to_owned(),
            message_id: input.message_id.clone(),
            payload: input.payload.clone(),
        })
        .await
}

/// A raw AMQP publish with an `x-delivery-count` header of the publisher's.
async fn publish_with_delivery_count(
    queue: &str,
    payload: &[u8],
    count: i64,
) -> Result<(), QueueError> {
    use lapin::types::{AMQPValue, FieldTable};
    let failed = |reason: lapin::Error| QueueError::Broker {
        operation: "basic.publish (raw)",
        reason: reason.to_string(),
    };
    let connection = lapin::Connection::connect(
        &queue::rabbitmq::url_from_env(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .map_err(failed)?;
    let channel = connection.create_channel().await.map_err(failed)?;
    channel
        .confirm_select(Default::default())
        .await
        .map_err(failed)?;
    let mut headers = FieldTable::default();
    headers.insert(
        queue::rabbitmq::DELIVERY_COUNT_HEADER.into(),
        AMQPValue::LongLongInt(count),
    );
    channel
        .basic_publish(
            "",
            queue,
            Default::default(),
            payload,
            lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .map_err(failed)?
        .await
        .map_err(failed)?;
    connection.close(200, "published").await.map_err(failed)?;
    Ok(())
}

/// The table for the book: one line per case.
pub fn markdown(backend: BackendKind, rows: &[Row]) -> String {
    let mut out = format!(
        "Broker `{}`; each input published by a plain client to a queue of its own and \
         handled by the hardened consumer; ledger rows counted from the PSP.\n\n\
         | input | what happened | charges at the PSP |\n|---|---|--:|\n",
        backend.name()
    );
    for row in rows {
        let mut what = row.outcomes.join("; then ");
        for note in &row.dead_letter_notes {
            what.push_str(&format!(" ({note})"));
        }
        let ledger = row.charges.map(|n| n.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            row.name,
            what.replace('|', "\\|"),
            ledger
        ));
    }
    out
}
