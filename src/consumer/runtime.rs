//! The consumer's loop: intake from Kafka, the per-tenant [`Scheduler`], a [`Handler`] per
//! event, batched settlement, and offset commits from the [`PartitionOffsets`] trackers.
//!
//! Why order and dedupe hold with batched settlement: a tenant's next event may start as soon
//! as the previous one's handler returned, before its dedupe record is durable. If the process
//! dies before the batch commits, Kafka redelivers from the last committed offset, which is at
//! or before both events (the commit point only passes durably settled records), so both are
//! handled again in their original order; the partner sees a repeat carrying the same
//! `Idempotency-Key`, never a reordering.
//!
//! Rebalances: librdkafka runs the rebalance callbacks inside the loop's own poll. On revoke,
//! the callback cancels the work of the revoked partitions (no new attempt, no retry, no backoff
//! sleep starts after that), waits up to `revoke_drain` for attempts already under way to end
//! (each one settles itself durably and marks its offset), commits what is settled for those
//! partitions synchronously, and forgets them; the loop then drops their queued events, which
//! the next owner reads again. Why wait: an attempt of the old owner landing after the new
//! owner delivered the tenant's next event would reorder the partner's state. Work that outlives
//! the deadline is fenced by a generation number: it can no longer move a commit point of a
//! partition this instance lost, nor park anything. On assign, the paused tenants are read
//! again before the first record of the new partitions is looked at, so whichever instance owns
//! a tenant obeys the pause another instance recorded.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::breaker::FailureWindow;
use super::ledger::{self, AttemptLog, ParkedRecord, Pause, SettledAs, Settlement};
use super::offsets::PartitionOffsets;
use crate::broker;
use crate::config::Config;
use crate::delivery::{Attempt, Decision, Failure, FailureClass, Handler, Outcome, RetryPolicy};
use crate::outbox::{self, OutboxEvent};
use crate::scheduler::Scheduler;

/// Consumer tuning.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Events in flight at once, all tenants together.
    pub max_in_flight: usize,
    /// Events queued in memory before intake pauses (back-pressure).
    pub max_queued: usize,
    /// Settlements per transaction, at most.
    pub settle_batch: usize,
    /// How long a settlement may wait for its batch.
    pub settle_interval: Duration,
    /// Retry policy for retryable failures.
    pub retry: RetryPolicy,
    /// How often the persisted kill switch and resumed tenants are read.
    pub kill_switch_interval: Duration,
    /// A tenant paused for a retryable cause is resumed automatically after this long.
    pub auto_resume_after: Duration,
    /// While the partner-wide breaker is open, how often the held event is tried as a probe.
    pub breaker_probe_interval: Duration,
    /// The breaker also opens when a tenant's retries run out while at least this share of the
    /// tenants active within `breaker_window` are failing too...
    pub breaker_failure_ratio: f64,
    /// ...and at least this many tenants were active.
    pub breaker_min_tenants: usize,
    /// How far back "active" looks.
    pub breaker_window: Duration,
    /// On revoke and shutdown, how long attempts under way may take to end. Keep it below the
    /// group's session timeout.
    pub revoke_drain: Duration,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions {
            max_in_flight: 256,
            max_queued: 20_000,
            settle_batch: 1_000,
            settle_interval: Duration::from_millis(10),
            retry: RetryPolicy::default(),
            kill_switch_interval: Duration::from_millis(500),
            auto_resume_after: Duration::from_secs(60),
            breaker_probe_interval: Duration::from_secs(2),
            breaker_failure_ratio: 0.8,
            breaker_min_tenants: 5,
            breaker_window: Duration::from_secs(30),
            revoke_drain: Duration::from_secs(10),
        }
    }
}

impl ConsumeOptions {
    /// The defaults, with what the configuration overrides.
    pub fn configured(config: &crate::config::ConsumeConfig) -> Self {
        let mut o = ConsumeOptions::default();
        o.max_in_flight = config.max_in_flight.unwrap_or(o.max_in_flight);
        o.retry.base = config.retry_base.unwrap_or(o.retry.base);
        o.retry.max = config.retry_max.unwrap_or(o.retry.max).max(o.retry.base);
        o.retry.pause_after_attempts = config
            .pause_after_attempts
            .unwrap_or(o.retry.pause_after_attempts);
        o.retry.pause_after = config.pause_after.unwrap_or(o.retry.pause_after);
        o.auto_resume_after = config.auto_resume_after.unwrap_or(o.auto_resume_after);
        o
    }
}

/// Why the consumer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
}

/// Counters, shared so tests and metrics can read them live.
#[derive(Debug, Default)]
pub struct ConsumeStats {
    /// Events the handler delivered.
    pub delivered: std::sync::atomic::AtomicU64,
    /// Events skipped as already settled (redeliveries).
    pub duplicates: std::sync::atomic::AtomicU64,
    /// Records parked for paused tenants.
    pub parked: std::sync::atomic::AtomicU64,
    /// Offsets committed (commit calls).
    pub commits: std::sync::atomic::AtomicU64,
    /// Records received from Kafka.
    pub received: std::sync::atomic::AtomicU64,
    /// Events settled as expired (past `deliver_before`).
    pub expired: std::sync::atomic::AtomicU64,
    /// 1 while the persisted kill switch is on (nothing is dispatched), else 0.
    pub kill_switch: std::sync::atomic::AtomicU64,
    /// 1 while the partner-wide circuit breaker is open (consumption paused), else 0.
    pub breaker_open: std::sync::atomic::AtomicU64,
    /// Times the breaker opened.
    pub breaker_trips: std::sync::atomic::AtomicU64,
    /// Partitions this instance owns now.
    pub partitions: std::sync::atomic::AtomicU64,
    /// Transient Kafka errors seen (brokers down, request errors); librdkafka recovers.
    pub kafka_errors: std::sync::atomic::AtomicU64,
    /// How long, at most, a partition's commit point rested on a record in flight, in
    /// milliseconds (as seen at flushes): how far one tenant's slow or failing event (until it
    /// is parked) held every other tenant's commits back. Records merely waiting their turn in
    /// their tenant's queue are consumption, not counted.
    pub commit_lag_max_ms: std::sync::atomic::AtomicU64,
    /// From the record's timestamp (the outbox row's commit) to Ferry receiving it: the relay's
    /// and the broker's share of the latency.
    pub intake_latency: super::latency::Histogram,
    /// From the record's timestamp to the partner's acknowledgement (the handler returned done):
    /// the end-to-end latency of delivered events.
    pub ack_latency: super::latency::Histogram,
    /// From an event's dispatch to its handler's last outcome, retries included: the time
    /// its tenant is busy with it. Beside `intake_latency` and `ack_latency` it tells the
    /// partner's share of the latency from the wait in the tenant's queue.
    pub handling_latency: super::latency::Histogram,
    /// Events settled as ignored (their tenant has the integration off).
    pub ignored: std::sync::atomic::AtomicU64,
    /// Events whose failure paused their tenant.
    pub failed: std::sync::atomic::AtomicU64,
    /// Records the decoder refused (each paused its tenant, or joined a paused backlog).
    pub bad_events: std::sync::atomic::AtomicU64,
    /// Events being handled now.
    pub in_flight: std::sync::atomic::AtomicU64,
    /// Events in memory waiting for their tenant's turn.
    pub queued: std::sync::atomic::AtomicU64,
    /// Tenants this instance holds paused (their records are parked, not delivered).
    pub tenants_held: std::sync::atomic::AtomicU64,
    /// Retries made, by the failure's cause ([`Failure::cause`]).
    pub retries: CauseCounts,
    /// This instance's partitions, as last looked at (every `LAG_INTERVAL`).
    pub partition_view: Mutex<Vec<PartitionView>>,
}

