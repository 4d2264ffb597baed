//! The consumer's core against the faults of a real deployment, each staged on the real stack
//! (Postgres, the broker, a TCP cut between Ferry and Postgres) and asserted from the handler's
//! own record of its calls (the partner's side) and from the database.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use ferry::consumer::runtime::ConsumeOptions;
use ferry::delivery::RetryPolicy;

use crate::consume::{Recorder, committed, produce, produce_rows, row, start_with};
use crate::proxy::PgProxy;
use crate::support::{TestDb, config, fresh_topic, wait_for};

/// Options for these tests: the kill switch and pauses read often, probes often.
fn options() -> ConsumeOptions {
    ConsumeOptions {
        kill_switch_interval: Duration::from_millis(100),
        breaker_probe_interval: Duration::from_millis(100),
        ..ConsumeOptions::default()
    }
}

/// Each tenant's calls, as (seq) in call order.
fn calls_by_tenant(handler: &Recorder) -> HashMap<String, Vec<i64>> {
    let mut by: HashMap<String, Vec<i64>> = HashMap::new();
    for (tenant, seq) in handler.calls.lock().unwrap().iter() {
        by.entry(tenant.clone()).or_default().push(*seq);
    }
    by
}

/// Each tenant's first call of each event, in call order.
fn firsts_by_tenant(handler: &Recorder) -> HashMap<String, Vec<i64>> {
    let mut by: HashMap<String, Vec<i64>> = HashMap::new();
    for (tenant, seqs) in calls_by_tenant(handler) {
        let firsts = by.entry(tenant).or_default();
        for seq in seqs {
            if !firsts.contains(&seq) {
                firsts.push(seq);
            }
        }
    }
    by
}

