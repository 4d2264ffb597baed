//! Several integrations on one outbox topic and one database: each a consumer group of its own,
//! each with its own records of the same events.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::consumer::ledger;
use ferry::consumer::runtime::ConsumeError;
use ferry::outbox::wire::OutboxRow;

use crate::consume::{Recorder, committed, produce_rows, row, start};
use crate::support::{TestDb, config, fresh_topic, unique, wait_for};

/// A recorder standing for the integration `name`, failing `failing` tenants permanently.
fn recorder(name: &str, failing: &[&str]) -> Arc<Recorder> {
    Arc::new(Recorder {
        integration: name.to_owned(),
        failing: Mutex::new(failing.iter().map(|t| (*t).to_owned()).collect()),
        ..Default::default()
    })
}

/// Each tenant's calls, in the order the handler saw them.
fn calls_of(handler: &Recorder) -> HashMap<String, Vec<i64>> {
    let mut per_tenant: HashMap<String, Vec<i64>> = HashMap::new();
    for (tenant, seq) in handler.calls.lock().unwrap().iter() {
        per_tenant.entry(tenant.clone()).or_default().push(*seq);
    }
    per_tenant
}

async fn state_of(pool: &sqlx::PgPool, integration: &str, tenant: &str) -> Option<String> {
    sqlx::query_scalar("SELECT state FROM tenants WHERE integration = $1 AND tenant_id = $2")
        .bind(integration)
        .bind(tenant)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// Guarantees: nobody blocked by another tenant, now across integrations too. The same events
/// go to two integrations: "shop" fails acme and pauses it there, while "hooks" delivers every
/// one of acme's events in order; each keeps its own dedupe record of the same event ids, and
/// once acme is resumed in "shop" its backlog arrives there in order, nothing lost or doubled.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_paused_for_one_integration_keeps_flowing_to_another() {
    const PER_TENANT: i64 = 12;
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(2).await;
    let shop_cfg = config(&db, &kafka);
    let mut hooks_cfg = shop_cfg.clone();
    hooks_cfg.kafka.group_id = unique("ferry-test-hooks");
    let rows: Vec<OutboxRow> = (1..=PER_TENANT)
        .flat_map(|seq| ["acme", "globex"].map(|t| row(t, seq)))
        .collect();
    produce_rows(&kafka, &rows).await;

    let shop = recorder("shop", &["acme"]);
    let hooks = recorder("hooks", &[]);
    let (shop_stop, shop_task, shop_stats) = start(&shop_cfg, &db.pool, &shop);
    let (hooks_stop, hooks_task, hooks_stats) = start(&hooks_cfg, &db.pool, &hooks);
    wait_for(
        "hooks delivered all; shop delivered globex and parked acme",
        Duration::from_secs(60),
        || async {
            let hooks_done = hooks_stats.delivered.load(Ordering::Relaxed) == 2 * PER_TENANT as u64;
            let shop_done = shop_stats.delivered.load(Ordering::Relaxed) == PER_TENANT as u64
                && shop_stats.parked.load(Ordering::Relaxed) == PER_TENANT as u64;
            (hooks_done && shop_done).then_some(())
        },
    )
    .await;
    // Settlements are written in batches after the handler returns: wait for them too.
    wait_for(
        "every settlement on record",
        Duration::from_secs(30),
        || async {
            let settled: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM deliveries WHERE settled_at IS NOT NULL \
             AND (integration = 'hooks' OR tenant_id = 'globex')",
            )
            .fetch_one(&db.pool)
            .await
            .ok()?;
            (settled == 3 * PER_TENANT).then_some(())
        },
    )
    .await;
    let in_order: Vec<i64> = (1..=PER_TENANT).collect();
    let hooks_calls = calls_of(&hooks);
    assert_eq!(
        hooks_calls["acme"], in_order,
        "acme flows to hooks, in order"
    );
    assert_eq!(hooks_calls["globex"], in_order);
    assert_eq!(
        calls_of(&shop)["acme"],
        vec![1],
        "acme is paused in shop at once"
    );
    assert_eq!(
        state_of(&db.pool, "shop", "acme").await.as_deref(),
        Some("paused")
    );
    assert_eq!(
        state_of(&db.pool, "hooks", "acme").await,
        None,
        "never paused in hooks"
    );
    // The same event ids, settled by each for itself.
    let (both, hooks_only): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.event_id IS NOT NULL), count(*) FILTER (WHERE s.event_id IS NULL) \
         FROM deliveries h LEFT JOIN deliveries s ON s.integration = 'shop' AND s.event_id = h.event_id \
                                                 AND s.settled_at IS NOT NULL \
         WHERE h.integration = 'hooks' AND h.settled_at IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (both, hooks_only),
        (PER_TENANT, PER_TENANT),
        "globex's in both, acme's in hooks"
    );
    let parked: Vec<(String, i64)> =
        sqlx::query_as("SELECT integration, count(*) FROM parked_events GROUP BY integration")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(parked, vec![("shop".to_owned(), PER_TENANT)]);

    // Shop's partner is fixed; an operator resumes acme there: its backlog, in order.
    shop.failing.lock().unwrap().clear();
    assert!(
        !ledger::request_resume(&db.pool, "hooks", "acme", "test", "wrong integration")
            .await
            .unwrap(),
        "acme is not paused in hooks: nothing to resume there"
    );
    assert!(
        ledger::request_resume(&db.pool, "shop", "acme", "test", "partner fixed")
            .await
            .unwrap()
    );
    wait_for(
        "acme live again in shop",
        Duration::from_secs(30),
        || async {
            (state_of(&db.pool, "shop", "acme").await.as_deref() == Some("active")).then_some(())
        },
    )
    .await;
    let mut expected = vec![1];
    expected.extend(1..=PER_TENANT);
    assert_eq!(
        calls_of(&shop)["acme"],
        expected,
        "the failed first try, then the backlog in order"
    );
    assert_eq!(
        calls_of(&hooks)["acme"],
        in_order,
        "nothing sent to hooks twice"
    );
    let groups: Vec<(String, String)> =
        sqlx::query_as("SELECT group_id, integration FROM consumer_groups ORDER BY integration")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        groups,
        vec![
            (hooks_cfg.kafka.group_id.clone(), "hooks".to_owned()),
            (shop_cfg.kafka.group_id.clone(), "shop".to_owned()),
        ]
    );
    for (stop, task) in [(shop_stop, shop_task), (hooks_stop, hooks_task)] {
        stop.cancel();
        task.await.unwrap().unwrap();
    }
    db.drop().await;
}

