//! Partition ownership and rebalances: which partitions this instance owns, in which
//! generation, with how much work under way ([`State`]); the claim a piece of work holds on its
//! partition ([`Lease`]); and the librdkafka callbacks ([`Context`]).
//!
//! librdkafka runs the rebalance callbacks inside the loop's own poll. On revoke, the callback
//! cancels the work of the revoked partitions (no new attempt, no retry, no backoff sleep starts
//! after that), waits up to `revoke_drain` for attempts already under way to end (each one
//! settles itself durably and marks its offset), commits what is settled for those partitions
//! synchronously, and forgets them; the loop then drops their queued events, which the next
//! owner reads again. Why wait: an attempt of the old owner landing after the new owner
//! delivered the tenant's next event would reorder the partner's state. Work that outlives the
//! deadline is fenced by a generation number: it can no longer move a commit point of a
//! partition this instance lost, nor park anything. On assign, the paused tenants are read
//! again before the first record of the new partitions is looked at, so whichever instance owns
//! a tenant obeys the pause another instance recorded.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::offsets::PartitionOffsets;
use super::runtime::{ConsumeStats, PartitionView};

/// How often [`PartitionView`] is brought up to date, and librdkafka's statistics (with the
/// high watermarks) come.
pub(super) const LAG_INTERVAL: Duration = Duration::from_secs(2);

/// The consumer's settings with librdkafka's statistics on (unless set already), for the high
/// watermarks.
pub(super) fn with_statistics(mut config: rdkafka::ClientConfig) -> rdkafka::ClientConfig {
    if config.get("statistics.interval.ms").is_none() {
        config.set(
            "statistics.interval.ms",
            LAG_INTERVAL.as_millis().to_string(),
        );
    }
    config
}

/// What the loop and the rebalance callback share. Locked briefly, never across an await.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) partitions: HashMap<i32, Owned>,
    pub(super) generation: u64,
    /// Partitions revoked since the loop last looked: their queued events are dropped.
    pub(super) lost: Vec<i32>,
    /// Set on assign: read the paused tenants again before the next record.
    pub(super) reload_paused: bool,
    /// Each partition's high watermark, from librdkafka's statistics.
    pub(super) high_watermarks: HashMap<i32, i64>,
}

/// A partition this instance owns.
pub(super) struct Owned {
    pub(super) generation: u64,
    pub(super) offsets: Option<PartitionOffsets>,
    /// Cancelled on revoke and shutdown: no new attempt starts for this partition's work.
    pub(super) cancel: CancellationToken,
    /// Cancelled at the drain deadline: calls still under way are cut.
    pub(super) abort: CancellationToken,
    /// Handler tasks and backlog drains under way for this partition.
    pub(super) in_flight: usize,
    /// When the handling of each record in flight started (kept across a breaker's hold): a
    /// commit point resting on a record in flight is held back for that long.
    pub(super) started: std::collections::BTreeMap<i64, Instant>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) shared: Mutex<Shared>,
    /// Notified whenever a partition's `in_flight` drops.
    pub(super) idle: Condvar,
}

impl State {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("consumer state")
    }

    /// Cancels the work of `partitions` and waits until none is under way or `deadline`; at
    /// the deadline, cuts the calls still under way (their futures are dropped) and waits for
    /// them to end, so that no request of this instance for these partitions starts after the
    /// revoke completes: the next owner's requests are never followed by this one's.
    /// Blocking: called from the rebalance callback and at shutdown, off the async world.
    pub(super) fn cancel_and_wait(&self, partitions: &[i32], deadline: Instant) -> bool {
        let s = self.lock();
        for p in partitions {
            if let Some(owned) = s.partitions.get(p) {
                owned.cancel.cancel();
            }
        }
        let (s, ended) = self.wait_idle(s, partitions, deadline);
        if ended {
            return true;
        }
        for p in partitions {
            if let Some(owned) = s.partitions.get(p) {
                owned.abort.cancel();
            }
        }
        let (s, ended) = self.wait_idle(s, partitions, Instant::now() + ABORT_GRACE);
        drop(s);
        if !ended {
            tracing::warn!("work still under way after its calls were cut; fenced");
        }
        ended
    }

    /// Waits until no work of `partitions` is under way (true) or `deadline` (false).
    fn wait_idle<'a>(
        &self,
        mut s: std::sync::MutexGuard<'a, Shared>,
        partitions: &[i32],
        deadline: Instant,
    ) -> (std::sync::MutexGuard<'a, Shared>, bool) {
        loop {
            let busy: usize = partitions
                .iter()
                .filter_map(|p| s.partitions.get(p))
                .map(|o| o.in_flight)
                .sum();
            if busy == 0 {
                return (s, true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(busy, "attempts still under way at the drain deadline");
                return (s, false);
            }
            s = self.idle.wait_timeout(s, left).expect("consumer state").0;
        }
    }
}

