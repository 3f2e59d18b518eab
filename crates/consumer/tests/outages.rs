//! The consumer process rides out a broker outage and a database outage:
//! it stays up, says on `/metrics` that it is disconnected, logs a line per
//! attempt, reconnects, and charges every order once.
//!
//! The outage is real without stopping the shared servers other tests use:
//! the consumer reaches its broker and its database through a TCP proxy on
//! loopback that the test opens and closes (closing it cuts every
//! connection through it, as a restarting server does).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use databases::FreshDatabase;
use psp::{PspConfig, PspServer};
use queue::backend::{BackendKind, Broker, QueueSpec};
use support::{binary, publish_orders, wait_for_charges};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

mod support;

/// How long a batch of orders may take to be charged.
const CHARGE_WAIT: Duration = Duration::from_secs(60);

/// A loopback TCP proxy that can be switched off and on.
struct Proxy {
    listen: SocketAddr,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    fn new(target: SocketAddr) -> Self {
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        Self {
            listen,
            target,
            tasks: Arc::default(),
        }
    }

    async fn up(&self) {
        let listener = TcpListener::bind(self.listen).await.unwrap();
        let (target, tasks) = (self.target, self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let connection = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(connection);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Stops listening and cuts every connection through the proxy.
    fn down(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

async fn scrape(addr: &str) -> String {
    match reqwest::get(format!("http://{addr}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until `/metrics` holds `line`.
async fn metrics_show(addr: &str, line: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if scrape(addr).await.lines().any(|l| l == line) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

async fn rides_out_outages(backend: BackendKind) {
    let shop = FreshDatabase::create("outage_shop", 2).await.unwrap();
    let psp_db = FreshDatabase::create("outage_psp", 4).await.unwrap();
    let psp = PspServer::start(psp_db.pool.clone(), PspConfig::default(), "127.0.0.1:0")
        .await
        .unwrap();
    let suffix = shop.name.trim_start_matches("outage_shop_").to_owned();
    let queue = QueueSpec::new(backend, format!("eo.outage.{suffix}"));
    let broker = Broker::connect(backend).await.unwrap();
    broker.declare(&queue).await.unwrap();

    let broker_proxy = Proxy::new(match backend {
        BackendKind::Rabbitmq => "127.0.0.1:5672".parse().unwrap(),
        _ => "127.0.0.1:9324".parse().unwrap(),
    });
    let database_proxy = Proxy::new("127.0.0.1:5432".parse().unwrap());
    let through_proxy =
        |url: &str, proxy: &Proxy| url.replacen(":5432/", &format!(":{}/", proxy.listen.port()), 1);
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .to_string();
    let log_path = std::env::temp_dir().join(format!("eo-outage-{suffix}.log"));
    let mut consumer = tokio::process::Command::new(binary("consumer"))
        .env("EO_BACKEND", backend.name())
        .env("EO_QUEUE", &queue.name)
        .env(
            "EO_SHOP_DATABASE_URL",
            through_proxy(&shop.url, &database_proxy),
        )
        .env("EO_PSP_URL", psp.base_url())
        .env("EO_CONSUMER_METRICS_ADDR", &metrics_addr)
        .env(
            "EO_AMQP_URL",
            format!("amqp://guest:guest@{}/%2f", broker_proxy.listen),
        )
        .env("EO_SQS_ENDPOINT", format!("http://{}", broker_proxy.listen))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // 1. Started while the database and the broker are unreachable: it
    //    waits, serving /metrics and logging each attempt, instead of exiting.
    let logged = |line: String| {
        let log = &log;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && !log().contains(&line) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            log().contains(&line)
        }
    };
    assert!(
        metrics_show(
            &metrics_addr,
            r#"connected{to="database"} 0"#,
            Duration::from_secs(10)
        )
        .await,
        "metrics say the database is missing; log:\n{}",
        log()
    );
    assert!(
        logged("waiting for the database".into()).await,
        "a line per attempt while the database is away:\n{}",
        log()
    );
    assert!(
        consumer.try_wait().unwrap().is_none(),
        "it waits, log:\n{}",
        log()
    );
    database_proxy.up().await;
    assert!(
        logged(format!("waiting for the {} broker", backend.name())).await,
        "a line per attempt while the broker is away:\n{}",
        log()
    );
    assert!(
        metrics_show(
            &metrics_addr,
            r#"connected{to="broker"} 0"#,
            Duration::from_secs(1)
        )
        .await,
        "metrics say the broker is missing; log:\n{}",
        log()
    );
    assert!(
        consumer.try_wait().unwrap().is_none(),
        "it waits, log:\n{}",
        log()
    );
    publish_orders(&broker, &queue, 10).await;
    broker_proxy.up().await;
    assert!(
        metrics_show(
            &metrics_addr,
            r#"connected{to="broker"} 1"#,
            Duration::from_secs(15)
        )
        .await,
        "it connects once the broker answers; log:\n{}",
        log()
    );
    assert_eq!(
        wait_for_charges(&psp_db.pool, 10, CHARGE_WAIT).await,
        (10, 10)
    );

    // 2. The broker goes away mid-run, with orders waiting.
    broker_proxy.down();
    publish_orders(&broker, &queue, 10).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        consumer.try_wait().unwrap().is_none(),
        "it rides the outage out"
    );
    broker_proxy.up().await;
    assert_eq!(
        wait_for_charges(&psp_db.pool, 20, CHARGE_WAIT).await,
        (20, 20)
    );

    // 3. The database goes away mid-run.
    database_proxy.down();
    publish_orders(&broker, &queue, 10).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        consumer.try_wait().unwrap().is_none(),
        "it rides the outage out"
    );
    database_proxy.up().await;
    assert_eq!(
        wait_for_charges(&psp_db.pool, 30, CHARGE_WAIT).await,
        (30, 30)
    );

    let text = log();
    // RabbitMQ's connection drops with the proxy, and the consumer says so.
    // SQS's client retries a failed call a few times with backoff first,
    // so a two-second outage may pass without the consumer seeing it.
    assert!(
        backend != BackendKind::Rabbitmq || text.contains("lost the broker"),
        "the broker's loss mid-run is logged:\n{text}"
    );
    assert!(!text.contains("panicked"), "no panic:\n{text}");

    // 4. SIGTERM: a clean stop.
    let pid = nix::unistd::Pid::from_raw(consumer.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), consumer.wait())
        .await
        .expect("it stops on SIGTERM")
        .unwrap();
    assert!(
        status.success(),
        "exit 0 on SIGTERM, got {status}; log:\n{}",
        log()
    );

    broker_proxy.down();
    database_proxy.down();
    let _ = broker.delete(&queue).await;
    let _ = psp.shutdown().await;
    let _ = shop.drop_database().await;
    let _ = psp_db.drop_database().await;
    let _ = std::fs::remove_file(&log_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_rides_out_outages_on_rabbitmq() {
    rides_out_outages(BackendKind::Rabbitmq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_rides_out_outages_on_sqs() {
    rides_out_outages(BackendKind::Sqs).await;
}
