//! The wire contract: what our platform writes into the outbox and what lands in Kafka.
//!
//! One Kafka record per outbox row, exactly as Debezium's outbox `EventRouter` emits it:
//! key = tenant id, headers `id`, `eventType`, `aggregateType`, `aggregateId`, `traceparent`
//! (and `deliverBefore` where set), value = the payload column (protobuf bytes or JSON).
//! [`decode`] turns such a record into a typed [`OutboxEvent`] or a typed [`BadEvent`];
//! [`wire`] builds the record from an outbox row (what Ferry's relay produces).

pub mod decode;
pub mod wire;
pub mod writer;

use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use decode::{BadEvent, BadEventReason, RawRecord, decode};
pub use wire::{OutboxRow, WireRecord};

/// The protobuf messages of `proto/ferry/v1/events.proto`, generated at build time.
pub mod proto {
    #![allow(missing_docs, clippy::doc_markdown)]
    include!(concat!(env!("OUT_DIR"), "/ferry.v1.rs"));
}

/// Kafka header names of the wire contract, in one place for the encoder and the decoder.
pub mod header {
    /// The event's UUID (Debezium's default `id` header).
    pub const ID: &str = "id";
    /// The outbox `type` column.
    pub const EVENT_TYPE: &str = "eventType";
    /// The outbox `aggregatetype` column.
    pub const AGGREGATE_TYPE: &str = "aggregateType";
    /// The outbox `aggregateid` column.
    pub const AGGREGATE_ID: &str = "aggregateId";
    /// The writer's W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// The outbox `deliver_before` column (RFC 3339): past it the event is expired, never sent.
    pub const DELIVER_BEFORE: &str = "deliverBefore";
    /// Set by Ferry's relay on a row it could not send as-is (a payload over the broker's size
    /// limit, a row without tenant): the record carries the row's identity and this reason, in
    /// order, so the consumer records a bad event instead of the row vanishing.
    pub const REJECTED: &str = "ferryRejected";
}

/// A tenant of our platform: the Kafka key, the unit of ordering and of isolation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

/// Why a string is not a tenant id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantIdError {
    /// The string is empty (or only white space).
    #[error("tenant id is empty")]
    Empty,
    /// Longer than [`TenantId::MAX_LEN`] bytes.
    #[error("tenant id is {0} bytes long, the limit is {max}", max = TenantId::MAX_LEN)]
    TooLong(usize),
    /// Contains a control character (often a sign of a binary key read as text).
    #[error("tenant id contains a control character")]
    ControlCharacter,
}

