//! The offset tracker: per partition, the set of received offsets not yet settled, and the
//! commit point that follows from it. Pure, no I/O.
//!
//! *Settled* means the record needs nothing more from this consumer: delivered, deduped,
//! expired, skipped, ignored, or durably parked. Records of one partition are settled in any
//! order (different tenants run concurrently), but Kafka stores one committed offset per
//! partition, "the next record to read": so the commit point is the lowest unsettled offset, or
//! one past the highest received when everything is settled. Committing it can never skip an
//! unsettled record, and the point never moves backwards.

use std::collections::BTreeSet;

/// A misuse of the tracker: a bug in the caller, reported instead of corrupting the state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffsetError {
    /// Records of a partition arrive in offset order; this one is not after the last.
    #[error("offset {offset} received after {last}: a partition's records arrive in order")]
    OutOfOrder {
        /// The offset received.
        offset: i64,
        /// The highest offset received before.
        last: i64,
    },
    /// The offset is before the partition's starting position.
    #[error("offset {offset} is before the starting position {start}")]
    BeforeStart {
        /// The offset received.
        offset: i64,
        /// Where the partition started.
        start: i64,
    },
    /// Settling an offset that was never received or is already settled.
    #[error("offset {0} is not an unsettled offset of this partition")]
    NotUnsettled(i64),
}

/// One partition's offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffsets {
    start: i64,
    /// The next offset expected: one past the highest received (or `start`).
    next: i64,
    unsettled: BTreeSet<i64>,
    /// The last point handed out to be committed.
    committed: i64,
    /// The highest point the broker confirmed.
    acked: i64,
}

impl PartitionOffsets {
    /// A partition whose consumption starts at `start` (its committed offset, the next record
    /// to read).
    pub fn new(start: i64) -> Self {
        PartitionOffsets {
            start,
            next: start,
            unsettled: BTreeSet::new(),
            committed: start,
            acked: start,
        }
    }

    /// A record was received. Gaps are fine (compaction, transaction markers); going
    /// backwards is not.
    pub fn received(&mut self, offset: i64) -> Result<(), OffsetError> {
        if offset < self.start {
            return Err(OffsetError::BeforeStart {
                offset,
                start: self.start,
            });
        }
        if offset < self.next {
            return Err(OffsetError::OutOfOrder {
                offset,
                last: self.next - 1,
            });
        }
        self.unsettled.insert(offset);
        self.next = offset + 1;
        Ok(())
    }

    /// A received record was settled.
    pub fn settled(&mut self, offset: i64) -> Result<(), OffsetError> {
        if self.unsettled.remove(&offset) {
            Ok(())
        } else {
            Err(OffsetError::NotUnsettled(offset))
        }
    }

    /// The offset that may be committed now: the lowest unsettled one, or the next expected.
    pub fn commit_point(&self) -> i64 {
        self.unsettled.first().copied().unwrap_or(self.next)
    }

    /// The commit point if it moved since the last call, remembering it as committed.
    pub fn take_commit(&mut self) -> Option<i64> {
        let point = self.commit_point();
        (point > self.committed).then(|| {
            self.committed = point;
            point
        })
    }

    /// Records received and not settled.
    pub fn unsettled(&self) -> usize {
        self.unsettled.len()
    }

    /// The last commit point handed out by [`take_commit`](Self::take_commit).
    pub fn committed(&self) -> i64 {
        self.committed
    }

    /// The broker confirmed a commit of `point`.
    pub fn commit_succeeded(&mut self, point: i64) {
        self.acked = self.acked.max(point);
    }

    /// A commit of `point` failed: unless a later point was handed out meanwhile (which covers
    /// it), the next [`take_commit`](Self::take_commit) offers the current point again.
    pub fn commit_failed(&mut self, point: i64) {
        if self.committed == point {
            self.committed = self.acked;
        }
    }

