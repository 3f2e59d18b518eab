//! One mode at one payload size in one round: a producer on its own
//! thread, first flat out (throughput), then at a steady rate (latency),
//! noting when each record was sent and when it counted: acknowledged, or
//! for a transaction, committed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::{CommitEvery, ProducerMode, RoundFigures};
use crate::error::{Doing, KafkaTransactionsError, Result};
use crate::flush;

/// Longest wait for an acknowledgement, a commit or `init_transactions`.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait before retrying a send the client's queue refused.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(1);

/// What one measurement runs with.
pub(super) struct Plan {
    pub brokers: String,
    pub topic: String,
    pub transactional_id: String,
    pub mode: ProducerMode,
    pub payload_bytes: usize,
    pub messages: usize,
    pub warmup_messages: usize,
    pub time_cap: Duration,
    pub latency_rate: u32,
    pub latency_duration: Duration,
    pub linger: Duration,
    pub max_in_flight: usize,
    pub requests_in_flight: u32,
}

impl Plan {
    /// The latency phase: at least two commit intervals long, so that a
    /// transactional record waits for a commit on the interval, not for
    /// the one that ends the phase.
    fn latency_phase(&self) -> (usize, Duration) {
        let duration = match self.mode {
            ProducerMode::Transactional(CommitEvery::Interval(interval)) => {
                self.latency_duration.max(interval * 2)
            }
            _ => self.latency_duration,
        };
        let count = (f64::from(self.latency_rate) * duration.as_secs_f64()).ceil() as usize;
        (count.max(1), duration)
    }
}

/// Warm-up, throughput phase, latency phase.
pub(super) fn run(plan: &Plan) -> Result<RoundFigures> {
    let (latency_count, latency_duration) = plan.latency_phase();
    let clock = AckClock::new(
        plan.warmup_messages + plan.messages + latency_count,
        plan.max_in_flight,
    );
    let producer: ThreadedProducer<AckClock> = producer_config(plan)
        .create_with_context(clock)
        .doing(format!("creating the {} producer", plan.mode))?;
    if plan.mode.is_transactional() {
        producer
            .init_transactions(BROKER_TIMEOUT)
            .doing("init_transactions")?;
    }
    let mut sender = Sender {
        producer: &producer,
        plan,
        payload: vec![b'x'; plan.payload_bytes],
        next_index: 0,
    };
    sender.phase(plan.warmup_messages, plan.time_cap / 10, None)?;
    let throughput = sender.phase(plan.messages, plan.time_cap, None)?;
    // A mode that cannot keep up with the rate (one transaction per
    // message) is stopped at twice the phase's length.
    let latency = sender.phase(latency_count, latency_duration * 2, Some(plan.latency_rate))?;

    let mut latencies_ms = latency.latencies_ms();
    latencies_ms.sort_by(f64::total_cmp);
    Ok(RoundFigures {
        messages: throughput.sent_at.len(),
        capped: throughput.capped,
        commits: throughput.commits,
        elapsed_s: throughput.elapsed_s(),
        msgs_per_sec: throughput.sent_at.len() as f64 / throughput.elapsed_s(),
        latency_messages: latency.sent_at.len(),
        p50_ms: nearest_rank(&latencies_ms, 0.50),
        p99_ms: nearest_rank(&latencies_ms, 0.99),
    })
}

fn producer_config(plan: &Plan) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &plan.brokers)
        .set("linger.ms", plan.linger.as_millis().to_string())
        .set("compression.type", "none")
        .set(
            "max.in.flight.requests.per.connection",
            plan.requests_in_flight.to_string(),
        )
        // Never the limit: the window below is.
        .set(
            "queue.buffering.max.messages",
            plan.max_in_flight.max(100_000).to_string(),
        );
    match plan.mode {
        ProducerMode::AcksOne => {
            config.set("acks", "1").set("enable.idempotence", "false");
        }
        ProducerMode::AcksAll => {
            config.set("acks", "all").set("enable.idempotence", "false");
        }
        ProducerMode::Idempotent => {
            config.set("acks", "all").set("enable.idempotence", "true");
        }
        ProducerMode::Transactional(_) => {
            config
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set("transactional.id", &plan.transactional_id);
        }
    }
    config
}

