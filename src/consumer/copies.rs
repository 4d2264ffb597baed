//! Copies of one event close together: a relay or Debezium resending a range after a restart
//! puts a second record with the same event id on the tenant's partition, often before the
//! first one's settlement is durable. Pure, no I/O; the coordinator tells it what happened.
//!
//! Why the dedupe lookup alone misses such a copy: intake looks each record's id up in
//! `deliveries` when it arrives. A copy looked up before its original's settlement committed
//! finds nothing, joins its tenant's queue behind the original, and would be handled a second
//! time (for the shop integration, a second round of partner calls).
//!
//! So the coordinator admits every event through [`Copies::admit`]: an id already in memory
//! (queued, in flight, held, settled but not yet written) or written by a batch that a lookup
//! still under way may have missed, is a copy, and settles as a duplicate when its turn comes.
//! Because a tenant's events run one at a time in arrival order, the original has ended by
//! then: settled (so the copy is truly a duplicate), parked with the copy behind it (the
//! backlog's replay dedupes the copy), or dropped with its partition (the copy with it).
//!
//! Memory: an id stays while its record is in memory, which `max_queued` bounds, and after it
//! is written only until every lookup that started before is admitted (a handful of batches).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Where a tracked id's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// In memory: queued, in flight, held by the breaker, or settled and waiting for its batch.
    InMemory,
    /// Written (settled or parked) by the batch that made the durable count this.
    Written(u64),
}

/// Whether an admitted event is the first of its id or a copy of one still close by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The first record of this id that this instance holds.
    First,
    /// A copy of a record in memory or written too recently for its lookup to have seen it.
    Copy,
}

/// The ids of events in memory and of those written since the oldest lookup under way began.
#[derive(Debug)]
pub struct Copies<K> {
    held: HashMap<K, Held>,
    /// Ids written, by the durable count that wrote them, oldest first.
    written: VecDeque<(u64, Vec<K>)>,
    /// How many batches have become durable: a lookup notes it when it starts.
    durable: u64,
}

impl<K> Default for Copies<K> {
    fn default() -> Self {
        Copies {
            held: HashMap::new(),
            written: VecDeque::new(),
            durable: 0,
        }
    }
}

impl<K: Hash + Eq + Clone> Copies<K> {
    /// The durable count now: a lookup that starts now sees every batch written up to it.
    pub fn epoch(&self) -> u64 {
        self.durable
    }

    /// An event with id `id` is admitted to its tenant's queue (its lookup found it unsettled).
    pub fn admit(&mut self, id: K) -> Admission {
        match self.held.get(&id) {
            Some(_) => Admission::Copy,
            None => {
                self.held.insert(id, Held::InMemory);
                Admission::First
            }
        }
    }

    /// A batch became durable, settling or parking the records with these ids.
    pub fn written(&mut self, ids: impl IntoIterator<Item = K>) {
        self.durable += 1;
        let epoch = self.durable;
        let mut batch = Vec::new();
        for id in ids {
            if let Some(held) = self.held.get_mut(&id) {
                *held = Held::Written(epoch);
                batch.push(id);
            }
        }
        if !batch.is_empty() {
            self.written.push_back((epoch, batch));
        }
    }

    /// These records left memory without being written (their partition was revoked): the next
    /// owner reads them again, and a copy of ours would be dropped with them.
    pub fn dropped(&mut self, ids: impl IntoIterator<Item = K>) {
        for id in ids {
            if self.held.get(&id) == Some(&Held::InMemory) {
                self.held.remove(&id);
            }
        }
    }

    /// Forgets the ids written before `oldest_lookup` (the epoch the oldest lookup under way
    /// started at, or [`Copies::epoch`] when none is): every later lookup sees them written.
    pub fn forget_before(&mut self, oldest_lookup: u64) {
        while let Some((epoch, _)) = self.written.front()
            && *epoch <= oldest_lookup
        {
            let (epoch, ids) = self.written.pop_front().expect("front exists");
            for id in ids {
                if self.held.get(&id) == Some(&Held::Written(epoch)) {
                    self.held.remove(&id);
                }
            }
        }
    }

    /// Ids tracked now: the memory this costs.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_copy_queued_behind_its_original_is_a_copy() {
        let mut c = Copies::default();
        assert_eq!(c.admit(1), Admission::First);
        assert_eq!(c.admit(1), Admission::Copy);
        assert_eq!(c.admit(2), Admission::First);
    }

    #[test]
    fn a_copy_whose_lookup_started_before_the_write_is_a_copy() {
        let mut c = Copies::default();
        assert_eq!(c.admit(1), Admission::First);
        let lookup = c.epoch(); // the copy's lookup starts: 1 is not written yet
        c.written([1]);
        c.forget_before(lookup);
        assert_eq!(
            c.admit(1),
            Admission::Copy,
            "its lookup could not see the write"
        );
    }

    #[test]
    fn once_every_lookup_started_after_the_write_the_id_is_forgotten() {
        let mut c = Copies::default();
        c.admit(1);
        c.written([1]);
        c.forget_before(c.epoch());
        assert!(c.is_empty());
        // A later record of 1 was looked up after the write: the database answers for it.
        assert_eq!(c.admit(1), Admission::First);
    }

    #[test]
    fn dropped_records_are_forgotten_and_written_ones_are_not_dropped() {
        let mut c = Copies::default();
        c.admit(1);
        c.admit(2);
        c.written([2]);
        c.dropped([1, 2]);
        assert_eq!(c.len(), 1, "2 is written; only 1 is dropped");
    }

    proptest! {
        /// Against a model: an id admitted while a record of it is in memory, or written at an
        /// epoch a lookup still under way did not see, is a copy; memory never holds an id that
        /// neither rule needs.
        #[test]
        fn matches_the_model(ops in proptest::collection::vec((0u8..4, 0u8..6), 1..200)) {
            let mut c = Copies::default();
            let mut in_memory: std::collections::HashSet<u8> = Default::default();
            let mut written_at: HashMap<u8, u64> = HashMap::new();
            let mut lookups: VecDeque<u64> = VecDeque::new();
            for (op, id) in ops {
                match op {
                    0 => lookups.push_back(c.epoch()),
                    1 => {
                        // The oldest lookup is admitted, one id of it.
                        let Some(started) = lookups.pop_front() else { continue };
                        let expect_copy = in_memory.contains(&id)
                            || written_at.get(&id).is_some_and(|w| *w > started);
                        let got = c.admit(id);
                        prop_assert_eq!(got == Admission::Copy, expect_copy, "id {}", id);
                        if got == Admission::First { in_memory.insert(id); written_at.remove(&id); }
                        c.forget_before(lookups.front().copied().unwrap_or(c.epoch()));
                    }
                    2 => {
                        if in_memory.remove(&id) {
                            c.written([id]);
                            written_at.insert(id, c.epoch());
                        }
                        c.forget_before(lookups.front().copied().unwrap_or(c.epoch()));
                    }
                    _ => {
                        in_memory.remove(&id);
                        c.dropped([id]);
                    }
                }
                let oldest = lookups.front().copied().unwrap_or(c.epoch());
                let needed = in_memory.len()
                    + written_at.iter().filter(|(i, w)| !in_memory.contains(i) && **w > oldest).count();
                prop_assert!(c.len() <= needed, "{} tracked, {} needed", c.len(), needed);
            }
        }
    }
}
