//! Security basics, checked on the real processes: no credential reaches a
//! log line, a refused PSP API key stops the consumer without losing the
//! message, and every server the book starts listens on loopback only.

use std::process::Stdio;
use std::time::{Duration, Instant};

use databases::FreshDatabase;
use psp::{PspConfig, PspServer};
use queue::backend::{BackendKind, Broker, QueueSpec};
use support::{binary, charged, free_addr, publish_orders, wait_for_charges};
use tokio::process::{Child, Command};
use uuid::Uuid;

mod support;

/// A process whose stdout and stderr go to one file, read back as text.
struct Logged {
    child: Child,
    log: std::path::PathBuf,
}

impl Logged {
    fn spawn(name: &str, mut command: Command) -> Self {
        let log = std::env::temp_dir().join(format!("eo-secrets-{name}-{}.log", Uuid::new_v4()));
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then everything it wrote.
    async fn stop(mut self) -> String {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
        let output = self.output();
        let _ = std::fs::remove_file(&self.log);
        output
    }
}

/// The password of a `postgres://user:password@...` URL.
fn password_of(url: &str) -> String {
    let credentials = url.split("://").nth(1).unwrap().split('@').next().unwrap();
    credentials.split(':').nth(1).unwrap().to_owned()
}

/// Every way a credential could be printed: in a URL's user part, in its
/// query string, or on its own when it is distinctive enough to search for.
fn leaks(output: &str, secrets: &[&str]) -> Vec<String> {
    secrets
        .iter()
        .flat_map(|secret| {
            let forms = [
                format!(":{secret}@"),
                format!("password={secret}"),
                format!("Bearer {secret}"),
            ];
            let mut found: Vec<String> = forms
                .into_iter()
                .filter(|form| output.contains(form.as_str()))
                .collect();
            if secret.len() >= 16 && output.contains(secret) {
                found.push((*secret).to_owned());
            }
            found
        })
        .collect()
}

/// The PSP, a relay, the producer and consumers, run with known
/// credentials, along the paths that print a connection string: a normal
/// run, a wrong password in the URL's user part, one in its query string,
/// and a database that is not there. None of their output holds a secret.
#[tokio::test]
async fn no_credential_appears_in_any_log_line() {
    let shop = FreshDatabase::create("secrets_shop", 2).await.unwrap();
    let psp_db = FreshDatabase::create("secrets_psp", 2).await.unwrap();
    let suffix = shop.name.trim_start_matches("secrets_shop_").to_owned();
    let queue = QueueSpec::new(BackendKind::Rabbitmq, format!("eo.secrets.{suffix}"));
    let api_key = format!("sk_test_{}", Uuid::new_v4().simple());
    let wrong_user_part = format!("wrong-{}", Uuid::new_v4().simple());
    let wrong_query = format!("wrong-{}", Uuid::new_v4().simple());
    let password = password_of(&shop.url);
    let psp_addr = free_addr();
    let env = |command: &mut Command| {
        command
            .env("EO_BACKEND", "rabbitmq")
            .env("EO_QUEUE", &queue.name)
            .env("EO_SHOP_DATABASE_URL", &shop.url)
            .env("PSP_DATABASE_URL", &psp_db.url)
            .env("PSP_LISTEN", &psp_addr)
            .env("PSP_API_KEY", &api_key)
            .env("EO_PSP_URL", format!("http://{psp_addr}"))
            .env("EO_PSP_API_KEY", &api_key)
            .env("EO_CONSUMER_METRICS_ADDR", free_addr())
            .env("EO_RELAY_METRICS_ADDR", free_addr())
            // As much as the processes will say.
            .env("RUST_LOG", "debug,lapin=off");
    };
    let command = |name: &str| {
        let mut command = Command::new(binary(name));
        env(&mut command);
        command
    };

    let mut outputs = Vec::new();
    // Refused logins and a missing database: the paths that print the URL.
    let at_port_one = shop.url.replacen(":5432/", ":1/", 1);
    let with_wrong_password =
        shop.url
            .replacen(&format!(":{password}@"), &format!(":{wrong_user_part}@"), 1);
    let with_query_password = format!(
        "{}?password={wrong_query}",
        shop.url.replacen(&format!(":{password}@"), "@", 1)
    );
    for url in [&with_wrong_password, &with_query_password, &at_port_one] {
        let mut consumer = command("consumer");
        consumer.env("EO_SHOP_DATABASE_URL", url);
        let consumer = Logged::spawn("consumer", consumer);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let output = consumer.stop().await;
        assert!(
            output.contains("127.0.0.1"),
            "the consumer said where it could not connect: {output}"
        );
        outputs.push(output);
    }

    // A normal run: orders through the outbox, charged by the consumer.
    let psp = Logged::spawn("psp", command("psp"));
    let consumer = Logged::spawn("consumer", command("consumer"));
    let relay = Logged::spawn("relay", command("relay"));
    let mut producer = command("producer");
    producer.args(["--count", "5"]);
    let produced = producer.output().await.unwrap();
    assert!(produced.status.success(), "{produced:?}");
    outputs.push(String::from_utf8_lossy(&produced.stdout).into_owned());
    outputs.push(String::from_utf8_lossy(&produced.stderr).into_owned());
    assert_eq!(
        wait_for_charges(&psp_db.pool, 5, Duration::from_secs(60)).await,
        (5, 5),
        "consumer: {}",
        consumer.output()
    );
    for process in [relay, consumer, psp] {
        outputs.push(process.stop().await);
    }

    let secrets = [
        password.as_str(),
        api_key.as_str(),
        wrong_user_part.as_str(),
        wrong_query.as_str(),
        "guest",
    ];
    for output in &outputs {
        let found = leaks(output, &secrets);
        assert!(found.is_empty(), "{found:?} printed in:\n{output}");
    }
    if let Ok(broker) = Broker::connect(BackendKind::Rabbitmq).await {
        let _ = broker.delete(&queue).await;
    }
    let _ = shop.drop_database().await;
    let _ = psp_db.drop_database().await;
}

/// A consumer whose PSP API key is refused stops with an error that says
/// so, and the message it held is still there for a consumer with the
/// right key: charged once, not lost.
async fn a_refused_api_key_keeps_the_message(backend: BackendKind) {
    let shop = FreshDatabase::create("refused_key_shop", 2).await.unwrap();
    let psp_db = FreshDatabase::create("refused_key_psp", 4).await.unwrap();
    let psp = PspServer::start(psp_db.pool.clone(), PspConfig::default(), "127.0.0.1:0")
        .await
        .unwrap();
    let suffix = shop.name.trim_start_matches("refused_key_shop_").to_owned();
    let queue = QueueSpec::new(backend, format!("eo.refused-key.{suffix}"));
    let broker = Broker::connect(backend).await.unwrap();
    broker.declare(&queue).await.unwrap();
    publish_orders(&broker, &queue, 1).await;

    let consumer = |api_key: &str| {
        let mut command = Command::new(binary("consumer"));
        command
            .env("EO_BACKEND", backend.name())
            .env("EO_QUEUE", &queue.name)
            .env("EO_SHOP_DATABASE_URL", &shop.url)
            .env("EO_PSP_URL", psp.base_url())
            .env("EO_PSP_API_KEY", api_key)
            .env("EO_CONSUMER_METRICS_ADDR", free_addr());
        Logged::spawn("consumer", command)
    };

    let mut refused = consumer("sk_test_not_the_key");
    let status = tokio::time::timeout(Duration::from_secs(60), refused.child.wait())
        .await
        .expect("a refused key stops the consumer instead of retrying forever")
        .unwrap();
    let output = refused.output();
    assert!(!status.success(), "it exits with an error: {output}");
    assert!(
        output.contains("refused our API key"),
        "the error names the cause: {output}"
    );
    assert!(
        !output.contains("panicked"),
        "a clear error, not a panic: {output}"
    );
    assert_eq!(charged(&psp_db.pool).await, (0, 0));

    let accepted = consumer(&PspConfig::default().api_key);
    assert_eq!(
        wait_for_charges(&psp_db.pool, 1, Duration::from_secs(90)).await,
        (1, 1),
        "the message came back to a consumer with the right key: {}",
        accepted.output()
    );
    accepted.stop().await;
    refused.stop().await;
    let _ = broker.delete(&queue).await;
    let _ = shop.drop_database().await;
    let _ = psp_db.drop_database().await;
}

#[tokio::test]
async fn a_refused_api_key_keeps_the_message_on_rabbitmq() {
    a_refused_api_key_keeps_the_message(BackendKind::Rabbitmq).await;
}

#[tokio::test]
async fn a_refused_api_key_keeps_the_message_on_sqs() {
    a_refused_api_key_keeps_the_message(BackendKind::Sqs).await;
}

/// The listening TCP sockets of the machine, as (process name, address);
/// the name is `?` where the process is not ours to look into.
fn listeners() -> Vec<(String, String)> {
    // Socket inode -> the local address of a socket in state LISTEN (0A).
    let mut sockets = std::collections::HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && fields[3] == "0A" {
                sockets.insert(fields[9].to_owned(), fields[1].to_owned());
            }
        }
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let name = std::fs::read_to_string(entry.path().join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
            {
                if let Some(address) = sockets.remove(inode) {
                    found.push((name.clone(), address));
                }
            }
        }
    }
    // Sockets of processes this user may not look into (another user's
    // server) still count, by their port.
    found.extend(
        sockets
            .into_values()
            .map(|address| ("?".to_owned(), address)),
    );
    found
}

