//! Runs producer and consumer processes, restarts them when they die, and
//! turns what they print into [`LabEvent`]s.
//!
//! A process killed by SIGKILL is restarted at once, like a container under
//! an orchestrator. A process that fails on its own (a bad URL, a schema
//! error) is restarted with a back-off, and after a few failures in a row the
//! supervisor gives up and says why, rather than crash-looping forever.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use consumer::observe::Observation;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::roles::{Role, CONFIG_ENV, ROLE_ENV};

/// Consecutive failures (exits that were not our SIGKILL) before giving up.
const MAX_FAILURES_IN_A_ROW: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub role: Role,
    pub slot: usize,
}

impl ProcessId {
    /// The `application_name` its Postgres connections carry (sqlx takes it
    /// from `PGAPPNAME`), so that `pg_stat_activity` tells whose they are.
    pub fn application_name(self) -> String {
        format!("{}-{}", self.role.name(), self.slot)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Killed { signal: i32 },
    Code(i32),
}

/// One line a child process printed: a consumer's or a relay's report.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum Report {
    Consumer(Observation),
    Relay(relay::RelayObservation),
}

#[derive(Debug, Clone)]
pub enum LabEvent {
    /// A process is running, with this pid (the soak samples and kills it).
    Started {
        process: ProcessId,
        pid: u32,
    },
    Observed {
        process: ProcessId,
        observation: Report,
    },
    Exited {
        process: ProcessId,
        exit: ExitKind,
        /// True when the lab itself was stopping the process.
        stopping: bool,
    },
    GaveUp {
        process: ProcessId,
        reason: String,
    },
}

pub struct Supervisor {
    executable: PathBuf,
    config_path: PathBuf,
    log_dir: PathBuf,
    events: mpsc::UnboundedSender<LabEvent>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Supervisor {
    pub fn new(
        executable: PathBuf,
        config_path: PathBuf,
        log_dir: PathBuf,
        events: mpsc::UnboundedSender<LabEvent>,
    ) -> Self {
        Self {
            executable,
            config_path,
            log_dir,
            events,
            stop: watch::channel(false).0,
            tasks: Vec::new(),
        }
    }

    /// Starts one supervised process in `role`.
    pub fn start(&mut self, role: Role, slot: usize) {
        let process = ProcessId { role, slot };
        let keeper = Keeper {
            process,
            executable: self.executable.clone(),
            config_path: self.config_path.clone(),
            log_path: self.log_dir.join(format!("{}-{slot}.log", role.name())),
            events: self.events.clone(),
            stop: self.stop.subscribe(),
        };
        self.tasks.push(tokio::spawn(keeper.keep_running()));
    }

    /// Asks every process to finish (SIGTERM, then SIGKILL after a grace
    /// period) and waits until all are gone.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

struct Keeper {
    process: ProcessId,
    executable: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    events: mpsc::UnboundedSender<LabEvent>,
    stop: watch::Receiver<bool>,
}

impl Keeper {
    async fn keep_running(mut self) {
        let mut failures_in_a_row = 0;
        loop {
            if *self.stop.borrow() {
                return;
            }
            let (exit, stopping) = match self.run_once().await {
                Ok(result) => result,
                Err(error) => {
                    self.give_up(format!("cannot start the process: {error}"));
                    return;
                }
            };
            let _ = self.events.send(LabEvent::Exited {
                process: self.process,
                exit,
                stopping,
            });
            match exit {
                _ if stopping => return,
                // The producer's work is finite: a clean exit means done.
                ExitKind::Code(0) if self.process.role == Role::Producer => return,
                ExitKind::Killed { signal } if signal == Signal::SIGKILL as i32 => {
                    failures_in_a_row = 0;
                }
                other => {
                    failures_in_a_row += 1;
                    if failures_in_a_row >= MAX_FAILURES_IN_A_ROW {
                        self.give_up(format!(
                            "exited with {other:?} {failures_in_a_row} times in a row; see {}",
                            self.log_path.display()
                        ));
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(failures_in_a_row)))
                        .await;
                }
            }
        }
    }

    fn give_up(&self, reason: String) {
        let _ = self.events.send(LabEvent::GaveUp {
            process: self.process,
            reason,
        });
    }

    /// Runs the process once; returns how it ended and whether we stopped it.
    async fn run_once(&mut self) -> std::io::Result<(ExitKind, bool)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut child = Command::new(&self.executable)
            .env(ROLE_ENV, self.process.role.name())
            .env(CONFIG_ENV, &self.config_path)
            .env("PGAPPNAME", self.process.application_name())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        if let Some(pid) = child.id() {
            let _ = self.events.send(LabEvent::Started {
                process: self.process,
                pid,
            });
        }
        let stdout = child.stdout.take().expect("stdout is piped");
        let events = self.events.clone();
        let process = self.process;
        // Lines written just before a SIGKILL are still in the pipe; the
        // reader drains them to EOF before the exit is reported.
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(observation) = serde_json::from_str::<Report>(&line) {
                    let _ = events.send(LabEvent::Observed {
                        process,
                        observation,
                    });
                }
            }
        });

        let mut stopping = false;
        let status = tokio::select! {
            status = child.wait() => status?,
            _ = wait_for_stop(&mut self.stop) => {
                stopping = true;
                if let Some(pid) = child.id() {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                }
                match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                    Ok(status) => status?,
                    Err(_) => {
                        child.start_kill()?;
                        child.wait().await?
                    }
                }
            }
        };
        let _ = reader.await;
        let exit = match (status.signal(), status.code()) {
            (Some(signal), _) => ExitKind::Killed { signal },
            (None, Some(code)) => ExitKind::Code(code),
            (None, None) => ExitKind::Code(-1),
        };
        Ok((exit, stopping))
    }
}

async fn wait_for_stop(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it inside this function.
    let _ = stop.wait_for(|stop| *stop).await.map(|_| ());
}
