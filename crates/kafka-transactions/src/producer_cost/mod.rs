//! What the producer pays for each delivery guarantee, measured in one run
//! against the same broker.
//!
//! Seven modes, from the weakest promise to the strongest:
//!
//! | mode | what the broker promises |
//! |---|---|
//! | `acks=1` | the leader wrote it (a leader crash before replication loses it) |
//! | `acks=all` | every in-sync replica wrote it; a retried send may write it twice |
//! | idempotent | as `acks=all`, and the broker drops a retry's duplicate |
//! | transactional | as idempotent, and a reader with `read_committed` sees the record only once its transaction commits |
//!
//! Transactions are committed after every message, every 10 ms, every
//! 100 ms and every second: the interval is the knob that trades latency
//! for throughput. (A published figure to hold the result against:
//! Confluent measured about 3% less throughput for 1 KB records in 100 ms
//! transactions than for an at-least-once producer. The run reports what
//! it measures here, whatever that is.)
//!
//! # How it is measured, and why so
//!
//! Each mode, at each payload size, in each round, gets a fresh
//! 3-partition topic (deleted as soon as it has been measured), a new
//! producer, and three phases:
//!
//! 1. **Warm-up**, not timed: connections, metadata, the producer id, and
//!    `init_transactions` (about half a second the first time on a fresh
//!    broker).
//! 2. **Throughput**: flat out, keyed records (the key is the record's
//!    number, as an order id would be), until
//!    [`ProducerCostConfig::messages`] are sent or
//!    [`ProducerCostConfig::time_cap`] has passed. Throughput counts the
//!    records that counted (acknowledged; for transactions, committed) from
//!    the first send to the last acknowledgement or commit; MB/s counts
//!    payload bytes (MB = 10⁶ bytes). The sender keeps at most
//!    [`ProducerCostConfig::max_in_flight`] records unacknowledged: enough
//!    that the broker, not the window, is the limit, and bounded so the run
//!    does not sit in the client's queue.
//! 3. **Latency**: at a steady [`ProducerCostConfig::latency_rate`], well
//!    below what any mode but one-message transactions can carry, for
//!    [`ProducerCostConfig::latency_duration`] (a transactional mode: at
//!    least two commit intervals). Latency at full speed would be the
//!    window's queueing, the same for every mode; at a steady rate it is
//!    what the guarantee adds. It runs from the send to the moment the
//!    record counts: the broker's acknowledgement, or for a transactional
//!    record the end of the commit that makes it visible to
//!    `read_committed` readers (until then no consumer that honours
//!    transactions sees it). A 1 s transaction therefore shows about half a
//!    second, and that is the honest figure.
//!
//! Settings every mode shares, so that the modes differ only in the
//! guarantee:
//!
//! - **`linger.ms` = [`DEFAULT_LINGER`], 5 ms**: the default of librdkafka
//!   and (since Kafka 4.0, KIP-1030) of the Java producer, so what a reader
//!   gets without tuning; long enough to fill batches, short next to the
//!   commit intervals compared.
//! - **`max.in.flight.requests.per.connection` =
//!   [`DEFAULT_REQUESTS_IN_FLIGHT`], 5**: the idempotent producer cannot go
//!   above five (the broker remembers the last five batches per producer to
//!   spot a retry), and five is the Java producer's default; librdkafka's
//!   default without idempotence is a million. Left at that, the baselines
//!   would win by pipelining deeper (at the price of reordering on a
//!   retry), and the table would measure pipeline depth, not the guarantee.
//!
//! The machine is small and shared (two cores, the broker's JVM on them,
//! one disk), so one pass would hand whichever mode ran during a GC pause,
//! a burst of disk writeback or a neighbour's build a bad figure. The run
//! is therefore made of [`ProducerCostConfig::rounds`] rounds that
//! interleave the modes (each round starts one mode later than the last),
//! every ratio is taken within a round against that round's `acks=all`,
//! and the report gives the median round with the lowest and highest.
//!
//! One-message transactions are slow enough that a fixed count would take
//! minutes: the time cap stops them, and the report says how many records
//! were actually sent.

mod chart;
mod measure;
mod report;

use std::fmt;
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};
use uuid::Uuid;

use crate::admin::Admin;
use crate::error::{KafkaTransactionsError, Result};

pub use report::{
    Goal, ModeMeasurement, ProducerCostReport, ProducerCostSettings, Ratios, RoundFigures,
};

/// The `linger.ms` every mode runs with (see the module docs for why 5 ms).
pub const DEFAULT_LINGER: Duration = Duration::from_millis(5);

/// The `max.in.flight.requests.per.connection` every mode runs with (see
/// the module docs for why 5).
pub const DEFAULT_REQUESTS_IN_FLIGHT: u32 = 5;

