//! Each tenant's webhook endpoint (`webhook_endpoints`): where its events go, the secret they are
//! signed with, the secret being rotated out and until when it stays valid, and whether the
//! endpoint was disabled (it answered 410 Gone). Managed through the admin API and `ferry ctl
//! webhook`; read by the integration at each delivery, so a change applies to the next one.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::signing::{self, SigningError};

/// One tenant's endpoint.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct Endpoint {
    /// The integration it belongs to.
    pub integration: String,
    /// The tenant.
    pub tenant_id: String,
    /// Where deliveries go.
    pub url: String,
    /// The secret deliveries are signed with.
    #[serde(skip)]
    pub secret: String,
    /// The secret being rotated out, still signed with until `previous_until`.
    #[serde(skip)]
    pub previous_secret: Option<String>,
    /// Until when the previous secret is valid.
    pub previous_until: Option<DateTime<Utc>>,
    /// When it was disabled (it answered 410 Gone), if it is.
    pub disabled_at: Option<DateTime<Utc>>,
    /// Why.
    pub disabled_reason: Option<String>,
    /// When it was last set, rotated or disabled.
    pub updated_at: DateTime<Utc>,
}

impl Endpoint {
    /// The secrets a delivery at `now` is signed with: the current one, and the previous one
    /// while it is valid.
    pub fn signing_secrets(&self, now: DateTime<Utc>) -> Vec<&str> {
        let mut secrets = vec![self.secret.as_str()];
        if let (Some(previous), Some(until)) = (&self.previous_secret, self.previous_until)
            && now < until
        {
            secrets.push(previous);
        }
        secrets
    }
}

/// An endpoint change that cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The URL is not an `http://` or `https://` URL with a host.
    #[error("{0:?} is not an http:// or https:// URL with a host")]
    BadUrl(String),
    /// The secret given cannot sign.
    #[error(transparent)]
    BadSecret(#[from] SigningError),
    /// The tenant has no endpoint in this integration.
    #[error("tenant {tenant:?} has no webhook endpoint in {integration}")]
    Unknown {
        /// The integration.
        integration: String,
        /// The tenant.
        tenant: String,
    },
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
}

const COLUMNS: &str = "integration, tenant_id, url, secret, previous_secret, previous_until, \
                       disabled_at, disabled_reason, updated_at";

/// The tenant's endpoint in `integration`, if it has one.
pub async fn get(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
) -> Result<Option<Endpoint>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM webhook_endpoints WHERE integration = $1 AND tenant_id = $2"
    ))
    .bind(integration)
    .bind(tenant)
    .fetch_optional(pool)
    .await
}

/// Sets the tenant's endpoint to `url`, signed with `secret` (a new one when `None`), enabled
/// again if it was disabled; returns it. A secret it had before stops signing at once: to
/// change secrets without a refused delivery, [`rotate`].
pub async fn set(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    url: &str,
    secret: Option<String>,
) -> Result<Endpoint, EndpointError> {
    check_url(url)?;
    let secret = match secret {
        Some(s) => {
            signing::check_secret(&s)?;
            s
        }
        None => signing::new_secret(),
    };
    Ok(sqlx::query_as(&format!(
        "INSERT INTO webhook_endpoints (integration, tenant_id, url, secret) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (integration, tenant_id) DO UPDATE SET url = $3, secret = $4, \
             previous_secret = NULL, previous_until = NULL, \
             disabled_at = NULL, disabled_reason = NULL, updated_at = now() \
         RETURNING {COLUMNS}"
    ))
    .bind(integration)
    .bind(tenant)
    .bind(url)
    .bind(&secret)
    .fetch_one(pool)
    .await?)
}

/// Rotates the tenant's secret: a new one signs from now on, and the one it replaces keeps
/// signing for `keep` (so the tenant can swap its copy without a refused delivery).
pub async fn rotate(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    keep: std::time::Duration,
) -> Result<Endpoint, EndpointError> {
    let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::days(7));
    sqlx::query_as(&format!(
        "UPDATE webhook_endpoints SET previous_secret = secret, previous_until = now() + $4, \
             secret = $3, updated_at = now() \
         WHERE integration = $1 AND tenant_id = $2 RETURNING {COLUMNS}"
    ))
    .bind(integration)
    .bind(tenant)
    .bind(signing::new_secret())
    .bind(keep)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| unknown(integration, tenant))
}

/// Removes the tenant's endpoint: its events are recorded as ignored from then on.
pub async fn remove(pool: &PgPool, integration: &str, tenant: &str) -> Result<(), EndpointError> {
    let gone =
        sqlx::query("DELETE FROM webhook_endpoints WHERE integration = $1 AND tenant_id = $2")
            .bind(integration)
            .bind(tenant)
            .execute(pool)
            .await?
            .rows_affected();
    if gone == 0 {
        return Err(unknown(integration, tenant));
    }
    Ok(())
}

/// Disables the tenant's endpoint for `reason` (it answered 410 Gone): nothing is sent to it
/// until it is set again.
pub async fn disable(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_endpoints SET disabled_at = now(), disabled_reason = $3, updated_at = now() \
         WHERE integration = $1 AND tenant_id = $2 AND disabled_at IS NULL",
    )
    .bind(integration)
    .bind(tenant)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

fn unknown(integration: &str, tenant: &str) -> EndpointError {
    EndpointError::Unknown {
        integration: integration.to_owned(),
        tenant: tenant.to_owned(),
    }
}

/// Whether `url` can be an endpoint: `http://` or `https://` with a host.
pub fn check_url(url: &str) -> Result<(), EndpointError> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(EndpointError::BadUrl(url.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(previous_until: Option<DateTime<Utc>>) -> Endpoint {
        Endpoint {
            integration: "webhooks".into(),
            tenant_id: "acme".into(),
            url: "http://127.0.0.1:1/hooks/acme".into(),
            secret: "new".into(),
            previous_secret: previous_until.map(|_| "old".into()),
            previous_until,
            disabled_at: None,
            disabled_reason: None,
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn the_previous_secret_signs_until_its_end_only() {
        let now = Utc::now();
        let hour = chrono::Duration::hours(1);
        assert_eq!(endpoint(None).signing_secrets(now), ["new"]);
        assert_eq!(
            endpoint(Some(now + hour)).signing_secrets(now),
            ["new", "old"]
        );
        assert_eq!(endpoint(Some(now - hour)).signing_secrets(now), ["new"]);
    }

    #[test]
    fn an_endpoint_is_an_http_url_with_a_host() {
        assert!(check_url("https://hooks.example.com/ferry").is_ok());
        // Input tried: another scheme, no host, not a URL.
        for bad in ["ftp://example.com", "http://", "hooks.example.com"] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
