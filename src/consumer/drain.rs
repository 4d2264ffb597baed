//! Replaying a resumed tenant's parked backlog, in order, a page at a time, through the same
//! attempts as live events (dedupe, expiry, kill switch, retries); each page's settlements and
//! the removal of what was replayed commit together.

use sqlx::PgPool;

use super::attempt::{self, Done, Guard, Item};
use super::rebalance::Position;
use super::settlement::settlement;
use super::{intake, ledger};
use crate::config::UnknownEventTypes;
use crate::delivery::{Failure, Handler};
use crate::mappings::Staged;

/// What a drain task reports to the loop.
pub(super) enum Drained {
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

/// Replays a tenant's parked backlog in order, a page at a time, through the same path as live
/// events (dedupe, expiry, handler with retries); each page's settlements and removal commit
/// together.
pub(super) async fn drain<H: Handler>(
    handler: &H,
    pool: &PgPool,
    tenant: &str,
    guard: &Guard<'_>,
) -> Drained {
    let mut after = 0;
    let integration = handler.integration();
    loop {
        let page = match ledger::parked_backlog(pool, integration, tenant, after, 500).await {
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
        let replay = Replay {
            pool,
            integration,
            tenant,
            settlements: Vec::new(),
            attempts: Vec::new(),
            mappings: Staged::default(),
            through: after,
        };
        match replay.page(handler, guard, page).await {
            Ok(through) => after = through,
            Err(report) => return report,
        }
    }
}

/// One page's replay: what settled, their attempts, and the last sequence number replayed.
struct Replay<'a> {
    pool: &'a PgPool,
    integration: &'a str,
    tenant: &'a str,
    settlements: Vec<ledger::Settlement>,
    attempts: Vec<ledger::AttemptLog>,
    /// What the replayed events learnt (the failing one's too): written with the page.
    mappings: Staged,
    through: i64,
}

impl Replay<'_> {
    /// Replays `page`; the last sequence replayed, or how the drain ends.
    async fn page<H: Handler>(
        mut self,
        handler: &H,
        guard: &Guard<'_>,
        page: Vec<(i64, ledger::ParkedRecord)>,
    ) -> Result<i64, Drained> {
        let tenant = self.tenant.to_owned();
        let ids: Vec<uuid::Uuid> = page.iter().filter_map(|(_, r)| r.event_id).collect();
        // Ids settled in this page are added as it goes: a copy parked behind its original
        // settles as a duplicate.
        let mut settled = ledger::settled_ids(self.pool, self.integration, &ids)
            .await
            .map_err(|e| Drained::Error(tenant.clone(), e))?;
        for (seq, raw) in page {
            let item = match replayed_item(handler, raw, &settled, guard.unknown_event_types) {
                Ok(item) => item,
                Err(Unreplayable::Ignored(ignored)) => {
                    guard.stats.count(ledger::SettledAs::Ignored);
                    self.settlements.push(*ignored);
                    self.through = seq;
                    continue;
                }
                Err(Unreplayable::Refused(failure, id)) => {
                    return Err(self
                        .stop(handler, Drained::Failed(tenant, failure, id, 0))
                        .await);
                }
            };
            let done = attempt::handle(handler, item, guard).await;
            let created = self.learnt(handler, done.event_id());
            match done {
                Done::Settled(mut item, outcome, tries) => {
                    settled.insert(item.event.id);
                    guard.stats.count(outcome);
                    self.settlements.push(settlement(&item, outcome, tries));
                    self.attempts.append(&mut item.log);
                }
                Done::Duplicate(_) => {}
                Done::Revoked(_) => {
                    // Keep what was replayed; the rest stays parked for the partition's owner.
                    return Err(match self.keep(handler).await {
                        Ok(()) => Drained::Revoked(tenant),
                        Err(e) => Drained::Error(tenant, e),
                    });
                }
                Done::Pause(mut item, failure, tries) => {
                    self.attempts.append(&mut item.log);
                    let id = Some(item.event.id);
                    return Err(self
                        .stop(handler, Drained::Failed(tenant, failure, id, tries))
                        .await);
                }
                Done::Breaker(mut item, failure) => {
                    self.attempts.append(&mut item.log);
                    let id = Some(item.event.id);
                    return Err(self
                        .stop(handler, Drained::Failed(tenant, failure, id, 1))
                        .await);
                }
            }
            self.through = seq;
            // A creation must be durable before a later event of the page writes to its
            // object (`Mappings::creation_durable`, which would otherwise wait for the end of
            // the page, behind itself): what was replayed so far is kept at once.
            if created {
                self.keep(handler)
                    .await
                    .map_err(|e| Drained::Error(tenant.clone(), e))?;
                self.kept();
            }
        }
        self.keep(handler)
            .await
            .map_err(|e| Drained::Error(tenant.clone(), e))?;
        Ok(self.through)
    }

