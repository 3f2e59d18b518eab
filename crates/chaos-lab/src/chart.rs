//! The before/after picture of chapters' runs: per run, the ledger's double
//! charges and lost events as two bars, drawn from the same reports that
//! fill the headline table.
//!
//! The chart is plain SVG written inline, so the book embeds it straight
//! from the kept JSON reports with no image file to keep in step, it scales
//! with the content column, and its text takes the page's colour in every
//! mdBook theme.

use std::fmt::Write as _;

use crate::report::ChapterReport;

const WIDTH: f64 = 720.0;
const LABEL_WIDTH: f64 = 330.0;
const VALUE_WIDTH: f64 = 56.0;
const BAR_AREA: f64 = WIDTH - LABEL_WIDTH - VALUE_WIDTH;
const LEGEND_HEIGHT: f64 = 28.0;
const ROW_HEIGHT: f64 = 54.0;
const BAR_HEIGHT: f64 = 15.0;
const DOUBLE_CHARGE_COLOUR: &str = "#c62828";
const LOST_EVENT_COLOUR: &str = "#ef8f00";
const ZERO_COLOUR: &str = "#2e7d32";
/// The chart's id on its page: `chNN-....html#before-after` opens the page
/// at the chart, with the tables of the same runs under it.
pub const ANCHOR: &str = "before-after";

/// One `<figure>` holding the chart of every run of `reports`, in order,
/// with a caption. It holds no blank line, so Markdown passes it through as
/// one HTML block.
pub fn verdict_svg(reports: &[ChapterReport]) -> String {
    let runs: Vec<_> = reports
        .iter()
        .flat_map(|report| report.runs.iter())
        .collect();
    let largest = runs
        .iter()
        .map(|run| run.double_charges.max(run.lost_events))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let height = LEGEND_HEIGHT + ROW_HEIGHT * runs.len() as f64;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<figure class=\"verdict-chart\" id=\"{ANCHOR}\">\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {height}\" \
         width=\"100%\" style=\"max-width:{WIDTH}px\" role=\"img\" \
         font-family=\"sans-serif\" font-size=\"12\" fill=\"currentColor\">\n\
         <title>Double charges and lost events per run, from the PSP's ledger</title>\n"
    );
    legend(&mut svg);
    for (index, run) in runs.iter().enumerate() {
        let top = LEGEND_HEIGHT + ROW_HEIGHT * index as f64;
        // Three short lines, each cut to what fits beside the bars: the
        // consumer, then the producer and broker, then the scenario.
        let lines = [
            (run.variant.clone(), 38, " font-weight=\"bold\""),
            (
                format!("{} · {}", run.producer, run.backend),
                50,
                " font-size=\"11\" opacity=\"0.75\"",
            ),
            (
                format!("{} · {} orders", run.scenario, run.messages),
                50,
                " font-size=\"11\" opacity=\"0.75\"",
            ),
        ];
        for (line, (text, chars, style)) in lines.iter().enumerate() {
            let _ = writeln!(
                svg,
                "<text x=\"0\" y=\"{}\"{style}>{}</text>",
                top + 14.0 + 14.0 * line as f64,
                escape(&fit(text, *chars))
            );
        }
        bar(
            &mut svg,
            top + 6.0,
            run.double_charges,
            largest,
            DOUBLE_CHARGE_COLOUR,
        );
        bar(
            &mut svg,
            top + 9.0 + BAR_HEIGHT,
            run.lost_events,
            largest,
            LOST_EVENT_COLOUR,
        );
        let _ = writeln!(
            svg,
            "<line x1=\"0\" x2=\"{WIDTH}\" y1=\"{y}\" y2=\"{y}\" stroke=\"currentColor\" stroke-opacity=\"0.15\"/>",
            y = top + ROW_HEIGHT - 3.0
        );
    }
    svg.push_str("</svg>\n");
    svg.push_str(
        "<figcaption>Double charges and lost events per run, counted from the PSP's ledger \
         and the shop's orders: the same runs as the tables. A green 0 is the goal.</figcaption>\n\
         </figure>\n",
    );
    svg
}

