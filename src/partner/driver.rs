//! The generic driver: what every REST integration does with an object type, written once. An
//! integration says how to call the partner for each of its object types ([`ObjectApi`]: find
//! by our id, create, update, delete); the driver does the rest:
//!
//! - **Mapping**: our id to the partner's, per tenant, integration and object type
//!   (`integration_mappings`), written as soon as it is learnt, so a retry after a later step
//!   failed starts from it.
//! - **Healing**: before anything is created, the partner is asked for the object that carries
//!   our id. A lost create answer, a lost mapping row, or a partner that ignores
//!   `Idempotency-Key` never makes a second object. An object whose mapping points nowhere (the
//!   partner answered 404, or it hangs under another parent) is found again the same way.
//! - **Idempotency keys**: every write carries `<event id>/<object>/<action>`, so a retried
//!   step repeats the same request and the partner can tell it from a change.
//! - **Deletes**: not found counts as deleted, and the object's mapping goes with it.

use sqlx::PgPool;

use super::client::{Call, is_not_found};
use crate::delivery::{Failure, FailureClass};

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

/// The driver, for one event of one tenant.
pub struct Driver<'a> {
    /// Where the mappings are.
    pub pool: &'a PgPool,
    /// The integration's name in `integration_mappings`.
    pub integration: &'a str,
    /// The tenant.
    pub tenant: &'a str,
    /// The event's id, the first part of every idempotency key.
    pub event_id: uuid::Uuid,
    /// Whose call it is and which event it serves.
    pub call: &'a Call,
}

impl Driver<'_> {
    /// Brings `our_id`'s object to the event's state and returns the partner's id: the mapped
    /// object updated; else the one the partner holds under our id (updated if it differs);
    /// else a new one. `mapped` is the mapping as read when the event's handling began;
    /// `parent` the partner's id of the object this one belongs to. A mapping learnt here is
    /// written before this returns.
    pub async fn upsert<O: ObjectApi>(
        &self,
        api: &O,
        our_id: &str,
        mapped: Option<&str>,
        parent: Option<&str>,
    ) -> Result<String, Failure> {
        let belongs = |r: &Remote| parent.is_none() || r.parent.as_deref() == parent;
        // Handled again after its settlement was lost: this event created the object, and the
        // events after it (handled again behind it, their repeats replayed by the partner
        // without effect) may have changed it since. Bringing it back to this event's state
        // would undo theirs.
        if let Some(id) = mapped
            && self.created_here(api.object_type(), our_id).await?
        {
            return Ok(id.to_owned());
        }
        if let Some(id) = mapped {
            match api.update(&self.keyed_on(api, "update", id), id).await {
                Ok(remote) if belongs(&remote) => return Ok(remote.id),
                // Gone, or under another parent: found again below.
                Ok(_) => {}
                Err(f) if is_not_found(&f) => {}
                Err(f) => return Err(f),
            }
        }
        let id = match api.find(self.call, our_id).await? {
            Some(found) if belongs(&found) => {
                if !found.current {
                    api.update(&self.keyed_on(api, "update", &found.id), &found.id)
                        .await?;
                }
                found.id
            }
            _ => {
                let created = api
                    .create(&self.keyed(api, "create"), our_id, parent)
                    .await?
                    .id;
                self.write_mapping(api.object_type(), our_id, &created, true)
                    .await?;
                return Ok(created);
            }
        };
        if mapped != Some(id.as_str()) {
            self.write_mapping(api.object_type(), our_id, &id, false)
                .await?;
        }
        Ok(id)
    }

    /// Deletes `our_id`'s object (the mapped one, else the one found by our id); not found
    /// counts as deleted; then its mapping. Children the partner deletes with it are the
    /// caller's to [`forget`](Self::forget).
    pub async fn delete<O: ObjectApi>(
        &self,
        api: &O,
        our_id: &str,
        mapped: Option<&str>,
    ) -> Result<(), Failure> {
        let id = match mapped {
            Some(id) => Some(id.to_owned()),
            None => api.find(self.call, our_id).await?.map(|r| r.id),
        };
        if let Some(id) = id {
            match api.delete(&self.keyed_on(api, "delete", &id), &id).await {
                Err(f) if !is_not_found(&f) => return Err(f),
                _ => {}
            }
        }
        self.forget(api.object_type(), our_id).await
    }

    /// Whether this event created `our_id`'s object of type `object_type`, as its mapping
    /// says: the event is being handled again.
    async fn created_here(&self, object_type: &str, our_id: &str) -> Result<bool, Failure> {
        let mapping = self.mapping(object_type, our_id).await?;
        Ok(mapping.and_then(|(_, by)| by) == Some(self.event_id))
    }

    /// The partner's id of `our_id`'s object of type `object_type`, as mapped so far.
    pub async fn mapped(&self, object_type: &str, our_id: &str) -> Result<Option<String>, Failure> {
        Ok(self.mapping(object_type, our_id).await?.map(|(id, _)| id))
    }

    /// The mapping of `our_id`'s object of type `object_type`: the partner's id, and the event
    /// that created the object when Ferry did.
    async fn mapping(
        &self,
        object_type: &str,
        our_id: &str,
    ) -> Result<Option<(String, Option<uuid::Uuid>)>, Failure> {
        sqlx::query_as(
            "SELECT foreign_id, created_by FROM integration_mappings \
             WHERE integration = $1 AND object_type = $2 AND tenant_id = $3 AND local_id = $4",
        )
        .bind(self.integration)
        .bind(object_type)
        .bind(self.tenant)
        .bind(our_id)
        .fetch_optional(self.pool)
        .await
        .map_err(db)
    }

    /// Removes the mapping of `our_id`'s object of type `object_type`: an object the partner
    /// deleted with its parent.
    pub async fn forget(&self, object_type: &str, our_id: &str) -> Result<(), Failure> {
        sqlx::query(
            "DELETE FROM integration_mappings \
             WHERE integration = $1 AND object_type = $2 AND tenant_id = $3 AND local_id = $4",
        )
        .bind(self.integration)
        .bind(object_type)
        .bind(self.tenant)
        .bind(our_id)
        .execute(self.pool)
        .await
        .map_err(db)?;
        Ok(())
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

    /// Upserts one mapping: one statement, atomic on its own.
    async fn write_mapping(
        &self,
        object_type: &str,
        local_id: &str,
        foreign_id: &str,
        created: bool,
    ) -> Result<(), Failure> {
        sqlx::query(
            "INSERT INTO integration_mappings (integration, object_type, local_id, foreign_id, tenant_id, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (integration, object_type, tenant_id, local_id) \
             DO UPDATE SET foreign_id = EXCLUDED.foreign_id, created_by = EXCLUDED.created_by, \
                           updated_at = now() \
             WHERE integration_mappings.foreign_id <> EXCLUDED.foreign_id",
        )
        .bind(self.integration)
        .bind(object_type)
        .bind(local_id)
        .bind(foreign_id)
        .bind(self.tenant)
        .bind(created.then_some(self.event_id))
        .execute(self.pool)
        .await
        .map_err(db)?;
        Ok(())
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
