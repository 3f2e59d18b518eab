//! `Idempotency-Key` as Stripe and the IETF draft
//! (draft-ietf-httpapi-idempotency-key-header) define it.
//!
//! | the key's row                                   | outcome                         |
//! |-------------------------------------------------|---------------------------------|
//! | none, or older than the window                  | claimed: this request charges   |
//! | in flight, claim younger than the timeout       | 409: retry later                |
//! | other parameters (fingerprint differs)          | 422: a client bug, never retry  |
//! | completed                                       | the stored response, replayed   |
//! | in flight, claim older than the timeout         | claimed: the first holder died  |
//!
//! The claim commits on its own, in a short transaction, so concurrent retries
//! see it at once. The charge and the stored response commit together in one
//! transaction ([`charge_and_complete`]): a crash leaves either both or neither,
//! never money moved without a response to replay. That is also what makes it
//! safe to take over a claim whose holder died. A holder that was only slow is
//! fenced by its claim token: its commit finds the token changed and rolls
//! back, so it cannot charge a second time.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::api::ChargeRequest;
use crate::ledger::{self, LedgerEntry};

/// How long keys live and when a claim counts as abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPolicy {
    /// A key older than this is forgotten: the next request with it charges.
    pub window: Duration,
    /// A claim older than this belongs to a request that died mid-flight.
    pub in_flight_timeout: Duration,
}

/// What a request with an idempotency key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request owns the key: charge with [`charge_and_complete`], or give
    /// the key back with [`release`].
    Claimed(ClaimHandle),
    /// An earlier request with this key completed: answer with its response.
    Replay { status: u16, body: String },
    /// An earlier request with this key is still running.
    InFlight,
    /// The key was first used with other parameters.
    Reused,
}

/// Proof of a claim: the token is what fences a holder whose claim was taken
/// over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimHandle {
    pub api_key: String,
    pub key: String,
    pub token: Uuid,
}

