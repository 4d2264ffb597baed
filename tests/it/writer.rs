//! The writer's side: an event appended inside the application's transaction carries the
//! trace context of the span it was written in.

use ferry::outbox::TenantId;
use ferry::outbox::writer::{self, NewEvent};
use ferry::shop::{EventPayload, proto};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

use crate::support::TestDb;

fn deleted() -> EventPayload {
    EventPayload::ProductDeleted(proto::ProductDeleted {
        product_id: "p-1".to_owned(),
    })
}

#[tokio::test]
async fn an_event_carries_the_trace_context_of_the_span_that_wrote_it() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _default = tracing::subscriber::set_default(subscriber);

    let outside = NewEvent::new(TenantId::new("acme").unwrap(), "p-1", deleted());
    assert_eq!(outside.traceparent, None, "no span, no trace context");

    let span = tracing::info_span!("request");
    let event = {
        let _entered = span.enter();
        NewEvent::new(TenantId::new("acme").unwrap(), "p-1", deleted())
    };
    let context = span.context();
    let span_context = context.span().span_context().clone();
    assert_eq!(
        event.traceparent.as_deref(),
        Some(
            format!(
                "00-{}-{}-01",
                span_context.trace_id(),
                span_context.span_id()
            )
            .as_str()
        )
    );

    // It is stored in the outbox row, inside the caller's transaction.
    let db = TestDb::migrated().await;
    let mut tx = db.pool.begin().await.unwrap();
    writer::append(&mut tx, &event).await.unwrap();
    tx.commit().await.unwrap();
    let stored: Option<String> = sqlx::query_scalar("SELECT traceparent FROM outbox WHERE id = $1")
        .bind(event.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, event.traceparent);
    db.drop().await;
}

#[tokio::test]
async fn a_rolled_back_transaction_leaves_no_event() {
    let db = TestDb::migrated().await;
    let event = NewEvent::new(TenantId::new("acme").unwrap(), "p-1", deleted());
    let mut tx = db.pool.begin().await.unwrap();
    writer::append(&mut tx, &event).await.unwrap();
    tx.rollback().await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 0);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_load_writer_writes_each_change_with_its_event() {
    let db = TestDb::migrated().await;
    let options = ferry::load::LoadOptions {
        tenants: 7,
        events: 300,
        concurrency: 3,
        ..Default::default()
    };
    let report = ferry::load::run(&db.pool, &options).await.unwrap();
    assert_eq!(report.events(), 300);
    let (outbox, products, tenants): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM products), \
         (SELECT count(DISTINCT tenant_id) FROM outbox)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(outbox, 300, "one event per change");
    assert_eq!(products as usize, report.created - report.deleted);
    assert_eq!(tenants, 7);
    // Fewer tenants than writers: every change asked for is still written. Tried: 2 tenants,
    // 8 writers, 30 changes (6 writers own no tenant).
    let few = ferry::load::LoadOptions {
        tenants: 2,
        events: 30,
        concurrency: 8,
        tenant_prefix: "few-".into(),
        ..Default::default()
    };
    assert_eq!(ferry::load::run(&db.pool, &few).await.unwrap().events(), 30);
    let written: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE tenant_id LIKE 'few-%'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(written, 30);
    // Bad options are refused, not half-run.
    let bad = ferry::load::LoadOptions {
        tenants: 0,
        ..Default::default()
    };
    assert!(matches!(
        ferry::load::run(&db.pool, &bad).await,
        Err(ferry::load::LoadError::Empty)
    ));
    for rate in [0.0, -5.0, f64::NAN] {
        let bad = ferry::load::LoadOptions {
            rate: Some(rate),
            ..Default::default()
        };
        assert!(
            matches!(
                ferry::load::run(&db.pool, &bad).await,
                Err(ferry::load::LoadError::Rate(_))
            ),
            "--rate {rate} refused"
        );
    }
    // A second run changes the products the first one left, not only its own.
    let before: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT id, version FROM products ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let again = ferry::load::LoadOptions { seed: 7, ..options };
    ferry::load::run(&db.pool, &again).await.unwrap();
    let changed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM products p JOIN UNNEST($1::uuid[], $2::bigint[]) AS b(id, version) \
         ON p.id = b.id WHERE p.version > b.version",
    )
    .bind(before.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .bind(before.iter().map(|(_, v)| *v).collect::<Vec<_>>())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(changed > 0, "earlier products updated by the second run");
    assert_eq!(
        ferry::load::run(
            &db.pool,
            &ferry::load::LoadOptions {
                rate: Some(0.0),
                ..Default::default()
            }
        )
        .await
        .unwrap_err()
        .to_string(),
        "--rate must be a positive number of changes per second, not 0"
    );
    db.drop().await;
}

/// The writer is generic over the payload: JSON of the application's own types is stored as
/// UTF-8 JSON under its own type names, and a JSON payload of the reference domain decodes as
/// the event it names. Input tried: a `ProductDeleted` in proto3 JSON and an `OrderPlaced` of a
/// domain Ferry does not know, appended in one statement.
#[tokio::test]
async fn json_payloads_of_any_type_are_written_as_they_are() {
    use ferry::outbox::writer::JsonPayload;
    let db = TestDb::migrated().await;
    let tenant = TenantId::new("acme").unwrap();
    let events = [
        NewEvent::new(
            tenant.clone(),
            "p-1",
            JsonPayload {
                event_type: "ProductDeleted".into(),
                aggregate_type: "Product".into(),
                body: serde_json::json!({"productId": "p-1"}),
            },
        ),
        NewEvent::new(
            tenant,
            "o-7",
            JsonPayload {
                event_type: "OrderPlaced".into(),
                aggregate_type: "Order".into(),
                body: serde_json::json!({"orderId": "o-7", "total": 1250}),
            },
        ),
    ];
    let mut tx = db.pool.begin().await.unwrap();
    writer::append_many(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let rows: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT type, aggregatetype, payload FROM outbox WHERE id = ANY($1) ORDER BY id",
    )
    .bind(vec![events[0].id, events[1].id])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows[0].0, "ProductDeleted");
    assert_eq!(rows[1].0, "OrderPlaced");
    assert_eq!(rows[1].1, "Order");
    let order: serde_json::Value = serde_json::from_slice(&rows[1].2).unwrap();
    assert_eq!(order["total"], 1250);
    let deleted = ferry::outbox::decode(&ferry::outbox::RawRecord {
        key: Some(b"acme"),
        headers: vec![
            ("id", Some(events[0].id.to_string().as_bytes())),
            ("eventType", Some(b"ProductDeleted")),
        ],
        value: Some(&rows[0].2),
        timestamp_ms: None,
    })
    .unwrap();
    assert_eq!(
        ferry::shop::decode(&deleted),
        Ok(Some(EventPayload::ProductDeleted(proto::ProductDeleted {
            product_id: "p-1".into()
        })))
    );
    db.drop().await;
}
