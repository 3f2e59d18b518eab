//! Leg 2, measured (the appendix "Faults the pipeline rides out"): loss
//! inside the broker. Every other leg is closed by our code; this one only
//! by the broker's settings. The same hardened pipeline runs against each
//! setting, the broker fails under it, and the PSP's ledger counts what
//! never arrived.
//!
//! - RabbitMQ: the shop publishes every order with a publisher confirm, the
//!   broker is stopped and started with all of them waiting, and only then
//!   do the consumers start. A non-durable queue or transient messages
//!   against durable queues with persistent messages, and a quorum queue.
//! - Kafka, on a three-broker cluster: the relay publishes while the
//!   partition's leader is SIGKILLed, alone or after its followers stalled.
//!   `acks=1` against `acks=all` with `min.insync.replicas=2`, unclean
//!   leader election off.

use std::time::Duration;

use consumer::Variant;
use queue::backend::{BackendKind, Durability};
use relay::RelayConfig;

use crate::outage::{Outage, OutageWhen, PlannedOutage};
use crate::plan::{ChaosPlan, FaultMix};
use crate::report::{Claim, RunReport};
use crate::roles::ProducerKind;
use crate::run::RunSpec;

/// One setting against one failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub backend: BackendKind,
    pub durability: Durability,
    pub outage: Outage,
}

/// What every run shares.
#[derive(Debug, Clone)]
pub struct Settings {
    pub messages: usize,
    /// How long the broker (RabbitMQ) or the killed leader (Kafka) stays down.
    pub hold: Duration,
    /// How long the Kafka followers stall before the leader is killed.
    pub stall: Duration,
    /// The three-broker cluster's bootstrap list.
    pub kafka_cluster: String,
}

impl Case {
    /// Every case on `backend`: the settings that lose first, the book's last.
    pub fn all_on(backend: BackendKind, settings: &Settings) -> Vec<Case> {
        let case = |durability, outage| Case {
            backend,
            durability,
            outage,
        };
        match backend {
            BackendKind::Rabbitmq => [
                Durability::NonDurableQueue,
                Durability::TransientMessages,
                Durability::Durable,
                Durability::Quorum,
            ]
            .into_iter()
            .map(|durability| case(durability, Outage::BrokerRestart))
            .collect(),
            BackendKind::Kafka => {
                let stall = Outage::FollowersStallThenLeaderKilled {
                    stall_ms: settings.stall.as_millis() as u64,
                };
                [Durability::LeaderAckOnly, Durability::Durable]
                    .into_iter()
                    .flat_map(|durability| {
                        [
                            case(durability, Outage::PartitionLeaderKilled),
                            case(durability, stall),
                        ]
                    })
                    .collect()
            }
            // ElasticMQ is a test server: what it loses says nothing about
            // SQS, whose durability is not a setting.
            BackendKind::Sqs => Vec::new(),
        }
    }

    /// The setting as a reader would write it in the broker's terms.
    pub fn setting(&self) -> &'static str {
        match self.durability {
            Durability::Durable => match self.backend {
                BackendKind::Kafka => "acks=all, min.insync.replicas=2 (3 replicas)",
                _ => "durable queue, persistent messages",
            },
            Durability::Quorum => "quorum queue, persistent messages",
            Durability::TransientMessages => "durable queue, transient messages",
            Durability::NonDurableQueue => "non-durable queue, persistent messages",
            Durability::LeaderAckOnly => "acks=1 (3 replicas)",
        }
    }

    /// The setting the book uses: it must lose nothing.
    pub fn is_the_books(&self) -> bool {
        matches!(self.durability, Durability::Durable | Durability::Quorum)
    }

    /// Whether this case loses whatever the seed: a restart empties a
    /// non-durable queue and drops transient messages, and `acks=1` loses
    /// what its leader confirmed while the followers stalled (as many as
    /// the shop placed in that time). A bare SIGKILL of an `acks=1` leader
    /// loses only what the followers had not copied in that millisecond:
    /// the run says how much, and claims nothing.
    pub fn must_lose(&self) -> bool {
        match self.durability {
            Durability::NonDurableQueue | Durability::TransientMessages => true,
            Durability::LeaderAckOnly => {
                matches!(self.outage, Outage::FollowersStallThenLeaderKilled { .. })
            }
            Durability::Durable | Durability::Quorum => false,
        }
    }
}

