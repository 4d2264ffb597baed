//! `examples/own_integration.rs`, an integration of one's own in Rust over Ferry's driver, run
//! end to end: the consumer with its handler against the partner simulator.

use std::sync::Arc;
use std::time::Duration;

use ferry::consumer::runtime::{self, ConsumeStats};
use ferry::outbox::OutboxRow;
use ferry::shop::{EventPayload, EventType, proto};
use tokio_util::sync::CancellationToken;

use crate::consume::produce_rows;
use crate::partner::{fast_retries, product, setup_sim, until_delivered};

#[allow(dead_code)] // its `main` is the example's own
#[path = "../../examples/own_integration.rs"]
mod own_integration;

pub(crate) fn deleted(tenant: &str, id: &str) -> OutboxRow {
    let payload = EventPayload::ProductDeleted(proto::ProductDeleted {
        product_id: id.to_owned(),
    });
    OutboxRow {
        event_type: EventType::ProductDeleted.as_str().into(),
        payload: payload.encode_to_vec(),
        ..product(tenant, id, "", 0, true)
    }
}

/// The example's integration mirrors names only: created, renamed and deleted items, no
/// prices, its mappings under its own integration name. Guarantee: an integration of one's own
/// gets Ferry's order, healing and mapping without writing them.
#[tokio::test(flavor = "multi_thread")]
async fn the_example_integration_mirrors_names_end_to_end() {
    let (db, cfg, sim, sim_stop) = setup_sim(Duration::from_secs(10)).await;
    produce_rows(
        &cfg.kafka,
        &[
            product("acme", "p-1", "Tea", 350, true),
            product("acme", "p-1", "Green tea", 350, false),
            product("acme", "p-2", "Cup", 100, true),
            deleted("acme", "p-2"),
        ],
    )
    .await;
    let handler = Arc::new(own_integration::NamesOnly {
        client: ferry::partner::client::PartnerClient::new(&cfg.partner).unwrap(),
        pool: db.pool.clone(),
        mappings: Default::default(),
    });
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (cfg, pool, stop) = (cfg.clone(), db.pool.clone(), stop.clone());
        let stats = Arc::new(ConsumeStats::default());
        async move { runtime::run(&cfg, pool, handler, fast_retries(), stats, stop).await }
    });
    until_delivered(
        &db.pool,
        4,
        "the four events delivered",
        Duration::from_secs(30),
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let state = sim.account("acme");
    assert_eq!(state.items.len(), 1, "{state:?}");
    assert_eq!(state.items[0].name, "Green tea");
    assert_eq!(state.items[0].external_id, "p-1");
    assert!(state.prices.is_empty(), "names only: {state:?}");
    let mappings: Vec<(String, String)> = sqlx::query_as(
        "SELECT integration, local_id FROM integration_mappings WHERE tenant_id = 'acme'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        mappings,
        [(own_integration::INTEGRATION.to_owned(), "p-1".to_owned())]
    );
    sim_stop.cancel();
    db.drop().await;
}
