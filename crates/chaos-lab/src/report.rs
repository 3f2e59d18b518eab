//! What a chapter prints: one Markdown table on stdout, or one JSON object.
//!
//! The Markdown leaves out wall-clock times and anything else that churns
//! between runs, so the book's pages change only when the numbers do.

use serde::{Deserialize, Serialize};

use crate::audit::Audit;

/// The measured result of one variant under one chaos schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub scenario: String,
    pub variant: String,
    pub producer: String,
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
    /// Deliveries handed back to retry later, and why.
    pub requeued: u64,
    pub requeued_by_cause: std::collections::BTreeMap<String, u64>,
    /// SIGKILLs the supervisor saw, consumers and producer together.
    pub kills: u64,
    pub consumer_kills: u64,
    /// Consumer SIGKILLs by the crash point reached.
    pub kills_by_point: std::collections::BTreeMap<String, u64>,
    pub producer_kills: u64,
    pub relay_kills: u64,
    /// Publishes on a relay's second or later claim of a row: retries after
    /// a failed publish, and republishes after a relay died before marking
    /// (those reach the consumer twice).
    pub republished: u64,
    /// CDC: what a `read_committed` reader finds on the topic at the end.
    pub topic_records: Option<cdc::topic::TopicCount>,
    pub relay_metrics: Vec<ConsumerScrape>,
    pub audit: Audit,
    /// Double charges by the fault planned on the charged order's
    /// (`after_charge_before_commit`, `published_twice`, `none`, ...).
    pub double_charges_by_fault: std::collections::BTreeMap<String, u64>,
    /// What each consumer still alive at the end served on `/metrics`.
    pub consumer_metrics: Vec<ConsumerScrape>,
    /// SQS only: the queue's visibility timeout and `maxReceiveCount`.
    pub visibility_timeout_ms: Option<u64>,
    pub max_receive_count: Option<u32>,
    /// Whether the consumers kept a visibility heartbeat.
    pub heartbeat: bool,
    /// Acks (or requeues, dead letters) refused because the lease had run
    /// out and the message was already with another consumer.
    pub settled_late: u64,
    /// Heartbeat beats: `ChangeMessageVisibility` calls that succeeded.
    pub lease_extensions: u64,
    /// Receive-to-settle time of the deliveries that charged (nearest rank).
    pub charge_time_p50_ms: u64,
    pub charge_time_p99_ms: u64,
    /// What sat in the dead-letter queue when the run drained (up to 10).
    pub dead_letters: Vec<DeadLetterSummary>,
    /// Per traced order, what happened to each of its deliveries.
    pub traces: std::collections::BTreeMap<String, Vec<String>>,
    /// Settled deliveries per second, from the first receive to the last
    /// settle (meaningful for prefilled runs).
    pub throughput_per_second: f64,
    /// The service taken away mid-run, if any, and how the run came back.
    #[serde(default)]
    pub outage: Option<crate::outage::OutageReport>,
    /// Processes that exited without the lab's SIGKILL (a crash, or giving
    /// up on a service) and were started again.
    #[serde(default)]
    pub unplanned_exits: u64,
    /// Times a consumer lost the broker or its database and connected again.
    #[serde(default)]
    pub reconnects: u64,
    /// A soak's samples, kills and retention.
    #[serde(default)]
    pub soak: Option<crate::soak::SoakReport>,
    /// False when the run hit its deadline before it drained.
    pub drained: bool,
    pub elapsed_ms: u64,
}

/// One count summed over a table row's runs (the seeds of one case).
pub fn sum_over(runs: &[&RunReport], count: fn(&RunReport) -> u64) -> u64 {
    runs.iter().map(|run| count(run)).sum()
}

/// The most messages waiting in the queue when an outage began, over a
/// table row's runs, or `—` where no run had an outage.
pub fn most_waiting_when_down(runs: &[&RunReport]) -> String {
    runs.iter()
        .filter_map(|run| run.outage.as_ref()?.waiting_when_down)
        .max()
        .map_or_else(|| "—".to_owned(), |most| most.to_string())
}

impl RunReport {
    /// Double charges on orders that met `fault`.
    pub fn double_charges_from(&self, fault: &str) -> u64 {
        self.double_charges_by_fault
            .get(fault)
            .copied()
            .unwrap_or(0)
    }

