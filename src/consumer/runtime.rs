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
//! Rebalances: librdkafka's rebalance callbacks run on its thread; on revoke, the callback
//! commits what is settled for the revoked partitions (synchronously) and forgets them. Work
//! still in flight for them is fenced by a generation number: its settlement is still recorded
//! (true and harmless), but it can no longer move a commit point of a partition this instance
//! lost.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ledger::{self, ParkedRecord, Pause, SettledAs, Settlement};
use super::offsets::PartitionOffsets;
use crate::broker;
use crate::config::Config;
use crate::delivery::{Decision, Failure, Handler, Outcome, RetryPolicy};
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
        }
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
}

#[derive(Default)]
struct Shared {
    partitions: HashMap<i32, Owned>,
    generation: u64,
}

struct Owned {
    generation: u64,
    offsets: Option<PartitionOffsets>,
}

struct Context {
    shared: Arc<Mutex<Shared>>,
    topic: String,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let mut shared = self.shared.lock().expect("consumer state");
            let mut commit = TopicPartitionList::new();
            for element in list.elements_for_topic(&self.topic) {
                if let Some(owned) = shared.partitions.remove(&element.partition())
                    && let Some(offsets) = owned.offsets
                    && offsets.commit_point() > offsets.committed()
                {
                    let _ = commit.add_partition_offset(
                        &self.topic,
                        element.partition(),
                        Offset::Offset(offsets.commit_point()),
                    );
                }
            }
            drop(shared);
            if commit.count() > 0
                && let Err(e) = consumer.commit(&commit, CommitMode::Sync)
            {
                tracing::warn!(error = %e, "commit on revoke failed; the next owner replays from the previous commit");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let mut shared = self.shared.lock().expect("consumer state");
            for element in list.elements_for_topic(&self.topic) {
                shared.generation += 1;
                let generation = shared.generation;
                shared.partitions.insert(
                    element.partition(),
                    Owned {
                        generation,
                        offsets: None,
                    },
                );
            }
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
}

enum Done {
    Settled(Item, SettledAs, u32),
    Duplicate(Item),
    Pause(Item, Failure),
    /// The partner refuses everyone (401/403): hold this event, open the breaker.
    Breaker(Item, Failure),
}

/// What a drain task reports to the loop.
enum Drained {
    /// The backlog read came back empty: flip the tenant live if still empty.
    Empty(String),
    /// Replaying failed again: the tenant stays paused with this reason.
    Failed(String, Failure, Option<uuid::Uuid>),
    /// The database failed; try again on the next poll.
    Error(String, sqlx::Error),
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
    let shared = Arc::new(Mutex::new(Shared::default()));
    let consumer: StreamConsumer<Context> =
        broker::consumer_config(&config.kafka, &config.kafka.group_id).create_with_context(
            Context {
                shared: Arc::clone(&shared),
                topic: topic.clone(),
            },
        )?;
    consumer.subscribe(&[&topic])?;

