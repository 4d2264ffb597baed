//! The admin HTTP API each `ferry consume` instance serves (axum): health and readiness,
//! Prometheus metrics, this instance's partitions with their lag, the tenants an operator must
//! look at and why, recent failures, an event's history of attempts; resume, retry now, skip,
//! pause, replay from a point in time, and the kill switch. Every action is audited (who and
//! why, in `operator_actions`).
//!
//! Every data and action route needs `Authorization: Bearer <admin token>` ([`access`]: the
//! configured token, else one generated at the first start and printed once); every route but
//! the probes (`/health`, `/ready`) needs a `Host` the API answers to. `/ready` says whether, never why (the reason goes
//! to the log). Errors are JSON of
//! one shape, `{"error": {"code": "...", "message": "..."}}`, and bad input gets a 4xx that says
//! what was wrong.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub mod access;
pub mod webhooks;

use crate::consumer::latency::Histogram;
use crate::consumer::ledger;
use crate::consumer::runtime::ConsumeStats;
use crate::exposition::Series;

/// Largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024;

/// What the routes read and change.
#[derive(Clone)]
pub struct Admin {
    /// The database the consumer records into.
    pub pool: PgPool,
    /// The integration the serving consumer runs: what a tenant route acts on unless its
    /// `?integration=` names another (every integration's records share the database).
    pub integration: String,
    /// The consumer's live counters.
    pub stats: Arc<ConsumeStats>,
    /// The bearer token every data and action route needs; `None` (no check) only for an API
    /// embedded in a test: `ferry consume` always has one.
    pub token: Option<access::Token>,
    /// The `Host` values answered ([`access::hosts`]); empty: any.
    pub hosts: Vec<String>,
    /// The terminal policy: where `skip` exports the event it gives up on
    /// (`consume.dead_letter_topic`); `None`, skipped with an audit row.
    pub dead_letters: Option<Arc<crate::dead_letter::DeadLetters>>,
}

/// An error answered as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            format!("postgres: {e}"),
        )
    }
}

impl From<ledger::ActionError> for ApiError {
    fn from(e: ledger::ActionError) -> Self {
        match e {
            ledger::ActionError::UnknownTenant(tenant) => unknown_tenant(&tenant),
            ledger::ActionError::WrongState { code, .. } => {
                ApiError::new(StatusCode::CONFLICT, code, e.to_string())
            }
            ledger::ActionError::Postgres(e) => e.into(),
        }
    }
}

impl From<crate::dead_letter::DeadLetterError> for ApiError {
    fn from(e: crate::dead_letter::DeadLetterError) -> Self {
        match e {
            crate::dead_letter::DeadLetterError::Postgres(e) => e.into(),
            // Nothing was skipped: the event stays parked, the tenant paused.
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "dead_letter_unavailable",
                format!("{other}; nothing was skipped"),
            ),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is larger than {MAX_BODY} bytes"),
            ),
            status => ApiError::new(status, "bad_request", e.body_text()),
        }
    }
}

/// The router.
pub fn router(admin: Admin) -> Router {
    let authed = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/tenants", get(list_tenants))
        .route("/v1/tenants/{tenant}", get(get_tenant))
        .route("/v1/tenants/{tenant}/resume", post(resume))
        .route("/v1/tenants/{tenant}/skip", post(skip))
        .route("/v1/tenants/{tenant}/retry", post(retry))
        .route("/v1/tenants/{tenant}/pause", post(pause))
        .route("/v1/tenants/{tenant}/replay", post(replay))
        .route("/v1/partitions", get(partitions))
        .route("/v1/failures", get(failures))
        .route("/v1/events/{event}", get(event_history))
        .route("/v1/kill-switch", get(get_kill_switch).put(put_kill_switch))
        .route(
            "/v1/webhooks/{tenant}",
            get(webhooks::get_endpoint)
                .put(webhooks::put_endpoint)
                .delete(webhooks::delete_endpoint),
        )
        .route("/v1/webhooks/{tenant}/rotate", post(webhooks::rotate))
        .route_layer(middleware::from_fn_with_state(admin.clone(), authorize));
    let hosted = Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard", get(dashboard))
        .merge(authed)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(middleware::from_fn_with_state(admin.clone(), check_host));
    Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        // Probes reach a pod by its address, whatever `admin.hosts` says; it tells nothing.
        .route("/ready", get(ready))
        .merge(hosted)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(admin)
}