/// The run of `case` for `seed`.
pub fn spec(case: Case, seed: u64, settings: &Settings) -> RunSpec {
    let plan = ChaosPlan::generate(seed, settings.messages, FaultMix::NONE);
    let mut spec = RunSpec::new(Variant::Hardened, plan, 2);
    spec.batch_size = consumer::BATCH_SIZE;
    spec.scenario = case.outage.name(case.backend);
    spec.durability = case.durability;
    spec.deadline = Duration::from_secs(180)
        + settings.hold
        + Duration::from_millis(100) * settings.messages as u32;
    match case.backend {
        BackendKind::Kafka => {
            // The relay publishes as the shop commits, over a span that
            // holds the whole failure; one partition, so that its leader
            // is the broker every publish goes to.
            spec.producer = ProducerKind::Outbox {
                relays: 1,
                relay: RelayConfig::default(),
            };
            spec.partitions = 1;
            spec.kafka_brokers = Some(settings.kafka_cluster.clone());
            let span = settings.stall + settings.hold + Duration::from_secs(6);
            spec.publish_pace = Some(span / settings.messages.max(1) as u32);
            spec.outage = Some(PlannedOutage {
                outage: case.outage,
                when: OutageWhen::AfterSettled((settings.messages / 5).max(1) as u64),
                hold: settings.hold,
            });
        }
        _ => {
            // Every order confirmed by the broker and waiting when it stops.
            spec.producer = ProducerKind::Naive;
            spec.prefill = true;
            spec.outage = Some(PlannedOutage {
                outage: case.outage,
                when: OutageWhen::QueueFilled,
                hold: settings.hold,
            });
        }
    }
    spec
}

/// The runs of one case, over every seed.
pub struct Row<'a> {
    pub case: Case,
    pub runs: Vec<&'a RunReport>,
}

pub const HEADER: [&str; 8] = [
    "broker",
    "setting",
    "failure",
    "seeds",
    "orders confirmed",
    "lost events",
    "double charges",
    "waiting when it failed (most)",
];

impl Row<'_> {
    pub fn cells(&self) -> Vec<String> {
        let sum = |count: fn(&RunReport) -> u64| crate::report::sum_over(&self.runs, count);
        let waiting = crate::report::most_waiting_when_down(&self.runs);
        vec![
            self.case.backend.name().to_owned(),
            self.case.setting().to_owned(),
            self.case.outage.name(self.case.backend),
            self.runs.len().to_string(),
            sum(|r| r.audit.orders_committed).to_string(),
            sum(|r| r.lost_events).to_string(),
            sum(|r| r.double_charges).to_string(),
            waiting,
        ]
    }
}

