//! When the partner is down for everyone: the last outcome of each tenant's recent attempts,
//! and whether most tenants are failing. Pure, no I/O; the caller passes the time.
//!
//! Why a second trigger besides 401/403: an outage that answers 503 or times out looks like a
//! retryable failure of each tenant. Pausing tenant by tenant would park every event of every
//! tenant (and replay it all later); holding consumption instead costs nothing and resumes in
//! place. So when a tenant's retries run out while most recently active tenants are failing
//! too, the failure is the partner's, and the consumer trips the breaker rather than parking.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The recent outcome per tenant and the rule that reads "most tenants are failing".
#[derive(Debug)]
pub struct FailureWindow<K> {
    last: HashMap<K, (bool, Instant)>,
    window: Duration,
    min_tenants: usize,
    ratio: f64,
}

impl<K: Hash + Eq> FailureWindow<K> {
    /// Looks back `window`; "most" means at least `min_tenants` tenants were active and at least
    /// `ratio` (0..=1) of them are failing.
    pub fn new(window: Duration, min_tenants: usize, ratio: f64) -> Self {
        FailureWindow {
            last: HashMap::new(),
            window,
            min_tenants: min_tenants.max(1),
            ratio: ratio.clamp(0.0, 1.0),
        }
    }

    /// A tenant's attempt ended at `now`, failed or not.
    pub fn record(&mut self, tenant: K, failed: bool, now: Instant) {
        self.last.insert(tenant, (failed, now));
    }

    /// Whether most tenants active within the window are failing at `now`. Forgets tenants
    /// older than the window.
    pub fn most_failing(&mut self, now: Instant) -> bool {
        let window = self.window;
        self.last
            .retain(|_, (_, at)| now.saturating_duration_since(*at) <= window);
        let active = self.last.len();
        let failing = self.last.values().filter(|(failed, _)| *failed).count();
        active >= self.min_tenants && failing as f64 >= self.ratio * active as f64
    }

    /// `(failing, active)` tenants as of the last [`FailureWindow::most_failing`].
    pub fn counts(&self) -> (usize, usize) {
        let failing = self.last.values().filter(|(failed, _)| *failed).count();
        (failing, self.last.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> FailureWindow<u32> {
        FailureWindow::new(Duration::from_secs(30), 5, 0.8)
    }

    #[test]
    fn one_failing_tenant_among_many_is_that_tenants_problem() {
        let (mut w, t0) = (window(), Instant::now());
        for t in 0..100 {
            w.record(t, t == 7, t0);
        }
        assert!(!w.most_failing(t0));
        assert_eq!(w.counts(), (1, 100));
    }

    #[test]
    fn most_tenants_failing_is_the_partners_problem() {
        let (mut w, t0) = (window(), Instant::now());
        for t in 0..10 {
            w.record(t, t < 8, t0);
        }
        assert!(w.most_failing(t0), "8 of 10 failing reaches 0.8");
        w.record(7, false, t0);
        assert!(!w.most_failing(t0), "7 of 10 does not");
    }

    #[test]
    fn too_few_tenants_never_trip_it() {
        let (mut w, t0) = (window(), Instant::now());
        for t in 0..4 {
            w.record(t, true, t0);
        }
        assert!(
            !w.most_failing(t0),
            "4 failing tenants are below min_tenants"
        );
        w.record(4, true, t0);
        assert!(w.most_failing(t0));
    }

    #[test]
    fn old_outcomes_are_forgotten() {
        let (mut w, t0) = (window(), Instant::now());
        for t in 0..10 {
            w.record(t, true, t0);
        }
        let later = t0 + Duration::from_secs(31);
        for t in 10..15 {
            w.record(t, false, later);
        }
        assert!(
            !w.most_failing(later),
            "the failures are older than the window"
        );
        assert_eq!(w.counts(), (0, 5));
    }

    #[test]
    fn a_tenant_counts_once_with_its_latest_outcome() {
        let (mut w, t0) = (window(), Instant::now());
        for _ in 0..10 {
            w.record(1, true, t0);
        }
        for t in 2..6 {
            w.record(t, false, t0);
        }
        assert_eq!(w.counts(), (1, 5));
        assert!(!w.most_failing(t0));
        w.record(1, false, t0);
        assert_eq!(w.counts(), (0, 5));
    }
}
