//! Partition ownership: which partitions this instance owns, in which generation, with how
//! much work under way ([`Ownership`], the coordinator's alone); the claim a piece of work
//! holds on its partition ([`Claim`]); and how a revoke lets partitions go ([`Revoke`]).
//!
//! A revoke comes from the poll thread ([`super::poller`]) as a message, and the callback
//! waits for the coordinator's answer. The coordinator cancels the work of the revoked
//! partitions (no new attempt, no retry, no backoff sleep starts after that) and goes on
//! serving its tasks' reports until none of that work is under way or `revoke_drain` has
//! passed; then it cuts the calls still under way and gives them a short grace. It writes
//! what settled, commits those partitions synchronously, forgets them and drops their queued
//! events (which the next owner reads again), and only then answers. Why wait: an attempt of
//! the old owner landing after the new owner delivered the tenant's next event would reorder
//! the partner's state. Work that outlives the grace is fenced by a generation number: it can
//! no longer move a commit point of a partition this instance lost, nor park anything. On
//! assign, the paused tenants are read again before the first record of the new partitions is
//! handed over, so whichever instance owns a tenant obeys the pause another instance recorded.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use super::offsets::PartitionOffsets;
use super::poller::Context;
use super::runtime::PartitionView;

/// How long work whose calls were cut at the drain deadline may take to end.
pub(super) const ABORT_GRACE: Duration = Duration::from_secs(1);

/// The partitions this instance owns. Only the coordinator touches it.
#[derive(Default)]
pub(super) struct Ownership {
    partitions: HashMap<i32, Owned>,
    /// Each partition's high watermark, from librdkafka's statistics.
    high_watermarks: HashMap<i32, i64>,
}

/// A partition this instance owns.
pub(super) struct Owned {
    generation: u64,
    /// Records from this offset on were never fetched by an earlier owner (the high watermark
    /// once assigned here); those below may have been handled before.
    fresh_from: i64,
    /// What may be committed, once a record of it was read.
    pub(super) offsets: Option<PartitionOffsets>,
    /// Cancelled on revoke and shutdown: no new attempt starts for this partition's work.
    cancel: CancellationToken,
    /// Cancelled at the drain deadline: calls still under way are cut.
    abort: CancellationToken,
    /// Handler tasks, probes and backlog drains under way for this partition.
    in_flight: usize,
    /// When the handling of each record in flight started (kept across a breaker's hold): a
    /// commit point resting on a record in flight is held back for that long.
    pub(super) started: BTreeMap<i64, Instant>,
}

/// A piece of work's claim on its partition (an event's handling, a probe, a backlog drain):
/// a revoke waits for it, and cancels or cuts it through its tokens. The task that holds it
/// hands it back with its report, and [`Ownership::release`] ends it.
pub(super) struct Claim {
    pub(super) partition: i32,
    pub(super) generation: u64,
    pub(super) cancel: CancellationToken,
    /// Cut the call under way: the drain deadline passed.
    pub(super) abort: CancellationToken,
}

/// Where a record came from, with the generation of the partition's ownership.
#[derive(Debug, Clone, Copy)]
pub(super) struct Position {
    /// The partition.
    pub(super) partition: i32,
    /// The offset.
    pub(super) offset: i64,
    /// Which ownership of the partition read it: a later one does not settle it.
    pub(super) generation: u64,
}

impl Ownership {
    /// Takes `partitions`, each in its generation.
    pub(super) fn assign(&mut self, partitions: &[(i32, u64)]) {
        for &(partition, generation) in partitions {
            self.partitions.insert(
                partition,
                Owned {
                    generation,
                    fresh_from: i64::MAX,
                    offsets: None,
                    cancel: CancellationToken::new(),
                    abort: CancellationToken::new(),
                    in_flight: 0,
                    started: BTreeMap::new(),
                },
            );
        }
    }

    /// Where each of the partitions just assigned starts being fresh (see
    /// [`Self::seen_before`]).
    pub(super) fn fresh_from(&mut self, highs: &std::collections::HashMap<i32, i64>) {
        for (partition, high) in highs {
            if let Some(owned) = self.partitions.get_mut(partition) {
                owned.fresh_from = *high;
            }
        }
    }