    /// Records what settled and removes what was replayed, in one transaction. What the
    /// replayed events learnt leaves the handler's overlay either way: written, or (the
    /// transaction failed) learnt again when they are replayed again, their tenant's view read
    /// again (the transaction may have committed before its answer was lost).
    async fn keep<H: Handler>(&self, handler: &H) -> Result<(), sqlx::Error> {
        let guard = handler.mappings().map(|m| m.writing(&self.mappings));
        let kept = ledger::unpark(
            self.pool,
            self.integration,
            self.tenant,
            self.through,
            &self.settlements,
            (&self.attempts, &self.mappings),
        )
        .await;
        drop(guard);
        if let Some(m) = handler.mappings() {
            match &kept {
                Ok(_) => m.written(&self.mappings),
                Err(_) => m.dropped(&self.mappings),
            }
        }
        kept
    }

    /// Takes what `event` learnt into the page's mappings; whether it created an object.
    fn learnt<H: Handler>(&mut self, handler: &H, event: uuid::Uuid) -> bool {
        let Some(mappings) = handler.mappings() else {
            return false;
        };
        let learnt = mappings.take(&[event]);
        let created = learnt.creates();
        self.mappings.append(learnt);
        created
    }

    /// What was kept is forgotten: the page goes on from there.
    fn kept(&mut self) {
        self.settlements.clear();
        self.attempts.clear();
        self.mappings = Staged::default();
    }

    /// Keeps what was replayed (if that fails it stays parked and is replayed again, deduped)
    /// and ends the drain with `report`.
    async fn stop<H: Handler>(&self, handler: &H, report: Drained) -> Drained {
        let _ = self.keep(handler).await;
        report
    }
}

/// A parked record the decoder refuses.
enum Unreplayable {
    /// An event of a type the integration does not know, ignored by the policy: recorded.
    Ignored(Box<ledger::Settlement>),
    /// Anything else: its tenant is paused again with the decoder's reason.
    Refused(Failure, Option<uuid::Uuid>),
}

/// A parked record as an event to replay, or why it cannot be (the decoder refuses it).
fn replayed_item<H: Handler>(
    handler: &H,
    raw: ledger::ParkedRecord,
    settled: &std::collections::HashSet<uuid::Uuid>,
    unknown_types: UnknownEventTypes,
) -> Result<Box<Item>, Unreplayable> {
    let event = match intake::decode(handler, &intake::raw_of(&raw)) {
        Ok(event) => event,
        Err(bad) => {
            if let Some(ignored) = intake::ignored(unknown_types, &raw, intake::unknown_type(&bad))
            {
                return Err(Unreplayable::Ignored(Box::new(ignored)));
            }
            let failure = Failure {
                class: crate::delivery::FailureClass::Permanent,
                message: bad.to_string(),
                status: None,
                response: None,
                retry_after: None,
            };
            return Err(Unreplayable::Refused(failure, bad.event_id));
        }
    };
    let position = Position {
        partition: raw.partition,
        offset: raw.offset,
        generation: 0,
    };
    Ok(Box::new(Item {
        settled: settled.contains(&event.id),
        event,
        raw,
        position,
        log: Vec::new(),
        log_every: true,
        // Parked after an attempt that failed, or behind one.
        seen_before: true,
        // The failing event is on record unsettled: the conflict clause settles it.
        unrecorded: false,
    }))
}
