//! The schema: migrations apply to a fresh database, are idempotent, and the constraints the
//! design relies on hold.

use crate::support::TestDb;

/// Ferry's own tables, in its schema. (The shop's `products` is the example application's.)
const FERRY_TABLES: [&str; 11] = [
    "_sqlx_migrations",
    "consumer_groups",
    "control",
    "dead_letters",
    "deliveries",
    "delivery_attempts",
    "integration_mappings",
    "operator_actions",
    "parked_events",
    "tenants",
    "webhook_endpoints",
];

/// The tables of `schema`, sorted.
async fn tables_in(pool: &sqlx::PgPool, schema: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn migrations_apply_to_a_fresh_database_and_are_idempotent() {
    let db = TestDb::empty().await;
    assert_eq!(
        ferry::store::schema_version(&db.pool).await.ok().flatten(),
        None
    );

    ferry::store::migrate(&db.pool)
        .await
        .expect("first migration run");
    let latest = ferry::store::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap();
    assert_eq!(
        ferry::store::schema_version(&db.pool).await.unwrap(),
        Some(latest)
    );

    // Ferry's tables in its schema; only the application's outbox in public.
    assert_eq!(tables_in(&db.pool, "ferry").await, FERRY_TABLES);
    assert_eq!(tables_in(&db.pool, "public").await, ["outbox"]);

    // Running again (a second instance starting) changes nothing.
    ferry::store::migrate(&db.pool)
        .await
        .expect("second migration run");
    assert_eq!(
        ferry::store::schema_version(&db.pool).await.unwrap(),
        Some(latest)
    );

    let kill_switch: bool = sqlx::query_scalar("SELECT kill_switch FROM control")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!kill_switch, "the kill switch starts off");
    db.drop().await;
}

#[tokio::test]
async fn the_stack_postgres_has_logical_wal() {
    let db = TestDb::empty().await;
    let wal_level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(wal_level, "logical", "the relay needs wal_level=logical");
    db.drop().await;
}

/// The SQLSTATE of a failed statement.
async fn sqlstate(db: &TestDb, sql: &str) -> Option<String> {
    match sqlx::query(sql).execute(&db.pool).await {
        Ok(_) => None,
        Err(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()),
        Err(e) => panic!("{sql}: {e}"),
    }
}

