//! The graded levels. Each follows a chapter: the fault it adds is the one
//! that chapter's fix survives, and its hint points there.

use std::time::Duration;

use psp::FaultConfig;
use queue::backend::BackendKind;

/// One level of the course.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Level {
    /// Every event arrives twice.
    Redelivery,
    /// Bad messages among the good ones.
    Poison,
    /// Consumers SIGKILLed while the PSP holds a charge's answer.
    KillAfterCharge,
    /// The PSP charges and its answer never arrives in time.
    LostResponse,
    /// SQS: the lease runs out while the charge is still running.
    ShortLease,
    /// All of it at once, at volume.
    AtScale,
}

impl Level {
    pub const ALL: [Level; 6] = [
        Level::Redelivery,
        Level::Poison,
        Level::KillAfterCharge,
        Level::LostResponse,
        Level::ShortLease,
        Level::AtScale,
    ];

    pub fn number(self) -> usize {
        Self::ALL.iter().position(|l| *l == self).expect("listed") + 1
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Redelivery => "redelivery",
            Level::Poison => "poison",
            Level::KillAfterCharge => "kill-after-charge",
            Level::LostResponse => "lost-response",
            Level::ShortLease => "short-lease",
            Level::AtScale => "at-scale",
        }
    }

    /// What passing the level shows.
    pub fn title(self) -> &'static str {
        match self {
            Level::Redelivery => "survives redelivery (every event published twice)",
            Level::Poison => "dead-letters bad input, never crashes on it, never drops it",
            Level::KillAfterCharge => "survives a SIGKILL after the charge, before the ack",
            Level::LostResponse => "survives a lost PSP response",
            Level::ShortLease => "survives a visibility timeout shorter than the charge (SQS)",
            Level::AtScale => "survives everything at once, at volume",
        }
    }

    /// One line for a failing grade: where the fix is.
    pub fn hint(self) -> &'static str {
        match self {
            Level::Redelivery => {
                "every event came twice: record each event you charged and skip the second \
                 (chapter 2, INSERT-first dedup)"
            }
            Level::Poison => {
                "a bad message must go to the dead-letter queue with a reason, not crash the \
                 process or vanish (the payment event page; chapter 1's dead-letter path)"
            }
            Level::KillAfterCharge => {
                "the PSP charged, then your process died before it committed: the retry charged \
                 again. Send a stable Idempotency-Key (chapter 3)"
            }
            Level::LostResponse => {
                "the PSP charged but its answer was lost: the retry must carry the same \
                 Idempotency-Key, derived from the order (chapter 3)"
            }
            Level::ShortLease => {
                "the lease ran out mid-charge and a second consumer got the message: extend \
                 the visibility while you work (chapter 5, the heartbeat)"
            }
            Level::AtScale => {
                "everything at once: fix the earlier levels first, then chapter 8's runbook"
            }
        }
    }

    /// Only SQS has a lease that runs out under a consumer that is alive.
    pub fn applies_to(self, backend: BackendKind) -> bool {
        self != Level::ShortLease || backend == BackendKind::Sqs
    }

    /// What the level does, for `orders` orders (its own default if none).
    pub fn plan(self, backend: BackendKind, orders: Option<usize>, seed: u64) -> Plan {
        // A killed consumer's SQS message comes back when its lease ends:
        // a short lease keeps the level quick. The consumer's heartbeat
        // (chapter 5) keeps a live one's message hidden.
        let base = Plan {
            orders: 30,
            published_twice: 0.0,
            poison: false,
            psp_faults: FaultConfig {
                seed,
                ..FaultConfig::default()
            },
            psp_timeout: Duration::from_secs(2),
            kill_gap: None,
            publish_over: Duration::ZERO,
            visibility_timeout: Duration::from_secs(5),
        };
        // Kafka's group rebalances after each kill take seconds; kills any
        // closer together would only stall it.
        let kill_gap = match backend {
            BackendKind::Kafka => (Duration::from_secs(2), Duration::from_secs(4)),
            _ => (Duration::from_millis(300), Duration::from_millis(900)),
        };
        // Orders keep coming for about six kills, so that the kills land
        // while there is work, whatever the number of orders.
        let publish_over = (kill_gap.0 + kill_gap.1) * 3;
        let plan = match self {
            Level::Redelivery => Plan {
                published_twice: 1.0,
                ..base
            },
            Level::Poison => Plan {
                orders: 20,
                poison: true,
                ..base
            },
            // Every answer is held 300 ms after the charge committed, so a
            // kill at a random moment most likely lands between the charge
            // and the consumer's commit.
            Level::KillAfterCharge => Plan {
                psp_faults: FaultConfig {
                    lost_response_rate: 1.0,
                    lost_response_hold: Duration::from_millis(300),
                    ..base.psp_faults.clone()
                },
                kill_gap: Some(kill_gap),
                publish_over,
                ..base
            },
            // One answer in five is held far past the consumer's timeout.
            Level::LostResponse => Plan {
                psp_faults: FaultConfig {
                    lost_response_rate: 0.2,
                    lost_response_hold: Duration::from_secs(10),
                    ..base.psp_faults.clone()
                },
                psp_timeout: Duration::from_secs(1),
                ..base
            },
            // A third of the charges take 3 s against a 2 s lease.
            Level::ShortLease => Plan {
                orders: 20,
                psp_faults: FaultConfig {
                    slow_rate: 0.3,
                    slow_latency: Duration::from_secs(3),
                    ..base.psp_faults.clone()
                },
                psp_timeout: Duration::from_secs(5),
                visibility_timeout: Duration::from_secs(2),
                ..base
            },
            Level::AtScale => Plan {
                orders: 1000,
                published_twice: 0.1,
                poison: true,
                psp_faults: FaultConfig {
                    lost_response_rate: 0.05,
                    lost_response_hold: Duration::from_secs(3),
                    ..base.psp_faults.clone()
                },
                psp_timeout: Duration::from_secs(1),
                kill_gap: Some(kill_gap),
                publish_over,
                ..base
            },
        };
        Plan {
            orders: orders.unwrap_or(plan.orders),
            ..plan
        }
    }
}