/// How often a transactional producer commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitEvery {
    /// Begin, send one record, commit: a transaction per message.
    Message,
    /// Commit once this long has passed since the transaction began.
    Interval(Duration),
}

/// One way of producing: the settings that decide what the broker promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerMode {
    /// `acks=1`: the leader's write is enough.
    AcksOne,
    /// `acks=all`, idempotence off: the baseline every ratio divides by.
    AcksAll,
    /// `acks=all` with `enable.idempotence=true` (librdkafka leaves it off).
    Idempotent,
    /// The idempotent producer inside transactions.
    Transactional(CommitEvery),
}

impl ProducerMode {
    /// The modes the chapter compares, in the order its table lists them.
    pub const CHAPTER: [ProducerMode; 7] = [
        ProducerMode::AcksOne,
        ProducerMode::AcksAll,
        ProducerMode::Idempotent,
        ProducerMode::Transactional(CommitEvery::Message),
        ProducerMode::Transactional(CommitEvery::Interval(Duration::from_millis(10))),
        ProducerMode::Transactional(CommitEvery::Interval(Duration::from_millis(100))),
        ProducerMode::Transactional(CommitEvery::Interval(Duration::from_secs(1))),
    ];

    /// How the table names the mode.
    pub fn label(self) -> String {
        match self {
            ProducerMode::AcksOne => "acks=1".to_owned(),
            ProducerMode::AcksAll => "acks=all".to_owned(),
            ProducerMode::Idempotent => "idempotent".to_owned(),
            ProducerMode::Transactional(CommitEvery::Message) => {
                "transactions, commit per message".to_owned()
            }
            ProducerMode::Transactional(CommitEvery::Interval(interval)) => {
                format!("transactions, commit every {}", human_interval(interval))
            }
        }
    }

    /// A label short enough for the chart's axis.
    pub fn short_label(self) -> String {
        match self {
            ProducerMode::Transactional(CommitEvery::Message) => "txn/message".to_owned(),
            ProducerMode::Transactional(CommitEvery::Interval(interval)) => {
                format!("txn {}", human_interval(interval))
            }
            other => other.label(),
        }
    }

    pub fn is_transactional(self) -> bool {
        matches!(self, ProducerMode::Transactional(_))
    }

    /// A topic-name-safe name.
    fn slug(self) -> String {
        match self {
            ProducerMode::AcksOne => "acks1".to_owned(),
            ProducerMode::AcksAll => "acksall".to_owned(),
            ProducerMode::Idempotent => "idempotent".to_owned(),
            ProducerMode::Transactional(CommitEvery::Message) => "txn-per-message".to_owned(),
            ProducerMode::Transactional(CommitEvery::Interval(interval)) => {
                format!("txn-{}ms", interval.as_millis())
            }
        }
    }
}

impl fmt::Display for ProducerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// In JSON a mode is its label.
impl Serialize for ProducerMode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.label())
    }
}

fn human_interval(interval: Duration) -> String {
    if interval >= Duration::from_secs(1) && interval.subsec_nanos() == 0 {
        format!("{} s", interval.as_secs())
    } else {
        format!("{} ms", interval.as_millis())
    }
}

/// Everything a producer-cost run is parameterised by.
#[derive(Debug, Clone)]
pub struct ProducerCostConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Records per throughput phase (per mode, payload size and round);
    /// fewer if the time cap comes first.
    pub messages: usize,
    /// Longest a throughput phase may run.
    pub time_cap: Duration,
    /// Records per second in the latency phase.
    pub latency_rate: u32,
    /// Length of the latency phase (transactional modes: at least two
    /// commit intervals).
    pub latency_duration: Duration,
    /// Rounds: every mode runs once per round, the rounds interleaved.
    pub rounds: usize,
    /// Records sent before each throughput phase, not timed (cut short at
    /// a tenth of the time cap).
    pub warmup_messages: usize,
    /// Payload sizes in bytes; every mode runs once per size and round.
    pub payload_sizes: Vec<usize>,
    /// Partitions of each fresh topic.
    pub partitions: i32,
    /// `linger.ms`, the same for every mode.
    pub linger: Duration,
    /// `max.in.flight.requests.per.connection`, the same for every mode
    /// (1 to 5).
    pub requests_in_flight: u32,
    /// Most records sent and not yet acknowledged at any moment.
    pub max_in_flight: usize,
    pub modes: Vec<ProducerMode>,
    /// Topic names start with this (then a fresh UUID).
    pub topic_prefix: String,
}

impl Default for ProducerCostConfig {
    /// The chapter's run: about two and a half minutes on two cores.
    fn default() -> Self {
        Self {
            brokers: queue::kafka::brokers_from_env(),
            messages: 3_000_000,
            time_cap: Duration::from_secs(1),
            latency_rate: 5_000,
            latency_duration: Duration::from_millis(500),
            rounds: 5,
            warmup_messages: 5_000,
            payload_sizes: vec![1024, 100],
            partitions: 3,
            linger: DEFAULT_LINGER,
            requests_in_flight: DEFAULT_REQUESTS_IN_FLIGHT,
            max_in_flight: 50_000,
            modes: ProducerMode::CHAPTER.to_vec(),
            topic_prefix: "eo.ch06.cost".to_owned(),
        }
    }
}

