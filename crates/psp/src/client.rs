//! A typed client for the PSP. Its errors are sorted by what the caller may do
//! next, because that is the whole question after a failed charge: retry,
//! never retry, or assume money may have moved.

use std::time::Duration;

use reqwest::StatusCode;

use crate::api::{self, Charge, ChargeList, ChargeRequest, ErrorBody};
use crate::ledger::LedgerEntry;

/// Why a charge call did not return a charge.
#[derive(Debug, thiserror::Error)]
pub enum ChargeError {
    /// 409: a request with the same key is still running. Nothing new was
    /// charged by this call; retry later with the same key.
    #[error("409: a request with this Idempotency-Key is still in flight; retry later")]
    InFlight,
    /// 422: the key was first used with other parameters. A bug in the caller:
    /// retrying can never succeed, so treat the message as poison.
    #[error("422: this Idempotency-Key was used with different parameters")]
    KeyReused,
    /// 401: wrong or missing API key. Retrying will not help.
    #[error("401: the PSP rejected the API key")]
    Unauthorized,
    /// Any other 4xx: the request itself is wrong. Nothing was charged.
    #[error("{status}: the PSP rejected the request: {message}")]
    Rejected { status: u16, message: String },
    /// 5xx: the PSP failed. With an idempotency key a retry is safe; without
    /// one a 500 may hide a charge.
    #[error("{status}: the PSP failed: {message}")]
    ServerError { status: u16, message: String },
    /// The call timed out: the outcome is unknown and money may have moved.
    /// Only a retry with the same key finds out without charging twice.
    #[error("the PSP did not answer in time: the charge may or may not have happened")]
    Timeout,
    /// The connection failed. If it failed before the request was sent nothing
    /// happened; otherwise, as with a timeout, money may have moved.
    #[error("cannot talk to the PSP: {0}")]
    Transport(#[source] reqwest::Error),
    /// A status or body this client does not understand, such as a 201 whose
    /// body is not a charge: money may have moved.
    #[error("unexpected answer from the PSP ({status}): {message}")]
    UnexpectedResponse { status: u16, message: String },
}

impl ChargeError {
    /// True when the same call may be retried (with the same idempotency key).
    pub fn is_retryable(&self) -> bool {
        match self {
            ChargeError::InFlight
            | ChargeError::ServerError { .. }
            | ChargeError::Timeout
            | ChargeError::Transport(_)
            | ChargeError::UnexpectedResponse { .. } => true,
            ChargeError::KeyReused | ChargeError::Unauthorized | ChargeError::Rejected { .. } => {
                false
            }
        }
    }