#[tokio::test]
async fn constraints_reject_what_the_design_forbids() {
    let db = TestDb::migrated().await;
    const UNIQUE: &str = "23505";
    const CHECK: &str = "23514";
    const NOT_NULL: &str = "23502";

    // One mapping per (integration, object type, local id): a retried create cannot map twice.
    let mapping = "INSERT INTO integration_mappings (integration, object_type, local_id, foreign_id, tenant_id) \
                   VALUES ('shop', 'shop_item', 'p-1', 'item-1', 'acme')";
    assert_eq!(sqlstate(&db, mapping).await, None);
    assert_eq!(sqlstate(&db, mapping).await.as_deref(), Some(UNIQUE));
    let other_type = "INSERT INTO integration_mappings (integration, object_type, local_id, foreign_id, tenant_id) \
                      VALUES ('shop', 'shop_price', 'p-1', 'price-1', 'acme')";
    assert_eq!(
        sqlstate(&db, other_type).await,
        None,
        "another object type of the same product maps"
    );

    // An outbox row must name its tenant.
    let no_tenant = "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, tenant_id) \
                     VALUES (gen_random_uuid(), 'Product', 'p', 'ProductCreated', '\\x00', NULL)";
    assert_eq!(sqlstate(&db, no_tenant).await.as_deref(), Some(NOT_NULL));
    let empty_tenant = "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, tenant_id) \
                        VALUES (gen_random_uuid(), 'Product', 'p', 'ProductCreated', '\\x00', '')";
    assert_eq!(sqlstate(&db, empty_tenant).await.as_deref(), Some(CHECK));

    // A paused tenant always says why.
    let silent_pause =
        "INSERT INTO tenants (integration, tenant_id, state) VALUES ('partner', 'acme', 'paused')";
    assert_eq!(sqlstate(&db, silent_pause).await.as_deref(), Some(CHECK));
    let pause = "INSERT INTO tenants (integration, tenant_id, state, pause_cause, pause_reason, paused_at) \
                 VALUES ('partner', 'acme', 'paused', 'permanent', 'partner said 422', now())";
    assert_eq!(sqlstate(&db, pause).await, None);
    let unknown_state = "INSERT INTO tenants (integration, tenant_id, state) VALUES ('partner', 'beta', 'sleeping')";
    assert_eq!(sqlstate(&db, unknown_state).await.as_deref(), Some(CHECK));

    // A record is parked once, however often it is redelivered.
    let park = "INSERT INTO parked_events (integration, tenant_id, topic, partition, \"offset\") VALUES ('partner', 'acme', 't', 0, 7)";
    assert_eq!(sqlstate(&db, park).await, None);
    assert_eq!(sqlstate(&db, park).await.as_deref(), Some(UNIQUE));

    // One delivery record per event id: the dedupe record.
    let delivery = "INSERT INTO deliveries (integration, event_id, tenant_id, outcome) \
                    VALUES ('partner', '0b6c6f0e-2f4a-4c6e-9a51-3f1f0c2d9e11', 'acme', 'delivered')";
    assert_eq!(sqlstate(&db, delivery).await, None);
    assert_eq!(sqlstate(&db, delivery).await.as_deref(), Some(UNIQUE));
    let bad_outcome = "INSERT INTO deliveries (integration, event_id, tenant_id, outcome) \
                       VALUES ('partner', gen_random_uuid(), 'acme', 'lost')";
    assert_eq!(sqlstate(&db, bad_outcome).await.as_deref(), Some(CHECK));

    // The control row is a singleton.
    assert_eq!(
        sqlstate(&db, "INSERT INTO control (singleton) VALUES (false)")
            .await
            .as_deref(),
        Some(CHECK)
    );
    assert_eq!(
        sqlstate(&db, "INSERT INTO control (singleton) VALUES (true)")
            .await
            .as_deref(),
        Some(UNIQUE)
    );
    db.drop().await;
}

/// Ferry's migrations as today's main applied them before it had a schema of its own: every
/// table, and the migrations table, in `public`.
async fn migrate_the_old_layout(db: &TestDb) -> sqlx::PgPool {
    let options: sqlx::postgres::PgConnectOptions = db.url.parse().unwrap();
    let public = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.options([("search_path", "public")]))
        .await
        .unwrap();
    // Version 2 created the shop's `products` then; it is the example application's now.
    let mut migrations: Vec<sqlx::migrate::Migration> =
        ferry::store::MIGRATOR.iter().take(4).cloned().collect();
    migrations.insert(
        1,
        sqlx::migrate::Migration::new(
            2,
            "products".into(),
            sqlx::migrate::MigrationType::Simple,
            include_str!("../../examples/shop/schema.sql").into(),
            false,
        ),
    );
    let old = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(migrations),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    };
    old.run(&public).await.unwrap();
    public
}

