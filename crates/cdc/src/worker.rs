//! A Kafka Connect worker as a child process.
//!
//! Each run gets a worker of its own: its own group, its own internal topics
//! (configs, offsets, status) and its own REST port, so two runs never share
//! stored offsets (one offset store per replication slot: a second store on
//! the same slot fails with "this is no longer available on the server").
//! The worker is a distributed worker with one member, because Connect's
//! exactly-once source support exists only in distributed mode; the
//! at-least-once runs use the same worker with it switched off, so the mode
//! is the only difference between them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::CdcError;

/// Where Connect's jars are: the Kafka jars (kafka-tools brings
/// connect-runtime) and Debezium's plugin folder. `scripts/services-up`
/// resolves both and exports the same variables.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// A Java class path (`…/kafka/lib/*`).
    pub classpath: String,
    /// Connect's `plugin.path`: a folder of unpacked plugins.
    pub plugins: PathBuf,
    pub brokers: String,
    /// JVM options (heap).
    pub java_opts: Vec<String>,
}

impl ConnectSettings {
    /// `EO_CONNECT_CLASSPATH`, `EO_CONNECT_PLUGINS`, `EO_KAFKA_BROKERS` and
    /// `EO_CONNECT_JAVA_OPTS`, with defaults under `EO_STATE_DIR` that match
    /// `scripts/lib.sh`.
    pub fn from_env() -> Self {
        let state = std::env::var("EO_STATE_DIR")
            .unwrap_or_else(|_| "/var/tmp/effectively-once".to_owned());
        Self {
            classpath: std::env::var("EO_CONNECT_CLASSPATH")
                .unwrap_or_else(|_| format!("{state}/kafka/lib/*")),
            plugins: std::env::var("EO_CONNECT_PLUGINS")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from(format!("{state}/connect/plugins"))),
            brokers: queue::kafka::brokers_from_env(),
            java_opts: std::env::var("EO_CONNECT_JAVA_OPTS")
                .unwrap_or_else(|_| "-Xms128m -Xmx512m".to_owned())
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
        }
    }

    fn check(&self) -> Result<(), CdcError> {
        let lib = self.classpath.trim_end_matches('*');
        let has_connect = std::fs::read_dir(lib).is_ok_and(|entries| {
            entries.flatten().any(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("connect-runtime-")
            })
        });
        if !has_connect {
            return Err(CdcError::JarsMissing {
                path: self.classpath.clone(),
                variable: "EO_CONNECT_CLASSPATH",
            });
        }
        if !self.plugins.join("debezium-connector-postgres").is_dir() {
            return Err(CdcError::JarsMissing {
                path: self.plugins.display().to_string(),
                variable: "EO_CONNECT_PLUGINS",
            });
        }
        Ok(())
    }
}

/// How a worker hands Debezium's records to Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Records first, source offsets flushed every second: a worker that
    /// dies between the two sends the records since the last flush again.
    AtLeastOnce,
    /// Records and source offsets in one Kafka transaction
    /// (`exactly.once.source.support=enabled`).
    ExactlyOnce,
}

impl Delivery {
    pub fn name(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "at-least-once",
            Delivery::ExactlyOnce => "exactly-once source",
        }
    }
}

/// One Connect worker process and how to reach it.
pub struct ConnectWorker {
    pub name: String,
    pub rest_url: String,
    properties: PathBuf,
    log: PathBuf,
    settings: ConnectSettings,
    child: Option<Child>,
    http: reqwest::Client,
}

/// Connect's offsets are flushed this often in at-least-once mode: the
/// window of records a SIGKILL sends again.
pub const OFFSET_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How long a dead worker stays a member of its group. A restarted worker
/// gets the connector once the dead member's session has run out.
const SESSION_TIMEOUT: Duration = Duration::from_secs(3);