impl ProducerCostConfig {
    fn validate(&self) -> Result<()> {
        let problem = if self.messages == 0 {
            "messages must be at least 1"
        } else if self.time_cap.is_zero() || self.latency_duration.is_zero() {
            "the time cap and the latency phase must be longer than 0"
        } else if self.latency_rate == 0 {
            "latency_rate must be at least 1"
        } else if self.rounds == 0 {
            "rounds must be at least 1"
        } else if self.payload_sizes.is_empty() || self.payload_sizes.contains(&0) {
            "give at least one payload size, each at least 1 byte"
        } else if self.partitions < 1 {
            "partitions must be at least 1"
        } else if self.max_in_flight == 0 {
            "max_in_flight must be at least 1"
        } else if !(1..=5).contains(&self.requests_in_flight) {
            "requests_in_flight must be 1 to 5 (the idempotent producer allows no more)"
        } else if self.modes.is_empty() {
            "give at least one mode"
        } else {
            return Ok(());
        };
        Err(KafkaTransactionsError::InvalidConfig(problem.to_owned()))
    }
}

/// Measures every mode of `config` at every payload size, `rounds`
/// times, interleaved; each measurement on a fresh topic that is deleted
/// right after it (also when it fails).
///
/// Progress goes to `tracing` at INFO level, one event per measurement.
pub async fn measure_producer_cost(config: &ProducerCostConfig) -> Result<ProducerCostReport> {
    config.validate()?;
    let started = Instant::now();
    let admin = Admin::connect(&config.brokers)?;
    let run = Uuid::new_v4().simple().to_string();
    let cases: Vec<(ProducerMode, usize)> = config
        .payload_sizes
        .iter()
        .flat_map(|&payload| config.modes.iter().map(move |&mode| (mode, payload)))
        .collect();
    let mut rounds: Vec<Vec<RoundFigures>> = vec![Vec::new(); cases.len()];
    for round in 0..config.rounds {
        for &payload_bytes in &config.payload_sizes {
            for shift in 0..config.modes.len() {
                let mode = config.modes[(round + shift) % config.modes.len()];
                let topic = format!(
                    "{}.{run}.{}.{payload_bytes}b.r{round}",
                    config.topic_prefix,
                    mode.slug()
                );
                admin.create_topic(&topic, config.partitions).await?;
                let plan = measure::Plan {
                    brokers: config.brokers.clone(),
                    transactional_id: format!("{topic}.producer"),
                    topic: topic.clone(),
                    mode,
                    payload_bytes,
                    messages: config.messages,
                    warmup_messages: config.warmup_messages,
                    time_cap: config.time_cap,
                    latency_rate: config.latency_rate,
                    latency_duration: config.latency_duration,
                    linger: config.linger,
                    max_in_flight: config.max_in_flight,
                    requests_in_flight: config.requests_in_flight,
                };
                let measured = tokio::task::spawn_blocking(move || measure::run(&plan))
                    .await
                    .map_err(|_| KafkaTransactionsError::Panicked("a producer benchmark"));
                let deleted = admin.delete_topics(&[topic]).await;
                let figures = measured??;
                deleted?;
                tracing::info!(
                    round = round + 1,
                    mode = %mode,
                    payload_bytes,
                    messages = figures.messages,
                    msgs_per_sec = figures.msgs_per_sec.round(),
                    p50_ms = figures.p50_ms,
                    p99_ms = figures.p99_ms,
                    "measured"
                );
                let case = cases
                    .iter()
                    .position(|c| *c == (mode, payload_bytes))
                    .expect("every mode and size is a case");
                rounds[case].push(figures);
            }
        }
    }
    Ok(ProducerCostReport {
        settings: ProducerCostSettings {
            messages: config.messages,
            time_cap_s: config.time_cap.as_secs_f64(),
            latency_rate: config.latency_rate,
            latency_duration_s: config.latency_duration.as_secs_f64(),
            rounds: config.rounds,
            warmup_messages: config.warmup_messages,
            partitions: config.partitions,
            linger_ms: config.linger.as_secs_f64() * 1e3,
            requests_in_flight: config.requests_in_flight,
            max_in_flight: config.max_in_flight,
        },
        measurements: cases
            .into_iter()
            .zip(rounds)
            .map(|((mode, payload_bytes), rounds)| {
                ModeMeasurement::from_rounds(mode, payload_bytes, rounds)
            })
            .collect(),
        wall_time_s: started.elapsed().as_secs_f64(),
    })
}
