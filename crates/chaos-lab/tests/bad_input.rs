//! Every row of the book's bad-input table, on RabbitMQ and on SQS: each
//! input published by a plain client, handled by the hardened consumer, and
//! judged by its settle, the dead-letter queue's copy and the PSP's ledger.

use chaos_lab::bad_input::{self, Row};
use chaos_lab::BackendKind;

async fn rows_on(backend: BackendKind) -> Vec<Row> {
    let rows = bad_input::run(backend)
        .await
        .expect("the services are up (scripts/services-up)");
    assert_eq!(rows.len(), bad_input::cases().len());
    for row in &rows {
        assert!(
            row.deviations.is_empty(),
            "{}: {:?} ({:?})",
            row.name,
            row.deviations,
            row.outcomes
        );
    }
    rows
}

fn row<'a>(rows: &'a [Row], name: &str) -> &'a Row {
    rows.iter()
        .find(|row| row.name.starts_with(name))
        .unwrap_or_else(|| panic!("no row {name:?}"))
}

/// The defects of issue 12, each pinned by name on top of the table.
fn the_defects_stay_fixed(rows: &[Row]) {
    let qqq = row(rows, "unknown currency");
    assert_eq!(qqq.charges, Some(0), "QQQ is never charged");
    assert!(qqq.outcomes[0].contains("unknown currency QQQ (not an ISO 4217 code)"));

    let reused = row(rows, "reused event id");
    assert_eq!(reused.charges, Some(1));
    assert!(reused.outcomes[1].starts_with("dead-lettered: dedup fingerprint mismatch"));

    let second = row(rows, "second event for one order (fresh event id)");
    assert_eq!(second.charges, Some(1), "one order, one charge");

    let maximal = row(rows, "invalid event, body at the size limit");
    assert!(maximal.outcomes[0].starts_with("dead-lettered"));
}

#[tokio::test]
async fn every_bad_input_meets_its_promised_outcome_on_rabbitmq() {
    let rows = rows_on(BackendKind::Rabbitmq).await;
    the_defects_stay_fixed(&rows);
    let counted = row(&rows, "valid event with a publisher-set `x-delivery-count");
    assert_eq!(counted.outcomes, ["charged"]);
    assert_eq!(counted.charges, Some(1));
    assert!(row(&rows, "not UTF-8").outcomes[0].starts_with("dead-lettered"));
}

#[tokio::test]
async fn every_bad_input_meets_its_promised_outcome_on_sqs() {
    let rows = rows_on(BackendKind::Sqs).await;
    the_defects_stay_fixed(&rows);
    assert!(row(&rows, "not UTF-8").outcomes[0].starts_with("refused at publish"));
    // The body filled the 256 KiB: its copy went to the DLQ byte for byte,
    // without the reason attribute that would not have fit.
    let maximal = row(&rows, "invalid event, body at the size limit");
    assert_eq!(maximal.dead_letter_notes.len(), 1, "{maximal:?}");
}
