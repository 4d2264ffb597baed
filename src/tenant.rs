//! Switching a tenant's partner integration on and off: `ferry tenant enable|disable|status`.
//!
//! Both go through the outbox, so they are ordered with the tenant's live traffic:
//! - **enable** sets `tenants.integration_enabled` and writes `TenantIntegrationEnabled`, then a
//!   `ProductCreated` for every existing product (the backfill), a page at a time. Each page
//!   reads its products `FOR SHARE` in the transaction that writes their creates, so a live
//!   change of one of them commits either before the page (the page reads the changed row, and
//!   its create comes after the change's event) or after it (its event comes after the create).
//!   Either way the partner ends with the latest state. A product created live during the
//!   backfill may get a second create; the integration's create is an upsert, so it is harmless.
//! - **disable** clears the flag and writes `TenantIntegrationDisabled`. The integration handles
//!   that event after every earlier event of the tenant: it deletes every mapped object then,
//!   so an object created by an event still in flight when the flag flipped is deleted too.
//!
//! While the flag is off the integration records the tenant's product events as ignored and
//! sends nothing (checked when each event is handled, which is always after it was written).

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::outbox::TenantId;
use crate::outbox::control::Control;
use crate::outbox::writer::{self, JsonPayload, NewEvent};
use crate::partner::spec::BackfillSpec;
use crate::shop::{EventPayload, proto};

/// Products per backfill transaction.
pub const BACKFILL_PAGE: i64 = 500;

/// A tenant command that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// The tenant id is not one (empty, too long, control characters).
    #[error("invalid tenant id {0:?}: {1}")]
    InvalidId(String, String),
    /// Disabling a tenant that was never enabled.
    #[error("tenant {0:?} has no {1} integration to disable (it was never enabled)")]
    NotEnabled(String, String),
    /// The events were not all settled in time.
    #[error(
        "gave up waiting after {waited:?}: {settled} of {total} events settled for tenant {tenant:?} \
         (state: {state}); is `ferry consume` running?"
    )]
    TimedOut {
        /// The tenant.
        tenant: String,
        /// Events settled.
        settled: u64,
        /// Events waited for.
        total: u64,
        /// The tenant's state then, with the pause reason if paused.
        state: String,
        /// How long it waited.
        waited: Duration,
    },
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
}

/// How far an enable's backfill got: `written` of `total` creates are in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backfill {
    /// Creates written so far.
    pub written: u64,
    /// Products the tenant had when the backfill started (live creates may add a few).
    pub total: u64,
}

/// What `enable` wrote: the events to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enabled {
    /// Whether the tenant was enabled already (the backfill is then a resync).
    pub was_enabled: bool,
    /// The `TenantIntegrationEnabled` event, then every backfill create, in order.
    pub events: Vec<Uuid>,
}

/// Parses a tenant id from the command line.
pub fn tenant_id(raw: &str) -> Result<TenantId, TenantError> {
    TenantId::new(raw.to_owned()).map_err(|e| TenantError::InvalidId(raw.to_owned(), e.to_string()))
}

/// Where a tenant's backfill comes from: what `enable` writes after its marker.
#[derive(Debug, Clone, Copy)]
pub enum BackfillSource<'a> {
    /// The reference shop's products, as `ProductCreated` events (the built-in integration).
    Products,
    /// An integration file's `[backfill]` query, as JSON events of its type.
    Query(&'a BackfillSpec),
    /// Nothing: an integration file without `[backfill]`.
    Nothing,
}

