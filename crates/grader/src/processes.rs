//! The reader's consumer processes: started from a shell command, killed
//! from outside, restarted.
//!
//! Each process runs in a process group of its own, so that a SIGKILL
//! reaches the whole of it: `python3 consumer.py` started through `sh -c`
//! dies with its shell, and nothing the reader's code does can choose the
//! moment.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tokio::process::{Child, Command};

/// A killed process is started again after this pause.
const RESTART_AFTER_KILL: Duration = Duration::from_millis(200);
/// A process that exited on its own waits this long before it is started
/// again: a crash loop is slowed down and counted, never hidden.
const RESTART_AFTER_EXIT: Duration = Duration::from_secs(1);

struct Slot {
    child: Option<Child>,
    /// When to start the slot's process again, once it is down.
    restart_at: Option<Instant>,
}

pub struct ReaderConsumers {
    command: String,
    env: Vec<(String, String)>,
    log_dir: PathBuf,
    slots: Vec<Slot>,
    /// SIGKILLs sent by the grader.
    pub kills: u64,
    /// Exits the grader did not cause: crashes, or a consumer giving up.
    pub exits: u64,
    /// How each of those ended, for the report.
    pub exit_statuses: Vec<String>,
}

impl ReaderConsumers {
    /// Starts `count` processes of `command` (run by `sh -c`) with `env`;
    /// each writes its stdout and stderr to `consumer-N.log` in `log_dir`.
    pub fn start(
        command: &str,
        env: Vec<(String, String)>,
        count: usize,
        log_dir: &Path,
    ) -> std::io::Result<Self> {
        let mut consumers = Self {
            command: command.to_owned(),
            env,
            log_dir: log_dir.to_owned(),
            slots: Vec::new(),
            kills: 0,
            exits: 0,
            exit_statuses: Vec::new(),
        };
        for slot in 0..count {
            let child = consumers.spawn(slot)?;
            consumers.slots.push(Slot {
                child: Some(child),
                restart_at: None,
            });
        }
        Ok(consumers)
    }

    fn spawn(&self, slot: usize) -> std::io::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("consumer-{slot}.log")))?;
        Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("EO_CONSUMER_SLOT", slot.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
    }

    /// SIGKILLs the process group of a random running consumer.
    pub async fn kill_one(&mut self, rng: &mut ChaCha8Rng) {
        let running: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].child.is_some())
            .collect();
        if running.is_empty() {
            return;
        }
        let slot = running[rng.gen_range(0..running.len())];
        if let Some(mut child) = self.slots[slot].child.take() {
            if let Some(pid) = child.id() {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = child.wait().await;
            self.kills += 1;
            self.slots[slot].restart_at = Some(Instant::now() + RESTART_AFTER_KILL);
        }
    }

    /// Notices processes that exited on their own, and starts every process
    /// whose restart is due.
    pub fn tend(&mut self) -> std::io::Result<()> {
        for slot in 0..self.slots.len() {
            if let Some(child) = &mut self.slots[slot].child {
                if let Ok(Some(status)) = child.try_wait() {
                    self.exits += 1;
                    self.exit_statuses
                        .push(format!("consumer-{slot}: {status}"));
                    self.slots[slot].child = None;
                    self.slots[slot].restart_at = Some(Instant::now() + RESTART_AFTER_EXIT);
                }
            }
            let due = self.slots[slot]
                .restart_at
                .is_some_and(|at| Instant::now() >= at);
            if self.slots[slot].child.is_none() && due {
                self.slots[slot].child = Some(self.spawn(slot)?);
                self.slots[slot].restart_at = None;
            }
        }
        Ok(())
    }

    /// SIGTERM to every process group, then SIGKILL to any still running
    /// after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        for slot in &self.slots {
            if let Some(pid) = slot.child.as_ref().and_then(Child::id) {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        for slot in &mut self.slots {
            if let Some(child) = &mut slot.child {
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    if let Some(pid) = child.id() {
                        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    }
                    let _ = child.wait().await;
                }
            }
        }
    }
}