/// Counts by a failure's cause.
#[derive(Debug, Default)]
pub struct CauseCounts(Mutex<std::collections::BTreeMap<&'static str, u64>>);

impl CauseCounts {
    /// Counts one of `cause`.
    pub fn add(&self, cause: &'static str) {
        *self
            .0
            .lock()
            .expect("cause counts")
            .entry(cause)
            .or_default() += 1;
    }

    /// Every cause seen, with its count, by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let counts = self.0.lock().expect("cause counts");
        counts.iter().map(|(c, n)| (*c, *n)).collect()
    }
}

/// A partition this instance owns, for the operator: where its commits are and how far behind
/// the log's end.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionView {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The group's committed offset as the broker last confirmed it (the next record to
    /// read), if known.
    pub committed_offset: Option<i64>,
    /// The commit point this instance has settled through (may be ahead of the broker's
    /// until the next commit lands).
    pub settled_offset: Option<i64>,
    /// The log's end (the offset the next record will get).
    pub high_watermark: Option<i64>,
    /// Records not yet committed: the high watermark less the committed offset.
    pub lag: Option<i64>,
    /// Events of this partition being handled now.
    pub in_flight: usize,
}

/// How often [`PartitionView`] is brought up to date, and librdkafka's statistics (with the
/// high watermarks) come.
const LAG_INTERVAL: Duration = Duration::from_secs(2);

/// The consumer's settings with librdkafka's statistics on (unless set already), for the high
/// watermarks.
fn with_statistics(mut config: rdkafka::ClientConfig) -> rdkafka::ClientConfig {
    if config.get("statistics.interval.ms").is_none() {
        config.set(
            "statistics.interval.ms",
            LAG_INTERVAL.as_millis().to_string(),
        );
    }
    config
}

impl ConsumeStats {
    /// Counts a settled event by its outcome.
    fn count(&self, outcome: SettledAs) {
        use std::sync::atomic::Ordering::Relaxed;
        match outcome {
            SettledAs::Delivered => self.delivered.fetch_add(1, Relaxed),
            SettledAs::Expired => self.expired.fetch_add(1, Relaxed),
            SettledAs::Ignored => self.ignored.fetch_add(1, Relaxed),
            // Counted as they arrive; skips are the admin API's.
            SettledAs::BadEvent | SettledAs::Skipped => 0,
        };
    }
}

/// Whether a consume error ends the consumer: librdkafka's fatal errors (the idempotence or
/// group membership can no longer be kept); every other error is transient and retried inside
/// librdkafka.
fn is_fatal(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode;
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::InvalidArgument
                | RDKafkaErrorCode::Authentication
        )
    )
}

/// What the loop and the rebalance callback share. Locked briefly, never across an await.
#[derive(Default)]
struct Shared {
    partitions: HashMap<i32, Owned>,
    generation: u64,
    /// Partitions revoked since the loop last looked: their queued events are dropped.
    lost: Vec<i32>,
    /// Set on assign: read the paused tenants again before the next record.
    reload_paused: bool,
    /// Each partition's high watermark, from librdkafka's statistics.
    high_watermarks: HashMap<i32, i64>,
}

/// A partition this instance owns.
struct Owned {
    generation: u64,
    offsets: Option<PartitionOffsets>,
    /// Cancelled on revoke and shutdown: no new attempt starts for this partition's work.
    cancel: CancellationToken,
    /// Handler tasks and backlog drains under way for this partition.
    in_flight: usize,
    /// When the handling of each record in flight started (kept across a breaker's hold): a
    /// commit point resting on a record in flight is held back for that long.
    started: std::collections::BTreeMap<i64, Instant>,
}

#[derive(Default)]
struct State {
    shared: Mutex<Shared>,
    /// Notified whenever a partition's `in_flight` drops.
    idle: Condvar,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("consumer state")
    }

    /// Cancels the work of `partitions` and waits until none is under way or `deadline`.
    /// Blocking: called from the rebalance callback and at shutdown, off the async world.
    fn cancel_and_wait(&self, partitions: &[i32], deadline: Instant) -> bool {
        let mut s = self.lock();
        for p in partitions {
            if let Some(owned) = s.partitions.get(p) {
                owned.cancel.cancel();
            }
        }
        loop {
            let busy: usize = partitions
                .iter()
                .filter_map(|p| s.partitions.get(p))
                .map(|o| o.in_flight)
                .sum();
            if busy == 0 {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    busy,
                    "attempts still under way at the drain deadline; fenced"
                );
                return false;
            }
            s = self.idle.wait_timeout(s, left).expect("consumer state").0;
        }
    }
}

/// Runs blocking work from inside the runtime without starving the tasks it waits for.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A claim on a partition for one piece of work (an event's handling, a backlog drain): the
/// revoke waits for it, and its settlement counts only while the partition is still ours.
struct Lease {
    state: Arc<State>,
    partition: i32,
    generation: u64,
    cancel: CancellationToken,
}

impl Lease {
    /// Claims `partition` if it is owned in `generation` (any generation when `None`).
    fn take(state: &Arc<State>, partition: i32, generation: Option<u64>) -> Option<Lease> {
        Self::take_for(state, partition, generation, None)
    }