async fn tenant_state(pool: &sqlx::PgPool, tenant: &str) -> Option<String> {
    sqlx::query_scalar("SELECT state FROM tenants WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_optional(pool)
        .await
        .unwrap()
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Guarantee: effectively once. The fault: a relay or Debezium resend puts a second record of
/// an event close behind its original, before the original's settlement is durable: queued
/// behind it in its tenant's queue (the original in flight), and adjacent to it (both in one
/// settlement batch), for tenants with the integration on and off.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_event_twice_close_together_is_handled_once() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let handler = Arc::new(Recorder::default());
    handler.ignoring.lock().unwrap().insert("tenant-off".into());
    // tenant-a's original stays in flight until its copy has arrived.
    handler.stalled.lock().unwrap().insert("tenant-a".into());
    let (a1, a2, b1, off1) = (
        row("tenant-a", 1),
        row("tenant-a", 2),
        row("tenant-b", 1),
        row("tenant-off", 1),
    );
    let rows = vec![
        a1.clone(),
        b1.clone(),
        b1.clone(),
        off1.clone(),
        off1.clone(),
        a2.clone(),
        a1.clone(),
    ];
    let (stop, task, stats) = start_with(&cfg, &db.pool, &handler, options());
    let last = produce_rows(&kafka, &rows).await;
    wait_for("every record received", Duration::from_secs(30), || async {
        (stats.received.load(Ordering::Relaxed) >= rows.len() as u64).then_some(())
    })
    .await;
    handler.stalled.lock().unwrap().clear();
    wait_for("the commit at the end", Duration::from_secs(30), || async {
        (committed(&kafka).await == Some(last + 1)).then_some(())
    })
    .await;

    let calls = calls_by_tenant(&handler);
    assert_eq!(calls["tenant-a"], [1, 2], "the copy behind its original");
    assert_eq!(calls["tenant-b"], [1], "the copy beside its original");
    assert_eq!(calls["tenant-off"], [1], "the copy of an ignored event");
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT event_id, outcome FROM deliveries ORDER BY event_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let mut expected = vec![
        (a1.id, "delivered".to_owned()),
        (a2.id, "delivered".to_owned()),
        (b1.id, "delivered".to_owned()),
        (off1.id, "ignored".to_owned()),
    ];
    expected.sort();
    assert_eq!(rows, expected, "one deliveries row per id");
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 3);
    assert!(!task.is_finished(), "the consumer never stops");
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

/// Guarantee: isolation. The fault: while the breaker is open, the held event is rejected
/// permanently for its tenant (422) when it is tried as a probe.
#[tokio::test(flavor = "multi_thread")]
async fn a_probe_refused_for_its_own_reason_pauses_its_tenant_and_closes_the_breaker() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let handler = Arc::new(Recorder::default());
    handler.outage.store(true, Ordering::SeqCst);
    let (stop, task, stats) = start_with(&cfg, &db.pool, &handler, options());
    produce_rows(&kafka, &[row("tenant-x", 1)]).await;
    wait_for("the breaker open", Duration::from_secs(30), || async {
        (stats.breaker_open.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;

    // The partner answers again, but refuses tenant-x's event for its own reason.
    handler.failing.lock().unwrap().insert("tenant-x".into());
    handler.outage.store(false, Ordering::SeqCst);
    wait_for(
        "tenant-x paused and the breaker closed",
        Duration::from_secs(30),
        || async {
            let paused = tenant_state(&db.pool, "tenant-x").await.as_deref() == Some("paused");
            (paused && stats.breaker_open.load(Ordering::Relaxed) == 0).then_some(())
        },
    )
    .await;

    let mut rows = vec![row("tenant-x", 2), row("tenant-x", 3)];
    rows.extend((1..=3).flat_map(|seq| (0..4).map(move |t| row(&format!("tenant-{t}"), seq))));
    let last = produce_rows(&kafka, &rows).await;
    wait_for(
        "every other tenant delivered",
        Duration::from_secs(30),
        || async { (stats.delivered.load(Ordering::Relaxed) == 12).then_some(()) },
    )
    .await;
    wait_for("the commit at the end", Duration::from_secs(30), || async {
        (committed(&kafka).await == Some(last + 1)).then_some(())
    })
    .await;
    let parked = count(
        &db.pool,
        "SELECT count(*) FROM parked_events WHERE tenant_id = 'tenant-x'",
    )
    .await;
    assert_eq!(parked, 3, "the refused event and the two after it, parked");
    let firsts = firsts_by_tenant(&handler);
    for t in 0..4 {
        assert_eq!(firsts[&format!("tenant-{t}")], [1, 2, 3]);
    }
    assert_eq!(
        firsts["tenant-x"],
        [1],
        "nothing of tenant-x sent after the refusal"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

/// Guarantee: isolation (no tenant holds its partition's commit point longer than
/// `pause_after` plus the time to park). The fault: the partner answers one tenant 429 with
/// `Retry-After: 3600` under a 2 s `pause_after`.
#[tokio::test(flavor = "multi_thread")]
async fn retry_after_of_an_hour_pauses_the_tenant_instead_of_holding_the_partition() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let handler = Arc::new(Recorder::default());
    handler
        .rate_limited
        .lock()
        .unwrap()
        .insert("tenant-slow".into());
    let options = ConsumeOptions {
        retry: RetryPolicy {
            base: Duration::from_millis(50),
            pause_after_attempts: 1_000,
            pause_after: Duration::from_secs(2),
            ..RetryPolicy::default()
        },
        ..options()
    };
    let (stop, task, stats) = start_with(&cfg, &db.pool, &handler, options);
    let mut rows = vec![row("tenant-slow", 1)];
    rows.extend((1..=5).flat_map(|seq| (0..4).map(move |t| row(&format!("tenant-{t}"), seq))));
    rows.push(row("tenant-slow", 2));
    let last = produce_rows(&kafka, &rows).await;
    wait_for("the commit at the end", Duration::from_secs(30), || async {
        (committed(&kafka).await == Some(last + 1)).then_some(())
    })
    .await;
    assert_eq!(
        tenant_state(&db.pool, "tenant-slow").await.as_deref(),
        Some("paused")
    );
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 20);
    assert_eq!(
        calls_by_tenant(&handler)["tenant-slow"],
        [1],
        "no retry the partner asked us not to make"
    );
    // The automatic resume waits for what the partner asked, up to retry_after_max (60 s).
    let resume_in: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM next_retry_at - now())::float8 FROM tenants WHERE tenant_id = 'tenant-slow'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(resume_in > 40.0, "resumes in {resume_in} s");
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

/// Guarantee: nothing delivered late. The fault: an event keeps failing (503) past its
/// `deliver_before`; no attempt may start after the deadline.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_failing_past_its_deadline_is_expired_never_retried_late() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let handler = Arc::new(Recorder::default());
    handler.flaky.lock().unwrap().insert("tenant-late".into());
    let options = ConsumeOptions {
        retry: RetryPolicy {
            base: Duration::from_millis(200),
            max: Duration::from_millis(200),
            pause_after_attempts: 1_000,
            pause_after: Duration::from_secs(600),
            ..RetryPolicy::default()
        },
        ..options()
    };
    let mut late = row("tenant-late", 1);
    let deadline = Utc::now() + chrono::Duration::milliseconds(1_500);
    late.deliver_before = Some(deadline);
    let (stop, task, stats) = start_with(&cfg, &db.pool, &handler, options);
    let last = produce_rows(&kafka, &[late.clone()]).await;
    wait_for("the event expired", Duration::from_secs(30), || async {
        (stats.expired.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    wait_for("the commit at the end", Duration::from_secs(30), || async {
        (committed(&kafka).await == Some(last + 1)).then_some(())
    })
    .await;
    let starts = handler.started_at.lock().unwrap().clone();
    assert!(!starts.is_empty(), "it was tried before its deadline");
    for (_, _, at) in &starts {
        assert!(
            *at < deadline,
            "an attempt started at {at}, after {deadline}"
        );
    }
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM deliveries WHERE event_id = $1")
        .bind(late.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(outcome, "expired");
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

/// Calls that started after `since`.
fn calls_since(handler: &Recorder, since: chrono::DateTime<Utc>) -> usize {
    let starts = handler.started_at.lock().unwrap();
    starts.iter().filter(|(_, _, at)| *at > since).count()
}

/// Flips the persisted kill switch.
async fn kill_switch(pool: &sqlx::PgPool, on: bool) {
    sqlx::query("UPDATE control SET kill_switch = $1, kill_switch_by = 'test'")
        .bind(on)
        .execute(pool)
        .await
        .unwrap();
}

/// With the kill switch on for two and a half seconds, no call starts more than a second after
/// it was flipped; then calls resume.
async fn assert_killed_within_a_second(pool: &sqlx::PgPool, handler: &Recorder) {
    kill_switch(pool, true).await;
    let flipped = Utc::now();
    // The window is the scenario: silence is asserted over it, so it cannot be a condition.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let late = calls_since(handler, flipped + chrono::Duration::seconds(1));
    kill_switch(pool, false).await;
    assert_eq!(
        late, 0,
        "calls started more than a second after the kill switch"
    );
    let resumed = Utc::now();
    wait_for("calls to resume", Duration::from_secs(10), || async {
        (calls_since(handler, resumed) > 0).then_some(())
    })
    .await;
}

/// Guarantee: the kill switch stops every partner call. The fault: it is flipped while a
/// tenant's event is being retried, and again while the breaker probes.
#[tokio::test(flavor = "multi_thread")]
async fn the_kill_switch_stops_retries_and_probes_within_a_second() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let handler = Arc::new(Recorder::default());
    handler
        .flaky
        .lock()
        .unwrap()
        .insert("tenant-retrying".into());
    let options = ConsumeOptions {
        retry: RetryPolicy {
            base: Duration::from_millis(20),
            max: Duration::from_millis(50),
            pause_after_attempts: 1_000_000,
            pause_after: Duration::from_secs(600),
            ..RetryPolicy::default()
        },
        ..options()
    };
    let (stop, task, stats) = start_with(&cfg, &db.pool, &handler, options);
    produce_rows(&kafka, &[row("tenant-retrying", 1)]).await;
    wait_for("retries under way", Duration::from_secs(30), || async {
        (handler.calls.lock().unwrap().len() >= 3).then_some(())
    })
    .await;
    assert_killed_within_a_second(&db.pool, &handler).await;

    // The partner refuses everyone: the breaker opens and probes every 100 ms.
    handler.outage.store(true, Ordering::SeqCst);
    wait_for("the breaker open", Duration::from_secs(30), || async {
        (stats.breaker_open.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    assert_killed_within_a_second(&db.pool, &handler).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

/// Guarantee: nothing lost or reordered, and the consumer never exits, while Postgres is
/// down. The fault: Postgres stops for 30 s mid-stream (every connection reset, new ones
/// refused) while records keep arriving, and starts again.
#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_rides_out_postgres_stopped_for_thirty_seconds() {
    const TENANTS: usize = 12;
    let db = TestDb::migrated().await;
    let proxy = PgProxy::start(&db.url).await;
    let kafka = fresh_topic(1).await;
    let mut cfg = config(&db, &kafka);
    cfg.database.url = proxy.url(&db.url);
    let pool = ferry::store::connect(&cfg.database).await.unwrap();
    let handler = Arc::new(Recorder::default());
    let (stop, task, stats) = start_with(&cfg, &pool, &handler, options());
    produce(&kafka, TENANTS, 10).await;
    wait_for(
        "the first half delivered",
        Duration::from_secs(60),
        || async {
            (count(&db.pool, "SELECT count(*) FROM deliveries").await == 10 * TENANTS as i64)
                .then_some(())
        },
    )
    .await;

    proxy.cut();
    let rows: Vec<_> = (11..=20)
        .flat_map(|seq| (0..TENANTS).map(move |t| row(&format!("tenant-{t}"), seq)))
        .collect();
    let last = produce_rows(&kafka, &rows).await;
    wait_for(
        "the consumer to notice and stop dispatching",
        Duration::from_secs(60),
        || async { (stats.recovering.load(Ordering::Relaxed) == 1).then_some(()) },
    )
    .await;
    // The outage is the scenario: Postgres stays down for thirty seconds.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!task.is_finished(), "the consumer survives the outage");
    proxy.restore().await;

    wait_for("the commit at the end", Duration::from_secs(90), || async {
        (committed(&kafka).await == Some(last + 1)).then_some(())
    })
    .await;
    let settled = count(
        &db.pool,
        "SELECT count(*) FROM deliveries WHERE outcome = 'delivered'",
    )
    .await;
    assert_eq!(
        settled,
        20 * TENANTS as i64,
        "every event delivered, once each"
    );
    let firsts = firsts_by_tenant(&handler);
    assert_eq!(firsts.len(), TENANTS);
    for (tenant, seqs) in firsts {
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "{tenant}: in order");
    }
    assert!(stats.restarts.load(Ordering::Relaxed) >= 1);
    stop.cancel();
    task.await.unwrap().unwrap();
    pool.close().await;
    db.drop().await;
}

/// Guarantee: per-tenant order across a rebalance. The fault: the partner is slow (calls
/// outlast the revoke's drain deadline) when a second instance joins; the first instance's
/// calls for the partitions it gives up are cut at the deadline, so the new owner's call of a
/// tenant never overlaps (or is followed by) the old owner's.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_partner_during_a_rebalance_never_sees_the_old_owner_after_the_new() {
    const TENANTS: usize = 8;
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(2).await;
    let cfg = config(&db, &kafka);
    let handler = Arc::new(Recorder::default());
    let tenants: Vec<String> = (0..TENANTS).map(|t| format!("tenant-{t}")).collect();
    handler.stalled.lock().unwrap().extend(tenants.clone());
    let options = ConsumeOptions {
        revoke_drain: Duration::from_secs(1),
        ..options()
    };
    let (stop_a, task_a, stats_a) = start_with(&cfg, &db.pool, &handler, options.clone());
    produce(&kafka, TENANTS, 2).await;
    wait_for(
        "every tenant's first call under way",
        Duration::from_secs(60),
        || async { (handler.calls.lock().unwrap().len() == TENANTS).then_some(()) },
    )
    .await;
    let (stop_b, task_b, stats_b) = start_with(&cfg, &db.pool, &handler, options);
    wait_for(
        "the second instance calling the tenants it took over",
        Duration::from_secs(60),
        || async {
            let moved = stats_b.partitions.load(Ordering::Relaxed) > 0
                && stats_a.partitions.load(Ordering::Relaxed) < 2;
            (moved && handler.calls.lock().unwrap().len() > TENANTS).then_some(())
        },
    )
    .await;
    handler.stalled.lock().unwrap().clear();
    wait_for("every event delivered", Duration::from_secs(60), || async {
        let delivered = count(
            &db.pool,
            "SELECT count(*) FROM deliveries WHERE outcome = 'delivered'",
        )
        .await;
        (delivered == 2 * TENANTS as i64).then_some(())
    })
    .await;
    handler.assert_one_in_flight_per_tenant();
    for (tenant, seqs) in firsts_by_tenant(&handler) {
        assert_eq!(seqs, [1, 2], "{tenant}");
    }
    stop_a.cancel();
    stop_b.cancel();
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
    db.drop().await;
}

/// Guarantee: nothing lost. The fault: two views of a tenant's state. This instance holds
/// tenant-t paused (its records set aside for parking) while the database says it is live
/// (another instance's drain, or an operator, flipped it): the records are neither settled nor
/// parked, so no offset may pass them; they are delivered.
#[tokio::test(flavor = "multi_thread")]
async fn records_of_a_tenant_live_in_the_database_are_delivered_not_dropped() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let handler = Arc::new(Recorder::default());
    handler.failing.lock().unwrap().insert("tenant-t".into());
    // The instance reads tenant states rarely: its view stays stale for the whole test.
    let options = ConsumeOptions {
        kill_switch_interval: Duration::from_secs(120),
        ..options()
    };
    let (stop, task, stats) = start_with(&cfg, &db.pool, &handler, options);
    produce_rows(&kafka, &[row("tenant-t", 1)]).await;
    wait_for("tenant-t paused here", Duration::from_secs(30), || async {
        (tenant_state(&db.pool, "tenant-t").await.as_deref() == Some("paused")).then_some(())
    })
    .await;
    // Behind this instance's back, the tenant goes live (as another instance's drain flips it).
    sqlx::query(
        "UPDATE tenants SET state = 'active', pause_cause = NULL, pause_reason = NULL, \
         paused_at = NULL, next_retry_at = NULL WHERE tenant_id = 'tenant-t'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    handler.failing.lock().unwrap().clear();
    let mut rows: Vec<_> = (2..=5).map(|seq| row("tenant-t", seq)).collect();
    rows.push(row("tenant-u", 1));
    let last = produce_rows(&kafka, &rows).await;
    wait_for("the commit at the end", Duration::from_secs(30), || async {
        (committed(&kafka).await == Some(last + 1)).then_some(())
    })
    .await;
    let delivered = count(
        &db.pool,
        "SELECT count(*) FROM deliveries WHERE tenant_id = 'tenant-t' AND outcome = 'delivered'",
    )
    .await;
    assert_eq!(delivered, 4, "tenant-t's later events delivered, none lost");
    assert_eq!(firsts_by_tenant(&handler)["tenant-t"], [1, 2, 3, 4, 5]);
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 5);
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

/// Appends `events` in one transaction of the application's own (not through the proxy).
async fn write(
    pool: &sqlx::PgPool,
    events: &[ferry::outbox::writer::NewEvent<ferry::shop::EventPayload>],
) {
    let mut tx = pool.begin().await.unwrap();
    ferry::outbox::writer::append_many(&mut tx, events)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Guarantee: nothing lost, in commit order. The fault: Postgres stops for 30 s under `ferry
/// relay` (its replication stream, its lease and its pool reset, new connections refused) and
/// starts again; rows committed before and after all reach the topic, first copies in commit
/// order, and the relay never exits.
#[tokio::test(flavor = "multi_thread")]
async fn the_relay_rides_out_postgres_stopped_for_thirty_seconds() {
    let db = TestDb::migrated().await;
    let proxy = PgProxy::start(&db.url).await;
    let kafka = fresh_topic(1).await;
    let mut cfg = config(&db, &kafka);
    cfg.database.url = proxy.url(&db.url);
    let (stop, task, stats) = crate::relay::start_relay(&cfg).await;
    let before: Vec<_> = (1..=50)
        .map(|seq| crate::relay::event("ta", seq, ""))
        .collect();
    write(&db.pool, &before).await;
    wait_for(
        "the first rows acknowledged",
        Duration::from_secs(60),
        || async { (stats.records_acked.load(Ordering::Relaxed) >= 50).then_some(()) },
    )
    .await;

    proxy.cut();
    // The outage is the scenario: Postgres stays down for thirty seconds.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!task.is_finished(), "the relay survives the outage");
    proxy.restore().await;
    let after: Vec<_> = (51..=100)
        .map(|seq| crate::relay::event("ta", seq, ""))
        .collect();
    write(&db.pool, &after).await;

    let expected: Vec<uuid::Uuid> = before.iter().chain(&after).map(|e| e.id).collect();
    let firsts = wait_for(
        "every row on the topic",
        Duration::from_secs(120),
        || async {
            let mut firsts: Vec<uuid::Uuid> = Vec::new();
            for m in crate::support::read_all(&kafka).await {
                let id = ferry::outbox::decode(&ferry::broker::raw_record(&m))
                    .expect("decodes")
                    .id;
                if !firsts.contains(&id) {
                    firsts.push(id);
                }
            }
            (firsts.len() >= expected.len()).then_some(firsts)
        },
    )
    .await;
    assert_eq!(firsts, expected, "every row, first copies in commit order");
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

/// One scrape: its status and body.
async fn scrape(url: &str, token: Option<&str>) -> (reqwest::StatusCode, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    match request.timeout(Duration::from_secs(10)).send().await {
        Ok(r) => (r.status(), r.text().await.unwrap_or_default()),
        Err(e) => panic!("{url} does not answer: {e}"),
    }
}

/// `/metrics` of the consumer and of the relay keep answering while Postgres is down: the
/// consumer's database gauges are left out (`ferry_metrics_database_up 0`), never a failed
/// scrape; the relay's `/ready` says 503 until Postgres answers again. Guarantee: an outage
/// is visible on the dashboards it must show on, not a gap in them.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_answer_while_postgres_is_down() {
    use ferry::admin::{Admin, access};
    let db = TestDb::migrated().await;
    let proxy = PgProxy::start(&db.url).await;
    let kafka = fresh_topic(1).await;
    let mut cfg = config(&db, &kafka);
    cfg.database.url = proxy.url(&db.url);
    let pool = ferry::store::connect(&cfg.database).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let consumer = format!("http://{}/metrics", listener.local_addr().unwrap());
    // An instance that owns partition 0: it reports the database's gauges.
    let stats = crate::admin::owner_of_partition_0();
    let admin = Admin {
        pool,
        integration: "partner".to_owned(),
        stats,
        token: Some(access::Token::new("t")),
        hosts: Vec::new(),
        dead_letters: None,
    };
    tokio::spawn(ferry::admin::serve(listener, admin, stop.clone()));
    let (relay_stop, relay_task, stats) = crate::relay::start_relay(&cfg).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = format!("http://{}", listener.local_addr().unwrap());
    let (render, ready) = (Arc::clone(&stats), Arc::clone(&stats));
    tokio::spawn(ferry::telemetry::serve_metrics(
        listener,
        move || render.render_prometheus(),
        move || ready.is_ready(),
        stop.clone(),
    ));
    let (status, body) = scrape(&consumer, Some("t")).await;
    assert!(
        status.is_success()
            && body.contains("\nferry_metrics_database_up{integration=\"partner\"} 1\n"),
        "{body}"
    );
    assert!(
        body.contains("\nferry_parked_events{integration=\"partner\"} 0\n"),
        "{body}"
    );
    assert_eq!(scrape(&format!("{relay}/ready"), None).await.0, 200);

    proxy.cut();
    wait_for("the relay not ready", Duration::from_secs(60), || async {
        (scrape(&format!("{relay}/ready"), None).await.0 == 503).then_some(())
    })
    .await;
    let (status, body) = scrape(&consumer, Some("t")).await;
    assert_eq!(status, 200, "the consumer's scrape answers: {body}");
    assert!(
        body.contains("\nferry_metrics_database_up{integration=\"partner\"} 0\n"),
        "{body}"
    );
    assert!(
        !body.contains("ferry_parked_events"),
        "the database's gauges left out: {body}"
    );
    assert!(
        body.contains("ferry_consumer_records_received_total"),
        "{body}"
    );
    let (status, body) = scrape(&format!("{relay}/metrics"), None).await;
    assert_eq!(status, 200);
    assert!(body.contains("\nferry_relay_failing 1\n"), "{body}");
    assert_eq!(scrape(&format!("{relay}/health"), None).await.0, 200);

    proxy.restore().await;
    wait_for("the relay ready again", Duration::from_secs(60), || async {
        (scrape(&format!("{relay}/ready"), None).await.0 == 200).then_some(())
    })
    .await;
    wait_for(
        "the database's gauges back",
        Duration::from_secs(30),
        || async {
            let (_, body) = scrape(&consumer, Some("t")).await;
            body.contains("\nferry_metrics_database_up{integration=\"partner\"} 1\n")
                .then_some(())
        },
    )
    .await;
    relay_stop.cancel();
    relay_task.await.unwrap().unwrap();
    stop.cancel();
    db.drop().await;
}
