//! The machine's own limit: how many messages a second Postgres can take
//! through the transactions a hardened consumer and the PSP run for them,
//! with nothing else in the way (no broker, no HTTP, no Rust), measured by
//! `pgbench` on the same server.
//!
//! One pgbench client stands for one consumer process handling a batch of
//! `n` messages:
//!
//! - the PSP's work for each charge, as `psp::idempotency` does it: the
//!   key's claim (autocommit), then one transaction that inserts the ledger
//!   row and completes the key with its response;
//! - the consumer's one transaction for the batch: the dedup rows claimed in
//!   one `INSERT ... ON CONFLICT DO NOTHING RETURNING` over `unnest`, and the
//!   payments recorded in one `INSERT ... unnest`, as `consumer::dedup::
//!   claim_batch` and the batch's record step do.
//!
//! The tables are the real ones: a fresh database gets both crates'
//! migrations. In the real pipeline the charges of a batch go out
//! concurrently and the consumer's transaction stays open around them;
//! here each client runs them one after the other, so the figure is what the
//! same statements cost, not a promise that a consumer could reach it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use databases::FreshDatabase;
use tokio::process::Command;

/// The PSP's answer, stored with the key as `psp::idempotency` stores it:
/// about the size of a real charge's JSON.
const RESPONSE_BODY: &str = r#"{"id":"ch_0123456789abcdef0123456789abcdef","order_id":"00000000-0000-0000-0000-000000000000","amount_cents":1999,"currency":"EUR","status":"succeeded","created_at":"2026-12-02T20:00:00.000000Z"}"#;

/// What pgbench measured for batches of one size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PgbenchRate {
    pub batch_size: usize,
    pub clients: usize,
    /// Batches a second, all clients together.
    pub transactions_per_second: f64,
}

impl PgbenchRate {
    pub fn messages_per_second(&self) -> f64 {
        self.transactions_per_second * self.batch_size as f64
    }
}

/// Runs pgbench for `duration` with `clients` clients, each doing batches
/// of `batch_size` messages, in a database of its own.
pub async fn measure(
    batch_size: usize,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<PgbenchRate> {
    let program = program()?;
    let database = FreshDatabase::create("eo_pgbench", 2)
        .await
        .context("creating the pgbench database")?;
    let measured = async {
        psp::migrate(&database.pool)
            .await
            .context("creating the PSP's tables")?;
        consumer::migrate(&database.pool)
            .await
            .context("creating the consumer's tables")?;
        let script = std::env::temp_dir().join(format!("{}-batch-{batch_size}.sql", database.name));
        std::fs::write(&script, script_for(batch_size))
            .with_context(|| format!("writing {}", script.display()))?;
        let output = run(&program, &script, &database.url, clients, duration).await;
        let _ = std::fs::remove_file(&script);
        let stdout = output?;
        let transactions_per_second = parse_tps(&stdout)
            .with_context(|| format!("pgbench printed no tps line:\n{stdout}"))?;
        Ok(PgbenchRate {
            batch_size,
            clients,
            transactions_per_second,
        })
    }
    .await;
    database
        .drop_database()
        .await
        .context("dropping the pgbench database")?;
    measured
}

/// `EO_PGBENCH` if set, else `pgbench` on the PATH (Debian's
/// `postgresql-client-common` puts it there with the server).
fn program() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("EO_PGBENCH") {
        return Ok(PathBuf::from(path));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("pgbench"))
            .find(|candidate| candidate.is_file())
    });
    found.context(
        "pgbench is not on the PATH: install Postgres's server package (scripts/services-up \
         does), or set EO_PGBENCH to its path",
    )
}

