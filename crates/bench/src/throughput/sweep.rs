//! The sweep: every broker, batch size and PSP latency asked for, naive and
//! hardened in each, and pgbench's rate of the same transactions for each
//! batch size; then the goals as ratios of figures measured in this run.

use std::path::PathBuf;
use std::time::Duration;

use chaos_lab::BackendKind;
use clap::Args;
use databases::cleanup::parse_duration;

use super::pgbench::{self, PgbenchRate};
use consumer::metrics::Step;

use super::{median, race, step_ms_per_message, Setting, Workload};

/// SQS hands out at most this many messages per receive: a bigger batch
/// size would measure batches of 10 under another name.
const SQS_MAX_BATCH: usize = 10;

#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// Brokers to measure, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rabbitmq,sqs,kafka"
    )]
    pub backends: Vec<BackendKind>,
    /// Deliveries per receive; 1 is the one-at-a-time consumer every ratio
    /// is measured against, so it is always measured.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    pub batch_sizes: Vec<usize>,
    /// Latencies the PSP adds to every charge, in milliseconds.
    #[arg(long, value_delimiter = ',', default_value = "0,20")]
    pub psp_latencies_ms: Vec<u64>,
    /// Orders per variant and run.
    #[arg(long, default_value_t = 1000)]
    pub messages: usize,
    /// Competing consumer processes, and pgbench's clients.
    #[arg(long, default_value_t = 2)]
    pub consumers: usize,
    /// Rounds per setting; the tables show each variant's median.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// How long pgbench runs for each batch size.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub pgbench_time: Duration,
    /// Write an SVG chart of throughput against batch size here.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The medians of one setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Cell {
    pub setting: Setting,
    pub naive: f64,
    pub hardened: f64,
    /// Milliseconds per message in each step, in the last round.
    pub naive_steps: [f64; Step::ALL.len()],
    pub hardened_steps: [f64; Step::ALL.len()],
}

/// Everything the sweep measured.
#[derive(Debug, Clone)]
pub(crate) struct Sweep {
    pub cells: Vec<Cell>,
    pub pgbench: Vec<PgbenchRate>,
    pub consumers: usize,
    pub messages: usize,
}

impl Sweep {
    pub fn cell(
        &self,
        backend: BackendKind,
        batch_size: usize,
        psp_latency: Duration,
    ) -> Option<&Cell> {
        self.cells.iter().find(|cell| {
            cell.setting
                == Setting {
                    backend,
                    batch_size,
                    psp_latency,
                }
        })
    }

    pub fn pgbench(&self, batch_size: usize) -> Option<&PgbenchRate> {
        self.pgbench
            .iter()
            .find(|rate| rate.batch_size == batch_size)
    }
}

/// Measures everything `args` asks for and prints the tables, the goals
/// and (if asked) the chart.
pub async fn sweep(args: SweepArgs) -> anyhow::Result<()> {
    let mut batch_sizes = args.batch_sizes.clone();
    batch_sizes.push(1);
    batch_sizes.sort_unstable();
    batch_sizes.dedup();
    anyhow::ensure!(
        batch_sizes.iter().all(|&size| size >= 1),
        "a batch holds at least one delivery"
    );
    let workload = Workload {
        messages: args.messages,
        consumers: args.consumers,
        seed: args.seed,
    };
    let settings: Vec<Setting> = args
        .psp_latencies_ms
        .iter()
        .flat_map(|&ms| {
            let batch_sizes = &batch_sizes;
            args.backends.iter().flat_map(move |&backend| {
                batch_sizes
                    .iter()
                    .filter(move |&&size| backend != BackendKind::Sqs || size <= SQS_MAX_BATCH)
                    .map(move |&batch_size| Setting {
                        backend,
                        batch_size,
                        psp_latency: Duration::from_millis(ms),
                    })
            })
        })
        .collect();
    eprintln!(
        "{} settings × {} round(s), naive and hardened, {} orders each, {} consumers; then \
         pgbench for {:?} per batch size",
        settings.len(),
        args.rounds,
        args.messages,
        args.consumers,
        args.pgbench_time
    );
    let mut cells = Vec::with_capacity(settings.len());
    for (i, &setting) in settings.iter().enumerate() {
        let (mut naive, mut hardened) = (Vec::new(), Vec::new());
        let mut last = None;
        for round in 1..=args.rounds.max(1) {
            eprintln!(
                "[{}/{}] {} · batch {} · PSP {} ms · round {round}",
                i + 1,
                settings.len(),
                setting.backend.name(),
                setting.batch_size,
                setting.psp_latency.as_millis()
            );
            let raced = race(setting, workload).await?;
            naive.push(raced.naive.throughput_per_second);
            hardened.push(raced.hardened.throughput_per_second);
            last = Some(raced);
        }
        let steps = |report| step_ms_per_message(report);
        let last = last.expect("at least one round");
        cells.push(Cell {
            setting,
            naive: median(naive),
            hardened: median(hardened),
            naive_steps: steps(&last.naive),
            hardened_steps: steps(&last.hardened),
        });
    }
    let mut pgbench = Vec::with_capacity(batch_sizes.len());
    for &batch_size in &batch_sizes {
        eprintln!("pgbench · batch {batch_size} · {} clients", args.consumers);
        pgbench.push(pgbench::measure(batch_size, args.consumers, args.pgbench_time).await?);
    }
    let sweep = Sweep {
        cells,
        pgbench,
        consumers: args.consumers,
        messages: args.messages,
    };
    super::report::print_sweep(&sweep, &args.psp_latencies_ms, &batch_sizes);
    if let Some(path) = &args.chart {
        super::chart::draw(path, &sweep, &args.psp_latencies_ms, &batch_sizes)?;
        eprintln!("chart written to {}", path.display());
    }
    Ok(())
}
