//! The decoder: a Kafka record (key, headers, value) in, a typed [`OutboxEvent`] or a typed
//! [`BadEvent`] out. Pure: no Kafka client types, no I/O, so every shape is unit-tested.
//!
//! Accepted shapes (everything Debezium's outbox `EventRouter` emits with its usual converters):
//! - key: the raw tenant id (StringConverter), a JSON string or number (JsonConverter without
//!   schemas), or a JsonConverter envelope `{"schema":…,"payload":"tenant"}`;
//! - header values: raw text (SimpleHeaderConverter), JSON-quoted, or a JsonConverter envelope;
//! - value: protobuf bytes (ByteArrayConverter); a JSON object (StringConverter on a json
//!   column, or JsonConverter with `table.expand.json.payload`); a JSON string holding JSON
//!   text or base64 protobuf (JsonConverter without schemas); or a JsonConverter envelope whose
//!   `payload` is the object (`expand.json.payload`), a string of JSON text, or base64 bytes;
//! - the EventRouter's envelope placement (`table.fields.additional.placement=type:envelope:
//!   eventType`): a value that is a struct of `payload` and the placed fields (inside a
//!   JsonConverter envelope with schemas on); the placed fields stand in for headers the
//!   record does not carry (a header wins), and the payload is decoded as above.
//!
//! JSON is tried before protobuf: a protobuf message of our schema never starts with `{`, and
//! bytes that parse as a whole JSON document are not a plausible protobuf message of it.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{OutboxEvent, Payload, PayloadFormat, TenantId, TenantIdError, header};

/// A Kafka record as the decoder sees it: borrowed bytes, no client library types.
#[derive(Debug, Clone, Default)]
pub struct RawRecord<'a> {
    /// The record key (the tenant id).
    pub key: Option<&'a [u8]>,
    /// The headers in record order; a name may repeat (the last one wins, as Kafka's
    /// `lastHeader`).
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
    /// The record value (the payload); `None` for a tombstone.
    pub value: Option<&'a [u8]>,
    /// The record timestamp in milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
}

impl<'a> RawRecord<'a> {
    fn last_header(&self, name: &str) -> Option<Option<&'a [u8]>> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

/// A record that is not a valid event of the wire contract. It carries whatever identity could
/// still be read, so the consumer can pause the right tenant and record the right event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("bad event (tenant {tenant}, id {id}): {reason}",
    tenant = tenant_id.as_ref().map_or("unknown", TenantId::as_str),
    id = event_id.map_or_else(|| "unknown".to_owned(), |id| id.to_string()))]
pub struct BadEvent {
    /// What is wrong.
    pub reason: BadEventReason,
    /// The tenant, when the key was readable.
    pub tenant_id: Option<TenantId>,
    /// The event id, when the `id` header was readable.
    pub event_id: Option<Uuid>,
    /// The `eventType` header as written, when present.
    pub event_type: Option<String>,
}

/// Why a record is a [`BadEvent`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadEventReason {
    /// The record has no key, so no tenant.
    #[error("the record has no key (the tenant id)")]
    MissingKey,
    /// The relay could not send the outbox row as-is and sent this marker in its place.
    #[error("the relay rejected the outbox row: {0}")]
    RejectedByRelay(String),
    /// The key is not a usable tenant id.
    #[error("the key is not a valid tenant id: {0}")]
    InvalidKey(String),
    /// A required header is absent.
    #[error("the `{0}` header is missing")]
    MissingHeader(&'static str),
    /// A header is present but unreadable.
    #[error("the `{name}` header is invalid: {reason}")]
    InvalidHeader {
        /// The header name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The `eventType` is not one the integration knows.
    #[error("unknown event type `{0}`")]
    UnknownEventType(String),
    /// The record has no value (a tombstone), so no payload.
    #[error("the record has no value (a tombstone): the event has no payload")]
    MissingPayload,
    /// The payload bytes do not decode.
    #[error("the {event_type} payload is not valid {format}: {detail}")]
    UndecodablePayload {
        /// The event type the payload was decoded as (boxed: a bad event stays small).
        event_type: Box<str>,
        /// The encoding tried.
        format: PayloadFormat,
        /// The decoder's message.
        detail: String,
    },
    /// The payload decodes but misses a required field.
    #[error("the {event_type} payload is invalid: {detail}")]
    InvalidPayload {
        /// The event type.
        event_type: Box<str>,
        /// What is missing or wrong.
        detail: String,
    },
}

impl BadEventReason {
    /// A stable, machine-readable code for storage, metrics and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            BadEventReason::MissingKey => "missing_key",
            BadEventReason::RejectedByRelay(_) => "rejected_by_relay",
            BadEventReason::InvalidKey(_) => "invalid_key",
            BadEventReason::MissingHeader(_) => "missing_header",
            BadEventReason::InvalidHeader { .. } => "invalid_header",
            BadEventReason::UnknownEventType(_) => "unknown_event_type",
            BadEventReason::MissingPayload => "missing_payload",
            BadEventReason::UndecodablePayload { .. } => "undecodable_payload",
            BadEventReason::InvalidPayload { .. } => "invalid_payload",
        }
    }
}