    /// Whether the record at `position` may have been handled before: an earlier owner of its
    /// partition may have fetched it.
    pub(super) fn seen_before(&self, position: Position) -> bool {
        self.partitions
            .get(&position.partition)
            .filter(|o| o.generation == position.generation)
            .is_none_or(|owned| position.offset < owned.fresh_from)
    }

    /// Lets `partitions` go.
    pub(super) fn remove(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.partitions.remove(p);
        }
    }

    /// The partitions owned now.
    pub(super) fn owned(&self) -> Vec<i32> {
        self.partitions.keys().copied().collect()
    }

    /// How many partitions are owned.
    pub(super) fn len(&self) -> usize {
        self.partitions.len()
    }

    /// Whether the partition `position` came from is still ours, in the same generation, and
    /// not being let go.
    pub(super) fn is_current(&self, position: Position) -> bool {
        self.partitions
            .get(&position.partition)
            .is_some_and(|o| o.generation == position.generation && !o.cancel.is_cancelled())
    }

    /// The record at `offset` of `partition`, read in `generation`: tracked, and where it
    /// came from; `None` when it is not ours (another generation, a partition gone) or was
    /// tracked already (a re-fetch).
    pub(super) fn track(
        &mut self,
        partition: i32,
        offset: i64,
        generation: u64,
    ) -> Option<Position> {
        let owned = self.partitions.get_mut(&partition)?;
        if owned.generation != generation {
            return None;
        }
        let offsets = owned
            .offsets
            .get_or_insert_with(|| PartitionOffsets::new(offset));
        offsets.received(offset).ok()?;
        Some(Position {
            partition,
            offset,
            generation,
        })
    }

    /// Claims `partition` if it is owned in `generation` (any generation when `None`) and not
    /// being let go; for the record at `offset`, notes when its handling started unless it
    /// started before (a retry after the breaker).
    pub(super) fn claim(
        &mut self,
        partition: i32,
        generation: Option<u64>,
        offset: Option<i64>,
    ) -> Option<Claim> {
        let owned = self.partitions.get_mut(&partition)?;
        if generation.is_some_and(|g| g != owned.generation) || owned.cancel.is_cancelled() {
            return None;
        }
        owned.in_flight += 1;
        if let Some(offset) = offset {
            owned.started.entry(offset).or_insert_with(Instant::now);
        }
        Some(Claim {
            partition,
            generation: owned.generation,
            cancel: owned.cancel.clone(),
            abort: owned.abort.clone(),
        })
    }

    /// The work that held `claim` ended.
    pub(super) fn release(&mut self, claim: &Claim) {
        if let Some(owned) = self.partitions.get_mut(&claim.partition)
            && owned.generation == claim.generation
        {
            owned.in_flight = owned.in_flight.saturating_sub(1);
        }
    }

    /// No new work starts for `partitions`; work under way stops at its next step.
    pub(super) fn cancel(&self, partitions: &[i32]) {
        for owned in partitions.iter().filter_map(|p| self.partitions.get(p)) {
            owned.cancel.cancel();
        }
    }

    /// The calls under way for `partitions` are cut.
    pub(super) fn abort(&self, partitions: &[i32]) {
        for owned in partitions.iter().filter_map(|p| self.partitions.get(p)) {
            owned.abort.cancel();
        }
    }

    /// Work under way for `partitions`.
    pub(super) fn busy(&self, partitions: &[i32]) -> usize {
        partitions
            .iter()
            .filter_map(|p| self.partitions.get(p))
            .map(|o| o.in_flight)
            .sum()
    }

    /// Every owned partition, to mark and commit.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (i32, &mut Owned)> {
        self.partitions.iter_mut().map(|(&p, o)| (p, o))
    }

    /// An owned partition in `generation`, to mark a settled record.
    pub(super) fn current_mut(&mut self, partition: i32, generation: u64) -> Option<&mut Owned> {
        self.partitions
            .get_mut(&partition)
            .filter(|o| o.generation == generation)
    }

    /// An owned partition's offsets, once a record of it was read.
    pub(super) fn offsets_mut(&mut self, partition: i32) -> Option<&mut PartitionOffsets> {
        self.partitions.get_mut(&partition)?.offsets.as_mut()
    }

    /// Partitions whose last commit the broker has not confirmed yet.
    pub(super) fn unconfirmed(&self) -> Vec<i32> {
        self.partitions
            .iter()
            .filter(|(_, o)| {
                o.offsets
                    .as_ref()
                    .is_some_and(|o| o.committed() > o.acked())
            })
            .map(|(&p, _)| p)
            .collect()
    }

    /// The high watermarks librdkafka reported.
    pub(super) fn watermarks(&mut self, highs: Vec<(i32, i64)>) {
        self.high_watermarks.extend(highs);
    }
}