/// Guarantee: nothing sent twice. An event addressed to one integration (a tenant's backfill,
/// an operator's replay for one partner) reaches that one alone; the other commits past it
/// without a record.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_addressed_to_one_integration_reaches_that_one_alone() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let shop_cfg = config(&db, &kafka);
    let mut hooks_cfg = shop_cfg.clone();
    hooks_cfg.kafka.group_id = unique("ferry-test-hooks");
    let addressed = |seq: i64, to: &str| OutboxRow {
        integration: Some(to.to_owned()),
        ..row("acme", seq)
    };
    let rows = vec![
        row("acme", 1),
        addressed(2, "shop"),
        addressed(3, "hooks"),
        row("acme", 4),
    ];
    let last = produce_rows(&kafka, &rows).await;
    let shop = recorder("shop", &[]);
    let hooks = recorder("hooks", &[]);
    let (shop_stop, shop_task, _) = start(&shop_cfg, &db.pool, &shop);
    let (hooks_stop, hooks_task, _) = start(&hooks_cfg, &db.pool, &hooks);
    for kafka in [&shop_cfg.kafka, &hooks_cfg.kafka] {
        wait_for(
            "each group committed past every record",
            Duration::from_secs(60),
            || async { (committed(kafka).await == Some(last + 1)).then_some(()) },
        )
        .await;
    }
    assert_eq!(calls_of(&shop)["acme"], vec![1, 2, 4]);
    assert_eq!(calls_of(&hooks)["acme"], vec![1, 3, 4]);
    let recorded: Vec<(String, i64)> = sqlx::query_as(
        "SELECT integration, count(*) FROM deliveries GROUP BY integration ORDER BY integration",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        recorded,
        vec![("hooks".to_owned(), 3), ("shop".to_owned(), 3)],
        "the other integration's event leaves no record"
    );
    for (stop, task) in [(shop_stop, shop_task), (hooks_stop, hooks_task)] {
        stop.cancel();
        task.await.unwrap().unwrap();
    }
    db.drop().await;
}

/// Bad input: a second integration started on a consumer group the first one runs. Sharing it,
/// each would read only some of the partitions; it is refused, naming both, and the first one
/// keeps its group.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_group_of_another_integration_is_refused() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let last = produce_rows(&kafka, &[row("acme", 1)]).await;
    let shop = recorder("shop", &[]);
    let (stop, task, _) = start(&cfg, &db.pool, &shop);
    wait_for("shop committed", Duration::from_secs(60), || async {
        (committed(&kafka).await == Some(last + 1)).then_some(())
    })
    .await;
    let hooks = recorder("hooks", &[]);
    let (_, refused, _) = start(&cfg, &db.pool, &hooks);
    let err = tokio::time::timeout(Duration::from_secs(30), refused)
        .await
        .expect("refused at start")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ConsumeError::GroupTaken { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("\"shop\"")
            && message.contains("\"hooks\"")
            && message.contains("kafka.group_id"),
        "{message}"
    );
    assert!(hooks.calls.lock().unwrap().is_empty());
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}
