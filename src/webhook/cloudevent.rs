//! A delivery's body: the event as a CloudEvent 1.0 in the structured JSON mode
//! (`application/cloudevents+json`), so the signature covers every attribute with the data.
//!
//! Besides the required attributes (`specversion`, `id`, `source`, `type`) it carries `subject`
//! (our id of the object), `time` (when the outbox row was committed), `datacontenttype`, and
//! two documented extensions: `partitionkey` (the tenant: the unit of order) and `sequence`
//! (the record's offset, zero-padded, so it orders as text as the CloudEvents sequence extension
//! asks; a tenant's events share one partition, so its sequence only grows). `traceparent`
//! (the distributed tracing extension) when the writer's trace is known.

use chrono::SecondsFormat;
use serde_json::{Map, Value, json};

use crate::outbox::OutboxEvent;
use crate::partner::spec::WebhookSpec;

/// The media type of a structured CloudEvent in JSON.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// What goes into one CloudEvent besides the event itself.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// The integration's `[webhooks]` settings.
    pub spec: &'a WebhookSpec,
    /// Our id of the object.
    pub subject: &'a str,
    /// The record's offset in its partition.
    pub offset: i64,
    /// The trace context of the delivery's span.
    pub traceparent: Option<&'a str>,
}

/// The CloudEvent of `event` with `data`, as the bytes sent and signed.
pub fn structured(event: &OutboxEvent, data: Value, envelope: Envelope<'_>) -> Vec<u8> {
    let mut attributes = Map::new();
    attributes.insert("specversion".into(), json!("1.0"));
    attributes.insert("id".into(), json!(event.id.to_string()));
    attributes.insert("source".into(), json!(envelope.spec.source));
    attributes.insert(
        "type".into(),
        json!(format!("{}{}", envelope.spec.type_prefix, event.event_type)),
    );
    attributes.insert("subject".into(), json!(envelope.subject));
    if let Some(time) = event.occurred_at {
        attributes.insert(
            "time".into(),
            json!(time.to_rfc3339_opts(SecondsFormat::Millis, true)),
        );
    }
    attributes.insert("datacontenttype".into(), json!("application/json"));
    attributes.insert("partitionkey".into(), json!(event.tenant_id.as_str()));
    attributes.insert("sequence".into(), json!(sequence(envelope.offset)));
    if let Some(traceparent) = envelope.traceparent {
        attributes.insert("traceparent".into(), json!(traceparent));
    }
    attributes.insert("data".into(), data);
    serde_json::to_vec(&Value::Object(attributes)).expect("a JSON value serializes")
}

/// An offset as a CloudEvents `sequence`: text that sorts as the number does.
pub fn sequence(offset: i64) -> String {
    format!("{:020}", offset.max(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Payload, TenantId};

    #[test]
    fn an_event_becomes_a_structured_cloudevent() {
        let spec = WebhookSpec {
            source: "https://shop.example/ferry".into(),
            type_prefix: "com.example.shop.".into(),
            timeout: None,
        };
        let event = OutboxEvent {
            id: uuid::Uuid::now_v7(),
            tenant_id: TenantId::new("acme".to_owned()).unwrap(),
            aggregate_type: Some("Product".into()),
            aggregate_id: Some("p-1".into()),
            traceparent: None,
            deliver_before: None,
            occurred_at: Some(chrono::Utc::now()),
            event_type: "ProductCreated".into(),
            payload: Payload::Json(json!({"product": {"id": "p-1"}})),
            integration: None,
        };
        let envelope = Envelope {
            spec: &spec,
            subject: "p-1",
            offset: 42,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        };
        let body = structured(&event, json!({"product": {"id": "p-1"}}), envelope);
        let ce: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], event.id.to_string());
        assert_eq!(ce["type"], "com.example.shop.ProductCreated");
        assert_eq!(ce["source"], "https://shop.example/ferry");
        assert_eq!(ce["subject"], "p-1");
        assert_eq!(ce["partitionkey"], "acme");
        assert_eq!(ce["sequence"], "00000000000000000042");
        assert_eq!(ce["data"]["product"]["id"], "p-1");
        assert!(ce["time"].as_str().unwrap().ends_with('Z'));
        assert!(
            sequence(9) < sequence(10),
            "sorts as text as it does as a number"
        );
    }
}
