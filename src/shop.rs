//! The reference application: a shop whose products the partner mirrors as shop items and
//! prices. It is the demo's, the benchmarks' and the tests' application, not Ferry's core: the
//! core carries any event type with its payload as it came ([`OutboxEvent`]); this module is
//! what an application's integration does with its own types, reading the payload as
//! protobuf (`proto/shop/v1/products.proto`) or as its proto3 JSON mapping.

use std::fmt;

use prost::Message as _;
use serde::Deserialize;
use serde_json::Value;

use crate::outbox::writer::OutboxPayload;
use crate::outbox::{BadEventReason, OutboxEvent, Payload, PayloadFormat};

/// The protobuf messages of `proto/shop/v1/products.proto`, generated at build time.
pub mod proto {
    #![allow(missing_docs, clippy::doc_markdown)]
    include!(concat!(env!("OUT_DIR"), "/shop.v1.rs"));
}

/// Creates the shop's `products` table in `public` (`examples/shop/schema.sql`) unless one is
/// on the search path already (a database migrated by an earlier Ferry keeps it in Ferry's
/// schema). The application's own schema step: Ferry's migrations never create it.
pub async fn create_tables(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('products') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        sqlx::raw_sql(include_str!("../examples/shop/schema.sql"))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// The aggregate type of every shop event.
pub const AGGREGATE: &str = "Product";

/// The shop's event types (the outbox `type` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// A product was created.
    ProductCreated,
    /// A product's fields changed.
    ProductUpdated,
    /// A product was deleted.
    ProductDeleted,
}

impl EventType {
    /// Every event type, for exhaustive tests and help texts.
    pub const ALL: [EventType; 3] = [
        EventType::ProductCreated,
        EventType::ProductUpdated,
        EventType::ProductDeleted,
    ];

    /// The name written in the outbox `type` column and the `eventType` header.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::ProductCreated => "ProductCreated",
            EventType::ProductUpdated => "ProductUpdated",
            EventType::ProductDeleted => "ProductDeleted",
        }
    }

    /// Parses the `type` column; `None` for a type the shop does not have.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A shop event's payload, one variant per [`EventType`].
#[derive(Debug, Clone, PartialEq)]
pub enum EventPayload {
    /// See [`proto::ProductCreated`].
    ProductCreated(proto::ProductCreated),
    /// See [`proto::ProductUpdated`].
    ProductUpdated(proto::ProductUpdated),
    /// See [`proto::ProductDeleted`].
    ProductDeleted(proto::ProductDeleted),
}

impl EventPayload {
    /// The type of this payload.
    pub fn event_type(&self) -> EventType {
        match self {
            EventPayload::ProductCreated(_) => EventType::ProductCreated,
            EventPayload::ProductUpdated(_) => EventType::ProductUpdated,
            EventPayload::ProductDeleted(_) => EventType::ProductDeleted,
        }
    }

    /// The protobuf encoding: what the shop stores in the outbox `payload` column.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        match self {
            EventPayload::ProductCreated(m) => m.encode_to_vec(),
            EventPayload::ProductUpdated(m) => m.encode_to_vec(),
            EventPayload::ProductDeleted(m) => m.encode_to_vec(),
        }
    }

    /// The product's id, whichever the event (empty if the event carries no product).
    pub fn product_id(&self) -> &str {
        match self {
            EventPayload::ProductCreated(proto::ProductCreated { product })
            | EventPayload::ProductUpdated(proto::ProductUpdated { product }) => {
                product.as_ref().map_or("", |p| p.id.as_str())
            }
            EventPayload::ProductDeleted(d) => &d.product_id,
        }
    }
}

impl OutboxPayload for EventPayload {
    fn event_type(&self) -> &str {
        EventPayload::event_type(self).as_str()
    }

