//! One chaos run: fresh databases and queue, real processes, a seeded fault
//! schedule, a drain, an audit.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use consumer::observe::{Observation, Outcome};
use consumer::Variant;
use databases::FreshDatabase;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use queue::backend::{BackendKind, Broker, Durability, QueueSpec};
use tokio::sync::mpsc;

use crate::audit::Audit;
use crate::cdc_relay::{CdcRelay, ConnectOutage};
use crate::outage::{OutageTimes, OutageWhen, PlannedOutage};
use crate::plan::ChaosPlan;
use crate::report::{ConsumerScrape, DeadLetterSummary, RunReport};
use crate::roles::{ProducerKind, Role, RunConfig};
use crate::supervisor::Report;
use crate::supervisor::{ExitKind, LabEvent, ProcessId, Supervisor};

/// How one run is set up.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// What this run shows, in a few words (the table's first column).
    pub scenario: String,
    pub variant: Variant,
    pub producer: ProducerKind,
    pub plan: ChaosPlan,
    pub consumers: usize,
    /// Unacked messages per consumer: all of them come back when it dies.
    pub prefetch: u16,
    /// Deliveries per receive; the hardened consumer handles them as one
    /// batch. One by default: the chapters that teach a crash point follow
    /// one message through it. Chapter 8, the fault matrix, Leg 2 and the
    /// soak run the hardened consumer batched ([`consumer::BATCH_SIZE`]).
    pub batch_size: usize,
    pub psp_faults: psp::faults::FaultConfig,
    pub psp_timeout: Duration,
    /// Give up waiting for the drain after this long, and say so.
    pub deadline: Duration,
    /// How long everything must stay still before the run counts as drained.
    pub quiet_period: Duration,
    /// Publish every order before any consumer starts, so the consumers'
    /// throughput is measured on a full queue (benchmarks).
    pub prefill: bool,
    /// Orders whose every delivery is traced in the report.
    pub trace_orders: Vec<uuid::Uuid>,
    /// The binary to start as consumer and producer processes; it must call
    /// [`crate::Role::from_env`] first thing. Default: this executable.
    pub executable: Option<PathBuf>,
    /// SQS: how long a received message stays hidden. A SIGKILLed
    /// consumer's message comes back only after this, so chaos runs keep it
    /// short (but longer than the work, or chapter 5 happens).
    pub visibility_timeout: Duration,
    /// SQS: receives before the redrive policy moves a message to the DLQ.
    pub max_receive_count: u32,
    /// The consumers' visibility heartbeat (SQS), if any.
    pub heartbeat: Option<consumer::Heartbeat>,
    /// The producer waits this long between orders, so that orders arrive
    /// over time and consumers sit idle between them (as in production),
    /// free to pick up a message whose visibility timeout ran out.
    pub publish_pace: Option<Duration>,
    /// Kafka: the consumers commit their offsets inside a Kafka transaction
    /// (chapter 6's boundary), instead of a plain offset commit.
    pub transactional_ack: bool,
    /// CDC (chapter 7): when Kafka Connect is SIGKILLed and for how long.
    pub connect_outage: Option<ConnectOutage>,
    /// A service (broker, Postgres, PSP) taken away mid-run.
    pub outage: Option<PlannedOutage>,
    /// Leg 2: the broker's durability setting for the run's queue.
    pub durability: Durability,
    /// Kafka: partitions of the run's topic.
    pub partitions: u32,
    /// Kafka: the cluster to run on, if not `EO_KAFKA_BROKERS`'s.
    pub kafka_brokers: Option<String>,
    /// A soak: the lab kills consumers on its clock and samples every
    /// process and the database.
    pub soak: Option<crate::soak::SoakProbe>,
}

impl RunSpec {
    pub fn new(variant: Variant, plan: ChaosPlan, consumers: usize) -> Self {
        let deadline =
            Duration::from_secs(60) + Duration::from_millis(100) * plan.orders.len() as u32;
        Self {
            scenario: "chaos schedule".to_owned(),
            variant,
            producer: ProducerKind::Naive,
            plan,
            consumers,
            prefetch: 1,
            batch_size: 1,
            psp_faults: psp::faults::FaultConfig::default(),
            psp_timeout: Duration::from_secs(5),
            deadline,
            quiet_period: Duration::from_millis(1000),
            executable: None,
            trace_orders: Vec::new(),
            prefill: false,
            visibility_timeout: Duration::from_secs(2),
            max_receive_count: 10,
            heartbeat: None,
            publish_pace: None,
            transactional_ack: false,
            connect_outage: None,
            outage: None,
            durability: Durability::Durable,
            partitions: queue::kafka::DEFAULT_PARTITIONS,
            kafka_brokers: None,
            soak: None,
        }
    }
}

