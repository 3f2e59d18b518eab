//! One level, run and graded: provision, publish, let the reader's
//! consumers work under the level's faults, drain, and count from the PSP's
//! ledger.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use chaos_lab::audit::Audit;
use databases::FreshDatabase;
use payments::PaymentEvent;
use psp::{PspConfig, PspServer};
use queue::backend::{BackendKind, Broker, Inspector, QueueSpec};
use queue::OutgoingMessage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uuid::Uuid;

use crate::levels::{poison_messages, Level, Plan};
use crate::processes::ReaderConsumers;

/// How the reader's consumer is run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The shell command that starts one consumer process.
    pub command: String,
    pub backend: BackendKind,
    /// Competing consumer processes.
    pub consumers: usize,
    /// Orders per level; each level's own default if `None`.
    pub orders: Option<usize>,
    pub seed: u64,
}

/// What one level measured.
#[derive(Debug, Clone)]
pub struct LevelGrade {
    pub level: Level,
    pub backend: BackendKind,
    pub seed: u64,
    pub audit: Audit,
    /// Messages published, duplicates and bad ones included.
    pub published: usize,
    pub bad_messages: usize,
    pub dead_lettered: u64,
    /// Up to ten reasons read back from the dead-letter queue ("" when the
    /// broker moved the message and no reason came with it).
    pub dead_letter_reasons: Vec<String>,
    pub kills: u64,
    pub exits: u64,
    pub exit_statuses: Vec<String>,
    /// Everything charged or dead-lettered and the queue empty, before the
    /// grader gave up waiting.
    pub drained: bool,
    pub elapsed: Duration,
    /// The consumers' logs, kept when the level failed.
    pub logs: Option<PathBuf>,
}

/// More exits on its own than this in one level is a crash loop.
pub const CRASH_LOOP_EXITS: u64 = 3;

impl LevelGrade {
    /// Why the level failed; empty when it passed.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if self.audit.double_charges > 0 {
            failures.push(format!(
                "{} double charge(s): {} order(s) charged more than once",
                self.audit.double_charges,
                self.audit.extra_charges_by_order.len()
            ));
        }
        if self.audit.lost_events > 0 {
            failures.push(format!("{} order(s) never charged", self.audit.lost_events));
        }
        if self.dead_lettered < self.bad_messages as u64 {
            failures.push(format!(
                "{} of {} bad messages reached the dead-letter queue",
                self.dead_lettered, self.bad_messages
            ));
        }
        if self.exits > CRASH_LOOP_EXITS {
            failures.push(format!(
                "consumer processes exited on their own {} times (a crash loop)",
                self.exits
            ));
        }
        if self.audit.unexpected_charges > 0 {
            failures.push(format!(
                "{} charge(s) for orders that were never placed (a bad message was charged)",
                self.audit.unexpected_charges
            ));
        }
        failures
    }

    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }
}

