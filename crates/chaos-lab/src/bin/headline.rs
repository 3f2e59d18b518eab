//! `headline [--chart] REPORT.json...`: the headline of chapters' JSON
//! reports (`EO_REPORT_JSON`), one row per run, as a Markdown table or, with
//! `--chart`, as the before/after chart of the same rows. `scripts/headline`
//! feeds it the book build's own reports, so a page can set chapters side
//! by side without typing a number.

use std::process::ExitCode;

use anyhow::Context;
use chaos_lab::chart::verdict_svg;
use chaos_lab::report::{headline_markdown, ChapterReport};

fn main() -> ExitCode {
    let result = (|| -> anyhow::Result<String> {
        let mut chart = false;
        let mut reports = Vec::new();
        for arg in std::env::args().skip(1) {
            if arg == "--chart" {
                chart = true;
                continue;
            }
            let text = std::fs::read_to_string(&arg).with_context(|| format!("reading {arg}"))?;
            let report: ChapterReport = serde_json::from_str(&text)
                .with_context(|| format!("{arg} is not a chapter's JSON report"))?;
            reports.push(report);
        }
        anyhow::ensure!(
            !reports.is_empty(),
            "usage: headline [--chart] REPORT.json..."
        );
        Ok(if chart {
            verdict_svg(&reports)
        } else {
            headline_markdown(&reports)
        })
    })();
    match result {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}