/// What the lab has heard from the processes so far.
#[derive(Debug, Default)]
struct Tally {
    deliveries: u64,
    redeliveries: u64,
    /// Every broker position delivered so far (Kafka), to count a
    /// redelivery that the consumer who got it could not see as one.
    delivered_positions: std::collections::HashSet<queue::Position>,
    dedup_hits: u64,
    dead_lettered: u64,
    requeued: std::collections::BTreeMap<String, u64>,
    settled_orders: std::collections::HashSet<uuid::Uuid>,
    consumer_kills: u64,
    /// Consumer SIGKILLs by the crash point the process had reached.
    kills_by_point: std::collections::BTreeMap<String, u64>,
    /// The crash point each consumer process announced before its SIGKILL.
    crashing: HashMap<ProcessId, &'static str>,
    producer_kills: u64,
    relay_kills: u64,
    republished: u64,
    /// Deliveries received but not yet settled, per process.
    in_hand: HashMap<ProcessId, u64>,
    producer_done: bool,
    last_event: Option<Instant>,
    /// Where each live consumer serves `/metrics`.
    metrics_addrs: HashMap<ProcessId, String>,
    relay_metrics_addrs: HashMap<ProcessId, String>,
    /// The order each consumer process is handling, for the traces.
    holding: HashMap<ProcessId, uuid::Uuid>,
    traced: std::collections::HashSet<uuid::Uuid>,
    traces: std::collections::BTreeMap<String, Vec<String>>,
    first_received: Option<Instant>,
    last_settled: Option<Instant>,
    settled: u64,
    /// Acks (and other settles) refused because the lease had run out.
    settled_late: u64,
    lease_extensions: u64,
    /// Receive-to-settle times of the deliveries that charged.
    charge_times_ms: Vec<u64>,
    /// What happens to a killed consumer's message on this backend.
    comes_back: &'static str,
    /// When each delivery that finished an order (charged, a dedup hit,
    /// dead-lettered) was settled: the outage report's recovery.
    finished_at: Vec<Instant>,
    /// Exits the lab did not cause (not its SIGKILL, not its stop, not a
    /// producer that placed every order): each one was restarted.
    unplanned_exits: u64,
    /// Times a consumer lost the broker or its database and connected again.
    reconnects: u64,
    /// The pid of every live process.
    pids: HashMap<ProcessId, u32>,
}