/// `GET /dashboard`: the operator's page. No token: it holds no data, it asks for the token and
/// sends it with every API call.
async fn dashboard() -> Html<&'static str> {
    Html(include_str!("../dashboard.html"))
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    admin: Admin,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(admin))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Refuses a request whose `Host` the API does not answer to (DNS rebinding).
async fn check_host(
    State(admin): State<Admin>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if access::host_allowed(&admin.hosts, host) {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_host",
            "this API does not answer to that Host (admin.hosts)",
        )
        .into_response()
    }
}

async fn authorize(
    State(admin): State<Admin>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = admin.token.as_ref() else {
        return next.run(request).await;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <admin token>",
        )
        .into_response(),
        Some(token) if !expected.accepts(token) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong token").into_response()
        }
        Some(_) => next.run(request).await,
    }
}

/// `?integration=NAME`: which integration's records a tenant or event route reads or changes;
/// the serving consumer's own when absent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// The integration.
    pub integration: Option<String>,
}

impl Admin {
    /// The integration `scope` names, checked, or this consumer's own.
    fn scoped(&self, scope: Result<Query<Scope>, QueryRejection>) -> Result<String, ApiError> {
        let Query(scope) = scope?;
        match scope.integration {
            None => Ok(self.integration.clone()),
            Some(name) => integration_name(name),
        }
    }
}

/// `name`, when it can name an integration.
fn integration_name(name: String) -> Result<String, ApiError> {
    if crate::delivery::is_integration_name(&name) {
        Ok(name)
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("integration {name:?} is not an integration's name (a-z, 0-9, _ and -)"),
        ))
    }
}

/// A tenant as the operator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct TenantView {
    /// The integration whose state this is.
    pub integration: String,
    /// The tenant.
    pub tenant_id: String,
    /// Whether the integration is on.
    pub integration_enabled: bool,
    /// `active`, `paused`, `draining` or `disabled`.
    pub state: String,
    /// `retryable`, `permanent`, `bad_event` or `operator`.
    pub pause_cause: Option<String>,
    /// Why.
    pub pause_reason: Option<String>,
    /// The event that failed.
    pub paused_event_id: Option<uuid::Uuid>,
    /// Since when.
    pub paused_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When it is retried automatically (retryable causes).
    pub next_retry_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Events parked, waiting.
    pub backlog: i64,
    /// Attempts at the failing event.
    pub failed_attempts: Option<i32>,
    /// The partner's answer to it: `{"status": 422, "body": "..."}`.
    pub partner_response: Option<serde_json::Value>,
}

const TENANT_VIEW: &str = "SELECT t.integration, t.tenant_id, t.integration_enabled, t.state, \
        t.pause_cause, t.pause_reason, t.paused_event_id, t.paused_at, t.next_retry_at, \
        (SELECT count(*) FROM parked_events p \
          WHERE p.integration = t.integration AND p.tenant_id = t.tenant_id) AS backlog, \
        d.attempts AS failed_attempts, d.last_response AS partner_response \
     FROM tenants t \
     LEFT JOIN deliveries d ON d.integration = t.integration AND d.event_id = t.paused_event_id";

/// `GET /v1/tenants[?integration=NAME]`: the tenants that are not active (paused, draining,
/// disabled) in every integration, or in the one named; oldest pause first.
async fn list_tenants(
    State(admin): State<Admin>,
    scope: Result<Query<Scope>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(scope) = scope?;
    let only = scope.integration.map(integration_name).transpose()?;
    let tenants: Vec<TenantView> = sqlx::query_as(&format!(
        "{TENANT_VIEW} WHERE t.state <> 'active' AND ($1::text IS NULL OR t.integration = $1) \
         ORDER BY t.paused_at NULLS LAST, t.tenant_id, t.integration LIMIT 1000"
    ))
    .bind(only)
    .fetch_all(&admin.pool)
    .await?;
    Ok(axum::Json(json!({"data": tenants})).into_response())
}

