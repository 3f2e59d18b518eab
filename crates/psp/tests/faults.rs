//! Injected faults: 503 without charging, and "charged but the response was
//! lost".

mod common;

use std::time::Duration;

use common::Psp;
use psp::faults::Fault;
use psp::{ChargeError, ChargeRequest, FaultConfig, PspConfig};

#[tokio::test]
async fn an_injected_error_charges_nothing_and_a_retry_with_the_key_succeeds() {
    let order = "order-503";
    // Pick, deterministically, a seed whose first request for this order fails
    // and whose second does not: the schedule depends only on (seed, order, n).
    let base = FaultConfig {
        error_rate: 0.5,
        ..FaultConfig::default()
    };
    let seed = (0..1000)
        .find(|seed| {
            let c = FaultConfig {
                seed: *seed,
                ..base.clone()
            };
            c.fault_for(order, 0) == Fault::Error && c.fault_for(order, 1) == Fault::None
        })
        .expect("some seed in 0..1000 fits");
    let psp = Psp::start(PspConfig {
        faults: FaultConfig { seed, ..base },
        ..PspConfig::default()
    })
    .await;
    let client = psp.client(Duration::from_secs(5));
    let request = ChargeRequest::new(order, 5000, "EUR");

    let err = client.charge(&request, Some("key-503")).await.unwrap_err();
    match &err {
        ChargeError::ServerError { status, message } => {
            assert_eq!(*status, 503);
            assert!(message.contains("nothing was charged"), "{message}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    assert!(err.is_retryable() && !err.money_may_have_moved());
    assert_eq!(psp.ledger_rows(order).await, 0);

    // The claim was released, so the retry executes rather than seeing 409.
    let retry = client.charge(&request, Some("key-503")).await.unwrap();
    assert!(!retry.replayed);
    assert_eq!(psp.ledger_rows(order).await, 1);
    psp.finish().await;
}

#[tokio::test]
async fn an_error_rate_of_one_never_charges() {
    let psp = Psp::start(PspConfig {
        faults: FaultConfig {
            error_rate: 1.0,
            ..FaultConfig::default()
        },
        ..PspConfig::default()
    })
    .await;
    for (i, key) in [None, Some("k1"), Some("k1")].into_iter().enumerate() {
        let response = psp.post(&common::charge_body("order-err", 1), key).await;
        assert_eq!(response.status, 503, "call {i}");
        assert_eq!(response.error_type(), "injected_failure");
    }
    assert_eq!(psp::ledger::total_charges(psp.pool()).await.unwrap(), 0);
    psp.finish().await;
}

async fn ledger_rows_eventually(psp: &Psp, order: &str, expected: usize) -> usize {
    // The charge commits before the hold starts; allow the commit a moment.
    let mut rows = 0;
    for _ in 0..40 {
        rows = psp.ledger_rows(order).await;
        if rows == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rows
}

#[tokio::test]
async fn a_lost_response_times_out_yet_money_moved() {
    let psp = Psp::start(PspConfig {
        faults: FaultConfig {
            lost_response_rate: 1.0,
            lost_response_hold: Duration::from_secs(2),
            ..FaultConfig::default()
        },
        ..PspConfig::default()
    })
    .await;
    let client = psp.client(Duration::from_millis(300));
    let order = "order-lost";
    let request = ChargeRequest::new(order, 1500, "EUR");

    let err = client.charge(&request, Some("key-lost")).await.unwrap_err();
    assert!(matches!(err, ChargeError::Timeout), "{err:?}");
    assert!(err.money_may_have_moved());
    assert_eq!(
        ledger_rows_eventually(&psp, order, 1).await,
        1,
        "charged anyway"
    );

    // The safe retry: same key, the stored response is replayed at once.
    let replay = client.charge(&request, Some("key-lost")).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(psp.ledger_rows(order).await, 1);

    // The unsafe retry: no key, so the PSP cannot tell, and charges again.
    let err = client.charge(&request, None).await.unwrap_err();
    assert!(matches!(err, ChargeError::Timeout), "{err:?}");
    assert_eq!(
        ledger_rows_eventually(&psp, order, 2).await,
        2,
        "double charge"
    );

    let started = std::time::Instant::now();
    psp.finish().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown releases held responses instead of waiting them out"
    );
}
