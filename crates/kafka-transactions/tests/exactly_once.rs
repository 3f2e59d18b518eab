//! The consume–transform–produce pipeline against the real broker, with
//! the transformer SIGKILLed for real: transactions leave the committed
//! output exact, the at-least-once variant duplicates what it had written
//! when killed.

use std::process::ExitCode;
use std::time::Duration;

use kafka_transactions::exactly_once::{KillLanding, PipelineRun};
use kafka_transactions::{
    run_exactly_once, run_transformer_if_requested, ExactlyOnceConfig, TransformerCommand,
};

/// Not a test: the transformer process the pipeline test starts (this test
/// binary, re-executed with only this test and the job in the environment).
#[test]
#[ignore = "the transformer process; run_exactly_once starts it"]
fn transformer_process() {
    if let Some(code) = run_transformer_if_requested() {
        std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_survive_sigkills_and_at_least_once_duplicates() {
    let config = ExactlyOnceConfig {
        records: 400,
        batch_size: 20,
        work_per_record: Duration::from_millis(2),
        kills: 3,
        max_acked_before_kill: 30,
        seed: 11,
        deadline: Duration::from_secs(60),
        topic_prefix: "eo.test.ch06.pipeline".to_owned(),
        ..ExactlyOnceConfig::new(
            TransformerCommand::this_test_binary("transformer_process").unwrap(),
        )
    };
    let report = run_exactly_once(&config).await.unwrap();
    let markdown = report.to_markdown();

    for run in [&report.transactional, &report.at_least_once] {
        // Every kill is planned after fewer acknowledgements than a life
        // could produce, so every planned kill happens.
        assert_eq!(run.kills.len(), 3, "{run:#?}");
        assert!(run.drained(), "{run:#?}");
        assert_eq!(run.failures, 0, "{run:#?}");
        assert_eq!(run.starts, 4, "{run:#?}");
        assert_eq!(run.read_committed.missing, 0, "{run:#?}");
        assert_eq!(run.read_committed.distinct, 400, "{run:#?}");
    }

    let txn = &report.transactional;
    assert_eq!(txn.read_committed.records, 400, "{markdown}");
    assert_eq!(txn.read_committed.duplicates, 0, "{markdown}");
    // What a killed open transaction had written is in the log, aborted:
    // a read_uncommitted reader sees at least those records on top.
    assert!(
        txn.aborted_records_seen() >= txn.acked_in_killed_batches(),
        "{markdown}"
    );
    if txn.acked_in_killed_batches() > 0 {
        assert!(txn.read_uncommitted.records > 400, "{markdown}");
        assert!(txn.read_uncommitted.duplicates > 0, "{markdown}");
    }

    // Without transactions, every record acknowledged in a batch whose
    // offsets were never committed is consumed and written again.
    let alo = &report.at_least_once;
    assert!(
        alo.read_committed.duplicates >= alo.acked_in_killed_batches(),
        "{markdown}"
    );
    if alo.acked_in_killed_batches() > 0 {
        assert!(alo.read_committed.duplicates > 0, "{markdown}");
    }
    // Nothing is aborted without transactions: both readers see the same.
    assert_eq!(alo.read_uncommitted, read_committed_as_uncommitted(alo));

    assert!(
        markdown.contains("| SIGKILLs of the transformer | 3 | 3 |"),
        "{markdown}"
    );
    eprintln!("{markdown}");
    let landings: Vec<KillLanding> = txn.kills.iter().map(|k| k.landing).collect();
    eprintln!("transactional kills landed: {landings:?}");
}

fn read_committed_as_uncommitted(
    run: &PipelineRun,
) -> kafka_transactions::exactly_once::ReaderCount {
    kafka_transactions::exactly_once::ReaderCount {
        isolation: kafka_transactions::exactly_once::Isolation::ReadUncommitted,
        ..run.read_committed
    }
}