impl Tally {
    fn record(&mut self, event: &LabEvent) -> Result<(), String> {
        self.last_event = Some(Instant::now());
        match event {
            LabEvent::Observed {
                process,
                observation: Report::Relay(observation),
            } => match observation {
                relay::RelayObservation::RelayPublishing { order_id, attempt } => {
                    self.republished += u64::from(*attempt > 1);
                    self.trace(
                        *order_id,
                        format!("relay {} publishes it (attempt {attempt})", process.slot),
                    );
                }
                relay::RelayObservation::RelayPublishFailed {
                    order_id,
                    reason,
                    attempts,
                    still_pending,
                } => {
                    let row = if *still_pending {
                        "still pending"
                    } else {
                        "not pending"
                    };
                    self.trace(*order_id, format!(
                        "relay {}: publish failed ({reason}); the outbox row is {row} (attempts {attempts})",
                        process.slot
                    ));
                }
                relay::RelayObservation::RelayMetricsServed { addr } => {
                    self.relay_metrics_addrs.insert(*process, addr.clone());
                }
            },
            LabEvent::Observed {
                process,
                observation: Report::Consumer(observation),
            } => match observation {
                Observation::Received {
                    redelivered,
                    order_id,
                    position,
                    ..
                } => {
                    // The consumer's word, or the lab's own memory: on Kafka a
                    // dead consumer's message reaches the next one unflagged.
                    let seen_before =
                        position.is_some_and(|position| !self.delivered_positions.insert(position));
                    let redelivered = *redelivered || seen_before;
                    self.deliveries += 1;
                    self.redeliveries += u64::from(redelivered);
                    self.first_received.get_or_insert_with(Instant::now);
                    *self.in_hand.entry(*process).or_default() += 1;
                    if let Some(order_id) = order_id {
                        self.holding.insert(*process, *order_id);
                        let delivery = if redelivered {
                            "redelivered"
                        } else {
                            "first delivery"
                        };
                        self.trace(
                            *order_id,
                            format!("consumer {} receives it ({delivery})", process.slot),
                        );
                    }
                }
                Observation::Settled {
                    order_id,
                    outcome,
                    elapsed_ms,
                } => {
                    self.settled += 1;
                    if matches!(outcome, Outcome::Charged { .. }) {
                        self.charge_times_ms.push(*elapsed_ms);
                    }
                    if matches!(
                        outcome,
                        Outcome::Charged { .. } | Outcome::Duplicate | Outcome::DeadLettered { .. }
                    ) {
                        self.finished_at.push(Instant::now());
                    }
                    self.last_settled = Some(Instant::now());
                    if let Some(order_id) = order_id {
                        self.holding.remove(process);
                        self.trace(
                            *order_id,
                            format!("consumer {}: {}", process.slot, describe(outcome)),
                        );
                    }
                    let held = self.in_hand.entry(*process).or_default();
                    *held = held.saturating_sub(1);
                    match outcome {
                        Outcome::Duplicate => self.dedup_hits += 1,
                        Outcome::DeadLettered { .. } => self.dead_lettered += 1,
                        Outcome::Requeued { reason } => {
                            *self
                                .requeued
                                .entry(requeue_cause(reason).to_owned())
                                .or_default() += 1;
                        }
                        _ => {}
                    }
                    if let Some(order_id) = order_id {
                        self.settled_orders.insert(*order_id);
                    }
                }
                Observation::Crashing { order_id, point } => {
                    self.crashing.insert(*process, point.name());
                    self.trace(
                        *order_id,
                        format!("consumer {} reaches {point}: SIGKILL", process.slot),
                    );
                }
                Observation::MetricsServed { addr } => {
                    self.metrics_addrs.insert(*process, addr.clone());
                }
                Observation::SettledLate {
                    order_id,
                    operation,
                } => {
                    self.settled_late += 1;
                    if let Some(order_id) = order_id {
                        self.trace(
                            *order_id,
                            format!(
                                "consumer {}: {operation} refused, the lease had run out",
                                process.slot
                            ),
                        );
                    }
                }
                Observation::LeaseExtended { .. } => self.lease_extensions += 1,
                Observation::Reconnecting { dependency, reason } => {
                    // Whatever it held goes back to the broker with the
                    // connection: it is in nobody's hand until handed out again.
                    self.reconnects += 1;
                    self.in_hand.remove(process);
                    if let Some(order_id) = self.holding.remove(process) {
                        self.trace(
                            order_id,
                            format!(
                                "consumer {} loses the {dependency} ({reason}): the message goes back",
                                process.slot
                            ),
                        );
                    }
                }
            },
            LabEvent::Started { process, pid } => {
                self.pids.insert(*process, *pid);
            }
            LabEvent::Exited {
                process,
                exit,
                stopping,
            } => {
                self.pids.remove(process);
                self.in_hand.remove(process);
                self.metrics_addrs.remove(process);
                self.relay_metrics_addrs.remove(process);
                let killed = *exit == ExitKind::Killed { signal: 9 };
                if let Some(order_id) = self.holding.remove(process) {
                    if killed && !stopping {
                        self.trace(
                            order_id,
                            format!(
                                "consumer {} dies (signal 9); {}",
                                process.slot, self.comes_back
                            ),
                        );
                    }
                }
                let point = self.crashing.remove(process);
                let placed_every_order =
                    process.role == Role::Producer && *exit == ExitKind::Code(0);
                if !killed && !*stopping && !placed_every_order {
                    self.unplanned_exits += 1;
                }
                match process.role {
                    Role::Consumer if killed && !stopping => {
                        self.consumer_kills += 1;
                        *self
                            .kills_by_point
                            .entry(point.unwrap_or("unannounced").to_owned())
                            .or_default() += 1;
                    }
                    Role::Producer if killed => self.producer_kills += 1,
                    Role::Producer if *exit == ExitKind::Code(0) => self.producer_done = true,
                    Role::Relay if killed && !stopping => {
                        self.relay_kills += 1;
                        self.trace_all_in_flight(format!("relay {} dies (signal 9)", process.slot));
                    }
                    _ => {}
                }
            }
            LabEvent::GaveUp { process, reason } => {
                return Err(format!(
                    "the {} process gave up: {reason}",
                    process.role.name()
                ));
            }
        }
        Ok(())
    }

    /// A relay holds no single order; its death goes into every trace.
    fn trace_all_in_flight(&mut self, line: String) {
        let traced: Vec<uuid::Uuid> = self.traced.iter().copied().collect();
        for order_id in traced {
            if self.traces.contains_key(&order_id.to_string()) {
                self.trace(order_id, line.clone());
            }
        }
    }

    fn trace(&mut self, order_id: uuid::Uuid, line: String) {
        if self.traced.contains(&order_id) {
            self.traces
                .entry(order_id.to_string())
                .or_default()
                .push(line);
        }
    }

    fn idle(&self) -> bool {
        self.in_hand.values().all(|&n| n == 0)
    }
}

