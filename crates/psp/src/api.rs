//! The wire format of `POST /v1/charges`, documented in `book/psp-api.md`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The longest `order_id` the PSP accepts, in characters.
pub const MAX_ORDER_ID_CHARS: usize = 64;
/// The longest `Idempotency-Key` the PSP accepts, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Header carrying the caller's idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";
/// Header set to `true` on a response that is a replay of a stored one.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "Idempotent-Replayed";

/// The body of `POST /v1/charges`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// A misspelt field must fail loudly rather than charge with a default.
#[serde(deny_unknown_fields)]
pub struct ChargeRequest {
    pub order_id: String,
    pub amount_cents: i64,
    /// An active ISO 4217 code ([`payments::currency::ISO_4217`]).
    pub currency: String,
}

impl ChargeRequest {
    pub fn new(
        order_id: impl Into<String>,
        amount_cents: i64,
        currency: impl Into<String>,
    ) -> Self {
        Self {
            order_id: order_id.into(),
            amount_cents,
            currency: currency.into(),
        }
    }

    /// The checks behind a 400: the message names the field that failed.
    pub fn validate(&self) -> Result<(), String> {
        let order_chars = self.order_id.chars().count();
        if order_chars == 0 || order_chars > MAX_ORDER_ID_CHARS {
            return Err(format!(
                "order_id must be 1 to {MAX_ORDER_ID_CHARS} characters, got {order_chars}"
            ));
        }
        if self.order_id.chars().any(char::is_control) {
            return Err("order_id must not contain control characters".to_owned());
        }
        if self.amount_cents <= 0 {
            return Err(format!(
                "amount_cents must be a positive integer, got {}",
                self.amount_cents
            ));
        }
        // The same list the shop's consumer decodes with: a real PSP knows
        // which currencies exist, and `QQQ` is not one of them.
        payments::currency::check(&self.currency).map_err(|error| error.to_string())
    }
}

/// Checks an `Idempotency-Key` value: 1 to 255 printable ASCII characters.
pub fn validate_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters, got {}",
            key.len()
        ));
    }
    if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err("Idempotency-Key must be printable ASCII".to_owned());
    }
    Ok(())
}

/// The charge object of a 201 response: what the PSP told the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// `ch_` followed by a UUID without dashes.
    pub id: String,
    pub order_id: String,
    pub amount_cents: i64,
    pub currency: String,
    /// Always `succeeded`: the PSP only answers 201 once money moved.
    pub status: String,
    pub created_at: DateTime<Utc>,
    /// Not on the wire: [`crate::PspClient`] sets it from the
    /// `Idempotent-Replayed` header, so a caller can tell a replay of an
    /// earlier charge from a charge made by this call.
    #[serde(skip)]
    pub replayed: bool,
}

/// The body of every error response: `{"error": {"type": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_request`, `unauthorized`,
    /// `idempotency_key_in_use`, `idempotency_key_reused`, `injected_failure`,
    /// `not_found`, `internal_error`.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

/// The body of `GET /v1/charges?order_id=...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeList {
    pub data: Vec<crate::LedgerEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_request_passes() {
        assert!(ChargeRequest::new("order-1", 1999, "EUR")
            .validate()
            .is_ok());
    }

    #[test]
    fn each_field_is_checked() {
        assert!(ChargeRequest::new("", 1, "EUR").validate().is_err());
        assert!(ChargeRequest::new("x".repeat(65), 1, "EUR")
            .validate()
            .is_err());
        assert!(ChargeRequest::new("x".repeat(64), 1, "EUR")
            .validate()
            .is_ok());
        assert!(ChargeRequest::new("o", 0, "EUR").validate().is_err());
        assert!(ChargeRequest::new("o", -5, "EUR").validate().is_err());
        assert!(ChargeRequest::new("o", 1, "eur").validate().is_err());
        assert!(ChargeRequest::new("o", 1, "EURO").validate().is_err());
        assert!(ChargeRequest::new("o", 1, "ÉUR").validate().is_err());
    }

    #[test]
    fn currencies_must_exist() {
        let refused = ChargeRequest::new("o", 1, "QQQ").validate().unwrap_err();
        assert_eq!(refused, "unknown currency QQQ (not an ISO 4217 code)");
        assert!(ChargeRequest::new("o", 1, "JPY").validate().is_ok());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let body = r#"{"order_id":"o","amount_cents":1,"currency":"EUR","amount":5}"#;
        assert!(serde_json::from_str::<ChargeRequest>(body).is_err());
    }

    #[test]
    fn idempotency_keys_are_printable_ascii_up_to_255() {
        assert!(validate_idempotency_key("order-1/charge").is_ok());
        assert!(validate_idempotency_key(&"k".repeat(255)).is_ok());
        assert!(validate_idempotency_key(&"k".repeat(256)).is_err());
        assert!(validate_idempotency_key("").is_err());
        assert!(validate_idempotency_key("tab\there").is_err());
        assert!(validate_idempotency_key("clé").is_err());
    }

    #[test]
    fn replayed_never_reaches_the_wire() {
        let charge = Charge {
            id: "ch_1".into(),
            order_id: "o".into(),
            amount_cents: 1,
            currency: "EUR".into(),
            status: "succeeded".into(),
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            replayed: true,
        };
        let json = serde_json::to_value(&charge).unwrap();
        assert!(json.get("replayed").is_none());
    }
}