    /// Claims the partition for the record at `offset` (an event's handling, a probe), noting
    /// when its handling started unless it started before (a retry after the breaker).
    fn take_for(
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
        })
    }

    /// Marks `offset` settled in the partition's tracker, if still ours.
    fn settled(&self, offset: i64) {
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

struct Context {
    state: Arc<State>,
    topic: String,
    revoke_drain: Duration,
    stats: Arc<ConsumeStats>,
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

/// Where a record came from, with the generation of the partition's ownership.
#[derive(Debug, Clone, Copy)]
struct Position {
    partition: i32,
    offset: i64,
    generation: u64,
}

struct Item {
    event: OutboxEvent,
    raw: ParkedRecord,
    position: Position,
    /// Found settled (a redelivery) when it arrived.
    settled: bool,
    /// Its attempts, once one failed: the operator's history of it.
    log: Vec<AttemptLog>,
    /// Log every attempt, the first too (a replayed backlog: it failed before).
    log_every: bool,
}

/// Records taken from Kafka in one turn of the loop, at most: one dedupe query for them all.
const INTAKE_BATCH: usize = 500;

/// How long intake waits for more records to fill a batch.
const INTAKE_LINGER: Duration = Duration::from_millis(2);

/// Dedupe lookups under way at once, at most (each holds a connection while it runs; the rest
/// of the pool is for settling).
const MAX_LOOKUPS: usize = 4;

/// A record on its way from intake to admission.
enum Arrival {
    /// A decoded event.
    Event(Item),
    /// A record the decoder refused.
    Bad(Refused),
}

/// A record the decoder refused: when its turn comes it pauses its tenant with the decoder's
/// reason and is parked first in the backlog.
struct Refused {
    raw: ParkedRecord,
    position: Position,
    pause: Pause,
}

/// What waits in a tenant's queue. A refused record waits its turn like an event: if the
/// tenant's event in flight fails too, that event must be parked ahead of it.
enum Queued {
    Event(Item),
    Refused(Refused),
}

impl Queued {
    fn position(&self) -> Position {
        match self {
            Queued::Event(item) => item.position,
            Queued::Refused(r) => r.position,
        }
    }

    /// The record to park, and where it came from.
    fn into_parked(self) -> (ParkedRecord, Position) {
        match self {
            Queued::Event(item) => (item.raw, item.position),
            Queued::Refused(r) => (r.raw, r.position),
        }
    }
}

enum Done {
    Settled(Item, SettledAs, u32),
    Duplicate(Item),
    /// Failed after this many attempts: pause the tenant.
    Pause(Item, Failure, u32),
    /// The partner refuses everyone (401/403), or most tenants are failing: hold this event,
    /// open the breaker.
    Breaker(Item, Failure),
    /// Its partition was revoked (or the consumer is stopping) before it settled: nothing is
    /// recorded; whoever owns the partition next reads it again.
    Revoked(Item),
    /// Its partition was revoked (or the consumer is stopping) as it settled: the task recorded
    /// the settlement itself and marked the offset, so the revoke's commit can pass it.
    SettledOnRevoke(Item, SettledAs),
}

/// What a drain task reports to the loop.
enum Drained {
    /// The backlog read came back empty: flip the tenant live if still empty, and if the
    /// partition is still this instance's in the drain's generation (`Position` names it).
    Empty(String, Position),
    /// Replaying failed again: the tenant stays paused with this reason.
    Failed(String, Failure, Option<uuid::Uuid>, u32),
    /// The database failed; try again on the next poll.
    Error(String, sqlx::Error),
    /// The tenant's partition was revoked or the consumer is stopping: the replayed part is
    /// recorded, the rest stays parked for the owner to replay.
    Revoked(String),
}

/// Runs the consumer until `shutdown`, counting into `stats`.
pub async fn run<H: Handler>(
    config: &Config,
    pool: PgPool,
    handler: Arc<H>,
    options: ConsumeOptions,
    stats: Arc<ConsumeStats>,
    shutdown: CancellationToken,
) -> Result<(), ConsumeError> {
    use std::sync::atomic::Ordering::Relaxed;
    let topic = config.kafka.topic.clone();
    let state = Arc::new(State::default());
    let consumer: Arc<StreamConsumer<Context>> = Arc::new(
        with_statistics(broker::consumer_config(
            &config.kafka,
            &config.kafka.group_id,
        ))
        .create_with_context(Context {
            state: Arc::clone(&state),
            topic: topic.clone(),
            revoke_drain: options.revoke_drain,
            stats: Arc::clone(&stats),
        })?,
    );
    let window = Arc::new(Mutex::new(FailureWindow::new(
        options.breaker_window,
        options.breaker_min_tenants,
        options.breaker_failure_ratio,
    )));
    consumer.subscribe(&[&topic])?;

    let mut scheduler: Scheduler<String, Queued> = Scheduler::new(options.max_in_flight);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Done)>();
    let mut pending = Pending::default();
    // Records taken from Kafka whose dedupe lookup is under way, admitted in order.
    let mut lookups = futures::stream::FuturesOrdered::new();
    let mut in_lookup = 0usize;
    let mut last_flush = Instant::now();
    // The batch being written, if any: one at a time, marked in the order written.
    let mut writing: Option<Writing> = None;
    // How many records that batch holds (they count against `max_queued` until written).
    let mut writing_len = 0usize;
    let mut tick = tokio::time::interval(options.settle_interval);
    // Tenants paused while this instance runs: their new records are parked, in order.
    let mut paused = paused_tenants(&pool).await?;
    // Tenants paused elsewhere (an operator, another instance) while one of their events is in
    // flight here: held, their queue parked once that event has ended (a failure of it must be
    // parked ahead of what came after it).
    // Shared with the handler tasks: they stop retrying a tenant being paused.
    let pausing: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let mut lag_check = tokio::time::interval(LAG_INTERVAL);

    // Which partition a tenant's records land on: a backlog is replayed by the instance that
    // owns the tenant's partition, never by two.
    let partitions = {
        let kafka = config.kafka.clone();
        tokio::task::spawn_blocking(move || broker::partition_count(&kafka, &kafka.topic))
            .await
            .expect("metadata task panicked")
            .ok()
            .flatten()
            .unwrap_or(1) as i32
    };
    // The partner-wide breaker: events that met a 401/403 wait here, in tenant order, while the
    // Kafka partitions are paused and the first one is tried as a probe.
    let mut held_by_breaker: Vec<(String, Item)> = Vec::new();
    let mut probing = false;
    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<(String, Done)>();
    let mut probe_tick = tokio::time::interval(options.breaker_probe_interval);
    let (drain_tx, mut drain_rx) = mpsc::unbounded_channel::<Drained>();
    let mut draining: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut kill_switch_check = tokio::time::interval(options.kill_switch_interval);
    // Async commit results never reach us (librdkafka reports them only to a C callback that
    // rust-rdkafka does not install), so unconfirmed commits are checked against the broker.
    let mut commit_check = tokio::time::interval(Duration::from_secs(2));
    let (checked_tx, mut checked_rx) = mpsc::unbounded_channel::<Vec<(i32, i64)>>();
    let mut commit_again = false;
    let mut killed: bool = sqlx::query_scalar("SELECT kill_switch FROM control")
        .fetch_one(&pool)
        .await?;
    stats.kill_switch.store(u64::from(killed), Relaxed);
    loop {
        // A pause noticed while the tenant had an event in flight takes effect once that event
        // has ended: its queue is parked, in order, and its later records follow.
        {
            let mut held = pausing.lock().expect("pausing tenants");
            let ready: Vec<String> = held
                .iter()
                .filter(|t| {
                    !scheduler.is_in_flight(*t) && !held_by_breaker.iter().any(|(h, _)| h == *t)
                })
                .cloned()
                .collect();
            for tenant in ready {
                held.remove(&tenant);
                if paused.insert(tenant.clone()) {
                    for queued in scheduler.take_queue(&tenant) {
                        pending.parked.push(queued.into_parked());
                    }
                }
            }
        }
        // Partitions revoked since the last turn: their queued and held events are the next
        // owner's now.
        if !std::mem::take(&mut state.lock().lost).is_empty() {
            let dropped = scheduler.drop_where(|queued| !is_current(&state, queued.position()));
            held_by_breaker.retain(|(_, item)| is_current(&state, item.position));
            // Not parked yet, so not settled: the next owner reads them again and decides.
            pending
                .parked
                .retain(|(_, position)| is_current(&state, *position));
            tracing::debug!(
                dropped = dropped.len(),
                "queued events of revoked partitions dropped"
            );
        }
        // The kill switch stops dispatching on every instance; intake continues up to
        // `max_queued`, and nothing is committed past undelivered events.
        // Dispatch what may run, checking the dedupe record for the whole batch in one query.
        let mut batch = Vec::new();
        let mut refused = Vec::new();
        while !killed
            && held_by_breaker.is_empty()
            && !probing
            && let Some((tenant, queued)) = scheduler.dispatch()
        {
            let item = match queued {
                Queued::Event(item) => item,
                Queued::Refused(r) => {
                    refused.push((tenant, r));
                    continue;
                }
            };
            let position = item.position;
            match Lease::take_for(
                &state,
                position.partition,
                Some(position.generation),
                Some(position.offset),
            ) {
                Some(lease) => batch.push((tenant, item, lease)),
                None => {
                    // Lost between intake and now: the next owner has it.
                    scheduler.complete(&tenant);
                }
            }
        }
        // A refused record's turn: everything of its tenant before it has settled; it and the
        // tenant's queue are parked, in order, and the tenant paused with the decoder's reason.
        for (tenant, r) in refused {
            if is_current(&state, r.position) {
                let mut records = vec![r.raw];
                pending.positions.push(r.position);
                for queued in scheduler.take_queue(&tenant) {
                    let (raw, position) = queued.into_parked();
                    records.push(raw);
                    pending.positions.push(position);
                }
                stats.parked.fetch_add(
                    ledger::park(&pool, &tenant, Some(&r.pause), &records).await?,
                    Relaxed,
                );
                scheduler.hold(&tenant);
                paused.insert(tenant.clone());
            }
            scheduler.complete(&tenant);
        }
        // A task per event; whether it is a redelivery was looked up when it arrived.
        for (tenant, item, lease) in batch {
            let position = item.position;
            let (handler, done_tx, retry, window, pool, stats, pausing) = (
                Arc::clone(&handler),
                done_tx.clone(),
                options.retry.clone(),
                Arc::clone(&window),
                pool.clone(),
                Arc::clone(&stats),
                Arc::clone(&pausing),
            );
            tokio::spawn(async move {
                let guard = Guard {
                    retry: &retry,
                    cancel: &lease.cancel,
                    window: &window,
                    stats: &stats,
                    pausing: &pausing,
                    owner: position,
                };
                let already = item.settled;
                let span = event_span(&item);
                let dispatched = std::time::Instant::now();
                let done =
                    tracing::Instrument::instrument(handle(&*handler, item, &guard, already), span)
                        .await;
                stats.handling_latency.record(dispatched.elapsed());
                if let Done::Settled(item, SettledAs::Delivered, _) = &done
                    && let Some(written) = item.event.occurred_at
                {
                    stats
                        .ack_latency
                        .record((chrono::Utc::now() - written).to_std().unwrap_or_default());
                }
                let done = if lease.cancel.is_cancelled() {
                    settle_on_revoke(done, &pool, &lease).await
                } else {
                    done
                };
                let _ = done_tx.send((tenant, done));
                drop(lease);
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // Intake takes what is ready (up to INTAKE_BATCH records) and sends it to a dedupe
            // lookup, one query per batch; lookups run concurrently and are admitted in order.
            // Everything held in memory counts against `max_queued`, the records waiting to be
            // parked too: a paused tenant's stream arriving faster than Postgres parks it must
            // slow intake down, not grow the process.
            message = consumer.recv(), if scheduler.queued() + in_lookup + pending.len() + writing_len < options.max_queued && lookups.len() < MAX_LOOKUPS => {
                let mut next = Some(message);
                let mut arrivals: Vec<Arrival> = Vec::new();
                // Records come a fetch at a time: linger briefly for a fuller batch.
                let linger = tokio::time::Instant::now() + INTAKE_LINGER;
                while let Some(message) = next.take() {
                    'one: {
                        let m = match message {
                            Ok(m) => m,
                            // librdkafka reports broker trouble (down, unreachable, request
                            // errors) as consume errors and recovers on its own; only a fatal
                            // error ends us.
                            Err(e) if is_fatal(&e) => return Err(e.into()),
                            Err(e) => {
                                if stats.kafka_errors.fetch_add(1, Relaxed).is_multiple_of(100) {
                                    tracing::warn!(error = %e, "kafka error; librdkafka retries");
                                }
                                break 'one;
                            }
                        };
                        stats.received.fetch_add(1, Relaxed);
                        if let Some(written) = m.timestamp().to_millis() {
                            let now = chrono::Utc::now().timestamp_millis();
                            stats.intake_latency.record(Duration::from_millis(now.saturating_sub(written).max(0) as u64));
                        }
                        // Assigned partitions: obey the pauses other instances recorded before
                        // any record of theirs is admitted (the callback ran inside this poll).
                        if std::mem::take(&mut state.lock().reload_paused) {
                            let now = paused_tenants(&pool).await?;
                            obey_pauses(now, &mut paused, &pausing, &mut scheduler);
                        }
                        let position = {
                            let mut s = state.lock();
                            let Some(owned) = s.partitions.get_mut(&m.partition()) else {
                                break 'one; // a record of a partition no longer ours
                            };
                            let offsets = owned.offsets.get_or_insert_with(|| PartitionOffsets::new(m.offset()));
                            if offsets.received(m.offset()).is_err() {
                                break 'one; // a re-fetch after a seek: already tracked
                            }
                            Position { partition: m.partition(), offset: m.offset(), generation: owned.generation }
                        };
                        let mut raw = parked_record(&m, &topic);
                        // The parked copy names the event and its tenant as decoded, so a replay
                        // can dedupe it and the backlog is filed under the right tenant.
                        match outbox::decode(&broker::raw_record(&m)) {
                            Ok(event) => {
                                raw.event_id = Some(event.id);
                                raw.tenant_id = event.tenant_id.to_string();
                                let item = Item { event, raw, position, settled: false, log: Vec::new(), log_every: false };
                                arrivals.push(Arrival::Event(item));
                            }
                            Err(bad) => {
                                stats.bad_events.fetch_add(1, Relaxed);
                                raw.event_id = bad.event_id;
                                raw.tenant_id = bad.tenant_id.as_ref().map_or_else(|| "unknown".to_owned(), |t| t.to_string());
                                let pause = Pause { cause: "bad_event", reason: bad.reason.to_string(), event_id: bad.event_id, next_retry_at: None, attempts: 0, response: None };
                                arrivals.push(Arrival::Bad(Refused { raw, position, pause }));
                            }
                        }
                    }
                    if arrivals.len() < INTAKE_BATCH {
                        next = tokio::time::timeout_at(linger, consumer.recv()).await.ok();
                    }
                }
                in_lookup += arrivals.len();
                let pool = pool.clone();
                // A task of its own: it must progress (and give its connection back) while the
                // loop awaits something else.
                lookups.push_back(tokio::spawn(async move {
                    let ids: Vec<uuid::Uuid> = arrivals
                        .iter()
                        .filter_map(|a| match a { Arrival::Event(item) => Some(item.event.id), Arrival::Bad(..) => None })
                        .collect();
                    // A failed lookup counts as "not settled": the event is handled again, which
                    // the partner's Idempotency-Key absorbs.
                    let settled = if ids.is_empty() { Default::default() } else { ledger::settled_ids(&pool, &ids).await.unwrap_or_default() };
                    (arrivals, settled)
                }));
            }
            // Admission, in arrival order: paused tenants' records are parked, bad records pause
            // their tenant, the rest join their tenant's queue.
            Some(looked_up) = futures::StreamExt::next(&mut lookups), if !lookups.is_empty() => {
                let (arrivals, settled) = looked_up.expect("dedupe lookup task panicked");
                in_lookup -= arrivals.len();
                for arrival in arrivals {
                    match arrival {
                        Arrival::Event(mut item) => {
                            if !is_current(&state, item.position) {
                                continue; // revoked meanwhile: the next owner reads it
                            }
                            let tenant = item.event.tenant_id.to_string();
                            if paused.contains(&tenant) {
                                pending.parked.push((item.raw, item.position));
                            } else {
                                item.settled = settled.contains(&item.event.id);
                                scheduler.arrive(tenant, Queued::Event(item));
                            }
                        }
                        Arrival::Bad(r) => {
                            if !is_current(&state, r.position) {
                                continue;
                            }
                            let tenant = r.raw.tenant_id.clone();
                            if paused.contains(&tenant) {
                                // Already paused: it joins the backlog in order; the first cause
                                // stays.
                                pending.parked.push((r.raw, r.position));
                            } else {
                                scheduler.arrive(tenant, Queued::Refused(r));
                            }
                        }
                    }
                }
            }
            Some((tenant, done)) = done_rx.recv() => {
                scheduler.complete(&tenant);
                match done {
                    Done::Revoked(_) => {}
                    Done::SettledOnRevoke(_, outcome) => {
                        stats.count(outcome);
                    }
                    // A failure of a partition lost meanwhile is the next owner's to meet:
                    // parking it here could race the owner's own intake.
                    Done::Breaker(item, _) | Done::Pause(item, _, _) if !is_current(&state, item.position) => {}
                    Done::Settled(item, outcome, attempts) => {
                        stats.count(outcome);
                        pending.settle(item, outcome, attempts);
                    }
                    Done::Duplicate(item) => {
                        stats.duplicates.fetch_add(1, Relaxed);
                        pending.positions.push(item.position);
                    }
                    Done::Breaker(item, failure) => {
                        if held_by_breaker.is_empty() {
                            stats.breaker_trips.fetch_add(1, Relaxed);
                            stats.breaker_open.store(1, Relaxed);
                            tracing::error!(error = %failure.message, status = ?failure.status, "the partner is failing for everyone: breaker open, consumption paused");
                            consumer.pause(&consumer.assignment()?)?;
                        }
                        held_by_breaker.push((tenant, item));
                    }
                    Done::Pause(item, failure, attempts) => {
                        stats.failed.fetch_add(1, Relaxed);
                        let pause = pause_for(&failure, Some(item.event.id), attempts, options.auto_resume_after);
                        let mut conn = pool.acquire().await?;
                        ledger::record_attempts(&mut conn, &item.log).await?;
                        drop(conn);
                        let mut records = vec![item.raw];
                        let mut positions = vec![item.position];
                        for queued in scheduler.take_queue(&tenant) {
                            let (raw, position) = queued.into_parked();
                            records.push(raw);
                            positions.push(position);
                        }
                        stats.parked.fetch_add(ledger::park(&pool, &tenant, Some(&pause), &records).await?, Relaxed);
                        scheduler.hold(&tenant);
                        paused.insert(tenant);
                        pending.positions.extend(positions);
                    }
                }
            }
            _ = tick.tick() => {}
            _ = lag_check.tick() => {
                // The paused set holds every paused tenant; count those whose partition is ours.
                let owned: std::collections::HashSet<i32> = state.lock().partitions.keys().copied().collect();
                let held = paused
                    .iter()
                    .chain(pausing.lock().expect("pausing tenants").iter())
                    .filter(|t| owned.contains(&broker::partition_for_key(t.as_bytes(), partitions)))
                    .count();
                stats.tenants_held.store(held as u64, Relaxed);
                let view = partition_view(&consumer, &state, &topic);
                *stats.partition_view.lock().expect("partition view") = view;
            }
            _ = commit_check.tick() => {
                let unconfirmed: Vec<i32> = state
                    .lock()
                    .partitions
                    .iter()
                    .filter(|(_, o)| o.offsets.as_ref().is_some_and(|o| o.committed() > o.acked()))
                    .map(|(&p, _)| p)
                    .collect();
                if !unconfirmed.is_empty() {
                    let (consumer, topic, tx) = (Arc::clone(&consumer), topic.clone(), checked_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let mut list = TopicPartitionList::new();
                        for p in unconfirmed {
                            list.add_partition(&topic, p);
                        }
                        if let Ok(got) = consumer.committed_offsets(list, Duration::from_secs(5)) {
                            let found = got
                                .elements_for_topic(&topic)
                                .iter()
                                .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1)))
                                .collect();
                            let _ = tx.send(found);
                        }
                    });
                }
            }
            Some(found) = checked_rx.recv() => {
                let mut s = state.lock();
                for (partition, on_broker) in found {
                    if let Some(offsets) = s.partitions.get_mut(&partition).and_then(|o| o.offsets.as_mut()) {
                        offsets.commit_succeeded(on_broker);
                        if offsets.committed() > offsets.acked() {
                            // Not there (failed, or still on its way): offer it again.
                            offsets.commit_failed(offsets.committed());
                            commit_again = true;
                        }
                    }
                }
            }
            _ = kill_switch_check.tick() => {
                let on: bool = sqlx::query_scalar("SELECT kill_switch FROM control").fetch_one(&pool).await?;
                if on != killed {
                    tracing::warn!(kill_switch = on, "kill switch changed");
                }
                killed = on;
                stats.kill_switch.store(u64::from(on), Relaxed);
                // Pauses recorded elsewhere (an operator's, or another instance's before a
                // rebalance) reach this instance here.
                let now = paused_tenants(&pool).await?;
                obey_pauses(now, &mut paused, &pausing, &mut scheduler);
                // Resumed tenants (by an operator, or retryable ones whose time came) that this
                // instance holds: replay their backlogs. New events keep being parked meanwhile.
                if !killed {
                    for tenant in ledger::tenants_to_drain(&pool).await? {
                        let partition = broker::partition_for_key(tenant.as_bytes(), partitions);
                        if paused.contains(&tenant)
                            && !draining.contains(&tenant)
                            && let Some(lease) = Lease::take(&state, partition, None)
                        {
                            draining.insert(tenant.clone());
                            let (handler, pool, tx, retry, window, stats, pausing) = (Arc::clone(&handler), pool.clone(), drain_tx.clone(), options.retry.clone(), Arc::clone(&window), Arc::clone(&stats), Arc::clone(&pausing));
                            let owner = Position { partition, offset: 0, generation: lease.generation };
                            tokio::spawn(async move {
                                let guard = Guard { retry: &retry, cancel: &lease.cancel, window: &window, stats: &stats, pausing: &pausing, owner };
                                let report = drain(&*handler, &pool, &tenant, &guard).await;
                                let _ = tx.send(report);
                                drop(lease);
                            });
                        }
                    }
                }
            }
            _ = probe_tick.tick(), if !held_by_breaker.is_empty() && !probing => {
                // Probe with the first held event: its success proves the partner is back.
                let (tenant, mut item) = held_by_breaker.remove(0);
                let Some(lease) = Lease::take(&state, item.position.partition, Some(item.position.generation)) else {
                    continue; // lost meanwhile: the next owner has it
                };
                probing = true;
                let (handler, tx) = (Arc::clone(&handler), probe_tx.clone());
                let span = event_span(&item);
                tokio::spawn(async move {
                    let number = item.log.len() as u32 + 1;
                    let started = chrono::Utc::now();
                    let outcome = tracing::Instrument::instrument(
                        handler.handle(&item.event, &attempt_at(&item, number)),
                        span,
                    )
                    .await;
                    drop(lease);
                    let ended = |item: &mut Item, outcome: &'static str, failure: Option<&Failure>| {
                        let log = attempt_log(item, number, started, outcome, failure);
                        item.log.push(log);
                    };
                    let done = match outcome {
                        Outcome::Done => {
                            ended(&mut item, "delivered", None);
                            Done::Settled(item, SettledAs::Delivered, number)
                        }
                        Outcome::Ignored => {
                            ended(&mut item, "ignored", None);
                            Done::Settled(item, SettledAs::Ignored, number)
                        }
                        Outcome::Failed(f) => {
                            ended(&mut item, "failed", Some(&f));
                            Done::Breaker(item, f)
                        }
                        Outcome::Deferred(_) => Done::Breaker(item, Failure {
                            class: crate::delivery::FailureClass::PartnerWide,
                            message: "deferred during a probe".into(),
                            status: None, response: None, retry_after: None,
                        }),
                    };
                    let _ = tx.send((tenant, done));
                });
            }
            Some((tenant, done)) = probe_rx.recv() => {
                probing = false;
                match done {
                    Done::Settled(item, outcome, attempts) => {
                        stats.count(outcome);
                        pending.settle(item, outcome, attempts);
                        // Closed: the held events run first, each ahead of its tenant's queue.
                        for (t, held) in held_by_breaker.drain(..) {
                            scheduler.retry_first(t, Queued::Event(held));
                        }
                        stats.breaker_open.store(0, Relaxed);
                        consumer.resume(&consumer.assignment()?)?;
                        tracing::info!(%tenant, "the partner answers again: breaker closed");
                    }
                    Done::Breaker(item, _) | Done::Pause(item, _, _) if is_current(&state, item.position) => {
                        held_by_breaker.insert(0, (tenant, item));
                    }
                    _ => {}
                }
            }
            Some(written) = async { Some(writing.as_mut()?.await) }, if writing.is_some() => {
                writing = None;
                writing_len = 0;
                let positions = written.expect("settle task panicked")?;
                mark_and_commit(&consumer, &state, &topic, positions, &stats, CommitMode::Async)?;
            }
            Some(report) = drain_rx.recv() => match report {
                Drained::Empty(tenant, owner) if !is_current(&state, owner) => {
                    draining.remove(&tenant);
                }
                Drained::Empty(tenant, _) => {
                    draining.remove(&tenant);
                    // Only this loop parks, and it parks what it buffered first: once the batch
                    // being written and what is pending are durable, nothing can be parked for
                    // the tenant between then and the flip.
                    finish_writing(&mut writing, &consumer, &state, &topic, &stats).await?;
                    writing_len = 0;
                    if pending.parked.iter().any(|(r, _)| r.tenant_id == tenant) {
                        flush(&pool, &consumer, &state, &topic, &mut pending, &stats, CommitMode::Async).await?;
                        last_flush = Instant::now();
                    }
                    if ledger::finish_drain(&pool, &tenant).await? {
                        paused.remove(&tenant);
                        scheduler.release(&tenant);
                        tracing::info!(%tenant, "backlog replayed; tenant live again");
                    }
                }
                Drained::Failed(tenant, failure, event_id, attempts) => {
                    draining.remove(&tenant);
                    stats.failed.fetch_add(1, Relaxed);
                    let pause = pause_for(&failure, event_id, attempts, options.auto_resume_after);
                    ledger::park(&pool, &tenant, Some(&pause), &[]).await?;
                }
                Drained::Error(tenant, e) => {
                    draining.remove(&tenant);
                    tracing::warn!(%tenant, error = %e, "replaying the backlog failed; will try again");
                }
                Drained::Revoked(tenant) => {
                    draining.remove(&tenant);
                }
            },
        }
        stats.in_flight.store(scheduler.in_flight() as u64, Relaxed);
        stats.queued.store(scheduler.queued() as u64, Relaxed);
        // Everything the breaker held went to other instances: nothing left to probe with.
        if held_by_breaker.is_empty() && !probing && stats.breaker_open.load(Relaxed) == 1 {
            stats.breaker_open.store(0, Relaxed);
            consumer.resume(&consumer.assignment()?)?;
        }
        if std::mem::take(&mut commit_again) {
            mark_and_commit(
                &consumer,
                &state,
                &topic,
                Vec::new(),
                &stats,
                CommitMode::Async,
            )?;
        }
        // Settle in batches, a task writing while the loop goes on; what settles meanwhile
        // waits for the next batch.
        if writing.is_none()
            && (pending.len() >= options.settle_batch
                || (pending.len() > 0 && last_flush.elapsed() >= options.settle_interval))
        {
            writing_len = pending.len();
            writing = Some(tokio::spawn(write_pending(
                pool.clone(),
                std::mem::take(&mut pending),
                Arc::clone(&stats),
            )));
            last_flush = Instant::now();
        }
    }
    // Shutdown: no new attempt starts; attempts under way end (bounded by `revoke_drain`) and
    // settle themselves; what settled before is flushed; then one synchronous commit.
    finish_writing(&mut writing, &consumer, &state, &topic, &stats).await?;
    let owned: Vec<i32> = state.lock().partitions.keys().copied().collect();
    let deadline = Instant::now() + options.revoke_drain;
    blocking(|| state.cancel_and_wait(&owned, deadline));
    while let Ok((_, done)) = done_rx.try_recv() {
        if let Done::Settled(item, outcome, attempts) = done {
            pending.settle(item, outcome, attempts);
        }
    }
    flush(
        &pool,
        &consumer,
        &state,
        &topic,
        &mut pending,
        &stats,
        CommitMode::Sync,
    )
    .await?;
    Ok(())
}

