//! What the tests that run the workspace's binaries share: where cargo put
//! a binary, a free loopback address, publishing orders, and the PSP
//! ledger's counts.
// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use payments::PaymentEvent;
use queue::backend::{Broker, QueueSpec};
use queue::OutgoingMessage;
use uuid::Uuid;

/// Where cargo put one of this workspace's binaries: beside `deps/`, which
/// holds this test. `scripts/test` builds them all first (`cargo test`
/// builds only the binaries of packages that have tests).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows where it is");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --bins, or scripts/test)",
        path.display()
    );
    path
}

/// A loopback address nothing listens on right now.
pub fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .to_string()
}

/// `count` fresh orders' payment events, published straight to the queue.
pub async fn publish_orders(broker: &Broker, queue: &QueueSpec, count: usize) {
    let publisher = broker.publisher(queue).await.unwrap();
    for _ in 0..count {
        let event = PaymentEvent::new(Uuid::new_v4(), 1999, "EUR", Utc::now());
        publisher
            .publish(&OutgoingMessage {
                key: event.order_id.to_string(),
                message_id: event.event_id.to_string(),
                payload: event.encode(),
            })
            .await
            .unwrap();
    }
}

/// The PSP ledger's charges and the distinct orders they charged.
pub async fn charged(psp: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT order_id) FROM charges")
        .fetch_one(psp)
        .await
        .unwrap()
}

/// [`charged`] once `orders` distinct orders are charged (or `within` has
/// passed), and a moment more, so that a double charge would have landed.
pub async fn wait_for_charges(psp: &sqlx::PgPool, orders: i64, within: Duration) -> (i64, i64) {
    let deadline = Instant::now() + within;
    while charged(psp).await.1 < orders && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    charged(psp).await
}
