//! The HTTP server: `POST /v1/charges`, `GET /v1/charges`, `GET /healthz`.
//!
//! The wire contract lives in `book/psp-api.md`; this module is its
//! implementation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, ChargeList, ChargeRequest, ErrorBody, ErrorDetail};
use crate::client::PspClient;
use crate::faults::{Fault, FaultConfig, FaultDecision, FaultPlan};
use crate::idempotency::{self, Claim, ClaimHandle, KeyPolicy};
use crate::ledger::{self, LedgerEntry};

/// The API key of the book's examples; not a secret.
pub const DEFAULT_API_KEY: &str = "sk_test_effectively_once";
/// Stripe keeps keys for 24 hours.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);
/// Far longer than any charge takes, so only a dead request's claim expires.
pub const DEFAULT_IN_FLIGHT_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything the PSP can be told, from the environment or in code.
#[derive(Debug, Clone, PartialEq)]
pub struct PspConfig {
    /// The only key accepted in `Authorization: Bearer <key>`.
    pub api_key: String,
    pub idempotency_window: Duration,
    pub in_flight_timeout: Duration,
    pub faults: FaultConfig,
}

impl Default for PspConfig {
    fn default() -> Self {
        Self {
            api_key: DEFAULT_API_KEY.to_owned(),
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
            in_flight_timeout: DEFAULT_IN_FLIGHT_TIMEOUT,
            faults: FaultConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{var}={value:?} is not valid: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl PspConfig {
    /// Reads `PSP_API_KEY`, `PSP_IDEMPOTENCY_WINDOW_SECS`,
    /// `PSP_IN_FLIGHT_TIMEOUT_SECS`, `PSP_LATENCY_MS`, `PSP_ERROR_RATE`,
    /// `PSP_LOST_RESPONSE_RATE`, `PSP_LOST_RESPONSE_HOLD_MS` and
    /// `PSP_FAULT_SEED`; each one unset keeps its default.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// [`PspConfig::from_env`] over any source of variables, for tests.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let secs = |var: &'static str, default: Duration| {
            parse(&lookup, var, |v: u64| Ok(Duration::from_secs(v)), default)
        };
        let millis = |var: &'static str, default: Duration| {
            parse(&lookup, var, |v: u64| Ok(Duration::from_millis(v)), default)
        };
        let rate = |var: &'static str| {
            parse(
                &lookup,
                var,
                |v: f64| {
                    if (0.0..=1.0).contains(&v) {
                        Ok(v)
                    } else {
                        Err("a rate must lie between 0 and 1")
                    }
                },
                0.0,
            )
        };
        let api_key = lookup("PSP_API_KEY").unwrap_or(defaults.api_key);
        if api_key.is_empty() {
            return Err(ConfigError {
                var: "PSP_API_KEY",
                value: api_key,
                reason: "the API key must not be empty",
            });
        }
        Ok(Self {
            api_key,
            idempotency_window: secs("PSP_IDEMPOTENCY_WINDOW_SECS", defaults.idempotency_window)?,
            in_flight_timeout: secs("PSP_IN_FLIGHT_TIMEOUT_SECS", defaults.in_flight_timeout)?,
            faults: FaultConfig {
                latency: millis("PSP_LATENCY_MS", defaults.faults.latency)?,
                error_rate: rate("PSP_ERROR_RATE")?,
                lost_response_rate: rate("PSP_LOST_RESPONSE_RATE")?,
                seed: parse(
                    &lookup,
                    "PSP_FAULT_SEED",
                    |v: u64| Ok(v),
                    defaults.faults.seed,
                )?,
                lost_response_hold: millis(
                    "PSP_LOST_RESPONSE_HOLD_MS",
                    defaults.faults.lost_response_hold,
                )?,
                slow_rate: rate("PSP_SLOW_RATE")?,
                slow_latency: millis("PSP_SLOW_LATENCY_MS", defaults.faults.slow_latency)?,
                slow_orders: Default::default(),
            },
        })
    }

    fn key_policy(&self) -> KeyPolicy {
        KeyPolicy {
            window: self.idempotency_window,
            in_flight_timeout: self.in_flight_timeout,
        }
    }
}

fn parse<T: std::str::FromStr, U>(
    lookup: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    check: impl Fn(T) -> Result<U, &'static str>,
    default: U,
) -> Result<U, ConfigError> {
    let Some(value) = lookup(var) else {
        return Ok(default);
    };
    let parsed = value.trim().parse::<T>().map_err(|_| ConfigError {
        var,
        value: value.clone(),
        reason: "not a number of the expected kind",
    })?;
    check(parsed).map_err(|reason| ConfigError { var, value, reason })
}