/// What bounds an event's handling: the retry policy, the partition's cancellation (revoke,
/// shutdown), and the failure window that tells a tenant's failure from the partner's.
struct Guard<'a> {
    retry: &'a RetryPolicy,
    cancel: &'a CancellationToken,
    window: &'a Mutex<FailureWindow<String>>,
    stats: &'a ConsumeStats,
    /// Tenants an operator (or another instance) paused while their event is in flight here:
    /// a failing attempt of theirs is not retried but parked at once.
    pausing: &'a Mutex<std::collections::HashSet<String>>,
    /// The partition (and generation) the work belongs to.
    owner: Position,
}

impl Guard<'_> {
    /// Sleeps `wait`; false if cancelled first.
    async fn sleep(&self, wait: Duration) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    fn record(&self, tenant: &str, failed: bool) {
        self.window.lock().expect("failure window").record(
            tenant.to_owned(),
            failed,
            Instant::now(),
        );
    }

    fn is_pausing(&self, tenant: &str) -> bool {
        self.pausing
            .lock()
            .expect("pausing tenants")
            .contains(tenant)
    }

    fn most_failing(&self) -> bool {
        self.window
            .lock()
            .expect("failure window")
            .most_failing(Instant::now())
    }
}

/// Runs one event to an end: a duplicate (already settled), expired, delivered, a failure that
/// pauses its tenant or trips the breaker, or revoked. Retries happen here, holding only this
/// tenant; no attempt starts once the partition's work is cancelled. Once an attempt fails,
/// every attempt of the event is logged on it for the operator's history.
async fn handle<H: Handler>(
    handler: &H,
    mut item: Item,
    guard: &Guard<'_>,
    already_settled: bool,
) -> Done {
    if already_settled {
        return Done::Duplicate(item);
    }
    if item
        .event
        .deliver_before
        .is_some_and(|deadline| deadline <= chrono::Utc::now())
    {
        return Done::Settled(item, SettledAs::Expired, 0);
    }
    let tenant = item.event.tenant_id.to_string();
    let first_failure = Instant::now();
    // After a breaker's hold the event was attempted before: number on from there.
    let mut attempt = item.log.len() as u32 + 1;
    loop {
        if guard.cancel.is_cancelled() {
            return Done::Revoked(item);
        }
        tracing::Span::current().record("attempt", attempt);
        let started = chrono::Utc::now();
        let outcome = handler
            .handle(&item.event, &attempt_at(&item, attempt))
            .await;
        let ended = |item: &mut Item, outcome: &'static str| {
            if item.log_every || !item.log.is_empty() {
                item.log
                    .push(attempt_log(item, attempt, started, outcome, None));
            }
        };
        match outcome {
            Outcome::Done => {
                guard.record(&tenant, false);
                ended(&mut item, "delivered");
                return Done::Settled(item, SettledAs::Delivered, attempt);
            }
            Outcome::Ignored => {
                ended(&mut item, "ignored");
                return Done::Settled(item, SettledAs::Ignored, attempt);
            }
            Outcome::Deferred(until) => {
                let wait = (until - chrono::Utc::now()).to_std().unwrap_or_default();
                if !guard.sleep(wait).await {
                    return Done::Revoked(item);
                }
            }
            Outcome::Failed(failure) => {
                let log = attempt_log(&item, attempt, started, "failed", Some(&failure));
                item.log.push(log);
                // A permanent failure is about this event, not the partner's health.
                if failure.class != FailureClass::Permanent {
                    guard.record(&tenant, true);
                }
                let jitter =
                    f64::from(item.event.id.as_u128() as u32 ^ attempt) / f64::from(u32::MAX);
                match guard
                    .retry
                    .decide(&failure, attempt, first_failure.elapsed(), jitter)
                {
                    // Paused while this event was failing: park it now, ahead of the rest.
                    Decision::RetryIn(_) if guard.is_pausing(&tenant) => {
                        return Done::Pause(item, failure, attempt);
                    }
                    Decision::RetryIn(wait) => {
                        guard.stats.retries.add(failure.cause());
                        if !guard.sleep(wait).await {
                            return Done::Revoked(item);
                        }
                    }
                    // Most tenants are failing too: the partner is down, not this tenant.
                    Decision::PauseTenant
                        if failure.class == FailureClass::Retryable && guard.most_failing() =>
                    {
                        return Done::Breaker(item, failure);
                    }
                    Decision::PauseTenant => return Done::Pause(item, failure, attempt),
                    Decision::TripBreaker => return Done::Breaker(item, failure),
                }
                attempt += 1;
            }
        }
    }
}

