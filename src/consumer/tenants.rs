//! Each tenant's lifecycle on this instance, as one enum with pure transitions that return what
//! the coordinator must do to the tenant's queue. No I/O: the coordinator reads the database and
//! the scheduler and says what happened.
//!
//! Active (no entry) → Paused (a failure here, or a pause recorded elsewhere once nothing of the
//! tenant is in flight here) → Draining (resumed: this instance replays the backlog, new
//! records still parked) → Active (the backlog is empty and the tenant flipped live). A pause
//! recorded elsewhere while one of the tenant's events is in flight here goes through Pausing:
//! the tenant is held, and its queue is parked only once that event has ended, because a
//! failure of that event must be parked ahead of what came after it. Whatever the state, the
//! database saying the tenant is live releases it.
//!
//! Memory: only tenants that are not active have an entry.

use std::collections::{HashMap, HashSet};

/// A tenant's state here, when not active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Paused elsewhere while one of its events is in flight here: held, not yet parking.
    Pausing,
    /// Paused: its records are parked as they arrive.
    Paused,
    /// Resumed: its backlog is being replayed here; its records are still parked.
    Draining,
}

/// What a transition asks the coordinator to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantEffect {
    /// Hold the tenant's queue: nothing of it is dispatched.
    Hold(String),
    /// Park the tenant's queue, in order (it is paused and nothing of it is in flight).
    ParkQueue(String),
    /// Release the tenant: its queue flows again.
    Release(String),
}

/// The tenants that are not active on this instance.
#[derive(Debug, Default)]
pub struct Tenants {
    states: HashMap<String, Lifecycle>,
}

impl Tenants {
    /// Starts from the tenants the database says are paused or draining (their records are
    /// parked; a draining one is replayed by whoever owns its partition).
    pub fn from_database(paused: impl IntoIterator<Item = String>) -> Self {
        let states = paused.into_iter().map(|t| (t, Lifecycle::Paused)).collect();
        Tenants { states }
    }

    /// The tenant's state; `None` when active.
    pub fn state(&self, tenant: &str) -> Option<Lifecycle> {
        self.states.get(tenant).copied()
    }

    /// Whether a record of `tenant` arriving now is parked rather than queued.
    pub fn parks_arrivals(&self, tenant: &str) -> bool {
        matches!(
            self.state(tenant),
            Some(Lifecycle::Paused | Lifecycle::Draining)
        )
    }

    /// Tenants being paused: their attempts stop retrying.
    pub fn pausing(&self) -> impl Iterator<Item = &String> {
        self.states
            .iter()
            .filter(|(_, s)| **s == Lifecycle::Pausing)
            .map(|(t, _)| t)
    }

    /// Tenants not active here, whatever the state.
    pub fn not_active(&self) -> impl Iterator<Item = &String> {
        self.states.keys()
    }

    /// This instance paused `tenant` (a failure, a refused record); the caller parks the event
    /// and the tenant's queue with the pause.
    pub fn paused_here(&mut self, tenant: &str) -> Vec<TenantEffect> {
        let was = self.states.insert(tenant.to_owned(), Lifecycle::Paused);
        match was {
            None => vec![TenantEffect::Hold(tenant.to_owned())],
            Some(_) => Vec::new(),
        }
    }

    /// The database says `now` are paused or draining: newly paused tenants are held (parked
    /// once idle, see [`Tenants::idle`]); tenants it says are live are released.
    pub fn observe(&mut self, now: &HashSet<String>) -> Vec<TenantEffect> {
        let mut effects = Vec::new();
        let live: Vec<String> = self
            .states
            .keys()
            .filter(|t| !now.contains(*t))
            .cloned()
            .collect();
        for tenant in live {
            effects.extend(self.live(&tenant));
        }
        for tenant in now {
            if !self.states.contains_key(tenant) {
                self.states.insert(tenant.clone(), Lifecycle::Pausing);
                effects.push(TenantEffect::Hold(tenant.clone()));
            }
        }
        effects
    }

    /// Nothing of `tenant` is in flight (nor held by the breaker): a pausing tenant's queue is
    /// parked now.
    pub fn idle(&mut self, tenant: &str) -> Vec<TenantEffect> {
        match self.states.get_mut(tenant) {
            Some(state @ Lifecycle::Pausing) => {
                *state = Lifecycle::Paused;
                vec![TenantEffect::ParkQueue(tenant.to_owned())]
            }
            _ => Vec::new(),
        }
    }

    /// The tenant is live in the database (flipped elsewhere): released.
    pub fn live(&mut self, tenant: &str) -> Vec<TenantEffect> {
        match self.states.remove(tenant) {
            Some(_) => vec![TenantEffect::Release(tenant.to_owned())],
            None => Vec::new(),
        }
    }

