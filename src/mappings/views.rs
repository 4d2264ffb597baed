//! Views: each tenant's switch and mappings, held in memory while its partition is owned here,
//! so that an event's handling starts without a query.
//!
//! **Why a view can stand in for the table.** While this process owns a tenant's partition,
//! nothing else changes what a view holds:
//! - *Mappings* are written only by the consumer that owns the tenant's partition, through its
//!   settlement batches ([`super::Mappings::written`]), and each batch that commits is applied
//!   here the way the table applies it ([`Views::apply`]).
//! - *The switch* changes only with a marker in the tenant's own stream (`ferry tenant
//!   enable|disable` writes both in one transaction). The view does not follow the markers: a
//!   marker can be skipped by an operator, or copied back long after it was written. The
//!   integration drops the tenant's view when it handles one ([`Views::forget`]), and the next
//!   event reads the switch from the table, as every event did before views.
//!
//! A view is loaded from the table at the tenant's first event ([`Views::begin_load`],
//! [`Views::finish_load`]) and dropped whenever that argument could fail:
//! - a rebalance (the partition may have been another member's in between), a consumer that
//!   stops, a batch that failed (it may have committed before its answer was lost), a tenant
//!   whose backlog starts replaying (an operator may have skipped a marker while it was
//!   paused): [`Views::forget`], [`Views::clear`];
//! - two transactions writing the tenant's mappings at once ([`Views::write_began`]): which
//!   commits first is not known here, so no view can apply them in the right order;
//! - a load during which a transaction writing the tenant's mappings may have committed: it is
//!   not kept ([`Views::write_ended`], and `dirty` for a batch applied meanwhile), and the
//!   next event reads the table again. That covers a batch of a consumer that stopped on an
//!   error and whose task still runs: its tenants stay unheld until it ends.
//!
//! Memory is bounded: a tenant with more than `tenant_max` mappings, or one that would take the
//! views of the integration past `budget` mappings in all, is read per event as before
//! (`PerEvent`) until the next rebalance. Evicting others to make room would not do: with more
//! tenants than fit, each would evict the next and every event would load a whole tenant.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use super::{Mapped, MappingChange};

/// A tenant's mappings of one integration held at most, per tenant, by default.
pub const TENANT_MAX: usize = 10_000;
/// Mappings held at most by all the views of one integration together, by default: about
/// 200 bytes each, so some 20 MB.
pub const BUDGET: usize = 100_000;

/// One tenant's view: its switch and every mapping, as durable.
#[derive(Debug, Default)]
struct View {
    enabled: bool,
    /// By object type and our id.
    mapped: HashMap<(String, String), Mapped>,
}

#[derive(Debug)]
enum Slot {
    /// Being read from the table; `dirty` once a batch of the tenant committed meanwhile.
    Loading {
        dirty: bool,
    },
    Held(View),
    /// More mappings than a view holds, or than the budget has room for: read per event.
    PerEvent,
}

/// What a view knows of one event's object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The tenant's switch.
    pub enabled: bool,
    /// Per object type asked for, its mapping if any.
    pub mapped: Vec<(String, Mapped)>,
}

/// The views of one integration (module doc).
#[derive(Debug)]
pub struct Views {
    slots: HashMap<String, Slot>,
    /// Transactions writing each tenant's mappings that may still commit.
    writing: HashMap<String, usize>,
    /// Mappings held by all views.
    entries: usize,
    tenant_max: usize,
    budget: usize,
}

impl Default for Views {
    fn default() -> Self {
        Views::new(TENANT_MAX, BUDGET)
    }
}

impl Views {
    /// Views holding at most `tenant_max` mappings per tenant and `budget` in all (0: none,
    /// every tenant read per event).
    pub fn new(tenant_max: usize, budget: usize) -> Self {
        Views {
            slots: HashMap::new(),
            writing: HashMap::new(),
            entries: 0,
            tenant_max: tenant_max.min(budget),
            budget,
        }
    }

    /// The largest number of a tenant's mappings a load may read: one more than a view holds,
    /// so that a tenant over the limit is told apart.
    pub fn load_limit(&self) -> usize {
        self.tenant_max + 1
    }

