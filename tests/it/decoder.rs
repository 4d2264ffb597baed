//! The decoder against fixtures of every shape Debezium's outbox EventRouter emits
//! (`tests/fixtures/debezium/*.json`, written from Debezium's and Kafka Connect's documented
//! converter output), and the malformed records it must reject with the right reason.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ferry::outbox::{
    BadEvent, BadEventReason, OutboxEvent, Payload, PayloadFormat, RawRecord, control,
};
use ferry::shop::{self, EventPayload};
use prost::Message as _;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
pub struct FixtureFile {
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub record: Record,
    #[serde(default)]
    pub expect: Option<Value>,
    #[serde(default)]
    pub expect_error: Option<String>,
    #[serde(default)]
    pub expect_tenant: Option<String>,
}

/// Bytes as text, or `{"base64": "..."}` for binary; `null` for absent.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Bytes {
    Text(String),
    Binary { base64: String },
}

impl Bytes {
    pub fn to_vec(&self) -> Vec<u8> {
        match self {
            Bytes::Text(s) => s.clone().into_bytes(),
            Bytes::Binary { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .expect("fixture base64"),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct Record {
    pub key: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
    pub value: Option<Bytes>,
}

/// A fixture record as owned bytes, ready to produce or to borrow as a [`RawRecord`].
pub struct OwnedRecord {
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub value: Option<Vec<u8>>,
}

impl OwnedRecord {
    pub fn from_fixture(r: &Record) -> Self {
        OwnedRecord {
            key: r.key.as_ref().map(Bytes::to_vec),
            headers: r
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), v.as_ref().map(Bytes::to_vec)))
                .collect(),
            value: r.value.as_ref().map(Bytes::to_vec),
        }
    }

    pub fn as_raw(&self) -> RawRecord<'_> {
        RawRecord {
            key: self.key.as_deref(),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_deref()))
                .collect(),
            value: self.value.as_deref(),
            timestamp_ms: None,
        }
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium")
}

/// Every case of every fixture file, named `file: case`.
pub fn all_cases() -> Vec<(String, Case)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("fixture dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let parsed: FixtureFile =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        for case in parsed.cases {
            cases.push((format!("{stem}: {}", case.name), case));
        }
    }
    cases
}

/// The proto3 JSON form of a payload, to compare with a fixture's `expect.payload`.
fn payload_json(p: &EventPayload) -> Value {
    let product = |p: &Option<shop::proto::Product>| {
        let p = p.as_ref().expect("product");
        json!({"product": {"id": p.id, "name": p.name, "description": p.description,
            "priceMinor": p.price_minor.to_string(), "currency": p.currency}})
    };
    match p {
        EventPayload::ProductCreated(m) => product(&m.product),
        EventPayload::ProductUpdated(m) => product(&m.product),
        EventPayload::ProductDeleted(m) => json!({"productId": m.product_id}),
    }
}

/// The record as the reference shop's integration reads it: the wire contract's decoder, then
/// Ferry's own events or the shop's (an unknown type refused, as the shop's `admit` does), with
/// the payload in its proto3 JSON form.
pub fn read(raw: &RawRecord<'_>) -> Result<(OutboxEvent, Value), BadEvent> {
    let event = ferry::outbox::decode(raw)?;
    let refuse = |reason| BadEvent {
        reason,
        tenant_id: Some(event.tenant_id.clone()),
        event_id: Some(event.id),
        event_type: Some(event.event_type.clone()),
    };
    let payload = if control::is_control(&event.event_type) {
        match &event.payload {
            Payload::Json(doc) => doc.clone(),
            Payload::Protobuf(bytes) => {
                let m = ferry::outbox::proto::TenantIntegrationEnabled::decode(&bytes[..])
                    .expect("a control event's protobuf");
                json!({"integration": m.integration})
            }
        }
    } else {
        match shop::decode(&event) {
            Ok(Some(p)) => payload_json(&p),
            Ok(None) => {
                return Err(refuse(BadEventReason::UnknownEventType(
                    event.event_type.clone(),
                )));
            }
            Err(reason) => return Err(refuse(reason)),
        }
    };
    Ok((event, payload))
}

/// Checks a decode result against the case; panics with the case name on a mismatch.
pub fn check(name: &str, case: &Case, result: Result<(OutboxEvent, Value), BadEvent>) {
    match (&case.expect, &case.expect_error) {
        (Some(expect), None) => {
            let (event, payload) = result.unwrap_or_else(|e| panic!("{name}: rejected: {e}"));
            let got = json!({
                "tenant_id": event.tenant_id.as_str(),
                "id": event.id.to_string(),
                "event_type": event.event_type(),
                "format": match event.format() { PayloadFormat::Protobuf => "protobuf", PayloadFormat::Json => "json" },
                "payload": payload,
            });
            for field in ["tenant_id", "id", "event_type", "format", "payload"] {
                assert_eq!(got[field], expect[field], "{name}: {field}");
            }
            let optional = [
                ("aggregate_type", event.aggregate_type.clone()),
                ("aggregate_id", event.aggregate_id.clone()),
                ("traceparent", event.traceparent.clone()),
                (
                    "deliver_before",
                    event
                        .deliver_before
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
                ),
            ];
            for (field, value) in optional {
                assert_eq!(
                    value.as_deref(),
                    expect.get(field).and_then(Value::as_str),
                    "{name}: {field}"
                );
            }
        }
        (None, Some(code)) => {
            let bad = result
                .err()
                .unwrap_or_else(|| panic!("{name}: accepted a malformed record"));
            assert_eq!(bad.reason.code(), code, "{name}: {bad}");
            assert_eq!(
                bad.tenant_id.as_ref().map(|t| t.as_str()),
                case.expect_tenant.as_deref(),
                "{name}: the tenant a bad event is charged to"
            );
        }
        _ => panic!("{name}: a case has exactly one of expect / expect_error"),
    }
}

#[test]
fn every_debezium_fixture_decodes_as_documented() {
    let cases = all_cases();
    assert!(cases.len() >= 15, "fixtures went missing: {}", cases.len());
    for (name, case) in &cases {
        let owned = OwnedRecord::from_fixture(&case.record);
        check(name, case, read(&owned.as_raw()));
    }
}

#[test]
fn every_shape_and_every_malformed_case_is_covered() {
    let cases = all_cases();
    let accepted = cases.iter().filter(|(_, c)| c.expect.is_some()).count();
    let mut codes: Vec<&str> = cases
        .iter()
        .filter_map(|(_, c)| c.expect_error.as_deref())
        .collect();
    codes.sort();
    codes.dedup();
    assert!(accepted >= 9, "accepted shapes: {accepted}");
    assert_eq!(
        codes,
        [
            "invalid_header",
            "invalid_key",
            "invalid_payload",
            "missing_header",
            "missing_key",
            "missing_payload",
            "undecodable_payload",
            "unknown_event_type"
        ]
    );
}
