//! The scheduler: which event runs next. Pure, no I/O.
//!
//! Per tenant a FIFO; at most one event of a tenant in flight (so a tenant's events reach the
//! partner in order); at most `max_in_flight` events in flight in all (so the partner and our
//! memory are bounded); tenants with work take turns (so a busy tenant cannot starve the
//! others). Events of different tenants in the same partition run concurrently: that is
//! where throughput comes from when the partner takes milliseconds per call.
//!
//! A tenant can be *held* (paused, deferred, or parking its backlog): its queue keeps its
//! events but none is dispatched until it is released.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

/// The scheduler, over tenant keys `K` and events `E`.
#[derive(Debug)]
pub struct Scheduler<K, E> {
    queues: HashMap<K, VecDeque<E>>,
    /// Tenants with queued events, nothing in flight, not held: in turn order.
    ready: VecDeque<K>,
    in_flight: HashSet<K>,
    held: HashSet<K>,
    max_in_flight: usize,
    queued: usize,
}

impl<K: Hash + Eq + Clone, E> Scheduler<K, E> {
    /// A scheduler allowing `max_in_flight` events in flight at once (at least 1).
    pub fn new(max_in_flight: usize) -> Self {
        Scheduler {
            queues: HashMap::new(),
            ready: VecDeque::new(),
            in_flight: HashSet::new(),
            held: HashSet::new(),
            max_in_flight: max_in_flight.max(1),
            queued: 0,
        }
    }

    /// An event of `tenant` arrived; it runs after the tenant's earlier events.
    pub fn arrive(&mut self, tenant: K, event: E) {
        let queue = self.queues.entry(tenant.clone()).or_default();
        queue.push_back(event);
        self.queued += 1;
        if queue.len() == 1 && !self.in_flight.contains(&tenant) && !self.held.contains(&tenant) {
            self.ready.push_back(tenant);
        }
    }

    /// The next event to run, if the in-flight limit allows one and a tenant is ready.
    pub fn dispatch(&mut self) -> Option<(K, E)> {
        if self.in_flight.len() >= self.max_in_flight {
            return None;
        }
        let tenant = self.ready.pop_front()?;
        let queue = self
            .queues
            .get_mut(&tenant)
            .expect("a ready tenant has a queue");
        let event = queue.pop_front().expect("a ready tenant has an event");
        if queue.is_empty() {
            self.queues.remove(&tenant);
        }
        self.queued -= 1;
        self.in_flight.insert(tenant.clone());
        Some((tenant, event))
    }

    /// The tenant's in-flight event finished (settled, or handed elsewhere); its next event
    /// becomes ready. Returns false if the tenant had nothing in flight (a caller bug).
    pub fn complete(&mut self, tenant: &K) -> bool {
        if !self.in_flight.remove(tenant) {
            return false;
        }
        self.make_ready_if_waiting(tenant);
        true
    }

    /// Stops dispatching `tenant`'s events (its queue is kept).
    pub fn hold(&mut self, tenant: &K) {
        if self.held.insert(tenant.clone()) {
            self.ready.retain(|t| t != tenant);
        }
    }

    /// Dispatches `tenant`'s events again.
    pub fn release(&mut self, tenant: &K) {
        if self.held.remove(tenant) && !self.in_flight.contains(tenant) {
            self.make_ready_if_waiting(tenant);
        }
    }

    /// Puts an event back at the head of its tenant's queue: it was taken but must run again
    /// first (the partner-wide breaker held it).
    pub fn retry_first(&mut self, tenant: K, event: E) {
        let queue = self.queues.entry(tenant.clone()).or_default();
        queue.push_front(event);
        self.queued += 1;
        if queue.len() == 1 && !self.in_flight.contains(&tenant) && !self.held.contains(&tenant) {
            self.ready.push_back(tenant);
        }
    }

    /// Removes and returns the tenant's queued events in order (to park them). An event in
    /// flight is not included.
    pub fn take_queue(&mut self, tenant: &K) -> Vec<E> {
        self.ready.retain(|t| t != tenant);
        let events: Vec<E> = self
            .queues
            .remove(tenant)
            .map(Vec::from)
            .unwrap_or_default();
        self.queued -= events.len();
        events
    }

    /// Drops the queued events `lost` picks (their partition went to another instance, which
    /// will read them again) and returns them. Events in flight are not touched: the caller
    /// fences them.
    pub fn drop_where(&mut self, mut lost: impl FnMut(&E) -> bool) -> Vec<E> {
        let mut dropped = Vec::new();
        let mut emptied = Vec::new();
        for (tenant, queue) in self.queues.iter_mut() {
            let (gone, kept): (VecDeque<E>, VecDeque<E>) = queue.drain(..).partition(|e| lost(e));
            *queue = kept;
            dropped.extend(gone);
            if queue.is_empty() {
                emptied.push(tenant.clone());
            }
        }
        for tenant in emptied {
            self.queues.remove(&tenant);
            self.ready.retain(|t| *t != tenant);
        }
        self.queued -= dropped.len();
        dropped
    }

    /// Whether the tenant is held.
    pub fn is_held(&self, tenant: &K) -> bool {
        self.held.contains(tenant)
    }

    /// Whether the tenant has an event in flight.
    pub fn is_in_flight(&self, tenant: &K) -> bool {
        self.in_flight.contains(tenant)
    }

    /// Events in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Events queued, not in flight.
    pub fn queued(&self) -> usize {
        self.queued
    }

