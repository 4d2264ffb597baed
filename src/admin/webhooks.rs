//! The admin API's webhook endpoint routes: a tenant's endpoint of a webhooks integration, set,
//! rotated, shown and removed. Every change is audited; a secret is shown only in the answer
//! to the change that made it (the tenant must be given it), never by `GET`.
//!
//! - `GET /v1/webhooks/{tenant}`: the endpoint (URL, rotation, disabled or not).
//! - `PUT /v1/webhooks/{tenant}` `{"url", "secret"?, "actor", "reason"}`: sets it (a new
//!   secret when none is given) and enables it again; a tenant paused in the integration (an
//!   endpoint gone, say) is resumed, its parked events delivered in order.
//! - `POST /v1/webhooks/{tenant}/rotate` `{"keep"?, "actor", "reason"}`: a new secret, the old
//!   one still signing for `keep` (`24h` by default).
//! - `DELETE /v1/webhooks/{tenant}` `{"actor", "reason"}`: removed; the tenant's events are
//!   recorded as ignored from then on.
//!
//! Each takes `?integration=` like the tenant routes (the serving consumer's by default).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{Admin, ApiError, Scope, audited};
use crate::consumer::ledger;
use crate::webhook::endpoints::{self, Endpoint, EndpointError};

/// How long a rotated-out secret keeps signing unless the rotation says.
pub const DEFAULT_KEEP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl From<EndpointError> for ApiError {
    fn from(e: EndpointError) -> Self {
        match e {
            EndpointError::BadUrl(_) | EndpointError::BadSecret(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad_endpoint",
                e.to_string(),
            ),
            EndpointError::Unknown { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_endpoint", e.to_string())
            }
            EndpointError::Postgres(e) => e.into(),
        }
    }
}

/// `PUT /v1/webhooks/{tenant}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetEndpoint {
    /// Where the tenant's events go.
    pub url: String,
    /// Its secret (`whsec_...`); a new one when absent.
    pub secret: Option<String>,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
}

/// `POST /v1/webhooks/{tenant}/rotate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// How long the old secret keeps signing (`24h`, `30m`).
    pub keep: Option<String>,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
}

/// The endpoint as answered, with the secret when a change made it.
fn view(endpoint: &Endpoint, secret: Option<&str>) -> serde_json::Value {
    let mut body = json!(endpoint);
    if let Some(secret) = secret {
        body["secret"] = json!(secret);
    }
    body
}

/// `GET /v1/webhooks/{tenant}`.
pub(super) async fn get_endpoint(
    State(admin): State<Admin>,
    Path(tenant): Path<String>,
    scope: Result<Query<Scope>, QueryRejection>,
) -> Result<Response, ApiError> {
    let integration = admin.scoped(scope)?;
    match endpoints::get(&admin.pool, &integration, &tenant).await? {
        Some(endpoint) => Ok(axum::Json(view(&endpoint, None)).into_response()),
        None => Err(EndpointError::Unknown {
            integration,
            tenant,
        }
        .into()),
    }
}

/// `PUT /v1/webhooks/{tenant}`.
pub(super) async fn put_endpoint(
    State(admin): State<Admin>,
    Path(tenant): Path<String>,
    scope: Result<Query<Scope>, QueryRejection>,
    body: Result<axum::Json<SetEndpoint>, JsonRejection>,
) -> Result<Response, ApiError> {
    let integration = admin.scoped(scope)?;
    let axum::Json(set) = body?;
    audited(&set.actor, &set.reason)?;
    crate::outbox::TenantId::new(tenant.clone()).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_tenant",
            e.to_string(),
        )
    })?;
    let endpoint = endpoints::set(
        &admin.pool,
        &integration,
        &tenant,
        set.url.trim(),
        set.secret,
    )
    .await?;
    let action = ledger::Action {
        integration: &integration,
        tenant: &tenant,
        actor: &set.actor,
        action: "webhook_set",
        reason: &set.reason,
    };
    let mut conn = admin.pool.acquire().await?;
    ledger::audit(&mut conn, &action, json!({"url": endpoint.url})).await?;
    drop(conn);
    // Its events were parked while the endpoint failed or was gone: delivered now, in order.
    let reason = format!("webhook endpoint set: {}", set.reason);
    let resumed =
        ledger::request_resume(&admin.pool, &integration, &tenant, &set.actor, &reason).await?;
    let mut body = view(&endpoint, Some(&endpoint.secret));
    body["resumed"] = json!(resumed);
    Ok(axum::Json(body).into_response())
}

/// `POST /v1/webhooks/{tenant}/rotate`.
pub(super) async fn rotate(
    State(admin): State<Admin>,
    Path(tenant): Path<String>,
    scope: Result<Query<Scope>, QueryRejection>,
    body: Result<axum::Json<Rotate>, JsonRejection>,
) -> Result<Response, ApiError> {
    let integration = admin.scoped(scope)?;
    let axum::Json(rotate) = body?;
    audited(&rotate.actor, &rotate.reason)?;
    let keep = match rotate.keep.as_deref() {
        None => DEFAULT_KEEP,
        Some(text) => humantime::parse_duration(text.trim()).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad_keep",
                format!("keep {text:?} is not a duration like 24h or 30m: {e}"),
            )
        })?,
    };
    let endpoint = endpoints::rotate(&admin.pool, &integration, &tenant, keep).await?;
    let action = ledger::Action {
        integration: &integration,
        tenant: &tenant,
        actor: &rotate.actor,
        action: "webhook_rotate",
        reason: &rotate.reason,
    };
    let mut conn = admin.pool.acquire().await?;
    ledger::audit(
        &mut conn,
        &action,
        json!({"previous_until": endpoint.previous_until}),
    )
    .await?;
    Ok(axum::Json(view(&endpoint, Some(&endpoint.secret))).into_response())
}

/// `DELETE /v1/webhooks/{tenant}`.
pub(super) async fn delete_endpoint(
    State(admin): State<Admin>,
    Path(tenant): Path<String>,
    scope: Result<Query<Scope>, QueryRejection>,
    body: Result<axum::Json<super::Action>, JsonRejection>,
) -> Result<Response, ApiError> {
    let integration = admin.scoped(scope)?;
    let axum::Json(removal) = body?;
    audited(&removal.actor, &removal.reason)?;
    endpoints::remove(&admin.pool, &integration, &tenant).await?;
    let action = ledger::Action {
        integration: &integration,
        tenant: &tenant,
        actor: &removal.actor,
        action: "webhook_remove",
        reason: &removal.reason,
    };
    let mut conn = admin.pool.acquire().await?;
    ledger::audit(&mut conn, &action, json!({})).await?;
    Ok(
        axum::Json(json!({"integration": integration, "tenant_id": tenant, "removed": true}))
            .into_response(),
    )
}
