//! What every long-running process of the book shares: logs an operator can
//! read, a bounded backoff for riding out a broker or database blip, a
//! `connected` gauge on `/metrics` that says whether the process is working
//! or waiting, and the signals that stop it.

use std::future::Future;
use std::io::IsTerminal;
use std::time::Duration;

/// Logs to stderr, filtered by `RUST_LOG` (or `default_level`), with
/// colour only when stderr is a terminal: a log file or a journal gets
/// plain text, not escape codes.
pub fn init_logging(default_level: &str) {
    // Postgres's "already exists, skipping" notices, which every start's
    // migration check provokes, are not news. lapin logs each connection
    // loss (and each clean close) as an error from its I/O thread; the
    // process's own line about it, with lapin's words in it, is the one to
    // read.
    let default_filter = format!("{default_level},sqlx::postgres::notice=warn,lapin=off");
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .try_init();
}

/// Exponential backoff with a ceiling: the first retry comes quickly (most
/// blips are short), later ones no further apart than `ceiling`, so a
/// process notices a recovered service within that long.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    ceiling: Duration,
    next: Duration,
}

impl Default for Backoff {
    /// 200 ms, doubling up to 5 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(5))
    }
}

impl Backoff {
    pub fn new(first: Duration, ceiling: Duration) -> Self {
        Self {
            first,
            ceiling,
            next: first,
        }
    }

    /// The pause before the next attempt; each call doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.ceiling);
        delay
    }

    /// After a success: the next failure starts from the first delay again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Sleeps for `delay` unless `stop` resolves first; true if it did.
pub async fn sleep_or_stop<F: Future<Output = ()> + Unpin>(delay: Duration, stop: &mut F) -> bool {
    tokio::select! {
        _ = stop => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

/// The gauge `connected{to="<dependency>"}`: 1 while the process holds a
/// working connection to it, 0 while it waits to reconnect.
pub const CONNECTED: &str = "connected";

pub fn set_connected(dependency: &'static str, connected: bool) {
    metrics::gauge!(CONNECTED, "to" => dependency).set(if connected { 1.0 } else { 0.0 });
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT): the ways an operator or a
/// service manager asks a process to stop.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            // Without a handler SIGTERM still ends the process, only not
            // gracefully; Ctrl-C below keeps working.
            Err(error) => {
                tracing::warn!(%error, "cannot install the SIGTERM handler");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_ceiling_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }
}