/// Who this consumer is, in the attempt history: host and process.
fn instance() -> &'static str {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "ferry".to_owned());
        format!("{host}:{}", std::process::id())
    })
}

/// The history entry of attempt `number` at `item`, started at `started` and ending now.
fn attempt_log(
    item: &Item,
    number: u32,
    started: chrono::DateTime<chrono::Utc>,
    outcome: &'static str,
    failure: Option<&Failure>,
) -> AttemptLog {
    AttemptLog {
        event_id: item.event.id,
        attempt: number as i32,
        started_at: started,
        finished_at: chrono::Utc::now(),
        outcome,
        error: failure.map(|f| format!("{}: {}", f.cause(), f.message)),
        response: failure.and_then(|f| {
            f.status
                .map(|status| serde_json::json!({"status": status, "body": f.response}))
        }),
        instance: instance().to_owned(),
    }
}

/// The span of one event's handling: a child of the writer's span when the record carried its
/// `traceparent`, with the event's coordinates as attributes. At debug level, so it costs
/// nothing unless a trace exporter (which takes every level) or `RUST_LOG=debug` wants it.
fn event_span(item: &Item) -> tracing::Span {
    let span = tracing::debug_span!(
        "deliver event",
        otel.kind = "consumer",
        tenant = %item.event.tenant_id,
        partition = item.position.partition,
        offset = item.position.offset,
        event_id = %item.event.id,
        event_type = item.event.event_type().as_str(),
        attempt = tracing::field::Empty,
    );
    if let Some(traceparent) = &item.event.traceparent {
        crate::telemetry::continue_trace(&span, traceparent);
    }
    span
}