/// `GET /v1/tenants/{tenant}[?integration=NAME]`.
async fn get_tenant(
    State(admin): State<Admin>,
    Path(tenant): Path<String>,
    scope: Result<Query<Scope>, QueryRejection>,
) -> Result<Response, ApiError> {
    let integration = admin.scoped(scope)?;
    let found: Option<TenantView> = sqlx::query_as(&format!(
        "{TENANT_VIEW} WHERE t.integration = $2 AND t.tenant_id = $1"
    ))
    .bind(&tenant)
    .bind(&integration)
    .fetch_optional(&admin.pool)
    .await?;
    match found {
        Some(t) => Ok(axum::Json(t).into_response()),
        None => Err(unknown_tenant(&tenant)),
    }
}

fn unknown_tenant(tenant: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_tenant",
        format!("no tenant {tenant:?} is known to Ferry"),
    )
}

/// Who did it and why: every operator action is audited.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// Who (a person or a tool).
    pub actor: String,
    /// Why.
    pub reason: String,
}

impl Action {
    fn check(&self) -> Result<(), ApiError> {
        audited(&self.actor, &self.reason)
    }
}

/// Refuses an action without who and why: every operator action is audited.
fn audited(actor: &str, reason: &str) -> Result<(), ApiError> {
    if actor.trim().is_empty() || reason.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_actor_or_reason",
            "actor and reason must not be empty: every operator action is audited",
        ));
    }
    Ok(())
}

/// `POST /v1/tenants/{tenant}/resume` `{"actor", "reason"}`: the owning instance replays the
/// backlog in order, then the tenant is live again.
async fn resume(
    State(admin): State<Admin>,
    Path(tenant): Path<String>,
    scope: Result<Query<Scope>, QueryRejection>,
    body: Result<axum::Json<Action>, JsonRejection>,
) -> Result<Response, ApiError> {
    act(&admin, TenantOp::Resume, &tenant, scope, body).await
}

/// An audited action on one tenant's state.
#[derive(Debug, Clone, Copy)]
enum TenantOp {
    Resume,
    Retry,
    Pause,
}

/// Runs `op` on `tenant` in the scoped integration, as asked by `body`.
async fn act(
    admin: &Admin,
    op: TenantOp,
    tenant: &str,
    scope: Result<Query<Scope>, QueryRejection>,
    body: Result<axum::Json<Action>, JsonRejection>,
) -> Result<Response, ApiError> {
    let integration = admin.scoped(scope)?;
    let axum::Json(action) = body?;
    action.check()?;
    let (pool, who, why) = (&admin.pool, action.actor.as_str(), action.reason.as_str());
    let state = match op {
        TenantOp::Resume => {
            ledger::resume(pool, &integration, tenant, who, why).await?;
            "draining"
        }
        TenantOp::Retry => {
            ledger::retry_now(pool, &integration, tenant, who, why).await?;
            "draining"
        }
        TenantOp::Pause => {
            ledger::pause_by_operator(pool, &integration, tenant, who, why).await?;
            "paused"
        }
    };
    Ok(accepted(
        json!({"integration": integration, "tenant_id": tenant, "state": state}),
    ))
}

/// Why an action on a paused tenant did nothing: the tenant is unknown, or in another state.
async fn not_paused(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    what: &'static str,
) -> Result<ApiError, ApiError> {
    let mut conn = pool.acquire().await?;
    Ok(
        ledger::wrong_state(&mut conn, integration, tenant, "not_paused", what)
            .await?
            .into(),
    )
}

/// `POST /v1/tenants/{tenant}/retry` `{"actor", "reason"}`: a paused tenant's backlog is
/// replayed now rather than at its `next_retry_at`.
async fn retry(
    State(admin): State<Admin>,
    Path(tenant): Path<String>,
    scope: Result<Query<Scope>, QueryRejection>,
    body: Result<axum::Json<Action>, JsonRejection>,
) -> Result<Response, ApiError> {
    act(&admin, TenantOp::Retry, &tenant, scope, body).await
}

/// `POST /v1/tenants/{tenant}/pause` `{"actor", "reason"}`: the owning instance stops
/// delivering the tenant within its `kill_switch_interval` (an attempt under way ends first)
/// and parks its events, in order, until it is resumed.
async fn pause(
    State(admin): State<Admin>,
    Path(tenant): Path<String>,
    scope: Result<Query<Scope>, QueryRejection>,
    body: Result<axum::Json<Action>, JsonRejection>,
) -> Result<Response, ApiError> {
    act(&admin, TenantOp::Pause, &tenant, scope, body).await
}

/// A replay, as asked for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// From when: an RFC 3339 time (`2026-12-01T08:00:00Z`).
    pub since: String,
}

