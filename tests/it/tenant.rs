//! Tenant enable (backfill through the outbox) and disable (rollback) against the real stack:
//! relay, consumer with the partner integration, and the simulator.

use std::time::Duration;

use ferry::partner::client::PartnerClient;
use ferry::tenant::{self, TenantError};

use crate::partner::{consume, fast_retries, setup_sim};
use crate::support::wait_for;

/// Events settled and events in the outbox.
async fn settled_of_written(pool: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM deliveries WHERE settled_at IS NOT NULL), \
                (SELECT count(*) FROM outbox)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until every outbox event is settled, then returns the verification.
pub(crate) async fn everything_settled_and_verified(
    pool: &sqlx::PgPool,
    client: &PartnerClient,
) -> Vec<ferry::partner::verify::TenantDrift> {
    wait_for(
        "every outbox event settled",
        Duration::from_secs(120),
        || async {
            let (settled, written) = settled_of_written(pool).await;
            (settled == written).then_some(())
        },
    )
    .await;
    ferry::partner::verify::verify(pool, "partner", client, &[])
        .await
        .unwrap()
}

pub(crate) fn load(tenants: usize, events: usize, seed: u64) -> ferry::load::LoadOptions {
    ferry::load::LoadOptions {
        tenants,
        events,
        concurrency: tenants,
        tenant_prefix: "shop-".into(),
        seed,
        rate: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_off_is_ignored_then_enabling_it_backfills_during_live_changes_with_zero_drift() {
    let (db, cfg, sim, sim_stop) = setup_sim(Duration::from_secs(10)).await;
    let (relay_stop, relay_task, _) = crate::relay::start_relay(&cfg).await;
    let running = consume(&cfg, &db.pool, fast_retries());
    let client = PartnerClient::new(&cfg.partner).unwrap();

    // Integration off: the changes are recorded as ignored and nothing reaches the partner.
    let before = ferry::load::run(&db.pool, &load(3, 300, 1)).await.unwrap();
    wait_for(
        "the first changes ignored",
        Duration::from_secs(60),
        || async {
            let ignored: i64 =
                sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE outcome = 'ignored'")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            (ignored == before.events() as i64).then_some(())
        },
    )
    .await;
    assert!(sim.requests().is_empty(), "nothing sent while off");

    // Enable all three while live changes (to the products the backfill reads, too) go on.
    let live = tokio::spawn({
        let pool = db.pool.clone();
        async move { ferry::load::run(&pool, &load(3, 600, 2)).await.unwrap() }
    });
    let mut backfilled = 0;
    for t in 0..3 {
        let id = tenant::tenant_id(&format!("shop-{t}")).unwrap();
        let mut last = None;
        let enabled = tenant::enable(
            &db.pool,
            "partner",
            &id,
            tenant::BackfillSource::Products,
            |b| last = Some(b),
        )
        .await
        .unwrap();
        assert!(!enabled.was_enabled);
        let last = last.expect("progress reported");
        assert_eq!(last.written as usize, enabled.events.len() - 1);
        backfilled += last.written;
    }
    live.await.unwrap();
    assert!(backfilled > 0, "there were products to backfill");

    let report = everything_settled_and_verified(&db.pool, &client).await;
    let products: usize = report.iter().map(|d| d.products).sum();
    assert!(products > 0);
    for d in &report {
        assert_eq!((d.drift(), d.duplicates), (0, 0), "{d:?}");
    }
    for (account, r) in sim.report() {
        assert_eq!(r.order_violations, 0, "{account}: {r:?}");
        assert_eq!(r.duplicate_objects, 0, "{account}: {r:?}");
    }
    let status = tenant::status(&db.pool, "partner", &tenant::tenant_id("shop-0").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(status.integration_enabled && status.state == "active");
    assert_eq!(
        status.mapped as usize,
        2 * report
            .iter()
            .find(|d| d.tenant == "shop-0")
            .unwrap()
            .products,
        "an item and a price mapped per product"
    );

    relay_stop.cancel();
    relay_task.await.unwrap().unwrap();
    running.stop().await;
    sim_stop.cancel();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn disabling_a_tenant_rolls_back_everything_ferry_created_and_ignores_what_follows() {
    let (db, cfg, sim, sim_stop) = setup_sim(Duration::from_secs(10)).await;
    let (relay_stop, relay_task, _) = crate::relay::start_relay(&cfg).await;
    let running = consume(&cfg, &db.pool, fast_retries());
    let client = PartnerClient::new(&cfg.partner).unwrap();
    let (gone, kept) = (
        tenant::tenant_id("shop-0").unwrap(),
        tenant::tenant_id("shop-1").unwrap(),
    );
    for t in [&gone, &kept] {
        tenant::enable(
            &db.pool,
            "partner",
            t,
            tenant::BackfillSource::Products,
            |_| {},
        )
        .await
        .unwrap();
    }
    ferry::load::run(&db.pool, &load(2, 300, 3)).await.unwrap();
    let report = everything_settled_and_verified(&db.pool, &client).await;
    assert!(report.iter().all(|d| d.drift() == 0), "{report:?}");
    assert!(!sim.account("shop-0").items.is_empty());

    // A mapping row lost: the rollback still finds that object by our id on it.
    sqlx::query(
        "DELETE FROM integration_mappings WHERE ctid = \
         (SELECT ctid FROM integration_mappings WHERE tenant_id = 'shop-0' AND object_type = 'shop_item' LIMIT 1)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let disabled = tenant::disable(&db.pool, "partner", &gone).await.unwrap();
    // Changes after the switch: ignored for shop-0, delivered for shop-1.
    ferry::load::run(&db.pool, &load(2, 100, 4)).await.unwrap();
    tenant::wait(
        &db.pool,
        "partner",
        &gone,
        &[disabled],
        Duration::from_secs(60),
        |_| {},
    )
    .await
    .unwrap();

    let report = everything_settled_and_verified(&db.pool, &client).await;
    for d in &report {
        assert_eq!((d.drift(), d.duplicates), (0, 0), "{d:?}");
    }
    let state = sim.account("shop-0");
    // Changes written after the switch are handled after the rollback: had one been sent, it
    // would have left an object behind.
    assert!(
        state.items.is_empty() && state.prices.is_empty(),
        "the partner holds nothing of shop-0: {state:?}"
    );
    assert!(!sim.account("shop-1").items.is_empty(), "shop-1 untouched");
    let status = tenant::status(&db.pool, "partner", &gone)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((status.integration_enabled, status.mapped), (false, 0));
    let ignored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM deliveries WHERE tenant_id = 'shop-0' AND outcome = 'ignored'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(ignored > 0, "shop-0's later changes recorded as ignored");
    relay_stop.cancel();
    relay_task.await.unwrap().unwrap();
    running.stop().await;
    sim_stop.cancel();
    db.drop().await;
}

#[tokio::test]
async fn bad_tenant_commands_are_refused_with_what_was_wrong() {
    let db = crate::support::TestDb::migrated().await;
    for raw in ["", "tab\there"] {
        let e = tenant::tenant_id(raw).unwrap_err();
        assert!(matches!(e, TenantError::InvalidId(..)), "{raw:?}: {e}");
        assert!(e.to_string().contains(&format!("{raw:?}")), "{e}");
    }
    let never = tenant::tenant_id("never-enabled").unwrap();
    let e = tenant::disable(&db.pool, "partner", &never)
        .await
        .unwrap_err();
    assert!(matches!(e, TenantError::NotEnabled(_, _)), "{e}");
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(outbox, 0, "a refused disable writes nothing");
    // Nobody consuming: the wait gives up with the tenant's state, not forever.
    let id = tenant::tenant_id("nobody-listens").unwrap();
    let enabled = tenant::enable(
        &db.pool,
        "partner",
        &id,
        tenant::BackfillSource::Products,
        |_| {},
    )
    .await
    .unwrap();
    let e = tenant::wait(
        &db.pool,
        "partner",
        &id,
        &enabled.events,
        Duration::ZERO,
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("0 of 1 events settled") && e.to_string().contains("ferry consume"),
        "{e}"
    );
    db.drop().await;
}

/// Read commands print JSON for a script with `-o json`: `tenant status`, `relay status` and
/// `config check`, each one document a parser takes. Input tried: a tenant never enabled and
/// an enabled one; a fresh database for the relay's slot.
#[tokio::test(flavor = "multi_thread")]
async fn read_commands_print_json_with_o_json() {
    let db = crate::support::TestDb::migrated().await;
    tenant::enable(
        &db.pool,
        "partner",
        &tenant::tenant_id("acme").unwrap(),
        tenant::BackfillSource::Products,
        |_| {},
    )
    .await
    .unwrap();
    let slot = crate::support::unique("ferry_json");
    let (url, slot_name) = (db.url.clone(), slot.clone());
    let run = move |args: &'static [&'static str]| {
        let (url, slot) = (url.clone(), slot_name.clone());
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
                .args(["-o", "json"])
                .args(args)
                .env("FERRY_DATABASE_URL", &url)
                .env("FERRY_RELAY_SLOT", &slot)
                .env("FERRY_RELAY_PUBLICATION", &slot)
                .env("RUST_LOG", "error")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "{args:?}: not JSON ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })
        })
    };
    let status = run(&["tenant", "status", "acme", "nobody"]).await.unwrap();
    assert_eq!(status[0]["tenant"], "acme");
    assert_eq!(status[0]["integrations"][0]["integration"], "partner");
    assert_eq!(status[0]["integrations"][0]["integration_enabled"], true);
    assert_eq!(
        status[1]["integrations"],
        serde_json::json!([]),
        "never enabled: {status}"
    );
    let relay = run(&["relay", "status"]).await.unwrap();
    assert_eq!(
        relay["slot"].as_str().map(str::to_owned),
        Some(slot.clone())
    );
    assert!(relay["lag_bytes"].is_u64(), "{relay}");
    let config = run(&["config", "check"]).await.unwrap();
    assert_eq!(config["valid"], true);
    assert!(config["settings"].as_array().unwrap().len() > 20);
    db.drop().await;
}