/// Attempt `number` at the record that carried `item`.
fn attempt_at(item: &Item, number: u32) -> Attempt {
    Attempt {
        number,
        topic: item.raw.topic.clone(),
        partition: item.raw.partition,
        offset: item.raw.offset,
    }
}

/// A task whose partition was revoked (or the consumer is stopping) as it ended: a settled event
/// is recorded now and its offset marked, so the revoke's commit passes it and the next owner
/// does not send it again; anything else is left to the next owner.
async fn settle_on_revoke(done: Done, pool: &PgPool, lease: &Lease) -> Done {
    match done {
        Done::Settled(item, outcome, attempts) => {
            let record = settlement(&item, outcome, attempts);
            let written = async {
                let mut tx = pool.begin().await?;
                ledger::record_settled(&mut tx, std::slice::from_ref(&record)).await?;
                tx.commit().await
            }
            .await;
            match written {
                Ok(()) => {
                    lease.settled(item.position.offset);
                    Done::SettledOnRevoke(item, outcome)
                }
                Err(e) => {
                    tracing::warn!(error = %e, event = %item.event.id, "settling on revoke failed; the next owner sends it again");
                    Done::Revoked(item)
                }
            }
        }
        Done::Duplicate(item) => {
            lease.settled(item.position.offset);
            Done::Revoked(item)
        }
        Done::Pause(item, _, _)
        | Done::Breaker(item, _)
        | Done::Revoked(item)
        | Done::SettledOnRevoke(item, _) => Done::Revoked(item),
    }
}