/// What one level does to the reader's consumers.
#[derive(Debug, Clone)]
pub struct Plan {
    pub orders: usize,
    /// Share of the events published a second time, as a producer that
    /// retried a publish whose confirm it never saw.
    pub published_twice: f64,
    /// Publish the bad messages of [`poison_messages`] among the orders.
    pub poison: bool,
    pub psp_faults: FaultConfig,
    /// `EO_PSP_TIMEOUT_MS`: how long the consumer should wait for the PSP.
    pub psp_timeout: Duration,
    /// SIGKILL a random consumer after a random pause in this range.
    pub kill_gap: Option<(Duration, Duration)>,
    /// Spread the publishing over this long (at once if zero).
    pub publish_over: Duration,
    /// SQS: the queue's visibility timeout.
    pub visibility_timeout: Duration,
}

/// The bad messages of the poison level, each with what is wrong with it.
/// An SQS body must be UTF-8 and not empty, so those two are not sent there.
pub fn poison_messages(backend: BackendKind) -> Vec<(&'static str, Vec<u8>)> {
    let mut messages = vec![
        ("not JSON", b"charge order 42 please".to_vec()),
        (
            "a field missing",
            br#"{"event_id":"7d2e0000-0000-4000-8000-0000000000aa","amount_cents":100,"currency":"EUR"}"#.to_vec(),
        ),
        (
            "a negative amount",
            br#"{"event_id":"7d2e0000-0000-4000-8000-0000000000ab","order_id":"7d2e0000-0000-4000-8000-0000000000bb","amount_cents":-500,"currency":"EUR","created_at":"2026-12-01T10:00:00Z"}"#.to_vec(),
        ),
        (
            "an unknown currency",
            br#"{"event_id":"7d2e0000-0000-4000-8000-0000000000ac","order_id":"7d2e0000-0000-4000-8000-0000000000bc","amount_cents":500,"currency":"QQQ","created_at":"2026-12-01T10:00:00Z"}"#.to_vec(),
        ),
    ];
    if backend != BackendKind::Sqs {
        messages.push(("an empty body", Vec::new()));
        messages.push(("not UTF-8", vec![0xff, 0xfe, 0x00, 0x7b]));
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_numbered_in_chapter_order_and_short_lease_is_sqs_only() {
        assert_eq!(Level::Redelivery.number(), 1);
        assert_eq!(Level::AtScale.number(), 6);
        assert!(Level::ShortLease.applies_to(BackendKind::Sqs));
        assert!(!Level::ShortLease.applies_to(BackendKind::Rabbitmq));
        assert_eq!(Level::AtScale.plan(BackendKind::Sqs, None, 1).orders, 1000);
        assert_eq!(
            Level::AtScale.plan(BackendKind::Sqs, Some(20), 1).orders,
            20
        );
    }
}
