//! `grader`: runs your consumer under chaos and grades it from the PSP's
//! ledger. See the book's "Your turn" page.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use grader::{grade_table, run_level, Level, Settings};
use queue::backend::BackendKind;

/// Starts COMMAND as several competing consumer processes, publishes
/// payment events to a queue, SIGKILLs the processes at random moments,
/// restarts them, drains, and grades each level from the PSP's ledger:
/// double charges, lost orders, bad input dead-lettered, crash loops.
/// Exits 1 when a level fails.
#[derive(Parser)]
#[command(name = "grader", version)]
struct Args {
    /// The shell command that starts ONE consumer process, e.g.
    /// 'python3 naive_consumer.py'. It gets its settings from the
    /// environment (the consumer contract page lists the variables).
    #[arg(long)]
    consumer: String,
    /// The broker; `all` grades on each of the three in turn.
    #[arg(long, default_value = "rabbitmq")]
    backend: BackendChoice,
    /// Orders per level (each level has its own default: 20 to 30, and
    /// 1000 for at-scale).
    #[arg(long)]
    messages: Option<usize>,
    /// The seed of the faults and the kills; the same seed replays them.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Competing consumer processes.
    #[arg(long, default_value_t = 3)]
    consumers: usize,
    /// Grade only these levels (repeat the flag); all of them by default.
    #[arg(long, value_enum)]
    level: Vec<Level>,
    /// Exit 0 whatever the grade: to show a failing grade (the book does).
    #[arg(long)]
    exit_zero: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendChoice {
    Rabbitmq,
    Sqs,
    Kafka,
    All,
}

#[tokio::main]
async fn main() -> ExitCode {
    telemetry::service::init_logging("warn");
    let args = Args::parse();
    let exit_zero = args.exit_zero;
    match grade(args).await {
        Ok(passed) if passed || exit_zero => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("grader: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn grade(args: Args) -> anyhow::Result<bool> {
    let backends = match args.backend {
        BackendChoice::Rabbitmq => vec![BackendKind::Rabbitmq],
        BackendChoice::Sqs => vec![BackendKind::Sqs],
        BackendChoice::Kafka => vec![BackendKind::Kafka],
        BackendChoice::All => vec![BackendKind::Rabbitmq, BackendKind::Sqs, BackendKind::Kafka],
    };
    let levels = if args.level.is_empty() {
        Level::ALL.to_vec()
    } else {
        args.level.clone()
    };
    let mut grades = Vec::new();
    for backend in backends {
        let settings = Settings {
            command: args.consumer.clone(),
            backend,
            consumers: args.consumers,
            orders: args.messages,
            seed: args.seed,
        };
        for &level in levels.iter().filter(|l| l.applies_to(backend)) {
            eprintln!(
                "level {} on {}: {} ...",
                level.number(),
                backend.name(),
                level.title()
            );
            let grade = run_level(&settings, level)
                .await
                .with_context(|| format!("level {} on {}", level.name(), backend.name()))?;
            if grade.passed() {
                eprintln!("  PASS in {:.1} s", grade.elapsed.as_secs_f64());
            } else {
                eprintln!("  FAIL: {}", grade.failures().join("; "));
                eprintln!("  hint: {}", level.hint());
                if !grade.exit_statuses.is_empty() {
                    eprintln!("  exits: {}", grade.exit_statuses.join(", "));
                }
                if let Some(logs) = &grade.logs {
                    eprintln!("  consumer logs: {}", logs.display());
                }
            }
            grades.push(grade);
        }
    }
    println!("{}", grade_table(&grades));
    for grade in grades.iter().filter(|g| !g.passed()) {
        println!(
            "- Level {} on {}: {}. Hint: {}",
            grade.level.number(),
            grade.backend.name(),
            grade.failures().join("; "),
            grade.level.hint()
        );
    }
    if grades.iter().any(|g| !g.passed()) {
        println!();
    }
    let reasons: Vec<&String> = grades
        .iter()
        .flat_map(|g| &g.dead_letter_reasons)
        .filter(|r| !r.is_empty())
        .collect();
    if let Some(reason) = reasons.first() {
        println!("A dead-letter reason your consumer gave: {reason}\n");
    }
    println!(
        "Seed {} (replay with --seed {}). {}",
        args.seed,
        args.seed,
        if grades.iter().all(|g| g.passed()) {
            "Every level passed."
        } else {
            "Fix the first failing level first: its hint says which chapter has the fix."
        }
    );
    Ok(grades.iter().all(|g| g.passed()))
}