    /// The lines of every relay's scrape whose metric name is one of
    /// `names`, each prefixed with the relay it came from; sorted within a
    /// relay, because the exporter's order is not stable and the book's
    /// page should be.
    pub fn relay_metric_lines(&self, names: &[&str]) -> Vec<String> {
        self.relay_metrics
            .iter()
            .flat_map(|scrape| {
                let mut lines: Vec<String> = scrape
                    .text
                    .lines()
                    .filter(|line| {
                        line.split_whitespace()
                            .next()
                            .is_some_and(|name| names.contains(&name))
                    })
                    .map(|line| format!("relay {}: {line}", scrape.consumer))
                    .collect();
                lines.sort();
                lines
            })
            .collect()
    }

    /// One line per message left in the dead-letter queue: its order (or
    /// the size of a payload that is no payment event) and its reason.
    pub fn dead_letter_lines(&self) -> Vec<String> {
        self.dead_letters
            .iter()
            .map(|letter| {
                let what = match &letter.order_id {
                    Some(id) => format!("order {id}"),
                    None => format!("{} bytes, not a payment event", letter.payload_bytes),
                };
                let reason = if letter.reason.is_empty() {
                    "(no reason: moved by the redrive policy)"
                } else {
                    &letter.reason
                };
                format!("{what}: {reason}")
            })
            .collect()
    }

    /// Every traced order, its lines indented under it.
    pub fn trace_lines(&self) -> Vec<String> {
        self.traces
            .iter()
            .flat_map(|(order, lines)| {
                std::iter::once(format!("order {order}:"))
                    .chain(lines.iter().map(|line| format!("  {line}")))
            })
            .collect()
    }

    /// The lines of every consumer's scrape whose metric name starts with
    /// one of `prefixes`, each prefixed with the consumer it came from.
    pub fn metric_lines(&self, prefixes: &[&str]) -> Vec<String> {
        let mut lines = Vec::new();
        for scrape in &self.consumer_metrics {
            for line in scrape.text.lines() {
                if !line.starts_with('#') && prefixes.iter().any(|p| line.starts_with(p)) {
                    lines.push(format!("consumer {}: {line}", scrape.consumer));
                }
            }
        }
        lines
    }
}

/// One message in the dead-letter queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterSummary {
    /// The reason the consumer gave; empty if the broker moved it.
    pub reason: String,
    /// The order, when the payload is a payment event.
    pub order_id: Option<String>,
    pub payload_bytes: usize,
}

/// One consumer's `/metrics` text, scraped when the run had drained.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsumerScrape {
    pub consumer: usize,
    pub text: String,
}

/// A sentence the chapter promises, and whether this run bore it out.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChapterReport {
    pub chapter: String,
    pub backend: String,
    pub messages: usize,
    pub seed: u64,
    pub runs: Vec<RunReport>,
    pub claims: Vec<Claim>,
    pub claims_hold: bool,
    /// More tables of the same runs, printed under the main one.
    pub tables: Vec<Table>,
    /// Extra evidence printed under the table: traces, metric scrapes.
    pub sections: Vec<Section>,
    /// Markdown printed as it is, after everything else: the tables of a
    /// measurement that is not a chaos run (a benchmark formats its own).
    pub markdown: Vec<String>,
    /// Such measurements in full, for `--json`, by name.
    pub measurements: std::collections::BTreeMap<String, serde_json::Value>,
}

/// The headline of chapters' reports, one row per run: what ran, and the
/// ledger's two counts. The book's write-up embeds it to put the
/// before/after numbers of every chapter side by side, from the very runs
/// the chapters' pages show.
pub fn headline_markdown(reports: &[ChapterReport]) -> String {
    let mut out = String::from(
        "| chapter | scenario | broker | producer | consumer | messages | double charges | lost events | kills |\n\
         |---|---|---|---|---|--:|--:|--:|--:|\n",
    );
    for report in reports {
        for run in &report.runs {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                report.chapter,
                run.scenario,
                run.backend,
                run.producer,
                run.variant,
                run.messages,
                run.double_charges,
                run.lost_events,
                run.kills,
            ));
        }
    }
    out
}

