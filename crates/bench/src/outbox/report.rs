//! The Markdown on stdout: each measurement's table and its goal lines
//! (PASS or MISS).

use std::time::Duration;

use databases::cleanup::format_duration;
use relay::{RelayConfig, Wake};

use crate::goals::{goal_line, print_goals};

use super::cleanup::CleanupMeasurement;
use super::drain::{DrainResult, DRAIN_GOAL};
use super::latency::ModeResult;
use super::{CleanupArgs, LatencyArgs};

pub(crate) fn print_latency(args: &LatencyArgs, modes: &[ModeResult]) {
    println!(
        "Latency at {} orders/s, {} per relay mode (after {} of warm-up). \
         Commit: the producer's COMMIT returned; confirm: the broker's \
         publisher confirm reached the relay; receive: a consumer on the \
         queue got the message. One process, one clock:\n",
        args.rate,
        format_duration(args.duration),
        format_duration(args.warmup),
    );
    println!(
        "| relay | events | commit → confirm p50 | p99 | max | commit → receive p50 | p99 | max |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|");
    for mode in modes {
        let Some(load) = &mode.load else { continue };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            mode.label,
            load.events,
            ms(quantile(&load.latencies.confirm, 0.50)),
            ms(quantile(&load.latencies.confirm, 0.99)),
            ms(quantile(&load.latencies.confirm, 1.0)),
            ms(quantile(&load.latencies.receive, 0.50)),
            ms(quantile(&load.latencies.receive, 0.99)),
            ms(quantile(&load.latencies.receive, 1.0)),
        );
    }
    println!();
    print_early(
        modes
            .iter()
            .filter_map(|mode| Some((mode.label, mode.load.as_ref()?.latencies.early))),
    );
}

/// Says how many confirms or receives came before the producer noted the
/// commit, if any did: a bound on how late that note can be.
fn print_early<'a>(counts: impl Iterator<Item = (&'a str, usize)>) {
    let early: Vec<String> = counts
        .filter(|(_, early)| *early > 0)
        .map(|(label, early)| format!("{label}: {early}"))
        .collect();
    if !early.is_empty() {
        println!(
            "Confirms or receives that came before the producer had noted its \
             COMMIT, counted as 0 ms ({}).\n",
            early.join(", ")
        );
    }
}

pub(crate) fn print_queries(modes: &[ModeResult]) {
    let when = match (
        modes.iter().any(|m| m.idle.is_some()),
        modes.iter().any(|m| m.load.is_some()),
    ) {
        (true, true) => "idle, and during the latency run",
        (true, false) => "idle",
        _ => "during the latency run",
    };
    println!("SQL statements sent by each relay (its `relay_queries_total`), {when}:\n");
    println!("| relay | idle: queries | idle: queries/s | under load: queries/s | under load: queries per event |");
    println!("|---|--:|--:|--:|--:|");
    for mode in modes {
        let (idle_count, idle_rate) = match mode.idle {
            Some(idle) => (
                format!("{} in {:.0} s", idle.queries, idle.over.as_secs_f64()),
                format!("{:.1}", idle.per_second()),
            ),
            None => ("–".to_owned(), "–".to_owned()),
        };
        let (load_rate, per_event) = match &mode.load {
            Some(load) => (
                format!("{:.0}", load.queries.per_second()),
                format!(
                    "{:.2}",
                    load.queries.queries as f64 / load.events.max(1) as f64
                ),
            ),
            None => ("–".to_owned(), "–".to_owned()),
        };
        println!(
            "| {} | {idle_count} | {idle_rate} | {load_rate} | {per_event} |",
            mode.label
        );
    }
    println!();
}

pub(crate) fn print_mode_goals(modes: &[ModeResult]) {
    let find = |wanted: Wake| modes.iter().find(|mode| mode.wake == wanted);
    let notify = find(RelayConfig::default().wake);
    let poll_100 = find(Wake::Poll {
        interval: Duration::from_millis(100),
    });
    let mut lines = Vec::new();
    if let Some(load) = notify.and_then(|m| m.load.as_ref()) {
        let p99 = quantile(&load.latencies.confirm, 0.99);
        lines.push(goal_line(
            "NOTIFY relay: commit → confirm p99 < 25 ms",
            ms(p99),
            p99 < 25.0,
        ));
    }
    if let (Some(notify), Some(poll)) = (
        notify.and_then(|m| m.load.as_ref()),
        poll_100.and_then(|m| m.load.as_ref()),
    ) {
        let (n, p) = (
            quantile(&notify.latencies.confirm, 0.5),
            quantile(&poll.latencies.confirm, 0.5),
        );
        lines.push(goal_line(
            "NOTIFY relay: commit → confirm p50 ≤ 1/20 of the 100 ms poller's",
            format!("{} vs {} (1/{:.0})", ms(n), ms(p), p / n),
            n * 20.0 <= p,
        ));
    }
    if let (Some(notify), Some(poll)) = (notify.and_then(|m| m.idle), poll_100.and_then(|m| m.idle))
    {
        let (n, p) = (notify.per_second(), poll.per_second());
        lines.push(goal_line(
            "NOTIFY relay idle: queries/s ≤ 1/10 of the 100 ms poller's",
            format!("{n:.1}/s vs {p:.1}/s"),
            n * 10.0 <= p,
        ));
    }
    print_goals(&lines);
}

