//! The fault schedule: which order meets which fault, derived from a seed.
//!
//! Faults are attached to orders, not to moments in time. Whichever consumer
//! process receives order 17 first crashes at the point planned for order 17,
//! so the same seed replays the same faults however the processes interleave.
//! Each fault is planned on an exact number of orders (a rate of the run's
//! size, at least one), so even a small run meets every fault.

use consumer::crash::CrashPoint;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What the chaos lab does to the producer for one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProducerFault {
    /// The publish never reaches the broker, so it is never confirmed (once
    /// per order: a retry gets through).
    PublishDropped,
    /// SIGKILL after the order's commit, before its publish.
    CrashAfterCommit,
    /// Published twice (a retried publish): two deliveries of one event.
    PublishedTwice,
    /// Published, then published again with the same event id and another
    /// amount: a producer bug that only the PSP's 422 can catch.
    RepublishedAltered,
    /// Published, then published again as a new event: same order, same
    /// amount, a fresh event id. A producer that retries by emitting a new
    /// message; only a consumer keyed on the order sees one payment.
    RepublishedNewId,
    /// With an outbox: the relay is SIGKILLed after the broker confirmed the
    /// order's event and before the row was marked sent.
    RelayCrashAfterPublish,
    /// With an outbox: the producer is SIGKILLed inside the order's
    /// transaction, after both INSERTs and before the COMMIT (once per
    /// order: the restarted shop places it again).
    CrashMidTransaction,
}

impl ProducerFault {
    pub fn name(self) -> &'static str {
        match self {
            ProducerFault::PublishDropped => "publish_dropped",
            ProducerFault::CrashAfterCommit => "crash_after_commit",
            ProducerFault::PublishedTwice => "published_twice",
            ProducerFault::RepublishedAltered => "republished_altered",
            ProducerFault::RepublishedNewId => "republished_new_id",
            ProducerFault::RelayCrashAfterPublish => "relay_crash_after_publish",
            ProducerFault::CrashMidTransaction => "crash_mid_transaction",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Crash(CrashPoint),
    Producer(ProducerFault),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedOrder {
    pub index: usize,
    pub order_id: Uuid,
    pub amount_cents: i64,
    pub currency: String,
    pub producer_fault: Option<ProducerFault>,
    /// Happens once per run, on whichever delivery first reaches the point.
    pub consumer_crash: Option<CrashPoint>,
}

/// The share of orders that meets each fault.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FaultMix {
    pub before_charge: f64,
    pub after_charge_before_commit: f64,
    pub after_commit_before_ack: f64,
    pub publish_dropped: f64,
    pub producer_crash_after_commit: f64,
    pub published_twice: f64,
    pub relay_crash_after_publish: f64,
}

impl FaultMix {
    /// Every crash point and both producer faults, each on about 5% of orders.
    pub const EVERY_LEG: FaultMix = FaultMix {
        before_charge: 0.05,
        after_charge_before_commit: 0.05,
        after_commit_before_ack: 0.05,
        publish_dropped: 0.05,
        producer_crash_after_commit: 0.03,
        published_twice: 0.0,
        relay_crash_after_publish: 0.0,
    };

    /// The producer's legs: publishes dropped, the producer killed between
    /// commit and publish, a relay killed between publish and mark.
    pub const PRODUCER_LEGS: FaultMix = FaultMix {
        before_charge: 0.0,
        after_charge_before_commit: 0.0,
        after_commit_before_ack: 0.0,
        publish_dropped: 0.05,
        producer_crash_after_commit: 0.03,
        published_twice: 0.0,
        relay_crash_after_publish: 0.05,
    };

    /// The consumer's legs of [`FaultMix::EVERY_LEG`] alone: the same crash
    /// points on the same orders for the same seed, without the producer
    /// faults that no consumer can repair (chapter 4 fixes those).
    pub const CONSUMER_LEGS: FaultMix = FaultMix {
        publish_dropped: 0.0,
        producer_crash_after_commit: 0.0,
        ..FaultMix::EVERY_LEG
    };

