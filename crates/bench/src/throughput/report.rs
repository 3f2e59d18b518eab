//! The Markdown the book embeds: a comparison's rounds and where each
//! message's time went, and the sweep's tables and goals.

use std::time::Duration;

use chaos_lab::BackendKind;
use consumer::metrics::Step;

use super::sweep::Sweep;
use super::{mean_processing_ms, median, step_ms_per_message, Race};

/// The goals of the sweep, each a ratio of two figures of the same run.
const OVER_NAIVE: f64 = 0.9;
const OVER_ONE_AT_A_TIME: f64 = 2.0;
const OVER_PGBENCH: f64 = 0.5;

/// One row per round, then the median ratio.
pub fn print_rounds(races: &[Race]) {
    println!("| round | naive msg/s | hardened msg/s | hardened / naive | naive ms/msg | hardened ms/msg |");
    println!("|--:|--:|--:|--:|--:|--:|");
    for (i, race) in races.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {:.2} | {:.2} |",
            i + 1,
            race.naive.throughput_per_second,
            race.hardened.throughput_per_second,
            race.ratio(),
            mean_processing_ms(&race.naive),
            mean_processing_ms(&race.hardened),
        );
    }
    println!(
        "\nMedian hardened/naive throughput ratio: {:.3}",
        median(races.iter().map(Race::ratio).collect())
    );
}

/// Milliseconds per message in each step, for both variants of one round.
pub fn print_steps(race: &Race) {
    println!("\nWhere each message's time went in the last round (ms per message, from the consumers' `step_seconds`; a batch's step counts once for all its messages):\n");
    let steps = Step::ALL.map(Step::name);
    println!("| consumer | {} | total |", steps.join(" | "));
    println!("|---|{}--:|", "--:|".repeat(steps.len()));
    for report in [&race.naive, &race.hardened] {
        let per_message = step_ms_per_message(report);
        let cells: Vec<String> = per_message.iter().map(|ms| format!("{ms:.3}")).collect();
        println!(
            "| {} | {} | {:.3} |",
            report.variant,
            cells.join(" | "),
            per_message.iter().sum::<f64>()
        );
    }
}

/// One table per PSP latency, then the goals.
pub(crate) fn print_sweep(sweep: &Sweep, psp_latencies_ms: &[u64], batch_sizes: &[usize]) {
    let backends = backends(sweep);
    for &ms in psp_latencies_ms {
        let latency = Duration::from_millis(ms);
        // pgbench has no PSP to wait for: its rate is the ceiling of the
        // PSP that answers at once.
        let with_pgbench = ms == 0;
        println!(
            "**PSP answering in {ms} ms**: messages per second, {} orders waiting, {} consumers{}\n",
            sweep.messages,
            sweep.consumers,
            if with_pgbench {
                format!(
                    "; pgbench runs the same transactions with {} clients",
                    sweep.consumers
                )
            } else {
                String::new()
            }
        );
        if with_pgbench {
            println!("| broker | batch | naive | hardened | hardened / naive | hardened / one at a time | pgbench | hardened / pgbench |");
            println!("|---|--:|--:|--:|--:|--:|--:|--:|");
        } else {
            println!("| broker | batch | naive | hardened | hardened / naive | hardened / one at a time |");
            println!("|---|--:|--:|--:|--:|--:|");
        }
        for &backend in &backends {
            let one = sweep.cell(backend, 1, latency).map(|cell| cell.hardened);
            for &size in batch_sizes {
                let Some(cell) = sweep.cell(backend, size, latency) else {
                    continue;
                };
                let mut row = format!(
                    "| {} | {size} | {:.0} | {:.0} | {:.2} | {} |",
                    backend.name(),
                    cell.naive,
                    cell.hardened,
                    cell.hardened / cell.naive,
                    ratio(Some(cell.hardened), one),
                );
                if with_pgbench {
                    let limit = sweep.pgbench(size).map(|rate| rate.messages_per_second());
                    row.push_str(&format!(
                        " {} | {} |",
                        limit.map_or("–".to_owned(), |v| format!("{v:.0}")),
                        ratio(Some(cell.hardened), limit),
                    ));
                }
                println!("{row}");
            }
        }
        println!();
    }
    if backends.contains(&BackendKind::Sqs) && batch_sizes.iter().any(|&size| size > 10) {
        println!("SQS hands out at most 10 messages per receive, so it has no row above 10.\n");
    }
    print_goals(sweep, psp_latencies_ms, batch_sizes, &backends);
    print_sweep_steps(sweep, psp_latencies_ms, batch_sizes, &backends);
}