/// What the measurement shows, checked on its rows.
pub fn claims(rows: &[Row<'_>]) -> Vec<Claim> {
    let books: Vec<_> = rows.iter().filter(|row| row.case.is_the_books()).collect();
    let losing: Vec<_> = rows.iter().filter(|row| row.case.must_lose()).collect();
    vec![
        Claim::new(
            "the book's settings (durable and persistent, quorum, acks=all with \
             min.insync.replicas=2) lost no event and charged none twice",
            !books.is_empty()
                && books.iter().all(|row| {
                    row.runs
                        .iter()
                        .all(|run| run.drained && run.audit.every_order_charged_once())
                }),
        ),
        Claim::new(
            "a non-durable queue, transient messages, and acks=1 behind stalled followers \
             lost confirmed events: the loss is real, and only the broker's setting prevents it",
            losing
                .iter()
                .all(|row| row.runs.iter().all(|run| run.lost_events > 0)),
        ),
        Claim::new(
            "no setting charged an order twice: what a broker loses is lost, not doubled",
            rows.iter()
                .all(|row| row.runs.iter().all(|run| run.double_charges == 0)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::sample_run;

    fn settings() -> Settings {
        Settings {
            messages: 40,
            hold: Duration::from_secs(3),
            stall: Duration::from_secs(2),
            kafka_cluster: "127.0.0.1:19092".to_owned(),
        }
    }

    fn run(lost: u64) -> RunReport {
        let mut run = sample_run(0);
        run.double_charges = 0;
        run.audit.double_charges = 0;
        run.lost_events = lost;
        run.audit.lost_events = lost;
        run.audit.orders_committed = 10;
        run.audit.charges_per_order = [lost, 10 - lost, 0, 0];
        run.audit.offending_orders = Vec::new();
        run.drained = true;
        run
    }

    #[test]
    fn rabbitmq_pairs_every_queue_setting_with_a_restart_and_kafka_every_ack_with_both_kills() {
        let rabbit = Case::all_on(BackendKind::Rabbitmq, &settings());
        assert_eq!(rabbit.len(), 4);
        assert!(rabbit.iter().all(|c| c.outage == Outage::BrokerRestart));
        let kafka = Case::all_on(BackendKind::Kafka, &settings());
        assert_eq!(kafka.len(), 4);
        assert_eq!(kafka.iter().filter(|c| c.is_the_books()).count(), 2);
        // acks=1 must lose behind stalled followers; a bare kill may not.
        assert_eq!(kafka.iter().filter(|c| c.must_lose()).count(), 1);
        assert!(Case::all_on(BackendKind::Sqs, &settings()).is_empty());
    }

    #[test]
    fn a_rabbitmq_case_fills_the_queue_before_the_restart_and_a_kafka_case_kills_mid_stream() {
        let rabbit = Case::all_on(BackendKind::Rabbitmq, &settings())[0];
        let rabbit = spec(rabbit, 1, &settings());
        assert!(rabbit.prefill);
        assert_eq!(rabbit.outage.unwrap().when, OutageWhen::QueueFilled);
        let kafka = Case::all_on(BackendKind::Kafka, &settings())[0];
        let spec = spec(kafka, 1, &settings());
        assert!(!spec.prefill);
        assert_eq!(spec.partitions, 1);
        assert_eq!(spec.kafka_brokers.as_deref(), Some("127.0.0.1:19092"));
        assert!(matches!(
            spec.outage.unwrap().when,
            OutageWhen::AfterSettled(8)
        ));
    }

    #[test]
    fn the_claims_fail_when_the_books_setting_loses_or_a_losing_setting_does_not() {
        let cases = Case::all_on(BackendKind::Rabbitmq, &settings());
        let (lossless, lossy) = (run(0), run(10));
        fn rows<'a>(cases: &[Case], losing: &'a RunReport, books: &'a RunReport) -> Vec<Row<'a>> {
            cases
                .iter()
                .map(|&case| Row {
                    case,
                    runs: vec![if case.must_lose() { losing } else { books }],
                })
                .collect()
        }
        let holding = |rows: &[Row<'_>]| claims(rows).iter().map(|c| c.holds).collect::<Vec<_>>();
        assert_eq!(
            holding(&rows(&cases, &lossy, &lossless)),
            [true, true, true]
        );
        assert_eq!(holding(&rows(&cases, &lossy, &lossy)), [false, true, true]);
        assert_eq!(
            holding(&rows(&cases, &lossless, &lossless)),
            [true, false, true]
        );
        let cells = rows(&cases, &lossy, &lossless)[0].cells();
        assert_eq!(cells.len(), HEADER.len());
        assert_eq!(&cells[3..7], ["1", "10", "10", "0"]);
    }
}