/// Groups requeue reasons by the PSP answer behind them (the client's error
/// messages start with the status code, or say it timed out).
fn requeue_cause(reason: &str) -> &'static str {
    if reason.starts_with("409") {
        "409 in flight"
    } else if reason.contains("did not answer in time") {
        "timeout"
    } else if reason.starts_with('5') {
        "5xx"
    } else {
        "other"
    }
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        // The charge id changes on every run; the book's traces leave it out.
        Outcome::Charged { .. } => "charged, committed, acked".to_owned(),
        Outcome::Duplicate => format!(
            "INSERT violates {}: ROLLBACK, ack (dedup hit)",
            consumer::dedup::PROCESSED_CONSTRAINT
        ),
        Outcome::Requeued { reason } => format!("requeued: {reason}"),
        Outcome::DeadLettered { reason } => format!("dead-lettered: {reason}"),
        Outcome::Lost { reason } => format!("lost: {reason}"),
    }
}

/// Runs `spec` end to end and returns the audited result. Everything the run
/// created (databases, queues, temporary files) is removed afterwards.
pub async fn execute(spec: &RunSpec, backend: BackendKind) -> anyhow::Result<RunReport> {
    let started = Instant::now();
    let shop = FreshDatabase::create("eo_shop", 5)
        .await
        .context("creating the run's shop database")?;
    let psp_db = FreshDatabase::create("eo_psp", 20)
        .await
        .context("creating the run's PSP database")?;
    let run_id = shop.name.trim_start_matches("eo_shop_").to_owned();
    let mut queue_spec = QueueSpec::new(backend, format!("eo.{run_id}.payments"))
        .with_visibility_timeout(spec.visibility_timeout)
        .with_max_receive_count(spec.max_receive_count)
        .with_partitions(spec.partitions)
        .with_durability(spec.durability);
    queue_spec.transactional_ack = spec.transactional_ack;
    queue_spec.kafka_brokers = spec.kafka_brokers.clone();
    let broker = Broker::connect_for(&queue_spec).await?;
    let work_dir = std::env::temp_dir().join(format!("effectively-once-{run_id}"));

    let result = run_in(
        spec,
        backend,
        &shop,
        &psp_db,
        &broker,
        &queue_spec,
        &work_dir,
        started,
    )
    .await;

    // Clean up whatever happened; keep the logs if the run failed. A CDC
    // run's replication slot goes first: it keeps its database from being
    // dropped, and its WAL from being recycled.
    if let ProducerKind::Cdc { .. } = spec.producer {
        if let Ok(admin) = databases::connect(&databases::admin_url(), 1).await {
            let _ = cdc::slot::drop_slots_of_database(&admin, &shop.name).await;
        }
        let _ = cdc::topic::delete_topics(
            &queue::kafka::brokers_from_env(),
            &cdc::worker::internal_topics(&format!("eo.{run_id}")),
        )
        .await;
    }
    // The config holds the run's database URL and PSP key: it goes whether
    // the run passed or failed (the logs beside it stay for a failed run).
    let _ = std::fs::remove_file(work_dir.join(CONFIG_FILE));
    if broker.delete(&queue_spec).await.is_err() {
        // The lab's own connection may not have survived a broker restart.
        if let Ok(fresh) = Broker::connect_for(&queue_spec).await {
            let _ = fresh.delete(&queue_spec).await;
        }
    }
    let _ = shop.drop_database().await;
    let _ = psp_db.drop_database().await;
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&work_dir);
    } else {
        eprintln!("process logs kept in {}", work_dir.display());
    }
    result
}

/// The run config the lab hands its processes, in the run's folder.
const CONFIG_FILE: &str = "run-config.json";

/// Writes `bytes` to a new file only its owner may read (mode 0600): it
/// holds credentials, and the temp folder is shared with every user.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // `mode` applies only to a file this call creates; one left over keeps
    // its own unless it is set here, before anything secret is written.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(bytes)
}

