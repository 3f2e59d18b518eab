//! Where the book's Postgres lives.
//!
//! # Layout
//!
//! - [`admin_url`]: the server-level connection string, from `EO_PG_ADMIN_URL`
//!   with a loopback default that matches `scripts/services-up`.
//! - [`FreshDatabase`]: a database created for one run or one test and named
//!   after it, so that no two runs or tests ever share rows.
//! - [`cleanup`]: the cutoff and the report that both batched cleanups share.
//!
//! Every chapter run creates its own shop database and its own PSP database:
//! the PSP is another company's system and never shares a database with the
//! shop.

pub mod cleanup;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// The default matches the role that `scripts/services-up` creates.
pub const DEFAULT_ADMIN_URL: &str = "postgres://eo:eo@127.0.0.1:5432/postgres";

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// The cause is the error's `source`, not part of its text: `anyhow`
    /// prints the chain, and a cause in both places is printed twice.
    #[error("cannot reach Postgres at {url} (is it up? run scripts/services-up)")]
    Unreachable { url: String, source: sqlx::Error },
    /// The server answered and refused the login (SQLSTATE 28P01 or 28000):
    /// Postgres is up, and starting it again would not help.
    #[error("Postgres at {url} refused the login for user {user} (wrong password?)")]
    AuthenticationFailed { url: String, user: String },
    #[error("`{0}` is not a safe database name: use lowercase letters, digits and _")]
    UnsafeName(String),
    #[error("database statement failed: {0}")]
    Sql(#[from] sqlx::Error),
    /// The cause is the source: `anyhow` prints the chain.
    #[error("migrating the tables")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The server-level connection string: `EO_PG_ADMIN_URL`, or the local default.
pub fn admin_url() -> String {
    std::env::var("EO_PG_ADMIN_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// The connection string for database `name` on the admin URL's server:
/// the admin URL with its path swapped, so that it stays a plain libpq URL
/// that `psql` accepts too.
pub fn url_for(name: &str) -> Result<String, DatabaseError> {
    check_name(name)?;
    let admin = admin_url();
    if let Ok(mut url) = url::Url::parse(&admin) {
        url.set_path(&format!("/{name}"));
        return Ok(url.to_string());
    }
    let options: PgConnectOptions = admin.parse().map_err(|source| DatabaseError::Unreachable {
        url: redact(&admin),
        source,
    })?;
    Ok(options.database(name).to_url_lossy().to_string())
}

/// A database that exists for one run or one test.
#[derive(Debug, Clone)]
pub struct FreshDatabase {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl FreshDatabase {
    /// Creates `<prefix>_<random>` and connects a pool of `max_connections`.
    pub async fn create(prefix: &str, max_connections: u32) -> Result<Self, DatabaseError> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("{prefix}_{}", &suffix[..12]);
        create_database(&name).await?;
        let url = url_for(&name)?;
        let pool = connect(&url, max_connections).await?;
        Ok(Self { name, url, pool })
    }

    /// Closes the pool and drops the database, ending any session still in it.
    pub async fn drop_database(self) -> Result<(), DatabaseError> {
        self.pool.close().await;
        drop_database(&self.name).await
    }
}

/// A pool on `url`, failing with a message that says how to start Postgres.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DatabaseError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(15))
        .connect(url)
        .await
        .map_err(|source| connect_error(url, source))
}

/// A pool on `url` that connects on first use: for a service that must
/// serve its `/metrics` while it waits for Postgres. Fails only on a URL it
/// cannot parse.
pub fn connect_lazy(url: &str, max_connections: u32) -> Result<PgPool, DatabaseError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(url)
        .map_err(|source| DatabaseError::Unreachable {
            url: redact(url),
            source,
        })
}

/// Connects a pool of `max_connections` to `location` and runs `migrate` on
/// it, waiting out a Postgres that is down (or goes down in between) with
/// `backoff` and a log line per attempt. `Ok(None)` when `stop` resolves
/// first. A refused login, or a migration a reachable server refuses, is
/// returned: waiting would not fix either.
pub async fn wait_for<M, Fut, S>(
    location: &Location,
    max_connections: u32,
    migrate: M,
    backoff: &mut telemetry::service::Backoff,
    stop: &mut S,
) -> Result<Option<PgPool>, DatabaseError>
where
    M: Fn(PgPool) -> Fut,
    Fut: std::future::Future<Output = Result<(), sqlx::migrate::MigrateError>>,
    S: std::future::Future<Output = ()> + Unpin,
{
    loop {
        let attempt = async {
            let url = location.resolve().await?;
            // One plain connection first: it fails at once on a server that
            // is down, where a pool would keep retrying quietly until its
            // acquire timeout, and the log would say nothing meanwhile.
            PgConnection::connect(&url)
                .await
                .map_err(|source| connect_error(&url, source))?
                .close()
                .await?;
            let pool = connect(&url, max_connections).await?;
            migrate(pool.clone()).await?;
            Ok::<_, DatabaseError>(pool)
        };
        let error = match attempt.await {
            Ok(pool) => {
                backoff.reset();
                return Ok(Some(pool));
            }
            Err(DatabaseError::Migrate(sqlx::migrate::MigrateError::Execute(error)))
                if is_connection_error(&error) =>
            {
                error.to_string()
            }
            Err(error @ DatabaseError::Unreachable { .. }) => {
                let cause = std::error::Error::source(&error)
                    .map(|cause| format!(": {cause}"))
                    .unwrap_or_default();
                format!("{error}{cause}")
            }
            Err(error) => return Err(error),
        };
        let delay = backoff.next_delay();
        tracing::warn!("waiting for the database: {error}; retrying in {delay:?}");
        if telemetry::service::sleep_or_stop(delay, stop).await {
            return Ok(None);
        }
    }
}

/// True for the errors of a server that cannot be reached (a service waits
/// for it), as opposed to a statement it refused (a person must look).
pub fn is_connection_error(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    )
}