/// How long work whose calls were cut at the drain deadline may take to end.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// Runs blocking work from inside the runtime without starving the tasks it waits for.
pub(super) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A claim on a partition for one piece of work (an event's handling, a backlog drain): the
/// revoke waits for it, and its settlement counts only while the partition is still ours.
pub(super) struct Lease {
    pub(super) state: Arc<State>,
    pub(super) partition: i32,
    pub(super) generation: u64,
    pub(super) cancel: CancellationToken,
    /// Cut the call under way: the drain deadline passed.
    pub(super) abort: CancellationToken,
}

impl Lease {
    /// Claims `partition` if it is owned in `generation` (any generation when `None`).
    pub(super) fn take(
        state: &Arc<State>,
        partition: i32,
        generation: Option<u64>,
    ) -> Option<Lease> {
        Self::take_for(state, partition, generation, None)
    }

    /// Claims the partition for the record at `offset` (an event's handling, a probe), noting
    /// when its handling started unless it started before (a retry after the breaker).
    pub(super) fn take_for(
        state: &Arc<State>,
        partition: i32,
        generation: Option<u64>,
        offset: Option<i64>,
    ) -> Option<Lease> {
        let mut s = state.lock();
        let owned = s.partitions.get_mut(&partition)?;
        if generation.is_some_and(|g| g != owned.generation) || owned.cancel.is_cancelled() {
            return None;
        }
        owned.in_flight += 1;
        if let Some(offset) = offset {
            owned.started.entry(offset).or_insert_with(Instant::now);
        }
        Some(Lease {
            state: Arc::clone(state),
            partition,
            generation: owned.generation,
            cancel: owned.cancel.clone(),
            abort: owned.abort.clone(),
        })
    }

    /// Marks `offset` settled in the partition's tracker, if still ours.
    pub(super) fn settled(&self, offset: i64) {
        let mut s = self.state.lock();
        if let Some(owned) = s.partitions.get_mut(&self.partition)
            && owned.generation == self.generation
            && let Some(offsets) = owned.offsets.as_mut()
        {
            let _ = offsets.settled(offset);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut s = self.state.lock();
        if let Some(owned) = s.partitions.get_mut(&self.partition)
            && owned.generation == self.generation
        {
            owned.in_flight -= 1;
        }
        drop(s);
        self.state.idle.notify_all();
    }
}

pub(super) struct Context {
    pub(super) state: Arc<State>,
    pub(super) topic: String,
    pub(super) revoke_drain: Duration,
    pub(super) stats: Arc<ConsumeStats>,
}

impl ClientContext for Context {
    /// librdkafka's statistics (every `statistics.interval.ms`): the high watermark it learnt
    /// from the fetches, for the partitions' lag. No request of its own, so a slow broker's
    /// answers to watermark requests never hold the fetches back.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut s = self.state.lock();
        for (&partition, p) in &topic.partitions {
            if partition >= 0 && p.hi_offset >= 0 {
                s.high_watermarks.insert(partition, p.hi_offset);
            }
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked: Vec<i32> = list
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            let deadline = Instant::now() + self.revoke_drain;
            blocking(|| self.state.cancel_and_wait(&revoked, deadline));
            let mut s = self.state.lock();
            let mut commit = TopicPartitionList::new();
            for &partition in &revoked {
                if let Some(owned) = s.partitions.remove(&partition)
                    && let Some(offsets) = owned.offsets
                    && offsets.commit_point() > offsets.acked()
                {
                    let _ = commit.add_partition_offset(
                        &self.topic,
                        partition,
                        Offset::Offset(offsets.commit_point()),
                    );
                }
            }
            s.lost.extend(&revoked);
            self.stats.partitions.store(
                s.partitions.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            drop(s);
            tracing::info!(partitions = ?revoked, "partitions revoked");
            if commit.count() > 0
                && let Err(e) = consumer.commit(&commit, CommitMode::Sync)
            {
                tracing::warn!(error = %e, "commit on revoke failed; the next owner replays from the previous commit");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let mut s = self.state.lock();
            let mut assigned = Vec::new();
            for element in list.elements_for_topic(&self.topic) {
                s.generation += 1;
                let generation = s.generation;
                s.partitions.insert(
                    element.partition(),
                    Owned {
                        generation,
                        offsets: None,
                        cancel: CancellationToken::new(),
                        abort: CancellationToken::new(),
                        in_flight: 0,
                        started: std::collections::BTreeMap::new(),
                    },
                );
                s.lost.retain(|p| *p != element.partition());
                assigned.push(element.partition());
            }
            s.reload_paused = true;
            self.stats.partitions.store(
                s.partitions.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            drop(s);
            tracing::info!(partitions = ?assigned, "partitions assigned");
        }
    }
}

/// The group member: a consumer of the configured topic whose rebalance callbacks follow
/// partition ownership in `state`.
pub(super) fn consumer(
    config: &crate::config::Config,
    state: &Arc<State>,
    revoke_drain: Duration,
    stats: &Arc<ConsumeStats>,
) -> Result<Arc<StreamConsumer<Context>>, rdkafka::error::KafkaError> {
    let settings = crate::broker::consumer_config(&config.kafka, &config.kafka.group_id);
    let consumer = with_statistics(settings).create_with_context(Context {
        state: Arc::clone(state),
        topic: config.kafka.topic.clone(),
        revoke_drain,
        stats: Arc::clone(stats),
    })?;
    Ok(Arc::new(consumer))
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

/// Whether the partition `position` came from is still ours, in the same generation.
pub(super) fn is_current(state: &State, position: Position) -> bool {
    state
        .lock()
        .partitions
        .get(&position.partition)
        .is_some_and(|o| o.generation == position.generation && !o.cancel.is_cancelled())
}

/// This instance's partitions from what it knows already, without a broker round trip (a
/// watermark or offset request shares the connection with the fetches, and a slow broker would
/// make every fetch wait behind it): the committed offset the broker last confirmed (checked
/// every couple of seconds, see `commit_check`), or for a partition nothing was read from yet
/// its fetch position; and the high watermark librdkafka learns from the fetch responses (its
/// statistics, [`Context::stats`]).
pub(super) fn partition_view(
    consumer: &StreamConsumer<Context>,
    state: &State,
    topic: &str,
) -> Vec<PartitionView> {
    // Per owned partition: (acked, settled) offsets if anything was read, and work in flight.
    type Partitions = Vec<(i32, Option<(i64, i64)>, usize)>;
    let (owned, highs): (Partitions, HashMap<i32, i64>) = {
        let s = state.lock();
        let owned = s
            .partitions
            .iter()
            .map(|(&p, o)| {
                let offsets = o.offsets.as_ref().map(|t| (t.acked(), t.commit_point()));
                (p, offsets, o.in_flight)
            })
            .collect();
        (owned, s.high_watermarks.clone())
    };
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
    let mut view: Vec<PartitionView> = owned
        .into_iter()
        .map(|(partition, offsets, in_flight)| {
            let committed_offset = match offsets {
                Some((acked, _)) => Some(acked),
                None => positions.get(&partition).copied(),
            };
            let high_watermark = highs.get(&partition).copied();
            PartitionView {
                topic: topic.to_owned(),
                partition,
                committed_offset,
                settled_offset: offsets.map(|(_, settled)| settled),
                high_watermark,
                lag: high_watermark
                    .zip(committed_offset)
                    .map(|(high, committed)| (high - committed).max(0)),
                in_flight,
            }
        })
        .collect();
    view.sort_by_key(|p| p.partition);
    view
}
