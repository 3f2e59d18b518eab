//! `headline REPORT.json...`: the headline table of chapters' JSON reports
//! (`EO_REPORT_JSON`), one row per run. `scripts/headline` feeds it the
//! book build's own reports, so a page can set chapters side by side
//! without typing a number.

use std::process::ExitCode;

use anyhow::Context;
use chaos_lab::report::{headline_markdown, ChapterReport};

fn main() -> ExitCode {
    let result = (|| -> anyhow::Result<String> {
        let mut reports = Vec::new();
        for path in std::env::args().skip(1) {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            let report: ChapterReport = serde_json::from_str(&text)
                .with_context(|| format!("{path} is not a chapter's JSON report"))?;
            reports.push(report);
        }
        anyhow::ensure!(!reports.is_empty(), "usage: headline REPORT.json...");
        Ok(headline_markdown(&reports))
    })();
    match result {
        Ok(markdown) => {
            print!("{markdown}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}