/// A titled Markdown table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// The title line and the Markdown table; columns after the first
    /// align right.
    pub fn markdown(&self) -> String {
        let mut out = format!("{}:\n\n", self.title);
        out.push_str(&format!("| {} |\n", self.header.join(" | ")));
        let align: Vec<&str> = (0..self.header.len())
            .map(|i| if i == 0 { "---" } else { "--:" })
            .collect();
        out.push_str(&format!("|{}|\n", align.join("|")));
        for row in &self.rows {
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        out
    }
}

/// A titled block of lines printed verbatim under the table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Section {
    pub title: String,
    pub lines: Vec<String>,
}

impl ChapterReport {
    pub fn new(chapter: &str, runs: Vec<RunReport>, claims: Vec<Claim>) -> Self {
        let first = runs.first();
        let mut report = Self {
            chapter: chapter.to_owned(),
            backend: first.map(|r| r.backend.clone()).unwrap_or_default(),
            messages: first.map(|r| r.messages).unwrap_or_default(),
            seed: first.map(|r| r.seed).unwrap_or_default(),
            claims_hold: false,
            runs,
            claims,
            tables: Vec::new(),
            sections: Vec::new(),
            markdown: Vec::new(),
            measurements: Default::default(),
        };
        report.recount();
        report
    }

    /// Adds runs after the first ones (a chapter made of parts).
    pub fn with_runs(mut self, runs: Vec<RunReport>) -> Self {
        if self.runs.is_empty() {
            if let Some(first) = runs.first() {
                self.messages = first.messages;
            }
        }
        self.runs.extend(runs);
        self.recount();
        self
    }

    /// Adds a claim after the first ones.
    pub fn with_claim(mut self, claim: Claim) -> Self {
        self.claims.push(claim);
        self.recount();
        self
    }

    fn recount(&mut self) {
        self.claims_hold =
            self.claims.iter().all(|c| c.holds) && self.runs.iter().all(|r| r.drained);
    }

    /// Adds a measurement that is not a chaos run: its own Markdown for the
    /// table, and the whole of it under `name` in the JSON.
    pub fn with_measurement(
        mut self,
        name: &str,
        markdown: String,
        measurement: &impl Serialize,
    ) -> Self {
        self.markdown.push(markdown);
        self.measurements.insert(
            name.to_owned(),
            serde_json::to_value(measurement).expect("measurements serialise"),
        );
        self
    }

    /// Adds a table under the main one; columns after the first align right.
    pub fn with_table(
        mut self,
        title: impl Into<String>,
        header: &[&str],
        rows: Vec<Vec<String>>,
    ) -> Self {
        self.tables.push(Table {
            title: title.into(),
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows,
        });
        self
    }

    /// Adds a block of evidence under the table.
    pub fn with_section(mut self, title: impl Into<String>, lines: Vec<String>) -> Self {
        self.sections.push(Section {
            title: title.into(),
            lines,
        });
        self
    }

    /// The brokers of the runs, in the order they first appear.
    fn brokers(&self) -> Vec<String> {
        let mut brokers: Vec<String> = Vec::new();
        for run in &self.runs {
            if !brokers.contains(&run.backend) {
                brokers.push(run.backend.clone());
            }
        }
        brokers
    }

    /// Adds chapter 5's table of leases, side by side: per run, the
    /// visibility timeout and heartbeat, the charge times, and what the
    /// consumers saw of the lease running out.
    pub fn with_lease_table(self) -> Self {
        let seconds = |ms: u64| format!("{} s", ms as f64 / 1000.0);
        let rows = self
            .runs
            .iter()
            .map(|run| {
                vec![
                    run.scenario.clone(),
                    run.variant.clone(),
                    run.visibility_timeout_ms
                        .map(seconds)
                        .unwrap_or_else(|| "n/a".into()),
                    if run.heartbeat { "yes" } else { "no" }.into(),
                    format!("{} / {}", run.charge_time_p50_ms, run.charge_time_p99_ms),
                    run.double_charges.to_string(),
                    run.redeliveries.to_string(),
                    run.dedup_hits.to_string(),
                    run.settled_late.to_string(),
                    run.lease_extensions.to_string(),
                    run.dead_lettered.to_string(),
                ]
            })
            .collect();
        self.with_table(
            "Leases, side by side (counts from the consumers; charge times from receive to settle)",
            &[
                "scenario",
                "consumer",
                "visibility timeout",
                "heartbeat",
                "charge p50 / p99 (ms)",
                "double_charges",
                "redeliveries",
                "dedup_hits",
                "late acks",
                "lease extensions",
                "dead_lettered",
            ],
            rows,
        )
    }