/// sha256 over the parameters that decide what a charge does, so "same key,
/// other parameters" can be told from a retry.
pub fn fingerprint(request: &ChargeRequest) -> String {
    let mut hasher = Sha256::new();
    // Length-prefixed fields: ("ab", "c") and ("a", "bc") must differ.
    for field in [
        request.order_id.as_bytes(),
        request.amount_cents.to_string().as_bytes(),
        request.currency.as_bytes(),
    ] {
        hasher.update((field.len() as u64).to_le_bytes());
        hasher.update(field);
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A takeover races other retries; after this many lost races the caller is
/// told 409, which it treats as "retry later" anyway.
const CLAIM_ATTEMPTS: usize = 5;

/// Claims `key` for a request with `fingerprint`, or says why not.
pub async fn claim(
    pool: &PgPool,
    api_key: &str,
    key: &str,
    fingerprint: &str,
    policy: KeyPolicy,
) -> Result<Claim, sqlx::Error> {
    for _ in 0..CLAIM_ATTEMPTS {
        let token = Uuid::new_v4();
        // Autocommit: the claim is visible to every retry the moment it exists.
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys \
                 (api_key, key, fingerprint, state, created_at, locked_at, claim_token) \
             VALUES ($1, $2, $3, 'in_flight', now(), now(), $4) \
             ON CONFLICT (api_key, key) DO NOTHING",
        )
        .bind(api_key)
        .bind(key)
        .bind(fingerprint)
        .bind(token)
        .execute(pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(Claim::Claimed(handle(api_key, key, token)));
        }

        // The clock is the database's, as for created_at and locked_at.
        let row = sqlx::query(
            "SELECT fingerprint, state, response_status, response_body, claim_token, \
                    created_at < now() - make_interval(secs => $3) AS expired, \
                    locked_at IS NOT NULL \
                        AND locked_at < now() - make_interval(secs => $4) AS lock_stale \
             FROM idempotency_keys WHERE api_key = $1 AND key = $2",
        )
        .bind(api_key)
        .bind(key)
        .bind(policy.window.as_secs_f64())
        .bind(policy.in_flight_timeout.as_secs_f64())
        .fetch_optional(pool)
        .await?;
        let Some(row) = row else {
            // Released between our INSERT and SELECT: try to claim again.
            continue;
        };
        let stored_fingerprint: String = row.try_get("fingerprint")?;
        let state: String = row.try_get("state")?;
        let old_token: Uuid = row.try_get("claim_token")?;
        let expired: bool = row.try_get("expired")?;
        let lock_stale: bool = row.try_get("lock_stale")?;
        let same_request = stored_fingerprint == fingerprint;
        let in_flight = state == "in_flight";

        if in_flight && !lock_stale {
            // Someone is working on it right now. Within the window another
            // payload under this key is a client bug whatever the timing.
            return Ok(if !expired && !same_request {
                Claim::Reused
            } else {
                Claim::InFlight
            });
        }
        if expired {
            // Forgotten: a new request under an old key.
            if take_over(pool, api_key, key, fingerprint, old_token, token, true).await? {
                return Ok(Claim::Claimed(handle(api_key, key, token)));
            }
            continue;
        }
        if !same_request {
            return Ok(Claim::Reused);
        }
        if !in_flight {
            let status: i32 = row.try_get("response_status")?;
            let body: String = row.try_get("response_body")?;
            return Ok(Claim::Replay {
                status: u16::try_from(status).unwrap_or(500),
                body,
            });
        }
        // In flight for longer than the timeout: the holder died. Taking over is
        // safe because it committed either charge and response, or neither.
        if take_over(pool, api_key, key, fingerprint, old_token, token, false).await? {
            return Ok(Claim::Claimed(handle(api_key, key, token)));
        }
    }
    Ok(Claim::InFlight)
}

fn handle(api_key: &str, key: &str, token: Uuid) -> ClaimHandle {
    ClaimHandle {
        api_key: api_key.to_owned(),
        key: key.to_owned(),
        token,
    }
}

/// Replaces the claim token, but only if nobody else changed the row since we
/// read it (`old_token`): of several racing retries exactly one wins.
async fn take_over(
    pool: &PgPool,
    api_key: &str,
    key: &str,
    fingerprint: &str,
    old_token: Uuid,
    new_token: Uuid,
    restart_window: bool,
) -> Result<bool, sqlx::Error> {
    let sql = if restart_window {
        "UPDATE idempotency_keys \
         SET fingerprint = $3, state = 'in_flight', response_status = NULL, \
             response_body = NULL, created_at = now(), locked_at = now(), claim_token = $5 \
         WHERE api_key = $1 AND key = $2 AND claim_token = $4"
    } else {
        "UPDATE idempotency_keys SET locked_at = now(), claim_token = $5 \
         WHERE api_key = $1 AND key = $2 AND claim_token = $4 \
           AND state = 'in_flight' AND fingerprint = $3"
    };
    let updated = sqlx::query(sql)
        .bind(api_key)
        .bind(key)
        .bind(fingerprint)
        .bind(old_token)
        .bind(new_token)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(updated == 1)
}

/// Moves the money and stores the response in one transaction.
///
/// `respond` turns the ledger row into the response (status, body) that every
/// retry will be replayed. Returns `None`, having charged nothing, when the
/// claim was taken over meanwhile.
pub async fn charge_and_complete(
    pool: &PgPool,
    claim: &ClaimHandle,
    request: &ChargeRequest,
    respond: impl FnOnce(&LedgerEntry) -> (u16, String),
) -> Result<Option<(LedgerEntry, u16, String)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let entry = ledger::insert_charge(&mut *tx, request, Some(&claim.key)).await?;
    let (status, body) = respond(&entry);
    let completed = sqlx::query(
        "UPDATE idempotency_keys \
         SET state = 'completed', response_status = $4, response_body = $5, locked_at = NULL \
         WHERE api_key = $1 AND key = $2 AND claim_token = $3 AND state = 'in_flight'",
    )
    .bind(&claim.api_key)
    .bind(&claim.key)
    .bind(claim.token)
    .bind(i32::from(status))
    .bind(&body)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if completed == 0 {
        // Fenced: a retry took the claim over. Rolling back un-moves the money.
        tx.rollback().await?;
        return Ok(None);
    }
    tx.commit().await?;
    Ok(Some((entry, status, body)))
}

/// Gives the key back after a failure that charged nothing (an injected error,
/// a database error), so that a retry executes instead of seeing 409.
///
/// Only an in-flight claim with our token is removed: if our commit did land
/// after all, the stored response survives and retries replay it.
pub async fn release(pool: &PgPool, claim: &ClaimHandle) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM idempotency_keys \
         WHERE api_key = $1 AND key = $2 AND claim_token = $3 AND state = 'in_flight'",
    )
    .bind(&claim.api_key)
    .bind(&claim.key)
    .bind(claim.token)
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_covers_every_parameter() {
        let base = fingerprint(&ChargeRequest::new("o-1", 100, "EUR"));
        assert_eq!(base, fingerprint(&ChargeRequest::new("o-1", 100, "EUR")));
        assert_ne!(base, fingerprint(&ChargeRequest::new("o-2", 100, "EUR")));
        assert_ne!(base, fingerprint(&ChargeRequest::new("o-1", 101, "EUR")));
        assert_ne!(base, fingerprint(&ChargeRequest::new("o-1", 100, "USD")));
        assert_eq!(base.len(), 64);
    }

    #[test]
    fn fingerprint_fields_cannot_bleed_into_each_other() {
        assert_ne!(
            fingerprint(&ChargeRequest::new("o1", 23, "EUR")),
            fingerprint(&ChargeRequest::new("o", 123, "EUR"))
        );
    }
}