impl ConnectWorker {
    /// Writes the worker's settings into `dir` and starts it; returns once
    /// its REST API answers.
    pub async fn start(
        settings: &ConnectSettings,
        dir: &Path,
        name: &str,
        delivery: Delivery,
    ) -> Result<Self, CdcError> {
        settings.check()?;
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let properties = dir.join("connect-worker.properties");
        std::fs::write(
            &properties,
            worker_properties(settings, name, port, delivery),
        )?;
        std::fs::write(dir.join("connect-log4j2.properties"), LOG4J2)?;
        let mut worker = Self {
            name: name.to_owned(),
            rest_url: format!("http://127.0.0.1:{port}"),
            properties,
            log: dir.join("connect.log"),
            settings: settings.clone(),
            child: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| CdcError::Rest(e.to_string()))?,
        };
        worker.spawn()?;
        worker.wait_until_serving(Duration::from_secs(90)).await?;
        Ok(worker)
    }

    fn spawn(&mut self) -> Result<(), CdcError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let dir = self.properties.parent().unwrap_or(Path::new("."));
        let child = Command::new("java")
            .args(&self.settings.java_opts)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                dir.join("connect-log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(&self.settings.classpath)
            .arg("org.apache.kafka.connect.cli.ConnectDistributed")
            .arg(&self.properties)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // A lab that dies must not leave a JVM reading the WAL.
            .kill_on_drop(true)
            .spawn()
            .map_err(CdcError::Spawn)?;
        self.child = Some(child);
        Ok(())
    }

    /// The worker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// SIGKILL, as a crash: no offset flush, no goodbye to the group.
    pub async fn kill(&mut self) -> Result<(), CdcError> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts the worker again with the same settings (the same group and
    /// stored offsets): it finds its connector in the config topic and
    /// resumes from the stored offset. Returns once the REST API answers.
    pub async fn restart(&mut self) -> Result<(), CdcError> {
        self.kill().await?;
        self.spawn()?;
        self.wait_until_serving(Duration::from_secs(90)).await
    }

    /// Starts the worker again without waiting for it.
    pub fn restart_in_background(&mut self) -> Result<(), CdcError> {
        if self.child.is_none() {
            self.spawn()?;
        }
        Ok(())
    }

    /// The last lines of the worker's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("{} (last lines:\n{tail})", self.log.display())
    }

    async fn wait_until_serving(&mut self, limit: Duration) -> Result<(), CdcError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(CdcError::Exited {
                        status: status.to_string(),
                        log: self.log_tail(),
                    });
                }
            }
            if self.get("/").await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CdcError::Timeout {
                    what: "REST API answering".into(),
                    seconds: limit.as_secs(),
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Result<serde_json::Value, CdcError> {
        let response = self
            .http
            .get(format!("{}{path}", self.rest_url))
            .send()
            .await
            .map_err(|e| CdcError::Rest(e.to_string()))?;
        json_or_error(response).await
    }

    pub(crate) async fn put(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, CdcError> {
        let response = self
            .http
            .put(format!("{}{path}", self.rest_url))
            .json(body)
            .send()
            .await
            .map_err(|e| CdcError::Rest(e.to_string()))?;
        json_or_error(response).await
    }

    /// The internal topics this worker created, for clean-up.
    pub fn internal_topics(&self) -> Vec<String> {
        internal_topics(&self.name)
    }

    /// Kills the worker and deletes its internal topics.
    pub async fn remove(mut self) -> Result<(), CdcError> {
        self.kill().await?;
        crate::topic::delete_topics(&self.settings.brokers, &self.internal_topics()).await
    }
}

async fn json_or_error(response: reqwest::Response) -> Result<serde_json::Value, CdcError> {
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| CdcError::Rest(e.to_string()))?;
    if !status.is_success() {
        return Err(CdcError::Rest(format!("{status}: {text}")));
    }
    serde_json::from_str(&text).map_err(|e| CdcError::Rest(format!("{e}: {text}")))
}

/// The internal topics of the worker named `name`.
pub fn internal_topics(name: &str) -> Vec<String> {
    ["configs", "offsets", "status"]
        .iter()
        .map(|kind| format!("{name}.connect-{kind}"))
        .collect()
}

fn worker_properties(
    settings: &ConnectSettings,
    name: &str,
    port: u16,
    delivery: Delivery,
) -> String {
    let topics = internal_topics(name);
    let exactly_once = match delivery {
        Delivery::AtLeastOnce => "disabled",
        Delivery::ExactlyOnce => "enabled",
    };
    format!(
        "# Written by the chaos lab for one run (crate cdc).
bootstrap.servers={brokers}
group.id={name}.connect
# REST on loopback only: it listens on every interface unless told.
listeners=http://127.0.0.1:{port}
rest.advertised.host.name=127.0.0.1
rest.advertised.port={port}
plugin.path={plugins}
plugin.discovery=service_load
config.storage.topic={configs}
offset.storage.topic={offsets}
status.storage.topic={status}
config.storage.replication.factor=1
offset.storage.replication.factor=1
offset.storage.partitions=1
status.storage.replication.factor=1
status.storage.partitions=1
offset.flush.interval.ms={flush}
# The outbox payload column holds the wire bytes already: pass them through.
key.converter=org.apache.kafka.connect.storage.StringConverter
value.converter=org.apache.kafka.connect.storage.StringConverter
exactly.once.source.support={exactly_once}
# A restarted worker takes the connector back as soon as the dead member's
# session ends, instead of waiting up to 5 minutes for it to return.
scheduled.rebalance.max.delay.ms=0
session.timeout.ms={session}
heartbeat.interval.ms=1000
# The connector may tune its own producer (linger, batch).
connector.client.config.override.policy=All
",
        brokers = settings.brokers,
        plugins = settings.plugins.display(),
        configs = topics[0],
        offsets = topics[1],
        status = topics[2],
        flush = OFFSET_FLUSH_INTERVAL.as_millis(),
        session = SESSION_TIMEOUT.as_millis(),
    )
}

/// Connect's own logging: warnings, plus Debezium's and the worker's
/// lifecycle lines, on stdout (the run's log file).
const LOG4J2: &str = "\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.debezium.name = io.debezium
logger.debezium.level = info
logger.worker.name = org.apache.kafka.connect.runtime.Worker
logger.worker.level = info
";

fn free_port() -> Result<u16, CdcError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_has_its_own_group_and_internal_topics() {
        let settings = ConnectSettings {
            classpath: "/lib/*".into(),
            plugins: "/plugins".into(),
            brokers: "127.0.0.1:9092".into(),
            java_opts: vec![],
        };
        let text = worker_properties(&settings, "eo.run1", 8083, Delivery::ExactlyOnce);
        assert!(text.contains("group.id=eo.run1.connect\n"));
        assert!(text.contains("offset.storage.topic=eo.run1.connect-offsets\n"));
        assert!(text.contains("exactly.once.source.support=enabled\n"));
        assert!(text.contains("listeners=http://127.0.0.1:8083\n"));
        let text = worker_properties(&settings, "eo.run1", 8083, Delivery::AtLeastOnce);
        assert!(text.contains("exactly.once.source.support=disabled\n"));
    }
}
