//! The settlement stage, the only writer of the coordinator's ledger rows: what settled since
//! the last batch ([`Pending`]), one transaction that parks paused tenants' records and records
//! settled events ([`write_pending`]), and only once that is durable, the positions marked in
//! their partitions' trackers ([`mark`]); the commit points that moved are committed on the
//! coordinator's commit timer, or at once on a revoke and at shutdown ([`commit`]).
//! The commit point therefore never passes a record whose settlement could still be lost. A
//! tenant's pause ([`pause`]) and the end of its backlog's replay ([`finish_drain`]) are written
//! here too, at once, since what the coordinator does next depends on them. (A backlog replay
//! writes its page's settlements with the page's removal from the backlog, in one transaction
//! of its own: see [`super::drain`].)

use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use uuid::Uuid;

use super::attempt::{Item, attempt_at};
use super::ledger::{self, AttemptLog, ParkedRecord, Pause, SettledAs, Settlement};
use super::poller::Context;
use super::rebalance::{Ownership, Position, blocking};
use super::runtime::{ConsumeError, ConsumeStats};
use crate::mappings::{Mappings, Staged};

pub(super) fn settlement(item: &Item, outcome: SettledAs, attempts: u32) -> Settlement {
    Settlement {
        unrecorded: item.unrecorded,
        ..Settlement::new(&item.event, &attempt_at(item, attempts), outcome)
    }
}

/// What settled since the last flush.
#[derive(Default)]
pub(super) struct Pending {
    /// Handled events, recorded in `deliveries`.
    pub(super) settlements: Vec<(Settlement, Position)>,
    /// Records settled with nothing left to record (parked already, duplicates, bad records).
    pub(super) positions: Vec<Position>,
    /// Records of paused tenants, parked at the flush, in arrival order.
    pub(super) parked: Vec<(ParkedRecord, Position)>,
    /// The attempt history of settled events that failed before they settled.
    pub(super) attempts: Vec<AttemptLog>,
    /// The mappings the settled events learnt: written with their settlements.
    pub(super) mappings: Staged,
}

impl Pending {
    /// Records waiting for the next batch.
    pub(super) fn len(&self) -> usize {
        self.settlements.len() + self.positions.len() + self.parked.len()
    }

    /// `item` settled as `outcome` after `attempts`: its record, its attempt history, and
    /// the mappings it learnt (from `mappings`, the handler's).
    pub(super) fn settle(
        &mut self,
        mut item: Box<Item>,
        outcome: SettledAs,
        attempts: u32,
        mappings: Option<&Mappings>,
    ) {
        if let Some(m) = mappings {
            self.mappings.append(m.take(&[item.event.id]));
        }
        self.settlements
            .push((settlement(&item, outcome, attempts), item.position));
        self.attempts.append(&mut item.log);
    }
}

/// What a batch made durable: the positions it settles, and the ids of the events it recorded
/// or parked.
pub(super) struct Durable {
    /// Every position the batch settles.
    pub(super) positions: Vec<Position>,
    /// The event ids it recorded in `deliveries` or parked.
    pub(super) ids: Vec<Uuid>,
    /// Records set aside for parking whose tenant the database says is live: not parked, not
    /// settled; the coordinator delivers them.
    pub(super) live: Vec<(ParkedRecord, Position)>,
    /// The mappings it wrote, for the handler's overlay to let go of.
    pub(super) mappings: Staged,
}

/// A batch's result.
pub(super) type Written = Result<Durable, sqlx::Error>;