#[derive(Debug, thiserror::Error)]
pub enum PspError {
    #[error("cannot apply the PSP schema: {0}")]
    Schema(#[source] sqlx::migrate::MigrateError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the PSP server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("the PSP server task ended abnormally: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct PspState {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    config: PspConfig,
    faults: FaultPlan,
    /// Set to true on shutdown: wakes responses held by the lost-response fault
    /// so shutting down does not wait out the hold.
    shutdown: watch::Sender<bool>,
}

impl PspState {
    pub fn new(pool: PgPool, config: PspConfig) -> Self {
        let faults = FaultPlan::new(config.faults.clone());
        Self {
            inner: Arc::new(Inner {
                pool,
                config,
                faults,
                shutdown: watch::Sender::new(false),
            }),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub fn config(&self) -> &PspConfig {
        &self.inner.config
    }

    fn begin_shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

/// The PSP's routes over `state`; [`PspServer::start`] serves them.
pub fn router(state: PspState) -> Router {
    Router::new()
        .route("/v1/charges", post(create_charge).get(list_charges))
        .route("/healthz", get(healthz))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(state)
}

/// Starts PSP servers. The server itself lives in [`RunningPsp`].
#[derive(Debug, Clone, Copy)]
pub struct PspServer;

impl PspServer {
    /// Applies the schema, binds `addr` (`127.0.0.1:0` picks a free port) and
    /// serves until [`RunningPsp::shutdown`] or drop.
    pub async fn start(
        pool: PgPool,
        config: PspConfig,
        addr: impl ToSocketAddrs + std::fmt::Debug,
    ) -> Result<RunningPsp, PspError> {
        crate::migrate(&pool).await.map_err(PspError::Schema)?;
        let shown = format!("{addr:?}");
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| PspError::Bind {
                addr: shown.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| PspError::Bind {
            addr: shown,
            source,
        })?;
        let state = PspState::new(pool, config);
        let mut stop = state.inner.shutdown.subscribe();
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|stopping| *stopping).await;
                })
                .await
        });
        Ok(RunningPsp {
            addr,
            state,
            task: Some(task),
        })
    }
}

/// A PSP serving on a loopback port.
pub struct RunningPsp {
    addr: SocketAddr,
    state: PspState,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// Connections still open after this long are cut on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl RunningPsp {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The PSP's database, for the audit.
    pub fn pool(&self) -> &PgPool {
        self.state.pool()
    }

    pub fn config(&self) -> &PspConfig {
        self.state.config()
    }

    /// A client for this server with its API key.
    pub fn client(&self, timeout: Duration) -> Result<PspClient, reqwest::Error> {
        PspClient::new(self.base_url(), self.config().api_key.clone(), timeout)
    }

    /// Stops accepting requests, lets running ones finish (held lost responses
    /// are released at once), and waits up to 5 s before cutting the rest.
    pub async fn shutdown(mut self) -> Result<(), PspError> {
        self.state.begin_shutdown();
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(Ok(served)) => served.map_err(PspError::Serve),
            Ok(Err(join)) => Err(PspError::Task(join)),
            Err(_) => {
                tracing::warn!(addr = %self.addr, "PSP connections still open after the grace period: cutting them");
                task.abort();
                Ok(())
            }
        }
    }
}

impl Drop for RunningPsp {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            self.state.begin_shutdown();
            task.abort();
        }
    }
}

impl std::fmt::Debug for RunningPsp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningPsp")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// Handlers

async fn create_charge(State(state): State<PspState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(message) = authorize(&state.inner.config.api_key, &headers) {
        return unauthorized(message);
    }
    let key = match idempotency_key(&headers) {
        Ok(key) => key,
        Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_request", &message),
    };
    let request: ChargeRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("the body is not a valid charge request: {e}"),
            )
        }
    };
    if let Err(message) = request.validate() {
        return error(StatusCode::BAD_REQUEST, "invalid_request", &message);
    }
    // Counted here, once per valid request, so the schedule depends only on
    // the sequence of requests each order receives.
    let decision = state.inner.faults.next(&request.order_id);

    // Detached from the connection: a client that hangs up (its timeout fired)
    // must not cancel a charge halfway, or it would leave a claim stuck in
    // flight. A real PSP finishes the work whether or not anyone listens.
    let task = tokio::spawn(execute(state, request, key, decision));
    match task.await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "charge task failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the charge task failed",
            )
        }
    }
}

