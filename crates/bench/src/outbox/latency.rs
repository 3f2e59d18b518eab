//! The latency and the queries of each relay mode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use databases::cleanup::format_duration;
use relay::{RelayConfig, Wake};
use uuid::Uuid;

use super::harness::{
    queries_so_far, ArrivalConsumer, Commit, Producer, RelayGroup, Stage, TimedPublisher,
};
use super::{IdleArgs, LatencyArgs};

/// The three relays the chapter compares, with how the tables name them.
fn wake_modes() -> [(&'static str, Wake); 3] {
    [
        ("NOTIFY", RelayConfig::default().wake),
        (
            "poll 100 ms",
            Wake::Poll {
                interval: Duration::from_millis(100),
            },
        ),
        (
            "poll 1 s",
            Wake::Poll {
                interval: Duration::from_secs(1),
            },
        ),
    ]
}

/// How long a relay runs before anything is counted: its LISTEN and first
/// (empty) claim are start-up, not steady state.
pub(crate) const SETTLE: Duration = Duration::from_secs(1);
/// How long the orders of a run may take to arrive before the run fails.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(30);

pub(crate) struct ModeResult {
    pub(crate) label: &'static str,
    pub(crate) wake: Wake,
    pub(crate) idle: Option<QueryWindow>,
    pub(crate) load: Option<LoadResult>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct QueryWindow {
    pub(crate) queries: u64,
    pub(crate) over: Duration,
}

impl QueryWindow {
    pub(crate) fn per_second(&self) -> f64 {
        self.queries as f64 / self.over.as_secs_f64()
    }
}

pub(crate) struct LoadResult {
    /// Orders placed in the measured window.
    pub(crate) events: usize,
    pub(crate) latencies: Latencies,
    pub(crate) queries: QueryWindow,
}

pub(crate) async fn relay_modes(
    idle: Option<&IdleArgs>,
    load: Option<&LatencyArgs>,
) -> anyhow::Result<Vec<ModeResult>> {
    if let Some(load) = load {
        ensure!(load.rate > 0, "--rate must be at least 1");
        ensure!(!load.duration.is_zero(), "--duration must be longer than 0");
    }
    let mut results = Vec::new();
    for (label, wake) in wake_modes() {
        let stage = Stage::open("eo_bench_relay").await?;
        let outcome = relay_mode(&stage, label, wake, idle, load).await;
        results.push(stage.finish(outcome).await?);
    }
    Ok(results)
}

async fn relay_mode(
    stage: &Stage,
    label: &'static str,
    wake: Wake,
    idle: Option<&IdleArgs>,
    load: Option<&LatencyArgs>,
) -> anyhow::Result<ModeResult> {
    let confirms = Arc::new(Mutex::new(HashMap::new()));
    let publisher = TimedPublisher {
        inner: Arc::new(stage.broker.publisher(&stage.topology).await?),
        confirmed: confirms.clone(),
    };
    let consumer = ArrivalConsumer::spawn(stage.broker.receiver(&stage.topology, 1000).await?);
    let config = RelayConfig {
        wake,
        ..RelayConfig::default()
    };
    let relays = RelayGroup::start(&stage.db.url, vec![Arc::new(publisher)], config).await?;

    let measured = async {
        tokio::time::sleep(SETTLE).await;
        let idle = match idle {
            Some(idle) => {
                eprintln!(
                    "{label}: idle for {}, counting queries",
                    format_duration(idle.duration)
                );
                Some(count_queries(idle.duration).await)
            }
            None => None,
        };
        let load = match load {
            Some(load) => {
                Some(relay_under_load(stage, label, load, &confirms, &consumer, &relays).await?)
            }
            None => None,
        };
        relays.check_running()?;
        anyhow::Ok(ModeResult {
            label,
            wake,
            idle,
            load,
        })
    }
    .await;
    let relays_stopped = relays.stop().await;
    let consumer_stopped = consumer.stop().await;
    let result = measured?;
    relays_stopped?;
    consumer_stopped?;
    Ok(result)
}

async fn count_queries(over: Duration) -> QueryWindow {
    let before = queries_so_far();
    let started = Instant::now();
    tokio::time::sleep(over).await;
    QueryWindow {
        queries: queries_so_far() - before,
        over: started.elapsed(),
    }
}

async fn relay_under_load(
    stage: &Stage,
    label: &str,
    load: &LatencyArgs,
    confirms: &Arc<Mutex<HashMap<Uuid, Instant>>>,
    consumer: &ArrivalConsumer,
    relays: &RelayGroup,
) -> anyhow::Result<LoadResult> {
    eprintln!(
        "{label}: {} orders/s, {} warm-up then {} measured",
        load.rate,
        format_duration(load.warmup),
        format_duration(load.duration)
    );
    let producer = Producer::spawn(&stage.db.url, load.rate)?;
    tokio::time::sleep(load.warmup).await;
    let (from, before) = (Instant::now(), queries_so_far());
    tokio::time::sleep(load.duration).await;
    let to = Instant::now();
    let queries = QueryWindow {
        queries: queries_so_far() - before,
        over: to - from,
    };
    let commits = producer.stop().await?;
    eprintln!(
        "{label}: {} orders committed, waiting for their delivery",
        commits.len()
    );
    wait_delivered(&commits, confirms, &consumer.arrivals, relays).await?;

    let measured: Vec<&Commit> = commits
        .iter()
        .filter(|commit| commit.at >= from && commit.at < to)
        .collect();
    Ok(LoadResult {
        events: measured.len(),
        latencies: latencies(&measured, confirms, &consumer.arrivals),
        queries,
    })
}

/// Commit → confirm and commit → receive of each commit, in milliseconds,
/// each sorted.
///
/// An instant before the commit's (the producer noted its commit late) counts
/// as 0 ms; `early` says how many of those there were.
pub(crate) fn latencies(
    commits: &[&Commit],
    confirms: &Mutex<HashMap<Uuid, Instant>>,
    arrivals: &Mutex<HashMap<Uuid, Instant>>,
) -> Latencies {
    let confirms = confirms.lock().expect("confirms lock");
    let arrivals = arrivals.lock().expect("arrivals lock");
    let mut early = 0;
    let mut since = |commit: &Commit, at: Option<&Instant>| {
        at.map(|at| {
            if *at < commit.at {
                early += 1;
            }
            at.saturating_duration_since(commit.at).as_secs_f64() * 1e3
        })
    };
    let mut confirm: Vec<f64> = commits
        .iter()
        .filter_map(|c| since(c, confirms.get(&c.order_id)))
        .collect();
    let mut receive: Vec<f64> = commits
        .iter()
        .filter_map(|c| since(c, arrivals.get(&c.order_id)))
        .collect();
    confirm.sort_by(f64::total_cmp);
    receive.sort_by(f64::total_cmp);
    Latencies {
        confirm,
        receive,
        early,
    }
}

/// Commit → confirm and commit → receive, milliseconds, each sorted.
pub(crate) struct Latencies {
    pub(crate) confirm: Vec<f64>,
    pub(crate) receive: Vec<f64>,
    /// Confirms and receives that came before the producer noted the
    /// commit, counted as 0 ms.
    pub(crate) early: usize,
}

/// Waits until every commit was confirmed to the relay and received by the
/// consumer; fails after [`DELIVERY_DEADLINE`] or when a relay stopped.
pub(crate) async fn wait_delivered(
    commits: &[Commit],
    confirms: &Mutex<HashMap<Uuid, Instant>>,
    arrivals: &Mutex<HashMap<Uuid, Instant>>,
    relays: &RelayGroup,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + DELIVERY_DEADLINE;
    loop {
        let missing = {
            let confirms = confirms.lock().expect("confirms lock");
            let arrivals = arrivals.lock().expect("arrivals lock");
            commits
                .iter()
                .filter(|c| {
                    !confirms.contains_key(&c.order_id) || !arrivals.contains_key(&c.order_id)
                })
                .count()
        };
        if missing == 0 {
            return Ok(());
        }
        relays.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "{missing} of {} committed orders were not delivered within {}",
                commits.len(),
                format_duration(DELIVERY_DEADLINE)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