    fn aggregate_type(&self) -> &str {
        AGGREGATE
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
}

/// Reads `event` as a shop event: `Ok(None)` for a type the shop does not have, an error for
/// a payload its type cannot be read from (protobuf or the proto3 JSON mapping) or that lacks
/// what the type needs.
pub fn decode(event: &OutboxEvent) -> Result<Option<EventPayload>, BadEventReason> {
    let Some(event_type) = EventType::parse(&event.event_type) else {
        return Ok(None);
    };
    let payload = match &event.payload {
        Payload::Protobuf(bytes) => from_protobuf(bytes, event_type)?,
        Payload::Json(doc) => from_json(doc.clone(), event_type)?,
    };
    validate(payload).map(Some)
}

fn from_protobuf(bytes: &[u8], event_type: EventType) -> Result<EventPayload, BadEventReason> {
    let undecodable = |e: prost::DecodeError| BadEventReason::UndecodablePayload {
        event_type: event_type.as_str().into(),
        format: PayloadFormat::Protobuf,
        detail: e.to_string(),
    };
    Ok(match event_type {
        EventType::ProductCreated => {
            EventPayload::ProductCreated(proto::ProductCreated::decode(bytes).map_err(undecodable)?)
        }
        EventType::ProductUpdated => {
            EventPayload::ProductUpdated(proto::ProductUpdated::decode(bytes).map_err(undecodable)?)
        }
        EventType::ProductDeleted => {
            EventPayload::ProductDeleted(proto::ProductDeleted::decode(bytes).map_err(undecodable)?)
        }
    })
}

// The proto3 JSON mapping: lowerCamelCase names (the original snake_case names accepted too),
// int64 as a string or a number; unknown fields ignored for forward compatibility.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonProduct {
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default, alias = "price_minor", deserialize_with = "int64")]
    price_minor: i64,
    #[serde(default)]
    currency: String,
}

#[derive(Deserialize)]
struct JsonProductEvent {
    product: Option<JsonProduct>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonProductDeleted {
    #[serde(default, alias = "product_id")]
    product_id: String,
}

fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int64 {
        Number(i64),
        Text(String),
    }
    match Int64::deserialize(d)? {
        Int64::Number(n) => Ok(n),
        Int64::Text(s) => s.trim().parse().map_err(serde::de::Error::custom),
    }
}

impl From<JsonProduct> for proto::Product {
    fn from(p: JsonProduct) -> Self {
        proto::Product {
            id: p.id,
            name: p.name,
            description: p.description,
            price_minor: p.price_minor,
            currency: p.currency,
        }
    }
}

fn from_json(doc: Value, event_type: EventType) -> Result<EventPayload, BadEventReason> {
    let undecodable = |e: serde_json::Error| BadEventReason::UndecodablePayload {
        event_type: event_type.as_str().into(),
        format: PayloadFormat::Json,
        detail: e.to_string(),
    };
    Ok(match event_type {
        EventType::ProductCreated => {
            let e: JsonProductEvent = serde_json::from_value(doc).map_err(undecodable)?;
            EventPayload::ProductCreated(proto::ProductCreated {
                product: e.product.map(Into::into),
            })
        }
        EventType::ProductUpdated => {
            let e: JsonProductEvent = serde_json::from_value(doc).map_err(undecodable)?;
            EventPayload::ProductUpdated(proto::ProductUpdated {
                product: e.product.map(Into::into),
            })
        }
        EventType::ProductDeleted => {
            let e: JsonProductDeleted = serde_json::from_value(doc).map_err(undecodable)?;
            EventPayload::ProductDeleted(proto::ProductDeleted {
                product_id: e.product_id,
            })
        }
    })
}

/// The fields without which an event cannot be acted on. (proto3 has no required fields, and
/// prost accepts many byte strings, so this is where garbage is told from an event.)
fn validate(payload: EventPayload) -> Result<EventPayload, BadEventReason> {
    let event_type = payload.event_type();
    let invalid = |detail: &str| {
        Err(BadEventReason::InvalidPayload {
            event_type: event_type.as_str().into(),
            detail: detail.to_owned(),
        })
    };
    match &payload {
        EventPayload::ProductCreated(proto::ProductCreated { product })
        | EventPayload::ProductUpdated(proto::ProductUpdated { product }) => match product {
            None => return invalid("`product` is missing"),
            Some(p) if p.id.trim().is_empty() => return invalid("`product.id` is empty"),
            Some(p) if !p.currency.is_empty() && !is_currency_code(&p.currency) => {
                return invalid("`product.currency` is not an ISO 4217 code like \"EUR\"");
            }
            Some(_) => {}
        },
        EventPayload::ProductDeleted(d) if d.product_id.trim().is_empty() => {
            return invalid("`product_id` is empty");
        }
        _ => {}
    }
    Ok(payload)
}

