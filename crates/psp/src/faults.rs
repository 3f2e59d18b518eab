//! Seeded fault injection: latency, errors, and "charged but the response was
//! lost".
//!
//! A chaos run must replay the same faults from the same seed, yet requests for
//! different orders interleave differently on every run. So a decision depends
//! only on (seed, order_id, n), where n counts the requests this server process
//! has seen for that order: the third request for `order-7` meets the same
//! fault whatever happened to other orders meanwhile. The hash is sha256, not
//! std's `DefaultHasher`, whose output may change between Rust releases.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// How the PSP misbehaves. The default misbehaves never.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Slept before every charge, while the idempotency key is claimed, so that
    /// a retry arriving meanwhile sees 409.
    pub latency: Duration,
    /// Probability (0..=1) that a request fails with 503 and charges nothing.
    pub error_rate: f64,
    /// Probability (0..=1) that a request charges, stores its response, and then
    /// holds the response for `lost_response_hold`, so that the caller's own
    /// timeout fires without learning that money moved.
    pub lost_response_rate: f64,
    pub seed: u64,
    /// Longer than any sane client timeout, so a "lost" response is lost.
    pub lost_response_hold: Duration,
    /// Probability (0..=1) that a request is slow: it sleeps `slow_latency`
    /// instead of `latency`. The long tail that a lease sized on the typical
    /// request does not cover.
    pub slow_rate: f64,
    pub slow_latency: Duration,
    /// Orders whose first request is slow, whatever the rate: an exact tail
    /// for a run that must meet one.
    pub slow_orders: std::collections::BTreeSet<String>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            error_rate: 0.0,
            lost_response_rate: 0.0,
            seed: 0,
            lost_response_hold: Duration::from_secs(30),
            slow_rate: 0.0,
            slow_latency: Duration::ZERO,
            slow_orders: Default::default(),
        }
    }
}

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Charge and answer normally.
    None,
    /// Answer 503 `injected_failure` without charging.
    Error,
    /// Charge, store the response, then hold it past the caller's timeout.
    LostResponse,
}

impl FaultConfig {
    /// The fault for the `n`-th request (counting from 0) for `order_id`.
    /// Pure: the same inputs give the same fault on every machine and run.
    pub fn fault_for(&self, order_id: &str, n: u64) -> Fault {
        let digest = fault_digest(self.seed, order_id, n);
        // Two independent draws from one digest, so that changing error_rate
        // does not reshuffle which requests lose their response.
        let error_draw = unit_interval(&digest[0..8]);
        let lost_draw = unit_interval(&digest[8..16]);
        if error_draw < self.error_rate {
            Fault::Error
        } else if lost_draw < self.lost_response_rate {
            Fault::LostResponse
        } else {
            Fault::None
        }
    }
}

impl FaultConfig {
    /// How long the `n`-th request for `order_id` sleeps before it charges.
    /// A third draw from the same digest, so the tail does not reshuffle the
    /// errors and lost responses of a seed.
    pub fn latency_for(&self, order_id: &str, n: u64) -> Duration {
        if n == 0 && self.slow_orders.contains(order_id) {
            return self.slow_latency;
        }
        let digest = fault_digest(self.seed, order_id, n);
        if unit_interval(&digest[16..24]) < self.slow_rate {
            self.slow_latency
        } else {
            self.latency
        }
    }
}

fn fault_digest(seed: u64, order_id: &str, n: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"effectively-once/psp/fault/v1");
    hasher.update(seed.to_le_bytes());
    // Length-prefixed so that no (order_id, n) pair can collide with another.
    hasher.update((order_id.len() as u64).to_le_bytes());
    hasher.update(order_id.as_bytes());
    hasher.update(n.to_le_bytes());
    hasher.finalize().into()
}

/// Maps 8 bytes to a uniform number in [0, 1): rate 0 never fires, rate 1 always.
fn unit_interval(bytes: &[u8]) -> f64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes);
    (u64::from_le_bytes(word) >> 11) as f64 / (1u64 << 53) as f64
}

/// One request's fate, as decided when it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultDecision {
    /// Which request for this order this was, counting from 0.
    pub n: u64,
    pub fault: Fault,
    /// Slept before the charge.
    pub latency: Duration,
}

/// The server's fault schedule: the config plus how many requests it has seen
/// per order.
#[derive(Debug)]
pub struct FaultPlan {
    config: FaultConfig,
    seen: Mutex<HashMap<String, u64>>,
}