pub(crate) fn print_drains(runs: &[DrainResult]) {
    println!(
        "Draining a backlog of pending rows (loaded in one statement, then the relays started):\n"
    );
    println!(
        "| relays | batch | rows | time | events/s | queries | publishes awaiting confirms | republished | in queue after |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for run in runs {
        println!(
            "| {} | {} | {} | {:.2} s | {:.0} | {} | {:.0}% of the time | {} | {} |",
            run.relays,
            run.batch_size,
            run.rows,
            run.elapsed.as_secs_f64(),
            run.events_per_second(),
            run.queries,
            100.0 * run.publishing.as_secs_f64() / run.elapsed.as_secs_f64(),
            run.republished,
            run.in_queue,
        );
    }
    println!();
    println!(
        "In the rest of the time no publish was in flight: the relays were \
         claiming a batch, marking one sent, or between the two.\n"
    );
    let lines: Vec<String> = runs
        .iter()
        .map(|run| {
            goal_line(
                &format!(
                    "drain with {} relay{}: ≥ {DRAIN_GOAL:.0} events/s",
                    run.relays,
                    if run.relays == 1 { "" } else { "s" }
                ),
                format!("{:.0} events/s", run.events_per_second()),
                run.events_per_second() >= DRAIN_GOAL,
            )
        })
        .collect();
    print_goals(&lines);
}

pub(crate) fn print_cleanup(args: &CleanupArgs, measured: &CleanupMeasurement) {
    let report = &measured.report;
    println!(
        "Outbox cleanup (window {}, batches of {}) on {} rows, {} of them sent \
         before the window, while a NOTIFY relay publishes {} orders/s:\n",
        format_duration(args.window),
        args.batch_size,
        measured.rows,
        measured.old,
        args.rate,
    );
    println!("| rows deleted | batches | wall time | rows/s | rows kept (not old) | orders placed meanwhile, all published |");
    println!("|--:|--:|--:|--:|--:|--:|");
    println!(
        "| {} | {} | {:.2} s | {:.0} | {} | {} |",
        report.rows_deleted,
        report.batches,
        report.elapsed.as_secs_f64(),
        report.rows_per_second(),
        measured.kept,
        measured.produced,
    );
    println!();
    println!(
        "The outbox's size on disk (table and indexes): {} before, {} right \
         after the cleanup, {} after a VACUUM. DELETE only marks rows dead; \
         VACUUM makes their space reusable for new rows, and returns to the \
         file system only empty pages at the end of the table.\n",
        mib(measured.size_before),
        mib(measured.size_after),
        mib(measured.size_vacuumed),
    );
    println!("The relay's latency before and during the cleanup:\n");
    println!("| phase | events | commit → confirm p50 | p99 | commit → receive p50 | p99 |");
    println!("|---|--:|--:|--:|--:|--:|");
    for (name, phase) in [
        ("before cleanup", &measured.before),
        ("during cleanup", &measured.during),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            phase.confirm.len(),
            ms(quantile(&phase.confirm, 0.50)),
            ms(quantile(&phase.confirm, 0.99)),
            ms(quantile(&phase.receive, 0.50)),
            ms(quantile(&phase.receive, 0.99)),
        );
    }
    println!();
    print_early(
        [
            ("before cleanup", measured.before.early),
            ("during cleanup", measured.during.early),
        ]
        .into_iter(),
    );
}

/// Nearest-rank quantile of sorted values; NaN when there are none.
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    telemetry::nearest_rank(sorted, q).unwrap_or(f64::NAN)
}

fn ms(value: f64) -> String {
    if value.is_nan() {
        "–".to_owned()
    } else if value < 10.0 {
        format!("{value:.2} ms")
    } else if value < 100.0 {
        format!("{value:.1} ms")
    } else {
        format!("{value:.0} ms")
    }
}

fn mib(bytes: i64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}
