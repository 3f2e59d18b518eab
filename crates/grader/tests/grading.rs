//! The grader, graded: our hardened consumer passes every level on every
//! broker, and the starter consumers a reader copies fail the levels they
//! should (and only for the reason the level names).
//!
//! The consumers run as the reader's would: a shell command, settings from
//! the contract's environment variables, killed from outside.

use std::path::{Path, PathBuf};

use grader::{run_level, Level, LevelGrade, Settings};
use queue::backend::BackendKind;

/// Orders per level: enough for every fault to land, small enough for the
/// test suite.
const ORDERS: usize = 15;

/// A binary of this workspace, beside `deps/` (which holds this test).
/// `cargo test --workspace` (scripts/test) builds them all.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows where it is");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --bins, or scripts/test)",
        path.display()
    );
    path
}

fn settings(command: String, backend: BackendKind) -> Settings {
    Settings {
        command,
        backend,
        consumers: 3,
        orders: Some(ORDERS),
        seed: 7,
    }
}

async fn grade(settings: &Settings, levels: &[Level]) -> Vec<LevelGrade> {
    let mut grades = Vec::new();
    for &level in levels.iter().filter(|l| l.applies_to(settings.backend)) {
        grades.push(run_level(settings, level).await.expect("the level ran"));
    }
    grades
}

async fn hardened_passes_every_level(backend: BackendKind) {
    let command = binary("consumer").display().to_string();
    let grades = grade(&settings(command, backend), &Level::ALL).await;
    for grade in &grades {
        assert!(
            grade.passed(),
            "our consumer failed level {} on {}: {:?} (logs in {:?})",
            grade.level.name(),
            backend.name(),
            grade.failures(),
            grade.logs
        );
    }
    let kills: u64 = grades.iter().map(|g| g.kills).sum();
    assert!(kills > 0, "the kill levels killed consumers: {kills}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_hardened_consumer_passes_every_level_on_rabbitmq() {
    hardened_passes_every_level(BackendKind::Rabbitmq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_hardened_consumer_passes_every_level_on_sqs() {
    hardened_passes_every_level(BackendKind::Sqs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_hardened_consumer_passes_every_level_on_kafka() {
    hardened_passes_every_level(BackendKind::Kafka).await;
}

/// A naive consumer fails redelivery with double charges and nothing else,
/// and handles bad input (dead letters, no crash).
async fn starter_fails_redelivery_only_for_double_charges(command: String, backend: BackendKind) {
    let grades = grade(
        &settings(command.clone(), backend),
        &[Level::Redelivery, Level::Poison],
    )
    .await;
    let redelivery = &grades[0];
    assert!(!redelivery.passed(), "`{command}` must fail redelivery");
    assert!(
        redelivery.audit.double_charges > 0 && redelivery.audit.lost_events == 0,
        "it fails by charging twice, not by losing orders: {:?}",
        redelivery.failures()
    );
    let poison = &grades[1];
    assert!(
        poison.passed(),
        "`{command}` dead-letters bad input: {:?} (logs in {:?})",
        poison.failures(),
        poison.logs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_starter_fails_redelivery_on_every_broker() {
    let command = binary("starter-naive").display().to_string();
    for backend in [BackendKind::Rabbitmq, BackendKind::Sqs, BackendKind::Kafka] {
        starter_fails_redelivery_only_for_double_charges(command.clone(), backend).await;
    }
}

/// The Python starter runs on the interpreter in `EO_STARTER_PYTHON` (a
/// virtualenv with its requirements, which scripts/test prepares).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_starter_fails_redelivery_on_every_broker() {
    let python = std::env::var("EO_STARTER_PYTHON").expect(
        "EO_STARTER_PYTHON names a Python with the starter's requirements \
         (scripts/test sets it up; or: python3 -m venv .venv && .venv/bin/pip install -r \
         crates/grader/starters/python/requirements.txt)",
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("starters/python/naive_consumer.py");
    let command = format!("exec {python} {}", script.display());
    for backend in [BackendKind::Rabbitmq, BackendKind::Sqs, BackendKind::Kafka] {
        starter_fails_redelivery_only_for_double_charges(command.clone(), backend).await;
    }
}

#[test]
fn the_grader_exits_1_on_a_failing_grade() {
    let naive = format!("{} --variant naive", binary("consumer").display());
    let status = std::process::Command::new(binary("grader"))
        .args([
            "--consumer",
            &naive,
            "--level",
            "redelivery",
            "--messages",
            "5",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the grader runs");
    assert_eq!(status.code(), Some(1));
}
