//! The HTTP contract of `book/psp-api.md`: auth, validation, charging without
//! and with an Idempotency-Key.

mod common;

use std::time::Duration;

use common::{charge_body, Psp, API_KEY};
use psp::{ChargeError, ChargeRequest};

#[tokio::test]
async fn missing_or_wrong_api_key_is_401_and_charges_nothing() {
    let psp = Psp::quiet().await;
    let body = charge_body("order-auth", 500);

    let missing = psp
        .http
        .post(psp.url("/v1/charges"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    let missing = common::RawResponse::from(missing).await;
    assert_eq!(missing.error_type(), "unauthorized");

    let wrong = psp
        .http
        .post(psp.url("/v1/charges"))
        .bearer_auth("sk_test_wrong")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        common::RawResponse::from(wrong).await.error_type(),
        "unauthorized"
    );

    let listing = psp
        .http
        .get(psp.url("/v1/charges?order_id=order-auth"))
        .send()
        .await
        .unwrap();
    assert_eq!(listing.status(), 401);

    let client =
        psp::PspClient::new(psp.running().base_url(), "sk_wrong", Duration::from_secs(5)).unwrap();
    let err = client
        .charge(&ChargeRequest::new("order-auth", 500, "EUR"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ChargeError::Unauthorized), "{err:?}");

    assert_eq!(psp.ledger_rows("order-auth").await, 0);
    psp.finish().await;
}

#[tokio::test]
async fn invalid_bodies_and_keys_are_400_and_charge_nothing() {
    let psp = Psp::quiet().await;
    let cases = [
        ("not json", "{"),
        (
            "missing field",
            r#"{"order_id":"o-400","amount_cents":100}"#,
        ),
        (
            "unknown field",
            r#"{"order_id":"o-400","amount_cents":100,"currency":"EUR","capture":true}"#,
        ),
        (
            "zero amount",
            r#"{"order_id":"o-400","amount_cents":0,"currency":"EUR"}"#,
        ),
        (
            "negative amount",
            r#"{"order_id":"o-400","amount_cents":-1,"currency":"EUR"}"#,
        ),
        (
            "fractional amount",
            r#"{"order_id":"o-400","amount_cents":1.5,"currency":"EUR"}"#,
        ),
        (
            "lowercase currency",
            r#"{"order_id":"o-400","amount_cents":100,"currency":"eur"}"#,
        ),
        (
            "unknown currency",
            r#"{"order_id":"o-400","amount_cents":100,"currency":"QQQ"}"#,
        ),
        (
            "empty order",
            r#"{"order_id":"","amount_cents":100,"currency":"EUR"}"#,
        ),
    ];
    for (what, body) in cases {
        let response = psp.post(body, None).await;
        assert_eq!(response.status, 400, "{what}: {}", response.body);
        assert_eq!(response.error_type(), "invalid_request", "{what}");
    }
    let long_order = charge_body(&"x".repeat(65), 100);
    assert_eq!(psp.post(&long_order, None).await.status, 400);

    let long_key = "k".repeat(256);
    let response = psp.post(&charge_body("o-400", 100), Some(&long_key)).await;
    assert_eq!(response.status, 400, "{}", response.body);

    // A 400 does not burn the key: the same key then works.
    let body = r#"{"order_id":"o-400","amount_cents":0,"currency":"EUR"}"#;
    assert_eq!(psp.post(body, Some("key-400")).await.status, 400);
    assert_eq!(psp.ledger_rows("o-400").await, 0);
    let ok = psp.post(&charge_body("o-400", 100), Some("key-400")).await;
    assert_eq!(ok.status, 201, "{}", ok.body);
    assert_eq!(ok.replayed, None);
    assert_eq!(psp.ledger_rows("o-400").await, 1);
    psp.finish().await;
}

#[tokio::test]
async fn without_a_key_every_call_charges() {
    let psp = Psp::quiet().await;
    let client = psp.client(Duration::from_secs(5));
    let request = ChargeRequest::new("order-nokey", 1999, "EUR");

    let first = client.charge(&request, None).await.unwrap();
    let second = client.charge(&request, None).await.unwrap();
    assert_ne!(first.id, second.id);
    assert!(!first.replayed && !second.replayed);
    assert!(first.id.starts_with("ch_") && first.id.len() == 35);
    assert_eq!(first.status, "succeeded");
    assert_eq!(first.amount_cents, 1999);
    assert_eq!(first.currency, "EUR");

    assert_eq!(psp.ledger_rows("order-nokey").await, 2);
    let counts = psp::ledger::charge_counts_by_order(psp.pool())
        .await
        .unwrap();
    assert_eq!(counts.get("order-nokey"), Some(&2));
    assert_eq!(psp::ledger::total_charges(psp.pool()).await.unwrap(), 2);
    psp.finish().await;
}

#[tokio::test]
async fn same_key_charges_once_and_replays_the_exact_response() {
    let psp = Psp::quiet().await;
    let body = charge_body("order-replay", 4200);

    let first = psp.post(&body, Some("order-replay/charge")).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.replayed, None);
    let second = psp.post(&body, Some("order-replay/charge")).await;
    assert_eq!(second.status, 201);
    assert_eq!(second.replayed.as_deref(), Some("true"));
    assert_eq!(
        second.body, first.body,
        "a replay is byte-for-byte the first"
    );

    let client = psp.client(Duration::from_secs(5));
    let third = client
        .charge(
            &ChargeRequest::new("order-replay", 4200, "EUR"),
            Some("order-replay/charge"),
        )
        .await
        .unwrap();
    assert!(third.replayed);
    assert_eq!(third.id, first.json()["id"].as_str().unwrap());

    let rows = psp::ledger::charges_for_order(psp.pool(), "order-replay")
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].idempotency_key.as_deref(),
        Some("order-replay/charge")
    );
    assert_eq!(
        rows[0].created_at.to_rfc3339(),
        third.created_at.to_rfc3339()
    );
    psp.finish().await;
}