/// `POST /v1/tenants/{tenant}/replay` `{"actor", "reason", "since"}`: every event of the
/// tenant written since then is sent again, in order, through the outbox (so it is ordered
/// with live traffic). Answers how many.
async fn replay(
    State(admin): State<Admin>,
    Path(tenant): Path<String>,
    scope: Result<Query<Scope>, QueryRejection>,
    body: Result<axum::Json<Replay>, JsonRejection>,
) -> Result<Response, ApiError> {
    let integration = admin.scoped(scope)?;
    let axum::Json(replay) = body?;
    audited(&replay.actor, &replay.reason)?;
    let since = chrono::DateTime::parse_from_rfc3339(replay.since.trim())
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad_time",
                format!(
                    "since {:?} is not an RFC 3339 time such as 2026-12-01T08:00:00Z: {e}",
                    replay.since
                ),
            )
        })?
        .with_timezone(&chrono::Utc);
    if since > chrono::Utc::now() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_time",
            format!("since {since} is in the future: there is nothing to replay"),
        ));
    }
    let events = ledger::replay_since(
        &admin.pool,
        &integration,
        &tenant,
        since,
        &replay.actor,
        &replay.reason,
    )
    .await?;
    Ok(accepted(
        json!({"integration": integration, "tenant_id": tenant, "events": events, "since": since}),
    ))
}

fn accepted(body: serde_json::Value) -> Response {
    (StatusCode::ACCEPTED, axum::Json(body)).into_response()
}

/// `GET /ready`: 200 when this instance can do its work (its database answers), else 503.
async fn ready(State(admin): State<Admin>) -> Response {
    if admin.stats.recovering.load(Relaxed) == 1 {
        tracing::debug!("not ready: the consumer waits for Postgres to answer");
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "not ready")
            .into_response();
    }
    // A probe answers within its own timeout, not the pool's (10 s while Postgres is down).
    let asked = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        sqlx::query_scalar::<_, bool>("SELECT kill_switch FROM control").fetch_one(&admin.pool),
    )
    .await
    .unwrap_or(Err(sqlx::Error::PoolTimedOut));
    match asked {
        Ok(kill_switch) => axum::Json(json!({
            "status": "ready",
            "database": "ok",
            "partitions": admin.stats.partitions.load(Relaxed),
            "kill_switch": kill_switch,
        }))
        .into_response(),
        Err(e) => {
            // The reason is for the log, not for whoever can reach the probe.
            tracing::warn!(error = %e, "not ready: postgres does not answer");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "not ready").into_response()
        }
    }
}

/// `GET /v1/partitions`: this instance's partitions, their committed offsets and lag (as read
/// every couple of seconds).
async fn partitions(State(admin): State<Admin>) -> Response {
    let view = admin
        .stats
        .partition_view
        .lock()
        .expect("partition view")
        .clone();
    axum::Json(json!({"data": view})).into_response()
}

/// `?limit=N` (1 to 1000) `&integration=NAME` (every one when absent).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// How many, at most.
    pub limit: Option<i64>,
    /// Only this integration's.
    pub integration: Option<String>,
}

/// A failed event, as the operator sees it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct FailureView {
    /// The integration it failed in.
    pub integration: String,
    /// The event.
    pub event_id: uuid::Uuid,
    /// Its tenant.
    pub tenant_id: String,
    /// Its type.
    pub event_type: Option<String>,
    /// `failed` or `bad_event`.
    pub outcome: String,
    /// Attempts made.
    pub attempts: i32,
    /// The last error.
    pub last_error: Option<String>,
    /// The partner's last answer.
    pub last_response: Option<serde_json::Value>,
    /// Where it was read.
    pub partition: Option<i32>,
    /// Its offset.
    pub offset: Option<i64>,
    /// When it last changed.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// `GET /v1/failures?limit=N`: the events that failed and paused their tenant, newest first,
