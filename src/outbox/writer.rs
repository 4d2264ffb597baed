//! The writer's side: how our application puts an event into the outbox, inside its own
//! transaction, so the change and its event commit or roll back together.
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {
//! use ferry::outbox::{TenantId, writer::{self, NewEvent}};
//! use ferry::shop::{EventPayload, proto};
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
//!
//! The payload is anything that says its type and gives its bytes ([`OutboxPayload`]): an
//! application's protobuf messages (the reference shop's [`crate::shop::EventPayload`]), JSON
//! of the application's own ([`JsonPayload`]), or Ferry's own events
//! ([`crate::outbox::control::Control`]).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::TenantId;

/// What an event carries, as the outbox stores it.
pub trait OutboxPayload {
    /// The event type (the `type` column, the `eventType` header).
    fn event_type(&self) -> &str;
    /// The aggregate's type (the `aggregatetype` column), e.g. `Product`.
    fn aggregate_type(&self) -> &str;
    /// The bytes of the `payload` column: protobuf, or UTF-8 JSON.
    fn to_bytes(&self) -> Vec<u8>;
}

/// A JSON payload of the application's own: its type names and its body, stored as UTF-8
/// JSON; the consumer hands it to the integration as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonPayload {
    /// The event type.
    pub event_type: String,
    /// The aggregate's type.
    pub aggregate_type: String,
    /// The body.
    pub body: serde_json::Value,
}

impl OutboxPayload for JsonPayload {
    fn event_type(&self) -> &str {
        &self.event_type
    }

    fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.body.to_string().into_bytes()
    }
}

/// An event to append to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent<P> {
    /// The event id; a time-ordered UUIDv7 by default.
    pub id: Uuid,
    /// The tenant: the Kafka key, the unit of order.
    pub tenant_id: TenantId,
    /// The aggregate's id (the product id).
    pub aggregate_id: String,
    /// The payload; it names the event type.
    pub payload: P,
    /// Past this instant the event must not be delivered.
    pub deliver_before: Option<DateTime<Utc>>,
    /// W3C trace context; [`NewEvent::new`] captures the current span's.
    pub traceparent: Option<String>,
    /// The one integration the event is for (a tenant's backfill), or `None`: every one.
    pub integration: Option<String>,
}

impl<P: OutboxPayload> NewEvent<P> {
    /// An event with a fresh id and the current span's trace context.
    pub fn new(tenant_id: TenantId, aggregate_id: impl Into<String>, payload: P) -> Self {
        NewEvent {
            id: Uuid::now_v7(),
            tenant_id,
            aggregate_id: aggregate_id.into(),
            payload,
            deliver_before: None,
            traceparent: current_traceparent(),
            integration: None,
        }
    }

    /// Addresses the event to the integration named `integration` alone.
    pub fn for_integration(mut self, integration: &str) -> Self {
        self.integration = Some(integration.to_owned());
        self
    }

    /// Sets the delivery deadline.
    pub fn deliver_before(mut self, deadline: DateTime<Utc>) -> Self {
        self.deliver_before = Some(deadline);
        self
    }
}

pub use crate::telemetry::current_traceparent;

/// Appends one event within the caller's transaction (pass `&mut tx`).
pub async fn append<P: OutboxPayload>(
    conn: &mut PgConnection,
    event: &NewEvent<P>,
) -> Result<Uuid, sqlx::Error> {
    append_many(conn, std::slice::from_ref(event)).await?;
    Ok(event.id)
}

/// Appends events in order with one statement, within the caller's transaction.
pub async fn append_many<P: OutboxPayload>(
    conn: &mut PgConnection,
    events: &[NewEvent<P>],
) -> Result<(), sqlx::Error> {
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
    let mut integrations = Vec::with_capacity(events.len());
    for e in events {
        ids.push(e.id);
        aggregate_types.push(e.payload.aggregate_type());
        aggregate_ids.push(e.aggregate_id.as_str());
        types.push(e.payload.event_type());
        payloads.push(e.payload.to_bytes());
        tenants.push(e.tenant_id.as_str());
        traceparents.push(e.traceparent.as_deref());
        deadlines.push(e.deliver_before);
        integrations.push(e.integration.as_deref());
    }
    // WITH ORDINALITY + ORDER BY: the rows reach the WAL, and so Kafka, in the given order.
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, tenant_id, traceparent, deliver_before, integration) \
         SELECT id, aggregatetype, aggregateid, type, payload, tenant_id, traceparent, deliver_before, integration \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::text[], \
                     $8::timestamptz[], $9::text[]) \
              WITH ORDINALITY AS e(id, aggregatetype, aggregateid, type, payload, tenant_id, traceparent, deliver_before, integration, n) \
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
    .bind(&integrations)
    .execute(conn)
    .await?;
    Ok(())
}
