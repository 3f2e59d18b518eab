//! The exactly-once results: one [`PipelineRun`] per variant under the same
//! seed, and the Markdown table that puts them side by side.

use std::fmt::Write as _;

use serde::Serialize;

use super::harness::{Kill, KillLanding};
use super::readers::ReaderCount;
use super::{KillPlan, Variant};
use crate::text::thousands;

/// One pipeline, run to the end under the kill plan, and read back.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineRun {
    pub variant: Variant,
    /// Input records (sequence numbers 0..records).
    pub records: u64,
    /// The transformer reported all input done before the deadline.
    pub finished: bool,
    /// Input records the group's committed offsets mark consumed.
    pub input_committed: u64,
    pub kills: Vec<Kill>,
    /// Transformer processes started (1 + restarts).
    pub starts: u32,
    /// Exits that were not our SIGKILL (restarted too).
    pub failures: u32,
    /// First start to the last process's end, seconds.
    pub elapsed_s: f64,
    pub read_committed: ReaderCount,
    pub read_uncommitted: ReaderCount,
}

impl PipelineRun {
    /// Every input record is consumed and the transformer said so.
    pub fn drained(&self) -> bool {
        self.finished && self.input_committed == self.records
    }

    /// Kills that landed while a batch was open and its commit not yet
    /// requested (with transactions: inside an open transaction).
    pub fn kills_inside_open_batch(&self) -> usize {
        self.kills
            .iter()
            .filter(|k| matches!(k.landing, KillLanding::InsideOpenBatch { .. }))
            .count()
    }

    pub fn kills_during_commit(&self) -> usize {
        self.kills
            .iter()
            .filter(|k| matches!(k.landing, KillLanding::DuringCommit { .. }))
            .count()
    }

    pub fn kills_between_batches(&self) -> usize {
        self.kills
            .iter()
            .filter(|k| k.landing == KillLanding::BetweenBatches)
            .count()
    }

    /// Output records the broker had acknowledged in batches whose commit
    /// was never requested: in the log, covered by no commit. With
    /// transactions they are aborted; without, their input is consumed
    /// again and they are written a second time.
    pub fn acked_in_killed_batches(&self) -> u64 {
        self.kills
            .iter()
            .map(|k| match k.landing {
                KillLanding::InsideOpenBatch { acked } => acked,
                _ => 0,
            })
            .sum()
    }

    /// Records a `read_uncommitted` reader saw beyond what a
    /// `read_committed` reader saw: aborted transactions' writes.
    pub fn aborted_records_seen(&self) -> u64 {
        self.read_uncommitted
            .records
            .saturating_sub(self.read_committed.records)
    }
}

/// Both pipelines under one seed.
#[derive(Debug, Clone, Serialize)]
pub struct ExactlyOnceReport {
    pub plan: KillPlan,
    pub records: u64,
    pub partitions: i32,
    pub batch_size: usize,
    pub work_per_record_ms: f64,
    pub transactional: PipelineRun,
    pub at_least_once: PipelineRun,
}

impl ExactlyOnceReport {
    /// The two pipelines side by side, then how they were run.
    pub fn to_markdown(&self) -> String {
        let runs = [&self.transactional, &self.at_least_once];
        let mut out = format!(
            "| | {} | {} |\n|---|--:|--:|\n",
            self.transactional.variant.label(),
            self.at_least_once.variant.label()
        );
        let mut row = |name: &str, value: &dyn Fn(&PipelineRun) -> String| {
            let _ = writeln!(out, "| {name} | {} | {} |", value(runs[0]), value(runs[1]));
        };
        row("input records", &|r| count(r.records));
        row("SIGKILLs of the transformer", &|r| {
            r.kills.len().to_string()
        });
        row(
            "… inside an open batch (its acknowledged records)",
            &|r| {
                format!(
                    "{} ({})",
                    r.kills_inside_open_batch(),
                    count(r.acked_in_killed_batches())
                )
            },
        );
        row("… while the commit was in flight", &|r| {
            r.kills_during_commit().to_string()
        });
        row("… between batches", &|r| {
            r.kills_between_batches().to_string()
        });
        row("transformer processes started", &|r| r.starts.to_string());
        row("every input offset committed", &|r| {
            yes_no(r.drained()).to_owned()
        });
        row("`read_committed`: records", &|r| {
            count(r.read_committed.records)
        });
        row("`read_committed`: distinct sequence numbers", &|r| {
            count(r.read_committed.distinct)
        });
        row("`read_committed`: **duplicates**", &|r| {
            format!("**{}**", count(r.read_committed.duplicates))
        });
        row("`read_committed`: **missing**", &|r| {
            format!("**{}**", count(r.read_committed.missing))
        });
        row(
            "`read_uncommitted`: records (aborted writes included)",
            &|r| count(r.read_uncommitted.records),
        );
        row("`read_uncommitted`: duplicates", &|r| {
            count(r.read_uncommitted.duplicates)
        });
        row("run time", &|r| format!("{:.1} s", r.elapsed_s));
        let kills: Vec<String> = self.plan.after_acked.iter().map(u64::to_string).collect();
        let _ = write!(
            out,
            "\nSeed {}: each SIGKILL after {} acknowledged output records of one transformer \
             life. {} input records over {} partitions, batches of up to {}, {} ms of work per \
             record.",
            self.plan.seed,
            if kills.is_empty() {
                "no".to_owned()
            } else {
                kills.join(", ")
            },
            count(self.records),
            self.partitions,
            self.batch_size,
            self.work_per_record_ms,
        );
        for run in runs {
            if !run.drained() {
                let _ = write!(
                    out,
                    " **{}: the deadline passed before every input offset was committed \
                     ({} of {}).**",
                    run.variant.label(),
                    count(run.input_committed),
                    count(run.records)
                );
            }
            if run.failures > 0 {
                let _ = write!(
                    out,
                    " {}: the transformer also failed on its own {} times.",
                    run.variant.label(),
                    run.failures
                );
            }
        }
        out.push('\n');
        out
    }
}

fn count(value: u64) -> String {
    thousands(value as f64)
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}