/// Where each message's time went, per setting and variant (last round),
/// folded away on the page: it is long, and the tables above carry the
/// verdict.
fn print_sweep_steps(
    sweep: &Sweep,
    psp_latencies_ms: &[u64],
    batch_sizes: &[usize],
    backends: &[BackendKind],
) {
    let steps = Step::ALL.map(Step::name);
    println!("\n<details><summary>Where each message's time went, per setting (ms per message, last round)</summary>\n");
    println!(
        "| broker · PSP · batch | consumer | {} | total |",
        steps.join(" | ")
    );
    println!("|---|---|{}--:|", "--:|".repeat(steps.len()));
    for &ms in psp_latencies_ms {
        for &backend in backends {
            for &size in batch_sizes {
                let Some(cell) = sweep.cell(backend, size, Duration::from_millis(ms)) else {
                    continue;
                };
                for (variant, per_message) in [
                    ("naive", &cell.naive_steps),
                    ("hardened", &cell.hardened_steps),
                ] {
                    let cells: Vec<String> =
                        per_message.iter().map(|ms| format!("{ms:.2}")).collect();
                    println!(
                        "| {} · {ms} ms · {size} | {variant} | {} | {:.2} |",
                        backend.name(),
                        cells.join(" | "),
                        per_message.iter().sum::<f64>()
                    );
                }
            }
        }
    }
    println!("\n</details>");
}

/// The goals, for every batched setting: hardened batched against naive
/// batched, against the hardened one-at-a-time consumer, and (with a PSP
/// that answers at once) against pgbench's rate of the same transactions.
fn print_goals(
    sweep: &Sweep,
    psp_latencies_ms: &[u64],
    batch_sizes: &[usize],
    backends: &[BackendKind],
) {
    println!(
        "| broker | PSP | batch | hardened / naive ≥ {OVER_NAIVE} | hardened / one at a time ≥ {OVER_ONE_AT_A_TIME} | hardened / pgbench ≥ {OVER_PGBENCH} |"
    );
    println!("|---|--:|--:|--:|--:|--:|");
    let (mut met, mut goals) = (0, 0);
    let mut judge = |value: Option<f64>, goal: f64| match value {
        Some(value) if value.is_finite() => {
            goals += 1;
            let pass = value >= goal;
            met += usize::from(pass);
            format!("{value:.2} {}", if pass { "PASS" } else { "MISS" })
        }
        _ => "–".to_owned(),
    };
    for &ms in psp_latencies_ms {
        let latency = Duration::from_millis(ms);
        for &backend in backends {
            let one = sweep.cell(backend, 1, latency).map(|cell| cell.hardened);
            for &size in batch_sizes.iter().filter(|&&size| size > 1) {
                let Some(cell) = sweep.cell(backend, size, latency) else {
                    continue;
                };
                let limit = (ms == 0)
                    .then(|| sweep.pgbench(size).map(|rate| rate.messages_per_second()))
                    .flatten();
                let over_naive = judge(Some(cell.hardened / cell.naive), OVER_NAIVE);
                let over_one = judge(one.map(|one| cell.hardened / one), OVER_ONE_AT_A_TIME);
                let over_pgbench = judge(limit.map(|limit| cell.hardened / limit), OVER_PGBENCH);
                println!(
                    "| {} | {ms} ms | {size} | {over_naive} | {over_one} | {over_pgbench} |",
                    backend.name()
                );
            }
        }
    }
    println!("\nGoals met: {met} of {goals}.");
}

fn backends(sweep: &Sweep) -> Vec<BackendKind> {
    let mut backends: Vec<BackendKind> = Vec::new();
    for cell in &sweep.cells {
        if !backends.contains(&cell.setting.backend) {
            backends.push(cell.setting.backend);
        }
    }
    backends
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> String {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => format!("{:.2}", n / d),
        _ => "–".to_owned(),
    }
}
