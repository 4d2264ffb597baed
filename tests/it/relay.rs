//! `ferry relay` against the real stack: commit order, rollbacks, a SIGKILL mid-stream, the
//! idle heartbeat, records the decoder reads byte for byte, and rows it cannot send as-is.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry::broker;
use ferry::config::Config;
use ferry::outbox::writer::{self, NewEvent};
use ferry::outbox::{self, Payload, TenantId};
use ferry::relay::Relay;
use ferry::relay::lsn::Lsn;
use ferry::shop::{EventPayload, proto};
use rdkafka::Message as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{TestDb, config, fresh_topic, read_all, topic_size, wait_for};

const DEADLINE: Duration = Duration::from_secs(60);

pub(crate) fn event(tenant: &str, seq: i64, description: &str) -> NewEvent<EventPayload> {
    let mut e = NewEvent::new(
        TenantId::new(tenant).unwrap(),
        seq.to_string(),
        EventPayload::ProductUpdated(proto::ProductUpdated {
            product: Some(proto::Product {
                id: format!("{tenant}-p"),
                name: format!("v{seq}"),
                description: description.to_owned(),
                price_minor: seq,
                currency: "EUR".to_owned(),
            }),
        }),
    );
    e.traceparent = None;
    e
}

/// Starts an in-process relay; the slot exists when this returns, so every later commit is
/// captured.
pub(crate) async fn start_relay(
    cfg: &Config,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<
        Result<std::sync::Arc<ferry::relay::RelayStats>, ferry::relay::RelayError>,
    >,
    std::sync::Arc<ferry::relay::RelayStats>,
) {
    let mut relay = Relay::connect(cfg).await.expect("relay connects");
    relay.setup().await.expect("slot and publication");
    let stats = relay.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    (stop, task, stats)
}

async fn wait_acked(stats: &ferry::relay::RelayStats, n: u64) {
    wait_for(&format!("{n} records acknowledged"), DEADLINE, || async {
        (stats.records_acked.load(Ordering::Relaxed) >= n).then_some(())
    })
    .await;
}

/// The server's current WAL position.
async fn current_lsn(pool: &sqlx::PgPool) -> Lsn {
    let text: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .unwrap();
    text.parse().unwrap()
}

/// Waits until the slot's confirmed position reaches `target`.
async fn wait_slot_past(
    pool: &sqlx::PgPool,
    slot: &str,
    target: Lsn,
    what: &str,
    deadline: Duration,
) {
    wait_for(what, deadline, || async move {
        let confirmed: String = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(slot)
        .fetch_one(pool)
        .await
        .unwrap();
        (confirmed.parse::<Lsn>().unwrap() >= target).then_some(())
    })
    .await;
}

/// Writes 20,000 rows to a table outside the publication and waits until the slot has moved past
/// them: the heartbeat, without an outbox row to carry it.
async fn slot_passes_unrelated_wal(db: &TestDb, cfg: &Config) {
    sqlx::query("CREATE TABLE noise (n int, filler text)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO noise SELECT n, repeat('x', 200) FROM generate_series(1, 20000) n")
        .execute(&db.pool)
        .await
        .unwrap();
    let after_noise = current_lsn(&db.pool).await;
    wait_slot_past(
        &db.pool,
        &cfg.relay.slot,
        after_noise,
        "the slot to pass the unrelated WAL",
        DEADLINE,
    )
    .await;
}

