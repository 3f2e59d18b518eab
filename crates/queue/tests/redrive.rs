//! `queue::redrive` against the real ElasticMQ: every test declares its own
//! `eo-test-<uuid>` queue pair and deletes it at the end.

use std::path::PathBuf;
use std::time::Duration;

use queue::redrive::{read_snapshot, Redrive, RedriveOptions};
use queue::sqs::{ReceiveSettings, SqsBroker, SqsTopology};
use queue::{OutgoingMessage, Publisher, QueueInspector, Receiver};

const ARRIVES: Duration = Duration::from_secs(5);

async fn connect() -> SqsBroker {
    SqsBroker::connect()
        .await
        .expect("ElasticMQ should be up (run scripts/services-up)")
}

fn snapshot_path() -> PathBuf {
    std::env::temp_dir().join(format!(
        "eo-test-redrive-{}.jsonl",
        uuid::Uuid::new_v4().simple()
    ))
}

/// Declares a fresh queue pair and dead-letters `m0`, `m1`, `m2` with reasons.
async fn with_three_dead_letters(broker: &SqsBroker) -> SqsTopology {
    let topology = SqsTopology::new(
        format!("eo-test-{}", uuid::Uuid::new_v4().simple()),
        Duration::from_secs(30),
        5,
    );
    broker.declare(&topology).await.expect("declare");
    let publisher = broker.publisher(&topology).await.expect("publisher");
    for i in 0..3 {
        publisher
            .publish(&OutgoingMessage {
                key: "k".into(),
                message_id: format!("id-{i}"),
                payload: format!("m{i}").into_bytes(),
            })
            .await
            .expect("publish");
    }
    let mut receiver = broker
        .receiver(&topology, ReceiveSettings::default())
        .await
        .expect("receiver");
    let mut dead = 0;
    while dead < 3 {
        for delivery in receiver.receive(10, ARRIVES).await.expect("receive") {
            let body = String::from_utf8(delivery.payload.clone()).unwrap();
            receiver
                .dead_letter(&delivery, &format!("bad {body}"))
                .await
                .expect("dead_letter");
            dead += 1;
        }
    }
    assert_eq!(
        broker
            .inspector(&topology)
            .dead_letter_count()
            .await
            .unwrap(),
        3
    );
    topology
}

fn options(path: &PathBuf) -> RedriveOptions {
    RedriveOptions {
        rate: 100.0,
        visibility_timeout: Duration::from_secs(2),
        ..RedriveOptions::new(path)
    }
}

async fn main_bodies(broker: &SqsBroker, topology: &SqsTopology) -> Vec<(String, Option<String>)> {
    let mut receiver = broker
        .receiver(topology, ReceiveSettings::default())
        .await
        .expect("receiver");
    let mut bodies = Vec::new();
    loop {
        let batch = receiver.receive(10, Duration::ZERO).await.expect("receive");
        if batch.is_empty() {
            break;
        }
        for delivery in batch {
            bodies.push((
                String::from_utf8(delivery.payload.clone()).unwrap(),
                delivery.message_id.clone(),
            ));
            receiver.ack(&delivery).await.expect("ack");
        }
    }
    bodies.sort();
    bodies
}

#[tokio::test]
async fn redrive_snapshots_then_moves_every_dead_letter() {
    let broker = connect().await;
    let topology = with_three_dead_letters(&broker).await;
    let path = snapshot_path();
    let redrive = Redrive::by_name(
        &broker,
        &topology.dead_letter_queue(),
        &topology.queue,
        options(&path),
    )
    .await
    .expect("redrive");
    let snapshot = redrive.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.sample().len(), 3);
    let report = redrive.run(&snapshot).await.expect("run");
    assert_eq!(
        (
            report.snapshotted,
            report.moved,
            report.failed,
            report.duplicates_possible
        ),
        (3, 3, 0, 0),
        "{report:?}"
    );

    let mut lines = read_snapshot(&path).expect("snapshot file");
    lines.sort_by(|a, b| a.body.cmp(&b.body));
    assert_eq!(lines.len(), 3);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line.body, format!("m{i}"));
        assert_eq!(line.reason, format!("bad m{i}"));
        assert_eq!(line.message_id.as_deref(), Some(format!("id-{i}").as_str()));
        assert!(line.receive_count.is_some());
    }

    let bodies = main_bodies(&broker, &topology).await;
    let expected: Vec<_> = (0..3)
        .map(|i| (format!("m{i}"), Some(format!("id-{i}"))))
        .collect();
    assert_eq!(bodies, expected);
    assert_eq!(
        broker
            .inspector(&topology)
            .dead_letter_count()
            .await
            .unwrap(),
        0
    );
    // A second snapshot to the same file is refused.
    assert!(redrive.snapshot().await.is_err());

    std::fs::remove_file(&path).unwrap();
    broker.delete(&topology).await.expect("delete");
}

#[tokio::test]
async fn dry_run_moves_nothing() {
    let broker = connect().await;
    let topology = with_three_dead_letters(&broker).await;
    let path = snapshot_path();
    let redrive = Redrive::by_name(
        &broker,
        &topology.dead_letter_queue(),
        &topology.queue,
        options(&path),
    )
    .await
    .expect("redrive");
    // A dry run is the snapshot and sample only.
    let snapshot = redrive.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.entries.len(), 3);
    assert_eq!(read_snapshot(&path).unwrap().len(), 3);

    let inspector = broker.inspector(&topology);
    assert_eq!(inspector.dead_letter_count().await.unwrap(), 3);
    assert_eq!(inspector.ready_count().await.unwrap(), 0);
    // Released again at once: visible, not waiting for the lease.
    assert_eq!(inspector.peek_dead_letters(10).await.unwrap().len(), 3);

    std::fs::remove_file(&path).unwrap();
    broker.delete(&topology).await.expect("delete");
}

#[tokio::test]
async fn a_failed_send_leaves_the_message_in_the_dlq() {
    let broker = connect().await;
    let topology = with_three_dead_letters(&broker).await;
    let target_url = broker.queue_url(&topology.queue).await.unwrap();
    let dlq_url = broker
        .queue_url(&topology.dead_letter_queue())
        .await
        .unwrap();
    // The main queue disappears: every send fails.
    broker
        .client()
        .delete_queue()
        .queue_url(&target_url)
        .send()
        .await
        .expect("delete main queue");
    let path = snapshot_path();
    let redrive = Redrive::by_url(&broker, dlq_url, target_url, options(&path)).expect("redrive");
    let snapshot = redrive.snapshot().await.expect("snapshot");
    let report = redrive.run(&snapshot).await.expect("run");
    assert_eq!(
        (
            report.snapshotted,
            report.moved,
            report.failed,
            report.duplicates_possible
        ),
        (3, 0, 3, 0),
        "{report:?}"
    );
    assert_eq!(report.errors.len(), 3);
    assert_eq!(
        broker
            .inspector(&topology)
            .dead_letter_count()
            .await
            .unwrap(),
        3
    );

    std::fs::remove_file(&path).unwrap();
    broker.delete(&topology).await.expect("delete");
}
