//! `ferry verify`: our products against the partner's items and prices, per tenant. Drift is
//! every product missing on the partner or different there, and every partner object whose
//! product is gone; duplicates are objects sharing our id with another of their kind. A tenant
//! with the integration off must have nothing on the partner.
//!
//! It also reports the end-to-end latency of delivered events (outbox write to the partner's
//! acknowledgement) and, when the partner is the simulator, the order violations it saw.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sqlx::PgPool;

use super::api::{ShopItem, ShopPrice};
use super::client::{Call, PartnerClient};
use crate::delivery::Failure;

/// One tenant's comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TenantDrift {
    /// The tenant.
    pub tenant: String,
    /// Our products.
    pub products: usize,
    /// Products with no item or no price on the partner.
    pub missing: usize,
    /// Products whose item or price differs on the partner.
    pub stale: usize,
    /// Partner objects whose product does not exist (deleted, or never ours).
    pub orphans: usize,
    /// Partner objects beyond the first with the same `external_id`.
    pub duplicates: usize,
}

impl TenantDrift {
    /// Everything that is not as it should be, duplicates aside.
    pub fn drift(&self) -> usize {
        self.missing + self.stale + self.orphans
    }
}

/// Verification could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The partner failed.
    #[error("partner: {}", .0.message)]
    Partner(Failure),
}

type Product = (String, String, String, i64, String);

/// Compares every tenant that has products or a tenant record, plus `also`, in tenant order.
/// The expected state of a tenant with the integration off is nothing.
pub async fn verify(
    pool: &PgPool,
    integration: &str,
    client: &PartnerClient,
    also: &[String],
) -> Result<Vec<TenantDrift>, VerifyError> {
    let rows: Vec<(String, uuid::Uuid, String, String, i64, String)> = sqlx::query_as(
        "SELECT tenant_id, id, name, description, price_minor, currency FROM products ORDER BY tenant_id",
    )
    .fetch_all(pool)
    .await?;
    let enabled: HashMap<String, bool> =
        sqlx::query_as("SELECT tenant_id, integration_enabled FROM tenants WHERE integration = $1")
            .bind(integration)
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    let mut products: BTreeMap<String, HashMap<String, Product>> = BTreeMap::new();
    for tenant in enabled.keys() {
        products.entry(tenant.clone()).or_default();
    }
    for (tenant, id, name, description, price, currency) in rows {
        if !enabled.get(&tenant).copied().unwrap_or(false) {
            products.entry(tenant).or_default();
            continue;
        }
        products.entry(tenant).or_default().insert(
            id.to_string(),
            (id.to_string(), name, description, price, currency),
        );
    }
    let tenants: BTreeSet<String> = products
        .keys()
        .cloned()
        .chain(also.iter().cloned())
        .collect();
    let mut out = Vec::new();
    for tenant in tenants {
        let call = Call {
            account: tenant.clone(),
            ..Call::default()
        };
        let items = client
            .list_items(&call)
            .await
            .map_err(VerifyError::Partner)?;
        let prices = client
            .list_prices(&call)
            .await
            .map_err(VerifyError::Partner)?;
        let ours = products.remove(&tenant).unwrap_or_default();
        out.push(compare(&tenant, &ours, &items, &prices));
    }
    Ok(out)
}

/// The comparison of one tenant (pure).
pub fn compare(
    tenant: &str,
    products: &HashMap<String, Product>,
    items: &[ShopItem],
    prices: &[ShopPrice],
) -> TenantDrift {
    let mut d = TenantDrift {
        tenant: tenant.to_owned(),
        products: products.len(),
        ..TenantDrift::default()
    };
    let mut item_by: HashMap<&str, &ShopItem> = HashMap::new();
    for item in items {
        match item_by.entry(item.external_id.as_str()) {
            std::collections::hash_map::Entry::Occupied(_) => d.duplicates += 1,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(item);
            }
        }
    }
    let mut price_by: HashMap<&str, &ShopPrice> = HashMap::new();
    for price in prices {
        match price_by.entry(price.external_id.as_str()) {
            std::collections::hash_map::Entry::Occupied(_) => d.duplicates += 1,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(price);
            }
        }
    }
    for (id, (_, name, description, amount, currency)) in products {
        match (item_by.get(id.as_str()), price_by.get(id.as_str())) {
            (Some(item), Some(price)) => {
                if item.name != *name
                    || item.description != *description
                    || price.amount_minor != *amount
                    || price.currency != *currency
                    || price.item_id != item.id
                {
                    d.stale += 1;
                }
            }
            _ => d.missing += 1,
        }
    }
    d.orphans = item_by
        .keys()
        .filter(|id| !products.contains_key(**id))
        .count()
        + price_by
            .keys()
            .filter(|id| !products.contains_key(**id))
            .count();
    d
}

