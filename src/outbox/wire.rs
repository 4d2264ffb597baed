//! The encoder side of the wire contract: an outbox row as the Kafka record Debezium's
//! `EventRouter` would emit for it. Ferry's relay produces exactly this; the decoder reads it.

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

use super::{RawRecord, header};

/// One row of the `outbox` table (`SELECT *` maps onto it).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OutboxRow {
    /// `id`: the event id.
    pub id: Uuid,
    /// `tenant_id`: the Kafka key.
    pub tenant_id: String,
    /// `aggregatetype`.
    #[sqlx(rename = "aggregatetype")]
    pub aggregate_type: String,
    /// `aggregateid`.
    #[sqlx(rename = "aggregateid")]
    pub aggregate_id: String,
    /// `type`: the event type's name.
    #[sqlx(rename = "type")]
    pub event_type: String,
    /// `payload`: protobuf bytes.
    pub payload: Vec<u8>,
    /// `traceparent`: the writer's W3C trace context.
    pub traceparent: Option<String>,
    /// `created_at`.
    pub created_at: DateTime<Utc>,
    /// `deliver_before`.
    pub deliver_before: Option<DateTime<Utc>>,
    /// `integration`: the one integration the event is for, or `None` for all (a table without
    /// the column reads as `None`).
    #[sqlx(default)]
    pub integration: Option<String>,
}

/// A Kafka record of the wire contract, owned, ready to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRecord {
    /// The tenant id, as raw UTF-8 (Debezium's StringConverter).
    pub key: Vec<u8>,
    /// Header names and raw values (Debezium's SimpleHeaderConverter).
    pub headers: Vec<(&'static str, Vec<u8>)>,
    /// The payload bytes (Debezium's ByteArrayConverter).
    pub value: Vec<u8>,
    /// The record timestamp: the row's commit time where known, else its `created_at`.
    pub timestamp_ms: i64,
}

impl WireRecord {
    /// The record for `row`. `committed_at` is the transaction's commit time when the change
    /// feed knows it (Debezium stamps records with it); `created_at` stands in otherwise.
    pub fn from_row(row: &OutboxRow, committed_at: Option<DateTime<Utc>>) -> Self {
        let mut headers = vec![
            (header::ID, row.id.to_string().into_bytes()),
            (header::EVENT_TYPE, row.event_type.clone().into_bytes()),
            (
                header::AGGREGATE_TYPE,
                row.aggregate_type.clone().into_bytes(),
            ),
            (header::AGGREGATE_ID, row.aggregate_id.clone().into_bytes()),
        ];
        if let Some(tp) = &row.traceparent {
            headers.push((header::TRACEPARENT, tp.clone().into_bytes()));
        }
        if let Some(t) = row.deliver_before {
            let text = t.to_rfc3339_opts(SecondsFormat::Micros, true);
            headers.push((header::DELIVER_BEFORE, text.into_bytes()));
        }
        if let Some(i) = &row.integration {
            headers.push((header::INTEGRATION, i.clone().into_bytes()));
        }
        WireRecord {
            key: row.tenant_id.clone().into_bytes(),
            headers,
            value: row.payload.clone(),
            timestamp_ms: committed_at.unwrap_or(row.created_at).timestamp_millis(),
        }
    }

    /// The marker sent in place of a row the relay cannot send as-is: the row's identity, the
    /// reason in the [`header::REJECTED`] header, no payload. Keyed by the tenant when there is
    /// one, so it lands in the tenant's partition, in order.
    pub fn rejected(
        id: Option<Uuid>,
        tenant_id: Option<&str>,
        event_type: Option<&str>,
        reason: &str,
        timestamp: DateTime<Utc>,
    ) -> Self {
        let mut headers = Vec::with_capacity(3);
        if let Some(id) = id {
            headers.push((header::ID, id.to_string().into_bytes()));
        }
        if let Some(t) = event_type {
            headers.push((header::EVENT_TYPE, t.as_bytes().to_vec()));
        }
        headers.push((header::REJECTED, reason.as_bytes().to_vec()));
        WireRecord {
            key: tenant_id.unwrap_or_default().as_bytes().to_vec(),
            headers,
            value: Vec::new(),
            timestamp_ms: timestamp.timestamp_millis(),
        }
    }