/// The producer's context: notes each acknowledgement's instant, counts
/// the records still in flight, and remembers the first failure.
///
/// Delivery reports arrive on the `ThreadedProducer`'s polling thread. A
/// sender that found the window full waits on `room` until it has drained
/// to `low_water`: woken once per quarter window rather than once per
/// acknowledgement, it does not spend the two cores on context switches
/// that the broker needs.
struct AckClock {
    origin: Instant,
    /// Nanoseconds after `origin`, plus one (0: not acknowledged yet).
    acked_at: Vec<AtomicU64>,
    in_flight: Mutex<usize>,
    room: Condvar,
    low_water: usize,
    failure: Mutex<Option<String>>,
}

impl AckClock {
    fn new(records: usize, max_in_flight: usize) -> Self {
        Self {
            origin: Instant::now(),
            acked_at: (0..records).map(|_| AtomicU64::new(0)).collect(),
            in_flight: Mutex::new(0),
            room: Condvar::new(),
            low_water: max_in_flight * 3 / 4,
            failure: Mutex::new(None),
        }
    }

    fn acked(&self, index: usize) -> Option<Instant> {
        match self.acked_at[index].load(Ordering::Acquire) {
            0 => None,
            plus_one => Some(self.origin + Duration::from_nanos(plus_one - 1)),
        }
    }

    fn first_failure(&self) -> Option<String> {
        self.failure.lock().expect("failure lock").clone()
    }
}

impl ClientContext for AckClock {}

impl ProducerContext for AckClock {
    /// The record's number over the whole round.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        match result {
            Ok(_) => {
                let nanos = self.origin.elapsed().as_nanos() as u64;
                self.acked_at[index].store(nanos + 1, Ordering::Release);
            }
            Err((error, _)) => {
                self.failure
                    .lock()
                    .expect("failure lock")
                    .get_or_insert_with(|| error.to_string());
            }
        }
        let mut in_flight = self.in_flight.lock().expect("in-flight lock");
        *in_flight -= 1;
        if *in_flight == self.low_water {
            self.room.notify_one();
        }
    }
}

struct Sender<'a> {
    producer: &'a ThreadedProducer<AckClock>,
    plan: &'a Plan,
    payload: Vec<u8>,
    /// The next record's number over the whole round.
    next_index: usize,
}

/// What one phase (warm-up, throughput or latency) did.
struct Phase {
    sent_at: Vec<Instant>,
    /// When each record counted: acknowledged, or its transaction committed.
    completed_at: Vec<Instant>,
    commits: usize,
    capped: bool,
}

impl Phase {
    /// First send to the moment the last record counted.
    fn elapsed_s(&self) -> f64 {
        match (self.sent_at.first(), self.completed_at.iter().max()) {
            (Some(first), Some(last)) => last.duration_since(*first).as_secs_f64(),
            _ => f64::NAN,
        }
    }

    fn latencies_ms(&self) -> Vec<f64> {
        self.sent_at
            .iter()
            .zip(&self.completed_at)
            .map(|(sent, done)| done.duration_since(*sent).as_secs_f64() * 1e3)
            .collect()
    }
}

