//! The fault matrix (the book's appendix "Faults the pipeline rides out"):
//! the hardened pipeline (outbox and relay, the hardened consumer) against
//! faults in what surrounds it rather than in its own processes: the broker
//! or Postgres restarting, the PSP unreachable or slower than the
//! consumer's timeout, consumers competing for messages whose lease is
//! shorter than the work, and the shop killed inside its transaction.
//!
//! Each fault runs alone, on each broker where it applies, and the verdict
//! comes from the PSP's ledger as in every chapter.

use std::time::Duration;

use consumer::{Heartbeat, Variant};
use psp::FaultConfig;
use queue::backend::BackendKind;
use relay::RelayConfig;

use crate::outage::{Outage, OutageWhen, PlannedOutage};
use crate::plan::{ChaosPlan, FaultMix, ProducerFault};
use crate::report::{Claim, RunReport};
use crate::roles::ProducerKind;
use crate::run::RunSpec;

/// One row of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A service taken away mid-run and started again.
    Outage(Outage),
    /// Some charges take longer than the consumer waits for the PSP.
    PspSlowerThanTimeout,
    /// Four consumers compete; every charge outlasts the SQS lease.
    CompetingConsumersShortLease,
    /// The shop SIGKILLed inside an order's transaction.
    ProducerKilledMidTransaction,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::Outage(Outage::BrokerRestart),
        Fault::Outage(Outage::PostgresRestart),
        Fault::Outage(Outage::PspUnreachable),
        Fault::PspSlowerThanTimeout,
        Fault::CompetingConsumersShortLease,
        Fault::ProducerKilledMidTransaction,
    ];

    /// A short name for `--only`.
    pub fn id(self) -> &'static str {
        match self {
            Fault::Outage(Outage::BrokerRestart) => "broker-restart",
            Fault::Outage(Outage::PostgresRestart) => "postgres-restart",
            Fault::Outage(Outage::PspUnreachable) => "psp-unreachable",
            // Leg 2's outages (broker_loss), not in the matrix.
            Fault::Outage(Outage::PartitionLeaderKilled) => "leader-killed",
            Fault::Outage(Outage::FollowersStallThenLeaderKilled { .. }) => "followers-stall",
            Fault::PspSlowerThanTimeout => "psp-slow",
            Fault::CompetingConsumersShortLease => "short-lease",
            Fault::ProducerKilledMidTransaction => "producer-mid-transaction",
        }
    }

    pub fn from_id(id: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|fault| fault.id() == id)
    }

    pub fn name(self, backend: BackendKind, settings: &MatrixSettings) -> String {
        match self {
            Fault::Outage(
                outage @ (Outage::BrokerRestart
                | Outage::PostgresRestart
                | Outage::PartitionLeaderKilled
                | Outage::FollowersStallThenLeaderKilled { .. }),
            ) => {
                format!(
                    "{}, down {} s",
                    outage.name(backend),
                    settings.hold.as_secs()
                )
            }
            Fault::Outage(Outage::PspUnreachable) => {
                format!("PSP refuses connections for {} s", settings.hold.as_secs())
            }
            Fault::PspSlowerThanTimeout => format!(
                "1 charge in {SLOW_EVERY} takes {} s, the consumer waits {} s",
                SLOW_CHARGE.as_secs_f64(),
                PSP_TIMEOUT.as_secs_f64()
            ),
            Fault::CompetingConsumersShortLease => format!(
                "{COMPETING} consumers, lease {} s, every charge {} s",
                SHORT_LEASE.as_secs_f64(),
                LONG_CHARGE.as_secs_f64()
            ),
            Fault::ProducerKilledMidTransaction => {
                format!("shop SIGKILLed before COMMIT, 1 order in {MID_TRANSACTION_EVERY}")
            }
        }
    }

    /// Why the fault is not run on `backend`, if it is not.
    pub fn not_on(self, backend: BackendKind) -> Option<&'static str> {
        match (self, backend) {
            (Fault::CompetingConsumersShortLease, BackendKind::Rabbitmq) => Some(
                "RabbitMQ has no lease: a message stays with its consumer until the connection closes",
            ),
            (Fault::CompetingConsumersShortLease, BackendKind::Kafka) => Some(
                "Kafka has no per-message lease: a partition stays with its consumer while it polls",
            ),
            _ => None,
        }
    }
}

