//! Mappings: our id of an object to the partner's, per integration, tenant and object type
//! (`integration_mappings`), learnt while events are handled and staged here until the
//! consumer's settlement batch writes them.
//!
//! **Why staged, not written at once.** A mapping used to be written by a statement of its
//! own the moment it was learnt: a round trip and a commit (a WAL flush) per new object, on the
//! path of every create. Now the handler stages it ([`Mappings::stage`]) and the settlement
//! stage writes everything staged ([`Mappings::take`], [`Staged::write`]) in the same
//! transaction as the dedupe records of the batch, one statement for the lot.
//!
//! **Why that is safe.**
//! - *Read your own writes.* Until it is durable, a staged mapping is in the overlay, and every
//!   read of a mapping looks there first ([`Mappings::staged`]): the next event of the same
//!   object, in this process, sees it. Another instance only handles the tenant after the
//!   partition moved, and a revoke writes what settled before it completes.
//! - *Never settled without its mappings.* Each change is staged under the event that learnt
//!   it, and is taken ([`Mappings::take`]) with that event's settlement (or its parking): the
//!   transaction that records the event as done is the one that writes what it learnt. A crash
//!   before that commit loses both, and the event is handled again: its create replays under
//!   the same idempotency key, or the object is found by our id.
//! - *In order.* A tenant's events are handled one at a time and its settlements written in
//!   order (a pause that carries mappings writes what settled before it first), so the changes
//!   of an object reach the table in the order they were learnt. The
//!   overlay keeps every version not yet durable and reads the latest; a version leaves when
//!   its batch commits ([`Mappings::written`]) or its event is dropped unsettled
//!   ([`Mappings::discard`]: a revoked partition's attempt, whose event the next owner handles
//!   again and heals by our id).
//! - *Nothing outlives the consumer that staged it.* The overlay belongs to the integration,
//!   which the runtime keeps when it starts a consumer again after a failure; the consumer
//!   that stops drops everything it staged and did not write ([`Mappings::discard_all`]). A
//!   version no transaction will carry must never answer a read: a create handled again would
//!   find its own unwritten mapping, settle without writing it, and leave the object unmapped.
//! - *No write over a creation that could still be lost.* An event that creates an object
//!   records itself in the mapping (`created_by`), so that, handled again after a crash, it
//!   leaves the object alone instead of taking it back to its older state. That record must be
//!   durable before a later event writes to the object: if both were lost, the create handled
//!   again would find the object, take it back to its own state under a new key, and the
//!   later event's write, handled again under its first key, would be replayed by the partner
//!   without effect. So a write to an object whose creation is staged and not yet durable
//!   waits for it ([`Mappings::creation_durable`]), which the next batch makes so: a batch the
//!   consumer starts at once when a write waits ([`Mappings::creations_awaited`]), not on its
//!   settle timer.
//!
//! **Under the overlay, the views.** What is durable is held per tenant while its partition is
//! owned here ([`views`], which argues why that stands in for the table): a version leaves the
//! overlay and enters its tenant's view under one lock, so a read never misses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::PgConnection;
use uuid::Uuid;

pub mod views;

use views::{Seen, Views};

/// The partner's object that our id maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The partner's id.
    pub foreign_id: String,
    /// The event that created the object, when Ferry created it.
    pub created_by: Option<Uuid>,
}

/// One change of a mapping: set, or removed (`mapped: None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingChange {
    /// The tenant.
    pub tenant: String,
    /// The object type (e.g. `shop_item`).
    pub object_type: String,
    /// Our id.
    pub local_id: String,
    /// What it maps to now; `None` once the object is gone.
    pub mapped: Option<Mapped>,
}

type Key = (String, String, String);

fn key_of(change: &MappingChange) -> Key {
    (
        change.tenant.clone(),
        change.object_type.clone(),
        change.local_id.clone(),
    )
}