/// still waiting (replayed or skipped ones are settled and drop out).
async fn failures(
    State(admin): State<Admin>,
    query: Result<Query<Limit>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(Limit { limit, integration }) = query?;
    let only = integration.map(integration_name).transpose()?;
    let limit = limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("limit must be 1 to 1000, not {limit}"),
        ));
    }
    let rows: Vec<FailureView> = sqlx::query_as(
        "SELECT integration, event_id, tenant_id, event_type, outcome, attempts, last_error, \
                last_response, partition, \"offset\", updated_at \
         FROM deliveries \
         WHERE outcome IN ('failed', 'bad_event') AND settled_at IS NULL \
           AND ($2::text IS NULL OR integration = $2) \
         ORDER BY updated_at DESC LIMIT $1",
    )
    .bind(limit)
    .bind(only)
    .fetch_all(&admin.pool)
    .await?;
    Ok(axum::Json(json!({"data": rows})).into_response())
}

/// `GET /v1/events/{id}[?integration=NAME]`: what happened to one event in one integration: its
/// outcome, every attempt recorded (with the partner's answers), whether it is parked, and what
/// operators did to it.
async fn event_history(
    State(admin): State<Admin>,
    Path(event): Path<String>,
    scope: Result<Query<Scope>, QueryRejection>,
) -> Result<Response, ApiError> {
    let integration = admin.scoped(scope)?;
    let id = uuid::Uuid::parse_str(event.trim()).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_event_id",
            format!("{event:?} is not an event id (a UUID): {e}"),
        )
    })?;
    let delivery: Option<serde_json::Value> =
        sqlx::query_scalar(
            "SELECT to_jsonb(d) - 'event_id' FROM deliveries d WHERE integration = $2 AND event_id = $1",
        )
        .bind(id)
        .bind(&integration)
            .fetch_optional(&admin.pool)
            .await?;
    let attempts: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT to_jsonb(a) - 'event_id' FROM delivery_attempts a \
         WHERE integration = $2 AND event_id = $1 ORDER BY attempt",
    )
    .bind(id)
    .bind(&integration)
    .fetch_all(&admin.pool)
    .await?;
    let parked: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT jsonb_build_object('seq', seq, 'tenant_id', tenant_id, 'topic', topic,                 'partition', partition, 'offset', \"offset\", 'parked_at', parked_at)          FROM parked_events WHERE integration = $2 AND event_id = $1 ORDER BY seq LIMIT 1",
    )
    .bind(id)
    .bind(&integration)
    .fetch_optional(&admin.pool)
    .await?;
    let actions: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT jsonb_build_object('at', at, 'actor', actor, 'action', action, 'reason', reason,                 'details', details)          FROM operator_actions WHERE integration = $2 AND event_id = $1 ORDER BY at",
    )
    .bind(id)
    .bind(&integration)
    .fetch_all(&admin.pool)
    .await?;
    if delivery.is_none() && parked.is_none() && attempts.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_event",
            format!(
                "no event {id} has reached {integration}'s records (not consumed yet, or never written)"
            ),
        ));
    }
    Ok(axum::Json(json!({
        "event_id": id,
        "integration": integration,
        "delivery": delivery,
        "attempts": attempts,
        "parked": parked,
        "actions": actions,
    }))
    .into_response())
}

/// `POST /v1/tenants/{tenant}/skip` `{"actor", "reason"}`: the failing event (the oldest
/// parked) is skipped, recorded with who and why, and the rest of the backlog replayed.
async fn skip(
    State(admin): State<Admin>,
    Path(tenant): Path<String>,
    scope: Result<Query<Scope>, QueryRejection>,
    body: Result<axum::Json<Action>, JsonRejection>,
) -> Result<Response, ApiError> {
    let integration = admin.scoped(scope)?;
    let axum::Json(action) = body?;
    action.check()?;
    if let Some(letters) = &admin.dead_letters {
        let who = crate::dead_letter::GiveUp {
            integration: &integration,
            tenant: &tenant,
            actor: &action.actor,
            reason: &action.reason,
        };
        return match crate::dead_letter::skip_to_dead_letters(&admin.pool, letters, who).await? {
            Some(e) => Ok(accepted(json!({
                "integration": integration,
                "tenant_id": tenant,
                "state": "draining",
                "skipped": {"event_id": e.event_id, "partition": e.from.0, "offset": e.from.1},
                "dead_letter": {"topic": letters.topic(), "partition": e.to.0, "offset": e.to.1},
            }))),
            None => Err(not_paused(
                &admin.pool,
                &integration,
                &tenant,
                "with nothing parked to skip",
            )
            .await?),
        };
    }
    let skipped = ledger::skip_failed(
        &admin.pool,
        &integration,
        &tenant,
        &action.actor,
        &action.reason,
    )
    .await?;
    if let Some(skipped) = skipped {
        return Ok((
            StatusCode::ACCEPTED,
            axum::Json(json!({
                "integration": integration,
                "tenant_id": tenant,
                "state": "draining",
                "skipped": {"event_id": skipped.event_id, "partition": skipped.partition, "offset": skipped.offset},
            })),
        )
            .into_response());
    }
    Err(not_paused(
        &admin.pool,
        &integration,
        &tenant,
        "with nothing parked to skip",
    )
    .await?)
}

