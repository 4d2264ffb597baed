//! The writer's side: how our application puts an event into the outbox, inside its own
//! transaction, so the change and its event commit or roll back together.
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {
//! use ferry::outbox::{EventPayload, TenantId, proto, writer::{self, NewEvent}};
//! let mut tx = pool.begin().await?;
//! // ... the application's own writes on `tx` ...
//! let event = NewEvent::new(
//!     TenantId::new("acme").unwrap(),
//!     "5d2c1f8e-3b7a-4c1e-9f0a-7e6d5c4b3a21",
//!     EventPayload::ProductDeleted(proto::ProductDeleted {
//!         product_id: "5d2c1f8e-3b7a-4c1e-9f0a-7e6d5c4b3a21".into(),
//!     }),
//! );
//! writer::append(&mut tx, &event).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{EventPayload, TenantId};

/// An event to append to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The event id; a time-ordered UUIDv7 by default.
    pub id: Uuid,
    /// The tenant: the Kafka key, the unit of order.
    pub tenant_id: TenantId,
    /// The aggregate's id (the product id).
    pub aggregate_id: String,
    /// The payload; its variant names the event type.
    pub payload: EventPayload,
    /// Past this instant the event must not be delivered.
    pub deliver_before: Option<DateTime<Utc>>,
    /// W3C trace context; [`NewEvent::new`] captures the current span's.
    pub traceparent: Option<String>,
}

impl NewEvent {
    /// An event with a fresh id and the current span's trace context.
    pub fn new(
        tenant_id: TenantId,
        aggregate_id: impl Into<String>,
        payload: EventPayload,
    ) -> Self {
        NewEvent {
            id: Uuid::now_v7(),
            tenant_id,
            aggregate_id: aggregate_id.into(),
            payload,
            deliver_before: None,
            traceparent: current_traceparent(),
        }
    }

    /// Sets the delivery deadline.
    pub fn deliver_before(mut self, deadline: DateTime<Utc>) -> Self {
        self.deliver_before = Some(deadline);
        self
    }
}

pub use crate::telemetry::current_traceparent;

/// Appends one event within the caller's transaction (pass `&mut tx`).
pub async fn append(conn: &mut PgConnection, event: &NewEvent) -> Result<Uuid, sqlx::Error> {
    append_many(conn, std::slice::from_ref(event)).await?;
    Ok(event.id)
}

/// Appends events in order with one statement, within the caller's transaction.
pub async fn append_many(conn: &mut PgConnection, events: &[NewEvent]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(events.len());
    let mut aggregate_types = Vec::with_capacity(events.len());
    let mut aggregate_ids = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    let mut tenants = Vec::with_capacity(events.len());
    let mut traceparents = Vec::with_capacity(events.len());
    let mut deadlines = Vec::with_capacity(events.len());
    for e in events {
        let event_type = e.payload.event_type();
        ids.push(e.id);
        aggregate_types.push(event_type.aggregate_type());
        aggregate_ids.push(e.aggregate_id.as_str());
        types.push(event_type.as_str());
        payloads.push(e.payload.encode_to_vec());
        tenants.push(e.tenant_id.as_str());
        traceparents.push(e.traceparent.as_deref());
        deadlines.push(e.deliver_before);
    }
    // WITH ORDINALITY + ORDER BY: the rows reach the WAL, and so Kafka, in the given order.
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, tenant_id, traceparent, deliver_before) \
         SELECT id, aggregatetype, aggregateid, type, payload, tenant_id, traceparent, deliver_before \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::text[], $8::timestamptz[]) \
              WITH ORDINALITY AS e(id, aggregatetype, aggregateid, type, payload, tenant_id, traceparent, deliver_before, n) \
         ORDER BY n",
    )
    .bind(&ids)
    .bind(&aggregate_types)
    .bind(&aggregate_ids)
    .bind(&types)
    .bind(&payloads)
    .bind(&tenants)
    .bind(&traceparents)
    .bind(&deadlines)
    .execute(conn)
    .await?;
    Ok(())
}