impl FaultPlan {
    pub fn new(config: FaultConfig) -> Self {
        Self {
            config,
            seen: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &FaultConfig {
        &self.config
    }

    /// Counts one more request for `order_id` and decides its fault.
    pub fn next(&self, order_id: &str) -> FaultDecision {
        let n = {
            // A poisoned lock only means another request panicked mid-increment;
            // the counts are still usable.
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let counter = seen.entry(order_id.to_owned()).or_insert(0);
            let n = *counter;
            *counter += 1;
            n
        };
        FaultDecision {
            n,
            fault: self.config.fault_for(order_id, n),
            latency: self.config.latency_for(order_id, n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(seed: u64) -> FaultConfig {
        FaultConfig {
            error_rate: 0.3,
            lost_response_rate: 0.3,
            seed,
            ..FaultConfig::default()
        }
    }

    #[test]
    fn same_seed_same_decisions() {
        let a = config(42);
        let b = config(42);
        for order in ["order-1", "order-2", "o"] {
            for n in 0..50 {
                assert_eq!(a.fault_for(order, n), b.fault_for(order, n));
            }
        }
    }

    #[test]
    fn decisions_are_pinned_across_builds() {
        // Guards the hash input format: a change here silently changes every
        // chaos run's schedule, and the book's numbers with it. The expected
        // values were computed independently (Python's hashlib).
        use Fault::{Error as E, LostResponse as L, None as N};
        let schedule: Vec<Fault> = (0..12).map(|n| config(7).fault_for("order-1", n)).collect();
        assert_eq!(schedule, [E, N, E, E, E, L, N, E, N, N, E, E]);
        assert_eq!(fault_digest(7, "order-1", 0)[..4], [0xb1, 0x6a, 0xac, 0xf9]);
    }

    #[test]
    fn interleaving_does_not_change_decisions() {
        let orders = ["a", "b", "c"];
        let first = FaultPlan::new(config(9));
        let second = FaultPlan::new(config(9));
        let mut by_order_first: HashMap<&str, Vec<Fault>> = HashMap::new();
        let mut by_order_second: HashMap<&str, Vec<Fault>> = HashMap::new();
        // Round-robin in one plan, order by order in the other.
        for _ in 0..10 {
            for order in orders {
                by_order_first
                    .entry(order)
                    .or_default()
                    .push(first.next(order).fault);
            }
        }
        for order in orders.iter().rev() {
            for _ in 0..10 {
                by_order_second
                    .entry(order)
                    .or_default()
                    .push(second.next(order).fault);
            }
        }
        assert_eq!(by_order_first, by_order_second);
    }

    #[test]
    fn different_seeds_give_different_schedules() {
        let a: Vec<Fault> = (0..64).map(|n| config(1).fault_for("o", n)).collect();
        let b: Vec<Fault> = (0..64).map(|n| config(2).fault_for("o", n)).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn a_slow_tail_takes_its_share_and_leaves_the_faults_alone() {
        let tail = FaultConfig {
            latency: Duration::from_millis(10),
            slow_rate: 0.2,
            slow_latency: Duration::from_millis(900),
            ..config(3)
        };
        let slow = (0..1000)
            .filter(|&n| tail.latency_for("o", n) == Duration::from_millis(900))
            .count();
        assert!((150..=250).contains(&slow), "{slow} of 1000 slow");
        for n in 0..100 {
            assert_eq!(tail.fault_for("o", n), config(3).fault_for("o", n));
        }
        assert_eq!(
            FaultConfig::default().latency_for("o", 0),
            Duration::ZERO,
            "no tail unless asked"
        );
        let named = FaultConfig {
            slow_orders: ["o".to_owned()].into(),
            slow_latency: Duration::from_secs(3),
            ..FaultConfig::default()
        };
        assert_eq!(named.latency_for("o", 0), Duration::from_secs(3));
        assert_eq!(
            named.latency_for("o", 1),
            Duration::ZERO,
            "the retry is not"
        );
        assert_eq!(named.latency_for("p", 0), Duration::ZERO);
    }

    #[test]
    fn rates_zero_and_one_are_exact() {
        let never = FaultConfig::default();
        let always_error = FaultConfig {
            error_rate: 1.0,
            ..FaultConfig::default()
        };
        let always_lost = FaultConfig {
            lost_response_rate: 1.0,
            ..FaultConfig::default()
        };
        for n in 0..200 {
            assert_eq!(never.fault_for("o", n), Fault::None);
            assert_eq!(always_error.fault_for("o", n), Fault::Error);
            assert_eq!(always_lost.fault_for("o", n), Fault::LostResponse);
        }
    }

    #[test]
    fn rates_are_roughly_honoured() {
        let c = FaultConfig {
            error_rate: 0.25,
            ..FaultConfig::default()
        };
        let errors = (0..4000)
            .filter(|n| c.fault_for("o", *n) == Fault::Error)
            .count();
        assert!((800..1200).contains(&errors), "{errors} errors in 4000");
    }

    #[test]
    fn the_counter_is_per_order() {
        let plan = FaultPlan::new(FaultConfig::default());
        assert_eq!(plan.next("a").n, 0);
        assert_eq!(plan.next("b").n, 0);
        assert_eq!(plan.next("a").n, 1);
    }
}