/// The kill switch, as set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillSwitch {
    /// On: no instance dispatches anything.
    pub on: bool,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
}

async fn get_kill_switch(State(admin): State<Admin>) -> Result<Response, ApiError> {
    let on: bool = sqlx::query_scalar("SELECT kill_switch FROM control")
        .fetch_one(&admin.pool)
        .await?;
    Ok(axum::Json(json!({"on": on})).into_response())
}

/// `PUT /v1/kill-switch` `{"on", "actor", "reason"}`: every instance obeys within its
/// `kill_switch_interval`.
async fn put_kill_switch(
    State(admin): State<Admin>,
    body: Result<axum::Json<KillSwitch>, JsonRejection>,
) -> Result<Response, ApiError> {
    let axum::Json(switch) = body?;
    audited(&switch.actor, &switch.reason)?;
    let mut tx = admin.pool.begin().await?;
    sqlx::query("UPDATE control SET kill_switch = $1")
        .bind(switch.on)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO operator_actions (actor, action, reason, details) VALUES ($1, 'kill_switch', $2, $3)",
    )
    .bind(&switch.actor)
    .bind(&switch.reason)
    .bind(json!({"on": switch.on}))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(axum::Json(json!({"on": switch.on})).into_response())
}

/// `GET /metrics`: Prometheus text format.
/// `GET /metrics`: this instance's counters and gauges, the database's gauges, the latency
/// histograms, in OpenMetrics through `prometheus-client` ([`crate::exposition`]). It answers
/// while Postgres is down: the database's gauges are then left out and
/// `ferry_metrics_database_up` is 0, never a failed scrape.
async fn metrics(State(admin): State<Admin>) -> Response {
    let reporting = reports_database(&admin.stats);
    let database = if reporting {
        Some(read_database_gauges(&admin.pool, &admin.integration).await)
    } else {
        None
    };
    let stats = Arc::clone(&admin.stats);
    // Every series names the integration: consumers of several share a Prometheus, and each
    // integration's own partition-0 owner exports its database gauges.
    let labels = vec![("integration", admin.integration.clone())];
    let text = crate::exposition::render_labelled(labels, move |out| {
        instance_metrics(&stats, out)?;
        labelled_metrics(&stats, out)?;
        database_metrics(reporting, database.as_ref(), out)?;
        latency_metrics(&stats, out)
    });
    (
        [(header::CONTENT_TYPE, crate::exposition::CONTENT_TYPE)],
        text,
    )
        .into_response()
}

/// What this instance counts in memory: counters, then [`instance_gauges`].
fn instance_metrics(s: &ConsumeStats, out: &mut Series<'_, '_>) -> std::fmt::Result {
    // (name, help, value): the counters (the encoder adds `_total`).
    let counters = [
        (
            "ferry_consumer_records_received",
            "Records taken from Kafka.",
            &s.received,
        ),
        (
            "ferry_consumer_duplicates",
            "Redelivered events skipped as already settled.",
            &s.duplicates,
        ),
        (
            "ferry_consumer_parked",
            "Records parked for paused tenants.",
            &s.parked,
        ),
        ("ferry_consumer_commits", "Offset commits.", &s.commits),
        (
            "ferry_consumer_kafka_errors",
            "Transient Kafka errors (librdkafka recovers).",
            &s.kafka_errors,
        ),
        (
            "ferry_consumer_restarts",
            "Times the consumer started again after a retryable error (Postgres or Kafka down).",
            &s.restarts,
        ),
        (
            "ferry_consumer_breaker_trips",
            "Times the partner-wide breaker opened.",
            &s.breaker_trips,
        ),
    ];
    for (name, help, value) in counters {
        out.counter(name, help, value.load(Relaxed))?;
    }
    instance_gauges(s, out)
}