/// Sorts a failed connection: a refused login is reported as one, anything
/// else as a server that cannot be reached.
fn connect_error(url: &str, source: sqlx::Error) -> DatabaseError {
    let refused_login = matches!(
        &source,
        sqlx::Error::Database(error)
            if matches!(error.code().as_deref(), Some(INVALID_PASSWORD | INVALID_AUTHORIZATION))
    );
    if refused_login {
        let user = url
            .parse::<PgConnectOptions>()
            .map(|options| options.get_username().to_owned())
            .unwrap_or_else(|_| "(unknown)".to_owned());
        DatabaseError::AuthenticationFailed {
            url: redact(url),
            user,
        }
    } else {
        DatabaseError::Unreachable {
            url: redact(url),
            source,
        }
    }
}

/// SQLSTATE `invalid_password`: the password was wrong.
const INVALID_PASSWORD: &str = "28P01";
/// SQLSTATE `invalid_authorization_specification`: pg_hba.conf refused the
/// user or no such role exists.
const INVALID_AUTHORIZATION: &str = "28000";

pub async fn create_database(name: &str) -> Result<(), DatabaseError> {
    check_name(name)?;
    let mut admin = admin_connection().await?;
    // Identifiers cannot be bound as parameters; `check_name` allows only
    // [a-z0-9_], so the quoted name cannot break out of the statement.
    sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await?;
    Ok(())
}

/// The URL of database `name` on the admin URL's server, creating it on
/// first use: what a service started by hand connects to when it was given
/// no database URL. Safe when several processes start at once.
pub async fn ensure_database(name: &str) -> Result<String, DatabaseError> {
    match create_database(name).await {
        Ok(()) => {}
        // 42P04: it already exists. 23505: another process created it just now.
        Err(DatabaseError::Sql(sqlx::Error::Database(e)))
            if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
        Err(e) => return Err(e),
    }
    url_for(name)
}

/// Where a service started by hand finds its database: the URL it was
/// given, or else a database of a fixed name on the book's server
/// ([`admin_url`]), created on first use.
#[derive(Clone)]
pub enum Location {
    Url(String),
    Named(&'static str),
}

impl Location {
    pub fn given_or(url: Option<String>, default_name: &'static str) -> Self {
        url.map_or(Location::Named(default_name), Location::Url)
    }