#[derive(Debug, Default)]
struct Staging {
    next: u64,
    /// Every version of each object not yet durable, oldest first, with its number.
    overlay: HashMap<Key, Vec<(u64, Option<Mapped>)>>,
    /// What no batch has taken yet, in staging order, with the event that learnt it.
    queue: Vec<(u64, Uuid, MappingChange)>,
    /// What is durable, per tenant held: under the same lock as the overlay, so that a
    /// version leaving the overlay is in its view in the same step.
    views: Views,
}

impl Staging {
    /// The versions of an object not yet durable, oldest first.
    fn versions(
        &self,
        tenant: &str,
        object_type: &str,
        local_id: &str,
    ) -> Option<&[(u64, Option<Mapped>)]> {
        let key = (
            tenant.to_owned(),
            object_type.to_owned(),
            local_id.to_owned(),
        );
        self.overlay.get(&key).map(Vec::as_slice)
    }

    fn forget(&mut self, n: u64, change: &MappingChange) {
        let key = key_of(change);
        if let Some(versions) = self.overlay.get_mut(&key) {
            versions.retain(|(v, _)| *v != n);
            if versions.is_empty() {
                self.overlay.remove(&key);
            }
        }
    }
}

/// A write counted in [`Mappings::creations_awaited`] while it waits, however its wait ends
/// (its attempt may be dropped mid-wait by a revoke).
struct Waiting<'a>(&'a Mappings);

impl<'a> Waiting<'a> {
    fn new(mappings: &'a Mappings) -> Self {
        mappings
            .awaiting
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        mappings.awaited.notify_one();
        Waiting(mappings)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .awaiting
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One integration's staged mappings: the overlay reads see, and the changes settlements take.
#[derive(Debug, Default)]
pub struct Mappings {
    /// Shared with the [`WriteGuard`]s of transactions that may outlive their consumer.
    staging: Arc<Mutex<Staging>>,
    /// Woken whenever versions leave the overlay.
    left: tokio::sync::Notify,
    /// Writes waiting in [`Mappings::creation_durable`] now.
    awaiting: std::sync::atomic::AtomicUsize,
    /// Given a permit whenever a write starts waiting ([`Mappings::creation_awaited`]).
    awaited: tokio::sync::Notify,
}

/// How long a write waits for the creation of its object to become durable before it fails
/// (retryably): a batch that does not commit in that time has a database that is failing.
pub const CREATION_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The creation of an object stayed unwritten for [`CREATION_WAIT`].
#[derive(Debug, thiserror::Error)]
#[error(
    "the mapping of {object_type} {local_id}, created by event {created_by}, was not written in time"
)]
pub struct CreationPending {
    /// The object type.
    pub object_type: String,
    /// Our id.
    pub local_id: String,
    /// The event that created it.
    pub created_by: Uuid,
}

impl Mappings {
    /// Mappings whose views hold at most `budget` mappings, all tenants together (0: none).
    pub fn with_views(budget: usize) -> Self {
        let staging = Staging {
            views: Views::new(views::TENANT_MAX, budget),
            ..Staging::default()
        };
        Mappings {
            staging: Arc::new(Mutex::new(staging)),
            ..Mappings::default()
        }
    }

    /// Stages `change`, learnt while handling `event`: reads see it at once; the event's
    /// settlement writes it.
    pub fn stage(&self, event: Uuid, change: MappingChange) {
        let mut s = self.staging.lock().expect("mappings");
        s.next += 1;
        let n = s.next;
        s.overlay
            .entry(key_of(&change))
            .or_default()
            .push((n, change.mapped.clone()));
        s.queue.push((n, event, change));
    }

    /// What is staged for our id `local_id` of `object_type`, not yet durable: `Some(None)`
    /// when its removal is; `None` when nothing is staged (the table has the answer).
    pub fn staged(
        &self,
        tenant: &str,
        object_type: &str,
        local_id: &str,
    ) -> Option<Option<Mapped>> {
        let s = self.staging.lock().expect("mappings");
        s.versions(tenant, object_type, local_id)
            .and_then(|versions| versions.last())
            .map(|(_, mapped)| mapped.clone())
    }

