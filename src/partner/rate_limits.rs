//! What the partner allows: requests per second for the whole client and for each account
//! (tenant), as the partner documents them (`partner.rate_limit`, `partner.tenant_rate_limit`).
//! A request waits for both before it is sent: the tenant's first, so a tenant at its own
//! limit holds none of the shared budget while it waits, and no other tenant waits behind it.
//!
//! Why GCRA through `governor` rather than a window counter of our own: it is the maintained
//! implementation of the algorithm partners themselves use (a burst of a second's worth, then
//! evenly spaced), keyed state is lock-free, and forgetting idle tenants is built in.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How often (in requests) the tenants idle long enough to be back at a full budget are
/// forgotten: the per-tenant state is bounded by the tenants active within about a second.
const FORGET_EVERY: u64 = 4096;

/// The partner's rate limits; none by default.
#[derive(Debug, Default)]
pub struct RateLimits {
    partner: Option<DefaultDirectRateLimiter>,
    tenant: Option<DefaultKeyedRateLimiter<String>>,
    waits: AtomicU64,
}

impl RateLimits {
    /// Limits of `partner` requests per second for the client and `tenant` per account.
    pub fn new(partner: Option<NonZeroU32>, tenant: Option<NonZeroU32>) -> Self {
        RateLimits {
            partner: partner.map(|n| RateLimiter::direct(Quota::per_second(n))),
            tenant: tenant.map(|n| RateLimiter::keyed(Quota::per_second(n))),
            waits: AtomicU64::new(0),
        }
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.partner.is_some() || self.tenant.is_some()
    }

    /// Waits until `account` may send its next request.
    pub async fn wait(&self, account: &str) {
        if let Some(tenant) = &self.tenant {
            let key = account.to_owned();
            tenant.until_key_ready(&key).await;
            if self.waits.fetch_add(1, Ordering::Relaxed) % FORGET_EVERY == FORGET_EVERY - 1 {
                tenant.retain_recent();
            }
        }
        if let Some(partner) = &self.partner {
            partner.until_ready().await;
        }
    }

    /// Tenants whose limiter state is kept.
    pub fn tenants_tracked(&self) -> usize {
        self.tenant.as_ref().map_or(0, |t| t.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_limit_never_waits_and_tracks_nobody() {
        let limits = RateLimits::default();
        assert!(!limits.is_limited());
        for t in 0..100 {
            limits.wait(&format!("t{t}")).await;
        }
        assert_eq!(limits.tenants_tracked(), 0);
    }

    #[tokio::test]
    async fn idle_tenants_are_forgotten() {
        let limits = RateLimits::new(None, NonZeroU32::new(1000));
        for t in 0..FORGET_EVERY - 1 {
            limits.wait(&format!("t{t}")).await;
        }
        assert_eq!(limits.tenants_tracked() as u64, FORGET_EVERY - 1);
        // Each spent one request of a thousand a second: back at a full budget a second
        // later, and forgotten at the next sweep.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        limits.wait("last").await;
        assert!(
            limits.tenants_tracked() <= 1,
            "{}",
            limits.tenants_tracked()
        );
    }
}