async fn run(
    program: &Path,
    script: &Path,
    url: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<String> {
    // The password goes through the environment, not the command line that
    // `ps` shows.
    let mut target = url::Url::parse(url).context("the database URL does not parse")?;
    let password = target.password().map(str::to_owned);
    let _ = target.set_password(None);
    let mut command = Command::new(program);
    command
        .arg("--no-vacuum")
        .arg("--protocol=prepared")
        .arg(format!("--client={clients}"))
        .arg(format!("--jobs={clients}"))
        .arg(format!("--time={}", duration.as_secs().max(1)))
        .arg(format!("--file={}", script.display()))
        .arg(target.as_str())
        .kill_on_drop(true);
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let output = command
        .output()
        .await
        .with_context(|| format!("starting {}", program.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "pgbench failed ({}):\n{}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}

/// The script of one client's batch: the PSP's two steps per charge, then
/// the consumer's transaction. Orders, events and claim tokens are fresh
/// uuids, so every batch inserts new rows as a real one does.
fn script_for(batch_size: usize) -> String {
    let n = batch_size.max(1);
    let mut script = String::new();
    for i in 1..=n {
        // The claim: autocommit, visible to every retry at once.
        writeln!(
            script,
            "INSERT INTO idempotency_keys (api_key, key, fingerprint, state, created_at, \
             locked_at, claim_token) VALUES ('bench', gen_random_uuid()::text, \
             'fingerprint', 'in_flight', now(), now(), gen_random_uuid()) \
             ON CONFLICT (api_key, key) DO NOTHING \
             RETURNING key AS order_{i}, claim_token AS token_{i}, gen_random_uuid() AS event_{i}"
        )
        .unwrap();
        script.push_str("\\gset\n");
        // The charge and the stored response, in one transaction.
        script.push_str("BEGIN;\n");
        writeln!(
            script,
            "INSERT INTO charges (id, order_id, amount_cents, currency, idempotency_key) \
             VALUES ('ch_' || replace(:order_{i}, '-', ''), :order_{i}, 1999, 'EUR', :order_{i}) \
             RETURNING created_at;"
        )
        .unwrap();
        writeln!(
            script,
            "UPDATE idempotency_keys SET state = 'completed', response_status = 200, \
             response_body = '{RESPONSE_BODY}', locked_at = NULL \
             WHERE api_key = 'bench' AND key = :order_{i} AND claim_token = :token_{i} \
             AND state = 'in_flight';"
        )
        .unwrap();
        script.push_str("COMMIT;\n");
    }
    let list = |prefix: &str| {
        (1..=n)
            .map(|i| format!(":{prefix}_{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (events, orders) = (list("event"), list("order"));
    script.push_str("BEGIN;\n");
    writeln!(
        script,
        "INSERT INTO processed_messages (event_id, order_id, fingerprint, charged_order) \
         SELECT event_id, order_id, sha256(order_id::text::bytea), order_id \
         FROM unnest(ARRAY[{events}]::uuid[], ARRAY[{orders}]::uuid[]) AS claim(event_id, order_id) \
         ORDER BY order_id, event_id ON CONFLICT DO NOTHING RETURNING event_id;"
    )
    .unwrap();
    writeln!(
        script,
        "INSERT INTO payments (order_id, event_id, psp_charge_id, amount_cents, currency) \
         SELECT order_id, event_id, 'ch_' || replace(order_id::text, '-', ''), 1999, 'EUR' \
         FROM unnest(ARRAY[{events}]::uuid[], ARRAY[{orders}]::uuid[]) AS paid(event_id, order_id);"
    )
    .unwrap();
    script.push_str("COMMIT;\n");
    script
}

/// `tps = 1234.5 (without initial connection time)`: the rate pgbench
/// reports for the measured time.
fn parse_tps(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .filter_map(|line| line.trim().strip_prefix("tps = "))
        .find_map(|rest| rest.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::{parse_tps, script_for};

    #[test]
    fn the_rate_is_read_from_pgbench_s_own_summary() {
        let stdout = "number of failed transactions: 0 (0.000%)\n\
                      latency average = 1.234 ms\n\
                      initial connection time = 3.210 ms\n\
                      tps = 1620.512345 (without initial connection time)\n";
        assert_eq!(parse_tps(stdout), Some(1620.512345));
        assert_eq!(parse_tps("pgbench: error: connection refused\n"), None);
    }

    #[test]
    fn a_batch_script_holds_each_charge_and_one_consumer_transaction() {
        let script = script_for(3);
        assert_eq!(script.matches("INSERT INTO idempotency_keys").count(), 3);
        assert_eq!(script.matches("INSERT INTO charges").count(), 3);
        assert_eq!(script.matches("INSERT INTO processed_messages").count(), 1);
        assert_eq!(script.matches("INSERT INTO payments").count(), 1);
        assert_eq!(script.matches("COMMIT;").count(), 4);
        assert!(script.contains("ARRAY[:event_1, :event_2, :event_3]::uuid[]"));
    }
}