async fn execute(
    state: PspState,
    request: ChargeRequest,
    key: Option<String>,
    decision: FaultDecision,
) -> Response {
    let inner = &state.inner;
    let claim = match &key {
        None => None,
        Some(key) => {
            let fingerprint = idempotency::fingerprint(&request);
            let claimed = idempotency::claim(
                &inner.pool,
                &inner.config.api_key,
                key,
                &fingerprint,
                inner.config.key_policy(),
            )
            .await;
            match claimed {
                Ok(Claim::Claimed(handle)) => Some(handle),
                Ok(Claim::Replay { status, body }) => {
                    tracing::debug!(order_id = %request.order_id, key, "replaying stored response");
                    return replay(status, body);
                }
                Ok(Claim::InFlight) => {
                    return error(
                        StatusCode::CONFLICT,
                        "idempotency_key_in_use",
                        "a request with this Idempotency-Key is still being processed; retry later",
                    )
                }
                Ok(Claim::Reused) => {
                    return error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency_key_reused",
                        "this Idempotency-Key was used with different parameters",
                    )
                }
                Err(e) => return internal(&e),
            }
        }
    };

    let faults = inner.faults.config();
    if !decision.latency.is_zero() {
        // The key stays claimed while we sleep: a retry now sees 409.
        tokio::time::sleep(decision.latency).await;
    }
    if decision.fault == Fault::Error {
        tracing::debug!(order_id = %request.order_id, n = decision.n, "injecting a failure");
        if let Some(claim) = &claim {
            release(&state, claim).await;
        }
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "injected_failure",
            "injected failure: nothing was charged; retry",
        );
    }

    let charged = match &claim {
        Some(claim) => {
            idempotency::charge_and_complete(&inner.pool, claim, &request, charge_response).await
        }
        None => ledger::insert_charge(&inner.pool, &request, None)
            .await
            .map(|entry| {
                let (status, body) = charge_response(&entry);
                Some((entry, status, body))
            }),
    };
    let (entry, status, body) = match charged {
        Ok(Some(done)) => done,
        Ok(None) => return error(
            StatusCode::CONFLICT,
            "idempotency_key_in_use",
            "this request's claim on the Idempotency-Key was taken over by a retry; retry later",
        ),
        Err(e) => {
            if let Some(claim) = &claim {
                release(&state, claim).await;
            }
            return internal(&e);
        }
    };
    tracing::debug!(charge = %entry.id, order_id = %entry.order_id, key = ?key, "charged");

    if decision.fault == Fault::LostResponse {
        // The money moved and the response is stored; now make sure the caller
        // never hears about it in time.
        tracing::debug!(charge = %entry.id, n = decision.n, "holding the response (lost-response fault)");
        let mut stop = inner.shutdown.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(faults.lost_response_hold) => {}
            _ = stop.wait_for(|stopping| *stopping) => {}
        }
    }
    json_response(status, body, false)
}

async fn release(state: &PspState, claim: &ClaimHandle) {
    if let Err(e) = idempotency::release(&state.inner.pool, claim).await {
        // The claim then expires after the in-flight timeout instead.
        tracing::warn!(error = %e, key = %claim.key, "could not release an idempotency claim");
    }
}

/// The 201 every caller with this key will see, first time or replayed.
fn charge_response(entry: &LedgerEntry) -> (u16, String) {
    let charge = api::Charge {
        id: entry.id.clone(),
        order_id: entry.order_id.clone(),
        amount_cents: entry.amount_cents,
        currency: entry.currency.clone(),
        status: "succeeded".to_owned(),
        created_at: entry.created_at,
        replayed: false,
    };
    let body = serde_json::to_string(&charge).unwrap_or_else(|_| "{}".to_owned());
    (StatusCode::CREATED.as_u16(), body)
}

fn replay(status: u16, body: String) -> Response {
    json_response(status, body, true)
}

fn json_response(status: u16, body: String, replayed: bool) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if replayed {
        headers.insert(
            api::IDEMPOTENT_REPLAYED_HEADER,
            HeaderValue::from_static("true"),
        );
    }
    response
}

async fn list_charges(
    State(state): State<PspState>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    if let Err(message) = authorize(&state.inner.config.api_key, &headers) {
        return unauthorized(message);
    }
    let order_id = match query {
        Ok(Query(params)) => params.get("order_id").cloned(),
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e.body_text()),
    };
    let Some(order_id) = order_id.filter(|o| !o.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the order_id query parameter is required",
        );
    };
    match ledger::charges_for_order(&state.inner.pool, &order_id).await {
        Ok(data) => (StatusCode::OK, axum::Json(ChargeList { data })).into_response(),
        Err(e) => internal(&e),
    }
}