    let mut scheduler: Scheduler<String, Item> = Scheduler::new(options.max_in_flight);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Done)>();
    let mut settlements: Vec<(Settlement, Position)> = Vec::new();
    let mut settled_positions: Vec<Position> = Vec::new();
    let mut last_flush = Instant::now();
    let mut tick = tokio::time::interval(options.settle_interval);
    // Tenants paused while this instance runs: their new records are parked, in order.
    let mut paused: std::collections::HashSet<String> = ledger::inactive_tenants(&pool)
        .await?
        .into_iter()
        .filter(|(_, state)| state == "paused" || state == "draining")
        .map(|(t, _)| t)
        .collect();

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
    let mut killed: bool = sqlx::query_scalar("SELECT kill_switch FROM control")
        .fetch_one(&pool)
        .await?;
    stats.kill_switch.store(u64::from(killed), Relaxed);
    loop {
        // The kill switch stops dispatching on every instance; intake continues up to
        // `max_queued`, and nothing is committed past undelivered events.
        // Dispatch what may run, checking the dedupe record for the whole batch in one query.
        let mut batch = Vec::new();
        while !killed
            && held_by_breaker.is_empty()
            && let Some(next) = scheduler.dispatch()
        {
            batch.push(next);
        }
        if !batch.is_empty() {
            // Off the loop: one lookup for the batch, then a task per event. A failed lookup
            // counts as "not settled": the event is handled again, which the partner's
            // Idempotency-Key absorbs.
            let (handler, pool, done_tx, retry) = (
                Arc::clone(&handler),
                pool.clone(),
                done_tx.clone(),
                options.retry.clone(),
            );
            tokio::spawn(async move {
                let ids: Vec<uuid::Uuid> = batch.iter().map(|(_, item)| item.event.id).collect();
                let settled = ledger::settled_ids(&pool, &ids).await.unwrap_or_default();
                for (tenant, item) in batch {
                    let already = settled.contains(&item.event.id);
                    let (handler, done_tx, retry) =
                        (Arc::clone(&handler), done_tx.clone(), retry.clone());
                    tokio::spawn(async move {
                        let done = handle(&*handler, item, &retry, already).await;
                        let _ = done_tx.send((tenant, done));
                    });
                }
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            message = consumer.recv(), if scheduler.queued() < options.max_queued => {
                let m = message?;
                stats.received.fetch_add(1, Relaxed);
                let position = {
                    let mut s = shared.lock().expect("consumer state");
                    let generation = s.generation;
                    let owned = s.partitions.entry(m.partition()).or_insert(Owned { generation, offsets: None });
                    let offsets = owned.offsets.get_or_insert_with(|| PartitionOffsets::new(m.offset()));
                    if offsets.received(m.offset()).is_err() {
                        continue; // a re-fetch after a seek: already tracked
                    }
                    Position { partition: m.partition(), offset: m.offset(), generation: owned.generation }
                };
                let decoded = outbox::decode(&broker::raw_record(&m));
                let mut raw = parked_record(&m, &topic);
                // The parked copy names the event and its tenant as decoded, so a replay can
                // dedupe it and the backlog is filed under the right tenant.
                match &decoded {
                    Ok(event) => {
                        raw.event_id = Some(event.id);
                        raw.tenant_id = event.tenant_id.to_string();
                    }
                    Err(bad) => {
                        raw.event_id = bad.event_id;
                        raw.tenant_id = bad.tenant_id.as_ref().map_or_else(|| "unknown".to_owned(), |t| t.to_string());
                    }
                }
                match decoded {
                    Ok(event) if paused.contains(event.tenant_id.as_str()) => {
                        let tenant = event.tenant_id.to_string();
                        stats.parked.fetch_add(ledger::park(&pool, &tenant, None, &[raw]).await?, Relaxed);
                        settled_positions.push(position);
                    }
                    Ok(event) => {
                        let tenant = event.tenant_id.to_string();
                        scheduler.arrive(tenant, Item { event, raw, position });
                    }
                    Err(bad) => {
                        let tenant = bad.tenant_id.as_ref().map_or_else(|| "unknown".to_owned(), |t| t.to_string());
                        let pause = Pause { cause: "bad_event", reason: bad.reason.to_string(), event_id: bad.event_id, next_retry_at: None };
                        stats.parked.fetch_add(ledger::park(&pool, &tenant, Some(&pause), &[raw]).await?, Relaxed);
                        let backlog: Vec<ParkedRecord> = scheduler.take_queue(&tenant).into_iter().map(|i| i.raw).collect();
                        ledger::park(&pool, &tenant, None, &backlog).await?;
                        scheduler.hold(&tenant);
                        paused.insert(tenant);
                        settled_positions.push(position);
                    }
                }
            }
            Some((tenant, done)) = done_rx.recv() => {
                scheduler.complete(&tenant);
                match done {
                    Done::Settled(item, outcome, attempts) => {
                        match outcome {
                            SettledAs::Delivered => stats.delivered.fetch_add(1, Relaxed),
                            SettledAs::Expired => stats.expired.fetch_add(1, Relaxed),
                            _ => 0,
                        };
                        settlements.push((settlement(&item, &topic, outcome, attempts), item.position));
                    }
                    Done::Duplicate(item) => {
                        stats.duplicates.fetch_add(1, Relaxed);
                        settled_positions.push(item.position);
                    }
                    Done::Breaker(item, failure) => {
                        if held_by_breaker.is_empty() {
                            stats.breaker_trips.fetch_add(1, Relaxed);
                            stats.breaker_open.store(1, Relaxed);
                            tracing::error!(error = %failure.message, status = ?failure.status, "the partner refuses every request: breaker open, consumption paused");
                            consumer.pause(&consumer.assignment()?)?;
                        }
                        held_by_breaker.push((tenant, item));
                    }
                    Done::Pause(item, failure) => {
                        let pause = pause_for(&failure, Some(item.event.id), options.auto_resume_after);
                        let mut records = vec![item.raw];
                        let mut positions = vec![item.position];
                        for queued in scheduler.take_queue(&tenant) {
                            records.push(queued.raw);
                            positions.push(queued.position);
                        }
                        stats.parked.fetch_add(ledger::park(&pool, &tenant, Some(&pause), &records).await?, Relaxed);
                        scheduler.hold(&tenant);
                        paused.insert(tenant);
                        settled_positions.extend(positions);
                    }
                }
            }
            _ = tick.tick() => {}
            _ = kill_switch_check.tick() => {
                let on: bool = sqlx::query_scalar("SELECT kill_switch FROM control").fetch_one(&pool).await?;
                if on != killed {
                    tracing::warn!(kill_switch = on, "kill switch changed");
                }
                killed = on;
                stats.kill_switch.store(u64::from(on), Relaxed);
                // Resumed tenants (by an operator, or retryable ones whose time came) that this
                // instance holds: replay their backlogs. New events keep being parked meanwhile.
                if !killed {
                    for tenant in ledger::tenants_to_drain(&pool).await? {
                        let partition = broker::partition_for_key(tenant.as_bytes(), partitions);
                        let owned = shared.lock().expect("consumer state").partitions.contains_key(&partition);
                        if owned && paused.contains(&tenant) && draining.insert(tenant.clone()) {
                            let (handler, pool, tx, retry) = (Arc::clone(&handler), pool.clone(), drain_tx.clone(), options.retry.clone());
                            tokio::spawn(async move {
                                let report = drain(&*handler, &pool, &tenant, &retry).await;
                                let _ = tx.send(report);
                            });
                        }
                    }
                }
            }
            _ = probe_tick.tick(), if !held_by_breaker.is_empty() && !probing => {
                // Probe with the first held event: its success proves the partner is back.
                let (tenant, item) = held_by_breaker.remove(0);
                probing = true;
                let (handler, tx) = (Arc::clone(&handler), probe_tx.clone());
                tokio::spawn(async move {
                    let outcome = handler.handle(&item.event, 1).await;
                    let done = match outcome {
                        Outcome::Done => Done::Settled(item, SettledAs::Delivered, 1),
                        Outcome::Failed(f) => Done::Breaker(item, f),
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
                        stats.delivered.fetch_add(1, Relaxed);
                        settlements.push((settlement(&item, &topic, outcome, attempts), item.position));
                        // Closed: the held events run first, each ahead of its tenant's queue.
                        for (t, held) in held_by_breaker.drain(..) {
                            scheduler.retry_first(t, held);
                        }
                        stats.breaker_open.store(0, Relaxed);
                        consumer.resume(&consumer.assignment()?)?;
                        tracing::info!(%tenant, "the partner answers again: breaker closed");
                    }
                    Done::Breaker(item, _) | Done::Pause(item, _) => held_by_breaker.insert(0, (tenant, item)),
                    Done::Duplicate(_) => {}
                }
            }
            Some(report) = drain_rx.recv() => match report {
                Drained::Empty(tenant) => {
                    draining.remove(&tenant);
                    // Only this loop parks: nothing can be parked for the tenant while this runs.
                    if ledger::finish_drain(&pool, &tenant).await? {
                        paused.remove(&tenant);
                        scheduler.release(&tenant);
                        tracing::info!(%tenant, "backlog replayed; tenant live again");
                    }
                }
                Drained::Failed(tenant, failure, event_id) => {
                    draining.remove(&tenant);
                    let pause = pause_for(&failure, event_id, options.auto_resume_after);
                    ledger::park(&pool, &tenant, Some(&pause), &[]).await?;
                }
                Drained::Error(tenant, e) => {
                    draining.remove(&tenant);
                    tracing::warn!(%tenant, error = %e, "replaying the backlog failed; will try again");
                }
            },
        }
        if settlements.len() >= options.settle_batch
            || (!(settlements.is_empty() && settled_positions.is_empty())
                && last_flush.elapsed() >= options.settle_interval)
        {
            flush(
                &pool,
                &consumer,
                &shared,
                &topic,
                (&mut settlements, &mut settled_positions),
                &stats,
                CommitMode::Async,
            )
            .await?;
            last_flush = Instant::now();
        }
    }
    // Shutdown: finish what is in flight (bounded), settle it, commit synchronously.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while scheduler.in_flight() > 0 {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some((tenant, Done::Settled(item, outcome, attempts)))) => {
                scheduler.complete(&tenant);
                settlements.push((settlement(&item, &topic, outcome, attempts), item.position));
            }
            Ok(Some((tenant, _))) => {
                scheduler.complete(&tenant);
            }
            _ => break,
        }
    }
    flush(
        &pool,
        &consumer,
        &shared,
        &topic,
        (&mut settlements, &mut settled_positions),
        &stats,
        CommitMode::Sync,
    )
    .await?;
    Ok(())
}

