//! A benchmark's goals: one Markdown row per goal, PASS or MISS. A missed
//! goal is a finding to print, not a failed run.

/// One row: the goal, what was measured, and whether it was met.
pub(crate) fn goal_line(goal: &str, measured: String, met: bool) -> String {
    format!(
        "| {goal} | {measured} | {} |",
        if met { "PASS" } else { "MISS" }
    )
}

/// The rows under their header, then a blank line; nothing if none.
pub(crate) fn print_goals(lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    println!("| goal | measured | result |");
    println!("|---|--:|---|");
    for line in lines {
        println!("{line}");
    }
    println!();
}