    /// The latest staged change of each of `tenant`'s objects not yet durable, in staging
    /// order.
    pub fn staged_for(&self, tenant: &str) -> Vec<MappingChange> {
        let s = self.staging.lock().expect("mappings");
        let mut found: Vec<(u64, MappingChange)> = s
            .overlay
            .iter()
            .filter(|((t, _, _), _)| t == tenant)
            .filter_map(|((t, o, l), versions)| {
                let (n, mapped) = versions.last()?;
                let change = MappingChange {
                    tenant: t.clone(),
                    object_type: o.clone(),
                    local_id: l.clone(),
                    mapped: mapped.clone(),
                };
                Some((*n, change))
            })
            .collect();
        found.sort_by_key(|(n, _)| *n);
        found.into_iter().map(|(_, c)| c).collect()
    }

    /// Takes what `events` learnt, for the transaction that settles (or parks) them.
    pub fn take(&self, events: &[Uuid]) -> Staged {
        let mut s = self.staging.lock().expect("mappings");
        if s.queue.is_empty() {
            return Staged::default();
        }
        let (taken, kept) = std::mem::take(&mut s.queue)
            .into_iter()
            .partition(|(_, event, _)| events.contains(event));
        s.queue = kept;
        Staged(
            taken
                .into_iter()
                .map(|(n, _, change)| (n, change))
                .collect(),
        )
    }

    /// `staged` is durable: the table has it, the overlay lets go of those versions.
    pub fn written(&self, staged: &Staged) {
        if staged.is_empty() {
            return;
        }
        let mut s = self.staging.lock().expect("mappings");
        for change in staged.latest() {
            s.views.apply(change);
        }
        for (n, change) in &staged.0 {
            s.forget(*n, change);
        }
        drop(s);
        self.left.notify_waiters();
    }

    /// The event other than `event` whose creation of `local_id`'s object of `object_type` is
    /// staged and not yet durable, if any.
    pub fn creation_pending(
        &self,
        (tenant, object_type, local_id): (&str, &str, &str),
        event: Uuid,
    ) -> Option<Uuid> {
        let s = self.staging.lock().expect("mappings");
        s.versions(tenant, object_type, local_id)?
            .iter()
            .find_map(|(_, mapped)| {
                mapped
                    .as_ref()
                    .and_then(|m| m.created_by)
                    .filter(|by| *by != event)
            })
    }

