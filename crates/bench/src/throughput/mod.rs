//! Naive against hardened consumer throughput, on one broker and the same
//! orders, in one run; and the sweep of chapter 2: every broker, batch sizes
//! 1, 10 and 50, a PSP answering at once and one taking 20 ms, against the
//! rate Postgres itself allows for the same transactions ([`pgbench`]).
//!
//! Each run fills a fresh queue with the same orders, then starts the
//! consumers as real processes and times them from the first receive to the
//! last settle (the chaos lab's `throughput_per_second`). The naive and the
//! hardened consumer alternate within every round, so that a slow moment of
//! the machine hits both. Where each message's time went comes from the
//! consumers' own `step_seconds` histograms, scraped before they stop.
//!
//! The binary (`crates/bench/src/bin/consumer-throughput.rs`) re-executes
//! itself as the lab's consumer processes, so it must hand over to
//! [`chaos_lab::Role::from_env`] first.

mod chart;
mod pgbench;
mod report;
mod sweep;

use std::time::Duration;

use chaos_lab::plan::{ChaosPlan, FaultMix};
use chaos_lab::run::{execute, RunSpec};
use chaos_lab::{BackendKind, RunReport};
use consumer::metrics::Step;
use consumer::Variant;

pub use report::{print_rounds, print_steps};
pub use sweep::{sweep, SweepArgs};

/// What one pair of runs holds fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub backend: BackendKind,
    /// Deliveries each consumer takes per receive, both variants; the
    /// hardened one handles them as one batch.
    pub batch_size: usize,
    /// Latency the PSP adds to every charge.
    pub psp_latency: Duration,
}

/// The orders and the consumers of every run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub messages: usize,
    /// Competing consumer processes.
    pub consumers: usize,
    pub seed: u64,
}

/// One round: both variants on the same orders.
#[derive(Debug)]
pub struct Race {
    pub naive: RunReport,
    pub hardened: RunReport,
}

impl Race {
    pub fn ratio(&self) -> f64 {
        self.hardened.throughput_per_second / self.naive.throughput_per_second
    }
}

/// Runs the naive consumer, then the hardened one, on the same orders
/// waiting in a fresh queue. Fails if either did not charge every order
/// exactly once: a benchmark of a consumer that loses or double-charges
/// measures nothing worth printing.
pub async fn race(setting: Setting, workload: Workload) -> anyhow::Result<Race> {
    let plan = ChaosPlan::generate(workload.seed, workload.messages, FaultMix::NONE);
    let spec = |variant| {
        let mut spec = RunSpec::new(variant, plan.clone(), workload.consumers);
        spec.scenario = "throughput".into();
        spec.prefill = true;
        spec.batch_size = setting.batch_size;
        spec.psp_faults.latency = setting.psp_latency;
        spec
    };
    let naive = measured(execute(&spec(Variant::Naive), setting.backend).await?)?;
    let hardened = measured(execute(&spec(Variant::Hardened), setting.backend).await?)?;
    Ok(Race { naive, hardened })
}

/// `rounds` races of one setting: one table row per round, the median
/// ratio, and where each message's time went in the last round.
pub async fn compare(setting: Setting, workload: Workload, rounds: usize) -> anyhow::Result<()> {
    eprintln!(
        "{}: {} messages, {} consumers, {rounds} rounds, PSP latency {} ms, batches of {}",
        setting.backend.name(),
        workload.messages,
        workload.consumers,
        setting.psp_latency.as_millis(),
        setting.batch_size
    );
    let mut races = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        races.push(race(setting, workload).await?);
    }
    print_rounds(&races);
    if let Some(last) = races.last() {
        print_steps(last);
    }
    Ok(())
}

fn measured(report: RunReport) -> anyhow::Result<RunReport> {
    anyhow::ensure!(report.drained, "{} did not drain", report.variant);
    anyhow::ensure!(
        report.double_charges == 0 && report.lost_events == 0,
        "{}: a fault-free run must charge every order once ({} double, {} lost)",
        report.variant,
        report.double_charges,
        report.lost_events
    );
    Ok(report)
}

/// The median of some figures; NaN when there are none.
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Σ `step_seconds_sum` per step over the consumers, in ms, divided by the
/// messages they handled (Σ `processing_seconds_count`). A batch's step is
/// counted once for all its messages, so this is what each message cost.
pub fn step_ms_per_message(report: &RunReport) -> [f64; Step::ALL.len()] {
    let mut sums = [0.0; Step::ALL.len()];
    let mut messages = 0.0;
    for (name, value) in samples(report) {
        if name == "processing_seconds_count" {
            messages += value;
        }
        for (i, step) in Step::ALL.iter().enumerate() {
            if name == format!("step_seconds_sum{{step=\"{}\"}}", step.name()) {
                sums[i] += value;
            }
        }
    }
    if messages == 0.0 {
        return sums;
    }
    sums.map(|seconds| 1000.0 * seconds / messages)
}

/// Σ `processing_seconds_sum` / Σ `processing_seconds_count` over the
/// consumers, in ms.
pub fn mean_processing_ms(report: &RunReport) -> f64 {
    let (mut sum, mut count) = (0.0, 0.0);
    for (name, value) in samples(report) {
        match name {
            "processing_seconds_sum" => sum += value,
            "processing_seconds_count" => count += value,
            _ => {}
        }
    }
    if count == 0.0 {
        0.0
    } else {
        1000.0 * sum / count
    }
}

/// Every `name value` line of the consumers' last scrapes.
fn samples(report: &RunReport) -> impl Iterator<Item = (&str, f64)> {
    report.consumer_metrics.iter().flat_map(|scrape| {
        scrape.text.lines().filter_map(|line| {
            let mut parts = line.split_whitespace();
            let name = parts.next()?;
            let value = parts.next()?.parse::<f64>().ok()?;
            Some((name, value))
        })
    })
}