    /// No faults at all: the control run.
    pub const NONE: FaultMix = FaultMix {
        before_charge: 0.0,
        after_charge_before_commit: 0.0,
        after_commit_before_ack: 0.0,
        publish_dropped: 0.0,
        producer_crash_after_commit: 0.0,
        published_twice: 0.0,
        relay_crash_after_publish: 0.0,
    };
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChaosPlan {
    pub seed: u64,
    pub orders: Vec<PlannedOrder>,
    /// Messages no consumer can ever process, published besides the orders.
    #[serde(default)]
    pub poison: Vec<Poison>,
}

/// A message that must end in the dead-letter queue, with the consumers
/// carrying on around it. Neither is an order the shop committed, so the
/// audit's expected charges do not include them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "poison", rename_all = "snake_case")]
pub enum Poison {
    /// A body that is not a payment event.
    Malformed { body: String },
    /// A well-formed payment event whose handling SIGKILLs the consumer
    /// every time, before the charge: a stand-in for an input that crashes
    /// a library or exhausts memory. Only `maxReceiveCount` stops it.
    KillsEveryConsumer { order_id: Uuid },
}

impl Poison {
    /// The message as published; `index` keeps message ids apart.
    pub fn message(&self, index: usize) -> queue::OutgoingMessage {
        match self {
            Poison::Malformed { body } => queue::OutgoingMessage {
                key: format!("poison-{index}"),
                message_id: format!("poison-{index}-malformed"),
                payload: body.clone().into_bytes(),
            },
            Poison::KillsEveryConsumer { order_id } => {
                let event = shop::Order {
                    order_id: *order_id,
                    amount_cents: 4_200,
                    currency: "EUR".to_owned(),
                }
                .payment_event(chrono::Utc::now());
                queue::OutgoingMessage {
                    key: order_id.to_string(),
                    message_id: event.event_id.to_string(),
                    payload: event.encode(),
                }
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Poison::Malformed { .. } => "malformed payload",
            Poison::KillsEveryConsumer { .. } => "kills every consumer",
        }
    }
}

/// Amounts vary so that a charge of the wrong order would show in the ledger.
const CURRENCIES: [&str; 3] = ["EUR", "USD", "GBP"];

impl ChaosPlan {
    pub fn generate(seed: u64, messages: usize, mix: FaultMix) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut orders: Vec<PlannedOrder> = (0..messages)
            .map(|index| PlannedOrder {
                index,
                order_id: Uuid::from_bytes(rng.gen()),
                amount_cents: rng.gen_range(100..=50_000),
                currency: CURRENCIES[rng.gen_range(0..CURRENCIES.len())].to_owned(),
                producer_fault: None,
                consumer_crash: None,
            })
            .collect();
        // Ids from the seed, stamped as v4 so they look like any other uuid.
        for order in &mut orders {
            order.order_id =
                uuid::Builder::from_random_bytes(*order.order_id.as_bytes()).into_uuid();
        }

        // Each order meets at most one fault: a producer fault means the
        // consumer never sees the order, so a crash planned on it would
        // silently never happen.
        let mut victims: Vec<usize> = (0..messages).collect();
        victims.shuffle(&mut rng);
        let mut victims = victims.into_iter();
        let mut take = |rate: f64| -> Vec<usize> {
            let wanted = if rate <= 0.0 {
                0
            } else {
                ((rate * messages as f64).round() as usize).max(1)
            };
            victims.by_ref().take(wanted).collect()
        };
        let planned = [
            (mix.before_charge, Fault::Crash(CrashPoint::BeforeCharge)),
            (
                mix.after_charge_before_commit,
                Fault::Crash(CrashPoint::AfterChargeBeforeCommit),
            ),
            (
                mix.after_commit_before_ack,
                Fault::Crash(CrashPoint::AfterCommitBeforeAck),
            ),
            (
                mix.publish_dropped,
                Fault::Producer(ProducerFault::PublishDropped),
            ),
            (
                mix.producer_crash_after_commit,
                Fault::Producer(ProducerFault::CrashAfterCommit),
            ),
            (
                mix.published_twice,
                Fault::Producer(ProducerFault::PublishedTwice),
            ),
            (
                mix.relay_crash_after_publish,
                Fault::Producer(ProducerFault::RelayCrashAfterPublish),
            ),
        ];
        for (rate, fault) in planned {
            for index in take(rate) {
                match fault {
                    Fault::Crash(point) => orders[index].consumer_crash = Some(point),
                    Fault::Producer(fault) => orders[index].producer_fault = Some(fault),
                }
            }
        }
        Self {
            seed,
            orders,
            poison: Vec::new(),
        }
    }