#[allow(clippy::too_many_arguments)]
async fn run_in(
    spec: &RunSpec,
    backend: BackendKind,
    shop: &FreshDatabase,
    psp_db: &FreshDatabase,
    broker: &Broker,
    queue_spec: &QueueSpec,
    work_dir: &PathBuf,
    started: Instant,
) -> anyhow::Result<RunReport> {
    shop::migrate(&shop.pool).await?;
    consumer::migrate(&shop.pool).await?;
    psp::migrate(&psp_db.pool).await?;
    let psp_config = psp::server::PspConfig {
        faults: spec.psp_faults.clone(),
        ..psp::server::PspConfig::default()
    };
    let api_key = psp_config.api_key.clone();
    let psp = psp::server::PspServer::start(psp_db.pool.clone(), psp_config, "127.0.0.1:0")
        .await
        .context("starting the PSP")?;
    let psp_base_url = psp.base_url();
    // Taken by a PSP outage while it lasts, and handed back serving again.
    let mut psp = Some(psp);
    broker.declare(queue_spec).await?;

    // Only its owner may list the run's folder: logs and markers go there.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let run_id = shop.name.trim_start_matches("eo_shop_");
    let mut cdc_relay = match spec.producer {
        ProducerKind::Cdc { delivery } => {
            anyhow::ensure!(
                backend == BackendKind::Kafka,
                "Debezium's relay writes to Kafka: run it with --backend kafka"
            );
            eprintln!(
                "starting Kafka Connect with Debezium ({}) ...",
                delivery.name()
            );
            Some(
                CdcRelay::start(
                    delivery,
                    run_id,
                    &shop.name,
                    &shop.url,
                    &queue_spec.name,
                    spec.connect_outage,
                    work_dir,
                )
                .await?,
            )
        }
        _ => None,
    };
    let config = RunConfig {
        run_id: shop.name.clone(),
        variant: spec.variant,
        producer: spec.producer,
        plan: spec.plan.clone(),
        shop_database_url: shop.url.clone(),
        psp_base_url,
        psp_api_key: api_key,
        psp_timeout_ms: spec.psp_timeout.as_millis() as u64,
        queue: queue_spec.clone(),
        prefetch: spec.prefetch,
        batch_size: spec.batch_size,
        heartbeat: spec.heartbeat,
        publish_pace_ms: spec.publish_pace.map(|pace| pace.as_millis() as u64),
        work_dir: work_dir.clone(),
    };
    let config_path = work_dir.join(CONFIG_FILE);
    write_private(&config_path, &serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("writing {}", config_path.display()))?;

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let executable = match &spec.executable {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("locating this executable")?,
    };
    let mut supervisor = Supervisor::new(executable, config_path, work_dir.clone(), events_tx);
    let mut tally = Tally {
        traced: spec.trace_orders.iter().copied().collect(),
        comes_back: match backend {
            BackendKind::Rabbitmq => "the broker requeues its unacked message",
            BackendKind::Sqs => {
                "its message stays hidden until the visibility timeout runs out, then comes back"
            }
            BackendKind::Kafka => {
                "its partition moves on when its session times out, and the next owner reads \
                 from the last committed offset"
            }
        },
        ..Tally::default()
    };
    let mut prober = spec
        .soak
        .map(|probe| crate::soak::Prober::new(probe, started));
    let run_databases = [shop.name.clone(), psp_db.name.clone()];
    let mut inspector = broker.inspector(queue_spec)?;
    let mut waiting_at_outage: Option<u64> = None;
    let mut outage_task: Option<OutageTask> = None;
    if spec.prefill {
        supervisor.start(Role::Producer, 0);
        record_until(&mut tally, &mut events, spec.deadline, |t| t.producer_done)
            .await
            .context("the producer did not finish filling the queue in time")?;
        if let Some(planned) = spec.outage.filter(|o| o.when == OutageWhen::QueueFilled) {
            // Every order waits in the queue: what the broker keeps of them
            // across the outage is all the consumers will ever see.
            waiting_at_outage = inspector.ready_count().await.ok();
            // Boxed: inlined, its state would deepen every chapter's future.
            let outcome = Box::pin(crate::outage::cause(planned, queue_spec.clone(), None)).await;
            outage_task = Some(OutageTask::Over(outcome));
        }
    }
    for slot in 0..spec.consumers {
        supervisor.start(Role::Consumer, slot);
    }
    if let ProducerKind::Outbox { relays, .. } = spec.producer {
        for slot in 0..relays {
            supervisor.start(Role::Relay, slot);
        }
    }
    if !spec.prefill {
        // Every consumer subscribed before the first order: otherwise the
        // first messages all go to whichever consumer connected first, and
        // the same seed would not replay the same interleaving.
        record_until(&mut tally, &mut events, spec.deadline, |t| {
            t.metrics_addrs.len() >= spec.consumers
        })
        .await
        .context("the consumers did not start in time")?;
        supervisor.start(Role::Producer, 0);
    }

    // Poison with an order id is settled like an order; count it in.
    let poison_orders = spec
        .plan
        .poison
        .iter()
        .filter(|p| matches!(p, crate::plan::Poison::KillsEveryConsumer { .. }))
        .count();
    let progress = Progress::new(
        &format!("{} on {}", spec.variant.name(), backend.name()),
        (spec.plan.orders.len() + poison_orders) as u64,
    );
    // After a broker restart the lab looks through a connection of its own
    // made afterwards: the one it started with went down with the broker.
    let mut reconnected: Option<Broker> = None;
    let deadline = Instant::now() + spec.deadline;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let outage_pending = |task: &Option<OutageTask>| {
        spec.outage.is_some() && task.as_ref().is_none_or(|task| !task.is_over())
    };
    let outcome: Result<bool, String> = loop {
        tokio::select! {
            Some(event) = events.recv() => {
                if let Err(reason) = tally.record(&event) {
                    break Err(reason);
                }
                progress.update(&tally);
            }
            _ = tick.tick() => {
                if Instant::now() > deadline {
                    break Ok(false);
                }
                if let Some(planned) = spec.outage {
                    let due = match planned.when {
                        OutageWhen::AfterSettled(settled) => tally.settled_orders.len() as u64 >= settled,
                        OutageWhen::QueueFilled => false,
                    };
                    if outage_task.is_none() && due {
                        let psp = match planned.outage {
                            crate::outage::Outage::PspUnreachable => psp.take(),
                            _ => None,
                        };
                        // What a broker that keeps messages in memory would lose.
                        waiting_at_outage = inspector.ready_count().await.ok();
                        outage_task = Some(OutageTask::Running(tokio::spawn(crate::outage::cause(planned, queue_spec.clone(), psp))));
                    }
                }
                if let Some(prober) = prober.as_mut() {
                    if let Err(error) = prober
                        .tick(&tally.pids, &mut tally.crashing, &shop.pool, &run_databases)
                        .await
                    {
                        break Err(format!("the soak's probe failed: {error:#}"));
                    }
                }
                if let Some(relay) = cdc_relay.as_mut() {
                    match relay.tick(&shop.pool).await {
                        Ok(Some(line)) => tally.trace_all_in_flight(line),
                        Ok(None) => {}
                        Err(error) => break Err(format!("the CDC relay failed: {error:#}")),
                    }
                }
                let quiet = tally.last_event.is_none_or(|t| t.elapsed() >= spec.quiet_period);
                let broker_came_back = spec.outage.is_some_and(|o| o.outage == crate::outage::Outage::BrokerRestart)
                    && !outage_pending(&outage_task);
                if broker_came_back && reconnected.is_none() {
                    if let Ok(fresh) = Broker::connect_for(queue_spec).await {
                        if let Ok(fresh_inspector) = fresh.inspector(queue_spec) {
                            inspector = fresh_inspector;
                            reconnected = Some(fresh);
                        }
                    }
                }
                if tally.producer_done && tally.idle() && quiet && !outage_pending(&outage_task)
                    && relay_drained(spec.producer, &shop.pool, &inspector, &tally, cdc_relay.as_ref()).await
                {
                    break Ok(true);
                }
            }
        }
    };
    if let Some(prober) = prober.as_mut() {
        // The end of the run, every process still up.
        let _ = prober.sample(&tally.pids, &shop.pool, &run_databases).await;
    }
    let consumer_metrics = scrape_all(&tally.metrics_addrs).await;
    let dead_letters = dead_letters(&inspector).await;
    let relay_metrics = scrape_all(&tally.relay_metrics_addrs).await;
    supervisor.stop().await;
    while let Ok(event) = events.try_recv() {
        let _ = tally.record(&event);
    }
    progress.finish(&tally);
    let outage = match outage_task {
        Some(task) => {
            let (times, handed_back) = task.outcome().await?.context("causing the outage")?;
            if handed_back.is_some() {
                psp = handed_back;
            }
            let planned = spec.outage.expect("a task only for a planned outage");
            Some(times.report(
                planned.outage,
                started,
                &tally.finished_at,
                waiting_at_outage,
            ))
        }
        None => None,
    };
    if let Some(psp) = psp {
        let _ = psp.shutdown().await;
    }
    let (connect_kills, topic_count) = match cdc_relay {
        Some(relay) => {
            let kills = relay.kills;
            let count = relay
                .finish(&queue_spec.name)
                .await
                .context("counting what Debezium wrote to the topic")?;
            (kills, Some(count))
        }
        None => (0, None),
    };
    let drained = outcome.map_err(|reason| anyhow::anyhow!(reason))?;
    if !drained {
        eprintln!(
            "warning: {} did not drain within {:?}; the audit below is of an unfinished run",
            spec.variant.name(),
            spec.deadline
        );
    }

    let audit = Audit::measure(&shop.pool, &psp_db.pool).await?;
    let mut double_charges_by_fault = std::collections::BTreeMap::new();
    for (order_id, extra) in &audit.extra_charges_by_order {
        let fault = match spec.plan.fault_of(order_id) {
            // The PSP's slow charges are planned outside the schedule.
            "no planned fault" if spec.psp_faults.slow_orders.contains(order_id) => "slow_charge",
            // Chapter 7 plans no fault per order: the records Debezium sent
            // again after the Connect kill are the only way to a second one.
            "no planned fault" if matches!(spec.producer, ProducerKind::Cdc { .. }) => {
                "sent_again_after_connect_kill"
            }
            fault => fault,
        };
        *double_charges_by_fault.entry(fault.to_owned()).or_insert(0) += extra;
    }
    Ok(RunReport {
        scenario: spec.scenario.clone(),
        variant: spec.variant.name().to_owned(),
        producer: spec.producer.name(),
        backend: backend.name().to_owned(),
        messages: spec.plan.orders.len(),
        seed: spec.plan.seed,
        double_charges: audit.double_charges,
        lost_events: audit.lost_events,
        deliveries: tally.deliveries,
        redeliveries: tally.redeliveries,
        dedup_hits: tally.dedup_hits,
        dedup_hit_rate: if tally.deliveries == 0 {
            0.0
        } else {
            tally.dedup_hits as f64 / tally.deliveries as f64
        },
        dead_lettered: tally.dead_lettered,
        requeued: tally.requeued.values().sum(),
        requeued_by_cause: tally.requeued.clone(),
        kills: tally.consumer_kills + tally.producer_kills + tally.relay_kills + connect_kills,
        consumer_kills: tally.consumer_kills,
        kills_by_point: tally.kills_by_point.clone(),
        producer_kills: tally.producer_kills,
        relay_kills: tally.relay_kills + connect_kills,
        republished: topic_count.map_or(tally.republished, |count| count.resent()),
        topic_records: topic_count,
        relay_metrics,
        audit,
        double_charges_by_fault,
        consumer_metrics,
        throughput_per_second: match (tally.first_received, tally.last_settled) {
            (Some(first), Some(last)) if last > first => {
                tally.settled as f64 / (last - first).as_secs_f64()
            }
            _ => 0.0,
        },
        visibility_timeout_ms: (backend == BackendKind::Sqs)
            .then_some(queue_spec.visibility_timeout_ms),
        max_receive_count: (backend == BackendKind::Sqs).then_some(queue_spec.max_receive_count),
        heartbeat: spec.heartbeat.is_some(),
        settled_late: tally.settled_late,
        lease_extensions: tally.lease_extensions,
        charge_time_p50_ms: percentile(&tally.charge_times_ms, 0.50),
        charge_time_p99_ms: percentile(&tally.charge_times_ms, 0.99),
        dead_letters,
        traces: tally.traces,
        outage,
        unplanned_exits: tally.unplanned_exits,
        reconnects: tally.reconnects,
        soak: prober.map(crate::soak::Prober::finish),
        drained,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// What an outage hands back: its moments, and the PSP if it took it.
type OutageOutcome = anyhow::Result<(OutageTimes, Option<psp::server::RunningPsp>)>;

/// An outage the run caused: one caused before the consumers started is
/// over already; one caused mid-run runs beside the run's loop.
enum OutageTask {
    Over(OutageOutcome),
    Running(tokio::task::JoinHandle<OutageOutcome>),
}

impl OutageTask {
    fn is_over(&self) -> bool {
        match self {
            OutageTask::Over(_) => true,
            OutageTask::Running(task) => task.is_finished(),
        }
    }

    async fn outcome(self) -> anyhow::Result<OutageOutcome> {
        match self {
            OutageTask::Over(outcome) => Ok(outcome),
            OutageTask::Running(task) => task.await.context("the outage task panicked"),
        }
    }
}

/// The `q` quantile (nearest rank) of `values`, 0 when there are none.
fn percentile(values: &[u64], q: f64) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    telemetry::nearest_rank(&sorted, q).unwrap_or(0)
}

/// What sits in the dead-letter queue at the end (up to 10), decoded where
/// the payload is a payment event.
async fn dead_letters(inspector: &queue::backend::Inspector) -> Vec<DeadLetterSummary> {
    match inspector.dead_letter_count().await {
        Ok(0) => return Vec::new(),
        Ok(_) => {}
        Err(error) => {
            eprintln!("warning: counting the dead-letter queue failed: {error}");
            return Vec::new();
        }
    }
    match inspector.peek_dead_letters(10).await {
        Ok(letters) => letters
            .into_iter()
            .map(|letter| DeadLetterSummary {
                order_id: payments::PaymentEvent::decode(&letter.payload)
                    .ok()
                    .map(|event| event.order_id.to_string()),
                payload_bytes: letter.payload.len(),
                reason: letter.reason,
            })
            .collect(),
        Err(error) => {
            eprintln!("warning: looking into the dead-letter queue failed: {error}");
            Vec::new()
        }
    }
}

/// Records events until `done` holds, for at most `limit`.
async fn record_until(
    tally: &mut Tally,
    events: &mut mpsc::UnboundedReceiver<LabEvent>,
    limit: Duration,
    done: impl Fn(&Tally) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done(tally) {
        let event = tokio::time::timeout_at(deadline.into(), events.recv())
            .await
            .context("timed out")?
            .context("the supervisor stopped")?;
        tally
            .record(&event)
            .map_err(|reason| anyhow::anyhow!(reason))?;
    }
    Ok(())
}

/// Nothing left to deliver. With an outbox, only when no row is pending.
/// With Debezium, the outbox rows are never marked: when every committed
/// order was settled by a consumer, with Connect up. (Connect's exactly-once
/// source leaves a transaction marker after each batch, one offset no
/// consumer ever acks, so the group's lag does not reach 0 there.)
async fn relay_drained(
    producer: ProducerKind,
    shop: &sqlx::PgPool,
    inspector: &queue::backend::Inspector,
    tally: &Tally,
    cdc_relay: Option<&CdcRelay>,
) -> bool {
    match producer {
        ProducerKind::Naive => inspector.is_empty().await.unwrap_or(false),
        ProducerKind::Outbox { .. } => {
            inspector.is_empty().await.unwrap_or(false)
                && shop::outbox_producer::pending_count(shop)
                    .await
                    .is_ok_and(|pending| pending == 0)
        }
        ProducerKind::Cdc { .. } => {
            cdc_relay.is_some_and(CdcRelay::is_up)
                && shop::committed_order_ids(shop).await.is_ok_and(|orders| {
                    orders
                        .iter()
                        .all(|order| tally.settled_orders.contains(order))
                })
        }
    }
}

/// What every live consumer (or relay) serves on `/metrics`, by slot.
async fn scrape_all(addrs: &HashMap<ProcessId, String>) -> Vec<ConsumerScrape> {
    let client = reqwest::Client::new();
    let mut addrs: Vec<(&ProcessId, &String)> = addrs.iter().collect();
    addrs.sort_by_key(|(process, _)| process.slot);
    let mut scrapes = Vec::new();
    for (process, addr) in addrs {
        let scraped = async {
            client
                .get(format!("http://{addr}/metrics"))
                .timeout(Duration::from_secs(5))
                .send()
                .await?
                .text()
                .await
        };
        match scraped.await {
            Ok(text) => scrapes.push(ConsumerScrape {
                consumer: process.slot,
                text,
            }),
            Err(error) => eprintln!("warning: scraping {addr}/metrics failed: {error}"),
        }
    }
    scrapes
}

/// A bar on a terminal; a line every few seconds anywhere else (CI logs).
struct Progress {
    bar: ProgressBar,
    label: String,
    plain: bool,
    last_line: std::cell::Cell<Instant>,
}

impl Progress {
    fn new(label: &str, orders: u64) -> Self {
        let plain = !std::io::stderr().is_terminal();
        let bar = if plain {
            ProgressBar::hidden()
        } else {
            // Runs side by side (the soak's brokers) draw one bar each.
            static BARS: std::sync::OnceLock<MultiProgress> = std::sync::OnceLock::new();
            let bar = BARS
                .get_or_init(MultiProgress::new)
                .add(ProgressBar::new(orders));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>32} [{bar:30}] {pos}/{len} orders settled  {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar
        };
        bar.set_prefix(label.to_owned());
        bar.set_length(orders);
        Self {
            bar,
            label: label.to_owned(),
            plain,
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }

    fn message(tally: &Tally) -> String {
        format!(
            "deliveries {} · redeliveries {} · kills {}",
            tally.deliveries,
            tally.redeliveries,
            tally.consumer_kills + tally.producer_kills
        )
    }

    fn update(&self, tally: &Tally) {
        self.bar.set_position(tally.settled_orders.len() as u64);
        self.bar.set_message(Self::message(tally));
        if self.plain && self.last_line.get().elapsed() >= Duration::from_secs(5) {
            self.last_line.set(Instant::now());
            eprintln!(
                "  {}: {}/{} orders settled, {}",
                self.label,
                tally.settled_orders.len(),
                self.bar.length().unwrap_or(0),
                Self::message(tally)
            );
        }
    }

    fn finish(&self, tally: &Tally) {
        self.bar.set_position(tally.settled_orders.len() as u64);
        self.bar.finish_with_message(Self::message(tally));
        if self.plain {
            eprintln!(
                "  {}: done, {}/{} orders settled, {}",
                self.label,
                tally.settled_orders.len(),
                self.bar.length().unwrap_or(0),
                Self::message(tally)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_run_config_is_readable_by_its_owner_only() {
        let dir = std::env::temp_dir().join(format!("eo-private-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(CONFIG_FILE);
        // Even over a file left world-readable.
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"{\"psp_api_key\":\"secret\"}").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