impl TenantId {
    /// The longest tenant id accepted, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Validates and wraps a tenant id.
    pub fn new(id: impl Into<String>) -> Result<Self, TenantIdError> {
        let id = id.into();
        if id.trim().is_empty() {
            return Err(TenantIdError::Empty);
        }
        if id.len() > Self::MAX_LEN {
            return Err(TenantIdError::TooLong(id.len()));
        }
        if id.chars().any(char::is_control) {
            return Err(TenantIdError::ControlCharacter);
        }
        Ok(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The event types of the reference domain (the outbox `type` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// A product was created.
    ProductCreated,
    /// A product's fields changed.
    ProductUpdated,
    /// A product was deleted.
    ProductDeleted,
    /// The tenant switched the partner integration on.
    TenantIntegrationEnabled,
    /// The tenant switched the partner integration off.
    TenantIntegrationDisabled,
}

impl EventType {
    /// Every event type, for exhaustive tests and help texts.
    pub const ALL: [EventType; 5] = [
        EventType::ProductCreated,
        EventType::ProductUpdated,
        EventType::ProductDeleted,
        EventType::TenantIntegrationEnabled,
        EventType::TenantIntegrationDisabled,
    ];

    /// The name written in the outbox `type` column and the `eventType` header.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::ProductCreated => "ProductCreated",
            EventType::ProductUpdated => "ProductUpdated",
            EventType::ProductDeleted => "ProductDeleted",
            EventType::TenantIntegrationEnabled => "TenantIntegrationEnabled",
            EventType::TenantIntegrationDisabled => "TenantIntegrationDisabled",
        }
    }

    /// Parses the `type` column; `None` for a type this version of Ferry does not know.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The aggregate type the event belongs to (the outbox `aggregatetype` column).
    pub fn aggregate_type(self) -> &'static str {
        match self {
            EventType::ProductCreated | EventType::ProductUpdated | EventType::ProductDeleted => {
                "Product"
            }
            EventType::TenantIntegrationEnabled | EventType::TenantIntegrationDisabled => "Tenant",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decoded event payload, one variant per [`EventType`].
#[derive(Debug, Clone, PartialEq)]
pub enum EventPayload {
    /// See [`proto::ProductCreated`].
    ProductCreated(proto::ProductCreated),
    /// See [`proto::ProductUpdated`].
    ProductUpdated(proto::ProductUpdated),
    /// See [`proto::ProductDeleted`].
    ProductDeleted(proto::ProductDeleted),
    /// See [`proto::TenantIntegrationEnabled`].
    TenantIntegrationEnabled(proto::TenantIntegrationEnabled),
    /// See [`proto::TenantIntegrationDisabled`].
    TenantIntegrationDisabled(proto::TenantIntegrationDisabled),
}

impl EventPayload {
    /// The type of this payload.
    pub fn event_type(&self) -> EventType {
        match self {
            EventPayload::ProductCreated(_) => EventType::ProductCreated,
            EventPayload::ProductUpdated(_) => EventType::ProductUpdated,
            EventPayload::ProductDeleted(_) => EventType::ProductDeleted,
            EventPayload::TenantIntegrationEnabled(_) => EventType::TenantIntegrationEnabled,
            EventPayload::TenantIntegrationDisabled(_) => EventType::TenantIntegrationDisabled,
        }
    }

    /// The protobuf encoding: what our writer stores in the outbox `payload` column.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        use prost::Message;
        match self {
            EventPayload::ProductCreated(m) => m.encode_to_vec(),
            EventPayload::ProductUpdated(m) => m.encode_to_vec(),
            EventPayload::ProductDeleted(m) => m.encode_to_vec(),
            EventPayload::TenantIntegrationEnabled(m) => m.encode_to_vec(),
            EventPayload::TenantIntegrationDisabled(m) => m.encode_to_vec(),
        }
    }
}

/// How an event's payload arrived on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// Protobuf bytes (ByteArrayConverter, or base64 bytes inside a JsonConverter envelope).
    Protobuf,
    /// JSON (proto3 JSON mapping), bare, as a string, or inside a JsonConverter envelope.
    Json,
}

impl fmt::Display for PayloadFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PayloadFormat::Protobuf => "protobuf",
            PayloadFormat::Json => "JSON",
        })
    }
}

/// One outbox event, decoded from its Kafka record.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    /// The outbox row's id: the dedupe key and the partner's `Idempotency-Key`.
    pub id: Uuid,
    /// The tenant (the record key).
    pub tenant_id: TenantId,
    /// The outbox `aggregatetype`, where the record carries it.
    pub aggregate_type: Option<String>,
    /// The outbox `aggregateid`, where the record carries it.
    pub aggregate_id: Option<String>,
    /// The writer's W3C `traceparent`, when present and well formed.
    pub traceparent: Option<String>,
    /// Past this instant the event is expired: settled, never delivered late.
    pub deliver_before: Option<DateTime<Utc>>,
    /// The record's timestamp: the outbox commit time as the change feed saw it.
    pub occurred_at: Option<DateTime<Utc>>,
    /// How the payload was encoded on the wire.
    pub format: PayloadFormat,
    /// The typed payload; its variant is the event type.
    pub payload: EventPayload,
}

impl OutboxEvent {
    /// The event's type.
    pub fn event_type(&self) -> EventType {
        self.payload.event_type()
    }
}
