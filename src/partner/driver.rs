//! The generic driver: what every REST integration does with an object type, written once. An
//! integration says how to call the partner for each of its object types ([`ObjectApi`]: find
//! by our id, create, update, delete); the driver does the rest:
//!
//! - **Mapping**: our id to the partner's, per tenant, integration and object type
//!   (`integration_mappings`), held in memory with the tenant's switch while its partition is
//!   owned here ([`crate::mappings::views`], [`Driver::known`]). A mapping learnt is staged at
//!   once ([`Mappings`]): a retry after a later step failed, and the tenant's next event, start
//!   from it; the consumer writes it in the transaction that settles the event.
//! - **Healing**: when an earlier handling of the event may have written to the partner
//!   ([`Attempt::may_have_written`](crate::delivery::Attempt::may_have_written): a retry, a
//!   redelivery to a new owner of the partition, a parked backlog), the partner is asked for
//!   the object that carries our id before anything is created, so a lost create answer, a
//!   lost mapping or a partner that ignores `Idempotency-Key` never makes a second object. A
//!   first handling skips that call: nothing but what the mappings say can exist for it, and a
//!   partner that answers the create with 409 Conflict (it holds our id already) is asked
//!   then. An object whose mapping points nowhere (the partner answered 404, or it hangs under
//!   another parent) is found again the same way.
//! - **Idempotency keys**: every write carries `<event id>/<object>/<action>`, so a retried
//!   step repeats the same request and the partner can tell it from a change.
//! - **Deletes**: not found counts as deleted, and the object's mapping goes with it.

use std::collections::HashMap;

use sqlx::PgPool;

use super::client::{Call, is_not_found};
use crate::delivery::{Failure, FailureClass};
use crate::mappings::{Mapped, MappingChange, Mappings, TenantObjects};

/// An object on the partner, as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The partner's id.
    pub id: String,
    /// The partner's id of the object it belongs to (a price's item), if any.
    pub parent: Option<String>,
    /// Whether its fields already hold what the event says: no update is needed.
    pub current: bool,
}

/// One object type of a partner's API, bound to the event being handled: the calls the driver
/// makes. Each returns the partner's [`Failure`] as the client classified it.
pub trait ObjectApi: Sync {
    /// The object type's name in `integration_mappings` (e.g. `shop_item`).
    fn object_type(&self) -> &str;
    /// Its name in idempotency keys (e.g. `item`).
    fn key(&self) -> &str;

    /// The object whose external id is `our_id`, if the partner holds one.
    fn find(
        &self,
        call: &Call,
        our_id: &str,
    ) -> impl Future<Output = Result<Option<Remote>, Failure>> + Send;

    /// Creates the object from the event, under `parent` (the partner's id of the object it
    /// depends on), carrying `our_id` as its external id.
    fn create(
        &self,
        call: &Call,
        our_id: &str,
        parent: Option<&str>,
    ) -> impl Future<Output = Result<Remote, Failure>> + Send;

    /// Replaces the fields of the partner's object `id` with the event's.
    fn update(&self, call: &Call, id: &str)
    -> impl Future<Output = Result<Remote, Failure>> + Send;

    /// Deletes the partner's object `id`.
    fn delete(&self, call: &Call, id: &str) -> impl Future<Output = Result<(), Failure>> + Send;
}

/// What an event's handling starts from: the tenant's switch and the mappings of our id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    /// Whether the tenant has the integration on.
    pub enabled: bool,
    /// Per object type, what our id maps to.
    pub mapped: HashMap<String, Mapped>,
}

impl Known {
    /// What `our_id`'s object of `object_type` maps to.
    pub fn of(&self, object_type: &str) -> Option<&Mapped> {
        self.mapped.get(object_type)
    }
}

/// What [`Driver::known`] reads of an event's tenant and our id `$3`, in one round trip: one
/// row per object type `$4` with its mapping if any, each row carrying the tenant's switch.
///
/// The switch is an uncorrelated subquery, read once. (Half the planning time of a join on
/// `= ANY`, and Ferry's sessions plan every execution: see `store::session`.) Each mapping is a
/// probe of the unique index in a subquery the planner cannot merge into a join (its `LIMIT`):
/// as a plain join, on a table not yet analyzed, it read every mapping of the tenant and
/// filtered them (4 ms at 4,000, not 0.03), the cliff `consumer::ledger::RECORDED_IDS`
/// describes.
pub const KNOWN: &str = "SELECT coalesce((SELECT integration_enabled FROM tenants \
                       WHERE integration = $1 AND tenant_id = $2), false), \
             o.object_type, m.foreign_id, m.created_by \
     FROM unnest($4::text[]) AS o(object_type) \
     LEFT JOIN LATERAL (SELECT foreign_id, created_by FROM integration_mappings \
          WHERE integration = $1 AND object_type = o.object_type \
            AND tenant_id = $2 AND local_id = $3 LIMIT 1) AS m ON true";

