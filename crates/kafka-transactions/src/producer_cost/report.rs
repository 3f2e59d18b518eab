//! The producer-cost results: the figures, their ratios to `acks=all`, the
//! chapter's goals, and the Markdown the book embeds.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::{CommitEvery, ProducerMode};
use crate::error::Result;
use crate::text::thousands;

/// One mode at one payload size in one round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundFigures {
    /// Records sent and acknowledged (or committed) in the throughput phase.
    pub messages: usize,
    /// True when the time cap, not the message count, ended that phase.
    pub capped: bool,
    /// Transactions committed in that phase (0 without transactions).
    pub commits: usize,
    /// That phase's first send to its last acknowledgement (or commit),
    /// seconds.
    pub elapsed_s: f64,
    pub msgs_per_sec: f64,
    /// Records sent in the latency phase.
    pub latency_messages: usize,
    /// Send → acknowledgement (transactions: → commit) in the latency
    /// phase, milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// One mode at one payload size over all rounds: totals, and the median
/// of the rounds' figures.
#[derive(Debug, Clone, Serialize)]
pub struct ModeMeasurement {
    pub mode: ProducerMode,
    pub payload_bytes: usize,
    /// Records of the throughput phases, all rounds together.
    pub messages: usize,
    /// Rounds the time cap ended before the message count.
    pub capped_rounds: usize,
    /// Transactions committed in the throughput phases, all rounds
    /// together.
    pub commits: usize,
    /// Medians over the rounds.
    pub msgs_per_sec: f64,
    /// Payload megabytes (10⁶ bytes) per second, from `msgs_per_sec`.
    pub mb_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub rounds: Vec<RoundFigures>,
}

impl ModeMeasurement {
    pub(super) fn from_rounds(
        mode: ProducerMode,
        payload_bytes: usize,
        rounds: Vec<RoundFigures>,
    ) -> Self {
        let msgs_per_sec = median(rounds.iter().map(|r| r.msgs_per_sec));
        Self {
            mode,
            payload_bytes,
            messages: rounds.iter().map(|r| r.messages).sum(),
            capped_rounds: rounds.iter().filter(|r| r.capped).count(),
            commits: rounds.iter().map(|r| r.commits).sum(),
            msgs_per_sec,
            mb_per_sec: msgs_per_sec * payload_bytes as f64 / 1e6,
            p50_ms: median(rounds.iter().map(|r| r.p50_ms)),
            p99_ms: median(rounds.iter().map(|r| r.p99_ms)),
            rounds,
        }
    }
}

/// The settings the run used, printed under the table.
#[derive(Debug, Clone, Serialize)]
pub struct ProducerCostSettings {
    pub messages: usize,
    pub time_cap_s: f64,
    pub latency_rate: u32,
    pub latency_duration_s: f64,
    pub rounds: usize,
    pub warmup_messages: usize,
    pub partitions: i32,
    pub linger_ms: f64,
    pub max_in_flight: usize,
    pub requests_in_flight: u32,
}

/// Every measurement of a run.
#[derive(Debug, Clone, Serialize)]
pub struct ProducerCostReport {
    pub settings: ProducerCostSettings,
    pub measurements: Vec<ModeMeasurement>,
    /// The whole run, topic creation and warm-ups included, seconds.
    pub wall_time_s: f64,
}

/// A measurement over `acks=all` at the same payload size: each figure
/// divided by the same round's `acks=all`, then the median over rounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ratios {
    /// msgs/s (and so MB/s) over the baseline's.
    pub throughput: f64,
    /// The lowest and highest round's throughput ratio: the noise.
    pub throughput_min: f64,
    pub throughput_max: f64,
    pub p50: f64,
    pub p99: f64,
}

/// One of the chapter's benchmark goals, judged on this run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub description: String,
    pub payload_bytes: usize,
    /// The measured throughput ratio the goal is about (median of rounds).
    pub measured: f64,
    pub met: bool,
}

impl ProducerCostReport {
    pub fn measurement(
        &self,
        mode: ProducerMode,
        payload_bytes: usize,
    ) -> Option<&ModeMeasurement> {
        self.measurements
            .iter()
            .find(|m| m.mode == mode && m.payload_bytes == payload_bytes)
    }

    /// `measurement` over `acks=all` at its payload size (None when the run
    /// had no `acks=all`).
    pub fn ratios(&self, measurement: &ModeMeasurement) -> Option<Ratios> {
        let baseline = self.measurement(ProducerMode::AcksAll, measurement.payload_bytes)?;
        let per_round = |pick: fn(&RoundFigures) -> f64| -> Vec<f64> {
            measurement
                .rounds
                .iter()
                .zip(&baseline.rounds)
                .map(|(round, base)| pick(round) / pick(base))
                .collect()
        };
        let throughput = per_round(|r| r.msgs_per_sec);
        Some(Ratios {
            throughput: median(throughput.iter().copied()),
            throughput_min: throughput.iter().copied().fold(f64::INFINITY, f64::min),
            throughput_max: throughput.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            p50: median(per_round(|r| r.p50_ms).into_iter()),
            p99: median(per_round(|r| r.p99_ms).into_iter()),
        })
    }

    /// `of` over `over` in throughput, round by round, then the median.
    pub fn throughput_ratio(
        &self,
        of: ProducerMode,
        over: ProducerMode,
        payload_bytes: usize,
    ) -> Option<f64> {
        let of = self.measurement(of, payload_bytes)?;
        let over = self.measurement(over, payload_bytes)?;
        Some(median(
            of.rounds
                .iter()
                .zip(&over.rounds)
                .map(|(a, b)| a.msgs_per_sec / b.msgs_per_sec),
        ))
    }

