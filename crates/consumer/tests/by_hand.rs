//! The runbook's "Start the pipeline by hand", run line by line on each
//! broker: the commands are read from `runbook/consumer.md`, so the page
//! and the test cannot drift apart.
//!
//! `cargo run -p NAME` becomes the binary cargo built for this test run
//! (running cargo from inside a test would wait on cargo's own lock). Each
//! run gets its own databases, queue and ports through the environment
//! variables the runbook documents, so that the defaults the page relies
//! on point at this test's resources.

use std::process::Stdio;
use std::time::{Duration, Instant};

use databases::FreshDatabase;
use queue::backend::{BackendKind, Broker, QueueSpec};
use support::{binary, free_addr};
use tokio::process::{Child, Command};

mod support;

const RUNBOOK: &str = include_str!("../../../runbook/consumer.md");
const SECTION: &str = "## Start the pipeline by hand";
/// The processes that run until stopped; every other line runs to its end.
const SERVICES: [&str; 3] = ["psp", "consumer", "relay"];

/// One line of the runbook's block, with the output the page promises.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Option<String>,
}

/// The commands of the section's first `sh` block. A `# => ` line is the
/// output the command above it promises; other comments are prose.
fn runbook_steps() -> Vec<Step> {
    let section = &RUNBOOK[RUNBOOK.find(SECTION).expect("the runbook has the section")..];
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the section has an sh block");
    let mut steps: Vec<Step> = Vec::new();
    for line in block.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(promised) = line.strip_prefix("# => ") {
            steps.last_mut().expect("a command came first").expected = Some(promised.to_owned());
        } else if !line.starts_with('#') {
            steps.push(Step {
                command: line.to_owned(),
                expected: None,
            });
        }
    }
    steps
}

/// `cargo run -p NAME [-- ARGS]` as the built binary and its arguments.
fn as_binary(command: &str) -> Option<(String, Vec<String>)> {
    let rest = command.strip_prefix("cargo run -p ")?;
    let (package, args) = match rest.split_once(" -- ") {
        Some((package, args)) => (
            package,
            args.split_whitespace().map(str::to_owned).collect(),
        ),
        None => (rest, Vec::new()),
    };
    // The shop's one binary is its producer.
    let binary = if package == "shop" {
        "producer"
    } else {
        package
    };
    Some((binary.to_owned(), args))
}

struct Pipeline {
    shop: FreshDatabase,
    psp: FreshDatabase,
    queue: QueueSpec,
    env: Vec<(String, String)>,
    work_dir: tempdir::Dir,
}