/// What loads a tenant's view ([`crate::mappings::views`]): its switch, and at most `$3` of its
/// mappings, in one round trip (one row with the switch alone when it has none). The mappings
/// are read through the leading `(integration, tenant_id)` of the table's key, which the
/// planner takes even on a table without statistics (`ledger`'s test of the per-record lookups
/// checks it).
pub const LOAD: &str = "SELECT coalesce((SELECT integration_enabled FROM tenants \
                       WHERE integration = $1 AND tenant_id = $2), false), \
             m.object_type, m.local_id, m.foreign_id, m.created_by \
     FROM (VALUES (1)) AS one(x) \
     LEFT JOIN LATERAL (SELECT object_type, local_id, foreign_id, created_by \
          FROM integration_mappings WHERE integration = $1 AND tenant_id = $2 LIMIT $3) AS m \
     ON true";

/// The driver, for one event of one tenant.
pub struct Driver<'a> {
    /// Where the mappings and the tenants' switches are.
    pub pool: &'a PgPool,
    /// The integration's name in `integration_mappings`.
    pub integration: &'a str,
    /// Where learnt mappings are staged.
    pub mappings: &'a Mappings,
    /// The tenant.
    pub tenant: &'a str,
    /// The event's id, the first part of every idempotency key.
    pub event_id: uuid::Uuid,
    /// Whose call it is and which event it serves.
    pub call: &'a Call,
    /// Whether an earlier handling of the event may have written to the partner: look for our
    /// id before creating.
    pub heal: bool,
}

impl<'a> Driver<'a> {
    /// What the event's handling starts from: the tenant's switch and the mappings of
    /// `our_id` for each of `object_types`, with what is staged over them. From the tenant's
    /// view when it is held ([`crate::mappings::views`]); else the view is loaded with one
    /// query, or, for a tenant too large to hold, this object's rows are read ([`KNOWN`]).
    pub async fn known(&self, our_id: &str, object_types: &[&str]) -> Result<Known, Failure> {
        let (tenant, staged) = (self.tenant, self.mappings);
        if let Some(seen) = staged.seen(tenant, object_types, our_id) {
            return Ok(Known {
                enabled: seen.enabled,
                mapped: seen.mapped.into_iter().collect(),
            });
        }
        // The overlay first: a version that leaves it between the two reads was committed before
        // it left, so the query sees it; read the other way round, a batch committing in between
        // would hide a mapping from both.
        let staged: Vec<(&str, Option<Mapped>)> = object_types
            .iter()
            .filter_map(|o| Some((*o, staged.staged(tenant, o, our_id)?)))
            .collect();
        let loaded = match self.mappings.begin_load(tenant) {
            Some(limit) => self.load(limit, our_id, object_types).await?,
            None => None,
        };
        let mut known = match loaded {
            Some(known) => known,
            None => self.read_object(our_id, object_types).await?,
        };
        for (object_type, version) in staged {
            match version {
                Some(mapped) => known.mapped.insert(object_type.to_owned(), mapped),
                None => known.mapped.remove(object_type),
            };
        }
        Ok(known)
    }