/// What every run of the matrix shares.
#[derive(Debug, Clone, Copy)]
pub struct MatrixSettings {
    pub messages: usize,
    /// How long an outage keeps its service away.
    pub hold: Duration,
}

/// The shop places an order every this long (slower around an outage).
const ORDER_PACE: Duration = Duration::from_millis(40);
const PSP_TIMEOUT: Duration = Duration::from_secs(1);
const SLOW_CHARGE: Duration = Duration::from_millis(2500);
const SLOW_EVERY: usize = 5;
const COMPETING: usize = 4;
const SHORT_LEASE: Duration = Duration::from_secs(1);
const LONG_CHARGE: Duration = Duration::from_millis(1500);
const MID_TRANSACTION_EVERY: usize = 10;

/// The run of `fault` on `backend` for `seed`.
pub fn spec(fault: Fault, backend: BackendKind, seed: u64, settings: &MatrixSettings) -> RunSpec {
    let mut plan = ChaosPlan::generate(seed, settings.messages, FaultMix::NONE);
    if fault == Fault::ProducerKilledMidTransaction {
        for order in plan.orders.iter_mut().step_by(MID_TRANSACTION_EVERY) {
            order.producer_fault = Some(ProducerFault::CrashMidTransaction);
        }
    }
    let mut spec = RunSpec::new(Variant::Hardened, plan.clone(), 3);
    spec.batch_size = consumer::BATCH_SIZE;
    spec.scenario = fault.name(backend, settings);
    spec.producer = ProducerKind::Outbox {
        relays: 1,
        relay: RelayConfig::default(),
    };
    spec.publish_pace = Some(ORDER_PACE);
    if backend == BackendKind::Sqs {
        spec.heartbeat = Some(Heartbeat::for_lease(spec.visibility_timeout));
    }
    // A Kafka broker takes about 15 s to start again, and its consumers
    // then rejoin their group.
    spec.deadline =
        Duration::from_secs(180) + Duration::from_millis(200) * plan.orders.len() as u32;
    match fault {
        Fault::Outage(outage) => {
            // Orders keep coming until after the service is back, so that
            // some meet it down and some arrive once it has come back.
            spec.publish_pace =
                Some((settings.hold + Duration::from_secs(5)) / settings.messages.max(1) as u32);
            spec.outage = Some(PlannedOutage {
                outage,
                when: OutageWhen::AfterSettled((settings.messages / 4).max(1) as u64),
                hold: settings.hold,
            });
        }
        Fault::PspSlowerThanTimeout => {
            spec.psp_timeout = PSP_TIMEOUT;
            spec.psp_faults = FaultConfig {
                slow_latency: SLOW_CHARGE,
                slow_orders: plan
                    .orders
                    .iter()
                    .step_by(SLOW_EVERY)
                    .map(|o| o.order_id.to_string())
                    .collect(),
                seed,
                ..FaultConfig::default()
            };
        }
        Fault::CompetingConsumersShortLease => {
            spec.consumers = COMPETING;
            spec.visibility_timeout = SHORT_LEASE;
            spec.heartbeat = Some(Heartbeat::for_lease(SHORT_LEASE));
            spec.psp_faults = FaultConfig {
                latency: LONG_CHARGE,
                seed,
                ..FaultConfig::default()
            };
        }
        Fault::ProducerKilledMidTransaction => {}
    }
    spec
}

/// The runs of one fault on one broker, over every seed.
pub struct MatrixRow<'a> {
    pub backend: BackendKind,
    pub runs: Vec<&'a RunReport>,
}

pub const MATRIX_HEADER: [&str; 10] = [
    "fault",
    "broker",
    "seeds",
    "double charges",
    "lost events",
    "waiting when it went down (most)",
    "back to settling (s, worst)",
    "restarts seen",
    "reconnects",
    "SIGKILLs",
];