/// Runs `level` against the reader's consumer and grades it.
pub async fn run_level(settings: &Settings, level: Level) -> anyhow::Result<LevelGrade> {
    let started = Instant::now();
    let seed = settings.seed.wrapping_add(level.number() as u64);
    let plan = level.plan(settings.backend, settings.orders, seed);
    let shop = FreshDatabase::create("grade_shop", 2)
        .await
        .context("creating the consumer's database")?;
    let psp_db = FreshDatabase::create("grade_psp", 10)
        .await
        .context("creating the PSP's database")?;
    let run_id = shop.name.trim_start_matches("grade_shop_").to_owned();
    let queue = QueueSpec::new(settings.backend, format!("grade-{run_id}"))
        .with_visibility_timeout(plan.visibility_timeout);
    let broker = Broker::connect(settings.backend).await?;
    let log_dir = std::env::temp_dir().join(format!("effectively-once-grade-{run_id}"));

    let result = async {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&log_dir)?;
        let psp_config = PspConfig {
            faults: plan.psp_faults.clone(),
            ..PspConfig::default()
        };
        let api_key = psp_config.api_key.clone();
        let psp = PspServer::start(psp_db.pool.clone(), psp_config, "127.0.0.1:0")
            .await
            .context("starting the PSP")?;
        broker.declare(&queue).await?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (expected, messages, bad_messages) = messages(settings.backend, &plan, &mut rng);
        let published = messages.len();

        let env = consumer_env(&queue, &shop.url, &psp.base_url(), &api_key, &plan);
        let mut consumers =
            ReaderConsumers::start(&settings.command, env, settings.consumers, &log_dir)
                .context("starting the consumer command")?;
        let publishing =
            publish_in_background(broker.publisher(&queue).await?, messages, plan.publish_over);
        let inspector = broker.inspector(&queue)?;
        let drained = drive(
            &mut consumers,
            &inspector,
            &psp_db.pool,
            &expected,
            bad_messages,
            &plan,
            &mut rng,
            &publishing,
        )
        .await?;
        publishing
            .await?
            .context("publishing the level's messages")?;
        let (kills, exits, exit_statuses) = (
            consumers.kills,
            consumers.exits,
            consumers.exit_statuses.clone(),
        );
        consumers.stop(Duration::from_secs(5)).await;

        let counts = psp::ledger::charge_counts_by_order(&psp_db.pool).await?;
        let audit = Audit::from_counts(&expected, &counts, 0);
        let dead_lettered = inspector.dead_letter_count().await?;
        let dead_letter_reasons = inspector
            .peek_dead_letters(10)
            .await?
            .into_iter()
            .map(|letter| letter.reason)
            .collect();
        let _ = psp.shutdown().await;
        Ok::<_, anyhow::Error>(LevelGrade {
            level,
            backend: settings.backend,
            seed: settings.seed,
            audit,
            published,
            bad_messages,
            dead_lettered,
            dead_letter_reasons,
            kills,
            exits,
            exit_statuses,
            drained,
            elapsed: started.elapsed(),
            logs: None,
        })
    }
    .await;

    let _ = broker.delete(&queue).await;
    let _ = shop.drop_database().await;
    let _ = psp_db.drop_database().await;
    match result {
        Ok(grade) if grade.passed() => {
            let _ = std::fs::remove_dir_all(&log_dir);
            Ok(grade)
        }
        Ok(grade) => Ok(LevelGrade {
            logs: Some(log_dir),
            ..grade
        }),
        Err(error) => Err(error.context(format!("consumer logs in {}", log_dir.display()))),
    }
}