    /// Adds the table of a long chaos run: the consumer SIGKILLs at each
    /// crash point, and every committed order by how many times the PSP
    /// charged it (the histogram whose only healthy shape is all in "1").
    pub fn with_kills_and_charges_per_order(self) -> Self {
        let points = consumer::crash::CrashPoint::ALL;
        let mut header = vec!["broker", "consumer", "producer"];
        let point_names: Vec<String> = points.iter().map(|p| format!("kills {p}")).collect();
        header.extend(point_names.iter().map(String::as_str));
        header.extend(["orders charged 0", "1", "2", "3+"]);
        let rows = self
            .runs
            .iter()
            .map(|run| {
                let mut row = vec![
                    run.backend.clone(),
                    run.variant.clone(),
                    run.producer.clone(),
                ];
                row.extend(points.iter().map(|p| {
                    run.kills_by_point
                        .get(p.name())
                        .copied()
                        .unwrap_or(0)
                        .to_string()
                }));
                row.extend(run.audit.charges_per_order.iter().map(u64::to_string));
                row
            })
            .collect();
        self.with_table(
            "Consumer SIGKILLs at each crash point, and committed orders by the number of charges in the PSP's ledger",
            &header,
            rows,
        )
    }

    pub fn to_markdown(&self) -> String {
        let mut out = self.runs_markdown();
        out.push_str(&self.tables_markdown());
        for block in &self.markdown {
            out.push('\n');
            out.push_str(block.trim_end());
            out.push('\n');
        }
        out.push('\n');
        for claim in &self.claims {
            let mark = if claim.holds { "holds" } else { "FAILS" };
            out.push_str(&format!("- {}: **{mark}**\n", claim.statement));
        }
        out
    }

    /// The main table of chaos runs, or nothing for a report without any
    /// (a chapter part that only benchmarks).
    fn runs_markdown(&self) -> String {
        if self.runs.is_empty() {
            return String::new();
        }
        // A report over several brokers names the broker on every row.
        let brokers = self.brokers();
        let multi = brokers.len() > 1;
        // The ledger's verdict first, in a table narrow enough to read
        // without scrolling or to print; the consumers' own counts in a
        // second one.
        let broker = |run: &RunReport| {
            if multi {
                format!("| {} ", run.backend)
            } else {
                String::new()
            }
        };
        let mut out = format!(
            "{} `{}`, seed {}. Counted from the PSP's ledger:\n\n",
            if multi { "Brokers" } else { "Backend" },
            if multi {
                brokers.join("`, `")
            } else {
                self.backend.clone()
            },
            self.seed
        );
        out.push_str(if multi { "| broker " } else { "" });
        out.push_str("| scenario | producer | consumer | messages | double charges | lost events | ledger rows |\n");
        out.push_str(if multi { "|---" } else { "" });
        out.push_str("|---|---|---|--:|--:|--:|--:|\n");
        for run in &self.runs {
            out.push_str(&format!(
                "{}| {}{} | {} | {} | {} | {} | {} | {} |\n",
                broker(run),
                run.scenario,
                if run.drained {
                    ""
                } else {
                    " (deadline hit before drain)"
                },
                run.producer,
                run.variant,
                run.messages,
                run.double_charges,
                run.lost_events,
                run.audit.charges_executed,
            ));
        }
        out.push_str("\nThe consumers' own counts, beside the ledger (never instead of it):\n\n");
        out.push_str(if multi { "| broker " } else { "" });
        out.push_str("| scenario | consumer | deliveries | redeliveries | dedup hits | dedup hit rate | requeued | dead-lettered | kills (consumer + producer + relay) |\n");
        out.push_str(if multi { "|---" } else { "" });
        out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|\n");
        for run in &self.runs {
            out.push_str(&format!(
                "{}| {} | {} | {} | {} | {} | {:.3} | {} | {} | {} ({} + {} + {}) |\n",
                broker(run),
                run.scenario,
                run.variant,
                run.deliveries,
                run.redeliveries,
                run.dedup_hits,
                run.dedup_hit_rate,
                run.requeued,
                run.dead_lettered,
                run.kills,
                run.consumer_kills,
                run.producer_kills,
                run.relay_kills,
            ));
        }
        let breakdown: Vec<String> = self
            .runs
            .iter()
            .filter(|run| run.double_charges > 0)
            .map(|run| {
                let by_fault: Vec<String> = run
                    .double_charges_by_fault
                    .iter()
                    .map(|(fault, n)| format!("{fault} {n}"))
                    .collect();
                format!(
                    "{} / {}: {}",
                    run.scenario,
                    run.variant,
                    by_fault.join(", ")
                )
            })
            .collect();
        if !breakdown.is_empty() {
            out.push_str("\nDouble charges by the fault planned on the order:\n\n");
            for line in breakdown {
                out.push_str(&format!("- {line}\n"));
            }
        }
        out.push_str(&self.topic_markdown());
        out
    }