    /// The highest point the broker confirmed.
    pub fn acked(&self) -> i64 {
        self.acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_commit_point_waits_for_the_lowest_unsettled_record() {
        let mut p = PartitionOffsets::new(10);
        assert_eq!(p.commit_point(), 10);
        for o in 10..15 {
            p.received(o).unwrap();
        }
        p.settled(11).unwrap();
        p.settled(12).unwrap();
        assert_eq!(p.commit_point(), 10, "10 is still in flight");
        assert_eq!(p.take_commit(), None);
        p.settled(10).unwrap();
        assert_eq!(p.take_commit(), Some(13));
        assert_eq!(p.take_commit(), None, "nothing new to commit");
        p.settled(14).unwrap();
        p.settled(13).unwrap();
        assert_eq!(
            p.take_commit(),
            Some(15),
            "all settled: one past the highest"
        );
        assert_eq!(p.unsettled(), 0);
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        let mut p = PartitionOffsets::new(0);
        p.received(0).unwrap();
        p.received(5).unwrap();
        p.settled(0).unwrap();
        assert_eq!(p.commit_point(), 5);
        p.settled(5).unwrap();
        assert_eq!(p.commit_point(), 6);
    }

    #[test]
    fn misuse_is_an_error_and_changes_nothing() {
        let mut p = PartitionOffsets::new(3);
        assert_eq!(
            p.received(2),
            Err(OffsetError::BeforeStart {
                offset: 2,
                start: 3
            })
        );
        p.received(4).unwrap();
        assert_eq!(
            p.received(4),
            Err(OffsetError::OutOfOrder { offset: 4, last: 4 })
        );
        assert_eq!(p.settled(3), Err(OffsetError::NotUnsettled(3)));
        p.settled(4).unwrap();
        assert_eq!(p.settled(4), Err(OffsetError::NotUnsettled(4)));
        assert_eq!(p.commit_point(), 5);
    }

    #[test]
    fn a_failed_commit_is_offered_again_unless_a_later_one_covers_it() {
        let mut p = PartitionOffsets::new(0);
        for o in 0..4 {
            p.received(o).unwrap();
        }
        p.settled(0).unwrap();
        assert_eq!(p.take_commit(), Some(1));
        p.commit_failed(1);
        assert_eq!(p.acked(), 0);
        assert_eq!(p.take_commit(), Some(1), "offered again");
        p.commit_succeeded(1);
        p.settled(1).unwrap();
        assert_eq!(p.take_commit(), Some(2));
        p.settled(2).unwrap();
        assert_eq!(p.take_commit(), Some(3));
        p.commit_failed(2);
        assert_eq!(p.take_commit(), None, "3 is on its way and covers 2");
        p.commit_failed(3);
        assert_eq!(p.take_commit(), Some(3));
        p.commit_succeeded(3);
        p.commit_succeeded(2);
        assert_eq!(p.acked(), 3, "an old confirmation never lowers it");
    }

    /// A scenario: offsets received with gaps, then settled in an arbitrary order.
    fn scenario() -> impl Strategy<Value = (i64, Vec<i64>, Vec<usize>)> {
        (0i64..1_000, prop::collection::vec(1i64..4, 1..60)).prop_flat_map(|(start, gaps)| {
            let offsets: Vec<i64> = gaps
                .iter()
                .scan(start - 1, |last, g| {
                    *last += g;
                    Some(*last)
                })
                .collect();
            let n = offsets.len();
            (
                Just(start),
                Just(offsets),
                Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
            )
        })
    }

    proptest! {
        #[test]
        fn never_skips_an_unsettled_record_and_never_moves_back((start, offsets, order) in scenario()) {
            let mut p = PartitionOffsets::new(start);
            for &o in &offsets {
                p.received(o).unwrap();
            }
            let mut settled = vec![false; offsets.len()];
            let mut last_point = p.commit_point();
            let mut last_commit = p.committed();
            for i in order {
                p.settled(offsets[i]).unwrap();
                settled[i] = true;
                let point = p.commit_point();
                prop_assert!(point >= last_point, "moved back: {} after {}", point, last_point);
                // Every record before the commit point is settled; the one at it (if any) is not.
                for (j, &o) in offsets.iter().enumerate() {
                    if o < point {
                        prop_assert!(settled[j], "offset {} before the point {} is unsettled", o, point);
                    }
                    if o == point {
                        prop_assert!(!settled[j]);
                    }
                }
                if let Some(c) = p.take_commit() {
                    prop_assert!(c > last_commit);
                    last_commit = c;
                }
                last_point = point;
            }
            prop_assert_eq!(p.commit_point(), offsets.last().unwrap() + 1);
            prop_assert_eq!(p.unsettled(), 0);
        }
    }
}
