//! One trace from the user's click to the partner's answer: the writer's span stores its W3C
//! `traceparent` in the outbox row, the relay carries it as a Kafka header, the consumer's span
//! for the event is its child (with the event's coordinates as attributes), and the request the
//! partner receives carries a child of that span. Checked with an in-memory exporter, the real
//! relay, broker and consumer, and the partner simulator.

use std::time::Duration;

use ferry::outbox::TenantId;
use ferry::outbox::writer::{self, NewEvent};
use ferry::shop::{EventPayload, proto};
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

// A runtime of the test's own, multi-threaded like `ferry consume`'s (the consumer blocks in
// place during a rebalance), with the test's subscriber installed on each of its threads: the
// spans of every task the test starts (relay, consumer, simulator) reach this test's exporter
// alone, not the other tests'.
#[test]
fn one_trace_runs_from_the_writers_span_to_the_partners_request() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("ferry-test")));
    let dispatch = tracing::Dispatch::new(subscriber);
    // tracing-core takes a lone registered dispatcher for the global default and then asks the
    // *registering thread's* default whether a new callsite is wanted: a callsite first reached
    // by another test's consumer (a thread with no subscriber) would be switched off for good.
    // With a second dispatcher registered it asks them all.
    let _second = tracing::Dispatch::new(tracing_subscriber::registry());
    tracing::callsite::rebuild_interest_cache();
    let _default = tracing::dispatcher::set_default(&dispatch);
    let on_threads = dispatch.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            // Kept for the thread's life: the thread is the runtime's, and ends with it.
            std::mem::forget(tracing::dispatcher::set_default(&on_threads));
        })
        .build()
        .unwrap();
    runtime.block_on(trace_chain(exporter));
}

async fn trace_chain(exporter: InMemorySpanExporter) {
    let (db, cfg, sim, sim_stop) = crate::partner::setup_sim(Duration::from_secs(10)).await;
    let tenant = TenantId::new("traced").unwrap();
    ferry::tenant::enable(
        &db.pool,
        "partner",
        &tenant,
        ferry::tenant::BackfillSource::Products,
        |_| {},
    )
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

    // The request's span, and the event's span it hangs off (the one that made this request:
    // after a rebalance the event may be handled, and spanned, more than once).
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    let (partner_request, deliver) = loop {
        let spans = exporter.get_finished_spans().unwrap();
        let request = spans
            .iter()
            .find(|s| s.span_context.span_id().to_string() == request_span);
        let parent = request.and_then(|r| {
            spans
                .iter()
                .find(|s| s.span_context.span_id() == r.parent_span_id)
        });
        if let (Some(request), Some(parent)) = (request, parent) {
            break (request.clone(), parent.clone());
        }
        if tokio::time::Instant::now() > until {
            let seen: Vec<String> = spans
                .iter()
                .map(|s| {
                    format!(
                        "{} {} parent {}",
                        s.name,
                        s.span_context.span_id(),
                        s.parent_span_id
                    )
                })
                .collect();
            let requests: Vec<_> = sim
                .requests()
                .into_iter()
                .filter(|r| r.account == "traced")
                .map(|r| (r.method, r.path, r.traceparent, r.status))
                .collect();
            panic!(
                "no span {request_span} with its parent exported within 60 s; spans: {seen:#?}; \
                 the partner's requests: {requests:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(partner_request.name, "partner request");
    assert_eq!(
        partner_request.span_kind,
        opentelemetry::trace::SpanKind::Client
    );
    assert_eq!(
        deliver.name, "deliver event",
        "the partner request is a child of the event's span"
    );
    assert_eq!(deliver.span_context.trace_id().to_string(), trace_id);
    assert_eq!(
        deliver.parent_span_id.to_string(),
        writer_span,
        "the consumer's span is a child of the writer's"
    );
    assert_eq!(deliver.span_kind, opentelemetry::trace::SpanKind::Consumer);
    assert_eq!(attribute(&deliver, "tenant").as_deref(), Some("traced"));
    assert_eq!(
        attribute(&deliver, "event_id"),
        Some(event.id.to_string()),
        "{:?}",
        deliver.attributes
    );
    assert!(attribute(&deliver, "attempt").is_some());
    assert!(attribute(&deliver, "partition").is_some());
    assert!(attribute(&deliver, "offset").is_some());

    running.stop().await;
    relay_stop.cancel();
    relay_task.await.unwrap().unwrap();
    sim_stop.cancel();
    db.drop().await;
}
