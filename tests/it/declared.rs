//! The shop integration declared in `integrations/shop.toml`, run by the consumer end to end
//! against the partner simulator: the file alone says what to call, the generic driver does
//! the mapping, the healing and the rollback.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry::consumer::runtime::{self, ConsumeStats};
use ferry::outbox::OutboxRow;
use ferry::outbox::control::Control;
use ferry::outbox::writer::OutboxPayload;
use ferry::partner::client::PartnerClient;
use ferry::partner::rest::RestIntegration;
use ferry::partner::sim::Faults;
use ferry::partner::spec::Spec;
use tokio_util::sync::CancellationToken;

use crate::consume::produce_rows;
use crate::example::deleted;
use crate::partner::{TOKEN, fast_retries, product, setup_sim, until_delivered};

fn shop_spec() -> Spec {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("integrations/shop.toml");
    Spec::load_with(&file, |var| {
        (var == "FERRY_PARTNER_TOKEN").then(|| TOKEN.to_owned())
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A create written as JSON by plain SQL would be: the payload column holds JSON text.
fn created_as_json(tenant: &str, id: &str, name: &str, price: i64) -> OutboxRow {
    let body = serde_json::json!({"product": {"id": id, "name": name, "description": "",
        "priceMinor": price, "currency": "EUR"}});
    OutboxRow {
        payload: body.to_string().into_bytes(),
        ..product(tenant, id, name, price, true)
    }
}

fn disabled(tenant: &str) -> OutboxRow {
    let control = Control::disabled("partner");
    OutboxRow {
        event_type: control.event_type().to_owned(),
        aggregate_type: control.aggregate_type().to_owned(),
        payload: control.to_bytes(),
        ..product(tenant, tenant, "", 0, true)
    }
}

async fn enable(pool: &sqlx::PgPool, tenants: &[&str]) {
    for tenant in tenants {
        sqlx::query("INSERT INTO tenants (integration, tenant_id, integration_enabled) VALUES ('partner', $1, true)")
            .bind(tenant)
            .execute(pool)
            .await
            .unwrap();
    }
}

fn run(
    cfg: &ferry::config::Config,
    pool: &sqlx::PgPool,
    spec: Spec,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), ferry::consumer::runtime::ConsumeError>>,
) {
    let client = PartnerClient::for_spec(&cfg.partner, &spec.partner).unwrap();
    let handler = Arc::new(RestIntegration::new(spec, client, pool.clone()));
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (cfg, pool, stop) = (cfg.clone(), pool.clone(), stop.clone());
        let stats = Arc::new(ConsumeStats::default());
        async move { runtime::run(&cfg, pool, handler, fast_retries(), stats, stop).await }
    });
    (stop, task)
}