fn legend(svg: &mut String) {
    let mut x = LABEL_WIDTH;
    for (colour, label) in [
        (DOUBLE_CHARGE_COLOUR, "double charges"),
        (LOST_EVENT_COLOUR, "lost events"),
    ] {
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"6\" width=\"12\" height=\"12\" fill=\"{colour}\"/>\
             <text x=\"{}\" y=\"16\">{label}</text>",
            x + 16.0
        );
        x += 140.0;
    }
}

/// A bar of `value` on a scale whose full width is `largest`, its figure at
/// its end; a zero is a green figure alone, so it cannot be misread as a
/// bar too short to see.
fn bar(svg: &mut String, top: f64, value: u64, largest: f64, colour: &str) {
    let baseline = top + BAR_HEIGHT - 3.0;
    if value == 0 {
        let _ = writeln!(
            svg,
            "<text x=\"{LABEL_WIDTH}\" y=\"{baseline}\" fill=\"{ZERO_COLOUR}\" font-weight=\"bold\">0</text>"
        );
        return;
    }
    // Never thinner than a visible sliver, however large the largest bar.
    let length = (value as f64 / largest * BAR_AREA).max(3.0);
    let _ = writeln!(
        svg,
        "<rect x=\"{LABEL_WIDTH}\" y=\"{top}\" width=\"{length:.1}\" height=\"{BAR_HEIGHT}\" fill=\"{colour}\"/>\
         <text x=\"{:.1}\" y=\"{baseline}\">{value}</text>",
        LABEL_WIDTH + length + 5.0
    );
}

/// `text` cut to `chars` characters with an ellipsis, so a long scenario
/// never runs under the bars.
fn fit(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(chars - 1).collect();
    cut.push('…');
    cut
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::RunReport;

    fn run(variant: &str, double_charges: u64, lost_events: u64) -> RunReport {
        serde_json::from_value(serde_json::json!({
            "scenario": "chaos schedule <1>", "variant": variant, "producer": "outbox",
            "backend": "rabbitmq", "messages": 200, "seed": 7,
            "double_charges": double_charges, "lost_events": lost_events,
            "deliveries": 0, "redeliveries": 0, "dedup_hits": 0, "dedup_hit_rate": 0.0,
            "dead_lettered": 0, "requeued": 0, "requeued_by_cause": {}, "kills": 0,
            "consumer_kills": 0, "kills_by_point": {}, "producer_kills": 0,
            "relay_kills": 0, "republished": 0, "topic_records": null,
            "relay_metrics": [],
            "audit": {
                "orders_committed": 200, "charges_executed": 200, "double_charges": 0,
                "lost_events": 0, "unexpected_charges": 0, "payments_recorded": 200,
                "charges_per_order": [0, 200, 0, 0], "offending_orders": []
            },
            "double_charges_by_fault": {}, "consumer_metrics": [],
            "visibility_timeout_ms": null, "max_receive_count": null,
            "heartbeat": false, "settled_late": 0, "lease_extensions": 0,
            "charge_time_p50_ms": 0, "charge_time_p99_ms": 0, "dead_letters": [],
            "traces": {}, "throughput_per_second": 0.0, "drained": true,
            "elapsed_ms": 0
        }))
        .unwrap()
    }

    #[test]
    fn bars_scale_to_the_largest_count_and_zeros_show_as_green_figures() {
        let report = ChapterReport::new(
            "ch01",
            vec![run("naive", 40, 10), run("hardened", 0, 0)],
            vec![],
        );
        let svg = verdict_svg(&[report]);
        // The largest count spans the whole bar area; a quarter of it, a quarter.
        assert!(svg.contains(&format!("width=\"{BAR_AREA:.1}\"")), "{svg}");
        assert!(
            svg.contains(&format!("width=\"{:.1}\"", BAR_AREA / 4.0)),
            "{svg}"
        );
        assert_eq!(svg.matches(&format!("fill=\"{ZERO_COLOUR}\"")).count(), 2);
        assert!(svg.contains("chaos schedule &lt;1&gt;"));
        // One HTML block: a blank line would end it mid-figure.
        assert!(!svg.contains("\n\n"));
    }
}
