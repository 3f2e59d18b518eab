//! Starts the transformer process, SIGKILLs it as the plan says, restarts
//! it, until it reports that all input is done or the deadline passes.
//!
//! The kill is `kill(pid, SIGKILL)`: the kernel ends the process before its
//! next instruction, so it never aborts its transaction, closes its
//! connections or commits anything. The harness then reads what the
//! process had printed up to its death (the lines are still in the pipe)
//! and records where the kill landed: between batches, inside an open
//! batch (and how many of its records the broker had acknowledged), or
//! while the commit was in flight.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

use super::transformer::{TransformerEvent, TRANSFORMER_ENV};
use crate::error::{KafkaTransactionsError, Result};

/// Failures in a row (exits that were not our SIGKILL) before giving up.
const MAX_FAILURES_IN_A_ROW: u32 = 3;
/// Lines of a failing transformer's stderr kept for the error message.
const STDERR_TAIL: usize = 20;

/// How to start a transformer process: an executable whose `main` (or one
/// of whose tests) calls [`super::run_transformer_if_requested`] first.
#[derive(Debug, Clone)]
pub struct TransformerCommand {
    program: PathBuf,
    args: Vec<OsString>,
}

impl TransformerCommand {
    /// This executable, re-executed without arguments: for a binary whose
    /// `main` calls `run_transformer_if_requested()` first thing.
    pub fn this_executable() -> Result<Self> {
        Ok(Self::new(current_exe()?, Vec::<OsString>::new()))
    }

    /// This test binary, running only the `#[ignore]`d test `test_name`,
    /// which calls `run_transformer_if_requested()` and exits with its code.
    pub fn this_test_binary(test_name: &str) -> Result<Self> {
        Ok(Self::new(
            current_exe()?,
            [
                test_name,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ],
        ))
    }

    pub fn new(
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }
}

fn current_exe() -> Result<PathBuf> {
    std::env::current_exe().map_err(|source| KafkaTransactionsError::Process {
        doing: "locating this executable",
        source,
    })
}

/// Where a SIGKILL landed, read from the process's own report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "landed", rename_all = "snake_case")]
pub enum KillLanding {
    /// No batch open: everything produced so far was committed.
    BetweenBatches,
    /// A batch was open and its commit not yet requested: with
    /// transactions, an open transaction the successor will abort.
    /// `acked` of its output records were already in the log.
    InsideOpenBatch { acked: u64 },
    /// The commit was requested and had not returned: whether it took
    /// effect is the broker's to say.
    DuringCommit { acked: u64 },
}

/// One SIGKILL of the transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Kill {
    /// The plan's trigger: acknowledgements this life got before the kill.
    pub after_acked: u64,
    #[serde(flatten)]
    pub landing: KillLanding,
}

/// What supervising one pipeline came to.
#[derive(Debug, Clone)]
pub(crate) struct Supervised {
    pub kills: Vec<Kill>,
    /// Processes started (1 + restarts).
    pub starts: u32,
    /// Exits that were not our SIGKILL (each was restarted).
    pub failures: u32,
    /// The transformer reported all input done before the deadline.
    pub finished: bool,
}

/// Runs transformer lives until one finishes, killing the first ones after
/// `after_acked[i]` acknowledgements, or until `deadline` has passed.
pub(crate) async fn supervise(
    command: &TransformerCommand,
    job_json: &str,
    after_acked: &[u64],
    deadline: Duration,
) -> Result<Supervised> {
    let until = Instant::now() + deadline;
    let mut planned = after_acked.iter().copied().peekable();
    let mut supervised = Supervised {
        kills: Vec::new(),
        starts: 0,
        failures: 0,
        finished: false,
    };
    let mut failures_in_a_row = 0;
    loop {
        supervised.starts += 1;
        let trigger = planned.peek().copied();
        match live_once(command, job_json, trigger, until).await? {
            End::Finished => {
                supervised.finished = true;
                return Ok(supervised);
            }
            End::Killed(landing) => {
                supervised.kills.push(Kill {
                    after_acked: trigger.expect("a kill has a trigger"),
                    landing,
                });
                planned.next();
                failures_in_a_row = 0;
            }
            End::DeadlineReached => return Ok(supervised),
            End::Failed { exit, stderr } => {
                supervised.failures += 1;
                failures_in_a_row += 1;
                if failures_in_a_row >= MAX_FAILURES_IN_A_ROW {
                    return Err(KafkaTransactionsError::TransformerFailing {
                        failures: failures_in_a_row,
                        exit,
                        stderr,
                    });
                }
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures_in_a_row))).await;
            }
        }
    }
}