/// How letting partitions go proceeds (a revoke, or the stop): consuming is over for them;
/// the work under way drains until the deadline, then its calls are cut and it has a short
/// grace; then the partitions are let go, and whatever still runs is fenced by its
/// generation. Pure: the coordinator feeds it the work under way and the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Revoke {
    /// Waiting for the work under way to end on its own, until `until`.
    Draining { until: Instant },
    /// Its calls were cut; waiting for it to end, until `until`.
    Aborting { until: Instant },
    /// Nothing of these partitions is under way (`fenced` if something outlived the grace
    /// and is fenced instead).
    Done { fenced: bool },
}

/// What a [`Revoke`] transition asks of the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RevokeEffect {
    None,
    /// Cut the calls under way.
    Abort,
}

impl Revoke {
    /// A revoke starting `now`, draining for `drain`.
    pub(super) fn start(now: Instant, drain: Duration) -> Revoke {
        Revoke::Draining { until: now + drain }
    }

    /// The next state, with `busy` pieces of work under way at `now`.
    pub(super) fn next(self, busy: usize, now: Instant) -> (Revoke, RevokeEffect) {
        match self {
            Revoke::Draining { .. } | Revoke::Aborting { .. } if busy == 0 => {
                (Revoke::Done { fenced: false }, RevokeEffect::None)
            }
            Revoke::Draining { until } if now >= until => (
                Revoke::Aborting {
                    until: now + ABORT_GRACE,
                },
                RevokeEffect::Abort,
            ),
            Revoke::Aborting { until } if now >= until => {
                (Revoke::Done { fenced: true }, RevokeEffect::None)
            }
            state => (state, RevokeEffect::None),
        }
    }

    /// When to look again, unless a report comes first; `None` once done.
    pub(super) fn wake_at(self) -> Option<Instant> {
        match self {
            Revoke::Draining { until } | Revoke::Aborting { until } => Some(until),
            Revoke::Done { .. } => None,
        }
    }
}