    /// CDC runs: what Debezium wrote to the topic, read back by a
    /// `read_committed` reader, beside the dedup hits that absorbed it.
    fn topic_markdown(&self) -> String {
        let cdc_runs: Vec<(&RunReport, cdc::topic::TopicCount)> = self
            .runs
            .iter()
            .filter_map(|run| run.topic_records.map(|count| (run, count)))
            .collect();
        if cdc_runs.is_empty() {
            return String::new();
        }
        let mut out = String::from(
            "\nWhat Debezium wrote to the topic (read back from its start, `read_committed`):\n\n\
             | scenario | producer | consumer | outbox rows | records on the topic | distinct events | sent again | dedup hits | Connect kills |\n\
             |---|---|---|--:|--:|--:|--:|--:|--:|\n",
        );
        for (run, count) in cdc_runs {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                run.scenario,
                run.producer,
                run.variant,
                run.audit.orders_committed,
                count.records,
                count.distinct_events,
                count.resent(),
                run.dedup_hits,
                run.relay_kills,
            ));
        }
        out
    }

    /// The extra tables and evidence sections, in the order they were added.
    fn tables_markdown(&self) -> String {
        let mut out = String::new();
        for table in &self.tables {
            out.push('\n');
            out.push_str(&table.markdown());
        }
        for section in &self.sections {
            out.push_str(&format!("\n{}:\n\n```text\n", section.title));
            for line in &section.lines {
                out.push_str(line);
                out.push('\n');
            }
            out.push_str("```\n");
        }
        out
    }
}

/// A drained run of ten orders, for other modules' tests.
#[cfg(test)]
pub(crate) fn sample_run(double_charges: u64) -> RunReport {
    tests::run(double_charges)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn run(double_charges: u64) -> RunReport {
        RunReport {
            scenario: "chaos schedule".into(),
            variant: "naive".into(),
            producer: "naive".into(),
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
            requeued: 0,
            requeued_by_cause: Default::default(),
            kills: 3,
            consumer_kills: 2,
            producer_kills: 1,
            relay_kills: 0,
            kills_by_point: Default::default(),
            republished: 0,
            topic_records: None,
            relay_metrics: Vec::new(),
            audit: Audit {
                orders_committed: 10,
                charges_executed: 11,
                double_charges,
                lost_events: 1,
                unexpected_charges: 0,
                payments_recorded: 11,
                extra_charges_by_order: Default::default(),
                charges_per_order: [1, 7, 2, 0],
                offending_orders: Vec::new(),
            },
            double_charges_by_fault: Default::default(),
            consumer_metrics: Vec::new(),
            visibility_timeout_ms: None,
            max_receive_count: None,
            heartbeat: false,
            settled_late: 0,
            lease_extensions: 0,
            charge_time_p50_ms: 0,
            charge_time_p99_ms: 0,
            dead_letters: Vec::new(),
            traces: Default::default(),
            throughput_per_second: 0.0,
            outage: None,
            unplanned_exits: 0,
            reconnects: 0,
            soak: None,
            drained: true,
            elapsed_ms: 1234,
        }
    }

    #[test]
    fn markdown_has_a_row_per_run_and_no_timings() {
        let report = ChapterReport::new("ch01", vec![run(2)], vec![Claim::new("x", true)]);
        let md = report.to_markdown();
        assert!(md.contains("| chaos schedule | naive | naive | 10 | 2 | 1 | 11 |"));
        assert!(
            md.contains("| chaos schedule | naive | 12 | 2 | 0 | 0.000 | 0 | 0 | 3 (2 + 1 + 0) |")
        );
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