/// End-to-end latency of delivered events: from the outbox write to the partner's
/// acknowledgement.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Latency {
    /// Events settled in all (delivered, ignored, expired, skipped).
    pub events: u64,
    /// Delivered events of healthy tenants (none of their events needed a second attempt or
    /// was parked), which the percentiles cover.
    pub healthy: u64,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// The slowest, milliseconds.
    pub max_ms: f64,
    /// Delivered events of every tenant.
    pub all: u64,
    /// 99th percentile over every tenant, milliseconds.
    pub all_p99_ms: f64,
}

/// The latency of the events `integration` delivered, those written since `since` when given.
pub async fn latency(
    pool: &PgPool,
    integration: &str,
    since: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Latency, sqlx::Error> {
    let (events,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM deliveries WHERE integration = $1 AND settled_at IS NOT NULL",
    )
    .bind(integration)
    .fetch_one(pool)
    .await?;
    type Row = (i64, Option<f64>, Option<f64>, Option<f64>);
    let percentiles = |healthy_only: bool| {
        sqlx::query_as::<_, Row>(
            "WITH unhealthy AS ( \
                 SELECT tenant_id FROM deliveries \
                 WHERE integration = $3 AND (attempts > 1 OR outcome IN ('failed', 'bad_event')) \
                 UNION SELECT tenant_id FROM parked_events WHERE integration = $3 \
                 UNION SELECT tenant_id FROM tenants WHERE integration = $3 AND state <> 'active'), \
             ms AS ( \
                 SELECT extract(epoch FROM acked_at - written_at) * 1000 AS ms FROM deliveries \
                 WHERE integration = $3 AND outcome = 'delivered' \
                   AND acked_at IS NOT NULL AND written_at IS NOT NULL \
                   AND ($2::timestamptz IS NULL OR written_at >= $2) \
                   AND NOT ($1 AND tenant_id IN (SELECT tenant_id FROM unhealthy))) \
             SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::float8, \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::float8, max(ms)::float8 FROM ms",
        )
        .bind(healthy_only)
        .bind(since)
        .bind(integration)
        .fetch_one(pool)
    };
    let (healthy, p50, p99, max) = percentiles(true).await?;
    let (all, _, all_p99, _) = percentiles(false).await?;
    Ok(Latency {
        events: events as u64,
        healthy: healthy as u64,
        p50_ms: p50.unwrap_or(0.0),
        p99_ms: p99.unwrap_or(0.0),
        max_ms: max.unwrap_or(0.0),
        all: all as u64,
        all_p99_ms: all_p99.unwrap_or(0.0),
    })
}

/// Everything `ferry verify` found.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Verification {
    /// Per tenant.
    pub tenants: Vec<TenantDrift>,
    /// Latency of every delivered event on record.
    pub latency: Latency,
    /// Latency of the events written since a time, when asked: the machine line's.
    pub window: Option<(chrono::DateTime<chrono::Utc>, Latency)>,
    /// Order violations the simulator saw, when the partner is the simulator.
    pub order_violations: Option<u64>,
}

impl Verification {
    /// Drift, order violations and duplicates: all must be zero.
    pub fn failures(&self) -> u64 {
        self.tenants
            .iter()
            .map(|d| (d.drift() + d.duplicates) as u64)
            .sum::<u64>()
            + self.order_violations.unwrap_or(0)
    }