    fn make_ready_if_waiting(&mut self, tenant: &K) {
        if !self.held.contains(tenant) && self.queues.contains_key(tenant) {
            self.ready.push_back(tenant.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_in_flight_per_tenant_and_tenants_run_side_by_side() {
        let mut s = Scheduler::new(10);
        s.arrive("a", 1);
        s.arrive("a", 2);
        s.arrive("b", 1);
        assert_eq!(s.dispatch(), Some(("a", 1)));
        assert_eq!(s.dispatch(), Some(("b", 1)), "b does not wait for a");
        assert_eq!(s.dispatch(), None, "a's second event waits for its first");
        assert!(s.complete(&"a"));
        assert_eq!(s.dispatch(), Some(("a", 2)));
        assert!(!s.complete(&"c"), "nothing in flight for c");
    }

    #[test]
    fn the_global_limit_holds() {
        let mut s = Scheduler::new(2);
        for t in ["a", "b", "c"] {
            s.arrive(t, 0);
        }
        assert!(s.dispatch().is_some());
        assert!(s.dispatch().is_some());
        assert_eq!(s.dispatch(), None);
        s.complete(&"a");
        assert_eq!(s.dispatch(), Some(("c", 0)));
    }

    #[test]
    fn a_held_tenant_keeps_its_queue_and_others_flow() {
        let mut s = Scheduler::new(10);
        s.arrive("a", 1);
        s.arrive("a", 2);
        s.arrive("b", 1);
        s.hold(&"a");
        assert_eq!(s.dispatch(), Some(("b", 1)));
        assert_eq!(s.dispatch(), None);
        s.release(&"a");
        assert_eq!(s.dispatch(), Some(("a", 1)));
        s.complete(&"a");
        assert_eq!(s.take_queue(&"a"), vec![2], "parked in order");
        assert_eq!(s.dispatch(), None);
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn an_event_put_back_runs_before_the_rest_of_its_tenant() {
        let mut s = Scheduler::new(10);
        s.arrive("a", 1);
        s.arrive("a", 2);
        let (t, e) = s.dispatch().unwrap();
        s.complete(&t);
        s.retry_first(t, e);
        assert_eq!(s.dispatch(), Some(("a", 1)));
        s.complete(&"a");
        assert_eq!(s.dispatch(), Some(("a", 2)));
    }

    #[test]
    fn events_of_a_lost_partition_are_dropped_and_the_rest_still_run() {
        // Events are (partition, seq); tenants a and c live on partition 0, b on partition 1.
        let mut s = Scheduler::new(10);
        s.arrive("a", (0, 1));
        s.arrive("a", (0, 2));
        s.arrive("b", (1, 1));
        s.arrive("c", (0, 1));
        assert_eq!(s.dispatch(), Some(("a", (0, 1))));
        let mut dropped = s.drop_where(|&(partition, _)| partition == 0);
        dropped.sort();
        assert_eq!(dropped, vec![(0, 1), (0, 2)], "a's queued event and c's");
        assert_eq!(s.queued(), 1);
        assert_eq!(s.dispatch(), Some(("b", (1, 1))));
        assert_eq!(s.dispatch(), None, "nothing of a or c is left to run");
        assert!(
            s.complete(&"a"),
            "a's event in flight is the caller's to fence"
        );
        assert_eq!(s.dispatch(), None);
        assert_eq!(s.queued(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Arrive(u8),
        Next,
        Complete(u8),
        Hold(u8),
        Release(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..6).prop_map(Op::Arrive),
            4 => Just(Op::Next),
            3 => (0u8..6).prop_map(Op::Complete),
            1 => (0u8..6).prop_map(Op::Hold),
            1 => (0u8..6).prop_map(Op::Release),
        ]
    }

    proptest! {
        #[test]
        fn order_limits_and_nothing_lost(ops in prop::collection::vec(op(), 1..300), limit in 1usize..5) {
            let mut s: Scheduler<u8, u32> = Scheduler::new(limit);
            let mut seq = 0u32;
            let mut arrived: HashMap<u8, Vec<u32>> = HashMap::new();
            let mut dispatched: HashMap<u8, Vec<u32>> = HashMap::new();
            let mut running: HashSet<u8> = HashSet::new();
            for op in ops {
                match op {
                    Op::Arrive(t) => {
                        seq += 1;
                        arrived.entry(t).or_default().push(seq);
                        s.arrive(t, seq);
                    }
                    Op::Next => {
                        if let Some((t, e)) = s.dispatch() {
                            prop_assert!(running.insert(t), "two events of tenant {} in flight", t);
                            prop_assert!(!s.is_held(&t), "a held tenant was dispatched");
                            dispatched.entry(t).or_default().push(e);
                        } else {
                            // Work-conserving: nothing dispatched only at the limit or with no
                            // dispatchable tenant.
                            let dispatchable = arrived.keys().any(|t| {
                                !running.contains(t) && !s.is_held(t)
                                    && arrived[t].len() > dispatched.get(t).map_or(0, Vec::len)
                            });
                            prop_assert!(running.len() >= limit || !dispatchable);
                        }
                    }
                    Op::Complete(t) => {
                        prop_assert_eq!(s.complete(&t), running.remove(&t));
                    }
                    Op::Hold(t) => s.hold(&t),
                    Op::Release(t) => s.release(&t),
                }
                prop_assert!(s.in_flight() <= limit);
                prop_assert_eq!(s.in_flight(), running.len());
            }
            // Release everything and run to the end: every event, each tenant in arrival order.
            for t in 0..6 {
                s.release(&t);
            }
            for t in running.drain() {
                s.complete(&t);
            }
            while let Some((t, e)) = s.dispatch() {
                dispatched.entry(t).or_default().push(e);
                s.complete(&t);
            }
            prop_assert_eq!(s.queued(), 0);
            let none = Vec::new();
            for (t, events) in &arrived {
                prop_assert_eq!(dispatched.get(t).unwrap_or(&none), events, "tenant {}", t);
            }
        }
    }
}
