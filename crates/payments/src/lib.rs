//! The payment event: what the shop publishes and the consumer charges for.
//!
//! # Layout
//!
//! - [`PaymentEvent`]: the wire format, JSON with exactly five fields.
//! - [`currency`]: the ISO 4217 codes a payment may be in, shared with the
//!   PSP's validation.
//! - [`PaymentEvent::decode`]: strict decoding. A malformed event is a
//!   [`DecodeError`] value that the consumer dead-letters with its reason;
//!   it never panics and never becomes a charge of the wrong amount.
//!
//! ```json
//! {
//!   "event_id": "6f1c2a9e-3b0d-4c55-9a52-1f6d2f7b8c01",
//!   "order_id": "0b8e5d3a-7c41-4e8e-b2f6-5a9d0c3e1f77",
//!   "amount_cents": 4200,
//!   "currency": "EUR",
//!   "created_at": "2026-11-27T10:15:00Z"
//! }
//! ```

pub mod currency;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The largest amount one event may carry: 1,000,000.00 in the currency's
/// minor unit. Anything above is a producer bug, not a payment.
pub const MAX_AMOUNT_CENTS: i64 = 100_000_000;

// ANCHOR: wire_format
/// One payment to make, as it travels through the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentEvent {
    /// Unique per event. Stays the same on every redelivery and republish.
    pub event_id: Uuid,
    /// The shop's order this payment is for.
    pub order_id: Uuid,
    /// Positive, in the currency's minor unit (cents), at most 100,000,000.
    pub amount_cents: i64,
    /// An active ISO 4217 code (see [`currency::ISO_4217`]).
    pub currency: String,
    /// When the shop committed the order, RFC 3339 in UTC.
    pub created_at: DateTime<Utc>,
}
// ANCHOR_END: wire_format

/// Why bytes from the queue are not a payment event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a payment event: {0}")]
    Malformed(String),
    #[error("amount_cents must be between 1 and {MAX_AMOUNT_CENTS}, got {0}")]
    Amount(i64),
    #[error("currency must be three upper-case letters (ISO 4217), got {0:?}")]
    Currency(String),
    #[error("unknown currency {0} (not an ISO 4217 code)")]
    UnknownCurrency(String),
}

impl PaymentEvent {
    /// A new event for `order_id`, with a fresh event id.
    pub fn new(
        order_id: Uuid,
        amount_cents: i64,
        currency: &str,
        created_at: DateTime<Utc>,
    ) -> Self {
        Self {
            event_id: Uuid::new_v4(),
            order_id,
            amount_cents,
            currency: currency.to_owned(),
            created_at,
        }
    }

    /// Parses and validates. Unknown fields, missing fields, wrong types,
    /// non-positive amounts and malformed currencies are all errors.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let event: Self =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        event.validate()?;
        Ok(event)
    }

    pub fn validate(&self) -> Result<(), DecodeError> {
        if !(1..=MAX_AMOUNT_CENTS).contains(&self.amount_cents) {
            return Err(DecodeError::Amount(self.amount_cents));
        }
        match currency::check(&self.currency) {
            Ok(()) => Ok(()),
            Err(currency::CurrencyError::Shape(code)) => Err(DecodeError::Currency(code)),
            Err(currency::CurrencyError::Unknown(code)) => Err(DecodeError::UnknownCurrency(code)),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising a struct of plain fields cannot fail.
        serde_json::to_vec(self).expect("a payment event always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PaymentEvent {
        PaymentEvent {
            event_id: "6f1c2a9e-3b0d-4c55-9a52-1f6d2f7b8c01".parse().unwrap(),
            order_id: "0b8e5d3a-7c41-4e8e-b2f6-5a9d0c3e1f77".parse().unwrap(),
            amount_cents: 4200,
            currency: "EUR".into(),
            created_at: "2026-11-27T10:15:00Z".parse().unwrap(),
        }
    }

    #[test]
    fn round_trips() {
        let event = sample();
        assert_eq!(PaymentEvent::decode(&event.encode()).unwrap(), event);
    }

    #[test]
    fn the_documented_example_decodes() {
        let json = br#"{
          "event_id": "6f1c2a9e-3b0d-4c55-9a52-1f6d2f7b8c01",
          "order_id": "0b8e5d3a-7c41-4e8e-b2f6-5a9d0c3e1f77",
          "amount_cents": 4200,
          "currency": "EUR",
          "created_at": "2026-11-27T10:15:00Z"
        }"#;
        assert_eq!(PaymentEvent::decode(json).unwrap(), sample());
    }

    fn with(field: &str, value: serde_json::Value) -> Vec<u8> {
        let mut json = serde_json::to_value(sample()).unwrap();
        json[field] = value;
        serde_json::to_vec(&json).unwrap()
    }

    #[test]
    fn malformed_input_is_an_error_value() {
        for bad in [
            &b""[..],
            b"not json",
            b"[]",
            b"{}",
            b"{\"event_id\": 1}",
            &[0xff, 0xfe, 0x00],
        ] {
            assert!(matches!(
                PaymentEvent::decode(bad),
                Err(DecodeError::Malformed(_))
            ));
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut json = serde_json::to_value(sample()).unwrap();
        json["amount"] = 1.into();
        let bytes = serde_json::to_vec(&json).unwrap();
        assert!(matches!(
            PaymentEvent::decode(&bytes),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn amounts_must_be_positive_and_bounded() {
        for amount in [0, -1, MAX_AMOUNT_CENTS + 1] {
            assert_eq!(
                PaymentEvent::decode(&with("amount_cents", amount.into())),
                Err(DecodeError::Amount(amount))
            );
        }
        // A float is not a number of cents.
        assert!(PaymentEvent::decode(&with("amount_cents", 42.5.into())).is_err());
    }

    #[test]
    fn currencies_are_three_upper_case_letters() {
        for currency in ["eur", "EURO", "E1R", ""] {
            assert_eq!(
                PaymentEvent::decode(&with("currency", currency.into())),
                Err(DecodeError::Currency(currency.into()))
            );
        }
    }

    #[test]
    fn currencies_must_be_iso_4217_codes() {
        assert_eq!(
            PaymentEvent::decode(&with("currency", "QQQ".into())),
            Err(DecodeError::UnknownCurrency("QQQ".into()))
        );
        assert!(PaymentEvent::decode(&with("currency", "JPY".into())).is_ok());
    }

    #[test]
    fn ids_and_timestamps_are_checked() {
        assert!(PaymentEvent::decode(&with("event_id", "not-a-uuid".into())).is_err());
        assert!(PaymentEvent::decode(&with("created_at", "yesterday".into())).is_err());
    }
}