    /// A replay of the backlog may start: only a paused tenant, and one at a time.
    pub fn start_drain(&mut self, tenant: &str) -> bool {
        match self.states.get_mut(tenant) {
            Some(state @ Lifecycle::Paused) => {
                *state = Lifecycle::Draining;
                true
            }
            _ => false,
        }
    }

    /// The replay ended: `flipped` when the backlog was empty and the tenant flipped live
    /// (released); otherwise it stays paused (a failure, an error, a lost partition).
    pub fn drain_ended(&mut self, tenant: &str, flipped: bool) -> Vec<TenantEffect> {
        if self.state(tenant) != Some(Lifecycle::Draining) {
            return Vec::new();
        }
        if flipped {
            return self.live(tenant);
        }
        self.states.insert(tenant.to_owned(), Lifecycle::Paused);
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(tenants: &[&str]) -> HashSet<String> {
        tenants.iter().map(|t| (*t).to_owned()).collect()
    }

    #[test]
    fn a_pause_from_elsewhere_waits_for_the_event_in_flight_then_parks() {
        let mut t = Tenants::default();
        assert_eq!(t.observe(&set(&["a"])), [TenantEffect::Hold("a".into())]);
        assert_eq!(t.state("a"), Some(Lifecycle::Pausing));
        assert!(!t.parks_arrivals("a"), "queued behind the event in flight");
        assert_eq!(t.idle("a"), [TenantEffect::ParkQueue("a".into())]);
        assert!(t.parks_arrivals("a"));
        assert!(t.idle("a").is_empty(), "parked once");
    }

    #[test]
    fn a_drain_replays_a_paused_tenant_once_and_flips_it_live() {
        let mut t = Tenants::default();
        assert_eq!(t.paused_here("a"), [TenantEffect::Hold("a".into())]);
        assert!(t.start_drain("a"));
        assert!(!t.start_drain("a"), "one replay at a time");
        assert!(t.parks_arrivals("a"), "new records park while draining");
        assert!(t.drain_ended("a", false).is_empty());
        assert_eq!(t.state("a"), Some(Lifecycle::Paused));
        assert!(t.start_drain("a"));
        assert_eq!(
            t.drain_ended("a", true),
            [TenantEffect::Release("a".into())]
        );
        assert_eq!(t.state("a"), None);
    }

    #[test]
    fn the_database_saying_live_releases_whatever_the_state() {
        let mut t = Tenants::from_database(["a".to_owned(), "b".to_owned()]);
        t.start_drain("b");
        t.observe(&set(&["a", "b", "c"]));
        let mut effects = t.observe(&set(&[]));
        effects.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            effects,
            [
                TenantEffect::Release("a".into()),
                TenantEffect::Release("b".into()),
                TenantEffect::Release("c".into())
            ]
        );
        assert!(t.drain_ended("b", true).is_empty(), "already live");
        assert_eq!(t.not_active().count(), 0);
    }

    proptest! {
        /// Against a model of the scheduler's hold: a tenant is held exactly while it has an
        /// entry, arrivals park only when it is paused or draining, a drain starts only from
        /// paused, and memory holds only tenants that are not active.
        #[test]
        fn effects_keep_the_scheduler_in_step(ops in proptest::collection::vec((0u8..7, 0u8..4), 1..200)) {
            let mut t = Tenants::default();
            let mut held: HashSet<String> = HashSet::new();
            let mut db: HashSet<String> = HashSet::new();
            for (op, n) in ops {
                let tenant = format!("t{n}");
                let before = t.state(&tenant);
                let effects = match op {
                    0 => t.paused_here(&tenant),
                    1 => { db.insert(tenant.clone()); t.observe(&db) }
                    2 => { db.remove(&tenant); t.observe(&db) }
                    3 => t.idle(&tenant),
                    4 => {
                        let started = t.start_drain(&tenant);
                        prop_assert_eq!(started, before == Some(Lifecycle::Paused));
                        Vec::new()
                    }
                    5 => t.drain_ended(&tenant, true),
                    _ => t.drain_ended(&tenant, false),
                };
                for effect in effects {
                    match effect {
                        TenantEffect::Hold(x) => prop_assert!(held.insert(x), "held twice"),
                        TenantEffect::Release(x) => prop_assert!(held.remove(&x), "released unheld"),
                        TenantEffect::ParkQueue(x) => prop_assert!(held.contains(&x), "parked unheld"),
                    }
                }
                let tracked: HashSet<String> = t.not_active().cloned().collect();
                prop_assert_eq!(&tracked, &held);
                prop_assert_eq!(t.parks_arrivals(&tenant), matches!(t.state(&tenant), Some(Lifecycle::Paused | Lifecycle::Draining)));
            }
        }
    }
}