async fn mappings(pool: &sqlx::PgPool, tenant: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT object_type, local_id FROM integration_mappings \
         WHERE integration = 'partner' AND tenant_id = $1 ORDER BY object_type, local_id",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The declared shop integration creates, updates and deletes items and their prices, from
/// protobuf and from JSON payloads, and a tenant's disable rolls back everything it mapped,
/// prices before items. A tenant whose event lacks our id is paused alone. Guarantee: an
/// integration written as a file keeps order, loses and doubles nothing, and isolates tenants.
/// Input tried: `{"product": {"name": "No id"}}` as tenant-bad's create.
#[tokio::test(flavor = "multi_thread")]
async fn the_declared_shop_integration_mirrors_products_and_rolls_back() {
    let (db, cfg, sim, sim_stop) = setup_sim(Duration::from_secs(10)).await;
    enable(&db.pool, &["acme", "tenant-bad"]).await;
    let mut no_id = created_as_json("tenant-bad", "", "No id", 1);
    no_id.payload = br#"{"product": {"name": "No id"}}"#.to_vec();
    let rows = [
        product("acme", "p-1", "Tea", 350, true),
        product("acme", "p-1", "Green tea", 420, false),
        product("acme", "p-2", "Cup", 100, true),
        no_id,
        deleted("acme", "p-2"),
        created_as_json("acme", "p-3", "Pot", 2500),
    ];
    produce_rows(&cfg.kafka, &rows).await;
    let (stop, task) = run(&cfg, &db.pool, shop_spec());
    until_delivered(
        &db.pool,
        5,
        "acme's five events delivered",
        Duration::from_secs(30),
    )
    .await;
    let state = sim.account("acme");
    let mut items: Vec<(String, String)> = state
        .items
        .iter()
        .map(|i| (i.external_id.clone(), i.name.clone()))
        .collect();
    items.sort();
    assert_eq!(
        items,
        [
            ("p-1".into(), "Green tea".into()),
            ("p-3".into(), "Pot".into())
        ]
    );
    for price in &state.prices {
        let item = state.items.iter().find(|i| i.id == price.item_id);
        assert_eq!(
            item.map(|i| &i.external_id),
            Some(&price.external_id),
            "{state:?}"
        );
    }
    let mut amounts: Vec<i64> = state.prices.iter().map(|p| p.amount_minor).collect();
    amounts.sort();
    assert_eq!(amounts, [420, 2500]);
    let paused: (String, Option<String>) =
        sqlx::query_as("SELECT state, pause_reason FROM tenants WHERE tenant_id = 'tenant-bad'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(paused.0, "paused");
    assert!(
        paused
            .1
            .unwrap_or_default()
            .contains("events.ProductCreated.our_id")
    );
    assert_eq!(mappings(&db.pool, "acme").await.len(), 4);

    produce_rows(&cfg.kafka, &[disabled("acme")]).await;
    until_delivered(&db.pool, 6, "the rollback done", Duration::from_secs(30)).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let state = sim.account("acme");
    assert!(
        state.items.is_empty() && state.prices.is_empty(),
        "{state:?}"
    );
    assert!(mappings(&db.pool, "acme").await.is_empty());
    let report = &sim.report()["acme"];
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.duplicate_objects, 0, "{report:?}");
    sim_stop.cancel();
    db.drop().await;
}

/// A partner that ignores `Idempotency-Key`, whose first two answers are lost past the
/// client's timeout, still ends with one item and one price: the driver finds what the lost
/// creates made before it creates again. Guarantee: no duplicates, for a declared integration
/// too. Input tried: a create and an update of one product.
#[tokio::test(flavor = "multi_thread")]
async fn the_declared_integration_heals_lost_answers_without_duplicates() {
    let (db, mut cfg, sim, sim_stop) = setup_sim(Duration::from_millis(500)).await;
    cfg.partner.timeout = Duration::from_millis(500);
    enable(&db.pool, &["acme"]).await;
    sim.set_faults(Faults {
        ignore_idempotency_keys: true,
        lose_responses: BTreeMap::from([("acme".to_owned(), 2)]),
        lose_delay_ms: Some(2_000),
        ..Faults::default()
    });
    produce_rows(
        &cfg.kafka,
        &[
            product("acme", "p-1", "Tea", 350, true),
            product("acme", "p-1", "Green tea", 420, false),
        ],
    )
    .await;
    let mut spec = shop_spec();
    // The file's own timeout would outlast the lost answers' hold.
    spec.partner.timeout = None;
    let (stop, task) = run(&cfg, &db.pool, spec);
    until_delivered(
        &db.pool,
        2,
        "both events delivered",
        Duration::from_secs(60),
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let state = sim.account("acme");
    assert_eq!((state.items.len(), state.prices.len()), (1, 1), "{state:?}");
    assert_eq!(state.items[0].name, "Green tea");
    assert_eq!(state.prices[0].amount_minor, 420);
    assert_eq!(state.prices[0].item_id, state.items[0].id);
    let report = &sim.report()["acme"];
    assert_eq!(report.duplicate_objects, 0, "{report:?}");
    sim_stop.cancel();
    db.drop().await;
}

/// The demo's path with the file: the shop writes products and events, the relay carries them,
/// the declared integration delivers; three tenants enabled (their backfill from the file's
/// query, as JSON events) while live changes go on end with zero drift, no duplicate and no
/// order violation. Guarantee: a declared integration and its generic backfill keep each
/// tenant's order with live traffic, and lose nothing.
#[tokio::test(flavor = "multi_thread")]
async fn enabling_tenants_backfills_from_the_files_query_during_live_changes_with_zero_drift() {
    use crate::tenant::{everything_settled_and_verified, load};
    use ferry::tenant::{self, BackfillSource};
    let (db, cfg, sim, sim_stop) = setup_sim(Duration::from_secs(10)).await;
    let (relay_stop, relay_task, _) = crate::relay::start_relay(&cfg).await;
    let spec = shop_spec();
    let backfill = spec
        .backfill
        .clone()
        .expect("the shop file declares its backfill");
    let (stop, task) = run(&cfg, &db.pool, spec);
    let client = PartnerClient::new(&cfg.partner).unwrap();
    ferry::load::run(&db.pool, &load(3, 300, 1)).await.unwrap();
    let live = tokio::spawn({
        let pool = db.pool.clone();
        async move { ferry::load::run(&pool, &load(3, 600, 2)).await.unwrap() }
    });
    let mut backfilled = 0;
    for t in 0..3 {
        let id = tenant::tenant_id(&format!("shop-{t}")).unwrap();
        let enabled = tenant::enable(
            &db.pool,
            "partner",
            &id,
            BackfillSource::Query(&backfill),
            |_| {},
        )
        .await
        .unwrap();
        backfilled += enabled.events.len() - 1;
    }
    live.await.unwrap();
    assert!(backfilled > 0, "there were products to backfill");
    let json_events: i64 = sqlx::query_scalar(
        // `{` first: JSON text, never the shop's protobuf.
        "SELECT count(*) FROM outbox WHERE type = 'ProductCreated' AND get_byte(payload, 0) = 123",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        json_events as usize, backfilled,
        "the backfill's events are JSON"
    );
    let report = everything_settled_and_verified(&db.pool, &client).await;
    assert!(report.iter().map(|d| d.products).sum::<usize>() > 0);
    for d in &report {
        assert_eq!((d.drift(), d.duplicates), (0, 0), "{d:?}");
    }
    for (account, r) in sim.report() {
        assert_eq!(r.order_violations, 0, "{account}: {r:?}");
        assert_eq!(r.duplicate_objects, 0, "{account}: {r:?}");
    }
    relay_stop.cancel();
    relay_task.await.unwrap().unwrap();
    stop.cancel();
    task.await.unwrap().unwrap();
    sim_stop.cancel();
    db.drop().await;
}

/// The README's guide, "Your own integration", as a newcomer follows it: the guide's file
/// (`examples/integrations/courses.toml`, event types of the application's own), the tenant
/// enabled, and JSON events written by a plain SQL `INSERT` through `psql`, carried by the
/// relay. Guarantee: an integration of one's own needs only its file, and its events arrive in
/// order. Input tried: a course saved, renamed, and a second course saved then removed.
#[tokio::test(flavor = "multi_thread")]
async fn the_guides_file_delivers_json_events_written_by_plain_sql() {
    use crate::partner::WithStdin;
    let (db, cfg, sim, sim_stop) = setup_sim(Duration::from_secs(10)).await;
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/integrations/courses.toml");
    let url = cfg.partner.url.clone().unwrap();
    let spec = Spec::load_with(&file, |var| match var {
        "FERRY_PARTNER_URL" => Some(url.clone()),
        "FERRY_PARTNER_TOKEN" => Some(TOKEN.to_owned()),
        _ => None,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (relay_stop, relay_task, _) = crate::relay::start_relay(&cfg).await;
    let name = spec.name.clone();
    let (stop, task) = run(&cfg, &db.pool, spec);
    let school = ferry::tenant::tenant_id("school-1").unwrap();
    let source = ferry::tenant::BackfillSource::Nothing;
    ferry::tenant::enable(&db.pool, &name, &school, source, |_| {})
        .await
        .unwrap();
    let script = r#"
INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, tenant_id) VALUES
 (gen_random_uuid(), 'Course', 'c-1', 'CourseSaved',
  convert_to('{"course": {"id": "c-1", "title": "Rust 101", "summary": "Ownership"}}', 'UTF8'), 'school-1'),
 (gen_random_uuid(), 'Course', 'c-1', 'CourseSaved',
  convert_to('{"course": {"id": "c-1", "title": "Rust 102", "summary": "Traits"}}', 'UTF8'), 'school-1'),
 (gen_random_uuid(), 'Course', 'c-2', 'CourseSaved',
  convert_to('{"course": {"id": "c-2", "title": "Go", "summary": ""}}', 'UTF8'), 'school-1'),
 (gen_random_uuid(), 'Course', 'c-2', 'CourseRemoved',
  convert_to('{"courseId": "c-2"}', 'UTF8'), 'school-1');
"#;
    let libpq_url = db.url.split('?').next().unwrap();
    let out = tokio::process::Command::new("psql")
        .args([libpq_url, "-v", "ON_ERROR_STOP=1", "-qX"])
        .env_remove("PGOPTIONS")
        .stdin(std::process::Stdio::piped())
        .output_with_stdin(script)
        .await;
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    until_delivered(
        &db.pool,
        5,
        "the marker and four events delivered",
        Duration::from_secs(60),
    )
    .await;
    let state = sim.account("school-1");
    let items: Vec<(&str, &str, &str)> = state
        .items
        .iter()
        .map(|i| {
            (
                i.external_id.as_str(),
                i.name.as_str(),
                i.description.as_str(),
            )
        })
        .collect();
    assert_eq!(items, [("c-1", "Rust 102", "Traits")]);
    let report = &sim.report()["school-1"];
    assert_eq!(
        (report.order_violations, report.duplicate_objects),
        (0, 0),
        "{report:?}"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    relay_stop.cancel();
    relay_task.await.unwrap().unwrap();
    sim_stop.cancel();
    db.drop().await;
}
