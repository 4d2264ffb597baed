//! `ferry verify` for a webhooks integration: what Ferry recorded as delivered to each tenant's
//! endpoint against what the endpoint received (the simulator's receiver), and every event a
//! tenant's endpoint should have had that Ferry never settled (lost).
//!
//! A tenant is owed every event of a type the file declares, written since its endpoint was
//! set, unless the event was addressed to another integration. Drift is the difference between
//! Ferry's delivered count and the receiver's, plus the owed events left unsettled; the
//! receiver adds its duplicates, order violations and refused signatures.

use std::collections::BTreeMap;

use sqlx::PgPool;

use super::receiver::{Report, Seen};
use crate::partner::verify::Latency;

/// One tenant's account.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HookDrift {
    /// The tenant.
    pub tenant: String,
    /// Events Ferry recorded as delivered to its endpoint.
    pub delivered: u64,
    /// Events owed to it that Ferry never settled.
    pub unsettled: u64,
    /// What its endpoint saw.
    pub seen: Seen,
}

impl HookDrift {
    /// Events delivered but not received (or received but not recorded), and events lost.
    pub fn drift(&self) -> u64 {
        self.delivered.abs_diff(self.seen.received) + self.unsettled
    }
}

/// The whole integration's account.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HookVerification {
    /// The integration.
    pub integration: String,
    /// Per tenant with an endpoint or a delivery.
    pub tenants: Vec<HookDrift>,
    /// Latency of the events written since a time (or all), outbox to the endpoint's answer.
    pub latency: Latency,
}

impl HookVerification {
    /// Drift, duplicates, order violations and bad signatures: all must be zero.
    pub fn failures(&self) -> u64 {
        self.tenants
            .iter()
            .map(|t| {
                t.drift() + t.seen.duplicates + t.seen.order_violations + t.seen.bad_signatures
            })
            .sum()
    }

    /// The tenants at fault, then the machine-readable line:
    /// `integration=NAME tenants=N events=N drift=N order_violations=N duplicates=N
    /// bad_signatures=N p50_ms=N p99_ms=N`.
    pub fn render(&self) -> String {
        let mut s = String::from(
            "| tenant | delivered | received | unsettled | duplicates | order violations | bad signatures |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for t in self.tenants.iter().filter(|t| {
            t.drift() + t.seen.duplicates + t.seen.order_violations + t.seen.bad_signatures > 0
        }) {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                t.tenant,
                t.delivered,
                t.seen.received,
                t.unsettled,
                t.seen.duplicates,
                t.seen.order_violations,
                t.seen.bad_signatures
            ));
        }
        let sum = |f: fn(&HookDrift) -> u64| self.tenants.iter().map(f).sum::<u64>();
        s.push_str(&format!(
            "| all {} tenants | {} | {} | {} | | | |\n\n",
            self.tenants.len(),
            sum(|t| t.delivered),
            sum(|t| t.seen.received),
            sum(|t| t.unsettled)
        ));
        s.push_str(&format!(
            "integration={} tenants={} events={} drift={} order_violations={} duplicates={} \
             bad_signatures={} p50_ms={:.0} p99_ms={:.0}\n",
            self.integration,
            self.tenants.len(),
            sum(|t| t.delivered),
            sum(HookDrift::drift),
            sum(|t| t.seen.order_violations),
            sum(|t| t.seen.duplicates),
            sum(|t| t.seen.bad_signatures),
            self.latency.p50_ms,
            self.latency.p99_ms
        ));
        s
    }
}

/// Ferry's records of `integration` (sending `event_types`) against `received`, the receiver's
/// report.
pub async fn verify(
    pool: &PgPool,
    integration: &str,
    event_types: &[String],
    received: &Report,
) -> Result<BTreeMap<String, HookDrift>, sqlx::Error> {
    let delivered: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tenant_id, count(*) FROM deliveries \
         WHERE integration = $1 AND outcome = 'delivered' GROUP BY tenant_id",
    )
    .bind(integration)
    .fetch_all(pool)
    .await?;
    let unsettled: Vec<(String, i64)> = sqlx::query_as(
        "SELECT o.tenant_id, count(*) FROM outbox o \
         JOIN webhook_endpoints e ON e.integration = $1 AND e.tenant_id = o.tenant_id \
         WHERE o.type = ANY($2) AND o.created_at >= e.created_at \
           AND (o.integration IS NULL OR o.integration = $1) \
           AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.integration = $1 \
                             AND d.event_id = o.id AND d.settled_at IS NOT NULL) \
         GROUP BY o.tenant_id",
    )
    .bind(integration)
    .bind(event_types)
    .fetch_all(pool)
    .await?;
    let endpoints: Vec<String> =
        sqlx::query_scalar("SELECT tenant_id FROM webhook_endpoints WHERE integration = $1")
            .bind(integration)
            .fetch_all(pool)
            .await?;
    let mut out: BTreeMap<String, HookDrift> = BTreeMap::new();
    for tenant in endpoints.iter().chain(received.tenants.keys()) {
        at(&mut out, tenant);
    }
    for (tenant, n) in delivered {
        at(&mut out, &tenant).delivered = n as u64;
    }
    for (tenant, n) in unsettled {
        at(&mut out, &tenant).unsettled = n as u64;
    }
    for (tenant, seen) in &received.tenants {
        at(&mut out, tenant).seen = *seen;
    }
    Ok(out)
}

/// The tenant's account in `out`, new if it has none yet.
fn at<'a>(out: &'a mut BTreeMap<String, HookDrift>, tenant: &str) -> &'a mut HookDrift {
    out.entry(tenant.to_owned()).or_insert_with(|| HookDrift {
        tenant: tenant.to_owned(),
        ..HookDrift::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_counts_what_either_side_lacks_and_what_was_lost() {
        let t = |delivered, received, unsettled| HookDrift {
            tenant: "acme".into(),
            delivered,
            unsettled,
            seen: Seen {
                received,
                ..Seen::default()
            },
        };
        assert_eq!(t(10, 10, 0).drift(), 0);
        assert_eq!(
            t(10, 8, 0).drift(),
            2,
            "recorded as delivered, never received"
        );
        assert_eq!(t(8, 10, 0).drift(), 2, "received, never recorded");
        assert_eq!(t(10, 10, 3).drift(), 3, "owed, never settled");
        let v = HookVerification {
            integration: "webhooks".into(),
            tenants: vec![t(10, 10, 0)],
            latency: Latency::default(),
        };
        assert_eq!(v.failures(), 0);
        assert!(v.render().ends_with(
            "integration=webhooks tenants=1 events=10 drift=0 order_violations=0 duplicates=0 \
             bad_signatures=0 p50_ms=0 p99_ms=0\n"
        ));
    }
}
