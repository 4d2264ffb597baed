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

/// The protobuf messages of `proto/ferry/v1/events.proto` (Ferry's own events), generated at
/// build time.
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
    /// The outbox `integration` column, where set: the one integration the event is for (a
    /// tenant's backfill, an operator's replay). Every other integration records it as ignored.
    pub const INTEGRATION: &str = "integration";
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

/// The event types Ferry itself writes (`ferry tenant enable|disable`) and every integration
/// understands; every other type is the application's, known to its integration alone.
pub mod control {
    /// The tenant switched an integration on: its backfill follows in the outbox.
    pub const TENANT_ENABLED: &str = "TenantIntegrationEnabled";
    /// The tenant switched an integration off: the integration rolls back what it mapped.
    pub const TENANT_DISABLED: &str = "TenantIntegrationDisabled";
    /// The aggregate type of both.
    pub const AGGREGATE: &str = "Tenant";

    /// Whether `event_type` is one of Ferry's own.
    pub fn is_control(event_type: &str) -> bool {
        event_type == TENANT_ENABLED || event_type == TENANT_DISABLED
    }

    /// The integration one of Ferry's own events switches (both messages carry it as field 1),
    /// when it names one; `None` for any other event.
    pub fn integration_of(event: &super::OutboxEvent) -> Option<String> {
        use prost::Message;
        if !is_control(&event.event_type) {
            return None;
        }
        let named = match &event.payload {
            super::Payload::Protobuf(bytes) => {
                super::proto::TenantIntegrationEnabled::decode(bytes.as_slice())
                    .ok()?
                    .integration
            }
            super::Payload::Json(doc) => doc["integration"].as_str()?.to_owned(),
        };
        (!named.is_empty()).then_some(named)
    }

    /// One of Ferry's own events, to write.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Control {
        /// See [`TENANT_ENABLED`].
        Enabled(super::proto::TenantIntegrationEnabled),
        /// See [`TENANT_DISABLED`].
        Disabled(super::proto::TenantIntegrationDisabled),
    }

    impl Control {
        /// The event switching `integration` on.
        pub fn enabled(integration: &str) -> Self {
            Control::Enabled(super::proto::TenantIntegrationEnabled {
                integration: integration.to_owned(),
            })
        }

        /// The event switching `integration` off.
        pub fn disabled(integration: &str) -> Self {
            Control::Disabled(super::proto::TenantIntegrationDisabled {
                integration: integration.to_owned(),
            })
        }
    }

    impl super::writer::OutboxPayload for Control {
        fn event_type(&self) -> &str {
            match self {
                Control::Enabled(_) => TENANT_ENABLED,
                Control::Disabled(_) => TENANT_DISABLED,
            }
        }

        fn aggregate_type(&self) -> &str {
            AGGREGATE
        }

        fn to_bytes(&self) -> Vec<u8> {
            use prost::Message;
            match self {
                Control::Enabled(m) => m.encode_to_vec(),
                Control::Disabled(m) => m.encode_to_vec(),
            }
        }
    }
}

/// An event's payload as the change feed carried it, not yet read by any schema: the
/// integration knows what its event types hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Bytes (protobuf, or whatever binary encoding the application chose).
    Protobuf(Vec<u8>),
    /// A JSON object (from a `jsonb`, `json` or `text` payload column).
    Json(serde_json::Value),
}

impl Payload {
    /// How it arrived.
    pub fn format(&self) -> PayloadFormat {
        match self {
            Payload::Protobuf(_) => PayloadFormat::Protobuf,
            Payload::Json(_) => PayloadFormat::Json,
        }
    }
}

/// How an event's payload arrived on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// Bytes (ByteArrayConverter, or base64 bytes inside a JsonConverter envelope).
    Protobuf,
    /// A JSON object, bare, as a string, or inside a JsonConverter envelope.
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
    /// The outbox `type` column: what the event says happened. Any name; the integration
    /// decides what it does with it.
    pub event_type: String,
    /// The payload, as it arrived.
    pub payload: Payload,
    /// The one integration the event is for, when its row names one; `None`: for every one.
    pub integration: Option<String>,
}

impl OutboxEvent {
    /// Whether the integration named `integration` acts on the event: every one does, unless
    /// the event names another, in its `integration` header or, for one of Ferry's own
    /// switches written before that header existed, in its payload.
    pub fn is_for(&self, integration: &str) -> bool {
        match &self.integration {
            Some(named) => named == integration,
            None => control::integration_of(self).is_none_or(|named| named == integration),
        }
    }

    /// The event's type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// How the payload arrived.
    pub fn format(&self) -> PayloadFormat {
        self.payload.format()
    }
}