mod tempdir {
    /// A folder for the processes' logs, removed when dropped.
    pub struct Dir(pub std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Pipeline {
    async fn new(backend: BackendKind) -> Self {
        let shop = FreshDatabase::create("by_hand_shop", 2).await.unwrap();
        let psp = FreshDatabase::create("by_hand_psp", 2).await.unwrap();
        let suffix = shop.name.trim_start_matches("by_hand_shop_").to_owned();
        let queue = QueueSpec::new(backend, format!("eo.by-hand.{suffix}"));
        let psp_addr = free_addr();
        let env = [
            ("EO_BACKEND", backend.name().to_owned()),
            ("EO_QUEUE", queue.name.clone()),
            ("EO_SHOP_DATABASE_URL", shop.url.clone()),
            ("PSP_DATABASE_URL", psp.url.clone()),
            ("PSP_LISTEN", psp_addr.clone()),
            ("EO_PSP_URL", format!("http://{psp_addr}")),
            ("EO_CONSUMER_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("EO_RELAY_METRICS_ADDR", "127.0.0.1:0".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let work_dir = std::env::temp_dir().join(format!("eo-by-hand-{suffix}"));
        std::fs::create_dir_all(&work_dir).unwrap();
        Self {
            shop,
            psp,
            queue,
            env,
            work_dir: tempdir::Dir(work_dir),
        }
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command.kill_on_drop(true);
        command
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::File::create(self.work_dir.0.join(format!("{name}.log"))).unwrap()
    }

    fn read_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.work_dir.0.join(format!("{name}.log"))).unwrap_or_default()
    }

    async fn drop_all(self) {
        if let Ok(broker) = Broker::connect(self.queue.backend).await {
            let _ = broker.delete(&self.queue).await;
        }
        let _ = self.shop.drop_database().await;
        let _ = self.psp.drop_database().await;
    }
}

/// Runs the runbook's block; returns the services still running.
async fn follow_runbook(pipeline: &Pipeline) -> Vec<(String, Child)> {
    let mut services = Vec::new();
    for step in runbook_steps() {
        match as_binary(&step.command) {
            Some((name, args)) if SERVICES.contains(&name.as_str()) => {
                let child = pipeline
                    .command(binary(&name))
                    .args(&args)
                    .stdin(Stdio::null())
                    .stdout(pipeline.log(&name))
                    .stderr(pipeline.log(&format!("{name}.err")))
                    .spawn()
                    .unwrap_or_else(|e| panic!("starting {name}: {e}"));
                services.push((name, child));
            }
            Some((name, args)) => {
                let output = pipeline
                    .command(binary(&name))
                    .args(&args)
                    .output()
                    .await
                    .unwrap();
                assert!(
                    output.status.success(),
                    "`{}` failed: {}",
                    step.command,
                    String::from_utf8_lossy(&output.stderr)
                );
                expect_output(&step, &String::from_utf8_lossy(&output.stdout));
            }
            // A plain shell line (psql): run it until it prints what the
            // page promises, since the consumer charges asynchronously.
            None => {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let output = pipeline
                        .command("bash")
                        .args(["-c", &step.command])
                        .output()
                        .await
                        .unwrap();
                    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
                    let matches = step.expected.as_deref().is_none_or(|want| stdout == want);
                    if output.status.success() && matches {
                        break;
                    }
                    if Instant::now() > deadline {
                        panic!(
                            "`{}` printed {stdout:?} (stderr {:?}), the runbook promises {:?}\n\
                             consumer log:\n{}",
                            step.command,
                            String::from_utf8_lossy(&output.stderr),
                            step.expected,
                            pipeline.read_log("consumer.err"),
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    services
}

fn expect_output(step: &Step, stdout: &str) {
    if let Some(want) = &step.expected {
        assert_eq!(
            stdout.trim(),
            want,
            "`{}` printed something else",
            step.command
        );
    }
}

/// SIGTERM, then the exit status: a graceful stop exits 0.
async fn stop(name: &str, mut child: Child, pipeline: &Pipeline) {
    let pid = child.id().expect("still running") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{name} did not stop within 20 s of SIGTERM"))
        .unwrap();
    assert!(
        status.success(),
        "{name} exited with {status} on SIGTERM; its log:\n{}",
        pipeline.read_log(&format!("{name}.err"))
    );
}

async fn run_by_hand(backend: BackendKind) {
    let steps = runbook_steps();
    assert!(
        steps.iter().any(|s| s.expected.is_some()),
        "the runbook's block promises an output to check: {steps:?}"
    );
    let pipeline = Pipeline::new(backend).await;
    let services = follow_runbook(&pipeline).await;
    assert_eq!(services.len(), SERVICES.len(), "every service was started");

    // The ledger agrees with the shop: every order charged exactly once.
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&pipeline.shop.pool)
        .await
        .unwrap();
    let (charges, charged_orders): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT order_id) FROM charges")
            .fetch_one(&pipeline.psp.pool)
            .await
            .unwrap();
    assert_eq!((charges, charged_orders), (orders, orders));

    let consumer_log = pipeline.read_log("consumer.err");
    assert!(
        !consumer_log.contains('\u{1b}'),
        "no colour codes in a log that is not a terminal"
    );
    for (name, child) in services.into_iter().rev() {
        stop(&name, child, &pipeline).await;
    }
    assert!(
        pipeline.read_log("consumer.err").contains("stopped:"),
        "the consumer says it stopped"
    );
    pipeline.drop_all().await;
}

#[tokio::test]
async fn the_runbook_starts_a_pipeline_by_hand_on_rabbitmq() {
    run_by_hand(BackendKind::Rabbitmq).await;
}

#[tokio::test]
async fn the_runbook_starts_a_pipeline_by_hand_on_sqs() {
    run_by_hand(BackendKind::Sqs).await;
}

#[test]
fn the_runbook_block_is_read_as_commands_and_promised_output() {
    let steps = runbook_steps();
    let binaries: Vec<String> = steps
        .iter()
        .filter_map(|s| as_binary(&s.command).map(|(binary, _)| binary))
        .collect();
    assert_eq!(binaries, ["psp", "consumer", "relay", "producer"]);
    assert_eq!(
        steps.last().and_then(|s| s.expected.as_deref()),
        Some("20 charges for 20 orders")
    );
}