/// Decodes one record of the wire contract.
pub fn decode(record: &RawRecord<'_>) -> Result<OutboxEvent, BadEvent> {
    // Read the identity first, whatever else is wrong, so a bad event still names its tenant
    // and id where it can.
    let tenant = tenant_from_key(record.key);
    let fields = Fields::of(record);
    let id = event_id(&fields);
    let event_type_text = fields.text(header::EVENT_TYPE);

    let mut bad = BadEvent {
        reason: BadEventReason::MissingKey,
        tenant_id: tenant.as_ref().ok().cloned(),
        event_id: id.as_ref().ok().copied(),
        event_type: event_type_text.as_ref().ok().cloned().flatten(),
    };
    let fail = |bad: &mut BadEvent, reason| {
        bad.reason = reason;
        Err(bad.clone())
    };

    if let Ok(Some(reason)) = fields.text(header::REJECTED) {
        return fail(&mut bad, BadEventReason::RejectedByRelay(reason));
    }
    let tenant_id = match tenant {
        Ok(t) => t,
        Err(reason) => return fail(&mut bad, reason),
    };
    let id = match id {
        Ok(id) => id,
        Err(reason) => return fail(&mut bad, reason),
    };
    let event_type = match event_type_text {
        Ok(Some(name)) if !name.trim().is_empty() => name,
        Ok(_) => return fail(&mut bad, BadEventReason::MissingHeader(header::EVENT_TYPE)),
        Err(reason) => return fail(&mut bad, reason),
    };
    let deliver_before = match fields.text(header::DELIVER_BEFORE) {
        Ok(None) => None,
        Ok(Some(text)) => match DateTime::parse_from_rfc3339(&text) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(e) => {
                return fail(
                    &mut bad,
                    BadEventReason::InvalidHeader {
                        name: header::DELIVER_BEFORE,
                        reason: format!("`{text}` is not an RFC 3339 time: {e}"),
                    },
                );
            }
        },
        Err(reason) => return fail(&mut bad, reason),
    };
    let decoded = match &fields.envelope {
        Some(envelope) => envelope_payload(envelope.payload.clone(), &event_type),
        None => payload(record.value, &event_type),
    };
    let payload = match decoded {
        Ok(p) => p,
        Err(reason) => return fail(&mut bad, reason),
    };

    // Optional headers never fail an event: tracing is best effort (W3C says to ignore a
    // malformed traceparent), and the aggregate headers are informational.
    let optional = |name| fields.text(name).ok().flatten();
    Ok(OutboxEvent {
        id,
        tenant_id,
        aggregate_type: optional(header::AGGREGATE_TYPE),
        aggregate_id: optional(header::AGGREGATE_ID),
        traceparent: optional(header::TRACEPARENT).filter(|t| is_valid_traceparent(t)),
        deliver_before,
        occurred_at: record
            .timestamp_ms
            .and_then(DateTime::<Utc>::from_timestamp_millis),
        event_type,
        payload,
        integration: optional(header::INTEGRATION).filter(|i| !i.is_empty()),
    })
}