/// Whether the partition `position` came from is still ours, in the same generation.
fn is_current(state: &State, position: Position) -> bool {
    state
        .lock()
        .partitions
        .get(&position.partition)
        .is_some_and(|o| o.generation == position.generation && !o.cancel.is_cancelled())
}

/// Brings the loop's view of paused tenants in line with `now` (the database's): a tenant
/// newly paused is held at once and parked when nothing of it is in flight (`pausing`); one no
/// longer paused (flipped live by the instance that owned it before a rebalance) is released.
fn obey_pauses(
    now: std::collections::HashSet<String>,
    paused: &mut std::collections::HashSet<String>,
    pausing: &Mutex<std::collections::HashSet<String>>,
    scheduler: &mut Scheduler<String, Queued>,
) {
    let mut pausing = pausing.lock().expect("pausing tenants");
    for tenant in paused.iter().chain(pausing.iter()) {
        if !now.contains(tenant) {
            scheduler.release(tenant);
        }
    }
    paused.retain(|t| now.contains(t));
    pausing.retain(|t| now.contains(t));
    for tenant in now {
        if !paused.contains(&tenant) && pausing.insert(tenant.clone()) {
            scheduler.hold(&tenant);
        }
    }
}

/// This instance's partitions from what it knows already, without a broker round trip (a
/// watermark or offset request shares the connection with the fetches, and a slow broker would
/// make every fetch wait behind it): the committed offset the broker last confirmed (checked
/// every couple of seconds, see `commit_check`), or for a partition nothing was read from yet
/// its fetch position; and the high watermark librdkafka learns from the fetch responses (its
/// statistics, [`Context::stats`]).
fn partition_view(
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

/// The tenants whose records are parked rather than delivered: paused, or replaying a backlog.
async fn paused_tenants(pool: &PgPool) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    Ok(ledger::inactive_tenants(pool)
        .await?
        .into_iter()
        .filter(|(_, state)| state == "paused" || state == "draining")
        .map(|(t, _)| t)
        .collect())
}

/// Replays a tenant's parked backlog in order, a page at a time, through the same path as live
/// events (dedupe, expiry, handler with retries); each page's settlements and removal commit
/// together.
async fn drain<H: Handler>(handler: &H, pool: &PgPool, tenant: &str, guard: &Guard<'_>) -> Drained {
    let mut after = 0;
    loop {
        let page = match ledger::parked_backlog(pool, tenant, after, 500).await {
            Ok(page) => page,
            Err(e) => return Drained::Error(tenant.to_owned(), e),
        };
        if page.is_empty() {
            // Revoked meanwhile: the new owner parks this tenant's records now, and only it may
            // flip the tenant live.
            if guard.cancel.is_cancelled() {
                return Drained::Revoked(tenant.to_owned());
            }
            return Drained::Empty(tenant.to_owned(), guard.owner);
        }
        let mut settlements = Vec::new();
        let mut attempts = Vec::new();
        let mut through = after;
        let ids: Vec<uuid::Uuid> = page.iter().filter_map(|(_, r)| r.event_id).collect();
        let settled = match ledger::settled_ids(pool, &ids).await {
            Ok(settled) => settled,
            Err(e) => return Drained::Error(tenant.to_owned(), e),
        };
        for (seq, raw) in page {
            let record = outbox::RawRecord {
                key: raw.key.as_deref(),
                headers: raw
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_deref()))
                    .collect(),
                value: raw.value.as_deref(),
                timestamp_ms: raw.timestamp.map(|t| t.timestamp_millis()),
            };
            let event = match outbox::decode(&record) {
                Ok(event) => event,
                Err(bad) => {
                    let failure = Failure {
                        class: crate::delivery::FailureClass::Permanent,
                        message: bad.to_string(),
                        status: None,
                        response: None,
                        retry_after: None,
                    };
                    let _ = ledger::unpark(pool, tenant, through, &settlements, &attempts).await;
                    return Drained::Failed(tenant.to_owned(), failure, bad.event_id, 0);
                }
            };
            let position = Position {
                partition: raw.partition,
                offset: raw.offset,
                generation: 0,
            };
            let already = settled.contains(&event.id);
            let item = Item {
                event,
                raw,
                position,
                settled: already,
                log: Vec::new(),
                log_every: true,
            };
            let span = event_span(&item);
            match tracing::Instrument::instrument(handle(handler, item, guard, already), span).await
            {
                Done::Settled(mut item, outcome, tries) => {
                    guard.stats.count(outcome);
                    settlements.push(settlement(&item, outcome, tries));
                    attempts.append(&mut item.log);
                }
                Done::Duplicate(_) | Done::SettledOnRevoke(..) => {}
                Done::Revoked(_) => {
                    // Keep what was replayed; the rest stays parked for the partition's owner.
                    return match ledger::unpark(pool, tenant, through, &settlements, &attempts)
                        .await
                    {
                        Ok(()) => Drained::Revoked(tenant.to_owned()),
                        Err(e) => Drained::Error(tenant.to_owned(), e),
                    };
                }
                Done::Pause(mut item, failure, tries) => {
                    attempts.append(&mut item.log);
                    let _ = ledger::unpark(pool, tenant, through, &settlements, &attempts).await;
                    return Drained::Failed(tenant.to_owned(), failure, Some(item.event.id), tries);
                }
                Done::Breaker(mut item, failure) => {
                    attempts.append(&mut item.log);
                    let _ = ledger::unpark(pool, tenant, through, &settlements, &attempts).await;
                    return Drained::Failed(tenant.to_owned(), failure, Some(item.event.id), 1);
                }
            }
            through = seq;
        }
        if let Err(e) = ledger::unpark(pool, tenant, through, &settlements, &attempts).await {
            return Drained::Error(tenant.to_owned(), e);
        }
        after = through;
    }
}