fn is_currency_code(c: &str) -> bool {
    c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::outbox::{RawRecord, decode as decode_record};

    const ID: &str = "0b6c6f0e-2f4a-4c6e-9a51-3f1f0c2d9e11";

    /// A product for tests (the decoder's too).
    pub(crate) fn product(id: &str) -> proto::Product {
        proto::Product {
            id: id.to_owned(),
            name: "Lamp".to_owned(),
            description: "A lamp".to_owned(),
            price_minor: 1999,
            currency: "EUR".to_owned(),
        }
    }

    /// The record carried, then read as the shop reads it.
    fn shop_event(event_type: &str, value: &[u8]) -> Result<Option<EventPayload>, BadEventReason> {
        let record = RawRecord {
            key: Some(b"acme"),
            headers: vec![
                ("id", Some(ID.as_bytes())),
                ("eventType", Some(event_type.as_bytes())),
            ],
            value: Some(value),
            timestamp_ms: None,
        };
        decode(&decode_record(&record).expect("the core carries it"))
    }

    #[test]
    fn payloads_the_shop_cannot_act_on_get_their_reason() {
        // (what was tried, type, value, the reason's code)
        let cases: [(&str, &str, &[u8], &str); 5] = [
            (
                "a field of the wrong JSON type",
                "ProductCreated",
                br#"{"product":{"id":7}}"#,
                "undecodable_payload",
            ),
            (
                "JSON without the product",
                "ProductCreated",
                b"{}",
                "invalid_payload",
            ),
            (
                "a currency that is not ISO 4217",
                "ProductUpdated",
                br#"{"product":{"id":"p","currency":"euro"}}"#,
                "invalid_payload",
            ),
            (
                "protobuf garbage",
                "ProductCreated",
                b"\x0a\x05ab",
                "undecodable_payload",
            ),
            (
                "an empty protobuf message",
                "ProductDeleted",
                b"",
                "invalid_payload",
            ),
        ];
        for (what, event_type, value, code) in cases {
            let err = shop_event(event_type, value).expect_err(what);
            assert_eq!(err.code(), code, "{what}: {err}");
        }
    }

    #[test]
    fn a_type_the_shop_does_not_have_is_none() {
        assert_eq!(shop_event("OrderPlaced", b"{}"), Ok(None));
    }

    #[test]
    fn every_event_type_round_trips_through_protobuf_and_json() {
        let payloads = [
            EventPayload::ProductCreated(proto::ProductCreated {
                product: Some(product("a")),
            }),
            EventPayload::ProductUpdated(proto::ProductUpdated {
                product: Some(product("a")),
            }),
            EventPayload::ProductDeleted(proto::ProductDeleted {
                product_id: "a".to_owned(),
            }),
        ];
        assert_eq!(payloads.len(), EventType::ALL.len());
        let json = [
            r#"{"product":{"id":"a","name":"Lamp","description":"A lamp","priceMinor":"1999","currency":"EUR"}}"#,
            r#"{"product":{"id":"a","name":"Lamp","description":"A lamp","price_minor":1999,"currency":"EUR"}}"#,
            r#"{"productId":"a"}"#,
        ];
        for (p, json) in payloads.into_iter().zip(json) {
            let name = p.event_type().as_str();
            assert_eq!(
                shop_event(name, &p.encode_to_vec()),
                Ok(Some(p.clone())),
                "{name}"
            );
            assert_eq!(
                shop_event(name, json.as_bytes()),
                Ok(Some(p.clone())),
                "{name} as JSON"
            );
        }
    }
}