fn tenant_from_key(key: Option<&[u8]>) -> Result<TenantId, BadEventReason> {
    let key = match key {
        None | Some([]) => return Err(BadEventReason::MissingKey),
        Some(k) => k,
    };
    let text = std::str::from_utf8(key)
        .map_err(|_| BadEventReason::InvalidKey("the key is not UTF-8 text".to_owned()))?;
    let tenant = match unwrap_json_scalar(text) {
        Ok(Some(inner)) => inner,
        Ok(None) => text.to_owned(),
        Err(what) => return Err(BadEventReason::InvalidKey(what)),
    };
    TenantId::new(tenant).map_err(|e: TenantIdError| BadEventReason::InvalidKey(e.to_string()))
}

fn event_id(fields: &Fields<'_, '_>) -> Result<Uuid, BadEventReason> {
    let text = fields
        .text(header::ID)?
        .ok_or(BadEventReason::MissingHeader(header::ID))?;
    Uuid::parse_str(text.trim()).map_err(|e| BadEventReason::InvalidHeader {
        name: header::ID,
        reason: format!("`{text}` is not a UUID: {e}"),
    })
}

/// The text of a header, unwrapped from JSON quoting or a JsonConverter envelope. `Ok(None)`
/// when the header is absent or null.
fn header_text(
    record: &RawRecord<'_>,
    name: &'static str,
) -> Result<Option<String>, BadEventReason> {
    let Some(value) = record.last_header(name) else {
        return Ok(None);
    };
    let Some(bytes) = value else {
        return Ok(None);
    };
    let text = std::str::from_utf8(bytes).map_err(|_| BadEventReason::InvalidHeader {
        name,
        reason: "the value is not UTF-8 text".to_owned(),
    })?;
    match unwrap_json_scalar(text) {
        Ok(Some(inner)) => Ok(Some(inner)),
        Ok(None) if text == "null" => Ok(None),
        Ok(None) => Ok(Some(text.to_owned())),
        Err(reason) => Err(BadEventReason::InvalidHeader { name, reason }),
    }
}

/// If `text` is a JSON string, a JSON number, or a JsonConverter envelope around one, returns
/// the scalar as text. `Ok(None)` when `text` is not such JSON (so it is taken raw).
fn unwrap_json_scalar(text: &str) -> Result<Option<String>, String> {
    let trimmed = text.trim_start();
    if !(trimmed.starts_with('"') || trimmed.starts_with('{')) {
        // Raw text. A bare number is kept raw too: "42" means 42 in either reading.
        return Ok(None);
    }
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Ok(None);
    };
    let scalar = match value {
        Value::Object(mut map) if is_envelope(&map) => map.remove("payload").unwrap_or(Value::Null),
        other => other,
    };
    match scalar {
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Null => Ok(None),
        Value::Object(_) => Ok(None),
        other => Err(format!("expected text, found JSON {other}")),
    }
}

/// A Kafka Connect JsonConverter envelope: exactly `schema` and `payload`.
fn is_envelope(map: &serde_json::Map<String, Value>) -> bool {
    map.len() == 2 && map.contains_key("schema") && map.contains_key("payload")
}

/// Where the contract's named fields are read: the record's headers, else the EventRouter's
/// envelope fields.
struct Fields<'r, 'a> {
    record: &'r RawRecord<'a>,
    envelope: Option<RouterEnvelope>,
}

/// The EventRouter's envelope placement: the payload and the fields placed beside it.
struct RouterEnvelope {
    fields: serde_json::Map<String, Value>,
    /// The payload, in a JsonConverter envelope naming its type when the schema did.
    payload: Value,
}

impl<'r, 'a> Fields<'r, 'a> {
    fn of(record: &'r RawRecord<'a>) -> Self {
        Fields {
            record,
            envelope: router_envelope(record.value),
        }
    }

    /// The text of field `name`: its header, else the envelope's field of that name.
    fn text(&self, name: &'static str) -> Result<Option<String>, BadEventReason> {
        match header_text(self.record, name)? {
            Some(text) => Ok(Some(text)),
            None => Ok(self
                .envelope
                .as_ref()
                .and_then(|e| e.fields.get(name))
                .and_then(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })),
        }
    }
}

