//! One fresh database and one PSP on a free loopback port per test.

#![allow(dead_code)] // each test binary uses a different part of this

use std::time::Duration;

use databases::FreshDatabase;
use psp::{ChargeRequest, PspClient, PspConfig, PspServer, RunningPsp};

pub const API_KEY: &str = "sk_test_effectively_once";

pub struct Psp {
    pub psp: Option<RunningPsp>,
    db: Option<FreshDatabase>,
    pub http: reqwest::Client,
}

impl Psp {
    pub async fn start(config: PspConfig) -> Self {
        let db = FreshDatabase::create("psp_test", 10)
            .await
            .expect("create a test database (is Postgres up? run scripts/services-up)");
        let psp = PspServer::start(db.pool.clone(), config, "127.0.0.1:0")
            .await
            .expect("start the PSP");
        Self {
            psp: Some(psp),
            db: Some(db),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub async fn quiet() -> Self {
        Self::start(PspConfig::default()).await
    }

    pub fn running(&self) -> &RunningPsp {
        self.psp.as_ref().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.running().base_url())
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        self.running().pool()
    }

    pub fn client(&self, timeout: Duration) -> PspClient {
        PspClient::new(self.running().base_url(), API_KEY, timeout).unwrap()
    }

    /// A raw POST, for asserting on exact statuses, headers and bodies.
    pub async fn post(&self, body: &str, key: Option<&str>) -> RawResponse {
        let mut call = self
            .http
            .post(self.url("/v1/charges"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(key) = key {
            call = call.header("Idempotency-Key", key);
        }
        RawResponse::from(call.send().await.unwrap()).await
    }

    pub async fn ledger_rows(&self, order_id: &str) -> usize {
        psp::ledger::charges_for_order(self.pool(), order_id)
            .await
            .unwrap()
            .len()
    }

    /// Waits until a request has claimed `key`, so a test can race it without
    /// guessing how long the machine takes to get there.
    pub async fn wait_for_claim(&self, key: &str) {
        for _ in 0..200 {
            let claimed: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM idempotency_keys \
                 WHERE key = $1 AND state = 'in_flight')",
            )
            .bind(key)
            .fetch_one(self.pool())
            .await
            .unwrap();
            if claimed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no request claimed {key:?} within 2 s");
    }

    /// Shuts the PSP down and drops the database.
    pub async fn finish(mut self) {
        if let Some(psp) = self.psp.take() {
            psp.shutdown().await.unwrap();
        }
        if let Some(db) = self.db.take() {
            db.drop_database().await.unwrap();
        }
    }
}

impl Drop for Psp {
    /// A failed test still drops its database, from a thread of its own
    /// because the test's runtime may be gone.
    fn drop(&mut self) {
        drop(self.psp.take());
        if let Some(db) = self.db.take() {
            let name = db.name.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let _ = runtime.block_on(databases::drop_database(&name));
            })
            .join()
            .ok();
        }
    }
}

pub struct RawResponse {
    pub status: u16,
    pub replayed: Option<String>,
    pub body: String,
}

impl RawResponse {
    pub async fn from(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let replayed = response
            .headers()
            .get("Idempotent-Replayed")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.text().await.unwrap();
        Self {
            status,
            replayed,
            body,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    pub fn error_type(&self) -> String {
        self.json()["error"]["type"].as_str().unwrap().to_owned()
    }
}

pub fn charge_body(order_id: &str, amount_cents: i64) -> String {
    serde_json::to_string(&ChargeRequest::new(order_id, amount_cents, "EUR")).unwrap()
}