/// Parks the pending records of paused tenants and records the settlements in one
/// transaction; returns every position they settle. Runs as a task of its own, one at a time,
/// so the loop takes in and dispatches while a batch is written; the positions are marked only
/// once it is durable ([`mark`]).
pub(super) async fn write_pending(
    pool: PgPool,
    integration: Arc<str>,
    pending: Pending,
    stats: Arc<ConsumeStats>,
) -> Written {
    let Pending {
        settlements,
        positions: mut settled,
        parked,
        attempts,
        mappings,
    } = pending;
    let (mut ids, mut live) = (Vec::new(), Vec::new());
    if !parked.is_empty() {
        let (records, positions): (Vec<ParkedRecord>, Vec<Position>) = parked.into_iter().unzip();
        let (n, live_tenants) = ledger::park_held(&pool, &integration, &records).await?;
        stats
            .parked
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        for (record, position) in records.into_iter().zip(positions) {
            if live_tenants.contains(&record.tenant_id) {
                live.push((record, position));
            } else {
                ids.extend(record.event_id);
                settled.push(position);
            }
        }
    }
    if !settlements.is_empty() || !mappings.is_empty() {
        let (batch, positions): (Vec<Settlement>, Vec<Position>) = settlements.into_iter().unzip();
        ids.extend(batch.iter().map(|s| s.event_id));
        ledger::settle(&pool, &integration, &batch, (&attempts, &mappings), None).await?;
        settled.extend(positions);
    }
    Ok(Durable {
        positions: settled,
        ids,
        live,
        mappings,
    })
}

/// Pauses `tenant` for `pause` and parks `records` (the failing event first, then the
/// tenant's queue, in order) with the failing event's `attempts` and the `mappings` it learnt
/// before it failed, in one transaction; returns how many were parked. The tenant's later
/// records are parked behind them as they arrive.
pub(super) async fn pause(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    pause: &Pause,
    records: &[ParkedRecord],
    (attempts, mappings): (&[AttemptLog], &Staged),
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    mappings.write(&mut tx, integration).await?;
    ledger::record_attempts(&mut tx, integration, attempts).await?;
    let parked = ledger::park_in(&mut tx, integration, tenant, Some(pause), records).await?;
    tx.commit().await?;
    Ok(parked)
}

/// Flips a tenant whose backlog was replayed live, if nothing is parked for it any more;
/// whether it flipped.
pub(super) async fn finish_drain(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
) -> Result<bool, sqlx::Error> {
    ledger::finish_drain(pool, integration, tenant).await
}

/// A settle batch being written.
pub(super) type Writing = tokio::task::JoinHandle<Written>;

/// Marks durable positions settled in their partitions' trackers (if still owned, same
/// generation), and notes how long the oldest record still unsettled has held each commit
/// point back.
pub(super) fn mark(ownership: &mut Ownership, positions: Vec<Position>, stats: &ConsumeStats) {
    for p in positions {
        if let Some(owned) = ownership.current_mut(p.partition, p.generation)
            && let Some(offsets) = owned.offsets.as_mut()
        {
            let _ = offsets.settled(p.offset);
            owned.started.remove(&p.offset);
        }
    }
    for (_, owned) in ownership.iter_mut() {
        let Some(offsets) = owned.offsets.as_ref() else {
            continue;
        };
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

/// Commits each owned partition's point: asynchronously the points that moved since the last
/// commit; synchronously (a revoke's, the last) whatever the broker has not confirmed.
pub(super) fn commit(
    consumer: &BaseConsumer<Context>,
    ownership: &mut Ownership,
    topic: &str,
    stats: &ConsumeStats,
    mode: CommitMode,
) -> Result<(), ConsumeError> {
    let mut commit = TopicPartitionList::new();
    for (partition, owned) in ownership.iter_mut() {
        let Some(offsets) = owned.offsets.as_mut() else {
            continue;
        };
        let point = match mode {
            CommitMode::Sync => {
                (offsets.commit_point() > offsets.acked()).then(|| offsets.commit_point())
            }
            CommitMode::Async => offsets.take_commit(),
        };
        if let Some(point) = point {
            commit.add_partition_offset(topic, partition, Offset::Offset(point))?;
        }
    }
    if commit.count() > 0 {
        match mode {
            CommitMode::Sync => {
                // On a revoke or at shutdown: a failure costs a redelivery (deduped), not an
                // error exit.
                if let Err(e) = blocking(|| consumer.commit(&commit, mode)) {
                    tracing::warn!(error = %e, "synchronous commit failed; the next owner replays from the previous one");
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
