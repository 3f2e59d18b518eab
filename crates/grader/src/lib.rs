//! The self-paced course's grader: runs a reader's own consumer, in any
//! language, under the faults of each chapter, and grades it from the PSP's
//! ledger.
//!
//! # Layout
//!
//! - [`levels`]: the graded levels, each following a chapter, with the
//!   faults it adds and the hint a failing grade prints.
//! - [`processes`]: the reader's consumer processes, started from a shell
//!   command with the contract's environment, SIGKILLed from outside at
//!   moments the reader's code cannot choose, restarted.
//! - [`grade`]: one level run end to end (databases, PSP, queue, orders,
//!   drain) and its grade: double charges and lost orders by the ledger,
//!   bad messages by the dead-letter queue, crash loops by the exits.
//!
//! The contract a consumer must meet is the book's consumer contract page;
//! our own `consumer` binary meets it and passes every level.

pub mod grade;
pub mod levels;
pub mod processes;

use chaos_lab::report::Table;

pub use grade::{run_level, LevelGrade, Settings};
pub use levels::Level;

/// The grade as a Markdown table, one row per level run.
pub fn grade_table(grades: &[LevelGrade]) -> String {
    let rows = grades
        .iter()
        .map(|g| {
            vec![
                format!("{}. {}", g.level.number(), g.level.name()),
                g.backend.name().to_owned(),
                if g.passed() { "PASS" } else { "FAIL" }.to_owned(),
                g.audit.orders_committed.to_string(),
                g.audit.double_charges.to_string(),
                g.audit.lost_events.to_string(),
                format!(
                    "{}/{}",
                    g.dead_lettered.min(g.bad_messages as u64),
                    g.bad_messages
                ),
                g.kills.to_string(),
                g.exits.to_string(),
                format!("{:.1} s", g.elapsed.as_secs_f64()),
            ]
        })
        .collect();
    Table {
        title: "Grade (from the PSP's ledger)".to_owned(),
        header: [
            "level",
            "broker",
            "grade",
            "orders",
            "double charges",
            "lost",
            "bad input dead-lettered",
            "kills",
            "exits on their own",
            "time",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows,
    }
    .markdown()
}