    /// The tables and the machine-readable last line.
    pub fn render(&self) -> String {
        let l = &self.latency;
        let mut s = render(&self.tenants);
        s.push_str(&format!(
            "\n| latency, outbox to partner ack | events | p50 ms | p99 ms |\n|---|---|---|---|\n\
             | healthy tenants | {} | {:.1} | {:.1} |\n| all tenants | {} | | {:.1} |\n",
            l.healthy, l.p50_ms, l.p99_ms, l.all, l.all_p99_ms
        ));
        if let Some((since, w)) = &self.window {
            s.push_str(&format!(
                "| healthy tenants, written since {} | {} | {:.1} | {:.1} |\n",
                since.format("%H:%M:%S"),
                w.healthy,
                w.p50_ms,
                w.p99_ms
            ));
        }
        s.push('\n');
        let l = self.window.as_ref().map_or(l, |(_, w)| w);
        let drift: usize = self.tenants.iter().map(TenantDrift::drift).sum();
        let duplicates: usize = self.tenants.iter().map(|d| d.duplicates).sum();
        let order = self
            .order_violations
            .map_or_else(|| "unchecked".to_owned(), |n| n.to_string());
        s.push_str(&format!(
            "tenants={} events={} drift={drift} order_violations={order} \
             duplicate_objects={duplicates} p50_ms={:.0} p99_ms={:.0}\n",
            self.tenants.len(),
            l.events,
            l.p50_ms.ceil(),
            l.p99_ms.ceil()
        ));
        s
    }
}

/// The per-tenant table.
pub fn render(report: &[TenantDrift]) -> String {
    let mut s = String::from(
        "| tenant | products | missing | stale | orphans | duplicates |\n|---|---|---|---|---|---|\n",
    );
    for d in report
        .iter()
        .filter(|d| d.drift() + d.duplicates > 0)
        .take(50)
    {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            d.tenant, d.products, d.missing, d.stale, d.orphans, d.duplicates
        ));
    }
    let products: usize = report.iter().map(|d| d.products).sum();
    s.push_str(&format!(
        "| all {} tenants | {products} | | | | |\n",
        report.len(),
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, ext: &str, name: &str) -> ShopItem {
        ShopItem {
            id: id.into(),
            name: name.into(),
            description: String::new(),
            external_id: ext.into(),
        }
    }

    fn price(id: &str, item: &str, ext: &str, amount: i64) -> ShopPrice {
        ShopPrice {
            id: id.into(),
            item_id: item.into(),
            amount_minor: amount,
            currency: "EUR".into(),
            external_id: ext.into(),
        }
    }

    fn product(id: &str, name: &str, amount: i64) -> (String, Product) {
        (
            id.into(),
            (id.into(), name.into(), String::new(), amount, "EUR".into()),
        )
    }

    #[test]
    fn equal_state_has_no_drift() {
        let ours: HashMap<_, _> = [product("p1", "a", 100)].into_iter().collect();
        let d = compare(
            "t",
            &ours,
            &[item("i1", "p1", "a")],
            &[price("x1", "i1", "p1", 100)],
        );
        assert_eq!(d.drift() + d.duplicates, 0, "{d:?}");
    }

    #[test]
    fn missing_stale_orphans_and_duplicates_are_told_apart() {
        let ours: HashMap<_, _> = [
            product("p1", "a", 100), // stale price
            product("p2", "b", 100), // missing price
            product("p3", "c", 100), // missing entirely
        ]
        .into_iter()
        .collect();
        let items = [
            item("i1", "p1", "a"),
            item("i2", "p2", "b"),
            item("i9", "p9", "gone"), // orphan
            item("i1b", "p1", "a"),   // duplicate
        ];
        let prices = [price("x1", "i1", "p1", 99)];
        let d = compare("t", &ours, &items, &prices);
        assert_eq!(
            (d.missing, d.stale, d.orphans, d.duplicates),
            (2, 1, 1, 1),
            "{d:?}"
        );
    }
}