/// Runs blocking work from inside the runtime without starving the tasks it waits for.
pub(super) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// This instance's partitions from what it knows already, without a broker round trip (a
/// watermark or offset request shares the connection with the fetches, and a slow broker would
/// make every fetch wait behind it): the committed offset the broker last confirmed (checked
/// every couple of seconds, see `commit_check`), or for a partition nothing was read from yet
/// its fetch position; and the high watermark librdkafka learns from the fetch responses (its
/// statistics).
pub(super) fn partition_view(
    consumer: &BaseConsumer<Context>,
    ownership: &Ownership,
    topic: &str,
) -> Vec<PartitionView> {
    let positions: HashMap<i32, i64> = consumer
        .position()
        .map(|list| {
            list.elements_for_topic(topic)
                .iter()
                .filter_map(|e| {
                    e.offset()
                        .to_raw()
                        .filter(|o| *o >= 0)
                        .map(|o| (e.partition(), o))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut view: Vec<PartitionView> = ownership
        .partitions
        .iter()
        .map(|(&partition, owned)| {
            let offsets = owned
                .offsets
                .as_ref()
                .map(|t| (t.acked(), t.commit_point()));
            let committed_offset = match offsets {
                Some((acked, _)) => Some(acked),
                None => positions.get(&partition).copied(),
            };
            let high_watermark = ownership.high_watermarks.get(&partition).copied();
            PartitionView {
                topic: topic.to_owned(),
                partition,
                committed_offset,
                settled_offset: offsets.map(|(_, settled)| settled),
                high_watermark,
                lag: high_watermark
                    .zip(committed_offset)
                    .map(|(high, committed)| (high - committed).max(0)),
                in_flight: owned.in_flight,
            }
        })
        .collect();
    view.sort_by_key(|p| p.partition);
    view
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_revoke_with_nothing_under_way_is_done_at_once() {
        let now = Instant::now();
        let revoke = Revoke::start(now, Duration::from_secs(10));
        assert_eq!(
            revoke.next(0, now),
            (Revoke::Done { fenced: false }, RevokeEffect::None)
        );
    }

    #[test]
    fn work_past_the_deadline_is_cut_then_fenced_after_the_grace() {
        let now = Instant::now();
        let drain = Duration::from_secs(10);
        let revoke = Revoke::start(now, drain);
        let (revoke, effect) = revoke.next(2, now + Duration::from_secs(5));
        assert_eq!(effect, RevokeEffect::None);
        assert_eq!(revoke, Revoke::Draining { until: now + drain });
        let cut_at = now + drain;
        let (revoke, effect) = revoke.next(2, cut_at);
        assert_eq!(effect, RevokeEffect::Abort);
        assert_eq!(
            revoke,
            Revoke::Aborting {
                until: cut_at + ABORT_GRACE
            }
        );
        let (revoke, effect) = revoke.next(1, cut_at + ABORT_GRACE);
        assert_eq!(effect, RevokeEffect::None);
        assert_eq!(revoke, Revoke::Done { fenced: true });
    }

    #[test]
    fn a_claim_holds_its_partition_until_released_and_a_cancelled_partition_takes_none() {
        let mut ownership = Ownership::default();
        ownership.assign(&[(0, 1), (1, 2)]);
        let claim = ownership.claim(0, Some(1), Some(5)).expect("owned");
        assert!(
            ownership.claim(0, Some(2), None).is_none(),
            "another generation"
        );
        assert_eq!(ownership.busy(&[0, 1]), 1);
        ownership.cancel(&[0]);
        assert!(claim.cancel.is_cancelled());
        assert!(ownership.claim(0, None, None).is_none(), "being let go");
        assert!(!ownership.is_current(Position {
            partition: 0,
            offset: 5,
            generation: 1
        }));
        ownership.release(&claim);
        assert_eq!(ownership.busy(&[0]), 0);
        // A claim of a generation gone releases nothing of the next.
        let old = ownership.claim(1, None, None).expect("owned");
        ownership.remove(&[1]);
        ownership.assign(&[(1, 3)]);
        let _new = ownership.claim(1, None, None).expect("owned again");
        ownership.release(&old);
        assert_eq!(ownership.busy(&[1]), 1);
    }

    #[test]
    fn a_record_of_another_generation_is_not_tracked() {
        let mut ownership = Ownership::default();
        ownership.assign(&[(0, 4)]);
        assert!(
            ownership.track(0, 10, 3).is_none(),
            "read before the revoke"
        );
        assert!(ownership.track(0, 10, 4).is_some());
        assert!(ownership.track(0, 10, 4).is_none(), "a re-fetch");
        assert!(ownership.track(1, 0, 4).is_none(), "not ours");
    }

    proptest! {
        /// Whatever the work does, a revoke ends once the deadline and the grace have passed,
        /// cuts the calls at most once, and is fenced only if work outlived the grace.
        #[test]
        fn a_revoke_always_ends_and_cuts_at_most_once(
            busy in proptest::collection::vec(0usize..3, 1..40),
            step_ms in 1u64..800,
        ) {
            let start = Instant::now();
            let drain = Duration::from_secs(5);
            let mut revoke = Revoke::start(start, drain);
            let mut aborts = 0;
            let mut now = start;
            let mut last_busy = 1;
            for b in busy.iter().copied().chain(std::iter::repeat_n(1, 10_000)) {
                if matches!(revoke, Revoke::Done { .. }) {
                    break;
                }
                now += Duration::from_millis(step_ms);
                last_busy = b;
                let (next, effect) = revoke.next(b, now);
                if effect == RevokeEffect::Abort {
                    aborts += 1;
                    prop_assert!(now >= start + drain);
                }
                revoke = next;
            }
            prop_assert!(aborts <= 1);
            match revoke {
                Revoke::Done { fenced } => prop_assert_eq!(fenced, last_busy > 0),
                other => prop_assert!(false, "not done: {:?}", other),
            }
        }
    }
}