/// Runs one event to an end: a duplicate (already settled), expired, delivered, or a failure
/// that pauses its tenant or trips the breaker. Retries happen here, holding only this tenant.
async fn handle<H: Handler>(
    handler: &H,
    item: Item,
    retry: &RetryPolicy,
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
    let first_failure = Instant::now();
    let mut attempt = 1;
    loop {
        match handler.handle(&item.event, attempt).await {
            Outcome::Done => return Done::Settled(item, SettledAs::Delivered, attempt),
            Outcome::Deferred(until) => {
                let wait = (until - chrono::Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(wait).await;
            }
            Outcome::Failed(failure) => {
                let jitter =
                    f64::from(item.event.id.as_u128() as u32 ^ attempt) / f64::from(u32::MAX);
                match retry.decide(&failure, attempt, first_failure.elapsed(), jitter) {
                    Decision::RetryIn(wait) => tokio::time::sleep(wait).await,
                    Decision::PauseTenant => return Done::Pause(item, failure),
                    Decision::TripBreaker => return Done::Breaker(item, failure),
                }
                attempt += 1;
            }
        }
    }
}

/// Replays a tenant's parked backlog in order, a page at a time, through the same path as live
/// events (dedupe, expiry, handler with retries); each page's settlements and removal commit
/// together.
async fn drain<H: Handler>(
    handler: &H,
    pool: &PgPool,
    tenant: &str,
    retry: &RetryPolicy,
) -> Drained {
    let mut after = 0;
    loop {
        let page = match ledger::parked_backlog(pool, tenant, after, 500).await {
            Ok(page) => page,
            Err(e) => return Drained::Error(tenant.to_owned(), e),
        };
        if page.is_empty() {
            return Drained::Empty(tenant.to_owned());
        }
        let mut settlements = Vec::new();
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
                    let _ = ledger::unpark(pool, tenant, through, &settlements).await;
                    return Drained::Failed(tenant.to_owned(), failure, bad.event_id);
                }
            };
            let position = Position {
                partition: raw.partition,
                offset: raw.offset,
                generation: 0,
            };
            let topic = raw.topic.clone();
            let item = Item {
                event,
                raw,
                position,
            };
            let already = settled.contains(&item.event.id);
            match handle(handler, item, retry, already).await {
                Done::Settled(item, outcome, attempts) => {
                    settlements.push(settlement(&item, &topic, outcome, attempts));
                }
                Done::Duplicate(_) => {}
                Done::Pause(item, failure) | Done::Breaker(item, failure) => {
                    let _ = ledger::unpark(pool, tenant, through, &settlements).await;
                    return Drained::Failed(tenant.to_owned(), failure, Some(item.event.id));
                }
            }
            through = seq;
        }
        if let Err(e) = ledger::unpark(pool, tenant, through, &settlements).await {
            return Drained::Error(tenant.to_owned(), e);
        }
        after = through;
    }
}