async fn healthz(State(state): State<PspState>) -> Response {
    match sqlx::query("SELECT 1").execute(&state.inner.pool).await {
        Ok(_) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok"})),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check: database unreachable");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the PSP cannot reach its database",
            )
        }
    }
}

// ---------------------------------------------------------------------------
// Request checks and error bodies

/// Checks `Authorization: Bearer <api key>`; the error is the 401's message.
fn authorize(api_key: &str, headers: &HeaderMap) -> Result<(), &'static str> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match presented {
        Some(token) if same_secret(token, api_key) => Ok(()),
        Some(_) => Err("invalid API key"),
        None => Err("missing API key: send the header `Authorization: Bearer <api key>`"),
    }
}

/// Compares digests, not the keys, so the time taken says nothing about how
/// many leading characters of a guess were right.
fn same_secret(presented: &str, expected: &str) -> bool {
    Sha256::digest(presented.as_bytes()) == Sha256::digest(expected.as_bytes())
}

fn unauthorized(message: &str) -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, String> {
    let mut values = headers.get_all(api::IDEMPOTENCY_KEY_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("send at most one Idempotency-Key header".to_owned());
    }
    let key = value
        .to_str()
        .map_err(|_| "Idempotency-Key must be printable ASCII".to_owned())?;
    api::validate_idempotency_key(key)?;
    Ok(Some(key.to_owned()))
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            kind: kind.to_owned(),
            message: message.to_owned(),
        },
    };
    (status, axum::Json(body)).into_response()
}

fn internal(e: &sqlx::Error) -> Response {
    tracing::error!(error = %e, "database error");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the PSP's database failed; whether a charge happened is unknown: retry with the same Idempotency-Key",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |var| map.get(var).cloned()
    }

    #[test]
    fn empty_environment_gives_the_defaults() {
        assert_eq!(
            PspConfig::from_lookup(env(&[])).unwrap(),
            PspConfig::default()
        );
    }

    #[test]
    fn every_knob_is_read() {
        let config = PspConfig::from_lookup(env(&[
            ("PSP_API_KEY", "sk_other"),
            ("PSP_IDEMPOTENCY_WINDOW_SECS", "5"),
            ("PSP_IN_FLIGHT_TIMEOUT_SECS", "7"),
            ("PSP_LATENCY_MS", "250"),
            ("PSP_ERROR_RATE", "0.1"),
            ("PSP_LOST_RESPONSE_RATE", "0.2"),
            ("PSP_LOST_RESPONSE_HOLD_MS", "1500"),
            ("PSP_FAULT_SEED", "99"),
        ]))
        .unwrap();
        assert_eq!(config.api_key, "sk_other");
        assert_eq!(config.idempotency_window, Duration::from_secs(5));
        assert_eq!(config.in_flight_timeout, Duration::from_secs(7));
        assert_eq!(config.faults.latency, Duration::from_millis(250));
        assert_eq!(config.faults.error_rate, 0.1);
        assert_eq!(config.faults.lost_response_rate, 0.2);
        assert_eq!(
            config.faults.lost_response_hold,
            Duration::from_millis(1500)
        );
        assert_eq!(config.faults.seed, 99);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = PspConfig::from_lookup(env(&[("PSP_ERROR_RATE", "1.5")])).unwrap_err();
        assert_eq!(err.var, "PSP_ERROR_RATE");
        let err = PspConfig::from_lookup(env(&[("PSP_LATENCY_MS", "fast")])).unwrap_err();
        assert_eq!(err.var, "PSP_LATENCY_MS");
    }

    fn auth(value: Option<&'static str>) -> Option<&'static str> {
        let mut headers = HeaderMap::new();
        if let Some(value) = value {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
        }
        authorize("sk_test", &headers).err()
    }

    #[test]
    fn only_the_configured_bearer_key_passes() {
        assert_eq!(auth(Some("Bearer sk_test")), None);
        assert_eq!(auth(Some("bearer sk_test")), None);
        assert_eq!(auth(Some("Bearer sk_tesT")), Some("invalid API key"));
        let missing = Some("missing API key: send the header `Authorization: Bearer <api key>`");
        assert_eq!(auth(Some("Basic sk_test")), missing);
        assert_eq!(auth(Some("sk_test")), missing);
        assert_eq!(auth(None), missing);
    }
}