    pub fn count_crashes(&self, point: CrashPoint) -> usize {
        self.orders
            .iter()
            .filter(|o| o.consumer_crash == Some(point))
            .count()
    }

    pub fn count_producer_faults(&self, fault: ProducerFault) -> usize {
        self.orders
            .iter()
            .filter(|o| o.producer_fault == Some(fault))
            .count()
    }

    /// The name of the fault planned on `order_id`, or "no planned fault".
    pub fn fault_of(&self, order_id: &str) -> &'static str {
        self.orders
            .iter()
            .find(|o| o.order_id.to_string() == order_id)
            .and_then(|o| {
                o.consumer_crash
                    .map(|p| p.name())
                    .or(o.producer_fault.map(|f| f.name()))
            })
            .unwrap_or("no planned fault")
    }

    /// One line per fault kind, for the run's stderr header.
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = CrashPoint::ALL
            .iter()
            .map(|p| format!("{}={}", p.name(), self.count_crashes(*p)))
            .collect();
        for fault in [
            ProducerFault::PublishDropped,
            ProducerFault::CrashAfterCommit,
        ] {
            parts.push(format!(
                "{}={}",
                fault.name(),
                self.count_producer_faults(fault)
            ));
        }
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_replays_the_same_faults() {
        let a = ChaosPlan::generate(42, 200, FaultMix::EVERY_LEG);
        let b = ChaosPlan::generate(42, 200, FaultMix::EVERY_LEG);
        assert_eq!(a, b);
        let c = ChaosPlan::generate(43, 200, FaultMix::EVERY_LEG);
        assert_ne!(a, c);
    }

    #[test]
    fn every_fault_is_planned_even_on_a_small_run() {
        let plan = ChaosPlan::generate(1, 20, FaultMix::EVERY_LEG);
        for point in CrashPoint::ALL {
            assert_eq!(plan.count_crashes(point), 1, "{point}");
        }
        assert_eq!(plan.count_producer_faults(ProducerFault::PublishDropped), 1);
        assert_eq!(
            plan.count_producer_faults(ProducerFault::CrashAfterCommit),
            1
        );
    }

    #[test]
    fn no_order_meets_two_faults() {
        let plan = ChaosPlan::generate(7, 100, FaultMix::EVERY_LEG);
        assert!(plan
            .orders
            .iter()
            .all(|o| o.producer_fault.is_none() || o.consumer_crash.is_none()));
        assert_eq!(plan.count_crashes(CrashPoint::BeforeCharge), 5);
        assert_eq!(
            plan.count_producer_faults(ProducerFault::CrashAfterCommit),
            3
        );
    }

    #[test]
    fn the_consumer_legs_hit_the_same_orders_as_every_leg() {
        let every = ChaosPlan::generate(5, 60, FaultMix::EVERY_LEG);
        let consumer = ChaosPlan::generate(5, 60, FaultMix::CONSUMER_LEGS);
        for (a, b) in every.orders.iter().zip(&consumer.orders) {
            assert_eq!(a.order_id, b.order_id);
            assert_eq!(a.consumer_crash, b.consumer_crash);
            assert_eq!(b.producer_fault, None);
        }
    }

    #[test]
    fn the_control_mix_plans_nothing() {
        let plan = ChaosPlan::generate(7, 50, FaultMix::NONE);
        assert!(plan
            .orders
            .iter()
            .all(|o| o.producer_fault.is_none() && o.consumer_crash.is_none()));
    }
}
