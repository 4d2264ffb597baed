//! The consumer's ledger against Postgres: batched settlement is the dedupe record, parking is
//! idempotent and ordered, a pause always carries its reason.

use ferry::consumer::ledger::{self, ParkedRecord, Pause, SettledAs, Settlement};
use sqlx::Arguments;
use sqlx::postgres::PgArguments;
use uuid::Uuid;

use crate::support::TestDb;

fn settlement(id: Uuid, offset: i64) -> Settlement {
    Settlement {
        event_id: id,
        tenant_id: "acme".into(),
        event_type: Some("ProductCreated".into()),
        outcome: SettledAs::Delivered,
        attempts: 1,
        error: None,
        topic: "t".into(),
        partition: 0,
        offset,
        written_at: None,
        acked_at: None,
        unrecorded: false,
    }
}

/// `batch` settled as the consumer settles it, nothing else in its transaction; rows written.
async fn settle(pool: &sqlx::PgPool, batch: &[Settlement]) -> u64 {
    ledger::settle(pool, "partner", batch, (&[], &Default::default()), None)
        .await
        .unwrap()
}

/// What an earlier owner of the partition writes after a batch's dedupe lookup: `late`
/// settled (as expired), `failed` recorded unsettled after two attempts.
async fn late_rows(pool: &sqlx::PgPool, late: Uuid, failed: Uuid) {
    let mut first = settlement(late, 1);
    first.outcome = SettledAs::Expired;
    settle(pool, &[first]).await;
    sqlx::query(
        "INSERT INTO deliveries (integration, event_id, tenant_id, outcome, attempts) \
         VALUES ('partner', $1, 'acme', 'failed', 2)",
    )
    .bind(failed)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn settlement_is_batched_and_a_replay_never_rewrites_it() {
    let db = TestDb::migrated().await;
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let batch: Vec<Settlement> = ids
        .iter()
        .zip(0..)
        .map(|(id, o)| settlement(*id, o))
        .collect();
    assert_eq!(settle(&db.pool, &batch).await, 3);

    // A redelivery of the second event, now "expired", beside a new event.
    let fresh = Uuid::now_v7();
    let mut replay = settlement(ids[1], 1);
    replay.outcome = SettledAs::Expired;
    let again = [replay, settlement(fresh, 3)];
    assert_eq!(settle(&db.pool, &again).await, 1);
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM deliveries WHERE event_id = $1")
        .bind(ids[1])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(outcome, "delivered", "the first record stands");

    let unknown = Uuid::now_v7();
    let found = ledger::settled_ids(&db.pool, "partner", &[ids[0], unknown, fresh])
        .await
        .unwrap();
    assert_eq!(found, [ids[0], fresh].into_iter().collect());
    db.drop().await;
}

/// Guarantee defended: the dedupe record `COPY` writes (an event the lookup found no record
/// of) is the record the conflict clause's insert writes, field for field.
/// Input tried: two settlements with every field set (text, integers, microsecond timestamps)
/// and two with every nullable field empty, one of each pair through each path.
#[tokio::test]
async fn copy_and_insert_write_the_same_settlement_record() {
    let db = TestDb::migrated().await;
    let at = |micros| chrono::DateTime::from_timestamp_micros(micros).unwrap();
    let full = |id, unrecorded| Settlement {
        event_type: Some("ProductUpdated ü".into()),
        outcome: SettledAs::BadEvent,
        attempts: 3,
        error: Some("bad: payload".into()),
        partition: 7,
        written_at: Some(at(1_764_000_000_123_456)),
        acked_at: Some(at(1_764_000_001_654_321)),
        unrecorded,
        ..settlement(id, i64::MAX - 1)
    };
    let empty = |id, unrecorded| Settlement {
        event_type: None,
        unrecorded,
        ..settlement(id, 0)
    };
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let batch = [
        full(ids[0], true),
        full(ids[1], false),
        empty(ids[2], true),
        empty(ids[3], false),
    ];
    // As the consumer's settlement writes it.
    assert_eq!(settle(&db.pool, &batch).await, 4);

    type Row = (String, String, serde_json::Value);
    let row = |id: Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, Row>(
                "SELECT integration, tenant_id, to_jsonb(d) - 'event_id' - 'settled_at' \
                   - 'first_seen_at' - 'updated_at' \
                 FROM deliveries d WHERE event_id = $1 AND settled_at > now() - interval '1 minute' \
                   AND settled_at < now() + interval '1 minute'",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (copied, inserted) = (row(ids[0]).await, row(ids[1]).await);
    assert_eq!(copied, inserted, "every field set");
    let written_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT written_at FROM deliveries WHERE event_id = $1")
            .bind(ids[0])
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(written_at, batch[0].written_at, "to the microsecond");
    assert_eq!(copied.2["offset"], i64::MAX - 1);
    assert_eq!(
        row(ids[2]).await,
        row(ids[3]).await,
        "nullable fields empty"
    );
    assert_eq!(row(ids[2]).await.2["event_type"], serde_json::Value::Null);
    db.drop().await;
}

/// Defends: nothing lost and nothing recorded twice when a batch's `COPY`, its transaction's
/// first write with no savepoint, meets a row an earlier owner wrote after the lookup. Tried:
/// one unrecorded event settled meanwhile, one recorded failed meanwhile, one new, with a
/// mapping and an attempt in the batch; the whole transaction is written again.
#[tokio::test]
async fn a_batch_whose_copy_meets_a_late_row_is_written_again_whole() {
    use ferry::mappings::{Mapped, MappingChange, Mappings};
    let db = TestDb::migrated().await;
    let (late, failed, new) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let unrecorded = |id, offset| Settlement {
        unrecorded: true,
        ..settlement(id, offset)
    };
    let looked_up = ledger::recorded_ids(&db.pool, "partner", &[late, failed, new])
        .await
        .unwrap();
    assert_eq!(looked_up, ledger::Recorded::default());
    // After the lookup found none of them: an earlier owner settles one, another is recorded
    // failed.
    late_rows(&db.pool, late, failed).await;
    let recorded = ledger::recorded_ids(&db.pool, "partner", &[late, failed, new])
        .await
        .unwrap();
    assert_eq!(recorded.settled, [late].into_iter().collect());
    assert_eq!(recorded.unsettled, [failed].into_iter().collect());

    let mappings = Mappings::default();
    let change = MappingChange {
        tenant: "acme".into(),
        object_type: "shop_item".into(),
        local_id: "p-1".into(),
        mapped: Some(Mapped {
            foreign_id: "item-1".into(),
            created_by: Some(new),
        }),
    };
    mappings.stage(new, change);
    let staged = mappings.take(&[new]);
    let attempt = ledger::AttemptLog {
        event_id: failed,
        attempt: 3,
        started_at: chrono::Utc::now(),
        finished_at: chrono::Utc::now(),
        outcome: "delivered",
        error: None,
        response: None,
        instance: "test".into(),
    };
    let batch = [
        unrecorded(late, 1),
        unrecorded(failed, 2),
        unrecorded(new, 3),
    ];
    let written = ledger::settle(&db.pool, "partner", &batch, (&[attempt], &staged), None)
        .await
        .expect("a record met after the lookup is not an error");
    assert_eq!(
        written, 2,
        "the failed event settled and the new one recorded"
    );

    let rows: Vec<(Uuid, String, i32)> = sqlx::query_as(
        "SELECT event_id, outcome, attempts FROM deliveries WHERE integration = 'partner' \
         ORDER BY event_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut expected = vec![
        (late, "expired", 1),
        (failed, "delivered", 3),
        (new, "delivered", 1),
    ];
    expected.sort();
    assert_eq!(
        rows.iter()
            .map(|(id, o, a)| (*id, o.as_str(), *a))
            .collect::<Vec<_>>(),
        expected,
        "the late record kept, the failed one settled with its attempts added, the new one once"
    );
    let mapped: Vec<(String, String)> = sqlx::query_as(
        "SELECT local_id, foreign_id FROM integration_mappings WHERE integration = 'partner'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(mapped, [("p-1".to_owned(), "item-1".to_owned())]);
    let attempts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM delivery_attempts WHERE event_id = $1 AND attempt = 3",
    )
    .bind(failed)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        attempts, 1,
        "the attempt written once, in the rewritten transaction"
    );
    db.drop().await;
}

/// `n` settled events of the integration `partner`.
async fn settled_rows(pool: &sqlx::PgPool, n: i32) {
    sqlx::query(
        "INSERT INTO deliveries (integration, event_id, tenant_id, outcome, settled_at) \
         SELECT 'partner', gen_random_uuid(), 'acme', 'delivered', now() FROM generate_series(1, $1)",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

/// The dedupe lookup on a connection of Ferry's, which looked up while `deliveries` was empty
/// and again once 50,000 settled rows had arrived (not yet analyzed, as in a deployment's first
/// minutes), never runs a cached generic plan. PostgreSQL switches a prepared statement to one
/// after five executions; made while the table was empty, it is a sequential scan comparing
/// every row with every id, and it stays as the table grows: one lookup of 500 ids took a second
/// at 200,000 rows. A plain connection beside it, doing the same, does switch: the control that
/// shows the check can see it.
#[tokio::test]
async fn the_dedupe_lookup_is_planned_for_the_table_as_it_is() {
    let db = TestDb::migrated().await;
    let ferrys = ferry::store::connect(&ferry::config::DatabaseConfig {
        max_connections: 1,
        ..ferry::config::DatabaseConfig::new(db.url.clone())
    })
    .await
    .unwrap();
    // A session with Ferry's schema but Postgres's default plan cache.
    let plain_options: sqlx::postgres::PgConnectOptions = db.url.parse().unwrap();
    let plain = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(plain_options.options([("search_path", "ferry,public")]))
        .await
        .unwrap();
    let probe: Vec<Uuid> = (0..500).map(|_| Uuid::now_v7()).collect();
    for pool in [&ferrys, &plain] {
        for _ in 0..10 {
            assert!(
                ledger::settled_ids(pool, "partner", &probe)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
    }
    settled_rows(&db.pool, 50_000).await;
    let known: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM deliveries LIMIT 3")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let asked: Vec<Uuid> = probe.iter().copied().chain(known.iter().copied()).collect();
    // Each session's prepared statements that ran a generic plan (this query aside).
    let generic = |pool: sqlx::PgPool| async move {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT statement, generic_plans FROM pg_prepared_statements \
             WHERE generic_plans > 0 AND statement NOT LIKE '%pg_prepared_statements%'",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    for pool in [&ferrys, &plain] {
        for _ in 0..3 {
            let found = ledger::settled_ids(pool, "partner", &asked).await.unwrap();
            assert_eq!(found, known.iter().copied().collect());
        }
    }
    let on_ferrys = generic(ferrys.clone()).await;
    assert!(
        on_ferrys.is_empty(),
        "a statement ran a plan cached from an empty table: {on_ferrys:?}"
    );
    let on_plain = generic(plain.clone()).await;
    assert!(
        on_plain
            .iter()
            .any(|(sql, _)| sql.contains("FROM deliveries")),
        "control: a plain connection caches the lookup's generic plan ({on_plain:?})"
    );
    ferrys.close().await;
    plain.close().await;
    db.drop().await;
}

/// Rows a plan read from `relation`: what each of its scans of it returned and what their
/// filters removed, over all their loops (EXPLAIN reports both per loop).
fn rows_read(node: &serde_json::Value, relation: &str) -> f64 {
    let n = |key: &str| {
        node.get(key)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    let own = if node.get("Relation Name").and_then(|r| r.as_str()) == Some(relation) {
        (n("Actual Rows") + n("Rows Removed by Filter") + n("Rows Removed by Index Recheck"))
            * n("Actual Loops")
    } else {
        0.0
    };
    let children = node.get("Plans").and_then(|p| p.as_array());
    own + children.map_or(0.0, |c| c.iter().map(|p| rows_read(p, relation)).sum())
}

/// Runs `sql` with `args` under `EXPLAIN ANALYZE`: the rows it read of `relation`.
async fn rows_read_by<'c>(
    on: impl sqlx::PgExecutor<'c>,
    sql: &str,
    relation: &str,
    args: PgArguments,
) -> f64 {
    let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}");
    let plan: serde_json::Value = sqlx::query_scalar_with(&explain, args)
        .fetch_one(on)
        .await
        .unwrap();
    rows_read(&plan[0]["Plan"], relation)
}

/// Statement parameters, in order.
macro_rules! args {
    ($($v:expr),*) => {{
        let mut args = PgArguments::default();
        $(args.add($v).unwrap();)*
        args
    }};
}

/// The per-record lookups read one row per key, not every row of the integration or the
/// tenant, on tables that were never analyzed (a deployment's first minutes, a new
/// integration's first rows), as they run on Ferry's sessions (each execution planned).
/// Tried: 500 unknown event ids and 3 settled ones against 50,000 settled rows; our id `p42`
/// for two object types against the tenant's 5,000 mappings and 20,000 of 50 other tenants; a
/// batch removing 19 of them and one that is not there (`mappings::REMOVE`); the view of a
/// tenant with 3 mappings beside them (`driver::LOAD`). The controls, which read every row: the
/// plain form of the dedupe lookup (`= ANY`), and the removal with the integration as a
/// constant filter, as it was before it came through the `UNNEST`.
#[tokio::test]
async fn the_per_record_lookups_probe_one_row_per_key_on_tables_without_statistics() {
    let db = TestDb::migrated().await;
    for table in ["deliveries", "integration_mappings", "tenants"] {
        sqlx::query(&format!(
            "ALTER TABLE {table} SET (autovacuum_enabled = false)"
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    settled_rows(&db.pool, 50_000).await;
    sqlx::query(
        "INSERT INTO integration_mappings (integration, tenant_id, object_type, local_id, foreign_id) \
         SELECT 'partner', 'acme', 'product', 'p' || i, 'f' || i FROM generate_series(1, 5000) i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let known: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM deliveries LIMIT 3")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let asked: Vec<Uuid> = (0..500)
        .map(|_| Uuid::now_v7())
        .chain(known.iter().copied())
        .collect();
    let found = ledger::settled_ids(&db.pool, "partner", &asked)
        .await
        .unwrap();
    assert_eq!(found, known.iter().copied().collect());

    let pool = &db.pool;
    let probes = rows_read_by(
        pool,
        ledger::RECORDED_IDS,
        "deliveries",
        args!("partner", &asked),
    )
    .await;
    assert!(
        probes <= asked.len() as f64,
        "the dedupe lookup read {probes} rows"
    );
    let plain = "SELECT event_id FROM deliveries \
                 WHERE integration = $1 AND event_id = ANY($2) AND settled_at IS NOT NULL";
    let scanned = rows_read_by(pool, plain, "deliveries", args!("partner", &asked)).await;
    assert!(
        scanned >= 50_000.0,
        "control: `= ANY` read only {scanned} rows"
    );

    // Beside the tenant's, 20,000 mappings of 50 other tenants: the table's shape where the
    // narrower indexes of before 0013 won the planner's tie and read a whole type or tenant.
    sqlx::query(
        "INSERT INTO integration_mappings (integration, tenant_id, object_type, local_id, foreign_id) \
         SELECT 'partner', 'tenant-' || (i % 50), 'product', 'q' || i, 'g' || i \
         FROM generate_series(1, 20000) i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let types = ["product", "category"];
    let known = || args!("partner", "acme", "p42", &types[..]);
    let probes = rows_read_by(
        pool,
        ferry::partner::driver::KNOWN,
        "integration_mappings",
        known(),
    )
    .await;
    assert!(probes <= 2.0, "the mapping lookup read {probes} rows");

    // A batch's removals: 18 mappings of other tenants, one of the tenant's and one of nothing.
    let mut tenants: Vec<String> = (1..=18).map(|i| format!("tenant-{}", i % 50)).collect();
    let mut ids: Vec<String> = (1..=18).map(|i| format!("q{i}")).collect();
    let mut types = vec!["product"; 18];
    tenants.extend(["acme".to_owned(), "acme".to_owned()]);
    ids.extend(["p43".to_owned(), "p43".to_owned()]);
    types.extend(["product", "category"]);
    let removals = || args!("partner", &tenants, &types, &ids);
    // Control: the removal before it joined the integration (a constant filter on the table).
    // The planner takes `integration = 'partner'` for 0.5% of the rows, reads all 25,000 and
    // hashes them.
    let constant = "DELETE FROM integration_mappings m USING \
             UNNEST($2::text[], $3::text[], $4::text[]) AS r(tenant_id, object_type, local_id) \
         WHERE m.integration = $1 AND m.tenant_id = r.tenant_id \
           AND m.object_type = r.object_type AND m.local_id = r.local_id";
    let mut tx = pool.begin().await.unwrap();
    let scanned = rows_read_by(&mut *tx, constant, "integration_mappings", removals()).await;
    assert!(
        scanned >= 20_000.0,
        "control: the removal with a constant integration read only {scanned} rows"
    );
    tx.rollback().await.unwrap();
    let removed = rows_read_by(
        pool,
        ferry::mappings::REMOVE,
        "integration_mappings",
        removals(),
    )
    .await;
    // At most one row per object named (EXPLAIN rounds the rows per loop).
    assert!(removed <= 20.0, "the removal read {removed} rows");
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM integration_mappings WHERE local_id = ANY($1)")
            .bind(&ids)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(left, 0, "the removal left a mapping it named");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM integration_mappings")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        total,
        25_000 - 19,
        "the removal took a mapping it did not name"
    );

    // The view's load reads the tenant's rows alone, beside the other tenants' 25,000.
    sqlx::query(
        "INSERT INTO integration_mappings (integration, tenant_id, object_type, local_id, foreign_id) \
         SELECT 'partner', 'beta', 'product', 'b' || i, 'g' || i FROM generate_series(1, 3) i",
    )
    .execute(pool)
    .await
    .unwrap();
    let load = || args!("partner", "beta", 10_001_i64);
    let loaded = rows_read_by(
        pool,
        ferry::partner::driver::LOAD,
        "integration_mappings",
        load(),
    )
    .await;
    assert!(loaded <= 3.0, "the view's load read {loaded} rows");
    db.drop().await;
}

pub(crate) fn record(offset: i64) -> ParkedRecord {
    ParkedRecord {
        tenant_id: "acme".into(),
        event_id: Some(Uuid::now_v7()),
        topic: "ferry.outbox".into(),
        partition: 2,
        offset,
        key: Some(b"acme".to_vec()),
        headers: vec![
            ("id".into(), Some(b"x".to_vec())),
            ("traceparent".into(), None),
            ("eventType".into(), Some(vec![0xff, 0x00, 0x10])),
        ],
        value: Some(vec![1, 2, 3]),
        // Kafka timestamps are milliseconds.
        timestamp: chrono::DateTime::from_timestamp_millis(chrono::Utc::now().timestamp_millis()),
    }
}

/// A permanent pause after one attempt at `event_id`, with the partner's 422 kept.
pub(crate) fn pause_422(event_id: Option<Uuid>) -> Pause {
    Pause {
        cause: "permanent",
        reason: "partner answered 422: name is required".into(),
        event_id,
        next_retry_at: None,
        attempts: 1,
        response: Some(
            serde_json::json!({"status": 422, "body": "{\"error\":\"name is required\"}"}),
        ),
    }
}

#[tokio::test]
async fn parking_pauses_the_tenant_keeps_order_and_parks_a_record_once() {
    let db = TestDb::migrated().await;
    let records: Vec<ParkedRecord> = [10, 11, 14].into_iter().map(record).collect();
    let pause = pause_422(records[0].event_id);
    assert_eq!(
        ledger::park(&db.pool, "partner", "acme", Some(&pause), &records)
            .await
            .unwrap(),
        3
    );
    // A redelivery after a crash parks nothing twice; later records join the backlog.
    let more = vec![records[2].clone(), record(15)];
    assert_eq!(
        ledger::park(&db.pool, "partner", "acme", None, &more)
            .await
            .unwrap(),
        1
    );

    let (state, cause, reason): (String, String, String) = sqlx::query_as(
        "SELECT state, pause_cause, pause_reason FROM tenants WHERE tenant_id = 'acme'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), cause.as_str()), ("paused", "permanent"));
    assert!(reason.contains("422"));
    assert_eq!(
        ledger::inactive_tenants(&db.pool, "partner").await.unwrap(),
        vec![("acme".to_owned(), "paused".to_owned())]
    );

    // The backlog comes back in order, bytes intact, a page at a time.
    let first = ledger::parked_backlog(&db.pool, "partner", "acme", 0, 3)
        .await
        .unwrap();
    let offsets: Vec<i64> = first.iter().map(|(_, r)| r.offset).collect();
    assert_eq!(offsets, [10, 11, 14]);
    assert_eq!(
        first[0].1, records[0],
        "headers, key, value and identity round-trip"
    );
    let rest = ledger::parked_backlog(&db.pool, "partner", "acme", first[2].0, 3)
        .await
        .unwrap();
    assert_eq!(rest.iter().map(|(_, r)| r.offset).collect::<Vec<_>>(), [15]);

    // The failing event is on record, unsettled, with the partner's answer: it is not a
    // duplicate to skip when the backlog is replayed.
    let failed = records[0].event_id.unwrap();
    let (outcome, attempts, response, offset): (String, i32, serde_json::Value, i64) =
        sqlx::query_as(
            "SELECT outcome, attempts, last_response, \"offset\" FROM deliveries WHERE event_id = $1",
        )
        .bind(failed)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!((outcome.as_str(), attempts, offset), ("failed", 1, 10));
    assert_eq!(response["status"], 422);
    assert!(
        ledger::settled_ids(&db.pool, "partner", &[failed])
            .await
            .unwrap()
            .is_empty()
    );
    // Replayed and delivered: settled now, its attempts added up, and only once.
    let replayed = settlement(failed, 10);
    assert_eq!(settle(&db.pool, std::slice::from_ref(&replayed)).await, 1);
    assert_eq!(settle(&db.pool, &[replayed]).await, 0);
    let (outcome, attempts): (String, i32) =
        sqlx::query_as("SELECT outcome, attempts FROM deliveries WHERE event_id = $1")
            .bind(failed)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((outcome.as_str(), attempts), ("delivered", 2));
    assert_eq!(
        ledger::settled_ids(&db.pool, "partner", &[failed])
            .await
            .unwrap()
            .len(),
        1
    );
    db.drop().await;
}

#[tokio::test]
async fn records_of_a_tenant_live_again_are_not_parked() {
    let db = TestDb::migrated().await;
    let records: Vec<ParkedRecord> = [20, 21].into_iter().map(record).collect();
    // The tenant is active (no pause): a late batch of an instance that lost the partition.
    sqlx::query("INSERT INTO tenants (integration, tenant_id, integration_enabled) VALUES ('partner', 'acme', true)")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        ledger::park(&db.pool, "partner", "acme", None, &records)
            .await
            .unwrap(),
        0,
        "nothing parked for an active tenant"
    );
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(parked, 0);
    db.drop().await;
}

/// A resumed backlog is drained by the owner of the partition its records came from, which
/// the tenant id's hash may not name: a record without a key is filed under `unknown` (tried:
/// a keyless record read from partition 5 of 8).
#[tokio::test]
async fn a_backlog_names_the_partition_its_records_came_from() {
    let db = TestDb::migrated().await;
    let mut keyless = record(7);
    keyless.tenant_id = "unknown".into();
    keyless.partition = 5;
    let pause = Pause {
        cause: "bad_event",
        reason: "the record has no key".into(),
        event_id: None,
        next_retry_at: None,
        attempts: 0,
        response: None,
    };
    ledger::park(&db.pool, "partner", "unknown", Some(&pause), &[keyless])
        .await
        .unwrap();
    sqlx::query("UPDATE tenants SET state = 'draining' WHERE tenant_id = 'unknown'")
        .execute(&db.pool)
        .await
        .unwrap();
    let drain = ledger::tenants_to_drain(&db.pool, "partner").await.unwrap();
    assert_eq!(drain, [("unknown".to_owned(), Some(5))]);
    assert_ne!(ferry::broker::partition_for_key(b"unknown", 8), 5);
    db.drop().await;
}