impl MatrixRow<'_> {
    pub fn cells(&self) -> Vec<String> {
        let sum = |count: fn(&RunReport) -> u64| crate::report::sum_over(&self.runs, count);
        let recovery = self
            .runs
            .iter()
            .filter_map(|run| run.outage.as_ref())
            .map(|outage| outage.settling_again_ms)
            .collect::<Vec<_>>();
        let recovery = if recovery.is_empty() {
            "—".to_owned()
        } else if recovery.iter().any(Option::is_none) {
            "never".to_owned()
        } else {
            let worst = recovery.into_iter().flatten().max().unwrap_or(0);
            format!("{:.1}", worst as f64 / 1000.0)
        };
        let waiting = crate::report::most_waiting_when_down(&self.runs);
        let name = self
            .runs
            .first()
            .map(|run| run.scenario.clone())
            .unwrap_or_default();
        vec![
            name,
            self.backend.name().to_owned(),
            self.runs.len().to_string(),
            sum(|r| r.double_charges).to_string(),
            sum(|r| r.lost_events).to_string(),
            waiting,
            recovery,
            sum(|r| r.unplanned_exits).to_string(),
            sum(|r| r.reconnects).to_string(),
            sum(|r| r.kills).to_string(),
        ]
    }
}

/// What the matrix promises, checked on its runs.
pub fn claims(runs: &[RunReport]) -> Vec<Claim> {
    let outages: Vec<_> = runs.iter().filter_map(|run| run.outage.as_ref()).collect();
    vec![
        Claim::new(
            "every run drained: the pipeline came back from every fault on its own",
            runs.iter().all(|run| run.drained),
        ),
        Claim::new(
            "every committed order charged exactly once in every run (PSP ledger)",
            runs.iter().all(|run| run.audit.every_order_charged_once()),
        ),
        Claim::new(
            "after every outage, orders settled again",
            outages
                .iter()
                .all(|outage| outage.settling_again_ms.is_some()),
        ),
        Claim::new(
            "no process exited on a fault it should ride out (restarts seen: 0)",
            runs.iter().all(|run| run.unplanned_exits == 0),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outage::OutageReport;
    use crate::report::sample_run;

    fn after_outage(settling_again_ms: Option<u64>) -> RunReport {
        let mut run = sample_run(0);
        run.lost_events = 0;
        run.audit.lost_events = 0;
        run.audit.charges_per_order = [0, 10, 0, 0];
        run.audit.orders_committed = 10;
        run.outage = Some(OutageReport {
            outage: Outage::BrokerRestart,
            began_after_ms: 1000,
            down_ms: 4000,
            settling_again_ms,
            waiting_when_down: Some(3),
        });
        run
    }

    fn holding(runs: &[RunReport]) -> Vec<bool> {
        claims(runs).iter().map(|claim| claim.holds).collect()
    }

    #[test]
    fn a_clean_recovery_holds_every_claim() {
        assert_eq!(holding(&[after_outage(Some(1500))]), [true; 4]);
    }

    #[test]
    fn a_double_charge_a_run_that_never_settled_again_or_a_restart_fails_its_claim() {
        let mut doubled = after_outage(Some(1500));
        doubled.audit.charges_per_order = [0, 9, 1, 0];
        doubled.audit.offending_orders = vec!["o".into()];
        assert_eq!(holding(&[doubled]), [true, false, true, true]);
        assert_eq!(holding(&[after_outage(None)]), [true, true, false, true]);
        let mut restarted = after_outage(Some(1500));
        restarted.unplanned_exits = 1;
        restarted.drained = false;
        assert_eq!(holding(&[restarted]), [false, true, true, false]);
    }

    #[test]
    fn a_row_sums_the_seeds_and_shows_the_worst_recovery() {
        let (first, second) = (after_outage(Some(1500)), after_outage(Some(4200)));
        let row = MatrixRow {
            backend: BackendKind::Rabbitmq,
            runs: vec![&first, &second],
        };
        let cells = row.cells();
        assert_eq!(cells.len(), MATRIX_HEADER.len());
        assert_eq!(&cells[1..7], ["rabbitmq", "2", "0", "0", "3", "4.2"]);
    }

    #[test]
    fn every_fault_has_an_id_to_select_it_by() {
        for fault in Fault::ALL {
            assert_eq!(Fault::from_id(fault.id()), Some(fault));
        }
        assert_eq!(Fault::from_id("meteor"), None);
    }
}