/// Switches the integration on for `tenant` and backfills its objects through the outbox from
/// `source`, reporting each page written to `progress`.
pub async fn enable(
    pool: &PgPool,
    integration: &str,
    tenant: &TenantId,
    source: BackfillSource<'_>,
    mut progress: impl FnMut(Backfill),
) -> Result<Enabled, TenantError> {
    let mut tx = pool.begin().await?;
    let was_enabled: bool = sqlx::query_scalar(
        "SELECT integration_enabled FROM tenants WHERE integration = $2 AND tenant_id = $1 FOR UPDATE",
    )
    .bind(tenant.as_str())
    .bind(integration)
    .fetch_optional(&mut *tx)
    .await?
    .unwrap_or(false);
    sqlx::query(
        "INSERT INTO tenants (integration, tenant_id, integration_enabled) VALUES ($2, $1, true) \
         ON CONFLICT (integration, tenant_id) DO UPDATE SET integration_enabled = true, updated_at = now()",
    )
    .bind(tenant.as_str())
    .bind(integration)
    .execute(&mut *tx)
    .await?;
    // The marker and the backfill are this integration's alone: another one that runs for
    // the same tenant already has its objects, and records them as ignored.
    let marker = NewEvent::new(
        tenant.clone(),
        tenant.as_str(),
        Control::enabled(integration),
    )
    .for_integration(integration);
    writer::append(&mut tx, &marker).await?;
    let total: Option<i64> = match source {
        BackfillSource::Products => Some(
            sqlx::query_scalar("SELECT count(*) FROM products WHERE tenant_id = $1")
                .bind(tenant.as_str())
                .fetch_one(&mut *tx)
                .await?,
        ),
        BackfillSource::Query(_) => None,
        BackfillSource::Nothing => Some(0),
    };
    tx.commit().await?;

    let mut events = vec![marker.id];
    let mut report = Backfill {
        written: 0,
        total: total.unwrap_or(0) as u64,
    };
    progress(report);
    let mut after = String::new();
    loop {
        let mut tx = pool.begin().await?;
        let page = match source {
            BackfillSource::Products => {
                products_page(&mut tx, integration, tenant, &mut after).await?
            }
            BackfillSource::Query(spec) => {
                query_page(&mut tx, integration, spec, tenant, &mut after).await?
            }
            BackfillSource::Nothing => Vec::new(),
        };
        if page.is_empty() {
            break;
        }
        tx.commit().await?;
        events.extend(page);
        report.written = events.len() as u64 - 1;
        report.total = report.total.max(report.written);
        progress(report);
    }
    Ok(Enabled {
        was_enabled,
        events,
    })
}

/// One page of the shop's products after `after`, written as creates in `tx`; their ids.
async fn products_page(
    tx: &mut sqlx::PgConnection,
    integration: &str,
    tenant: &TenantId,
    after: &mut String,
) -> Result<Vec<Uuid>, TenantError> {
    let from = if after.is_empty() {
        Uuid::nil()
    } else {
        after.parse().unwrap_or(Uuid::max())
    };
    let page: Vec<(Uuid, String, String, i64, String)> = sqlx::query_as(
        "SELECT id, name, description, price_minor, currency FROM products \
         WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3 FOR SHARE",
    )
    .bind(tenant.as_str())
    .bind(from)
    .bind(BACKFILL_PAGE)
    .fetch_all(&mut *tx)
    .await?;
    let Some(last) = page.last() else {
        return Ok(Vec::new());
    };
    *after = last.0.to_string();
    let creates: Vec<NewEvent<EventPayload>> = page
        .into_iter()
        .map(|(id, name, description, price_minor, currency)| {
            let product = proto::Product {
                id: id.to_string(),
                name,
                description,
                price_minor,
                currency,
            };
            NewEvent::new(
                tenant.clone(),
                id.to_string(),
                EventPayload::ProductCreated(proto::ProductCreated {
                    product: Some(product),
                }),
            )
            .for_integration(integration)
        })
        .collect();
    writer::append_many(&mut *tx, &creates).await?;
    Ok(creates.iter().map(|e| e.id).collect())
}

/// One page of an integration file's backfill query after `after`, written as JSON events of
/// its type in `tx`; their ids. The query is the application's: `$1` the tenant, `$2` the last
/// `key` of the page before (empty at first), `$3` the page size; it returns `key` (text, in
/// ascending order; the aggregate id) and `payload` (jsonb).
async fn query_page(
    tx: &mut sqlx::PgConnection,
    integration: &str,
    spec: &BackfillSpec,
    tenant: &TenantId,
    after: &mut String,
) -> Result<Vec<Uuid>, TenantError> {
    let page: Vec<(String, serde_json::Value)> = sqlx::query_as(&spec.query)
        .bind(tenant.as_str())
        .bind(after.as_str())
        .bind(BACKFILL_PAGE)
        .fetch_all(&mut *tx)
        .await?;
    let Some(last) = page.last() else {
        return Ok(Vec::new());
    };
    *after = last.0.clone();
    let events: Vec<NewEvent<JsonPayload>> = page
        .into_iter()
        .map(|(key, body)| {
            let payload = JsonPayload {
                event_type: spec.event_type.clone(),
                aggregate_type: spec.aggregate_type.clone(),
                body,
            };
            NewEvent::new(tenant.clone(), key, payload).for_integration(integration)
        })
        .collect();
    writer::append_many(&mut *tx, &events).await?;
    Ok(events.iter().map(|e| e.id).collect())
}