    /// True when the PSP may have charged although this call reports failure:
    /// the case that double-charges a caller that retries without a key.
    pub fn money_may_have_moved(&self) -> bool {
        match self {
            ChargeError::Timeout | ChargeError::UnexpectedResponse { .. } => true,
            // A 500 from a database failure mid-commit cannot rule it out.
            ChargeError::ServerError { status, .. } => *status != 503,
            ChargeError::Transport(e) => !(e.is_connect() || e.is_builder()),
            ChargeError::InFlight
            | ChargeError::KeyReused
            | ChargeError::Unauthorized
            | ChargeError::Rejected { .. } => false,
        }
    }
}

/// Talks to one PSP with one API key.
#[derive(Debug, Clone)]
pub struct PspClient {
    http: reqwest::Client,
    base_url: String,
    api_key: String,
}

impl PspClient {
    /// `timeout` bounds each whole call, response body included: when it fires
    /// the call fails with [`ChargeError::Timeout`].
    pub fn new(
        base_url: impl Into<String>,
        api_key: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Self {
            http,
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            api_key: api_key.into(),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `POST /v1/charges`, with `Idempotency-Key: <key>` when `idempotency_key`
    /// is given. [`Charge::replayed`] tells a replay of an earlier charge from a
    /// charge made by this call.
    pub async fn charge(
        &self,
        request: &ChargeRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Charge, ChargeError> {
        let mut call = self
            .http
            .post(format!("{}/v1/charges", self.base_url))
            .bearer_auth(&self.api_key)
            .json(request);
        if let Some(key) = idempotency_key {
            call = call.header(api::IDEMPOTENCY_KEY_HEADER, key);
        }
        let response = call.send().await.map_err(transport)?;
        let status = response.status();
        let replayed = response
            .headers()
            .get(api::IDEMPOTENT_REPLAYED_HEADER)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.eq_ignore_ascii_case("true"));
        let body = response.bytes().await.map_err(transport)?;
        if status.is_success() {
            let mut charge: Charge =
                serde_json::from_slice(&body).map_err(|e| ChargeError::UnexpectedResponse {
                    status: status.as_u16(),
                    message: format!("the body is not a charge: {e}"),
                })?;
            charge.replayed = replayed;
            return Ok(charge);
        }
        Err(status_error(status, &body))
    }

    /// `GET /v1/charges?order_id=...`: the ledger's rows for one order.
    pub async fn list_charges(&self, order_id: &str) -> Result<Vec<LedgerEntry>, ChargeError> {
        let response = self
            .http
            .get(format!("{}/v1/charges", self.base_url))
            .bearer_auth(&self.api_key)
            .query(&[("order_id", order_id)])
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        if status.is_success() {
            let list: ChargeList =
                serde_json::from_slice(&body).map_err(|e| ChargeError::UnexpectedResponse {
                    status: status.as_u16(),
                    message: format!("the body is not a charge list: {e}"),
                })?;
            return Ok(list.data);
        }
        Err(status_error(status, &body))
    }

    /// `GET /healthz`: Ok once the PSP answers and reaches its database.
    pub async fn health(&self) -> Result<(), ChargeError> {
        let response = self
            .http
            .get(format!("{}/healthz", self.base_url))
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.bytes().await.map_err(transport)?;
        Err(status_error(status, &body))
    }
}

fn transport(e: reqwest::Error) -> ChargeError {
    if e.is_timeout() {
        ChargeError::Timeout
    } else {
        ChargeError::Transport(e)
    }
}

fn status_error(status: StatusCode, body: &[u8]) -> ChargeError {
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => parsed.error.message,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let code = status.as_u16();
    match code {
        401 => ChargeError::Unauthorized,
        409 => ChargeError::InFlight,
        422 => ChargeError::KeyReused,
        400..=499 => ChargeError::Rejected {
            status: code,
            message,
        },
        500..=599 => ChargeError::ServerError {
            status: code,
            message,
        },
        _ => ChargeError::UnexpectedResponse {
            status: code,
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_body(kind: &str) -> Vec<u8> {
        format!(r#"{{"error":{{"type":"{kind}","message":"m"}}}}"#).into_bytes()
    }

    #[test]
    fn statuses_map_to_what_the_caller_can_do() {
        let e = status_error(StatusCode::CONFLICT, &error_body("idempotency_key_in_use"));
        assert!(matches!(e, ChargeError::InFlight));
        assert!(e.is_retryable() && !e.money_may_have_moved());

        let e = status_error(StatusCode::UNPROCESSABLE_ENTITY, &error_body("x"));
        assert!(matches!(e, ChargeError::KeyReused));
        assert!(!e.is_retryable());

        let e = status_error(StatusCode::BAD_REQUEST, &error_body("invalid_request"));
        assert!(matches!(e, ChargeError::Rejected { status: 400, ref message } if message == "m"));

        let e = status_error(StatusCode::SERVICE_UNAVAILABLE, b"not json");
        assert!(
            matches!(e, ChargeError::ServerError { status: 503, ref message } if message == "not json")
        );
        assert!(e.is_retryable() && !e.money_may_have_moved());

        assert!(matches!(
            status_error(StatusCode::UNAUTHORIZED, b""),
            ChargeError::Unauthorized
        ));
        assert!(ChargeError::Timeout.money_may_have_moved());
    }
}