    /// Waits until no other event's creation of `local_id`'s object of `object_type` is
    /// staged and not yet durable: `event` may then write to the object. At most `within`
    /// ([`CREATION_WAIT`] for the driver).
    pub async fn creation_durable(
        &self,
        object: (&str, &str, &str),
        event: Uuid,
        within: std::time::Duration,
    ) -> Result<(), CreationPending> {
        let deadline = tokio::time::Instant::now() + within;
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            // Registered before the check, so a write landing in between still wakes it.
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            let Some(created_by) = self.creation_pending(object, event) else {
                return Ok(());
            };
            // The consumer writes its batch at once rather than on its timer: this write, and
            // its tenant's events behind it, wait on that batch.
            waiting.get_or_insert_with(|| Waiting::new(self));
            if tokio::time::timeout_at(deadline, left).await.is_err() {
                return Err(CreationPending {
                    object_type: object.1.to_owned(),
                    local_id: object.2.to_owned(),
                    created_by,
                });
            }
        }
    }

    /// Whether a write is waiting for a creation to become durable: the settlement's next batch
    /// is due at once (`consumer::coordinator`).
    pub fn creations_awaited(&self) -> bool {
        self.awaiting.load(std::sync::atomic::Ordering::Acquire) > 0
    }

    /// Ready once a write has started waiting for a creation since the last time it was ready
    /// (a permit, so a wait that began before this was called is not missed).
    pub async fn creation_awaited(&self) {
        self.awaited.notified().await;
    }

    /// What `events` learnt is dropped unwritten (their attempts were cut by a revoke, or the
    /// transaction that carried it failed): whoever handles them again finds their objects by
    /// our id. Their tenants' views are read again ([`Mappings::dropped`]).
    pub fn discard(&self, events: &[Uuid]) {
        let dropped = self.take(events);
        self.dropped(&dropped);
    }

    /// `staged` will not be written by this consumer, or its outcome is unknown: its versions
    /// leave the overlay, and its tenants' views are read again (a failed transaction may have
    /// committed before its answer was lost).
    pub fn dropped(&self, staged: &Staged) {
        if staged.is_empty() {
            return;
        }
        let mut s = self.staging.lock().expect("mappings");
        for (n, change) in &staged.0 {
            s.forget(*n, change);
            s.views.forget(&change.tenant);
        }
        drop(s);
        self.left.notify_waiters();
    }

    /// Everything staged is dropped unwritten: the consumer that staged it stopped (the
    /// module's "Nothing outlives the consumer that staged it"). A write still under way when it
    /// stopped may yet commit; the table then has it.
    pub fn discard_all(&self) {
        let mut s = self.staging.lock().expect("mappings");
        s.overlay.clear();
        s.queue.clear();
        s.views.clear();
        drop(s);
        self.left.notify_waiters();
    }

    /// What `tenant`'s view, with what is staged over it, says of our id `local_id` for each
    /// of `object_types`; `None` when the tenant is not held (the table has the answer).
    pub fn seen(&self, tenant: &str, object_types: &[&str], local_id: &str) -> Option<Seen> {
        let s = self.staging.lock().expect("mappings");
        let mut seen = s.views.seen(tenant, object_types, local_id)?;
        for object_type in object_types {
            let latest = s.versions(tenant, object_type, local_id);
            let Some((_, version)) = latest.and_then(|v| v.last()) else {
                continue;
            };
            seen.mapped.retain(|(o, _)| o != object_type);
            if let Some(mapped) = version {
                seen.mapped
                    .push(((*object_type).to_owned(), mapped.clone()));
            }
        }
        Some(seen)
    }

    /// Whether `tenant`'s view is to be read from the table now, and then how many of its
    /// mappings at most ([`Views::begin_load`]).
    pub fn begin_load(&self, tenant: &str) -> Option<usize> {
        let mut s = self.staging.lock().expect("mappings");
        s.views.begin_load(tenant).then(|| s.views.load_limit())
    }

    /// `tenant`'s view as read ([`Views::finish_load`]).
    pub fn finish_load(&self, tenant: &str, enabled: bool, rows: Vec<(String, String, Mapped)>) {
        let mut s = self.staging.lock().expect("mappings");
        s.views.finish_load(tenant, enabled, rows.into_iter());
    }

    /// `tenant`'s view is read again at its next event ([`Views::forget`]): a switch marker
    /// was handled, or the tenant's backlog starts replaying.
    pub fn forget_tenant(&self, tenant: &str) {
        self.staging.lock().expect("mappings").views.forget(tenant);
    }

    /// Registers a transaction about to write `staged` until the guard is dropped, which the
    /// transaction's task does when it ends, committed or not, even if nobody waits for it
    /// any more ([`Views::write_began`], [`Views::write_ended`]).
    pub fn writing(&self, staged: &Staged) -> WriteGuard {
        let mut tenants: Vec<String> = staged.0.iter().map(|(_, c)| c.tenant.clone()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let mut s = self.staging.lock().expect("mappings");
        for tenant in &tenants {
            s.views.write_began(tenant);
        }
        WriteGuard {
            staging: Arc::clone(&self.staging),
            tenants,
        }
    }

    /// Every tenant's view is read again at its next event: the partitions moved.
    pub fn forget_views(&self) {
        self.staging.lock().expect("mappings").views.clear();
    }

    /// Changes staged and not yet taken.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.staging.lock().expect("mappings").queue.len()
    }
}

/// A transaction writing mappings that may still commit ([`Mappings::writing`]).
#[must_use = "the write counts as under way until the guard is dropped"]
pub struct WriteGuard {
    staging: Arc<Mutex<Staging>>,
    tenants: Vec<String>,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        // A poisoned lock: the process is failing, and no view will be read again.
        if let Ok(mut s) = self.staging.lock() {
            for tenant in &self.tenants {
                s.views.write_ended(tenant);
            }
        }
    }
}

