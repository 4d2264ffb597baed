//! The schema: migrations apply to a fresh database, are idempotent, and the constraints the
//! design relies on hold.

use crate::support::TestDb;

const TABLES: [&str; 10] = [
    "control",
    "deliveries",
    "delivery_attempts",
    "integration_mappings",
    "operator_actions",
    "outbox",
    "parked_events",
    "products",
    "tenants",
    "_sqlx_migrations",
];

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

    let mut tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    tables.sort();
    let mut expected: Vec<String> = TABLES.iter().map(|t| (*t).to_owned()).collect();
    expected.sort();
    assert_eq!(tables, expected);

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
    let silent_pause = "INSERT INTO tenants (tenant_id, state) VALUES ('acme', 'paused')";
    assert_eq!(sqlstate(&db, silent_pause).await.as_deref(), Some(CHECK));
    let pause = "INSERT INTO tenants (tenant_id, state, pause_cause, pause_reason, paused_at) \
                 VALUES ('acme', 'paused', 'permanent', 'partner said 422', now())";
    assert_eq!(sqlstate(&db, pause).await, None);
    let unknown_state = "INSERT INTO tenants (tenant_id, state) VALUES ('beta', 'sleeping')";
    assert_eq!(sqlstate(&db, unknown_state).await.as_deref(), Some(CHECK));

    // A record is parked once, however often it is redelivered.
    let park = "INSERT INTO parked_events (tenant_id, topic, partition, \"offset\") VALUES ('acme', 't', 0, 7)";
    assert_eq!(sqlstate(&db, park).await, None);
    assert_eq!(sqlstate(&db, park).await.as_deref(), Some(UNIQUE));

    // One delivery record per event id: the dedupe record.
    let delivery = "INSERT INTO deliveries (event_id, tenant_id, outcome) \
                    VALUES ('0b6c6f0e-2f4a-4c6e-9a51-3f1f0c2d9e11', 'acme', 'delivered')";
    assert_eq!(sqlstate(&db, delivery).await, None);
    assert_eq!(sqlstate(&db, delivery).await.as_deref(), Some(UNIQUE));
    let bad_outcome = "INSERT INTO deliveries (event_id, tenant_id, outcome) \
                       VALUES (gen_random_uuid(), 'acme', 'lost')";
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