/// The value as the EventRouter's envelope placement writes it, if it is one: an object of
/// `payload` and the placed fields, every one a scalar (they are columns of the outbox row) and
/// at least one a field of the contract, possibly inside a JsonConverter envelope.
fn router_envelope(value: Option<&[u8]>) -> Option<RouterEnvelope> {
    let Value::Object(mut map) = json_document(value?)? else {
        return None;
    };
    let mut payload_type = None;
    if is_envelope(&map) {
        let schema = map.remove("schema");
        let Some(Value::Object(inner)) = map.remove("payload") else {
            return None;
        };
        payload_type = schema.as_ref().and_then(|s| field_type(s, "payload"));
        map = inner;
    }
    // A payload of the application's own with a field named `payload` is told apart by the
    // placed fields: scalars, and at least one of them a field of the contract.
    const CONTRACT: [&str; 7] = [
        header::ID,
        header::EVENT_TYPE,
        header::AGGREGATE_TYPE,
        header::AGGREGATE_ID,
        header::TRACEPARENT,
        header::DELIVER_BEFORE,
        header::INTEGRATION,
    ];
    let placed = map.contains_key("payload")
        && map.keys().any(|k| CONTRACT.contains(&k.as_str()))
        && map
            .iter()
            .all(|(k, v)| k == "payload" || !(v.is_object() || v.is_array()));
    if !placed {
        return None;
    }
    let inner = map.remove("payload")?;
    let payload = match payload_type {
        Some(t) => serde_json::json!({"schema": {"type": t}, "payload": inner}),
        None => inner,
    };
    Some(RouterEnvelope {
        fields: map,
        payload,
    })
}

/// The type a Connect struct schema gives its field `name`.
fn field_type(schema: &Value, name: &str) -> Option<String> {
    schema
        .get("fields")?
        .as_array()?
        .iter()
        .find(|f| f.get("field").and_then(Value::as_str) == Some(name))?
        .get("type")?
        .as_str()
        .map(str::to_owned)
}

/// The payload of an EventRouter envelope.
fn envelope_payload(payload: Value, event_type: &str) -> Result<Payload, BadEventReason> {
    match payload {
        Value::Null => Err(BadEventReason::MissingPayload),
        payload => payload_from_json_value(payload, event_type),
    }
}

fn payload(value: Option<&[u8]>, event_type: &str) -> Result<Payload, BadEventReason> {
    let bytes = match value {
        None => return Err(BadEventReason::MissingPayload),
        Some(b) => b,
    };
    match json_document(bytes) {
        Some(doc) => payload_from_json_value(doc, event_type),
        None => Ok(Payload::Protobuf(bytes.to_vec())),
    }
}

/// Parses `bytes` as a JSON object or string, the only JSON documents a payload can be.
fn json_document(bytes: &[u8]) -> Option<Value> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' && *first != b'"' {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