/// Removes `integration`'s (`$1`) mappings of the objects `($2[i], $3[i], $4[i])`: (tenant, object
/// type, our id). Each is one probe of the table's only index but its id's, whatever the
/// table's statistics (migration 0013 says why that matters).
///
/// The integration comes through the `UNNEST` with the rest of the key, not as a constant
/// filter on the table. On a table never analyzed, the planner guesses that `integration = $1`
/// keeps 0.5% of the rows, where a deployment with one integration keeps them all: with a
/// constant it read every mapping of the integration and hashed them, as soon as a batch
/// removed a dozen objects (`ferry bench pipeline` measured 4 to 7 ms a batch at 2,000
/// mappings). With the integration joined, the table has no filter to misjudge: the planner
/// probes the key per object, or scans the table when it is small enough to be cheaper, on the
/// table's true size either way.
pub const REMOVE: &str = "DELETE FROM integration_mappings m USING \
         UNNEST(array_fill($1::text, ARRAY[cardinality($2::text[])]), \
                $2::text[], $3::text[], $4::text[]) \
             AS r(integration, tenant_id, object_type, local_id) \
     WHERE m.integration = r.integration AND m.tenant_id = r.tenant_id \
       AND m.object_type = r.object_type AND m.local_id = r.local_id";

/// Changes taken for one batch, in staging order.
#[derive(Debug, Default)]
pub struct Staged(Vec<(u64, MappingChange)>);

impl Staged {
    /// Adds `more`, staged later.
    pub fn append(&mut self, mut more: Staged) {
        self.0.append(&mut more.0);
    }

