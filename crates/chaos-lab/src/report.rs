//! What a chapter prints: one Markdown table on stdout, or one JSON object.
//!
//! The Markdown leaves out wall-clock times and anything else that churns
//! between runs, so the book's pages change only when the numbers do.

use serde::Serialize;

use crate::audit::Audit;

/// The measured result of one variant under one chaos schedule.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub variant: String,
    pub backend: String,
    pub messages: usize,
    pub seed: u64,
    /// From the PSP's ledger.
    pub double_charges: u64,
    /// From the shop's orders and the PSP's ledger.
    pub lost_events: u64,
    /// From the consumers' own reports.
    pub deliveries: u64,
    pub redeliveries: u64,
    pub dedup_hits: u64,
    pub dedup_hit_rate: f64,
    pub dead_lettered: u64,
    /// SIGKILLs the supervisor saw, consumers and producer together.
    pub kills: u64,
    pub consumer_kills: u64,
    pub producer_kills: u64,
    pub audit: Audit,
    /// False when the run hit its deadline before it drained.
    pub drained: bool,
    pub elapsed_ms: u64,
}

/// A sentence the chapter promises, and whether this run bore it out.
#[derive(Debug, Clone, Serialize)]
pub struct Claim {
    pub statement: String,
    pub holds: bool,
}

impl Claim {
    pub fn new(statement: impl Into<String>, holds: bool) -> Self {
        Self {
            statement: statement.into(),
            holds,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChapterReport {
    pub chapter: String,
    pub backend: String,
    pub messages: usize,
    pub seed: u64,
    pub runs: Vec<RunReport>,
    pub claims: Vec<Claim>,
    pub claims_hold: bool,
}

impl ChapterReport {
    pub fn new(chapter: &str, runs: Vec<RunReport>, claims: Vec<Claim>) -> Self {
        let first = runs.first();
        Self {
            chapter: chapter.to_owned(),
            backend: first.map(|r| r.backend.clone()).unwrap_or_default(),
            messages: first.map(|r| r.messages).unwrap_or_default(),
            seed: first.map(|r| r.seed).unwrap_or_default(),
            claims_hold: claims.iter().all(|c| c.holds) && runs.iter().all(|r| r.drained),
            runs,
            claims,
        }
    }

    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "Backend `{}`, {} messages, seed {}. Double charges and lost events are counted from the PSP's ledger; deliveries, redeliveries and dedup hits are the consumers' own counts.\n\n",
            self.backend, self.messages, self.seed
        ));
        out.push_str("| variant | double_charges | lost_events | deliveries | redeliveries | dedup_hits | dedup_hit_rate | dead_lettered | kills (consumer + producer) | orders | ledger rows |\n");
        out.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for run in &self.runs {
            out.push_str(&format!(
                "| {}{} | {} | {} | {} | {} | {} | {:.3} | {} | {} ({} + {}) | {} | {} |\n",
                run.variant,
                if run.drained {
                    ""
                } else {
                    " (deadline hit before drain)"
                },
                run.double_charges,
                run.lost_events,
                run.deliveries,
                run.redeliveries,
                run.dedup_hits,
                run.dedup_hit_rate,
                run.dead_lettered,
                run.kills,
                run.consumer_kills,
                run.producer_kills,
                run.audit.orders_committed,
                run.audit.charges_executed,
            ));
        }
        out.push('\n');
        for claim in &self.claims {
            let mark = if claim.holds { "holds" } else { "FAILS" };
            out.push_str(&format!("- {}: **{mark}**\n", claim.statement));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(double_charges: u64) -> RunReport {
        RunReport {
            variant: "naive".into(),
            backend: "rabbitmq".into(),
            messages: 10,
            seed: 3,
            double_charges,
            lost_events: 1,
            deliveries: 12,
            redeliveries: 2,
            dedup_hits: 0,
            dedup_hit_rate: 0.0,
            dead_lettered: 0,
            kills: 3,
            consumer_kills: 2,
            producer_kills: 1,
            audit: Audit {
                orders_committed: 10,
                charges_executed: 11,
                double_charges,
                lost_events: 1,
                unexpected_charges: 0,
                payments_recorded: 11,
            },
            drained: true,
            elapsed_ms: 1234,
        }
    }

    #[test]
    fn markdown_has_a_row_per_run_and_no_timings() {
        let report = ChapterReport::new("ch01", vec![run(2)], vec![Claim::new("x", true)]);
        let md = report.to_markdown();
        assert!(md.contains("| naive | 2 | 1 | 12 | 2 | 0 | 0.000 | 0 | 3 (2 + 1) | 10 | 11 |"));
        assert!(!md.contains("1234"));
        assert!(md.contains("- x: **holds**"));
    }

    #[test]
    fn a_failed_claim_or_an_undrained_run_fails_the_report() {
        assert!(!ChapterReport::new("c", vec![run(1)], vec![Claim::new("x", false)]).claims_hold);
        let mut undrained = run(1);
        undrained.drained = false;
        assert!(!ChapterReport::new("c", vec![undrained], vec![]).claims_hold);
    }

    #[test]
    fn json_carries_the_contract_fields() {
        let json = serde_json::to_value(ChapterReport::new("c", vec![run(1)], vec![])).unwrap();
        let run = &json["runs"][0];
        for field in [
            "variant",
            "backend",
            "messages",
            "seed",
            "double_charges",
            "lost_events",
            "deliveries",
            "dedup_hits",
            "dedup_hit_rate",
            "kills",
        ] {
            assert!(!run[field].is_null(), "{field} missing");
        }
    }
}