/// Switches the integration off for `tenant`: from now on its events are ignored, and the
/// `TenantIntegrationDisabled` event written here makes the integration delete every object it
/// mapped. Returns that event's id.
pub async fn disable(
    pool: &PgPool,
    integration: &str,
    tenant: &TenantId,
) -> Result<Uuid, TenantError> {
    let mut tx = pool.begin().await?;
    let known: Option<bool> = sqlx::query_scalar(
        "UPDATE tenants SET integration_enabled = false, updated_at = now() \
         WHERE integration = $2 AND tenant_id = $1 RETURNING true",
    )
    .bind(tenant.as_str())
    .bind(integration)
    .fetch_optional(&mut *tx)
    .await?;
    if known.is_none() {
        return Err(TenantError::NotEnabled(
            tenant.to_string(),
            integration.to_owned(),
        ));
    }
    let marker = NewEvent::new(
        tenant.clone(),
        tenant.as_str(),
        Control::disabled(integration),
    )
    .for_integration(integration);
    writer::append(&mut tx, &marker).await?;
    tx.commit().await?;
    Ok(marker.id)
}

/// A tenant as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct TenantStatus {
    /// The integration.
    pub integration: String,
    /// Whether the integration is on.
    pub integration_enabled: bool,
    /// `active`, `paused`, `draining` or `disabled`.
    pub state: String,
    /// Why it is paused, when it is.
    pub pause_reason: Option<String>,
    /// Objects mapped on the partner.
    pub mapped: i64,
    /// Events parked, waiting for a resume.
    pub parked: i64,
}

const STATUS: &str = "SELECT t.integration, t.integration_enabled, t.state, t.pause_reason, \
        (SELECT count(*) FROM integration_mappings m \
          WHERE m.integration = t.integration AND m.tenant_id = t.tenant_id) AS mapped, \
        (SELECT count(*) FROM parked_events p \
          WHERE p.integration = t.integration AND p.tenant_id = t.tenant_id) AS parked \
     FROM tenants t";

/// The tenant's state in `integration`, or `None` if it has never heard of it.
pub async fn status(
    pool: &PgPool,
    integration: &str,
    tenant: &TenantId,
) -> Result<Option<TenantStatus>, TenantError> {
    Ok(sqlx::query_as(&format!(
        "{STATUS} WHERE t.integration = $2 AND t.tenant_id = $1"
    ))
    .bind(tenant.as_str())
    .bind(integration)
    .fetch_optional(pool)
    .await?)
}

/// The tenant's state in every integration that has heard of it, by name.
pub async fn statuses(pool: &PgPool, tenant: &TenantId) -> Result<Vec<TenantStatus>, TenantError> {
    Ok(sqlx::query_as(&format!(
        "{STATUS} WHERE t.tenant_id = $1 ORDER BY t.integration"
    ))
    .bind(tenant.as_str())
    .fetch_all(pool)
    .await?)
}

/// How many of `events` `integration` settled (delivered, ignored, expired or skipped).
pub async fn settled(
    pool: &PgPool,
    integration: &str,
    events: &[Uuid],
) -> Result<u64, TenantError> {
    // The dedupe lookup's probes, counted.
    let count = format!(
        "SELECT count(*) FROM ({}) AS recorded WHERE recorded.settled",
        crate::consumer::ledger::RECORDED_IDS
    );
    let n: i64 = sqlx::query_scalar(&count)
        .bind(integration)
        .bind(events)
        .fetch_one(pool)
        .await?;
    Ok(n as u64)
}

/// Where a wait stands, reported on every look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// Events settled.
    pub settled: u64,
    /// Events waited for.
    pub total: u64,
    /// The tenant, as it is now.
    pub status: Option<TenantStatus>,
}

/// How often a wait looks again.
pub const POLL: Duration = Duration::from_millis(500);

/// Waits until every one of `events` is settled (the consumers delivered or ignored them),
/// reporting to `progress` on every look; gives up after `timeout`. A paused tenant is
/// reported, not an error: an operator may resume it while this waits.
pub async fn wait(
    pool: &PgPool,
    integration: &str,
    tenant: &TenantId,
    events: &[Uuid],
    timeout: Duration,
    mut progress: impl FnMut(&Waiting),
) -> Result<(), TenantError> {
    let started = std::time::Instant::now();
    loop {
        let now = Waiting {
            settled: settled(pool, integration, events).await?,
            total: events.len() as u64,
            status: status(pool, integration, tenant).await?,
        };
        progress(&now);
        if now.settled == now.total {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            let state = match &now.status {
                Some(s) => match &s.pause_reason {
                    Some(reason) if s.state != "active" => format!("{}: {reason}", s.state),
                    _ => s.state.clone(),
                },
                None => "unknown".to_owned(),
            };
            return Err(TenantError::TimedOut {
                tenant: tenant.to_string(),
                settled: now.settled,
                total: now.total,
                state,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