/// The pause a failure calls for: a retryable cause is retried automatically later.
fn pause_for(
    failure: &Failure,
    event_id: Option<uuid::Uuid>,
    attempts: u32,
    auto_resume_after: Duration,
) -> Pause {
    // A partner-wide refusal met while replaying a backlog is retried later, like a timeout.
    let retryable = failure.class != crate::delivery::FailureClass::Permanent;
    Pause {
        cause: if retryable { "retryable" } else { "permanent" },
        reason: match failure.status {
            Some(status) => format!("{} (HTTP {status})", failure.message),
            None => failure.message.clone(),
        },
        event_id,
        next_retry_at: retryable.then(|| {
            chrono::Utc::now() + chrono::Duration::from_std(auto_resume_after).unwrap_or_default()
        }),
        attempts,
        // What the partner answered, kept for the operator.
        response: failure
            .status
            .map(|status| serde_json::json!({"status": status, "body": failure.response})),
    }
}

fn settlement(item: &Item, outcome: SettledAs, attempts: u32) -> Settlement {
    Settlement::new(&item.event, &attempt_at(item, attempts), outcome)
}

fn parked_record<M: Message>(m: &M, topic: &str) -> ParkedRecord {
    ParkedRecord {
        tenant_id: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
        event_id: None,
        topic: topic.to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        headers: m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default(),
        value: m.payload().map(<[u8]>::to_vec),
        timestamp: m
            .timestamp()
            .to_millis()
            .and_then(chrono::DateTime::from_timestamp_millis),
    }
}

/// What settled since the last flush.
#[derive(Default)]
struct Pending {
    /// Handled events, recorded in `deliveries`.
    settlements: Vec<(Settlement, Position)>,
    /// Records settled with nothing left to record (parked already, duplicates, bad records).
    positions: Vec<Position>,
    /// Records of paused tenants, parked at the flush, in arrival order.
    parked: Vec<(ParkedRecord, Position)>,
    /// The attempt history of settled events that failed before they settled.
    attempts: Vec<AttemptLog>,
}

impl Pending {
    fn len(&self) -> usize {
        self.settlements.len() + self.positions.len() + self.parked.len()
    }

    /// `item` settled as `outcome` after `attempts`: its record and its attempt history.
    fn settle(&mut self, mut item: Item, outcome: SettledAs, attempts: u32) {
        self.settlements
            .push((settlement(&item, outcome, attempts), item.position));
        self.attempts.append(&mut item.log);
    }
}

/// Parks the pending records of paused tenants and records the settlements in one
/// transaction; returns every position they settle. Runs as a task of its own, one at a time,
/// so the loop takes in and dispatches while a batch is written; the positions are marked only
/// once it is durable ([`mark_and_commit`]).
async fn write_pending(
    pool: PgPool,
    pending: Pending,
    stats: Arc<ConsumeStats>,
) -> Result<Vec<Position>, sqlx::Error> {
    let Pending {
        settlements,
        positions: mut settled,
        parked,
        attempts,
    } = pending;
    if !parked.is_empty() {
        let (records, positions): (Vec<ParkedRecord>, Vec<Position>) = parked.into_iter().unzip();
        let n = ledger::park(&pool, "", None, &records).await?;
        stats
            .parked
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        settled.extend(positions);
    }
    if !settlements.is_empty() {
        let (batch, positions): (Vec<Settlement>, Vec<Position>) = settlements.into_iter().unzip();
        let mut tx = pool.begin().await?;
        ledger::record_settled(&mut tx, &batch).await?;
        ledger::record_attempts(&mut tx, &attempts).await?;
        tx.commit().await?;
        settled.extend(positions);
    }
    Ok(settled)
}

/// A settle batch being written: the positions it settles, once durable.
type Writing = tokio::task::JoinHandle<Result<Vec<Position>, sqlx::Error>>;

/// Waits for the batch being written, if any, and marks it.
async fn finish_writing(
    writing: &mut Option<Writing>,
    consumer: &StreamConsumer<Context>,
    state: &State,
    topic: &str,
    stats: &ConsumeStats,
) -> Result<(), ConsumeError> {
    if let Some(batch) = writing.take() {
        let positions = batch.await.expect("settle task panicked")?;
        mark_and_commit(consumer, state, topic, positions, stats, CommitMode::Async)?;
    }
    Ok(())
}

/// Writes what is pending and marks it, in this task: for the drain's flip and for shutdown.
async fn flush(
    pool: &PgPool,
    consumer: &StreamConsumer<Context>,
    state: &State,
    topic: &str,
    pending: &mut Pending,
    stats: &Arc<ConsumeStats>,
    mode: CommitMode,
) -> Result<(), ConsumeError> {
    let positions = write_pending(pool.clone(), std::mem::take(pending), Arc::clone(stats)).await?;
    mark_and_commit(consumer, state, topic, positions, stats, mode)
}

/// Marks durable positions settled in their partitions' trackers (if still owned, same
/// generation) and commits the points that moved.
fn mark_and_commit(
    consumer: &StreamConsumer<Context>,
    state: &State,
    topic: &str,
    positions: Vec<Position>,
    stats: &ConsumeStats,
    mode: CommitMode,
) -> Result<(), ConsumeError> {
    let mut commit = TopicPartitionList::new();
    {
        let mut s = state.lock();
        for p in positions {
            if let Some(owned) = s.partitions.get_mut(&p.partition)
                && owned.generation == p.generation
                && let Some(offsets) = owned.offsets.as_mut()
            {
                let _ = offsets.settled(p.offset);
                owned.started.remove(&p.offset);
            }
        }
        for (&partition, owned) in s.partitions.iter_mut() {
            let Some(offsets) = owned.offsets.as_mut() else {
                continue;
            };
            // The last, synchronous commit covers whatever the broker has not confirmed.
            let point = match mode {
                CommitMode::Sync => {
                    (offsets.commit_point() > offsets.acked()).then(|| offsets.commit_point())
                }
                CommitMode::Async => offsets.take_commit(),
            };
            if let Some(point) = point {
                commit.add_partition_offset(topic, partition, Offset::Offset(point))?;
            }
            let point = offsets.commit_point();
            // Records whose handling ended without a settlement here (revoked) are forgotten
            // once the point passes them.
            while owned
                .started
                .first_key_value()
                .is_some_and(|(o, _)| *o < point)
            {
                owned.started.pop_first();
            }
            if let Some(started) = owned.started.get(&point) {
                let behind = started.elapsed().as_millis() as u64;
                stats
                    .commit_lag_max_ms
                    .fetch_max(behind, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    if commit.count() > 0 {
        match mode {
            CommitMode::Sync => {
                // At shutdown: a failure costs a redelivery (deduped), not an error exit.
                if let Err(e) = blocking(|| consumer.commit(&commit, mode)) {
                    tracing::warn!(error = %e, "final commit failed; the next start replays from the previous one");
                }
            }
            CommitMode::Async => consumer.commit(&commit, mode)?,
        }
        stats
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}
