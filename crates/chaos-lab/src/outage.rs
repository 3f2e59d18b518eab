//! Outages the lab causes from outside a run's processes, in a service they
//! all depend on: the broker restarts, Postgres restarts, the PSP goes
//! away. Unlike a crash point, nothing in our code chooses the moment: the
//! consumers, relays and producer are in whatever state they are in.
//!
//! The broker and Postgres are taken down and brought back by
//! `scripts/outage`, the way an operator (or a failing host) would:
//! `rabbitmqctl stop_app`, a SIGKILLed Kafka or ElasticMQ, a fast shutdown
//! of Postgres, then a start. The PSP runs inside the lab, which closes its
//! port (connections refused) and opens it again on the same address.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use queue::backend::BackendKind;
use serde::{Deserialize, Serialize};

/// A service taken away mid-run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outage {
    /// The run's broker: RabbitMQ stopped and started, Kafka or ElasticMQ
    /// SIGKILLed and started again.
    BrokerRestart,
    /// Postgres (the shop's, the consumers' and the PSP's databases): fast
    /// shutdown, then start.
    PostgresRestart,
    /// The PSP's port refuses connections, then serves again.
    PspUnreachable,
}

impl Outage {
    pub fn name(self, backend: BackendKind) -> String {
        match self {
            Outage::BrokerRestart => match backend {
                BackendKind::Rabbitmq => "RabbitMQ stopped and started".to_owned(),
                BackendKind::Kafka => "Kafka SIGKILLed, then started".to_owned(),
                BackendKind::Sqs => "ElasticMQ SIGKILLed, then started".to_owned(),
            },
            Outage::PostgresRestart => "Postgres fast shutdown, then started".to_owned(),
            Outage::PspUnreachable => "PSP refuses connections".to_owned(),
        }
    }
}

/// When an outage begins and how long the service stays away.
#[derive(Debug, Clone, Copy)]
pub struct PlannedOutage {
    pub outage: Outage,
    /// Begin once this many orders are settled, so that some are done and
    /// the rest meet the outage (in the queue, in an outbox, in a hand).
    pub after_settled: u64,
    /// How long the service stays away before the lab starts it again.
    pub hold: Duration,
}

/// What the lab saw of an outage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutageReport {
    pub outage: Outage,
    /// From the start of the run until the service went away.
    pub began_after_ms: u64,
    /// From taking it down until it answered again (the hold, plus the
    /// service's own start-up).
    pub down_ms: u64,
    /// From the restart command until the next order settled: the service's
    /// start-up plus the clients' reconnection. `None` if no order was left
    /// to settle after it.
    pub settling_again_ms: Option<u64>,
    /// Messages waiting in the queue when the service went down: what a
    /// broker that keeps them only in memory would lose.
    #[serde(default)]
    pub waiting_when_down: Option<u64>,
}

/// The moments of one outage, for its report.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutageTimes {
    pub began: Instant,
    pub restarting: Instant,
    pub back: Instant,
}

impl OutageTimes {
    /// `finished`: when each order the run settled was settled.
    pub(crate) fn report(
        &self,
        outage: Outage,
        run_started: Instant,
        finished: &[Instant],
        waiting_when_down: Option<u64>,
    ) -> OutageReport {
        let settling_again = finished
            .iter()
            .filter(|&&at| at >= self.restarting)
            .min()
            .map(|&at| millis(at - self.restarting));
        OutageReport {
            outage,
            began_after_ms: millis(self.began.saturating_duration_since(run_started)),
            down_ms: millis(self.back - self.began),
            settling_again_ms: settling_again,
            waiting_when_down,
        }
    }
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

#[derive(Debug, thiserror::Error)]
pub enum OutageError {
    #[error("cannot run {script} {service} {action}: {source}")]
    Spawn {
        script: String,
        service: &'static str,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("{script} {service} {action} exited with {status}: {stderr}")]
    Failed {
        script: String,
        service: &'static str,
        action: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// `scripts/outage SERVICE down|up`, or the script named by
/// `EO_OUTAGE_SCRIPT`.
fn script() -> PathBuf {
    std::env::var_os("EO_OUTAGE_SCRIPT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/outage"))
        })
}

/// Takes `service` down (`"down"`) or brings it back (`"up"`), and waits
/// until the script is done.
pub async fn service(service: &'static str, action: &'static str) -> Result<(), OutageError> {
    let script = script();
    let shown = script.display().to_string();
    let output = tokio::process::Command::new(&script)
        .args([service, action])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| OutageError::Spawn {
            script: shown.clone(),
            service,
            action,
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(OutageError::Failed {
            script: shown,
            service,
            action,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Causes `planned` on the run's `backend` and ends it. The PSP, which
/// runs inside the lab, is handed in for a PSP outage and handed back
/// serving again on the same address.
pub(crate) async fn cause(
    planned: PlannedOutage,
    backend: BackendKind,
    psp: Option<psp::server::RunningPsp>,
) -> anyhow::Result<(OutageTimes, Option<psp::server::RunningPsp>)> {
    use anyhow::Context;
    let name = planned.outage.name(backend);
    eprintln!("outage: {name}, for {:?}", planned.hold);
    let began = Instant::now();
    let (restarting, psp) = match planned.outage {
        Outage::BrokerRestart | Outage::PostgresRestart => {
            let service_name = match planned.outage {
                Outage::BrokerRestart => backend.name(),
                _ => "postgres",
            };
            service(service_name, "down").await?;
            tokio::time::sleep(planned.hold).await;
            let restarting = Instant::now();
            service(service_name, "up").await?;
            (restarting, psp)
        }
        Outage::PspUnreachable => {
            let running = psp.context("a PSP outage needs the run's PSP")?;
            let (addr, pool, config) = (
                running.addr(),
                running.pool().clone(),
                running.config().clone(),
            );
            running.shutdown().await.context("stopping the PSP")?;
            tokio::time::sleep(planned.hold).await;
            let restarting = Instant::now();
            let running = psp::server::PspServer::start(pool, config, addr)
                .await
                .with_context(|| format!("starting the PSP again on {addr}"))?;
            (restarting, Some(running))
        }
    };
    let back = Instant::now();
    eprintln!(
        "outage over: {name}; serving again after {:.1} s",
        (back - began).as_secs_f64()
    );
    Ok((
        OutageTimes {
            began,
            restarting,
            back,
        },
        psp,
    ))
}