enum End {
    Finished,
    Killed(KillLanding),
    DeadlineReached,
    Failed { exit: String, stderr: String },
}

/// What one life of the transformer has reported so far.
#[derive(Debug, Default)]
struct Life {
    acked: u64,
    open: Option<OpenBatch>,
    done: bool,
}

#[derive(Debug, Clone, Copy)]
struct OpenBatch {
    acked: u64,
    committing: bool,
}

impl Life {
    fn apply(&mut self, event: TransformerEvent) {
        match event {
            TransformerEvent::Begin => {
                self.open = Some(OpenBatch {
                    acked: 0,
                    committing: false,
                })
            }
            TransformerEvent::Acked { .. } => {
                self.acked += 1;
                if let Some(open) = &mut self.open {
                    open.acked += 1;
                }
            }
            TransformerEvent::Committing => {
                if let Some(open) = &mut self.open {
                    open.committing = true;
                }
            }
            TransformerEvent::Committed { .. } => self.open = None,
            TransformerEvent::Done => self.done = true,
        }
    }

    fn landing(&self) -> KillLanding {
        match self.open {
            None => KillLanding::BetweenBatches,
            Some(OpenBatch {
                acked,
                committing: true,
            }) => KillLanding::DuringCommit { acked },
            Some(OpenBatch { acked, .. }) => KillLanding::InsideOpenBatch { acked },
        }
    }
}

async fn live_once(
    command: &TransformerCommand,
    job_json: &str,
    kill_after_acked: Option<u64>,
    until: Instant,
) -> Result<End> {
    let process_error = |doing| move |source| KafkaTransactionsError::Process { doing, source };
    let mut child = Command::new(&command.program)
        .args(&command.args)
        .env(TRANSFORMER_ENV, job_json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(process_error("starting it"))?;
    let pid = Pid::from_raw(child.id().expect("a running child has a pid") as i32);
    let stderr = child.stderr.take().expect("stderr is piped");
    let stderr_tail = tokio::spawn(async move {
        let mut tail = VecDeque::new();
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        Vec::from(tail).join("\n")
    });
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let mut life = Life::default();

    let mut killed = false;
    let mut deadline_reached = false;
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line.map_err(process_error("reading its stdout"))? else {
                    break;
                };
                if let Some(event) = TransformerEvent::parse(&line) {
                    life.apply(event);
                }
                if kill_after_acked.is_some_and(|n| life.acked >= n) && !life.done {
                    kill(pid, Signal::SIGKILL)
                        .map_err(|errno| process_error("sending SIGKILL")(errno.into()))?;
                    killed = true;
                    break;
                }
            }
            _ = tokio::time::sleep_until(until) => {
                kill(pid, Signal::SIGKILL)
                    .map_err(|errno| process_error("sending SIGKILL")(errno.into()))?;
                deadline_reached = true;
                break;
            }
        }
    }
    // Whatever the process printed before it died is still in the pipe:
    // read it to the end, so the landing is what really happened.
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(process_error("reading its stdout"))?
    {
        if let Some(event) = TransformerEvent::parse(&line) {
            life.apply(event);
        }
    }
    let status = child
        .wait()
        .await
        .map_err(process_error("waiting for it"))?;
    let stderr = stderr_tail.await.unwrap_or_default();
    let by_our_sigkill = status.signal() == Some(Signal::SIGKILL as i32);
    Ok(match () {
        _ if status.success() && life.done => End::Finished,
        _ if killed && by_our_sigkill => End::Killed(life.landing()),
        _ if deadline_reached => End::DeadlineReached,
        _ => End::Failed {
            exit: status.to_string(),
            stderr,
        },
    })
}