    /// What `tenant`'s view says of our id `local_id` for each of `object_types`, if the
    /// tenant is held.
    pub fn seen(&self, tenant: &str, object_types: &[&str], local_id: &str) -> Option<Seen> {
        let Some(Slot::Held(view)) = self.slots.get(tenant) else {
            return None;
        };
        let mut mapped = Vec::new();
        for object_type in object_types {
            let key = ((*object_type).to_owned(), local_id.to_owned());
            if let Some(m) = view.mapped.get(&key) {
                mapped.push((key.0, m.clone()));
            }
        }
        Some(Seen {
            enabled: view.enabled,
            mapped,
        })
    }

    /// Whether `tenant`'s view should be read from the table now; if so, its slot waits for
    /// [`Views::finish_load`]. Not for a tenant held already, or too large to hold.
    pub fn begin_load(&mut self, tenant: &str) -> bool {
        if self.budget == 0 {
            return false;
        }
        match self.slots.get(tenant) {
            Some(Slot::Held(_) | Slot::PerEvent) => false,
            // A load that failed: what happened during it still counts.
            Some(Slot::Loading { .. }) => true,
            None => {
                self.slots
                    .insert(tenant.to_owned(), Slot::Loading { dirty: false });
                true
            }
        }
    }

    /// `tenant`'s switch and mappings as read (at most [`Views::load_limit`] of them): held from
    /// now on, unless a batch of the tenant committed during the read (it may have read the
    /// table before the batch), or they are more than a view holds or the budget has room for.
    pub fn finish_load(
        &mut self,
        tenant: &str,
        enabled: bool,
        rows: impl ExactSizeIterator<Item = (String, String, Mapped)>,
    ) {
        let Some(Slot::Loading { dirty }) = self.slots.get(tenant) else {
            return;
        };
        if *dirty || self.writing.contains_key(tenant) {
            self.slots.remove(tenant);
            return;
        }
        if rows.len() > self.tenant_max || self.entries + rows.len() > self.budget {
            self.slots.insert(tenant.to_owned(), Slot::PerEvent);
            return;
        }
        let mapped: HashMap<_, _> = rows.map(|(o, l, m)| ((o, l), m)).collect();
        self.entries += mapped.len();
        let view = View { enabled, mapped };
        self.slots.insert(tenant.to_owned(), Slot::Held(view));
    }

    /// A change a batch made durable, applied as the table applies it: a mapping set to the
    /// object it names already keeps its entry (and the event that created it).
    pub fn apply(&mut self, change: &MappingChange) {
        let view = match self.slots.get_mut(&change.tenant) {
            Some(Slot::Held(view)) => view,
            Some(Slot::Loading { dirty }) => {
                *dirty = true;
                return;
            }
            Some(Slot::PerEvent) | None => return,
        };
        let key = (change.object_type.clone(), change.local_id.clone());
        let Some(m) = &change.mapped else {
            if view.mapped.remove(&key).is_some() {
                self.entries -= 1;
            }
            return;
        };
        match view.mapped.entry(key) {
            Entry::Occupied(held) if held.get().foreign_id == m.foreign_id => return,
            Entry::Occupied(mut held) => {
                held.insert(m.clone());
                return;
            }
            Entry::Vacant(slot) => {
                slot.insert(m.clone());
            }
        }
        self.entries += 1;
        if view.mapped.len() > self.tenant_max || self.entries > self.budget {
            self.drop_tenant(&change.tenant);
            self.slots.insert(change.tenant.clone(), Slot::PerEvent);
        }
    }

    /// `tenant` is read from the table again at its next event (a tenant read per event
    /// stays so).
    pub fn forget(&mut self, tenant: &str) {
        match self.slots.get_mut(tenant) {
            Some(Slot::Held(_)) => self.drop_tenant(tenant),
            Some(Slot::Loading { dirty }) => *dirty = true,
            Some(Slot::PerEvent) | None => {}
        }
    }

    /// A transaction writing `tenant`'s mappings began. A second one while the first may
    /// still commit drops the view: the order they commit in is not known here.
    pub fn write_began(&mut self, tenant: &str) {
        let n = self.writing.entry(tenant.to_owned()).or_default();
        *n += 1;
        if *n > 1 {
            self.forget(tenant);
        }
    }