/// The payload inside JSON: an object is the payload; a JsonConverter envelope is unwrapped
/// (base64 when its schema says `bytes`); a string holds JSON text or base64 bytes.
fn payload_from_json_value(doc: Value, event_type: &str) -> Result<Payload, BadEventReason> {
    let undecodable = |format, detail: String| BadEventReason::UndecodablePayload {
        event_type: event_type.into(),
        format,
        detail,
    };
    let base64 = |text: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(text.trim().as_bytes())
            .map(Payload::Protobuf)
    };
    match doc {
        Value::Object(mut map) if is_envelope(&map) => {
            let bytes_schema = map
                .get("schema")
                .and_then(|s| s.get("type"))
                .and_then(Value::as_str)
                == Some("bytes");
            match map.remove("payload").unwrap_or(Value::Null) {
                Value::Null => Err(BadEventReason::MissingPayload),
                Value::String(b64) if bytes_schema => base64(&b64)
                    .map_err(|e| undecodable(PayloadFormat::Protobuf, format!("bad base64: {e}"))),
                inner => payload_from_json_value(inner, event_type),
            }
        }
        Value::Object(_) => Ok(Payload::Json(doc)),
        // A string holds JSON text (a string column through JsonConverter) or base64 bytes (a
        // bytea column through JsonConverter without schemas).
        Value::String(text) => match serde_json::from_str::<Value>(&text) {
            Ok(inner @ Value::Object(_)) => payload_from_json_value(inner, event_type),
            _ => base64(&text).map_err(|_| {
                undecodable(
                    PayloadFormat::Json,
                    "a JSON string that holds neither a JSON object nor base64 bytes".to_owned(),
                )
            }),
        },
        other => Err(undecodable(
            PayloadFormat::Json,
            format!("expected a JSON object, found {}", json_kind(&other)),
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, ids not all zero (W3C Trace Context).
fn is_valid_traceparent(t: &str) -> bool {
    let parts: Vec<&str> = t.trim().split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shop::tests::product;
    use crate::shop::{EventPayload, proto};

    const ID: &str = "0b6c6f0e-2f4a-4c6e-9a51-3f1f0c2d9e11";

    fn record<'a>(
        key: Option<&'a [u8]>,
        headers: &[(&'a str, &'a [u8])],
        value: Option<&'a [u8]>,
    ) -> RawRecord<'a> {
        RawRecord {
            key,
            headers: headers.iter().map(|(n, v)| (*n, Some(*v))).collect(),
            value,
            timestamp_ms: Some(1_764_000_000_000),
        }
    }

    fn created_bytes() -> Vec<u8> {
        EventPayload::ProductCreated(proto::ProductCreated {
            product: Some(product("p-1")),
        })
        .encode_to_vec()
    }

    #[test]
    fn protobuf_value_decodes() {
        let value = created_bytes();
        let r = record(
            Some(b"acme"),
            &[("id", ID.as_bytes()), ("eventType", b"ProductCreated")],
            Some(&value),
        );
        let e = decode(&r).unwrap();
        assert_eq!(e.tenant_id.as_str(), "acme");
        assert_eq!(e.id.to_string(), ID);
        assert_eq!(e.event_type, "ProductCreated");
        assert_eq!(e.payload, Payload::Protobuf(value.clone()));
        assert_eq!(e.occurred_at.unwrap().timestamp_millis(), 1_764_000_000_000);
    }

    #[test]
    fn json_key_and_header_forms_unwrap() {
        let value = created_bytes();
        for key in [
            &b"acme"[..],
            br#""acme""#,
            br#"{"schema":{"type":"string","optional":false},"payload":"acme"}"#,
        ] {
            for id in [
                ID.to_owned(),
                format!("\"{ID}\""),
                format!(r#"{{"schema":{{"type":"string"}},"payload":"{ID}"}}"#),
            ] {
                let r = record(
                    Some(key),
                    &[("id", id.as_bytes()), ("eventType", br#""ProductCreated""#)],
                    Some(&value),
                );
                let e = decode(&r).unwrap_or_else(|e| panic!("key {key:?} id {id}: {e}"));
                assert_eq!(e.tenant_id.as_str(), "acme");
                assert_eq!(e.id.to_string(), ID);
            }
        }
    }

    #[test]
    fn numeric_tenant_keys_are_text() {
        let value = created_bytes();
        for key in [
            &b"42"[..],
            b"42",
            br#"{"schema":{"type":"int64"},"payload":42}"#,
        ] {
            let r = record(
                Some(key),
                &[("id", ID.as_bytes()), ("eventType", b"ProductCreated")],
                Some(&value),
            );
            assert_eq!(decode(&r).unwrap().tenant_id.as_str(), "42");
        }
    }

    #[test]
    fn identity_is_kept_on_a_bad_payload() {
        let r = record(
            Some(b"acme"),
            &[("id", ID.as_bytes()), ("eventType", b"ProductCreated")],
            Some(br#"{"schema":{"type":"bytes"},"payload":"%%%"}"#),
        );
        let bad = decode(&r).unwrap_err();
        assert_eq!(bad.tenant_id.unwrap().as_str(), "acme");
        assert_eq!(bad.event_id.unwrap().to_string(), ID);
        assert_eq!(bad.event_type.as_deref(), Some("ProductCreated"));
        assert_eq!(bad.reason.code(), "undecodable_payload");
    }

    #[test]
    fn malformed_traceparent_is_dropped_not_fatal() {
        let value = created_bytes();
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for (tp, kept) in [
            (good, true),
            ("garbage", false),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                false,
            ),
        ] {
            let r = record(
                Some(b"acme"),
                &[
                    ("id", ID.as_bytes()),
                    ("eventType", b"ProductCreated"),
                    ("traceparent", tp.as_bytes()),
                ],
                Some(&value),
            );
            assert_eq!(decode(&r).unwrap().traceparent.is_some(), kept, "{tp}");
        }
    }

    #[test]
    fn last_header_wins() {
        let value = created_bytes();
        let r = record(
            Some(b"acme"),
            &[
                ("id", b"not-a-uuid"),
                ("id", ID.as_bytes()),
                ("eventType", b"ProductCreated"),
            ],
            Some(&value),
        );
        assert_eq!(decode(&r).unwrap().id.to_string(), ID);
    }

    #[test]
    fn each_malformed_record_gets_its_reason() {
        let value = created_bytes();
        let ok_headers: &[(&str, &[u8])] =
            &[("id", ID.as_bytes()), ("eventType", b"ProductCreated")];
        let cases: Vec<(&str, RawRecord<'_>, &str)> = vec![
            (
                "no key",
                record(None, ok_headers, Some(&value)),
                "missing_key",
            ),
            (
                "empty key",
                record(Some(b""), ok_headers, Some(&value)),
                "missing_key",
            ),
            (
                "binary key",
                record(Some(b"\xff\xfe"), ok_headers, Some(&value)),
                "invalid_key",
            ),
            (
                "control char key",
                record(Some(b"a\x01b"), ok_headers, Some(&value)),
                "invalid_key",
            ),
            (
                "JSON boolean key",
                record(
                    Some(br#"{"schema":{},"payload":true}"#),
                    ok_headers,
                    Some(&value),
                ),
                "invalid_key",
            ),
            (
                "no id",
                record(
                    Some(b"acme"),
                    &[("eventType", b"ProductCreated")],
                    Some(&value),
                ),
                "missing_header",
            ),
            (
                "id not a uuid",
                record(
                    Some(b"acme"),
                    &[("id", b"42"), ("eventType", b"ProductCreated")],
                    Some(&value),
                ),
                "invalid_header",
            ),
            (
                "empty eventType",
                record(
                    Some(b"acme"),
                    &[("id", ID.as_bytes()), ("eventType", b" ")],
                    Some(&value),
                ),
                "missing_header",
            ),
            (
                "JSON string of a number",
                record(Some(b"acme"), ok_headers, Some(br#""42""#)),
                "undecodable_payload",
            ),
            (
                "no eventType",
                record(Some(b"acme"), &[("id", ID.as_bytes())], Some(&value)),
                "missing_header",
            ),
            (
                "tombstone",
                record(Some(b"acme"), ok_headers, None),
                "missing_payload",
            ),
            (
                "bad deliverBefore",
                record(
                    Some(b"acme"),
                    &[
                        ("id", ID.as_bytes()),
                        ("eventType", b"ProductCreated"),
                        ("deliverBefore", b"tomorrow"),
                    ],
                    Some(&value),
                ),
                "invalid_header",
            ),
            (
                "envelope null payload",
                record(
                    Some(b"acme"),
                    ok_headers,
                    Some(br#"{"schema":{"type":"string"},"payload":null}"#),
                ),
                "missing_payload",
            ),
            (
                "envelope bad base64",
                record(
                    Some(b"acme"),
                    ok_headers,
                    Some(br#"{"schema":{"type":"bytes"},"payload":"%%%"}"#),
                ),
                "undecodable_payload",
            ),
        ];
        for (what, r, code) in cases {
            let err = decode(&r).expect_err(what);
            assert_eq!(err.reason.code(), code, "{what}: {err}");
        }
    }

    #[test]
    fn any_event_type_is_carried_with_its_payload_as_it_came() {
        let bytes = created_bytes();
        let cases: [(&str, &[u8], Payload); 4] = [
            ("OrderPlaced", &bytes, Payload::Protobuf(bytes.clone())),
            (
                "InvoicePaid",
                br#"{"invoice":{"id":"i-1","total":12}}"#,
                Payload::Json(serde_json::json!({"invoice":{"id":"i-1","total":12}})),
            ),
            (
                "InvoicePaid",
                br#""{\"invoice\":{}}""#,
                Payload::Json(serde_json::json!({"invoice":{}})),
            ),
            ("Blob", b"", Payload::Protobuf(Vec::new())),
        ];
        for (event_type, value, payload) in cases {
            let r = record(
                Some(b"t"),
                &[("id", ID.as_bytes()), ("eventType", event_type.as_bytes())],
                Some(value),
            );
            let e = decode(&r).unwrap();
            assert_eq!(e.event_type, event_type);
            assert_eq!(e.payload, payload, "{event_type}");
        }
    }
}