/// The pause a failure calls for: a retryable cause is retried automatically later.
fn pause_for(
    failure: &Failure,
    event_id: Option<uuid::Uuid>,
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
    }
}

fn settlement(item: &Item, topic: &str, outcome: SettledAs, attempts: u32) -> Settlement {
    Settlement {
        event_id: item.event.id,
        tenant_id: item.event.tenant_id.to_string(),
        event_type: Some(item.event.event_type().as_str().to_owned()),
        outcome,
        attempts: attempts as i32,
        error: None,
        topic: topic.to_owned(),
        partition: item.position.partition,
        offset: item.position.offset,
    }
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

/// Records the settlements in one transaction, then marks them and the other settled positions
/// settled in their partitions' trackers (if still owned, same generation) and commits the
/// points that moved.
async fn flush(
    pool: &PgPool,
    consumer: &StreamConsumer<Context>,
    shared: &Arc<Mutex<Shared>>,
    topic: &str,
    (settlements, settled_positions): (&mut Vec<(Settlement, Position)>, &mut Vec<Position>),
    stats: &ConsumeStats,
    mode: CommitMode,
) -> Result<(), ConsumeError> {
    if !settlements.is_empty() {
        let batch: Vec<Settlement> = settlements.iter().map(|(s, _)| s.clone()).collect();
        let mut tx = pool.begin().await?;
        ledger::record_settled(&mut tx, &batch).await?;
        tx.commit().await?;
    }
    let positions: VecDeque<Position> = settlements
        .drain(..)
        .map(|(_, p)| p)
        .chain(settled_positions.drain(..))
        .collect();
    let mut commit = TopicPartitionList::new();
    {
        let mut s = shared.lock().expect("consumer state");
        for p in positions {
            if let Some(owned) = s.partitions.get_mut(&p.partition)
                && owned.generation == p.generation
                && let Some(offsets) = owned.offsets.as_mut()
            {
                let _ = offsets.settled(p.offset);
            }
        }
        for (&partition, owned) in s.partitions.iter_mut() {
            if let Some(point) = owned
                .offsets
                .as_mut()
                .and_then(PartitionOffsets::take_commit)
            {
                commit.add_partition_offset(topic, partition, Offset::Offset(point))?;
            }
        }
    }
    if commit.count() > 0 {
        match mode {
            CommitMode::Sync => tokio::task::block_in_place(|| consumer.commit(&commit, mode))?,
            CommitMode::Async => consumer.commit(&commit, mode)?,
        }
        stats
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}
