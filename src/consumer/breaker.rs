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

/// The smallest size at which [`FailureWindow`] looks for outcomes to forget.
const MIN_PRUNE_AT: usize = 1024;

/// The recent outcome per tenant and the rule that reads "most tenants are failing".
#[derive(Debug)]
pub struct FailureWindow<K> {
    last: HashMap<K, (bool, Instant)>,
    /// When `last` reaches this size, outcomes older than the window are dropped: memory stays
    /// within twice the tenants active in a window, however many tenants pass through.
    prune_at: usize,
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
            prune_at: MIN_PRUNE_AT,
            window,
            min_tenants: min_tenants.max(1),
            ratio: ratio.clamp(0.0, 1.0),
        }
    }

    /// A tenant's attempt ended at `now`, failed or not.
    pub fn record(&mut self, tenant: K, failed: bool, now: Instant) {
        self.last.insert(tenant, (failed, now));
        if self.last.len() >= self.prune_at {
            self.forget_old(now);
            self.prune_at = (self.last.len() * 2).max(MIN_PRUNE_AT);
        }
    }

    fn forget_old(&mut self, now: Instant) {
        let window = self.window;
        self.last
            .retain(|_, (_, at)| now.saturating_duration_since(*at) <= window);
    }

    /// Tenants remembered now: the memory this costs.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// Whether no tenant is remembered.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// Whether most tenants active within the window are failing at `now`. Forgets tenants
    /// older than the window.
    pub fn most_failing(&mut self, now: Instant) -> bool {
        self.forget_old(now);
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

/// The partner-wide circuit breaker as a pure machine: closed (events flow), open (consumption
/// paused, the events that met the refusal held in tenant order), probing (the first held event
/// is being tried). Each transition returns what the coordinator must do to Kafka.
#[derive(Debug, Default)]
pub enum Breaker<T> {
    /// Events flow.
    #[default]
    Closed,
    /// Consumption is paused; these events wait, the first is the next probe.
    Open {
        /// Held events, in the order they met the refusal.
        held: Vec<T>,
    },
    /// The first held event is being tried; these wait behind it.
    Probing {
        /// The rest of the held events.
        held: Vec<T>,
    },
}

/// What a breaker transition asks of the consumer.
#[derive(Debug, PartialEq, Eq)]
pub enum BreakerEffect<T> {
    /// Nothing to do.
    None,
    /// Pause every assigned partition: the partner refuses everyone.
    PauseConsumption,
    /// Resume consumption; these held events run first, each ahead of its tenant's queue.
    Resume(Vec<T>),
}

impl<T> Breaker<T> {
    /// Whether events may be dispatched.
    pub fn is_closed(&self) -> bool {
        matches!(self, Breaker::Closed)
    }

    /// Whether a probe may start now.
    pub fn may_probe(&self) -> bool {
        matches!(self, Breaker::Open { held } if !held.is_empty())
    }

    /// An event met a partner-wide failure: hold it; the first one opens the breaker.
    pub fn trip(&mut self, event: T) -> BreakerEffect<T> {
        match self {
            Breaker::Closed => {
                *self = Breaker::Open { held: vec![event] };
                BreakerEffect::PauseConsumption
            }
            Breaker::Open { held } | Breaker::Probing { held } => {
                held.push(event);
                BreakerEffect::None
            }
        }
    }

    /// Takes the first held event as the probe.
    pub fn probe(&mut self) -> Option<T> {
        let Breaker::Open { held } = self else {
            return None;
        };
        if held.is_empty() {
            return None;
        }
        let first = held.remove(0);
        *self = Breaker::Probing {
            held: std::mem::take(held),
        };
        Some(first)
    }

    /// The probe ended and the partner answered it (delivered, or refused the event itself):
    /// close, and run what was held.
    pub fn probe_answered(&mut self) -> BreakerEffect<T> {
        match std::mem::take(self) {
            Breaker::Probing { held } | Breaker::Open { held } => BreakerEffect::Resume(held),
            Breaker::Closed => BreakerEffect::None,
        }
    }

    /// The probe met the partner-wide failure again: hold it first, stay open.
    pub fn probe_failed(&mut self, probe: T) {
        if let Breaker::Probing { held } = self {
            let mut all = vec![probe];
            all.append(held);
            *self = Breaker::Open { held: all };
        }
    }

    /// The probe ended without an answer (its partition was lost): stay open with the rest.
    pub fn probe_lost(&mut self) -> BreakerEffect<T> {
        if let Breaker::Probing { held } = self {
            *self = Breaker::Open {
                held: std::mem::take(held),
            };
        }
        self.forget(|_| false)
    }

    /// Drops the held events `lost` says are no longer ours (their partition was revoked);
    /// with nothing left to probe with and no probe under way, the breaker closes.
    pub fn forget(&mut self, mut lost: impl FnMut(&T) -> bool) -> BreakerEffect<T> {
        match self {
            Breaker::Closed => BreakerEffect::None,
            Breaker::Probing { held } => {
                held.retain(|t| !lost(t));
                BreakerEffect::None
            }
            Breaker::Open { held } => {
                held.retain(|t| !lost(t));
                if held.is_empty() {
                    *self = Breaker::Closed;
                    BreakerEffect::Resume(Vec::new())
                } else {
                    BreakerEffect::None
                }
            }
        }
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
    fn memory_is_bounded_by_the_tenants_active_in_a_window() {
        // Tried: a million distinct tenant keys, each seen once, a millisecond apart (30,000 in any 30 s window).
        let (mut w, t0) = (window(), Instant::now());
        for t in 0..1_000_000u32 {
            let now = t0 + Duration::from_millis(u64::from(t));
            w.record(t, false, now);
            assert!(w.len() <= 2 * 30_001 + MIN_PRUNE_AT, "{} at {t}", w.len());
        }
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
    #[test]
    fn the_breaker_opens_on_the_first_trip_and_probes_with_the_first_held() {
        let mut b = Breaker::default();
        assert!(b.is_closed() && !b.may_probe());
        assert_eq!(b.trip(1), BreakerEffect::PauseConsumption);
        assert_eq!(b.trip(2), BreakerEffect::None);
        assert!(!b.is_closed() && b.may_probe());
        assert_eq!(b.probe(), Some(1));
        assert!(!b.may_probe(), "one probe at a time");
        assert_eq!(
            b.trip(3),
            BreakerEffect::None,
            "a late failure joins the held"
        );
        b.probe_failed(1);
        assert_eq!(b.probe(), Some(1), "the failed probe is tried first again");
        assert_eq!(b.probe_answered(), BreakerEffect::Resume(vec![2, 3]));
        assert!(b.is_closed());
    }

    #[test]
    fn a_breaker_whose_held_events_all_went_elsewhere_closes() {
        let mut b = Breaker::default();
        b.trip(1);
        b.trip(2);
        assert_eq!(b.forget(|t| *t == 1), BreakerEffect::None);
        assert_eq!(b.forget(|_| true), BreakerEffect::Resume(vec![]));
        assert!(b.is_closed());
        // A probe whose partition was lost leaves the rest held.
        b.trip(1);
        b.trip(2);
        assert_eq!(b.probe(), Some(1));
        assert_eq!(b.probe_lost(), BreakerEffect::None);
        assert_eq!(b.probe(), Some(2));
        assert_eq!(b.probe_lost(), BreakerEffect::Resume(vec![]));
        assert!(b.is_closed());
    }

    proptest::proptest! {
        /// Whatever happens, an event held by the breaker is never lost by it: each is probed,
        /// released by a resume, or dropped only by `forget`'s own predicate.
        #[test]
        fn the_breaker_never_loses_a_held_event(ops in proptest::collection::vec(0u8..6, 1..100)) {
            let mut b = Breaker::default();
            let (mut next, mut out, mut probing) = (0u32, Vec::new(), None);
            let mut dropped = Vec::new();
            for op in ops {
                let effect = match op {
                    0 | 1 => { next += 1; b.trip(next) }
                    2 => { if let Some(p) = b.probe() { probing = Some(p); } BreakerEffect::None }
                    3 => match probing.take() { Some(p) => { out.push(p); b.probe_answered() } None => BreakerEffect::None },
                    4 => { if let Some(p) = probing.take() { b.probe_failed(p); } BreakerEffect::None }
                    _ => b.forget(|t| { let lost = t % 3 == 0; if lost { dropped.push(*t); } lost }),
                };
                if let BreakerEffect::Resume(held) = effect { out.extend(held); }
                proptest::prop_assert_eq!(b.is_closed(), matches!(b, Breaker::Closed));
            }
            let mut all: Vec<u32> = out.into_iter().chain(dropped).chain(probing).collect();
            match &b { Breaker::Open { held } | Breaker::Probing { held } => all.extend(held.iter().copied()), Breaker::Closed => {} }
            all.sort();
            proptest::prop_assert_eq!(all, (1..=next).collect::<Vec<_>>());
        }
    }
}