fn ids(messages: &[rdkafka::message::OwnedMessage]) -> Vec<Uuid> {
    messages
        .iter()
        .map(|m| outbox::decode(&broker::raw_record(m)).expect("decodes").id)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn transactions_come_out_whole_in_commit_order_and_rollbacks_never() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let mut relay = Relay::connect(&cfg).await.unwrap();
    relay.setup().await.unwrap();

    // A, B and C interleave their inserts; B commits first, C rolls back, A commits last.
    let (a1, a2, b1, b2, c1) = (
        event("ta", 1, ""),
        event("ta", 2, ""),
        event("tb", 1, ""),
        event("tb", 2, ""),
        event("tc", 1, ""),
    );
    let mut a = db.pool.begin().await.unwrap();
    let mut b = db.pool.begin().await.unwrap();
    let mut c = db.pool.begin().await.unwrap();
    writer::append(&mut a, &a1).await.unwrap();
    writer::append(&mut b, &b1).await.unwrap();
    writer::append(&mut c, &c1).await.unwrap();
    writer::append(&mut a, &a2).await.unwrap();
    writer::append(&mut b, &b2).await.unwrap();
    b.commit().await.unwrap();
    c.rollback().await.unwrap();
    a.commit().await.unwrap();
    // One more transaction after, so "nothing more" is a condition, not a wait.
    let mut d = db.pool.begin().await.unwrap();
    let d1 = event("td", 1, "");
    writer::append(&mut d, &d1).await.unwrap();
    d.commit().await.unwrap();

    let stats = relay.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    wait_acked(&stats, 5).await;
    let records = read_all(&kafka).await;
    assert_eq!(ids(&records), vec![b1.id, b2.id, a1.id, a2.id, d1.id]);
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(
        stats.records_acked.load(Ordering::Relaxed),
        5,
        "the rolled-back insert emitted nothing"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn records_are_the_wire_contract_on_the_murmur2_partition() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(4).await;
    let cfg = config(&db, &kafka);
    let (stop, task, stats) = start_relay(&cfg).await;

    let deadline: DateTime<Utc> = "2030-01-01T00:00:00.123456Z".parse().unwrap();
    let mut written = HashMap::new();
    for t in 0..20 {
        let mut e = event(&format!("tenant-{t}"), 1, "contract");
        e.traceparent = Some(format!("00-{:032x}-{:016x}-01", t + 1, t + 1));
        e.deliver_before = (t % 2 == 0).then_some(deadline);
        let mut tx = db.pool.begin().await.unwrap();
        writer::append(&mut tx, &e).await.unwrap();
        tx.commit().await.unwrap();
        written.insert(e.id, e);
    }
    wait_acked(&stats, 20).await;
    let records = read_all(&kafka).await;
    assert_eq!(records.len(), 20);
    for m in &records {
        let event =
            outbox::decode(&broker::raw_record(m)).expect("the decoder reads what the relay wrote");
        let sent = &written[&event.id];
        assert_eq!(event.tenant_id, sent.tenant_id);
        assert_eq!(
            event.payload,
            Payload::Protobuf(sent.payload.encode_to_vec())
        );
        assert_eq!(event.traceparent, sent.traceparent);
        assert_eq!(event.deliver_before, sent.deliver_before);
        assert_eq!(event.aggregate_id.as_deref(), Some("1"));
        assert_eq!(event.aggregate_type.as_deref(), Some("Product"));
        assert!(event.occurred_at.is_some(), "stamped with the commit time");
        assert_eq!(
            m.partition(),
            broker::partition_for_key(sent.tenant_id.as_str().as_bytes(), 4),
            "{} is on the partition Kafka's Java client would choose",
            sent.tenant_id
        );
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_outbox_on_a_busy_server_still_advances_the_slot() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let (stop, task, stats) = start_relay(&cfg).await;

    slot_passes_unrelated_wal(&db, &cfg).await;
    assert_eq!(
        stats.records_acked.load(Ordering::Relaxed),
        0,
        "nothing to send"
    );
    assert_eq!(topic_size(&kafka).await, 0);
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_it_cannot_send_travel_as_bad_events_in_order() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let mut cfg = config(&db, &kafka);
    cfg.relay.max_message_bytes = 4096;
    // A foreign outbox schema may allow what ours forbids.
    sqlx::query("ALTER TABLE outbox ALTER COLUMN tenant_id DROP NOT NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    let (stop, task, stats) = start_relay(&cfg).await;

    let small = event("acme", 1, "small");
    let huge = event("acme", 2, &"x".repeat(10_000));
    let after = event("acme", 3, "small again");
    let mut tx = db.pool.begin().await.unwrap();
    writer::append_many(&mut tx, &[small.clone(), huge.clone(), after.clone()])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let orphan = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, tenant_id) \
         VALUES ($1, 'Product', 'p', 'ProductDeleted', '\\x0a0170', NULL)",
    )
    .bind(orphan)
    .execute(&db.pool)
    .await
    .unwrap();

    wait_acked(&stats, 4).await;
    let records = read_all(&kafka).await;
    let decoded: Vec<_> = records
        .iter()
        .map(|m| outbox::decode(&broker::raw_record(m)))
        .collect();
    assert_eq!(decoded.len(), 4);
    assert_eq!(decoded[0].as_ref().unwrap().id, small.id);
    let too_big = decoded[1].as_ref().unwrap_err();
    assert_eq!(too_big.reason.code(), "rejected_by_relay");
    assert_eq!(too_big.event_id, Some(huge.id));
    assert_eq!(too_big.tenant_id.as_ref().map(|t| t.as_str()), Some("acme"));
    assert!(
        too_big.reason.to_string().contains("4096-byte limit"),
        "{too_big}"
    );
    assert_eq!(
        decoded[2].as_ref().unwrap().id,
        after.id,
        "the tenant's next event follows, in order"
    );
    let no_tenant = decoded[3].as_ref().unwrap_err();
    assert_eq!(no_tenant.reason.code(), "rejected_by_relay");
    assert_eq!(no_tenant.event_id, Some(orphan));
    assert!(
        no_tenant.reason.to_string().contains("tenant_id"),
        "{no_tenant}"
    );
    assert_eq!(stats.rows_rejected.load(Ordering::Relaxed), 2);
    // And the operator sees it on /metrics.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let scraped = std::sync::Arc::clone(&stats);
    tokio::spawn(ferry::telemetry::serve_metrics(
        listener,
        move || scraped.render_prometheus(),
        || true,
        stop.clone(),
    ));
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("\nferry_relay_rows_rejected_total 2\n"),
        "{body}"
    );
    assert!(
        body.contains("\nferry_relay_records_acked_total 4\n"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE ferry_relay_slot_lag_bytes gauge"),
        "{body}"
    );
    // The rows themselves are kept.
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE id = ANY($1)")
        .bind(vec![huge.id, orphan])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(kept, 2);
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

fn relay_process(cfg: &Config) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("relay")
        .env_clear()
        .env("FERRY_DATABASE_URL", &cfg.database.url)
        .env("FERRY_KAFKA_BROKERS", &cfg.kafka.brokers)
        .env("FERRY_KAFKA_TOPIC", &cfg.kafka.topic)
        .env("FERRY_RELAY_SLOT", &cfg.relay.slot)
        .env("FERRY_RELAY_PUBLICATION", &cfg.relay.publication)
        // Small batches, so a kill lands between acknowledged and unacknowledged work.
        .env("FERRY_RELAY_BATCH_CHANGES", "300")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start ferry relay")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_killed_mid_stream_and_restarted_loses_nothing() {
    const EVENTS: usize = 10_000;
    const TENANTS: usize = 40;
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(4).await;
    let cfg = config(&db, &kafka);
    // Create the slot before the writers start, as a deployed relay would have.
    Relay::connect(&cfg).await.unwrap().setup().await.unwrap();
    let mut first = relay_process(&cfg);

    // Four writers, each owning a tenth of the tenants, so each tenant's order is known.
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4usize {
        let pool = db.pool.clone();
        writers.spawn(async move {
            let mut seq = vec![0i64; TENANTS];
            let mut written = Vec::new();
            let mut n = 0;
            while n < EVENTS / 4 {
                let t = w + 4 * (n % (TENANTS / 4));
                let batch = 1 + n % 5;
                let events: Vec<NewEvent<EventPayload>> = (0..batch.min(EVENTS / 4 - n))
                    .map(|_| {
                        seq[t] += 1;
                        event(&format!("tenant-{t}"), seq[t], "")
                    })
                    .collect();
                let mut tx = pool.begin().await.unwrap();
                writer::append_many(&mut tx, &events).await.unwrap();
                tx.commit().await.unwrap();
                n += events.len();
                written.extend(events.into_iter().map(|e| e.id));
            }
            written
        });
    }

    // Kill the relay with SIGKILL once part of the stream is through.
    wait_for("a third of the stream in Kafka", DEADLINE, || async {
        (topic_size(&kafka).await >= (EVENTS / 3) as i64).then_some(())
    })
    .await;
    first.start_kill().unwrap();
    let status = first.wait().await.unwrap();
    assert!(!status.success(), "killed, not exited");

    let mut written: HashSet<Uuid> = HashSet::new();
    while let Some(ids) = writers.join_next().await {
        written.extend(ids.unwrap());
    }
    assert_eq!(written.len(), EVENTS);

    let mut second = relay_process(&cfg);
    // Caught up: the slot has passed everything the writers committed.
    let end = current_lsn(&db.pool).await;
    wait_slot_past(
        &db.pool,
        &cfg.relay.slot,
        end,
        "the restarted relay to catch up",
        Duration::from_secs(120),
    )
    .await;
    let records = read_all(&kafka).await;
    let seen: HashSet<Uuid> = ids(&records).into_iter().collect();
    let lost: Vec<&Uuid> = written.difference(&seen).collect();
    assert!(
        lost.is_empty(),
        "{} events lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );

    // Per tenant, first occurrences in partition order follow the write order; replays of
    // the unacknowledged tail are allowed (same id), gaps and reorders are not.
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    let mut first_seen: HashSet<Uuid> = HashSet::new();
    for m in &records {
        let e = outbox::decode(&broker::raw_record(m)).unwrap();
        if !first_seen.insert(e.id) {
            continue;
        }
        let seq: i64 = e.aggregate_id.unwrap().parse().unwrap();
        let last = last_seq.entry(e.tenant_id.to_string()).or_insert(0);
        assert_eq!(seq, *last + 1, "{}: event {seq} after {last}", e.tenant_id);
        *last = seq;
    }
    assert_eq!(first_seen.len(), EVENTS);

    // SIGTERM: the relay finishes its batch, advances the slot and exits 0.
    let pid = second.id().unwrap() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc_kill(pid, 15) }, 0);
    let status = tokio::time::timeout(DEADLINE, second.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "graceful shutdown exits 0: {status}");
    db.drop().await;
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_relay_stands_by_and_takes_over() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let (stop_a, task_a, stats_a) = start_relay(&cfg).await;
    wait_for("relay A to hold the lease", DEADLINE, || async {
        (stats_a.active.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    let (stop_b, task_b, stats_b) = start_relay(&cfg).await;

    let first: Vec<NewEvent<EventPayload>> = (1..=3).map(|n| event("acme", n, "")).collect();
    let mut tx = db.pool.begin().await.unwrap();
    writer::append_many(&mut tx, &first).await.unwrap();
    tx.commit().await.unwrap();
    wait_acked(&stats_a, 3).await;
    assert_eq!(stats_b.active.load(Ordering::Relaxed), 0, "B stands by");
    assert_eq!(stats_b.records_acked.load(Ordering::Relaxed), 0);

    // A stops (its session ends): B takes over from where A left the slot.
    stop_a.cancel();
    task_a.await.unwrap().unwrap();
    let second: Vec<NewEvent<EventPayload>> = (4..=5).map(|n| event("acme", n, "")).collect();
    let mut tx = db.pool.begin().await.unwrap();
    writer::append_many(&mut tx, &second).await.unwrap();
    tx.commit().await.unwrap();
    wait_acked(&stats_b, 2).await;
    assert_eq!(stats_b.active.load(Ordering::Relaxed), 1);

    let expected: Vec<Uuid> = first.iter().chain(&second).map(|e| e.id).collect();
    assert_eq!(
        ids(&read_all(&kafka).await),
        expected,
        "each event once, in order"
    );
    stop_b.cancel();
    task_b.await.unwrap().unwrap();
    db.drop().await;
}

/// The streaming relay logs in as a role of its own with a password: SCRAM-SHA-256 and MD5
/// (`scripts/stack` makes the server ask these two roles for one), and a wrong or missing
/// password is an error an operator must fix, not one to retry.
#[tokio::test(flavor = "multi_thread")]
async fn the_streaming_relay_logs_in_with_scram_or_md5_and_refuses_a_wrong_password() {
    use ferry::relay::replication::{ReplicationConnection, ReplicationError, Target};
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    // The superuser creates the slot and the publication; the relay's roles only stream them.
    Relay::connect(&cfg).await.unwrap().setup().await.unwrap();
    let methods: Vec<(String, String)> = sqlx::query_as(
        "SELECT user_name[1], auth_method FROM pg_hba_file_rules \
         WHERE user_name[1] IN ('ferry_scram_relay', 'ferry_md5_relay') ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        methods,
        [
            ("ferry_md5_relay".to_owned(), "md5".to_owned()),
            ("ferry_scram_relay".to_owned(), "scram-sha-256".to_owned())
        ],
        "the server asks these roles for a password (scripts/stack writes pg_hba.conf)"
    );
    let url = reqwest::Url::parse(&db.url).unwrap();
    let url_as = |user: &str, password: Option<&str>| {
        let mut u = url.clone();
        u.set_username(user).unwrap();
        u.set_password(password).unwrap();
        u.to_string()
    };

    let mut sent = Vec::new();
    for (role, encryption, password) in [
        ("ferry_scram_relay", "scram-sha-256", "p@ss wörd"),
        ("ferry_md5_relay", "md5", "md5 secret"),
    ] {
        let mut conn = db.pool.acquire().await.unwrap();
        sqlx::query(&format!("DROP ROLE IF EXISTS {role}"))
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(&format!("SET password_encryption = '{encryption}'"))
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(&format!(
            "CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}'"
        ))
        .execute(&mut *conn)
        .await
        .unwrap();
        drop(conn);

        // Inputs tried: the wrong password, then none at all.
        let wrong = Target::from_url(&url_as(role, Some("wrong"))).unwrap();
        match ReplicationConnection::connect(&wrong, "test").await {
            Err(e @ ReplicationError::Server { .. }) => {
                assert!(e.to_string().contains("28P01"), "{role}: {e}");
                assert!(!e.is_retryable(), "{role}: {e}");
            }
            Err(e) => panic!("{role}: a wrong password gave {e}"),
            Ok(_) => panic!("{role}: a wrong password was accepted"),
        }
        let none = Target {
            password: None,
            ..Target::from_url(&url_as(role, None)).unwrap()
        };
        match ReplicationConnection::connect(&none, "test").await {
            Err(ReplicationError::NoPassword) => {}
            Err(e) => panic!("{role}: no password gave {e}"),
            Ok(_) => panic!("{role}: logged in without a password"),
        }

        // The right one: the relay streams as this role.
        let mut as_role = cfg.clone();
        as_role.database.url = url_as(role, Some(password));
        let (stop, task, stats) = start_relay(&as_role).await;
        let e = event(role, 1, "");
        let mut tx = db.pool.begin().await.unwrap();
        writer::append(&mut tx, &e).await.unwrap();
        tx.commit().await.unwrap();
        sent.push(e.id);
        wait_acked(&stats, 1).await;
        let streaming: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_replication WHERE usename = $1")
                .bind(role)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(streaming, 1, "{role} holds a replication stream");
        stop.cancel();
        task.await.unwrap().unwrap();
        sqlx::query(&format!("DROP ROLE {role}"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    assert_eq!(ids(&read_all(&kafka).await), sent, "each once, in order");
    db.drop().await;
}

/// `relay.mode = "peek"` (the SQL functions, for a server reachable only over TLS) keeps the
/// same guarantees: commit order, rollbacks never, and the heartbeat over unrelated WAL.
#[tokio::test(flavor = "multi_thread")]
async fn the_peek_mode_relays_in_commit_order_and_advances_over_unrelated_wal() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let mut cfg = config(&db, &kafka);
    cfg.relay.mode = ferry::config::RelayMode::Peek;
    let (stop, task, stats) = start_relay(&cfg).await;
    let (a1, b1, c1) = (event("ta", 1, ""), event("tb", 1, ""), event("tc", 1, ""));
    let mut a = db.pool.begin().await.unwrap();
    let mut b = db.pool.begin().await.unwrap();
    let mut c = db.pool.begin().await.unwrap();
    writer::append(&mut a, &a1).await.unwrap();
    writer::append(&mut b, &b1).await.unwrap();
    writer::append(&mut c, &c1).await.unwrap();
    b.commit().await.unwrap();
    c.rollback().await.unwrap();
    a.commit().await.unwrap();
    wait_acked(&stats, 2).await;
    assert_eq!(ids(&read_all(&kafka).await), vec![b1.id, a1.id]);

    slot_passes_unrelated_wal(&db, &cfg).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(stats.records_acked.load(Ordering::Relaxed), 2);
    db.drop().await;
}

/// The server ends the relay's replication session mid-stream (an operator's
/// `pg_terminate_backend`, a failover): the relay reconnects and carries on from the slot, each
/// row there, in order, nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_replication_session_ended_by_the_server_is_resumed_from_the_slot() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let (stop, task, stats) = start_relay(&cfg).await;
    let write = |from: i64, to: i64| {
        let pool = db.pool.clone();
        async move {
            let events: Vec<NewEvent<EventPayload>> =
                (from..=to).map(|n| event("acme", n, "")).collect();
            for e in &events {
                let mut tx = pool.begin().await.unwrap();
                writer::append(&mut tx, e).await.unwrap();
                tx.commit().await.unwrap();
            }
            events.iter().map(|e| e.id).collect::<Vec<Uuid>>()
        }
    };
    let mut expected = write(1, 20).await;
    wait_acked(&stats, 20).await;

    let walsender = |pool: sqlx::PgPool, slot: String| async move {
        sqlx::query_scalar::<_, Option<i32>>(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(slot)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let first = wait_for("the relay's walsender", DEADLINE, || {
        walsender(db.pool.clone(), cfg.relay.slot.clone())
    })
    .await;
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(ended, "the walsender was ended");
    expected.extend(write(21, 40).await);
    wait_for("a retry after the session ended", DEADLINE, || async {
        (stats.retries.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    wait_for("a new replication session", DEADLINE, || async {
        walsender(db.pool.clone(), cfg.relay.slot.clone())
            .await
            .filter(|pid| *pid != first)
    })
    .await;
    // Rows after the last confirmed position may come twice (the consumer dedupes them); every
    // one is there, and their first copies are in commit order.
    wait_for("every row in the topic", DEADLINE, || async {
        let got: HashSet<Uuid> = ids(&read_all(&kafka).await).into_iter().collect();
        expected.iter().all(|id| got.contains(id)).then_some(())
    })
    .await;
    let mut seen = HashSet::new();
    let firsts: Vec<Uuid> = ids(&read_all(&kafka).await)
        .into_iter()
        .filter(|id| seen.insert(*id))
        .collect();
    assert_eq!(firsts, expected, "each row, first copies in commit order");
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}