    /// A transaction writing `tenant`'s mappings ended, committed or not: a load under way
    /// may have read the table before it and is not kept.
    pub fn write_ended(&mut self, tenant: &str) {
        if let Some(n) = self.writing.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                self.writing.remove(tenant);
            }
        }
        if let Some(Slot::Loading { dirty }) = self.slots.get_mut(tenant) {
            *dirty = true;
        }
    }

    fn drop_tenant(&mut self, tenant: &str) {
        if let Some(Slot::Held(view)) = self.slots.remove(tenant) {
            self.entries -= view.mapped.len();
        }
    }

    /// Every tenant is read from the table again at its next event. Writes under way stay
    /// counted: they may still commit.
    pub fn clear(&mut self) {
        self.slots.clear();
        self.entries = 0;
    }

    /// Mappings held.
    #[cfg(test)]
    pub fn entries(&self) -> usize {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(foreign: &str, by: Option<u128>) -> Mapped {
        Mapped {
            foreign_id: foreign.into(),
            created_by: by.map(uuid::Uuid::from_u128),
        }
    }

    fn row(local: &str, foreign: &str) -> (String, String, Mapped) {
        ("item".into(), local.into(), mapped(foreign, None))
    }

    fn change(tenant: &str, local: &str, to: Option<Mapped>) -> MappingChange {
        MappingChange {
            tenant: tenant.into(),
            object_type: "item".into(),
            local_id: local.into(),
            mapped: to,
        }
    }

    fn held(views: &mut Views, tenant: &str, rows: Vec<(String, String, Mapped)>) {
        assert!(views.begin_load(tenant));
        views.finish_load(tenant, true, rows.into_iter());
    }

    fn foreign(views: &Views, tenant: &str, local: &str) -> Option<Option<String>> {
        let seen = views.seen(tenant, &["item", "price"], local)?;
        Some(seen.mapped.into_iter().next().map(|(_, m)| m.foreign_id))
    }

    #[test]
    fn a_loaded_view_answers_for_mapped_and_unmapped_objects() {
        let mut v = Views::default();
        assert_eq!(
            foreign(&v, "acme", "p1"),
            None,
            "not held: the table answers"
        );
        held(&mut v, "acme", vec![row("p1", "it_1")]);
        assert_eq!(foreign(&v, "acme", "p1"), Some(Some("it_1".into())));
        assert_eq!(foreign(&v, "acme", "p2"), Some(None));
        assert_eq!(foreign(&v, "other", "p1"), None);
        assert!(!v.begin_load("acme"), "held: not read again");
    }

    #[test]
    fn a_committed_batch_is_applied_as_the_table_applies_it() {
        let mut v = Views::default();
        held(&mut v, "acme", vec![row("p1", "it_1")]);
        v.apply(&change("acme", "p2", Some(mapped("it_2", Some(2)))));
        assert_eq!(foreign(&v, "acme", "p2"), Some(Some("it_2".into())));
        // Set to the object it names already: the entry keeps the event that created it.
        v.apply(&change("acme", "p2", Some(mapped("it_2", Some(3)))));
        let seen = v.seen("acme", &["item"], "p2").unwrap();
        assert_eq!(seen.mapped[0].1.created_by, Some(uuid::Uuid::from_u128(2)));
        // Set to another object: replaced whole.
        v.apply(&change("acme", "p1", Some(mapped("it_9", Some(4)))));
        let seen = v.seen("acme", &["item"], "p1").unwrap();
        assert_eq!(seen.mapped[0].1, mapped("it_9", Some(4)));
        v.apply(&change("acme", "p1", None));
        assert_eq!(foreign(&v, "acme", "p1"), Some(None));
        assert_eq!(v.entries(), 1);
        // A tenant not held is not made up from its writes.
        v.apply(&change("other", "p1", Some(mapped("it_1", None))));
        assert_eq!(foreign(&v, "other", "p1"), None);
    }

    #[test]
    fn a_load_that_a_commit_overtook_is_not_kept() {
        let mut v = Views::default();
        assert!(v.begin_load("acme"));
        // The batch commits while the load's query runs: the rows may predate it.
        v.apply(&change("acme", "p1", Some(mapped("it_1", None))));
        v.finish_load("acme", true, Vec::new().into_iter());
        assert_eq!(foreign(&v, "acme", "p1"), None);
        // A marker handled meanwhile does the same.
        assert!(v.begin_load("acme"));
        v.forget("acme");
        v.finish_load("acme", true, Vec::new().into_iter());
        assert!(v.seen("acme", &["item"], "p1").is_none());
        // And a view dropped (a failed batch, a rebalance) while loading.
        assert!(v.begin_load("acme"));
        v.clear();
        v.finish_load("acme", true, Vec::new().into_iter());
        assert!(v.seen("acme", &["item"], "p1").is_none());
        // Undisturbed, it is kept.
        held(&mut v, "acme", vec![row("p1", "it_1")]);
        assert_eq!(foreign(&v, "acme", "p1"), Some(Some("it_1".into())));
    }

    #[test]
    fn a_switch_marker_has_the_next_event_read_the_table() {
        let mut v = Views::default();
        held(&mut v, "acme", vec![row("p1", "it_1")]);
        assert!(v.seen("acme", &[], "p1").unwrap().enabled);
        // Skipped by an operator or copied back, a marker's switch may not be the table's.
        v.forget("acme");
        assert!(v.seen("acme", &[], "p1").is_none());
        assert!(v.begin_load("acme"));
        v.finish_load("acme", false, Vec::new().into_iter());
        assert!(!v.seen("acme", &[], "p1").unwrap().enabled);
        assert_eq!(v.entries(), 0);
    }

    #[test]
    fn a_tenant_written_by_two_transactions_at_once_is_not_held() {
        let mut v = Views::default();
        held(&mut v, "acme", vec![row("p1", "it_1")]);
        // One writer: its batch is applied when it is durable, in order.
        v.write_began("acme");
        assert!(v.seen("acme", &["item"], "p1").is_some());
        // A second one before the first ended: which commits first is not known.
        v.write_began("acme");
        assert!(v.seen("acme", &["item"], "p1").is_none());
        // Nor is a load kept while either may still commit (a stopped consumer's batch).
        assert!(v.begin_load("acme"));
        v.finish_load("acme", true, Vec::new().into_iter());
        assert!(v.seen("acme", &["item"], "p1").is_none());
        v.write_ended("acme");
        assert!(v.begin_load("acme"));
        // Ended during the load: the load may have read the table before its commit.
        v.write_ended("acme");
        v.finish_load("acme", true, Vec::new().into_iter());
        assert!(v.seen("acme", &["item"], "p1").is_none());
        // With no write under way, the next load is kept.
        held(&mut v, "acme", vec![row("p1", "it_2")]);
        assert_eq!(foreign(&v, "acme", "p1"), Some(Some("it_2".into())));
        // A failed load leaves its slot loading; what happened meanwhile still counts.
        assert!(v.begin_load("beta"));
        v.write_began("beta");
        v.write_ended("beta");
        assert!(v.begin_load("beta"));
        v.finish_load("beta", true, Vec::new().into_iter());
        assert!(v.seen("beta", &["item"], "p1").is_none());
    }

    #[test]
    fn no_budget_holds_no_tenant() {
        let mut v = Views::new(TENANT_MAX, 0);
        assert!(!v.begin_load("acme"));
        v.finish_load("acme", true, Vec::new().into_iter());
        assert!(v.seen("acme", &["item"], "p1").is_none());
    }

    #[test]
    fn memory_is_bounded_per_tenant_and_in_all() {
        let mut v = Views::new(2, 3);
        assert_eq!(v.load_limit(), 3);
        // Over the tenant's limit: read per event from then on.
        assert!(v.begin_load("big"));
        let rows = vec![row("p1", "a"), row("p2", "b"), row("p3", "c")];
        v.finish_load("big", true, rows.into_iter());
        assert!(v.seen("big", &["item"], "p1").is_none());
        assert!(!v.begin_load("big"));
        // Two tenants of two do not fit in three: the second is read per event, and the first
        // stays held (evicting it would have each tenant evict the next).
        held(&mut v, "a", vec![row("p1", "a1"), row("p2", "a2")]);
        assert!(v.begin_load("b"));
        v.finish_load(
            "b",
            true,
            vec![row("p1", "b1"), row("p2", "b2")].into_iter(),
        );
        assert!(v.seen("b", &["item"], "p1").is_none());
        assert!(!v.begin_load("b"));
        assert_eq!(foreign(&v, "a", "p1"), Some(Some("a1".into())));
        assert_eq!(v.entries(), 2);
        // A view that grows past the tenant's limit lets go.
        v.apply(&change("a", "p3", Some(mapped("a3", None))));
        assert!(v.seen("a", &["item"], "p1").is_none());
        assert_eq!(v.entries(), 0);
        assert!(!v.begin_load("a"));
        // A rebalance lets every tenant load again.
        v.clear();
        assert!(v.begin_load("b"));
        v.finish_load(
            "b",
            true,
            vec![row("p1", "b1"), row("p2", "b2")].into_iter(),
        );
        assert_eq!(foreign(&v, "b", "p2"), Some(Some("b2".into())));
    }
}