/// What this instance holds now, in base units.
fn instance_gauges(s: &ConsumeStats, out: &mut Series<'_, '_>) -> std::fmt::Result {
    let gauges = [
        (
            "ferry_consumer_recovering",
            "1 while the consumer is stopped by a retryable error, waiting for Postgres.",
            &s.recovering,
        ),
        (
            "ferry_consumer_breaker_open",
            "1 while the partner-wide breaker is open.",
            &s.breaker_open,
        ),
        (
            "ferry_consumer_kill_switch",
            "1 while the kill switch is on.",
            &s.kill_switch,
        ),
        (
            "ferry_consumer_partitions",
            "Partitions this instance owns.",
            &s.partitions,
        ),
        (
            "ferry_consumer_in_flight",
            "Events being handled now.",
            &s.in_flight,
        ),
        (
            "ferry_consumer_tenants_held",
            "Tenants this instance holds paused: their records are parked, not delivered.",
            &s.tenants_held,
        ),
        (
            "ferry_consumer_queued",
            "Events in memory waiting for their tenant's turn.",
            &s.queued,
        ),
    ];
    for (name, help, value) in gauges {
        out.gauge(name, help, value.load(Relaxed) as i64)?;
    }
    out.gauge_f64(
        "ferry_consumer_commit_lag_max_seconds",
        "Longest a commit point rested on an event in flight.",
        s.commit_lag_max_ms.load(Relaxed) as f64 / 1000.0,
    )
}

/// This instance's series with labels: outcomes, retry causes, owned partitions.
fn labelled_metrics(s: &ConsumeStats, out: &mut Series<'_, '_>) -> std::fmt::Result {
    let outcomes: Vec<(Vec<(&str, String)>, u64)> = [
        ("delivered", &s.delivered),
        ("expired", &s.expired),
        ("ignored", &s.ignored),
        ("duplicate", &s.duplicates),
        ("parked", &s.parked),
        ("failed", &s.failed),
        ("bad_event", &s.bad_events),
    ]
    .into_iter()
    .map(|(outcome, n)| (vec![("outcome", outcome.to_owned())], n.load(Relaxed)))
    .collect();
    out.counters(
        "ferry_deliveries",
        "Events this instance took to an end, by outcome (parked: held for a paused tenant; failed: paused its tenant).",
        &outcomes,
    )?;
    let retries: Vec<(Vec<(&str, String)>, u64)> = s
        .retries
        .snapshot()
        .into_iter()
        .map(|(cause, n)| (vec![("cause", cause.to_string())], n))
        .collect();
    out.counters(
        "ferry_retries",
        "Retries of failed attempts, by cause.",
        &retries,
    )?;
    let view = s.partition_view.lock().expect("partition view").clone();
    let labels = |p: &crate::consumer::runtime::PartitionView| {
        vec![
            ("topic", p.topic.clone()),
            ("partition", p.partition.to_string()),
        ]
    };
    let lag: Vec<_> = view
        .iter()
        .filter_map(|p| p.lag.map(|lag| (labels(p), lag)))
        .collect();
    out.gauges(
        "ferry_consumer_lag",
        "Records of an owned partition not yet committed (high watermark less committed offset).",
        &lag,
    )?;
    let committed: Vec<_> = view
        .iter()
        .filter_map(|p| p.committed_offset.map(|c| (labels(p), c)))
        .collect();
    out.gauges(
        "ferry_consumer_committed_offset",
        "The group's committed offset of an owned partition.",
        &committed,
    )
}

/// Whether this instance reports the database's gauges: the owner of the topic's partition 0,
/// so that exactly one instance exports each (a `sum()` over instances is right) without an
/// election; none while nobody owns it, for a rebalance's moment.
fn reports_database(stats: &ConsumeStats) -> bool {
    stats
        .partition_view
        .lock()
        .expect("partition view")
        .iter()
        .any(|p| p.partition == 0)
}

/// The gauges read from the database.
struct DatabaseGauges {
    paused: i64,
    parked: i64,
    oldest_pause_seconds: f64,
    slots: Vec<(String, Option<i64>)>,
}

