//! The command line every chapter shares, and the code that runs a chapter:
//! `chNN-name [--backend rabbitmq|sqs|kafka] [--messages N] [--seed S] [--json]`.

use std::future::Future;
use std::process::ExitCode;

use clap::Parser;
use queue::backend::BackendKind;

use crate::plan::{ChaosPlan, FaultMix};
use crate::report::{ChapterReport, Claim, RunReport};
use crate::roles::Role;
use crate::run::{self, RunSpec};

#[derive(Debug, Clone, Parser)]
pub struct ChapterArgs<Extra: clap::Args = NoExtraArgs> {
    /// Which broker carries the payment events (default: the chapter's own).
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// How many orders the shop places (default: the chapter's own).
    #[arg(long)]
    pub messages: Option<usize>,
    /// Seed of the fault schedule (default: random, printed so it can be replayed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// How many consumer processes compete for the queue.
    #[arg(long, default_value_t = 3)]
    pub consumers: usize,
    /// Print one JSON object instead of the Markdown table.
    #[arg(long)]
    pub json: bool,
    /// The chapter's own arguments, if it has any.
    #[command(flatten)]
    pub extra: Extra,
}

/// When set, a chapter also writes its report as JSON to this path.
pub const REPORT_JSON_ENV: &str = "EO_REPORT_JSON";

/// For chapters with no arguments of their own.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct NoExtraArgs {}

/// A chapter's identity and defaults.
pub struct Chapter {
    pub id: &'static str,
    pub title: &'static str,
    pub default_messages: usize,
    /// The brokers the chapter runs on; the first is its default.
    pub backends: &'static [BackendKind],
}

/// What chapters 1 to 4 run on.
pub const EVERY_BACKEND: &[BackendKind] =
    &[BackendKind::Rabbitmq, BackendKind::Sqs, BackendKind::Kafka];

/// What a chapter's body gets: its settings, and a way to run variants.
pub struct Lab {
    pub chapter: &'static Chapter,
    pub backend: BackendKind,
    pub messages: usize,
    pub seed: u64,
    pub consumers: usize,
}

impl Lab {
    /// The fault schedule for this chapter's seed and size.
    pub fn plan(&self, mix: FaultMix) -> ChaosPlan {
        ChaosPlan::generate(self.seed, self.messages, mix)
    }

    /// A run spec with this lab's defaults, to adjust before [`Lab::run`].
    pub fn spec(&self, variant: consumer::Variant, plan: &ChaosPlan) -> RunSpec {
        RunSpec::new(variant, plan.clone(), self.consumers)
    }

    /// The same lab (seed, size, consumers) on another broker.
    pub fn on(&self, backend: BackendKind) -> Lab {
        Lab {
            chapter: self.chapter,
            backend,
            messages: self.messages,
            seed: self.seed,
            consumers: self.consumers,
        }
    }

    pub async fn run(&self, spec: RunSpec) -> anyhow::Result<RunReport> {
        eprintln!("running {} ({}) ...", spec.variant.name(), spec.scenario);
        run::execute(&spec, self.backend).await
    }

    pub fn report(&self, runs: Vec<RunReport>, claims: Vec<Claim>) -> ChapterReport {
        let mut report = ChapterReport::new(self.chapter.id, runs, claims);
        // A report of benchmarks alone has no run to take these from.
        report.backend = self.backend.name().to_owned();
        report.seed = self.seed;
        report
    }
}

/// Parses the command line, runs `body`, prints the report and turns the
/// chapter's claims into the exit code: 0 when every claim holds, 1 when one
/// fails, 2 when the run itself could not be carried out.
///
/// The lab starts its consumer, producer and relay processes by running the
/// chapter's own binary again with [`crate::roles::ROLE_ENV`] set; such a
/// process becomes that role here, before any argument is parsed.
pub async fn main<F, Fut>(chapter: &'static Chapter, body: F) -> ExitCode
where
    F: FnOnce(Lab) -> Fut,
    Fut: Future<Output = anyhow::Result<ChapterReport>>,
{
    main_with_args(chapter, |lab, NoExtraArgs {}| body(lab)).await
}

/// [`main`] for a chapter with arguments of its own (`Extra`), which its
/// body receives beside the lab.
pub async fn main_with_args<Extra, F, Fut>(chapter: &'static Chapter, body: F) -> ExitCode
where
    Extra: clap::Args,
    F: FnOnce(Lab, Extra) -> Fut,
    Fut: Future<Output = anyhow::Result<ChapterReport>>,
{
    if let Some(role) = Role::from_env() {
        return role.run().await;
    }
    let args = ChapterArgs::<Extra>::parse();
    let backend = args.backend.unwrap_or(chapter.backends[0]);
    if !chapter.backends.contains(&backend) {
        let names: Vec<&str> = chapter.backends.iter().map(|b| b.name()).collect();
        eprintln!(
            "error: {} runs on {} only (the chapter's page says why)",
            chapter.id,
            names.join(" and ")
        );
        return ExitCode::from(2);
    }
    if args.consumers == 0 {
        eprintln!("error: --consumers must be at least 1");
        return ExitCode::from(2);
    }
    let seed = args.seed.unwrap_or_else(rand::random::<u64>);
    let messages = args.messages.unwrap_or(chapter.default_messages);
    eprintln!(
        "{}: {} — backend {}, {messages} messages, {} consumers, seed {seed} (replay with --seed {seed})",
        chapter.id,
        chapter.title,
        backend.name(),
        args.consumers
    );
    let lab = Lab {
        chapter,
        backend,
        messages,
        seed,
        consumers: args.consumers,
    };
    let report = match body(lab, args.extra).await {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
    let json = serde_json::to_string_pretty(&report).expect("reports serialise");
    // The book's build keeps the JSON beside the Markdown, for the pages
    // that put several chapters' numbers side by side (scripts/headline).
    if let Ok(path) = std::env::var(REPORT_JSON_ENV) {
        if let Err(error) = std::fs::write(&path, &json) {
            eprintln!("error: writing the report to {path}: {error}");
            return ExitCode::from(2);
        }
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{}", report.to_markdown());
    }
    if report.claims_hold {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{}: a claim of this chapter did not hold in this run",
            chapter.id
        );
        ExitCode::from(1)
    }
}

/// Runs a chapter's binary with `args` and `--json`, as a reader would, and
/// returns its report. For the chapters' tests: panics with the chapter's
/// stderr when it exits non-zero (a claim failed, or the run could not be
/// carried out).
pub fn run_for_test(binary: &str, args: &[&str]) -> serde_json::Value {
    let output = std::process::Command::new(binary)
        .args(args)
        .arg("--json")
        .output()
        .unwrap_or_else(|error| panic!("starting {binary}: {error}"));
    assert!(
        output.status.success(),
        "{binary} {} exited with {}:\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON object")
}