    /// The record's size as the broker counts it against `message.max.bytes`, approximately:
    /// key, value and headers plus a fixed overhead for the record framing.
    pub fn approximate_size(&self) -> usize {
        const RECORD_OVERHEAD: usize = 64;
        self.key.len()
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 8)
                .sum::<usize>()
            + RECORD_OVERHEAD
    }

    /// A borrowed view for [`super::decode`].
    pub fn as_raw(&self) -> RawRecord<'_> {
        RawRecord {
            key: (!self.key.is_empty()).then_some(self.key.as_slice()),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (*n, Some(v.as_slice())))
                .collect(),
            value: Some(&self.value),
            timestamp_ms: Some(self.timestamp_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Payload, decode};
    use crate::shop::{EventPayload, EventType, proto};

    #[test]
    fn a_rejected_row_decodes_as_a_bad_event_of_its_tenant() {
        let id = Uuid::now_v7();
        let r = WireRecord::rejected(
            Some(id),
            Some("acme"),
            Some("ProductCreated"),
            "payload of 2000000 bytes is over the 1000000-byte limit",
            Utc::now(),
        );
        let bad = decode(&r.as_raw()).unwrap_err();
        assert_eq!(bad.reason.code(), "rejected_by_relay");
        assert_eq!(bad.event_id, Some(id));
        assert_eq!(bad.tenant_id.unwrap().as_str(), "acme");
        assert!(bad.reason.to_string().contains("2000000 bytes"));
        let keyless = WireRecord::rejected(None, None, None, "tenant_id is NULL", Utc::now());
        let bad = decode(&keyless.as_raw()).unwrap_err();
        assert_eq!(bad.reason.code(), "rejected_by_relay");
        assert_eq!(bad.tenant_id, None);
    }

    #[test]
    fn a_switch_without_the_header_is_for_the_integration_its_payload_names() {
        use crate::outbox::writer::OutboxPayload;
        let marker = crate::outbox::control::Control::disabled("shop");
        let row = OutboxRow {
            id: Uuid::now_v7(),
            tenant_id: "acme".to_owned(),
            aggregate_type: "Tenant".to_owned(),
            aggregate_id: "acme".to_owned(),
            event_type: marker.event_type().to_owned(),
            payload: marker.to_bytes(),
            traceparent: None,
            created_at: Utc::now(),
            deliver_before: None,
            integration: None,
        };
        let event = decode(&WireRecord::from_row(&row, None).as_raw()).unwrap();
        assert!(event.is_for("shop"));
        assert!(!event.is_for("webhooks"), "the payload names another");
    }

    #[test]
    fn a_row_round_trips_through_the_decoder() {
        let payload = EventPayload::ProductDeleted(proto::ProductDeleted {
            product_id: "p-9".to_owned(),
        });
        let deliver_before = DateTime::parse_from_rfc3339("2026-12-01T10:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let row = OutboxRow {
            id: Uuid::now_v7(),
            tenant_id: "acme".to_owned(),
            aggregate_type: "Product".to_owned(),
            aggregate_id: "p-9".to_owned(),
            event_type: EventType::ProductDeleted.as_str().to_owned(),
            payload: payload.encode_to_vec(),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            created_at: Utc::now(),
            deliver_before: Some(deliver_before),
            integration: Some("webhooks".to_owned()),
        };
        let record = WireRecord::from_row(&row, None);
        let event = decode(&record.as_raw()).unwrap();
        assert_eq!(event.id, row.id);
        assert_eq!(event.tenant_id.as_str(), "acme");
        assert_eq!(event.event_type, "ProductDeleted");
        assert_eq!(event.payload, Payload::Protobuf(payload.encode_to_vec()));
        assert_eq!(event.aggregate_id.as_deref(), Some("p-9"));
        assert_eq!(event.aggregate_type.as_deref(), Some("Product"));
        assert_eq!(event.traceparent, row.traceparent);
        assert_eq!(event.deliver_before, Some(deliver_before));
        assert_eq!(event.integration.as_deref(), Some("webhooks"));
        assert!(event.is_for("webhooks") && !event.is_for("partner"));
        assert_eq!(
            event.occurred_at.unwrap().timestamp_millis(),
            row.created_at.timestamp_millis()
        );
    }
}
