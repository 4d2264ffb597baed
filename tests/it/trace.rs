//! One trace from the user's click to the partner's answer: the writer's span stores its W3C
//! `traceparent` in the outbox row, the relay carries it as a Kafka header, the consumer's span
//! for the event is its child (with the event's coordinates as attributes), and the request the
//! partner receives carries a child of that span. Checked with an in-memory exporter, the real
//! relay, broker and consumer, and the partner simulator.

use std::time::Duration;

use ferry::outbox::writer::{self, NewEvent};
use ferry::outbox::{EventPayload, TenantId, proto};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

use crate::support::wait_for;

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// `00-<trace>-<span>-<flags>` split into its trace and span ids.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_owned(), parts[2].to_owned())
}

// A current-thread runtime: every task the test starts (relay, consumer, simulator) runs on this
// thread, under the subscriber the test installs for it alone.
#[tokio::test]
async fn one_trace_runs_from_the_writers_span_to_the_partners_request() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("ferry-test")));
    let _default = tracing::subscriber::set_default(subscriber);

    let (db, cfg, sim, sim_stop) = crate::partner::setup_sim(Duration::from_secs(10)).await;
    let tenant = TenantId::new("traced").unwrap();
    ferry::tenant::enable(&db.pool, &tenant, |_| {})
        .await
        .unwrap();
    let (relay_stop, relay_task, _) = crate::relay::start_relay(&cfg).await;

    // The user's click: our application writes the product and its event inside its span.
    let event = async {
        let event = NewEvent::new(
            tenant.clone(),
            "p-1",
            EventPayload::ProductCreated(proto::ProductCreated {
                product: Some(proto::Product {
                    id: "p-1".into(),
                    name: "Lamp".into(),
                    description: "A lamp".into(),
                    price_minor: 1_999,
                    currency: "EUR".into(),
                }),
            }),
        );
        let mut tx = db.pool.begin().await.unwrap();
        writer::append(&mut tx, &event).await.unwrap();
        tx.commit().await.unwrap();
        event
    }
    .instrument(tracing::info_span!("user saves a product"))
    .await;
    let written = event
        .traceparent
        .clone()
        .expect("the writer stored the span's traceparent");
    let (trace_id, writer_span) = ids(&written);

    let running = crate::partner::consume(&cfg, &db.pool, crate::partner::fast_retries());
    let request = wait_for(
        "the partner received the item's create",
        Duration::from_secs(60),
        || async {
            sim.requests()
                .into_iter()
                .find(|r| r.account == "traced" && r.method == "POST")
        },
    )
    .await;
    let received = request
        .traceparent
        .clone()
        .expect("the partner request carries a traceparent");
    let (received_trace, request_span) = ids(&received);
    assert_eq!(
        received_trace, trace_id,
        "one trace id from the writer to the partner: wrote {written}, received {received}"
    );

    let spans = wait_for(
        "the consumer's spans exported",
        Duration::from_secs(30),
        || async {
            let spans = exporter.get_finished_spans().unwrap();
            let done = spans.iter().any(|s| s.name == "deliver event")
                && spans
                    .iter()
                    .any(|s| s.span_context.span_id().to_string() == request_span);
            done.then_some(spans)
        },
    )
    .await;
    let deliver = spans
        .iter()
        .find(|s| s.name == "deliver event")
        .expect("a span for the event");
    assert_eq!(deliver.span_context.trace_id().to_string(), trace_id);
    assert_eq!(
        deliver.parent_span_id.to_string(),
        writer_span,
        "the consumer's span is a child of the writer's"
    );
    assert_eq!(deliver.span_kind, opentelemetry::trace::SpanKind::Consumer);
    assert_eq!(attribute(deliver, "tenant").as_deref(), Some("traced"));
    assert_eq!(
        attribute(deliver, "event_id"),
        Some(event.id.to_string()),
        "{:?}",
        deliver.attributes
    );
    assert_eq!(attribute(deliver, "attempt").as_deref(), Some("1"));
    assert!(attribute(deliver, "partition").is_some());
    assert!(attribute(deliver, "offset").is_some());
    let partner_request = spans
        .iter()
        .find(|s| s.span_context.span_id().to_string() == request_span)
        .unwrap();
    assert_eq!(partner_request.name, "partner request");
    assert_eq!(
        partner_request.parent_span_id,
        deliver.span_context.span_id(),
        "the partner request is a child of the event's span"
    );
    assert_eq!(
        partner_request.span_kind,
        opentelemetry::trace::SpanKind::Client
    );

    running.stop().await;
    relay_stop.cancel();
    relay_task.await.unwrap().unwrap();
    sim_stop.cancel();
    db.drop().await;
}
