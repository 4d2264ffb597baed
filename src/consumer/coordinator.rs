//! The coordinator: the one owner of the consumer's state. Its loop takes records in, admits
//! them to their tenants' queues, dispatches what may run, and reacts to what the tasks it
//! spawned report; each arm of its `select!` calls one `handle_*` method.
//!
//! One event's path: [`intake`](super::intake) decodes a record and a dedupe lookup runs for its
//! batch; [`Coordinator::handle_looked_up`] admits it (parked if its tenant is paused, a
//! duplicate if a copy of it is close by, see [`super::copies`]); the [`Scheduler`] dispatches
//! it when its tenant has nothing in flight; its attempts run through
//! [`attempt::handle`](super::attempt::handle) (retries, expiry, kill switch), polled once in
//! place and then, if they wait, as a task; its [`Done`] comes back to
//! [`Coordinator::handle_done`], which settles it into the pending batch, pauses its tenant, or
//! trips the [`Breaker`]; [`settlement`](super::settlement) writes the
//! batch and only then marks the offsets, and the commit point moves.
//!
//! Why order and dedupe hold with batched settlement: a tenant's next event may start as soon
//! as the previous one's handler returned, before its dedupe record is durable. If the process
//! dies before the batch commits, Kafka redelivers from the last committed offset, which is at
//! or before both events (the commit point only passes durably settled records), so both are
//! handled again in their original order; the partner sees a repeat carrying the same
//! `Idempotency-Key`, never a reordering.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::stream::{FuturesOrdered, StreamExt};
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::attempt::{self, Done, Item, Limits};
use super::breaker::{Breaker, BreakerEffect};
use super::copies::{Admission, Copies};
use super::drain::{self, Drained};
use super::intake::{self, Arrival, INTAKE_BATCH, INTAKE_LINGER, MAX_LOOKUPS, Queued, Refused};
use super::ledger::{self, ParkedRecord};
use super::poller::{self, Context, KafkaEvent, LAG_INTERVAL, Polled, Poller, RECORDS_AHEAD};
use super::rebalance::{self, Claim, Ownership, Position, Revoke, RevokeEffect};
use super::runtime::{ConsumeError, ConsumeOptions, ConsumeStats, is_fatal};
use super::settlement::{self, Durable, Pending, Writing};
use super::tenants::{Lifecycle, TenantEffect, Tenants};
use crate::broker;
use crate::config::Config;
use crate::delivery::{Failure, Handler};
use crate::mappings::Staged;
use crate::scheduler::Scheduler;

/// A batch of arrivals with its dedupe lookup under way.
type Lookup = JoinHandle<(Vec<Arrival>, Result<ledger::Recorded, sqlx::Error>)>;

/// The consumer's state and the channels of the tasks it spawns. Only the coordinator's loop
/// touches it: the poll thread and the tasks speak to it through channels.
pub(super) struct Coordinator<H: Handler> {
    // Kafka. The events' receiver is dropped first: a rebalance callback run by the consumer's
    // close (whoever lets go of it last) finds nobody to wait for.
    /// The rebalance callbacks and librdkafka's statistics, as messages.
    kafka: mpsc::UnboundedReceiver<KafkaEvent>,
    /// Records the poll thread handed over.
    records: mpsc::Receiver<Polled>,
    /// Stops the poll thread when the coordinator ends.
    _poller: Poller,
    consumer: Arc<BaseConsumer<Context>>,
    /// The partitions this instance owns, and the work under way for each.
    ownership: Ownership,

    // What it works with, fixed for its life.
    topic: String,
    /// How many partitions the topic has: a tenant's partition is found by its key's hash.
    partition_count: i32,
    pool: PgPool,
    /// The integration's name, which files every record this consumer writes.
    integration: Arc<str>,
    handler: Arc<H>,
    options: ConsumeOptions,
    stats: Arc<ConsumeStats>,
    shutdown: CancellationToken,

    // Tenants.
    /// Per-tenant FIFO, one event in flight per tenant.
    scheduler: Scheduler<String, Queued>,
    /// Each tenant's lifecycle here (paused, being paused, draining; active when absent).
    tenants: Tenants,
    /// The partner-wide breaker, holding the events that met the refusal.
    breaker: Breaker<(String, Box<Item>)>,
    /// The persisted kill switch, as last read; the attempts watch it too.
    killed: watch::Sender<bool>,
    /// What every attempt's [`Guard`](attempt::Guard) is made of, shared: the retry policy,
    /// the failure window, the kill switch, and the tenants being paused (kept in step with
    /// `tenants` by `sync_pausing`: the attempts stop retrying those).
    limits: Arc<Limits>,

    // Intake and settlement.
    /// Arrivals whose dedupe lookup is under way, admitted in order.
    lookups: FuturesOrdered<Lookup>,
    /// The durable count each of those lookups started at, oldest first.
    lookup_epochs: std::collections::VecDeque<u64>,
    /// How many records those hold (they count against `max_queued`).
    in_lookup: usize,
    /// Ids of events close by, so a copy of one is not handled twice.
    copies: Copies<Uuid>,
    /// What settled since the last batch was started.
    pending: Pending,
    /// The batch being written, one at a time, and how many records it holds.
    writing: Option<(Writing, usize)>,
    last_flush: Instant,
    /// Dispatch stopped at its budget of attempts that ended at once: dispatch again without
    /// waiting for anything else.
    dispatch_again: bool,

    // What the spawned tasks report, each with the claim it held on its partition.
    done: Channel<(Claim, String, Done)>,
    probe: Channel<(Claim, String, Done)>,
    drained: Channel<(Claim, Drained)>,
    checked: Channel<Vec<(i32, i64)>>,

    // Clocks.
    timers: Timers,
}

/// Both ends of a channel from spawned tasks to the coordinator.
struct Channel<T> {
    tx: mpsc::UnboundedSender<T>,
    rx: mpsc::UnboundedReceiver<T>,
}

impl<T> Channel<T> {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Channel { tx, rx }
    }
}

/// The coordinator's periodic work.
struct Timers {
    /// Wakes the loop when the settled events waiting for a batch have waited
    /// `settle_interval`. Armed only while some wait (an idle consumer is not woken a hundred
    /// times a second), and set from the last batch's start, so a batch started because it was
    /// full leaves no stray wake-up behind it.
    settle: Pin<Box<tokio::time::Sleep>>,
    /// Reads the kill switch, pauses recorded elsewhere and tenants to drain.
    control: tokio::time::Interval,
    /// Tries the breaker's first held event.
    probe: tokio::time::Interval,
    /// Commits the points that moved ([`ConsumeOptions::commit_interval`]).
    commit: tokio::time::Interval,
    /// Checks unconfirmed commits against the broker.
    commit_check: tokio::time::Interval,
    /// Brings the operator's partition view up to date.
    lag: tokio::time::Interval,
}