    /// The chapter's goals, for each payload size whose modes were measured:
    /// idempotent ≥ 0.97× `acks=all`; 100 ms transactions ≥ 0.95×
    /// idempotent; one-message transactions below 0.5× idempotent.
    pub fn goals(&self) -> Vec<Goal> {
        let hundred_ms = ProducerMode::Transactional(CommitEvery::Interval(
            std::time::Duration::from_millis(100),
        ));
        let per_message = ProducerMode::Transactional(CommitEvery::Message);
        let mut goals = Vec::new();
        for payload_bytes in self.payload_sizes() {
            let mut judge = |description: &str, of, over, passes: fn(f64) -> bool| {
                if let Some(measured) = self.throughput_ratio(of, over, payload_bytes) {
                    goals.push(Goal {
                        description: description.to_owned(),
                        payload_bytes,
                        measured,
                        met: passes(measured),
                    });
                }
            };
            judge(
                "idempotent ≥ 0.97× acks=all",
                ProducerMode::Idempotent,
                ProducerMode::AcksAll,
                |r| r >= 0.97,
            );
            judge(
                "transactions every 100 ms ≥ 0.95× idempotent",
                hundred_ms,
                ProducerMode::Idempotent,
                |r| r >= 0.95,
            );
            judge(
                "transactions per message collapse: < 0.5× idempotent",
                per_message,
                ProducerMode::Idempotent,
                |r| r < 0.5,
            );
        }
        goals
    }

    /// The payload sizes measured, in the order they ran.
    pub fn payload_sizes(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> = Vec::new();
        for m in &self.measurements {
            if !sizes.contains(&m.payload_bytes) {
                sizes.push(m.payload_bytes);
            }
        }
        sizes
    }

    /// The table (ratios to `acks=all` beside each figure), the settings
    /// it was measured with, and the goals.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "| mode | payload | messages | msgs/s | MB/s | throughput × acks=all \
             | latency p50 ms | p50 × acks=all | latency p99 ms | p99 × acks=all | commits |\n\
             |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for m in &self.measurements {
            let ratios = self.ratios(m);
            let ratio = |pick: fn(&Ratios) -> f64| {
                ratios
                    .as_ref()
                    .map_or_else(|| "–".to_owned(), |r| format!("{:.2}×", pick(r)))
            };
            let throughput = match &ratios {
                Some(r) if m.rounds.len() > 1 => format!(
                    "{:.2}× ({:.2}–{:.2})",
                    r.throughput, r.throughput_min, r.throughput_max
                ),
                _ => ratio(|r| r.throughput),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {}{} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
                m.mode,
                payload_label(m.payload_bytes),
                thousands(m.messages as f64),
                if m.capped_rounds > 0 {
                    " (time cap)"
                } else {
                    ""
                },
                thousands(m.msgs_per_sec),
                m.mb_per_sec,
                throughput,
                milliseconds(m.p50_ms),
                ratio(|r| r.p50),
                milliseconds(m.p99_ms),
                ratio(|r| r.p99),
                if m.mode.is_transactional() {
                    thousands(m.commits as f64)
                } else {
                    "–".to_owned()
                },
            );
        }
        let s = &self.settings;
        let _ = write!(
            out,
            "\nEach mode, payload and round on a fresh {}-partition topic with keyed records, \
             `linger.ms={}`, `max.in.flight.requests.per.connection={}`. Throughput: flat out, \
             at most {} records awaiting acknowledgement, {} records or {} s (whichever came \
             first) after a warm-up of {}. Latency: at a steady {} records/s for {} s \
             (transactions: at least two commit intervals), from the send to the \
             acknowledgement, or for a transactional record to the end of the commit that made \
             it visible. {} rounds, the modes interleaved; figures are the median round, ratios \
             are taken within a round against that round's `acks=all` (in brackets: the lowest \
             and highest round); messages and commits are throughput-phase totals. Whole run: \
             {:.0} s.\n",
            s.partitions,
            s.linger_ms,
            s.requests_in_flight,
            thousands(s.max_in_flight as f64),
            thousands(s.messages as f64),
            s.time_cap_s,
            thousands(s.warmup_messages as f64),
            thousands(f64::from(s.latency_rate)),
            s.latency_duration_s,
            s.rounds,
            self.wall_time_s,
        );
        let goals = self.goals();
        if !goals.is_empty() {
            out.push('\n');
            for goal in goals {
                let _ = writeln!(
                    out,
                    "- {} {} ({}): {:.3}×",
                    if goal.met { "PASS" } else { "MISS" },
                    goal.description,
                    payload_label(goal.payload_bytes),
                    goal.measured,
                );
            }
        }
        out
    }

    /// An SVG bar chart of each mode's throughput over `acks=all`, one bar
    /// per payload size.
    pub fn write_chart(&self, path: &Path) -> Result<()> {
        super::chart::throughput_ratios(self, path)
    }
}

/// The median (the mean of the middle two for an even count; NaN for none).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// "1 KiB" for 1024 bytes, "100 B" for 100.
pub(super) fn payload_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

fn milliseconds(ms: f64) -> String {
    if ms >= 100.0 {
        thousands(ms)
    } else {
        format!("{ms:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::{median, payload_label};

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
    }

    #[test]
    fn numbers_read_like_a_table() {
        assert_eq!(payload_label(1024), "1 KiB");
        assert_eq!(payload_label(100), "100 B");
    }
}
