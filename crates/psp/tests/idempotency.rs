//! Idempotency-Key under concurrency and time: 409 while in flight, one charge
//! for many racing retries, expiry, and taking over a dead request's claim.

mod common;

use std::time::Duration;

use common::{charge_body, Psp};
use psp::{Charge, ChargeError, ChargeRequest, FaultConfig, PspConfig};

fn with_latency(latency: Duration) -> PspConfig {
    PspConfig {
        faults: FaultConfig {
            latency,
            ..FaultConfig::default()
        },
        ..PspConfig::default()
    }
}

#[tokio::test]
async fn a_retry_while_the_first_is_in_flight_gets_409() {
    let psp = Psp::start(with_latency(Duration::from_millis(800))).await;
    let client = psp.client(Duration::from_secs(5));
    let request = ChargeRequest::new("order-409", 700, "EUR");

    let first = {
        let client = client.clone();
        let request = request.clone();
        tokio::spawn(async move { client.charge(&request, Some("key-409")).await })
    };
    psp.wait_for_claim("key-409").await;

    let raw = psp
        .post(&charge_body("order-409", 700), Some("key-409"))
        .await;
    assert_eq!(raw.status, 409, "{}", raw.body);
    assert_eq!(raw.error_type(), "idempotency_key_in_use");
    let err = client.charge(&request, Some("key-409")).await.unwrap_err();
    assert!(matches!(err, ChargeError::InFlight), "{err:?}");
    assert!(err.is_retryable() && !err.money_may_have_moved());

    let first = first.await.unwrap().unwrap();
    assert!(!first.replayed);
    let after = client.charge(&request, Some("key-409")).await.unwrap();
    assert!(after.replayed);
    assert_eq!(
        after,
        Charge {
            replayed: true,
            ..first
        }
    );

    assert_eq!(psp.ledger_rows("order-409").await, 1);
    psp.finish().await;
}

#[tokio::test]
async fn twenty_concurrent_requests_with_one_key_charge_once() {
    let psp = Psp::start(with_latency(Duration::from_millis(300))).await;
    let client = psp.client(Duration::from_secs(10));
    let request = ChargeRequest::new("order-race", 2500, "EUR");

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let client = client.clone();
        let request = request.clone();
        calls.spawn(async move { client.charge(&request, Some("race-key")).await });
    }
    let (mut fresh, mut replays, mut in_flight) = (0, 0, 0);
    let mut ids = std::collections::HashSet::new();
    while let Some(outcome) = calls.join_next().await {
        match outcome.unwrap() {
            Ok(charge) if charge.replayed => {
                replays += 1;
                ids.insert(charge.id);
            }
            Ok(charge) => {
                fresh += 1;
                ids.insert(charge.id);
            }
            Err(ChargeError::InFlight) => in_flight += 1,
            Err(other) => panic!("unexpected outcome: {other:?}"),
        }
    }
    assert_eq!(fresh, 1, "exactly one call charges");
    assert_eq!(fresh + replays + in_flight, 20);
    assert_eq!(ids.len(), 1, "every 201 names the same charge");
    assert_eq!(psp.ledger_rows("order-race").await, 1);
    psp.finish().await;
}

#[tokio::test]
async fn a_key_older_than_the_window_charges_again() {
    let psp = Psp::quiet().await;
    let body = charge_body("order-expiry", 900);
    let first = psp.post(&body, Some("expiry-key")).await;
    assert_eq!(first.status, 201);
    assert_eq!(
        psp.post(&body, Some("expiry-key"))
            .await
            .replayed
            .as_deref(),
        Some("true")
    );

    // Age the key past the default 24-hour window.
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
        .execute(psp.pool())
        .await
        .unwrap();
    let after_expiry = psp.post(&body, Some("expiry-key")).await;
    assert_eq!(after_expiry.status, 201);
    assert_eq!(
        after_expiry.replayed, None,
        "an expired key is a new request"
    );
    assert_ne!(after_expiry.json()["id"], first.json()["id"]);
    assert_eq!(psp.ledger_rows("order-expiry").await, 2);

    // The new charge opened a new window: this retry replays it.
    let replay = psp.post(&body, Some("expiry-key")).await;
    assert_eq!(replay.body, after_expiry.body);
    assert_eq!(psp.ledger_rows("order-expiry").await, 2);

    // Once expired, the key may even carry other parameters.
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
        .execute(psp.pool())
        .await
        .unwrap();
    let other = psp
        .post(&charge_body("order-expiry", 901), Some("expiry-key"))
        .await;
    assert_eq!(other.status, 201, "{}", other.body);
    assert_eq!(psp.ledger_rows("order-expiry").await, 3);
    psp.finish().await;
}