/// An interval whose missed ticks are not made up in a burst: a long turn delays the next.
fn delayed_interval(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

impl<H: Handler> Coordinator<H> {
    /// Subscribes to the topic and reads what the database says (pauses, the kill switch).
    pub(super) async fn start(
        config: &Config,
        pool: PgPool,
        handler: Arc<H>,
        options: ConsumeOptions,
        stats: Arc<ConsumeStats>,
        shutdown: CancellationToken,
    ) -> Result<Self, ConsumeError> {
        let topic = config.kafka.topic.clone();
        let integration: Arc<str> = Arc::from(handler.integration());
        let paused = paused_tenants(&pool, &integration).await?;
        let killed: bool = sqlx::query_scalar("SELECT kill_switch FROM control")
            .fetch_one(&pool)
            .await?;
        stats.kill_switch.store(u64::from(killed), Relaxed);
        let (consumer, kafka) = poller::consumer(config)?;
        let (handed, records) = mpsc::channel(RECORDS_AHEAD);
        let poller = Poller::spawn(Arc::clone(&consumer), handed).map_err(ConsumeError::Poller)?;
        let killed = watch::Sender::new(killed);
        let limits = Arc::new(Limits::new(
            &options,
            Arc::clone(&stats),
            killed.subscribe(),
        ));
        let partition_count = {
            let kafka = config.kafka.clone();
            tokio::task::spawn_blocking(move || broker::partition_count(&kafka, &kafka.topic))
                .await
                .expect("metadata task panicked")
                .ok()
                .flatten()
                .unwrap_or(1) as i32
        };
        Ok(Coordinator {
            kafka,
            records,
            _poller: poller,
            consumer,
            ownership: Ownership::default(),
            topic,
            partition_count,
            scheduler: {
                let mut scheduler = Scheduler::new(options.max_in_flight);
                for tenant in &paused {
                    scheduler.hold(tenant);
                }
                scheduler
            },
            tenants: Tenants::from_database(paused.iter().cloned()),
            breaker: Breaker::default(),
            killed,
            limits,
            lookups: FuturesOrdered::new(),
            lookup_epochs: std::collections::VecDeque::new(),
            in_lookup: 0,
            copies: Copies::default(),
            pending: Pending::default(),
            writing: None,
            last_flush: Instant::now(),
            done: Channel::new(),
            dispatch_again: false,
            probe: Channel::new(),
            drained: Channel::new(),
            checked: Channel::new(),
            timers: Timers {
                settle: Box::pin(tokio::time::sleep(options.settle_interval)),
                control: tokio::time::interval(options.kill_switch_interval),
                probe: tokio::time::interval(options.breaker_probe_interval),
                commit: delayed_interval(options.commit_interval),
                commit_check: tokio::time::interval(Duration::from_secs(2)),
                lag: tokio::time::interval(LAG_INTERVAL),
            },
            pool,
            integration,
            handler,
            options,
            stats,
            shutdown,
        })
    }

    /// Runs until shutdown or an error, then stops: attempts under way end (bounded by
    /// `revoke_drain`), and on a clean stop what settled is written and committed.
    pub(super) async fn run(mut self) -> Result<(), ConsumeError> {
        let result = self.consume().await;
        self.stop(result).await
    }

    async fn consume(&mut self) -> Result<(), ConsumeError> {
        loop {
            self.apply_pauses_noticed();
            self.dispatch().await?;
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                // A rebalance callback is waiting for this answer, and the group with it.
                Some(event) = self.kafka.recv() => self.handle_kafka(event).await?,
                Some(written) = async { Some((&mut self.writing.as_mut()?.0).await) }, if self.writing.is_some() => {
                    self.handle_written(written.expect("settle task panicked")).await?;
                }
                // Intake is bounded by back-pressure (`may_take_in`), so serving it first never
                // starves the arms below; it keeps the broker's fetches overlapping the work.
                polled = self.records.recv(), if self.may_take_in() => self.handle_records(polled).await?,
                Some((claim, tenant, done)) = self.done.rx.recv() => self.handle_dones(claim, tenant, done).await?,
                Some((claim, tenant, done)) = self.probe.rx.recv() => self.handle_probe_result(claim, tenant, done).await?,
                Some((claim, report)) = self.drained.rx.recv() => self.handle_drained(claim, report).await?,
                Some(looked_up) = self.lookups.next(), if !self.lookups.is_empty() => {
                    self.handle_looked_up(looked_up.expect("dedupe lookup task panicked"))?;
                }
                _ = self.timers.control.tick() => self.handle_control().await?,
                _ = self.timers.probe.tick(), if self.breaker.may_probe() && !*self.killed.borrow() => self.handle_probe_tick(),
                _ = self.timers.commit.tick() => self.handle_commit_tick()?,
                _ = self.timers.commit_check.tick() => self.handle_commit_check(),
                Some(found) = self.checked.rx.recv() => self.handle_commit_checked(found),
                _ = self.timers.lag.tick() => self.handle_lag_check(),
                _ = self.timers.settle.as_mut(), if self.batch_waiting() => {}
                _ = Self::creation_awaited(&self.handler), if self.batch_waiting() => {}
                _ = std::future::ready(()), if self.dispatch_again => {}
            }
            self.after_turn()?;
        }
    }

    /// Everything held in memory counts against `max_queued`, the records waiting to be parked
    /// too: a paused tenant's stream arriving faster than Postgres parks it must slow intake
    /// down, not grow the process.
    fn may_take_in(&self) -> bool {
        let writing = self.writing.as_ref().map_or(0, |(_, n)| *n);
        self.scheduler.queued() + self.in_lookup + self.pending.len() + writing
            < self.options.max_queued
            && self.lookups.len() < MAX_LOOKUPS
    }

    /// A pause noticed while the tenant had an event in flight takes effect once that event
    /// has ended: its queue is parked, in order, and its later records follow.
    fn apply_pauses_noticed(&mut self) {
        // Every turn of the loop comes here: with nobody being paused (the attempts' view
        // is kept in step), it costs one look, not a walk over every tenant that is not active.
        if self
            .limits
            .pausing
            .lock()
            .expect("pausing tenants")
            .is_empty()
        {
            return;
        }
        let idle: Vec<String> = self
            .tenants
            .pausing()
            .filter(|t| !self.scheduler.is_in_flight(*t) && !self.breaker_holds(t))
            .cloned()
            .collect();
        if idle.is_empty() {
            return;
        }
        for tenant in idle {
            let effects = self.tenants.idle(&tenant);
            self.apply_tenant(effects);
        }
        self.sync_pausing();
    }

    /// Does what a tenant transition asks of the scheduler.
    fn apply_tenant(&mut self, effects: Vec<TenantEffect>) {
        for effect in effects {
            match effect {
                TenantEffect::Hold(tenant) => self.scheduler.hold(&tenant),
                TenantEffect::Release(tenant) => self.scheduler.release(&tenant),
                TenantEffect::ParkQueue(tenant) => {
                    for queued in self.scheduler.take_queue(&tenant) {
                        self.pending.parked.push(queued.into_parked());
                    }
                }
            }
        }
    }

    /// The attempts' view of the tenants being paused.
    fn sync_pausing(&self) {
        *self.limits.pausing.lock().expect("pausing tenants") =
            self.tenants.pausing().cloned().collect();
    }

    fn breaker_holds(&self, tenant: &str) -> bool {
        match &self.breaker {
            Breaker::Open { held } | Breaker::Probing { held } => {
                held.iter().any(|(t, _)| t == tenant)
            }
            Breaker::Closed => false,
        }
    }

    /// Partitions just revoked: their queued and held events are the next owner's now; not
    /// parked yet, so not settled, the next owner reads them again.
    fn forget_revoked(&mut self) -> Result<(), ConsumeError> {
        let ownership = &self.ownership;
        let dropped = self
            .scheduler
            .drop_where(|queued| !ownership.is_current(queued.position()));
        let mut gone: Vec<Uuid> = dropped.iter().filter_map(Queued::event_id).collect();
        let effect = self.breaker.forget(|(_, item)| {
            let lost = !ownership.is_current(item.position);
            if lost {
                gone.push(item.event.id);
            }
            lost
        });
        self.apply_breaker(effect)?;
        let ownership = &self.ownership;
        self.pending.parked.retain(|(record, position)| {
            let current = ownership.is_current(*position);
            if !current {
                gone.extend(record.event_id);
            }
            current
        });
        // A held event's attempts may have staged mappings: the next owner handles it again.
        self.discard_staged(&gone);
        self.copies.dropped(gone);
        tracing::debug!(
            dropped = dropped.len(),
            "queued events of revoked partitions dropped"
        );
        Ok(())
    }

    /// Dispatches what may run. The kill switch and an open breaker stop dispatching; intake
    /// goes on up to `max_queued`, and nothing is committed past undelivered events.
    /// Attempts that end at once are handled here, which frees their tenant's next event for
    /// this same turn; at most `max_in_flight` of them per turn, so intake and Kafka's events
    /// are served in between.
    async fn dispatch(&mut self) -> Result<(), ConsumeError> {
        let mut refused = Vec::new();
        let mut budget = self.options.max_in_flight;
        self.dispatch_again = false;
        while !*self.killed.borrow()
            && self.breaker.is_closed()
            && let Some((tenant, queued)) = self.scheduler.dispatch()
        {
            match queued {
                Queued::Event(item) => {
                    let Some((claim, tenant, done)) = self.start_attempts(tenant, item) else {
                        continue;
                    };
                    self.handle_done(claim, tenant, done).await?;
                    budget = budget.saturating_sub(1);
                    if budget == 0 {
                        self.dispatch_again = true;
                        break;
                    }
                }
                Queued::Refused(r) => refused.push((tenant, r)),
            }
        }
        for (tenant, r) in refused {
            self.pause_for_refused(tenant, *r).await?;
        }
        Ok(())
    }

    /// One event's attempts, holding a claim on its partition: polled here once, and returned
    /// if that ended them (an instant handler, a duplicate), which costs no task, no channel
    /// and no thread woken on the other core. Otherwise they go on as a task of their own and
    /// report through `done`: an attempt that waits (on the partner, on a connection of the
    /// pool the coordinator writes with) must never wait on this loop.
    fn start_attempts(&mut self, tenant: String, item: Box<Item>) -> Option<(Claim, String, Done)> {
        let position = item.position;
        let Some(claim) = self.ownership.claim(
            position.partition,
            Some(position.generation),
            Some(position.offset),
        ) else {
            // Lost between intake and now: the next owner has it.
            self.scheduler.complete(&tenant);
            self.copies.dropped([item.event.id]);
            return None;
        };
        let (handler, limits) = (Arc::clone(&self.handler), Arc::clone(&self.limits));
        let mut attempts = Box::pin(async move {
            let done = attempt::run(&*handler, item, &limits.guard(&claim, position)).await;
            (claim, tenant, done)
        });
        // Polled with a waker that does nothing: the task polls it again at once, with its own.
        if let Some(report) = (&mut attempts).now_or_never() {
            return Some(report);
        }
        let tx = self.done.tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(attempts.await);
        });
        None
    }

    /// A refused record's turn: everything of its tenant before it has settled. An event of a
    /// type the integration does not know, under `unknown_event_types = ignore`, is recorded as
    /// ignored; anything else is parked with the tenant's queue, in order, and the tenant
    /// paused with the decoder's reason.
    async fn pause_for_refused(&mut self, tenant: String, r: Refused) -> Result<(), ConsumeError> {
        let policy = self.options.unknown_event_types;
        if let Some(ignored) = intake::ignored(policy, &r.raw, r.unknown_type.as_deref()) {
            self.stats.count(ledger::SettledAs::Ignored);
            self.pending.settlements.push((ignored, r.position));
            self.scheduler.complete(&tenant);
            return Ok(());
        }
        if self.ownership.is_current(r.position) {
            let mut records = vec![r.raw];
            self.pending.positions.push(r.position);
            for queued in self.scheduler.take_queue(&tenant) {
                let (raw, position) = queued.into_parked();
                records.push(raw);
                self.pending.positions.push(position);
            }
            let parked = settlement::pause(
                &self.pool,
                &self.integration,
                &tenant,
                &r.pause,
                &records,
                (&[], &Staged::default()),
            )
            .await?;
            self.stats.parked.fetch_add(parked, Relaxed);
            self.copies
                .written(records.iter().filter_map(|r| r.event_id));
            let effects = self.tenants.paused_here(&tenant);
            self.apply_tenant(effects);
        }
        self.scheduler.complete(&tenant);
        Ok(())
    }

    /// Intake: takes what is ready (up to `INTAKE_BATCH` records, lingering briefly for a
    /// fuller batch) and starts one dedupe lookup for them all; lookups run concurrently and
    /// are admitted in order.
    async fn handle_records(&mut self, first: Option<Polled>) -> Result<(), ConsumeError> {
        let mut next = Some(first.ok_or(ConsumeError::PollerStopped)?);
        let mut arrivals: Vec<Arrival> = Vec::new();
        let linger = tokio::time::Instant::now() + INTAKE_LINGER;
        while let Some(polled) = next.take() {
            if let Some(arrival) = self.take_in(polled)? {
                arrivals.push(arrival);
            }
            if arrivals.len() < INTAKE_BATCH {
                next = tokio::time::timeout_at(linger, self.records.recv())
                    .await
                    .ok()
                    .flatten();
            }
        }
        self.in_lookup += arrivals.len();
        let pool = self.pool.clone();
        let integration = Arc::clone(&self.integration);
        self.lookup_epochs.push_back(self.copies.epoch());
        // A task of its own: it must progress (and give its connection back) while the loop
        // awaits something else.
        self.lookups.push_back(tokio::spawn(async move {
            let ids: Vec<Uuid> = arrivals.iter().filter_map(Arrival::event_id).collect();
            // A failed lookup is an error, never "not settled": handling a settled event again
            // is not always absorbed by the partner's Idempotency-Key (an update replayed after
            // its object's delete heals it back with a create under a key of its own). The
            // coordinator stops, the supervisor starts it again once Postgres answers, and the
            // records are read again.
            let recorded = if ids.is_empty() {
                Ok(ledger::Recorded::default())
            } else {
                ledger::recorded_ids(&pool, &integration, &ids).await
            };
            (arrivals, recorded)
        }));
        Ok(())
    }

    /// One record from Kafka: tracked in its partition's offsets and decoded, or `None` when
    /// it is not ours to handle (a transient error, a partition no longer ours, a re-fetch).
    fn take_in(&mut self, polled: Polled) -> Result<Option<Arrival>, ConsumeError> {
        let record = match polled.message {
            Ok(record) => record,
            // librdkafka reports broker trouble (down, unreachable, request errors) as consume
            // errors and recovers on its own; only a fatal error ends us.
            Err(e) if is_fatal(&e) => return Err(e.into()),
            Err(e) => {
                if self
                    .stats
                    .kafka_errors
                    .fetch_add(1, Relaxed)
                    .is_multiple_of(100)
                {
                    tracing::warn!(error = %e, "kafka error; librdkafka retries");
                }
                return Ok(None);
            }
        };
        self.stats.received.fetch_add(1, Relaxed);
        if let Some(written) = record.timestamp.map(|t| t.timestamp_millis()) {
            let now = chrono::Utc::now().timestamp_millis();
            let behind = now.saturating_sub(written).max(0) as u64;
            self.stats
                .intake_latency
                .record(Duration::from_millis(behind));
        }
        // Not ours (a partition gone, or read before it was revoked and assigned again), or a
        // re-fetch after a seek, already tracked.
        let Some(position) =
            self.ownership
                .track(record.partition, record.offset, polled.generation)
        else {
            return Ok(None);
        };
        // Addressed to another integration (its backfill, a replay for its partner): settled
        // here without a record, in any order, as nothing is sent for it.
        if intake::for_another(&record, &self.integration) {
            self.stats.count(ledger::SettledAs::Ignored);
            self.pending.positions.push(position);
            return Ok(None);
        }
        let mut arrival = intake::arrival(&*self.handler, record, position);
        if let Arrival::Event(item) = &mut arrival {
            item.seen_before = self.ownership.seen_before(position);
        }
        // One of Ferry's own switches for another integration, written before the header said
        // so (its payload names it): not this integration's either.
        if let Arrival::Event(item) = &arrival
            && !item.event.is_for(&self.integration)
        {
            self.stats.count(ledger::SettledAs::Ignored);
            self.pending.positions.push(position);
            return Ok(None);
        }
        if matches!(arrival, Arrival::Bad(_)) {
            self.stats.bad_events.fetch_add(1, Relaxed);
        }
        Ok(Some(arrival))
    }

    /// Admission, in arrival order: paused tenants' records are parked, the rest join their
    /// tenant's queue (a refused record too: it pauses its tenant when its turn comes); a copy
    /// of an event close by settles as a duplicate when its turn comes.
    fn handle_looked_up(
        &mut self,
        (arrivals, recorded): (Vec<Arrival>, Result<ledger::Recorded, sqlx::Error>),
    ) -> Result<(), ConsumeError> {
        self.in_lookup -= arrivals.len();
        self.lookup_epochs.pop_front();
        self.admit(arrivals, &recorded?);
        self.forget_copies();
        Ok(())
    }

    /// Admits `arrivals` in order; `recorded` is what the dedupe lookup found of them.
    fn admit(&mut self, arrivals: Vec<Arrival>, recorded: &ledger::Recorded) {
        for arrival in arrivals {
            let position = arrival.position();
            if !self.ownership.is_current(position) {
                continue; // revoked meanwhile: the next owner reads it
            }
            let tenant = arrival.tenant().to_owned();
            if self.tenants.parks_arrivals(&tenant) {
                // Already paused: it joins the backlog in order; the first cause stays.
                self.pending.parked.push(arrival.into_parked());
                continue;
            }
            match arrival {
                Arrival::Event(mut item) => {
                    let id = item.event.id;
                    item.settled =
                        recorded.settled.contains(&id) || self.copies.admit(id) == Admission::Copy;
                    item.unrecorded = !item.settled && !recorded.knows(&id);
                    self.scheduler.arrive(tenant, Queued::Event(item));
                }
                Arrival::Bad(r) => self.scheduler.arrive(tenant, Queued::Refused(r)),
            }
        }
    }

    /// Copies written before the oldest lookup under way began are the database's to find.
    fn forget_copies(&mut self) {
        let oldest = match self.lookup_epochs.front() {
            Some(&started) => started,
            None => self.copies.epoch(),
        };
        self.copies.forget_before(oldest);
    }

    /// Events' tasks ended: this one and those ready behind it (up to `max_in_flight`), so a
    /// burst of completions costs one turn of the loop, not one each.
    async fn handle_dones(
        &mut self,
        claim: Claim,
        tenant: String,
        done: Done,
    ) -> Result<(), ConsumeError> {
        self.handle_done(claim, tenant, done).await?;
        for _ in 1..self.options.max_in_flight {
            match self.done.rx.try_recv() {
                Ok((claim, tenant, done)) => self.handle_done(claim, tenant, done).await?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// An event's attempts ended. One that settled as its partition was being revoked is settled
    /// like any other: the revoke writes it before its commit.
    async fn handle_done(
        &mut self,
        claim: Claim,
        tenant: String,
        done: Done,
    ) -> Result<(), ConsumeError> {
        self.ownership.release(&claim);
        self.scheduler.complete(&tenant);
        match done {
            Done::Revoked(item) => self.dropped(&item),
            // A failure of a partition lost meanwhile is the next owner's to meet: parking it
            // here could race the owner's own intake.
            Done::Breaker(item, _) | Done::Pause(item, _, _)
                if !self.ownership.is_current(item.position) =>
            {
                self.dropped(&item);
            }
            Done::Settled(item, outcome, attempts) => {
                self.stats.count(outcome);
                self.pending
                    .settle(item, outcome, attempts, self.handler.mappings());
            }
            Done::Duplicate(item) => {
                self.stats.duplicates.fetch_add(1, Relaxed);
                self.pending.positions.push(item.position);
            }
            Done::Breaker(item, failure) => {
                if self.breaker.is_closed() {
                    self.stats.breaker_trips.fetch_add(1, Relaxed);
                    tracing::error!(error = %failure.message, status = ?failure.status, "the partner is failing for everyone: breaker open, consumption paused");
                }
                let effect = self.breaker.trip((tenant, item));
                self.apply_breaker(effect)?;
            }
            Done::Pause(item, failure, attempts) => {
                self.pause_tenant(tenant, item, &failure, attempts).await?;
            }
        }
        Ok(())
    }

    /// Pauses `tenant` for `failure` of `item`: the event, then the tenant's queue, parked in
    /// order; the tenant's later records are parked as they arrive.
    async fn pause_tenant(
        &mut self,
        tenant: String,
        item: Box<Item>,
        failure: &Failure,
        attempts: u32,
    ) -> Result<(), ConsumeError> {
        self.stats.failed.fetch_add(1, Relaxed);
        let pause = attempt::pause_for(failure, Some(item.event.id), attempts, &self.options);
        let learnt = self
            .handler
            .mappings()
            .map(|m| m.take(&[item.event.id]))
            .unwrap_or_default();
        let log = item.log;
        let mut records = vec![item.raw];
        let mut positions = vec![item.position];
        for queued in self.scheduler.take_queue(&tenant) {
            let (raw, position) = queued.into_parked();
            records.push(raw);
            positions.push(position);
        }
        if !learnt.is_empty() {
            // What earlier events learnt (a removal of the same object, say) is written first:
            // an object's mappings reach the table in the order they were learnt.
            self.finish_writing().await?;
            self.flush(CommitMode::Async).await?;
        }
        let mappings = self.handler.mappings();
        let guard = mappings.map(|m| m.writing(&learnt));
        let parked = settlement::pause(
            &self.pool,
            &self.integration,
            &tenant,
            &pause,
            &records,
            (&log, &learnt),
        )
        .await;
        drop(guard);
        let parked = parked?;
        if let Some(m) = mappings {
            m.written(&learnt);
        }
        self.stats.parked.fetch_add(parked, Relaxed);
        self.copies
            .written(records.iter().filter_map(|r| r.event_id));
        let effects = self.tenants.paused_here(&tenant);
        self.apply_tenant(effects);
        self.pending.positions.extend(positions);
        Ok(())
    }

    /// `item`'s attempt ended unsettled, its partition no longer this instance's: the next
    /// owner handles it again, and what it learnt is not written from here.
    fn dropped(&mut self, item: &Item) {
        self.copies.dropped([item.event.id]);
        self.discard_staged(&[item.event.id]);
    }

    /// The tenants' views are read again at their next events: a partition that comes (back)
    /// here may have been another member's meanwhile ([`crate::mappings::views`]).
    fn forget_views(&self) {
        if let Some(m) = self.handler.mappings() {
            m.forget_views();
        }
    }

    /// Registers the pending batch's mappings as being written
    /// ([`crate::mappings::Mappings::writing`]).
    fn writing_guard(&self) -> Option<crate::mappings::WriteGuard> {
        let m = self.handler.mappings()?;
        Some(m.writing(&self.pending.mappings))
    }

    /// What `events`' attempts staged is not written from here ([`crate::mappings`]).
    fn discard_staged(&self, events: &[Uuid]) {
        if let Some(m) = self.handler.mappings() {
            m.discard(events);
        }
    }

    /// Applies what a breaker transition asks of Kafka.
    fn apply_breaker(
        &mut self,
        effect: BreakerEffect<(String, Box<Item>)>,
    ) -> Result<(), ConsumeError> {
        match effect {
            BreakerEffect::None => {}
            BreakerEffect::PauseConsumption => {
                self.stats.breaker_open.store(1, Relaxed);
                self.consumer.pause(&self.consumer.assignment()?)?;
            }
            BreakerEffect::Resume(held) => {
                // The held events run first, each ahead of its tenant's queue.
                for (tenant, item) in held {
                    self.scheduler.retry_first(tenant, Queued::Event(item));
                }
                self.stats.breaker_open.store(0, Relaxed);
                self.consumer.resume(&self.consumer.assignment()?)?;
            }
        }
        Ok(())
    }

    /// Probes with the first held event: an answer from the partner proves it is back.
    fn handle_probe_tick(&mut self) {
        let Some((tenant, item)) = self.breaker.probe() else {
            return;
        };
        let position = item.position;
        let Some(claim) = self
            .ownership
            .claim(position.partition, Some(position.generation), None)
        else {
            // Lost meanwhile: the next owner has it.
            let effect = self.breaker.probe_lost();
            if let Err(e) = self.apply_breaker(effect) {
                tracing::warn!(error = %e, "resuming consumption failed");
            }
            return;
        };
        let (handler, tx) = (Arc::clone(&self.handler), self.probe.tx.clone());
        tokio::spawn(async move {
            let done = attempt::probe(&*handler, item, &claim.abort).await;
            let _ = tx.send((claim, tenant, done));
        });
    }

    /// The probe ended: delivered closes the breaker; refused for its own reason (a permanent
    /// failure of that event) pauses its tenant alone and closes the breaker too, since the
    /// partner answered; the partner-wide failure again keeps it open.
    async fn handle_probe_result(
        &mut self,
        claim: Claim,
        tenant: String,
        done: Done,
    ) -> Result<(), ConsumeError> {
        self.ownership.release(&claim);
        let event = done.event_id();
        match done {
            Done::Settled(item, outcome, attempts) => {
                self.stats.count(outcome);
                self.pending
                    .settle(item, outcome, attempts, self.handler.mappings());
                let effect = self.breaker.probe_answered();
                self.apply_breaker(effect)?;
                tracing::info!(%tenant, "the partner answers again: breaker closed");
            }
            Done::Pause(item, failure, attempts) if self.ownership.is_current(item.position) => {
                self.pause_tenant(tenant.clone(), item, &failure, attempts)
                    .await?;
                let effect = self.breaker.probe_answered();
                self.apply_breaker(effect)?;
                tracing::info!(%tenant, "the probe was refused for its own reason: tenant paused, breaker closed");
            }
            Done::Breaker(item, _) if self.ownership.is_current(item.position) => {
                self.breaker.probe_failed((tenant, item));
            }
            _ => {
                // Its partition is gone: the next owner handles it again.
                self.discard_staged(&[event]);
                let effect = self.breaker.probe_lost();
                self.apply_breaker(effect)?;
            }
        }
        Ok(())
    }

    /// The batch being written ended.
    async fn handle_written(&mut self, written: settlement::Written) -> Result<(), ConsumeError> {
        self.writing = None;
        self.durable(written?, CommitMode::Async).await
    }

    /// A batch became durable: mark its positions (committed at the next commit tick, or now
    /// if `mode` is synchronous), and deliver what could not be parked.
    async fn durable(&mut self, durable: Durable, mode: CommitMode) -> Result<(), ConsumeError> {
        if let Some(m) = self.handler.mappings() {
            m.written(&durable.mappings);
        }
        self.copies.written(durable.ids);
        self.forget_copies();
        settlement::mark(&mut self.ownership, durable.positions, &self.stats);
        if matches!(mode, CommitMode::Sync) {
            settlement::commit(
                &self.consumer,
                &mut self.ownership,
                &self.topic,
                &self.stats,
                mode,
            )?;
        }
        self.readmit(durable.live).await
    }

    /// Records set aside for parking whose tenant the database says is live: this instance's
    /// view was stale (another instance's drain, or an operator, flipped the tenant). Parking
    /// refused them and nothing settled them, so the tenant is released and they are admitted
    /// again, in order, with its later records that were waiting to be parked behind them.
    async fn readmit(&mut self, live: Vec<(ParkedRecord, Position)>) -> Result<(), ConsumeError> {
        if live.is_empty() {
            return Ok(());
        }
        let tenants: HashSet<String> = live.iter().map(|(r, _)| r.tenant_id.clone()).collect();
        let mut records = live;
        for (record, position) in std::mem::take(&mut self.pending.parked) {
            if tenants.contains(&record.tenant_id) {
                records.push((record, position));
            } else {
                self.pending.parked.push((record, position));
            }
        }
        for tenant in &tenants {
            tracing::warn!(%tenant, "parking refused: the tenant is live in the database; delivering its records");
            let effects = self.tenants.live(tenant);
            self.apply_tenant(effects);
        }
        self.sync_pausing();
        let arrivals: Vec<Arrival> = records
            .into_iter()
            .filter(|(_, position)| self.ownership.is_current(*position))
            .map(|(record, position)| {
                let mut arrival = intake::arrival(&*self.handler, record, position);
                if let Arrival::Event(item) = &mut arrival {
                    item.seen_before = self.ownership.seen_before(position);
                }
                arrival
            })
            .collect();
        let ids: Vec<Uuid> = arrivals.iter().filter_map(Arrival::event_id).collect();
        // Those taken from the tenant's queue were admitted before: they are not copies of
        // themselves.
        self.copies.dropped(ids.iter().copied());
        let recorded = ledger::recorded_ids(&self.pool, &self.integration, &ids).await?;
        self.admit(arrivals, &recorded);
        Ok(())
    }

    /// Waits for the batch being written, if any, and marks it.
    async fn finish_writing(&mut self) -> Result<(), ConsumeError> {
        if let Some((batch, _)) = self.writing.take() {
            let written = batch.await.expect("settle task panicked");
            self.handle_written(written).await?;
        }
        Ok(())
    }

    /// Writes what is pending and marks it, in this task: for the drain's flip and for
    /// shutdown.
    async fn flush(&mut self, mode: CommitMode) -> Result<(), ConsumeError> {
        let guard = self.writing_guard();
        let pending = std::mem::take(&mut self.pending);
        let written = settlement::write_pending(
            self.pool.clone(),
            Arc::clone(&self.integration),
            pending,
            Arc::clone(&self.stats),
        )
        .await;
        drop(guard);
        let written = written?;
        self.flushed();
        self.durable(written, mode).await
    }

    /// A backlog drain reported.
    async fn handle_drained(&mut self, claim: Claim, report: Drained) -> Result<(), ConsumeError> {
        self.ownership.release(&claim);
        match report {
            // Its partition went to another instance meanwhile: only the owner may flip it.
            Drained::Empty(tenant, owner) if !self.ownership.is_current(owner) => {
                self.tenants.drain_ended(&tenant, false);
            }
            Drained::Empty(tenant, _) => {
                // Only this loop parks, and it parks what it buffered first: once the batch
                // being written and what is pending are durable, nothing can be parked for the
                // tenant between then and the flip.
                self.finish_writing().await?;
                if self
                    .pending
                    .parked
                    .iter()
                    .any(|(r, _)| r.tenant_id == tenant)
                {
                    self.flush(CommitMode::Async).await?;
                }
                let flipped =
                    settlement::finish_drain(&self.pool, &self.integration, &tenant).await?;
                if flipped {
                    tracing::info!(%tenant, "backlog replayed; tenant live again");
                }
                let effects = self.tenants.drain_ended(&tenant, flipped);
                self.apply_tenant(effects);
            }
            Drained::Failed(tenant, failure, event_id, attempts) => {
                self.tenants.drain_ended(&tenant, false);
                self.stats.failed.fetch_add(1, Relaxed);
                let pause = attempt::pause_for(&failure, event_id, attempts, &self.options);
                let nothing = (&[][..], &Staged::default());
                settlement::pause(&self.pool, &self.integration, &tenant, &pause, &[], nothing)
                    .await?;
            }
            Drained::Error(tenant, e) => {
                self.tenants.drain_ended(&tenant, false);
                tracing::warn!(%tenant, error = %e, "replaying the backlog failed; will try again");
            }
            Drained::Revoked(tenant) => {
                self.tenants.drain_ended(&tenant, false);
            }
        }
        Ok(())
    }

    /// Reads the kill switch, the pauses recorded elsewhere (an operator's, or another
    /// instance's before a rebalance), and the resumed tenants whose backlog to replay.
    async fn handle_control(&mut self) -> Result<(), ConsumeError> {
        let on: bool = sqlx::query_scalar("SELECT kill_switch FROM control")
            .fetch_one(&self.pool)
            .await?;
        if on != *self.killed.borrow() {
            tracing::warn!(kill_switch = on, "kill switch changed");
        }
        self.killed.send_replace(on);
        self.stats.kill_switch.store(u64::from(on), Relaxed);
        let now = paused_tenants(&self.pool, &self.integration).await?;
        self.obey_pauses(now);
        if !on {
            for (tenant, partition) in
                ledger::tenants_to_drain(&self.pool, &self.integration).await?
            {
                let partition = partition.unwrap_or_else(|| {
                    broker::partition_for_key(tenant.as_bytes(), self.partition_count)
                });
                self.start_drain(tenant, partition);
            }
        }
        Ok(())
    }

    /// Replays a resumed tenant's backlog, if this instance owns `partition`, the one its
    /// backlog was read from. New events
    /// keep being parked meanwhile.
    fn start_drain(&mut self, tenant: String, partition: i32) {
        if self.tenants.state(&tenant) != Some(Lifecycle::Paused) {
            return;
        }
        let Some(claim) = self.ownership.claim(partition, None, None) else {
            return;
        };
        self.tenants.start_drain(&tenant);
        // An operator may have skipped a switch marker while the tenant was paused.
        if let Some(m) = self.handler.mappings() {
            m.forget_tenant(&tenant);
        }
        let (handler, pool, tx) = (
            Arc::clone(&self.handler),
            self.pool.clone(),
            self.drained.tx.clone(),
        );
        let limits = Arc::clone(&self.limits);
        let owner = Position {
            partition,
            offset: 0,
            generation: claim.generation,
        };
        tokio::spawn(async move {
            let report =
                drain::drain(&*handler, &pool, &tenant, &limits.guard(&claim, owner)).await;
            let _ = tx.send((claim, report));
        });
    }

    /// Brings the view of paused tenants in line with `now` (the database's): a tenant newly
    /// paused is held at once and parked when nothing of it is in flight (`pausing`); one no
    /// longer paused (flipped live by the instance that owned it before a rebalance) is
    /// released.
    fn obey_pauses(&mut self, now: HashSet<String>) {
        let effects = self.tenants.observe(&now);
        self.apply_tenant(effects);
        self.sync_pausing();
    }

    /// Async commit results never reach us (librdkafka reports them only to a C callback that
    /// rust-rdkafka does not install), so unconfirmed commits are checked against the broker.
    fn handle_commit_check(&mut self) {
        let unconfirmed = self.ownership.unconfirmed();
        if unconfirmed.is_empty() {
            return;
        }
        let (consumer, topic, tx) = (
            Arc::clone(&self.consumer),
            self.topic.clone(),
            self.checked.tx.clone(),
        );
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

    /// Commits every owned partition's point that moved since the last commit.
    fn handle_commit_tick(&mut self) -> Result<(), ConsumeError> {
        settlement::commit(
            &self.consumer,
            &mut self.ownership,
            &self.topic,
            &self.stats,
            CommitMode::Async,
        )
    }

    /// What the broker holds: a commit not there (failed, or still on its way) is offered
    /// again at the next commit tick.
    fn handle_commit_checked(&mut self, found: Vec<(i32, i64)>) {
        for (partition, on_broker) in found {
            if let Some(offsets) = self.ownership.offsets_mut(partition) {
                offsets.commit_succeeded(on_broker);
                if offsets.committed() > offsets.acked() {
                    offsets.commit_failed(offsets.committed());
                }
            }
        }
    }

    /// The operator's view: tenants held here and this instance's partitions.
    fn handle_lag_check(&mut self) {
        // The paused set holds every paused tenant; count those whose partition is ours.
        let owned: HashSet<i32> = self.ownership.owned().into_iter().collect();
        let held = self
            .tenants
            .not_active()
            .filter(|t| {
                owned.contains(&broker::partition_for_key(
                    t.as_bytes(),
                    self.partition_count,
                ))
            })
            .count();
        self.stats.tenants_held.store(held as u64, Relaxed);
        let view = rebalance::partition_view(&self.consumer, &self.ownership, &self.topic);
        *self.stats.partition_view.lock().expect("partition view") = view;
    }

    /// After each turn: the gauges, and a settle batch to start (a task writing while the loop
    /// goes on; what settles meanwhile waits for the next batch).
    fn after_turn(&mut self) -> Result<(), ConsumeError> {
        self.stats
            .in_flight
            .store(self.scheduler.in_flight() as u64, Relaxed);
        self.stats
            .queued
            .store(self.scheduler.queued() as u64, Relaxed);
        let awaited = self
            .handler
            .mappings()
            .is_some_and(|m| m.creations_awaited());
        let due = self.pending.len() >= self.options.settle_batch
            || (self.pending.len() > 0
                && (awaited || self.last_flush.elapsed() >= self.options.settle_interval));
        if self.writing.is_none() && due {
            let len = self.pending.len();
            let guard = self.writing_guard();
            let write = settlement::write_pending(
                self.pool.clone(),
                Arc::clone(&self.integration),
                std::mem::take(&mut self.pending),
                Arc::clone(&self.stats),
            );
            // The guard lives as long as the task, which a stop on an error does not wait for.
            let task = tokio::spawn(async move {
                let written = write.await;
                drop(guard);
                written
            });
            self.writing = Some((task, len));
            self.flushed();
        }
        Ok(())
    }

    /// Settled events wait for a batch, and none is being written (whose end is a turn of
    /// its own): the settle timer is what ends their wait.
    fn batch_waiting(&self) -> bool {
        self.writing.is_none() && self.pending.len() > 0
    }

    /// Ready when a write of the handler's starts waiting for a creation to become durable
    /// ([`crate::mappings::Mappings::creations_awaited`]): the batch is due at once, since the
    /// write and its tenant's events behind it wait on it. Never, for a handler with no mappings.
    async fn creation_awaited(handler: &H) {
        match handler.mappings() {
            Some(mappings) => mappings.creation_awaited().await,
            None => std::future::pending().await,
        }
    }

    /// A batch was started: the next one is due `settle_interval` from now.
    fn flushed(&mut self) {
        self.last_flush = Instant::now();
        let due = tokio::time::Instant::now() + self.options.settle_interval;
        self.timers.settle.as_mut().reset(due);
    }

    /// Stops ([`Coordinator::end`]), then drops what it staged and did not write
    /// ([`crate::mappings::Mappings::discard_all`]), however it ended: the runtime may start
    /// the next coordinator with the same handler.
    async fn stop(self, result: Result<(), ConsumeError>) -> Result<(), ConsumeError> {
        let handler = Arc::clone(&self.handler);
        let ended = self.end(result).await;
        if let Some(m) = handler.mappings() {
            m.discard_all();
        }
        ended
    }

    /// Lets go of every partition: no new attempt starts; attempts under way end (bounded by
    /// `revoke_drain`). After a clean run what settled is written, then one synchronous
    /// commit; after an error nothing more is written (the database may be what failed), and
    /// what was not committed is read again by whoever owns the partition next.
    async fn end(mut self, result: Result<(), ConsumeError>) -> Result<(), ConsumeError> {
        let owned = self.ownership.owned();
        let drain = self.options.revoke_drain;
        if result.is_err() {
            // The reports are only counted off: settling them could meet the same failure.
            self.let_go(&owned, false, drain).await?;
            return result;
        }
        self.finish_writing().await?;
        self.let_go(&owned, true, drain).await?;
        self.flush(CommitMode::Sync).await
    }

    /// What the poll thread reports: a rebalance (its callback waits for the answer, sent
    /// once it is handled; dropped if that fails, which lets the callback go on too), or the
    /// high watermarks.
    async fn handle_kafka(&mut self, event: KafkaEvent) -> Result<(), ConsumeError> {
        match event {
            KafkaEvent::Revoked {
                partitions,
                lost,
                reply,
            } => {
                self.revoke(&partitions, lost).await?;
                let _ = reply.send(());
            }
            KafkaEvent::Assigned {
                partitions,
                fresh_from,
                reply,
            } => {
                self.ownership.assign(&partitions);
                self.ownership.fresh_from(&fresh_from);
                self.forget_views();
                self.stats
                    .partitions
                    .store(self.ownership.len() as u64, Relaxed);
                // Obey the pauses other instances recorded before any record of the new
                // partitions is handed over.
                let now = paused_tenants(&self.pool, &self.integration).await?;
                self.obey_pauses(now);
                let _ = reply.send(());
            }
            KafkaEvent::Watermarks(highs) => self.ownership.watermarks(highs),
        }
        Ok(())
    }

    /// Revokes `partitions`: their work ends (or is cut at the deadline), what settled is
    /// written and committed synchronously, then they are forgotten with their queued events.
    /// A `lost` assignment may be another member's already: its work is cut at once, and what
    /// settled is written (the new owner's dedupe finds it) but not committed.
    async fn revoke(&mut self, partitions: &[i32], lost: bool) -> Result<(), ConsumeError> {
        let drain = if lost {
            Duration::ZERO
        } else {
            self.options.revoke_drain
        };
        self.let_go(partitions, true, drain).await?;
        if lost {
            self.ownership.remove(partitions);
        }
        self.finish_writing().await?;
        self.flush(CommitMode::Sync).await?;
        self.ownership.remove(partitions);
        self.stats
            .partitions
            .store(self.ownership.len() as u64, Relaxed);
        self.forget_revoked()?;
        self.forget_views();
        tracing::info!(?partitions, "partitions revoked");
        Ok(())
    }

    /// Cancels the work of `partitions` and serves the reports of the tasks under way until
    /// none is left or the revoke's deadlines pass ([`Revoke`]: `drain`, then the grace);
    /// `settle` says whether the reports are handled as usual or only counted off.
    async fn let_go(
        &mut self,
        partitions: &[i32],
        settle: bool,
        drain: Duration,
    ) -> Result<(), ConsumeError> {
        self.ownership.cancel(partitions);
        let mut revoke = Revoke::start(Instant::now(), drain);
        loop {
            let (next, effect) = revoke.next(self.ownership.busy(partitions), Instant::now());
            revoke = next;
            if effect == RevokeEffect::Abort {
                tracing::warn!(
                    ?partitions,
                    "work still under way at the drain deadline: its calls are cut"
                );
                self.ownership.abort(partitions);
            }
            let Some(until) = revoke.wake_at() else {
                break;
            };
            self.serve_report(until.into(), settle).await?;
        }
        if revoke == (Revoke::Done { fenced: true }) {
            tracing::warn!(
                ?partitions,
                "work still under way after its calls were cut; fenced"
            );
        }
        Ok(())
    }

    /// One report of a task, or `until`.
    async fn serve_report(
        &mut self,
        until: tokio::time::Instant,
        settle: bool,
    ) -> Result<(), ConsumeError> {
        tokio::select! {
            Some((claim, tenant, done)) = self.done.rx.recv() => match settle {
                true => self.handle_done(claim, tenant, done).await?,
                false => self.ownership.release(&claim),
            },
            Some((claim, tenant, done)) = self.probe.rx.recv() => match settle {
                true => self.handle_probe_result(claim, tenant, done).await?,
                false => self.ownership.release(&claim),
            },
            Some((claim, report)) = self.drained.rx.recv() => match settle {
                true => self.handle_drained(claim, report).await?,
                false => self.ownership.release(&claim),
            },
            _ = tokio::time::sleep_until(until) => {}
        }
        Ok(())
    }
}

/// The tenants whose records are parked rather than delivered: paused, or replaying a backlog.
async fn paused_tenants(pool: &PgPool, integration: &str) -> Result<HashSet<String>, sqlx::Error> {
    Ok(ledger::inactive_tenants(pool, integration)
        .await?
        .into_iter()
        .filter(|(_, state)| state == "paused" || state == "draining")
        .map(|(t, _)| t)
        .collect())
}
