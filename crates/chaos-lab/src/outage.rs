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
//!
//! Leg 2 runs on a three-broker Kafka cluster (`scripts/kafka-cluster`):
//! the lab asks the cluster which broker leads the topic's partition and
//! SIGKILLs that one, after stalling its followers (SIGSTOP) if asked.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use queue::backend::{BackendKind, Broker, QueueSpec};
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
    /// Kafka cluster: the broker leading the topic's first partition is
    /// SIGKILLed, and started again after the hold.
    PartitionLeaderKilled,
    /// Kafka cluster: the partition's followers stall (SIGSTOP, as in a
    /// long GC pause or a frozen VM) for this long while the leader keeps
    /// serving; then the leader is SIGKILLed, the followers resume, and
    /// the leader is started again after the hold.
    FollowersStallThenLeaderKilled { stall_ms: u64 },
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
            Outage::PartitionLeaderKilled => "partition leader SIGKILLed".to_owned(),
            Outage::FollowersStallThenLeaderKilled { stall_ms } => format!(
                "followers stall {:.0} s, then the leader is SIGKILLed",
                stall_ms as f64 / 1000.0
            ),
        }
    }
}

/// When the lab causes an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutageWhen {
    /// Once this many orders are settled, so that some are done and the
    /// rest meet the outage (in the queue, in an outbox, in a hand).
    AfterSettled(u64),
    /// After the producer has published every order and before any
    /// consumer starts: every message waits in the queue (Leg 2).
    QueueFilled,
}

/// When an outage begins and how long the service stays away.
#[derive(Debug, Clone, Copy)]
pub struct PlannedOutage {
    pub outage: Outage,
    pub when: OutageWhen,
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
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} exited with {status}: {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// `scripts/NAME`, or the script named by the environment variable `env`.
fn script(name: &str, env: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts")).join(name)
    })
}

/// Runs `script` with `args` and waits until it is done.
async fn run_script(script: PathBuf, args: Vec<String>) -> Result<(), OutageError> {
    let shown = format!("{} {}", script.display(), args.join(" "));
    let output = tokio::process::Command::new(&script)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| OutageError::Spawn {
            command: shown.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(OutageError::Failed {
            command: shown,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Takes `service` down (`"down"`) or brings it back (`"up"`) with
/// `scripts/outage` (or `EO_OUTAGE_SCRIPT`), and waits until it is done.
pub async fn service(service: &str, action: &str) -> Result<(), OutageError> {
    run_script(
        script("outage", "EO_OUTAGE_SCRIPT"),
        vec![service.to_owned(), action.to_owned()],
    )
    .await
}

/// `scripts/kafka-cluster ACTION [BROKER]` (or `EO_KAFKA_CLUSTER_SCRIPT`):
/// `up`, or `kill`, `stall` and `resume` of one broker by its id.
pub async fn kafka_cluster(action: &str, broker: Option<i32>) -> Result<(), OutageError> {
    let mut args = vec![action.to_owned()];
    args.extend(broker.map(|id| id.to_string()));
    run_script(script("kafka-cluster", "EO_KAFKA_CLUSTER_SCRIPT"), args).await
}

/// Causes `planned` on the broker of `queue` and ends it. The PSP, which
/// runs inside the lab, is handed in for a PSP outage and handed back
/// serving again on the same address.
pub(crate) async fn cause(
    planned: PlannedOutage,
    queue: QueueSpec,
    psp: Option<psp::server::RunningPsp>,
) -> anyhow::Result<(OutageTimes, Option<psp::server::RunningPsp>)> {
    use anyhow::Context;
    let backend = queue.backend;
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
        Outage::PartitionLeaderKilled | Outage::FollowersStallThenLeaderKilled { .. } => {
            let replicas = partition_replicas(&queue).await?;
            if let Outage::FollowersStallThenLeaderKilled { stall_ms } = planned.outage {
                let followers: Vec<i32> = replicas
                    .replicas
                    .iter()
                    .copied()
                    .filter(|&id| id != replicas.leader)
                    .collect();
                for &id in &followers {
                    kafka_cluster("stall", Some(id)).await?;
                }
                eprintln!(
                    "outage: brokers {followers:?} stalled; broker {} leads alone",
                    replicas.leader
                );
                tokio::time::sleep(Duration::from_millis(stall_ms)).await;
                let killed = kafka_cluster("kill", Some(replicas.leader)).await;
                // Resumed whatever the kill did: a cluster left stalled
                // would hang every later run.
                for &id in &followers {
                    kafka_cluster("resume", Some(id)).await?;
                }
                killed?;
            } else {
                kafka_cluster("kill", Some(replicas.leader)).await?;
            }
            eprintln!("outage: broker {} (the leader) SIGKILLed", replicas.leader);
            tokio::time::sleep(planned.hold).await;
            let restarting = Instant::now();
            kafka_cluster("up", None).await?;
            (restarting, psp)
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

/// Who leads the first partition of the run's topic, and who follows.
async fn partition_replicas(queue: &QueueSpec) -> anyhow::Result<queue::kafka::PartitionReplicas> {
    use anyhow::Context;
    let broker = Broker::connect_for(queue).await?;
    let Broker::Kafka(kafka) = broker else {
        anyhow::bail!(
            "a partition leader is a Kafka outage; this run is on {}",
            queue.backend.name()
        );
    };
    let replicas = kafka
        .partition_replicas(&queue.name, 0)
        .await
        .with_context(|| format!("asking the cluster who leads {}", queue.name))?;
    anyhow::ensure!(
        replicas.replicas.len() > 1,
        "{} has one replica: Leg 2 needs the three-broker cluster (scripts/kafka-cluster)",
        queue.name
    );
    Ok(replicas)
}