    /// The connection string, creating the named database if needed. Fails
    /// as [`connect`] does when Postgres is down, so a caller can wait.
    pub async fn resolve(&self) -> Result<String, DatabaseError> {
        match self {
            Location::Url(url) => Ok(url.clone()),
            Location::Named(name) => ensure_database(name).await,
        }
    }
}

pub async fn drop_database(name: &str) -> Result<(), DatabaseError> {
    check_name(name)?;
    let mut admin = admin_connection().await?;
    let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
    // After a big run an autovacuum worker may still be in the database, and
    // the book's role may not end it (42501), or the drop races it (55006):
    // both pass once the worker finishes, so wait for it, within reason.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match sqlx::raw_sql(&statement).execute(&mut admin).await {
            Ok(_) => return Ok(()),
            Err(sqlx::Error::Database(error))
                if matches!(error.code().as_deref(), Some("42501") | Some("55006"))
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

async fn admin_connection() -> Result<PgConnection, DatabaseError> {
    let url = admin_url();
    PgConnection::connect(&url)
        .await
        .map_err(|source| connect_error(&url, source))
}

fn check_name(name: &str) -> Result<(), DatabaseError> {
    let safe = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if safe {
        Ok(())
    } else {
        Err(DatabaseError::UnsafeName(name.to_owned()))
    }
}

/// Hides every credential of a connection string (the userinfo's password
/// and `?password=`, `?sslpassword=`, ...) before it reaches a log line.
pub fn redact(url: &str) -> String {
    telemetry::redact::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_the_safe_alphabet_are_refused() {
        assert!(check_name("shop_1a2b").is_ok());
        assert!(check_name("shop\"; DROP").is_err());
        assert!(check_name("Shop").is_err());
        assert!(check_name("").is_err());
    }

    #[test]
    fn passwords_never_reach_log_lines() {
        assert_eq!(
            redact("postgres://eo:secret@127.0.0.1:5432/postgres"),
            "postgres://eo:***@127.0.0.1:5432/postgres"
        );
        assert_eq!(redact("postgres://127.0.0.1/x"), "postgres://127.0.0.1/x");
        assert_eq!(
            redact("postgres://eo@127.0.0.1:5432/x?password=secret&sslpassword=s2"),
            "postgres://eo@127.0.0.1:5432/x?password=***&sslpassword=***"
        );
    }

    /// A connection error's text never shows a password from the query
    /// string (the error sqlx gives for an unreachable server).
    #[tokio::test]
    async fn connection_errors_never_show_a_query_password() {
        let url = "postgres://eo@127.0.0.1:1/x?password=hunter2&connect_timeout=1";
        let error = connect(url, 1)
            .await
            .expect_err("nothing listens on port 1");
        let text = format!("{error}: {:?}", anyhow_like_chain(&error));
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("password=***"), "{text}");
    }

    fn anyhow_like_chain(error: &dyn std::error::Error) -> Vec<String> {
        let mut chain = Vec::new();
        let mut source = error.source();
        while let Some(cause) = source {
            chain.push(cause.to_string());
            source = cause.source();
        }
        chain
    }

    /// Against the book's Postgres: a wrong password is an authentication
    /// failure, said once, and not "cannot reach Postgres".
    #[tokio::test]
    async fn a_wrong_password_is_reported_as_a_refused_login() {
        let admin: PgConnectOptions = admin_url().parse().expect("the admin URL parses");
        let wrong = admin
            .clone()
            .password("certainly-not-the-password")
            .to_url_lossy()
            .to_string();
        let error = connect(&wrong, 1).await.expect_err("the login is refused");
        let text = error.to_string();
        assert!(
            matches!(error, DatabaseError::AuthenticationFailed { .. }),
            "{text}"
        );
        assert_eq!(
            text,
            format!(
                "Postgres at {} refused the login for user {} (wrong password?)",
                redact(&wrong),
                admin.get_username()
            )
        );
        assert!(!text.contains("is it up"), "{text}");
        assert!(!text.contains("certainly-not-the-password"), "{text}");
    }
}