    /// Reads the tenant's switch and at most `limit` of its mappings ([`LOAD`]) and hands them
    /// to its view; what they say of `our_id`, unless the tenant has more (then `None`).
    async fn load(
        &self,
        limit: usize,
        our_id: &str,
        object_types: &[&str],
    ) -> Result<Option<Known>, Failure> {
        type Row = (
            bool,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<uuid::Uuid>,
        );
        let rows: Vec<Row> = sqlx::query_as(LOAD)
            .bind(self.integration)
            .bind(self.tenant)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.pool)
            .await
            .map_err(db)?;
        let enabled = rows.first().is_some_and(|r| r.0);
        let mapped: Vec<(String, String, Mapped)> = rows
            .into_iter()
            .filter_map(|(_, object_type, local_id, foreign_id, created_by)| {
                let mapped = Mapped {
                    foreign_id: foreign_id?,
                    created_by,
                };
                Some((object_type?, local_id?, mapped))
            })
            .collect();
        let complete = mapped.len() < limit;
        let known = complete.then(|| Known {
            enabled,
            mapped: mapped
                .iter()
                .filter(|(o, l, _)| l == our_id && object_types.contains(&o.as_str()))
                .map(|(o, _, m)| (o.clone(), m.clone()))
                .collect(),
        });
        self.mappings.finish_load(self.tenant, enabled, mapped);
        Ok(known)
    }

    /// One query for the tenant's switch and `our_id`'s mappings ([`KNOWN`]), as durable.
    async fn read_object(&self, our_id: &str, object_types: &[&str]) -> Result<Known, Failure> {
        type Row = (bool, Option<String>, Option<String>, Option<uuid::Uuid>);
        let rows: Vec<Row> = sqlx::query_as(KNOWN)
            .bind(self.integration)
            .bind(self.tenant)
            .bind(our_id)
            // A row even for an integration without object types, for the switch.
            .bind(if object_types.is_empty() {
                &[""][..]
            } else {
                object_types
            })
            .fetch_all(self.pool)
            .await
            .map_err(db)?;
        let mut known = Known {
            enabled: rows.first().is_some_and(|r| r.0),
            mapped: HashMap::new(),
        };
        for (_, object_type, foreign_id, created_by) in rows {
            if let (Some(object_type), Some(foreign_id)) = (object_type, foreign_id) {
                let mapped = Mapped {
                    foreign_id,
                    created_by,
                };
                known.mapped.insert(object_type, mapped);
            }
        }
        Ok(known)
    }

    /// The tenant's objects of `object_type`, as mapped with what is staged over them, a page
    /// at a time: for a rollback.
    pub fn tenant_objects(&self, object_type: &'a str) -> TenantObjects<'a> {
        TenantObjects::new(
            self.pool,
            self.mappings,
            (self.integration, self.tenant),
            object_type,
        )
    }

    /// Brings `our_id`'s object to the event's state and returns the partner's id: the mapped
    /// object updated; else the one the partner holds under our id (updated if it differs);
    /// else a new one. `mapped` is the mapping as read when the event's handling began;
    /// `parent` the partner's id of the object this one belongs to. A mapping learnt here is
    /// staged before this returns.
    pub async fn upsert<O: ObjectApi>(
        &self,
        api: &O,
        our_id: &str,
        mapped: Option<&Mapped>,
        parent: Option<&str>,
    ) -> Result<String, Failure> {
        let belongs = |r: &Remote| parent.is_none() || r.parent.as_deref() == parent;
        if let Some(m) = mapped {
            // Handled again after its settlement was lost: this event created the object, and
            // the events after it (handled again behind it, their repeats replayed by the
            // partner without effect) may have changed it since. Bringing it back to this
            // event's state would undo theirs.
            if m.created_by == Some(self.event_id) {
                return Ok(m.foreign_id.clone());
            }
            self.creation_durable(api.object_type(), our_id).await?;
            let id = m.foreign_id.as_str();
            match api.update(&self.keyed_on(api, "update", id), id).await {
                Ok(remote) if belongs(&remote) => return Ok(remote.id),
                // Gone, or under another parent: found again below.
                Ok(_) => {}
                Err(f) if is_not_found(&f) => {}
                Err(f) => return Err(f),
            }
        }
        // A mapping that pointed nowhere is healed whatever the attempt.
        let look_first = self.heal || mapped.is_some();
        let found = match look_first {
            true => api.find(self.call, our_id).await?,
            false => None,
        };
        let id = match found {
            Some(found) if belongs(&found) => {
                if !found.current {
                    api.update(&self.keyed_on(api, "update", &found.id), &found.id)
                        .await?;
                }
                found.id
            }
            _ => return self.create(api, our_id, parent, look_first).await,
        };
        if mapped.map(|m| m.foreign_id.as_str()) != Some(id.as_str()) {
            self.stage(api.object_type(), our_id, Some((&id, false)));
        }
        Ok(id)
    }

    /// Creates `our_id`'s object and stages its mapping. A partner that refuses the create
    /// with 409 Conflict holds our id already: when no find came first, it is looked for.
    async fn create<O: ObjectApi>(
        &self,
        api: &O,
        our_id: &str,
        parent: Option<&str>,
        looked: bool,
    ) -> Result<String, Failure> {
        let created = match api.create(&self.keyed(api, "create"), our_id, parent).await {
            Ok(created) => created.id,
            Err(f) if f.status == Some(409) && !looked => {
                let Some(found) = api.find(self.call, our_id).await? else {
                    return Err(f);
                };
                if !found.current {
                    api.update(&self.keyed_on(api, "update", &found.id), &found.id)
                        .await?;
                }
                self.stage(api.object_type(), our_id, Some((&found.id, false)));
                return Ok(found.id);
            }
            Err(f) => return Err(f),
        };
        self.stage(api.object_type(), our_id, Some((&created, true)));
        Ok(created)
    }

    /// Deletes `our_id`'s object (the mapped one, else, when an earlier handling may have
    /// created it, the one found by our id); not found counts as deleted; then its mapping.
    /// Children the partner deletes with it are the caller's to [`forget`](Self::forget).
    pub async fn delete<O: ObjectApi>(
        &self,
        api: &O,
        our_id: &str,
        mapped: Option<&Mapped>,
    ) -> Result<(), Failure> {
        let id = match mapped {
            Some(m) => {
                self.creation_durable(api.object_type(), our_id).await?;
                Some(m.foreign_id.clone())
            }
            None if self.heal => api.find(self.call, our_id).await?.map(|r| r.id),
            None => None,
        };
        if let Some(id) = id {
            match api.delete(&self.keyed_on(api, "delete", &id), &id).await {
                Err(f) if !is_not_found(&f) => return Err(f),
                _ => {}
            }
        }
        self.forget(api.object_type(), our_id);
        Ok(())
    }

    /// Waits until another event's creation of `our_id`'s object is durable, if it is staged
    /// ([`Mappings::creation_durable`] says why).
    async fn creation_durable(&self, object_type: &str, our_id: &str) -> Result<(), Failure> {
        self.mappings
            .creation_durable(
                (self.tenant, object_type, our_id),
                self.event_id,
                crate::mappings::CREATION_WAIT,
            )
            .await
            .map_err(|e| Failure::new(FailureClass::Retryable, e.to_string()))
    }

    /// Removes the mapping of `our_id`'s object of type `object_type` (staged): an object the
    /// partner deleted, or deleted with its parent.
    pub fn forget(&self, object_type: &str, our_id: &str) {
        self.stage(object_type, our_id, None);
    }

    /// The call with the idempotency key of this event's `action` on `api`'s object: the same
    /// on every retry of the event, so a lost answer is replayed, not done twice.
    fn keyed<O: ObjectApi>(&self, api: &O, action: &str) -> Call {
        self.call
            .keyed(format!("{}/{}/{action}", self.event_id, api.key()))
    }

    /// As [`Self::keyed`], for an `action` on the partner's object `id`: the key names the
    /// object, so an event handled again after the object it acted on was replaced acts on the
    /// new one rather than being answered with the old one's response. (A crash before a batch
    /// settles hands an update and the delete after it out again: the update, finding its
    /// object deleted, heals it back under the create's key, and the delete must then delete
    /// that one, not replay its first answer.)
    fn keyed_on<O: ObjectApi>(&self, api: &O, action: &str, id: &str) -> Call {
        self.call
            .keyed(format!("{}/{}/{action}/{id}", self.event_id, api.key()))
    }

    /// Stages a mapping of `local_id`'s object of `object_type`: to the partner's `id`
    /// (`created`: by this event), or removed.
    fn stage(&self, object_type: &str, local_id: &str, to: Option<(&str, bool)>) {
        let mapped = to.map(|(id, created)| Mapped {
            foreign_id: id.to_owned(),
            created_by: created.then_some(self.event_id),
        });
        let change = MappingChange {
            tenant: self.tenant.to_owned(),
            object_type: object_type.to_owned(),
            local_id: local_id.to_owned(),
            mapped,
        };
        self.mappings.stage(self.event_id, change);
    }
}

/// Our database failing is not the tenant's fault: retry it like a timeout.
pub fn db(e: sqlx::Error) -> Failure {
    Failure {
        class: FailureClass::Retryable,
        message: format!("postgres: {e}"),
        status: None,
        response: None,
        retry_after: None,
    }
}