/// The contract's environment (the consumer contract page lists it).
fn consumer_env(
    queue: &QueueSpec,
    database_url: &str,
    psp_url: &str,
    psp_api_key: &str,
    plan: &Plan,
) -> Vec<(String, String)> {
    let sqs = queue::sqs::SqsSettings::from_env();
    let topic = queue::kafka::KafkaTopology::new(&queue.name);
    [
        ("EO_BACKEND", queue.backend.name().to_owned()),
        ("EO_QUEUE", queue.name.clone()),
        ("EO_AMQP_URL", queue::rabbitmq::url_from_env()),
        ("EO_SQS_ENDPOINT", sqs.endpoint),
        ("EO_SQS_REGION", sqs.region),
        ("EO_SQS_ACCESS_KEY", sqs.access_key),
        ("EO_SQS_SECRET_KEY", sqs.secret_key),
        ("EO_KAFKA_BROKERS", queue::kafka::brokers_from_env()),
        ("EO_KAFKA_GROUP", topic.group()),
        ("EO_SHOP_DATABASE_URL", database_url.to_owned()),
        ("EO_PSP_URL", psp_url.to_owned()),
        ("EO_PSP_API_KEY", psp_api_key.to_owned()),
        (
            "EO_PSP_TIMEOUT_MS",
            plan.psp_timeout.as_millis().to_string(),
        ),
        (
            "EO_VISIBILITY_TIMEOUT_SECS",
            queue.visibility_timeout().as_secs().to_string(),
        ),
        ("EO_MAX_RECEIVES", queue.max_receive_count.to_string()),
        ("EO_PARTITIONS", queue.partitions.to_string()),
        ("EO_CONSUMER_METRICS_ADDR", "127.0.0.1:0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The level's messages in publishing order: its orders (some twice) with
/// the bad messages a third of the way in. Returns the orders placed, the
/// messages and how many of them are bad.
fn messages(
    backend: BackendKind,
    plan: &Plan,
    rng: &mut ChaCha8Rng,
) -> (HashSet<String>, Vec<OutgoingMessage>, usize) {
    let bad = if plan.poison {
        poison_messages(backend)
    } else {
        Vec::new()
    };
    let mut expected = HashSet::new();
    let mut messages = Vec::new();
    for index in 0..plan.orders {
        let event = PaymentEvent::new(
            Uuid::from_u128(rng.gen()),
            rng.gen_range(100..100_000),
            "EUR",
            chrono::Utc::now(),
        );
        let message = OutgoingMessage {
            key: event.order_id.to_string(),
            message_id: event.event_id.to_string(),
            payload: event.encode(),
        };
        if rng.gen_bool(plan.published_twice) {
            messages.push(message.clone());
        }
        messages.push(message);
        expected.insert(event.order_id.to_string());
        if index == plan.orders / 3 {
            for (_, payload) in &bad {
                let id = Uuid::from_u128(rng.gen()).to_string();
                messages.push(OutgoingMessage {
                    key: id.clone(),
                    message_id: id,
                    payload: payload.clone(),
                });
            }
        }
    }
    (expected, messages, bad.len())
}

/// Publishes `messages` spread over `over` (all at once if zero), from a
/// task of its own, while the consumers work and the kills go on.
fn publish_in_background(
    publisher: Box<dyn queue::Publisher>,
    messages: Vec<OutgoingMessage>,
    over: Duration,
) -> tokio::task::JoinHandle<Result<(), queue::QueueError>> {
    let pace = over / messages.len().max(1) as u32;
    tokio::spawn(async move {
        for message in &messages {
            publisher.publish(message).await?;
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
        }
        Ok(())
    })
}

/// Lets the consumers work, killing one now and then if the plan says so,
/// until every order is charged, every bad message dead-lettered and the
/// queue empty, or until nothing has moved for a while. True if drained.
#[allow(clippy::too_many_arguments)]
async fn drive(
    consumers: &mut ReaderConsumers,
    inspector: &Inspector,
    psp: &sqlx::PgPool,
    expected: &HashSet<String>,
    bad_messages: usize,
    plan: &Plan,
    rng: &mut ChaCha8Rng,
    publishing: &tokio::task::JoinHandle<Result<(), queue::QueueError>>,
) -> anyhow::Result<bool> {
    // Long enough for a held PSP answer, a consumer's timeout, a lease and
    // a Kafka rebalance to pass without anything visibly moving.
    let quiet_limit = plan
        .psp_faults
        .lost_response_hold
        .min(Duration::from_secs(10))
        + plan.psp_timeout
        + plan.visibility_timeout
        + Duration::from_secs(15);
    let mut last_progress = Instant::now();
    let mut last_seen = (0i64, 0u64);
    let mut next_kill = plan.kill_gap.map(|gap| Instant::now() + between(rng, gap));
    let mut next_check = Instant::now();
    loop {
        consumers.tend()?;
        if let (Some(at), Some(gap)) = (next_kill, plan.kill_gap) {
            if Instant::now() >= at {
                consumers.kill_one(rng).await;
                next_kill = Some(Instant::now() + between(rng, gap));
            }
        }
        if Instant::now() >= next_check {
            next_check = Instant::now() + Duration::from_millis(500);
            let counts: HashMap<String, i64> = psp::ledger::charge_counts_by_order(psp).await?;
            let dead = inspector.dead_letter_count().await?;
            let seen = (counts.values().sum::<i64>(), dead);
            if seen != last_seen {
                last_seen = seen;
                last_progress = Instant::now();
            }
            let all_charged = expected.iter().all(|order| counts.contains_key(order));
            if publishing.is_finished()
                && all_charged
                && dead >= bad_messages as u64
                && inspector.is_empty().await?
            {
                // A duplicate being handled right now shows up in a moment.
                tokio::time::sleep(Duration::from_secs(1)).await;
                if inspector.is_empty().await? {
                    return Ok(true);
                }
            }
            if last_progress.elapsed() > quiet_limit && publishing.is_finished() {
                return Ok(false);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn between(rng: &mut ChaCha8Rng, (low, high): (Duration, Duration)) -> Duration {
    Duration::from_millis(rng.gen_range(low.as_millis() as u64..=high.as_millis() as u64))
}