#[tokio::test]
async fn a_short_window_expires_in_real_time() {
    let psp = Psp::start(PspConfig {
        idempotency_window: Duration::from_secs(1),
        ..PspConfig::default()
    })
    .await;
    let body = charge_body("order-window", 100);
    assert_eq!(psp.post(&body, Some("short")).await.replayed, None);
    assert_eq!(
        psp.post(&body, Some("short")).await.replayed.as_deref(),
        Some("true")
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let late = psp.post(&body, Some("short")).await;
    assert_eq!(late.status, 201);
    assert_eq!(late.replayed, None);
    assert_eq!(psp.ledger_rows("order-window").await, 2);
    psp.finish().await;
}

/// A claim left behind by a PSP that died mid-request: in flight, no response.
async fn plant_claim(psp: &Psp, key: &str, body: &str, age: &str) {
    let request: ChargeRequest = serde_json::from_str(body).unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys \
             (api_key, key, fingerprint, state, created_at, locked_at, claim_token) \
         VALUES ($1, $2, $3, 'in_flight', now() - $4::interval, now() - $4::interval, $5)",
    )
    .bind(common::API_KEY)
    .bind(key)
    .bind(psp::idempotency::fingerprint(&request))
    .bind(age)
    .bind(uuid::Uuid::new_v4())
    .execute(psp.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn a_dead_requests_claim_is_taken_over_after_the_in_flight_timeout() {
    let psp = Psp::quiet().await;
    let body = charge_body("order-dead", 1200);

    plant_claim(&psp, "fresh-claim", &body, "1 second").await;
    let busy = psp.post(&body, Some("fresh-claim")).await;
    assert_eq!(
        busy.status, 409,
        "a claim younger than 60 s is still in flight"
    );
    let other = psp
        .post(&charge_body("order-dead", 1), Some("fresh-claim"))
        .await;
    assert_eq!(
        other.status, 422,
        "other parameters are a client bug even mid-flight"
    );

    plant_claim(&psp, "dead-claim", &body, "2 minutes").await;
    let taken_over = psp.post(&body, Some("dead-claim")).await;
    assert_eq!(taken_over.status, 201, "{}", taken_over.body);
    assert_eq!(taken_over.replayed, None);
    let replay = psp.post(&body, Some("dead-claim")).await;
    assert_eq!(replay.body, taken_over.body);
    assert_eq!(psp.ledger_rows("order-dead").await, 1);
    psp.finish().await;
}

#[tokio::test]
async fn a_slow_holder_whose_claim_was_taken_over_cannot_charge() {
    // In-flight timeout 0 s: every retry may take the claim over, so the first
    // request, still sleeping, loses it and must roll its charge back.
    let psp = Psp::start(PspConfig {
        in_flight_timeout: Duration::ZERO,
        ..with_latency(Duration::from_millis(600))
    })
    .await;
    let client = psp.client(Duration::from_secs(5));
    let request = ChargeRequest::new("order-fence", 10, "EUR");
    let slow = {
        let (client, request) = (client.clone(), request.clone());
        tokio::spawn(async move { client.charge(&request, Some("fence")).await })
    };
    psp.wait_for_claim("fence").await;
    let retry = client.charge(&request, Some("fence")).await.unwrap();
    assert!(!retry.replayed);
    let slow = slow.await.unwrap();
    assert!(matches!(slow, Err(ChargeError::InFlight)), "{slow:?}");
    assert_eq!(psp.ledger_rows("order-fence").await, 1);
    psp.finish().await;
}
