//! `ferry verify`: our products against the partner's items and prices, per tenant. Drift is
//! every product missing on the partner or different there, and every partner object whose
//! product is gone; duplicates are objects sharing our id with another of their kind.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sqlx::PgPool;

use super::api::{ShopItem, ShopPrice};
use super::client::{Call, PartnerClient};
use crate::delivery::Failure;

/// One tenant's comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

/// Compares every tenant that has products, plus `also` (tenants whose products may all be
/// deleted), in tenant order.
pub async fn verify(
    pool: &PgPool,
    client: &PartnerClient,
    also: &[String],
) -> Result<Vec<TenantDrift>, VerifyError> {
    let rows: Vec<(String, uuid::Uuid, String, String, i64, String)> = sqlx::query_as(
        "SELECT tenant_id, id, name, description, price_minor, currency FROM products ORDER BY tenant_id",
    )
    .fetch_all(pool)
    .await?;
    let mut products: BTreeMap<String, HashMap<String, Product>> = BTreeMap::new();
    for (tenant, id, name, description, price, currency) in rows {
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

/// The table and the machine-readable last line.
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
    let drift: usize = report.iter().map(TenantDrift::drift).sum();
    let duplicates: usize = report.iter().map(|d| d.duplicates).sum();
    s.push_str(&format!(
        "| all {} tenants | {products} | | | | |\n\ntenants={} products={products} drift={drift} duplicate_objects={duplicates}\n",
        report.len(),
        report.len()
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