/// Whether a `/proc/net/tcp{,6}` local address (hex, then the port) is
/// on loopback: 127.0.0.0/8, ::1, or 127.x mapped into IPv6.
fn is_loopback(address: &str) -> bool {
    let host = address.split(':').next().unwrap_or_default();
    match host.len() {
        // IPv4, little-endian: the first octet is the last byte.
        8 => host.ends_with("7F"),
        32 => {
            host == "00000000000000000000000001000000"
                || (host.starts_with("0000000000000000FFFF0000") && host.ends_with("7F"))
        }
        _ => false,
    }
}

fn port_of(address: &str) -> u16 {
    address
        .rsplit(':')
        .next()
        .and_then(|port| u16::from_str_radix(port, 16).ok())
        .unwrap_or(0)
}

/// The ports of Postgres, RabbitMQ, the SQS server and Kafka, from the
/// environment `scripts/lib.sh` sets, with its defaults.
fn service_ports() -> [u16; 4] {
    let port = |var: &str, default: u16| {
        std::env::var(var)
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(default)
    };
    let amqp = std::env::var("EO_AMQP_URL")
        .ok()
        .and_then(|url| {
            let authority = url.split("://").nth(1)?.split('/').next()?;
            authority
                .rsplit('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(5672);
    [
        port("EO_PG_PORT", 5432),
        amqp,
        port("EO_SQS_PORT", 9324),
        port("EO_KAFKA_PORT", 9092),
    ]
}

#[test]
fn loopback_addresses_are_read_from_proc() {
    assert_eq!(port_of("0100007F:1538"), 5432);
    assert!(is_loopback("0100007F:1538"));
    assert!(!is_loopback("00000000:1538"));
    assert!(is_loopback("00000000000000000000000001000000:1538"));
    assert!(is_loopback("0000000000000000FFFF00000100007F:2384"));
    assert!(!is_loopback("00000000000000000000000000000000:1538"));
}

/// Postgres, RabbitMQ (with Erlang's port mapper and distribution port),
/// ElasticMQ and Kafka as the scripts start them, and the PSP,
/// a consumer and a relay on their default addresses: nothing listens
/// beyond loopback.
#[tokio::test]
async fn every_server_we_start_listens_on_loopback_only() {
    let shop = FreshDatabase::create("loopback_shop", 2).await.unwrap();
    let psp_db = FreshDatabase::create("loopback_psp", 2).await.unwrap();
    let suffix = shop.name.trim_start_matches("loopback_shop_").to_owned();
    let queue = QueueSpec::new(BackendKind::Rabbitmq, format!("eo.loopback.{suffix}"));
    let ours = ["psp", "consumer", "relay"];
    let processes: Vec<Logged> = ours
        .iter()
        .map(|name| {
            let mut command = Command::new(binary(name));
            // Only what the defaults cannot know; the listen addresses are
            // the defaults under test.
            command
                .env("EO_BACKEND", "rabbitmq")
                .env("EO_QUEUE", &queue.name)
                .env("EO_SHOP_DATABASE_URL", &shop.url)
                .env("PSP_DATABASE_URL", &psp_db.url)
                .env_remove("PSP_LISTEN")
                .env_remove("EO_CONSUMER_METRICS_ADDR")
                .env_remove("EO_RELAY_METRICS_ADDR");
            Logged::spawn(name, command)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let servers = loop {
        let servers = listeners();
        let listening = |name: &str| servers.iter().any(|(n, _)| n == name);
        if ours.iter().all(|name| listening(name)) || Instant::now() > deadline {
            break servers;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut outputs = Vec::new();
    for process in processes {
        outputs.push(process.stop().await);
    }
    // Natively, these run the services; under docker-compose a proxy
    // process holds the ports instead, so the ports are checked too.
    let service_processes = ["postgres", "beam.smp", "epmd", "java", "docker-proxy"];
    let service_ports = service_ports();
    for name in ours {
        assert!(
            servers.iter().any(|(n, _)| n == name),
            "{name} is listening: {servers:?}\n{}",
            outputs.join("\n")
        );
    }
    for port in service_ports {
        assert!(
            servers.iter().any(|(_, address)| port_of(address) == port),
            "a service listens on port {port} (scripts/services-up starts it): {servers:?}"
        );
    }
    let wide: Vec<_> = servers
        .iter()
        .filter(|(name, address)| {
            (ours.contains(&name.as_str())
                || service_processes.contains(&name.as_str())
                || service_ports.contains(&port_of(address)))
                && !is_loopback(address)
        })
        .collect();
    assert!(
        wide.is_empty(),
        "servers listening beyond loopback: {wide:?}"
    );
    if let Ok(broker) = Broker::connect(BackendKind::Rabbitmq).await {
        let _ = broker.delete(&queue).await;
    }
    let _ = shop.drop_database().await;
    let _ = psp_db.drop_database().await;
}