impl Sender<'_> {
    /// Sends up to `count` records (stopping at `cap`), flat out within the
    /// window or, with `rate`, one every 1/rate seconds; commits as the
    /// mode says; and waits until every record counts.
    fn phase(&mut self, count: usize, cap: Duration, rate: Option<u32>) -> Result<Phase> {
        let first = self.next_index;
        let started = Instant::now();
        let mut sent_at = Vec::with_capacity(count);
        // (records covered so far, when the commit returned)
        let mut commits: Vec<(usize, Instant)> = Vec::new();
        let mut open_since: Option<Instant> = None;
        let mut capped = false;
        while sent_at.len() < count {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(sent_at.len() as f64 / f64::from(rate));
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            if started.elapsed() >= cap {
                capped = true;
                break;
            }
            if let (Some(since), ProducerMode::Transactional(CommitEvery::Interval(interval))) =
                (open_since, self.plan.mode)
            {
                if since.elapsed() >= interval {
                    commits.push((sent_at.len(), self.commit()?));
                    open_since = None;
                }
            }
            self.wait_for_room();
            if self.plan.mode.is_transactional() && open_since.is_none() {
                self.producer
                    .begin_transaction()
                    .doing("begin_transaction")?;
                open_since = Some(Instant::now());
            }
            sent_at.push(Instant::now());
            self.send(first + sent_at.len() - 1)?;
            if self.plan.mode == ProducerMode::Transactional(CommitEvery::Message) {
                commits.push((sent_at.len(), self.commit()?));
                open_since = None;
            }
        }
        if open_since.is_some() {
            commits.push((sent_at.len(), self.commit()?));
        } else if !flush::until_acknowledged(self.producer, BROKER_TIMEOUT) {
            return Err(self.delivery_error("waiting for the last acknowledgements"));
        }
        self.check_deliveries()?;
        self.next_index = first + sent_at.len();

        let clock = self.producer.context();
        let mut completed_at = Vec::with_capacity(sent_at.len());
        let mut commit = commits.iter().peekable();
        for offset in 0..sent_at.len() {
            let at = if self.plan.mode.is_transactional() {
                // The first commit that covers this record.
                while commit.next_if(|(covered, _)| *covered <= offset).is_some() {}
                commit.peek().map(|(_, at)| *at)
            } else {
                clock.acked(first + offset)
            };
            completed_at.push(at.ok_or_else(|| {
                self.delivery_error(&format!("record {} has no acknowledgement", first + offset))
            })?);
        }
        Ok(Phase {
            sent_at,
            completed_at,
            commits: commits.len(),
            capped,
        })
    }

    /// Takes a place in the window; when it is full, first waits until it
    /// has drained to the low-water mark.
    fn wait_for_room(&self) {
        let clock = self.producer.context();
        let mut in_flight = clock.in_flight.lock().expect("in-flight lock");
        if *in_flight >= self.plan.max_in_flight {
            while *in_flight > clock.low_water {
                in_flight = clock.room.wait(in_flight).expect("in-flight lock");
            }
        }
        *in_flight += 1;
    }

    fn send(&self, index: usize) -> Result<()> {
        let key = index.to_string();
        loop {
            let record = BaseRecord::with_opaque_to(&self.plan.topic, index)
                .key(&key)
                .payload(&self.payload);
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(QUEUE_FULL_BACKOFF);
                }
                Err((error, _)) => {
                    *self
                        .producer
                        .context()
                        .in_flight
                        .lock()
                        .expect("in-flight lock") -= 1;
                    return Err(KafkaTransactionsError::Kafka {
                        doing: format!("sending record {index} to {}", self.plan.topic),
                        source: error,
                    });
                }
            }
        }
    }

    /// Waits for the open transaction's records, commits it, and returns
    /// when the commit came back.
    fn commit(&self) -> Result<Instant> {
        if !flush::until_acknowledged(self.producer, BROKER_TIMEOUT) {
            return Err(self.delivery_error("waiting for a transaction's records"));
        }
        self.check_deliveries()?;
        self.producer
            .commit_transaction(BROKER_TIMEOUT)
            .doing("commit_transaction")?;
        Ok(Instant::now())
    }

    fn check_deliveries(&self) -> Result<()> {
        match self.producer.context().first_failure() {
            Some(reason) => Err(KafkaTransactionsError::Delivery {
                doing: format!("{} to {}", self.plan.mode, self.plan.topic),
                reason,
            }),
            None => Ok(()),
        }
    }

    fn delivery_error(&self, what: &str) -> KafkaTransactionsError {
        KafkaTransactionsError::Delivery {
            doing: format!("{} to {}", self.plan.mode, self.plan.topic),
            reason: self
                .producer
                .context()
                .first_failure()
                .unwrap_or_else(|| what.to_owned()),
        }
    }
}

/// The nearest-rank percentile of sorted values (NaN when there are none).
fn nearest_rank(sorted: &[f64], share: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (share * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::nearest_rank;

    #[test]
    fn nearest_rank_picks_the_value_at_or_above_the_share() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&values, 0.50), 50.0);
        assert_eq!(nearest_rank(&values, 0.99), 99.0);
        assert_eq!(nearest_rank(&[7.0], 0.99), 7.0);
        assert!(nearest_rank(&[], 0.5).is_nan());
    }
}