/// Upgrade in place: a database migrated by the layout before Ferry had a schema of its own is
/// adopted by the next `migrate`, with every row kept. Input tried: the old layout with a
/// paused tenant, a mapping, a settled event, a parked record and an outbox row. The rows are
/// filed under the one integration the mappings name (`courses`), as migration 0008 adopts them.
#[tokio::test]
async fn a_database_of_the_old_layout_is_upgraded_in_place_with_nothing_lost() {
    let db = TestDb::empty().await;
    let public = migrate_the_old_layout(&db).await;
    for sql in [
        "INSERT INTO tenants (tenant_id, state, pause_cause, pause_reason, paused_at) \
         VALUES ('acme', 'paused', 'permanent', 'partner said 422', now())",
        "INSERT INTO integration_mappings (integration, object_type, local_id, foreign_id, tenant_id) \
         VALUES ('courses', 'shop_item', 'p-1', 'item-1', 'acme')",
        "INSERT INTO deliveries (event_id, tenant_id, outcome, settled_at) \
         VALUES ('018f0000-0000-7000-8000-000000000001', 'acme', 'delivered', now())",
        "INSERT INTO parked_events (tenant_id, topic, partition, \"offset\") VALUES ('acme', 't', 0, 7)",
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, tenant_id) \
         VALUES (gen_random_uuid(), 'Product', 'p-1', 'ProductCreated', '\\x00', 'acme')",
    ] {
        sqlx::query(sql).execute(&public).await.unwrap();
    }
    public.close().await;

    ferry::store::migrate(&db.pool).await.expect("the upgrade");
    assert_eq!(tables_in(&db.pool, "ferry").await, FERRY_TABLES);
    assert_eq!(tables_in(&db.pool, "public").await, ["outbox", "products"]);
    let latest = ferry::store::MIGRATOR.iter().map(|m| m.version).max();
    assert_eq!(
        ferry::store::schema_version(&db.pool).await.unwrap(),
        latest
    );
    for (table, rows) in [
        ("ferry.tenants", 1),
        ("ferry.integration_mappings", 1),
        ("ferry.deliveries", 1),
        ("ferry.parked_events", 1),
        ("ferry.control", 1),
        ("public.outbox", 1),
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, rows, "{table}");
    }
    for table in ["tenants", "deliveries", "parked_events"] {
        let named: Vec<String> =
            sqlx::query_scalar(&format!("SELECT DISTINCT integration FROM ferry.{table}"))
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(
            named,
            ["courses"],
            "{table}: filed under the mappings' integration"
        );
    }
    // A sequence moved with its table: the next parked record is numbered after the first.
    sqlx::query("INSERT INTO parked_events (integration, tenant_id, topic, partition, \"offset\") VALUES ('courses', 'acme', 't', 0, 8)")
        .execute(&db.pool)
        .await
        .unwrap();
    // And again: nothing left to adopt.
    ferry::store::migrate(&db.pool).await.expect("a second run");
    db.drop().await;
}

/// An application with sqlx migrations and tables of its own in `public`, some named like
/// Ferry's: Ferry's schema never touches them. Input tried: an application `tenants` table and
/// its own `_sqlx_migrations` with a version 1 of different content.
#[tokio::test]
async fn the_applications_own_tables_and_migrations_are_left_alone() {
    let db = TestDb::empty().await;
    let options: sqlx::postgres::PgConnectOptions = db.url.parse().unwrap();
    let app = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.options([("search_path", "public")]))
        .await
        .unwrap();
    let apps = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(vec![sqlx::migrate::Migration::new(
            1,
            "app".into(),
            sqlx::migrate::MigrationType::Simple,
            "CREATE TABLE tenants (name text PRIMARY KEY); INSERT INTO tenants VALUES ('theirs')"
                .into(),
            false,
        )]),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    };
    apps.run(&app).await.unwrap();

    ferry::store::migrate(&db.pool)
        .await
        .expect("Ferry's migrations");
    assert_eq!(tables_in(&db.pool, "ferry").await, FERRY_TABLES);
    let mut public = tables_in(&db.pool, "public").await;
    public.sort();
    assert_eq!(public, ["_sqlx_migrations", "outbox", "tenants"]);
    let theirs: String = sqlx::query_scalar("SELECT name FROM public.tenants")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(theirs, "theirs");
    // The application's migrations table still holds only its own history.
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM public._sqlx_migrations")
        .fetch_all(&app)
        .await
        .unwrap();
    assert_eq!(versions, [1]);
    app.close().await;
    db.drop().await;
}