#[tokio::test]
async fn same_key_with_other_parameters_is_422_and_charges_nothing_more() {
    let psp = Psp::quiet().await;
    let key = "order-422/charge";
    assert_eq!(
        psp.post(&charge_body("order-422", 100), Some(key))
            .await
            .status,
        201
    );

    let other_amount = psp.post(&charge_body("order-422", 101), Some(key)).await;
    assert_eq!(other_amount.status, 422, "{}", other_amount.body);
    assert_eq!(other_amount.error_type(), "idempotency_key_reused");

    let client = psp.client(Duration::from_secs(5));
    let err = client
        .charge(&ChargeRequest::new("order-422", 100, "USD"), Some(key))
        .await
        .unwrap_err();
    assert!(matches!(err, ChargeError::KeyReused), "{err:?}");
    assert!(!err.is_retryable());

    assert_eq!(psp.ledger_rows("order-422").await, 1);
    psp.finish().await;
}

#[tokio::test]
async fn keys_are_scoped_per_api_key() {
    // Pretend another merchant used the key first: it must not replay for us.
    let psp = Psp::quiet().await;
    assert_eq!(
        psp.post(&charge_body("o-scope", 1), Some("k")).await.status,
        201
    );
    sqlx::query("UPDATE idempotency_keys SET api_key = 'sk_someone_else'")
        .execute(psp.pool())
        .await
        .unwrap();
    let again = psp.post(&charge_body("o-scope", 1), Some("k")).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.replayed, None, "another caller's key is not ours");
    assert_eq!(psp.ledger_rows("o-scope").await, 2);
    psp.finish().await;
}

#[tokio::test]
async fn listing_health_and_unknown_routes() {
    let psp = Psp::quiet().await;
    let client = psp.client(Duration::from_secs(5));
    client.health().await.unwrap();
    let request = ChargeRequest::new("order-list", 300, "GBP");
    client.charge(&request, Some("list-1")).await.unwrap();
    client.charge(&request, None).await.unwrap();

    let listed = client.list_charges("order-list").await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].idempotency_key.as_deref(), Some("list-1"));
    assert_eq!(listed[1].idempotency_key, None);
    assert!(client.list_charges("nobody").await.unwrap().is_empty());

    let no_order = psp
        .http
        .get(psp.url("/v1/charges"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(no_order.status(), 400);

    let unknown = psp.http.get(psp.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        common::RawResponse::from(unknown).await.error_type(),
        "not_found"
    );
    psp.finish().await;
}