    /// Whether an object was created: a change names the event that created it.
    pub fn creates(&self) -> bool {
        self.0
            .iter()
            .any(|(_, c)| c.mapped.as_ref().is_some_and(|m| m.created_by.is_some()))
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The last change of each object, in staging order.
    pub fn latest(&self) -> Vec<&MappingChange> {
        let mut last: HashMap<Key, usize> = HashMap::new();
        for (i, (_, change)) in self.0.iter().enumerate() {
            last.insert(key_of(change), i);
        }
        let mut keep: Vec<usize> = last.into_values().collect();
        keep.sort_unstable();
        keep.into_iter().map(|i| &self.0[i].1).collect()
    }

    /// Writes the changes as `integration`'s, in the caller's transaction: one statement for
    /// the mappings set, one for those removed. A mapping set to the object it names already
    /// keeps its row (and the event that created it).
    pub async fn write(
        &self,
        conn: &mut PgConnection,
        integration: &str,
    ) -> Result<(), sqlx::Error> {
        let latest = self.latest();
        let (set, removed): (Vec<&MappingChange>, Vec<&MappingChange>) =
            latest.into_iter().partition(|c| c.mapped.is_some());
        if !set.is_empty() {
            let mapped = |c: &&MappingChange| c.mapped.clone().expect("partitioned");
            sqlx::query(
                "INSERT INTO integration_mappings \
                     (integration, tenant_id, object_type, local_id, foreign_id, created_by) \
                 SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::uuid[]) \
                 ON CONFLICT (integration, tenant_id, object_type, local_id) \
                 DO UPDATE SET foreign_id = EXCLUDED.foreign_id, created_by = EXCLUDED.created_by, \
                               updated_at = now() \
                 WHERE integration_mappings.foreign_id <> EXCLUDED.foreign_id",
            )
            .bind(integration)
            .bind(set.iter().map(|c| c.tenant.as_str()).collect::<Vec<_>>())
            .bind(set.iter().map(|c| c.object_type.as_str()).collect::<Vec<_>>())
            .bind(set.iter().map(|c| c.local_id.as_str()).collect::<Vec<_>>())
            .bind(set.iter().map(|c| mapped(c).foreign_id).collect::<Vec<_>>())
            .bind(set.iter().map(|c| mapped(c).created_by).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
        }
        if !removed.is_empty() {
            let column = |f: fn(&MappingChange) -> &str| -> Vec<&str> {
                removed.iter().map(|c| f(c)).collect()
            };
            sqlx::query(REMOVE)
                .bind(integration)
                .bind(column(|c| &c.tenant))
                .bind(column(|c| &c.object_type))
                .bind(column(|c| &c.local_id))
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

/// Every object of one type mapped for a tenant, as the table holds them with what is staged
/// over them, a page at a time in our ids' order (then the objects only staged): for a
/// tenant's rollback, which stages each removal as it goes, so a page is never read twice.
pub struct TenantObjects<'a> {
    pool: &'a sqlx::PgPool,
    integration: &'a str,
    tenant: &'a str,
    object_type: &'a str,
    /// Staged versions not yet met in the table, by our id: `None` for a removal.
    staged: std::collections::BTreeMap<String, Option<String>>,
    after: Option<String>,
    table_done: bool,
}

impl<'a> TenantObjects<'a> {
    /// `tenant`'s objects of `object_type` in `integration`.
    pub fn new(
        pool: &'a sqlx::PgPool,
        mappings: &Mappings,
        (integration, tenant): (&'a str, &'a str),
        object_type: &'a str,
    ) -> Self {
        let staged = mappings
            .staged_for(tenant)
            .into_iter()
            .filter(|c| c.object_type == object_type)
            .map(|c| (c.local_id, c.mapped.map(|m| m.foreign_id)))
            .collect();
        TenantObjects {
            pool,
            integration,
            tenant,
            object_type,
            staged,
            after: None,
            table_done: false,
        }
    }

    /// The next page of `(our id, the partner's id)`; empty once every object was listed.
    pub async fn next_page(&mut self) -> Result<Vec<(String, String)>, sqlx::Error> {
        if self.table_done {
            // The objects only staged, once.
            let rest = std::mem::take(&mut self.staged);
            return Ok(rest
                .into_iter()
                .filter_map(|(l, f)| Some((l, f?)))
                .collect());
        }
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT local_id, foreign_id FROM integration_mappings \
             WHERE integration = $1 AND tenant_id = $2 AND object_type = $3 \
               AND ($4::text IS NULL OR local_id > $4) \
             ORDER BY local_id LIMIT 100",
        )
        .bind(self.integration)
        .bind(self.tenant)
        .bind(self.object_type)
        .bind(self.after.as_deref())
        .fetch_all(self.pool)
        .await?;
        if rows.is_empty() {
            self.table_done = true;
            return Box::pin(self.next_page()).await;
        }
        self.after = rows.last().map(|(l, _)| l.clone());
        let page = rows
            .into_iter()
            .filter_map(|(local, foreign)| match self.staged.remove(&local) {
                Some(staged) => Some((local, staged?)),
                None => Some((local, foreign)),
            })
            .collect::<Vec<_>>();
        if page.is_empty() {
            // Every row of this page removed already: on to the next.
            return Box::pin(self.next_page()).await;
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(local: &str, foreign: &str) -> MappingChange {
        MappingChange {
            tenant: "acme".into(),
            object_type: "item".into(),
            local_id: local.into(),
            mapped: Some(Mapped {
                foreign_id: foreign.into(),
                created_by: None,
            }),
        }
    }

    fn removed(local: &str) -> MappingChange {
        MappingChange {
            mapped: None,
            ..set(local, "")
        }
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn a_staged_change_is_read_until_its_event_settles() {
        let m = Mappings::default();
        assert_eq!(m.staged("acme", "item", "p1"), None);
        m.stage(id(1), set("p1", "it_1"));
        assert_eq!(
            m.staged("acme", "item", "p1")
                .flatten()
                .map(|x| x.foreign_id),
            Some("it_1".to_owned())
        );
        // Another event's settlement does not take it.
        assert!(m.take(&[id(2)]).is_empty());
        let batch = m.take(&[id(1)]);
        assert_eq!(m.queued(), 0);
        // Taken but not yet durable: still read from the overlay.
        assert!(m.staged("acme", "item", "p1").is_some());
        m.written(&batch);
        assert_eq!(m.staged("acme", "item", "p1"), None);
    }

    #[test]
    fn a_stopped_consumer_leaves_nothing_staged_behind() {
        let m = Mappings::default();
        let created = MappingChange {
            mapped: Some(Mapped {
                foreign_id: "it_1".into(),
                created_by: Some(id(1)),
            }),
            ..set("p1", "")
        };
        m.stage(id(1), created);
        // Taken by a batch that will never be written, and one change still queued.
        let _lost = m.take(&[id(1)]);
        m.stage(id(2), set("p2", "it_2"));
        m.discard_all();
        assert_eq!(m.staged("acme", "item", "p1"), None);
        assert_eq!(m.staged("acme", "item", "p2"), None);
        assert!(m.take(&[id(1), id(2)]).is_empty());
        assert_eq!(m.creation_pending(("acme", "item", "p1"), id(3)), None);
    }

    #[test]
    fn a_held_tenant_is_read_with_what_is_staged_over_it() {
        let m = Mappings::default();
        let seen = |local: &str| {
            m.seen("acme", &["item"], local).map(|s| {
                s.mapped
                    .into_iter()
                    .map(|(_, x)| x.foreign_id)
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(m.begin_load("acme"), Some(views::TENANT_MAX + 1));
        let it_1 = Mapped {
            foreign_id: "it_1".into(),
            created_by: None,
        };
        m.finish_load("acme", true, vec![("item".into(), "p1".into(), it_1)]);
        assert_eq!(seen("p1"), Some(vec!["it_1".to_owned()]));
        m.stage(id(1), removed("p1"));
        assert_eq!(seen("p1"), Some(vec![]));
        // Written: the overlay lets go and the view has it, in one step.
        let batch = m.take(&[id(1)]);
        m.written(&batch);
        assert_eq!(seen("p1"), Some(vec![]));
        m.stage(id(2), set("p1", "it_2"));
        assert_eq!(seen("p1"), Some(vec!["it_2".to_owned()]));
        // Dropped unwritten (its transaction may have committed): the tenant is read again.
        m.discard(&[id(2)]);
        assert_eq!(seen("p1"), None);
        assert!(m.begin_load("acme").is_some());
        m.finish_load("acme", false, Vec::new());
        assert!(!m.seen("acme", &["item"], "p1").unwrap().enabled);
        m.forget_views();
        assert_eq!(seen("p1"), None);
    }

    #[test]
    fn a_write_counts_as_under_way_until_its_guard_is_dropped() {
        let m = Mappings::default();
        m.stage(id(1), set("p1", "it_1"));
        let batch = m.take(&[id(1)]);
        let guard = m.writing(&batch);
        // A load while the batch may commit is not kept.
        assert!(m.begin_load("acme").is_some());
        m.finish_load("acme", true, Vec::new());
        assert!(m.seen("acme", &["item"], "p1").is_none());
        // The task that held the guard ended (nobody may be waiting for it).
        drop(guard);
        assert!(m.begin_load("acme").is_some());
        m.finish_load("acme", true, Vec::new());
        assert!(m.seen("acme", &["item"], "p1").is_some());
    }

    #[test]
    fn a_later_version_outlives_the_write_of_an_earlier_one() {
        let m = Mappings::default();
        m.stage(id(1), set("p1", "it_1"));
        let first = m.take(&[id(1)]);
        m.stage(id(2), removed("p1"));
        m.written(&first);
        assert_eq!(m.staged("acme", "item", "p1"), Some(None));
        let second = m.take(&[id(2)]);
        m.written(&second);
        assert_eq!(m.staged("acme", "item", "p1"), None);
    }

    #[test]
    fn a_dropped_attempt_falls_back_to_the_version_before_it() {
        let m = Mappings::default();
        m.stage(id(1), set("p1", "it_1"));
        let first = m.take(&[id(1)]);
        m.stage(id(2), set("p1", "it_2"));
        m.discard(&[id(2)]);
        assert_eq!(
            m.staged("acme", "item", "p1")
                .flatten()
                .map(|x| x.foreign_id),
            Some("it_1".to_owned())
        );
        m.written(&first);
        assert_eq!(m.staged("acme", "item", "p1"), None);
    }

    #[test]
    fn a_batch_writes_the_last_change_of_each_object_in_order() {
        let m = Mappings::default();
        m.stage(id(1), set("p1", "it_1"));
        m.stage(id(1), set("p2", "it_2"));
        m.stage(id(2), removed("p1"));
        m.stage(id(3), set("p1", "it_3"));
        let mut batch = m.take(&[id(1)]);
        batch.append(m.take(&[id(2), id(3)]));
        let latest: Vec<(&str, Option<&str>)> = batch
            .latest()
            .into_iter()
            .map(|c| {
                (
                    c.local_id.as_str(),
                    c.mapped.as_ref().map(|x| x.foreign_id.as_str()),
                )
            })
            .collect();
        assert_eq!(latest, vec![("p2", Some("it_2")), ("p1", Some("it_3"))]);
    }

    fn created(local: &str, foreign: &str, by: Uuid) -> MappingChange {
        MappingChange {
            mapped: Some(Mapped {
                foreign_id: foreign.into(),
                created_by: Some(by),
            }),
            ..set(local, foreign)
        }
    }

    /// Event 2's write to `acme`'s item `p1`, waiting at most `within` for its creation, in a
    /// task of its own.
    fn wait_in_task(
        m: &std::sync::Arc<Mappings>,
        within: std::time::Duration,
    ) -> tokio::task::JoinHandle<Result<(), CreationPending>> {
        let m = m.clone();
        tokio::spawn(async move {
            m.creation_durable(("acme", "item", "p1"), id(2), within)
                .await
        })
    }

    #[tokio::test]
    async fn a_write_waits_for_the_creation_of_its_object_to_be_durable() {
        let m = std::sync::Arc::new(Mappings::default());
        let object = ("acme", "item", "p1");
        m.stage(id(1), created("p1", "it_1", id(1)));
        // The creating event itself, handled again, does not wait for itself.
        assert_eq!(m.creation_pending(object, id(1)), None);
        assert_eq!(m.creation_pending(object, id(2)), Some(id(1)));
        let batch = m.take(&[id(1)]);
        let waiting = wait_in_task(&m, std::time::Duration::from_secs(10));
        assert!(!m.creations_awaited());
        // The consumer hears that a write waits, and the wait is counted while it lasts.
        tokio::time::timeout(std::time::Duration::from_secs(5), m.creation_awaited())
            .await
            .expect("a write waiting is announced");
        assert!(m.creations_awaited());
        assert!(!waiting.is_finished());
        m.written(&batch);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken by the write")
            .unwrap()
            .expect("durable");
        assert!(!m.creations_awaited());
    }

    #[tokio::test]
    async fn a_creation_never_written_fails_the_wait() {
        let m = Mappings::default();
        m.stage(id(1), created("p1", "it_1", id(1)));
        let within = std::time::Duration::from_millis(50);
        let e = m
            .creation_durable(("acme", "item", "p1"), id(2), within)
            .await
            .unwrap_err();
        assert_eq!(e.created_by, id(1));
        assert!(
            !m.creations_awaited(),
            "a wait that failed is no longer counted"
        );
    }

    #[tokio::test]
    async fn a_wait_dropped_midway_is_no_longer_counted() {
        let m = std::sync::Arc::new(Mappings::default());
        m.stage(id(1), created("p1", "it_1", id(1)));
        let waiting = wait_in_task(&m, std::time::Duration::from_secs(60));
        m.creation_awaited().await;
        assert!(m.creations_awaited());
        // A revoke drops the attempt in the middle of its wait.
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        assert!(!m.creations_awaited());
    }

    #[test]
    fn a_tenants_staged_changes_are_listed_in_order() {
        let m = Mappings::default();
        m.stage(id(1), set("p2", "it_2"));
        m.stage(id(1), set("p1", "it_1"));
        m.stage(
            id(1),
            MappingChange {
                tenant: "other".into(),
                ..set("p3", "it_3")
            },
        );
        let ids: Vec<String> = m
            .staged_for("acme")
            .into_iter()
            .map(|c| c.local_id)
            .collect();
        assert_eq!(ids, vec!["p2", "p1"]);
    }
}