/// The database's gauges, `None` when Postgres does not answer within 2 s.
async fn read_database_gauges(pool: &PgPool, integration: &str) -> Option<DatabaseGauges> {
    let read = database_gauges(pool, integration);
    match tokio::time::timeout(std::time::Duration::from_secs(2), read).await {
        Ok(Ok(gauges)) => Some(gauges),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: the database's gauges left out");
            None
        }
        Err(_) => {
            tracing::warn!(
                "metrics: the database's gauges left out (Postgres did not answer in 2 s)"
            );
            None
        }
    }
}

async fn database_gauges(pool: &PgPool, integration: &str) -> Result<DatabaseGauges, sqlx::Error> {
    let (paused, parked, oldest_pause_seconds): (i64, i64, f64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tenants WHERE integration = $1 AND state IN ('paused', 'draining')), \
                (SELECT count(*) FROM parked_events WHERE integration = $1), \
                coalesce((SELECT extract(epoch FROM now() - min(paused_at))::float8 FROM tenants \
                          WHERE integration = $1 AND state IN ('paused', 'draining')), 0)",
    )
    .bind(integration)
    .fetch_one(pool)
    .await?;
    // The change feed's slots on this database: WAL not confirmed yet.
    let slots = sqlx::query_as(
        "SELECT slot_name::text, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
         FROM pg_replication_slots WHERE database = current_database() AND slot_type = 'logical' \
         ORDER BY slot_name",
    )
    .fetch_all(pool)
    .await?;
    Ok(DatabaseGauges {
        paused,
        parked,
        oldest_pause_seconds,
        slots,
    })
}

/// The gauges read from the database, exported by one instance only (`reporting`): left out,
/// with `ferry_metrics_database_up 0`, when Postgres did not answer (`read` is `None`).
fn database_metrics(
    reporting: bool,
    read: Option<&Option<DatabaseGauges>>,
    out: &mut Series<'_, '_>,
) -> std::fmt::Result {
    out.gauge(
        "ferry_metrics_database_reporter",
        "1 on the one instance that exports the database's gauges (the owner of partition 0).",
        i64::from(reporting),
    )?;
    let Some(read) = read else { return Ok(()) };
    out.gauge(
        "ferry_metrics_database_up",
        "1 when this scrape read the database's gauges, 0 when Postgres did not answer (they are left out).",
        i64::from(read.is_some()),
    )?;
    let Some(g) = read else { return Ok(()) };
    out.gauge(
        "ferry_tenants_paused",
        "Tenants paused or replaying their backlog.",
        g.paused,
    )?;
    out.gauge(
        "ferry_parked_events",
        "Events parked, waiting for their tenant.",
        g.parked,
    )?;
    out.gauge(
        "ferry_tenant_paused_oldest_seconds",
        "How long the tenant paused the longest has been paused (0: none is).",
        g.oldest_pause_seconds.max(0.0) as i64,
    )?;
    let slots: Vec<_> = g
        .slots
        .iter()
        .map(|(slot, lag)| (vec![("slot", slot.clone())], lag.unwrap_or_default()))
        .collect();
    out.gauges(
        "ferry_relay_slot_lag_bytes",
        "WAL written since the change feed's slot last confirmed.",
        &slots,
    )
}

/// The latency histograms.
fn latency_metrics(s: &ConsumeStats, out: &mut Series<'_, '_>) -> std::fmt::Result {
    histogram(
        out,
        "ferry_delivery_latency_seconds",
        "From the outbox commit (the record's timestamp) to the partner's acknowledgement.",
        &s.ack_latency,
    )?;
    histogram(
        out,
        "ferry_intake_latency_seconds",
        "From the outbox commit (the record's timestamp) to Ferry receiving the record.",
        &s.intake_latency,
    )?;
    histogram(
        out,
        "ferry_handling_seconds",
        "From an event's dispatch to its handler's last outcome, retries included.",
        &s.handling_latency,
    )
}

fn histogram(out: &mut Series<'_, '_>, name: &str, help: &str, h: &Histogram) -> std::fmt::Result {
    // The encoder sums the buckets itself and writes `f64::MAX` as `+Inf`: each bucket's own
    // count, then.
    let mut below = 0;
    let buckets: Vec<(f64, u64)> = h
        .cumulative()
        .into_iter()
        .map(|(bound, cumulative)| {
            let own = cumulative - below;
            below = cumulative;
            (bound.map_or(f64::MAX, |ms| ms as f64 / 1000.0), own)
        })
        .collect();
    out.histogram(name, help, h.sum_ms() as f64 / 1000.0, h.count(), &buckets)
}
