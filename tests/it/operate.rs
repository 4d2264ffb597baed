//! Operating a running consumer through the admin API, against the real stack: an operator's
//! pause reaches the instance that owns the tenant (in-flight work ends, the rest is parked in
//! order), resume replays it; a failing event's every attempt is on record; the partitions
//! show their committed offsets and lag; a scrape carries the series an operator graphs.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::consumer::runtime::{ConsumeOptions, ConsumeStats};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::consume::{Recorder, produce_rows, row, start_with};
use crate::support::{AdminUnderTest, TestDb, config, fresh_topic, wait_for};

const TOKEN: &str = "operate-test-token";

/// The admin API over a running consumer's counters.
async fn admin(db: &TestDb, stats: &Arc<ConsumeStats>) -> (String, CancellationToken) {
    AdminUnderTest {
        integration: "partner",
        token: TOKEN,
        stats: Arc::clone(stats),
        dead_letters: None,
    }
    .serve(db)
    .await
}

async fn post(url: &str, body: Value) -> (reqwest::StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

async fn get(url: &str) -> String {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn options() -> ConsumeOptions {
    ConsumeOptions {
        kill_switch_interval: Duration::from_millis(100),
        retry: ferry::delivery::RetryPolicy {
            base: Duration::from_millis(20),
            max: Duration::from_millis(100),
            pause_after_attempts: 50,
            pause_after: Duration::from_secs(60),
            ..ferry::delivery::RetryPolicy::default()
        },
        ..ConsumeOptions::default()
    }
}

fn calls_of(handler: &Recorder, tenant: &str) -> Vec<i64> {
    handler
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t == tenant)
        .map(|(_, seq)| *seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operators_pause_reaches_the_owner_and_resume_replays_in_order() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    for tenant in ["held", "busy"] {
        sqlx::query("INSERT INTO tenants (integration, tenant_id, integration_enabled) VALUES ('partner', $1, true)")
            .bind(tenant)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let handler = Arc::new(Recorder::default());
    let (stop, task, stats) = start_with(&cfg, &db.pool, &handler, options());
    let (url, admin_stop) = admin(&db, &stats).await;

    let rows: Vec<_> = (1..=5)
        .flat_map(|seq| [row("held", seq), row("busy", seq)])
        .collect();
    produce_rows(&kafka, &rows).await;
    wait_for(
        "the first 10 delivered",
        Duration::from_secs(60),
        || async { (stats.delivered.load(Ordering::Relaxed) >= 10).then_some(()) },
    )
    .await;

    // Paused through the API: the owner holds it within its kill-switch interval.
    let why = json!({"actor": "ops", "reason": "partner maintenance for held"});
    let (status, body) = post(&format!("{url}/v1/tenants/held/pause"), why.clone()).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
    wait_for(
        "the owning instance holds the paused tenant",
        Duration::from_secs(10),
        || async { (stats.tenants_held.load(Ordering::Relaxed) == 1).then_some(()) },
    )
    .await;
    let rows: Vec<_> = (6..=10)
        .flat_map(|seq| [row("held", seq), row("busy", seq)])
        .collect();
    let last = produce_rows(&kafka, &rows).await;
    wait_for(
        "busy delivered on, held's new events parked",
        Duration::from_secs(60),
        || async {
            let parked: i64 =
                sqlx::query_scalar("SELECT count(*) FROM parked_events WHERE tenant_id = 'held'")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            (calls_of(&handler, "busy").len() == 10 && parked == 5).then_some(())
        },
    )
    .await;
    assert_eq!(
        calls_of(&handler, "held"),
        (1..=5).collect::<Vec<_>>(),
        "nothing of a paused tenant is sent"
    );
    // The partition's commit point passes the parked events.
    wait_for(
        "the partition committed through the parked events, lag 0",
        Duration::from_secs(30),
        || async {
            let body: Value =
                serde_json::from_str(&get(&format!("{url}/v1/partitions")).await).unwrap();
            let p = &body["data"][0];
            (p["committed_offset"] == json!(last + 1) && p["lag"] == json!(0)).then_some(())
        },
    )
    .await;

    let (status, body) = post(&format!("{url}/v1/tenants/held/resume"), why).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
    wait_for(
        "held replayed and live again",
        Duration::from_secs(60),
        || async {
            let state: String =
                sqlx::query_scalar("SELECT state FROM tenants WHERE tenant_id = 'held'")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            (state == "active" && calls_of(&handler, "held").len() == 10).then_some(())
        },
    )
    .await;
    assert_eq!(calls_of(&handler, "held"), (1..=10).collect::<Vec<_>>());
    assert_eq!(calls_of(&handler, "busy"), (1..=10).collect::<Vec<_>>());
    wait_for(
        "the instance holds no tenant any more",
        Duration::from_secs(10),
        || async { (stats.tenants_held.load(Ordering::Relaxed) == 0).then_some(()) },
    )
    .await;

    let text = get(&format!("{url}/metrics")).await;
    for series in [
        "ferry_consumer_in_flight",
        "ferry_consumer_queued",
        "ferry_consumer_tenants_held{integration=\"partner\"} 0",
        "ferry_deliveries_total{integration=\"partner\",outcome=\"parked\"} 5",
        "ferry_deliveries_total{integration=\"partner\",outcome=\"delivered\"} 20",
        "ferry_deliveries_total{integration=\"partner\",outcome=\"ignored\"} 0",
        &format!(
            "ferry_consumer_lag{{integration=\"partner\",topic=\"{}\",partition=\"0\"}} 0",
            kafka.topic
        ),
        &format!(
            "ferry_consumer_committed_offset{{integration=\"partner\",topic=\"{}\",partition=\"0\"}} {}",
            kafka.topic,
            last + 1
        ),
        "# TYPE ferry_relay_slot_lag_bytes gauge",
        "# TYPE ferry_retries counter",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(series)),
            "{series} in:\n{text}"
        );
    }
    admin_stop.cancel();
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_events_every_attempt_is_on_record() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let handler = Arc::new(Recorder {
        flaky: Mutex::new(["shaky".to_owned()].into_iter().collect()),
        ..Default::default()
    });
    let (stop, task, stats) = start_with(&cfg, &db.pool, &handler, options());
    let (url, admin_stop) = admin(&db, &stats).await;
    let event = row("shaky", 1);
    let id = event.id;
    produce_rows(&kafka, &[event, row("steady", 1)]).await;
    wait_for(
        "three failed attempts at shaky's event",
        Duration::from_secs(30),
        || async { (calls_of(&handler, "shaky").len() >= 3).then_some(()) },
    )
    .await;
    handler.flaky.lock().unwrap().clear();
    wait_for("both delivered", Duration::from_secs(30), || async {
        (stats.delivered.load(Ordering::Relaxed) == 2).then_some(())
    })
    .await;
    let history: Value = wait_for(
        "the event's history recorded",
        Duration::from_secs(10),
        || async {
            let body: Value =
                serde_json::from_str(&get(&format!("{url}/v1/events/{id}")).await).unwrap();
            (body["delivery"]["settled_at"].is_string()).then_some(body)
        },
    )
    .await;
    let attempts = history["attempts"].as_array().unwrap();
    let calls = calls_of(&handler, "shaky").len();
    assert_eq!(attempts.len(), calls, "one entry per call: {history}");
    for (n, attempt) in attempts.iter().enumerate() {
        assert_eq!(attempt["attempt"], json!(n + 1), "{history}");
    }
    let (last, failed) = attempts.split_last().unwrap();
    assert_eq!(last["outcome"], "delivered", "{history}");
    for f in failed {
        assert_eq!(f["outcome"], "failed", "{history}");
        assert_eq!(f["response"]["status"], 503, "{history}");
        assert!(
            f["error"]
                .as_str()
                .unwrap()
                .starts_with("server_error: partner timed out"),
            "{history}"
        );
    }
    assert_eq!(history["delivery"]["attempts"], json!(calls), "{history}");
    // A first-try delivery keeps one row, no attempt history.
    let steady: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM delivery_attempts a JOIN deliveries d USING (event_id) WHERE d.tenant_id = 'steady'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(steady, 0);
    let text = get(&format!("{url}/metrics")).await;
    let retries: HashMap<&str, u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ferry_retries_total{integration=\"partner\",cause=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(cause, n)| (cause, n.parse().unwrap()))
        .collect();
    assert_eq!(
        retries.get("server_error").copied(),
        Some(calls as u64 - 1),
        "{text}"
    );
    admin_stop.cancel();
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_is_delivered_again_in_order_through_the_relay() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let (relay_stop, relay_task, _) = crate::relay::start_relay(&cfg).await;
    let handler = Arc::new(Recorder::default());
    let (stop, task, stats) = start_with(&cfg, &db.pool, &handler, options());
    let (url, admin_stop) = admin(&db, &stats).await;
    // The database's clock: the outbox's `created_at` is its `now()`.
    let since: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for seq in 1..=3 {
        let mut tx = db.pool.begin().await.unwrap();
        ferry::outbox::writer::append(&mut tx, &crate::relay::event("again", seq, ""))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    wait_for(
        "the three events delivered",
        Duration::from_secs(60),
        || async { (calls_of(&handler, "again").len() == 3).then_some(()) },
    )
    .await;

    let body = json!({"actor": "ops", "reason": "partner restored a backup", "since": since});
    let (status, answer) = post(&format!("{url}/v1/tenants/again/replay"), body).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["events"], 3, "{answer}");
    wait_for(
        "the replayed events delivered",
        Duration::from_secs(60),
        || async { (calls_of(&handler, "again").len() == 6).then_some(()) },
    )
    .await;
    assert_eq!(
        calls_of(&handler, "again"),
        [1, 2, 3, 1, 2, 3],
        "replayed after the originals, in their order"
    );
    assert_eq!(
        stats.duplicates.load(Ordering::Relaxed),
        0,
        "the copies are new events, not deduped away"
    );
    admin_stop.cancel();
    stop.cancel();
    task.await.unwrap().unwrap();
    relay_stop.cancel();
    relay_task.await.unwrap().unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operators_pause_stops_the_retries_and_stays_the_operators() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    sqlx::query("INSERT INTO tenants (integration, tenant_id, integration_enabled) VALUES ('partner', 'stuck', true)")
        .execute(&db.pool)
        .await
        .unwrap();
    // The partner answers 503 for ever; the retry policy would go on for 50 attempts.
    let handler = Arc::new(Recorder {
        flaky: Mutex::new(["stuck".to_owned()].into_iter().collect()),
        ..Default::default()
    });
    // Backoff up to 400 ms: 50 attempts take about 10 s, so the pause (noticed within
    // `kill_switch_interval`) lands long before them even on a loaded machine; at 100 ms the
    // whole budget was 2.5 s, and a CI run under the full suite's load spent it.
    let mut opts = options();
    opts.retry.max = Duration::from_millis(400);
    let (stop, task, stats) = start_with(&cfg, &db.pool, &handler, opts);
    let (url, admin_stop) = admin(&db, &stats).await;
    let rows: Vec<_> = (1..=3).map(|seq| row("stuck", seq)).collect();
    let failing = rows[0].id;
    produce_rows(&kafka, &rows).await;
    wait_for(
        "the first event retried",
        Duration::from_secs(30),
        || async { (calls_of(&handler, "stuck").len() >= 2).then_some(()) },
    )
    .await;

    let why = json!({"actor": "ops", "reason": "partner asked us to stop"});
    let (status, body) = post(&format!("{url}/v1/tenants/stuck/pause"), why).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
    // The failing event is parked first, then the two behind it, well before 50 attempts.
    let parked: Vec<i64> = wait_for(
        "the tenant's three events parked",
        Duration::from_secs(30),
        || async {
            let offsets: Vec<i64> = sqlx::query_scalar(
                "SELECT \"offset\" FROM parked_events WHERE tenant_id = 'stuck' ORDER BY seq",
            )
            .fetch_all(&db.pool)
            .await
            .unwrap();
            (offsets.len() == 3).then_some(offsets)
        },
    )
    .await;
    let mut sorted = parked.clone();
    sorted.sort_unstable();
    assert_eq!(parked, sorted, "parked in offset order: {parked:?}");
    let calls = calls_of(&handler, "stuck");
    assert!(
        calls.iter().all(|seq| *seq == 1),
        "only the first event was tried: {calls:?}"
    );
    assert!(
        calls.len() < 50,
        "retries stopped at the pause: {} calls",
        calls.len()
    );
    let (cause, next_retry, failed_event): (
        String,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<uuid::Uuid>,
    ) = sqlx::query_as(
        "SELECT pause_cause, next_retry_at, paused_event_id FROM tenants WHERE tenant_id = 'stuck'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        cause, "operator",
        "the operator's pause is not turned into an automatic retry"
    );
    assert_eq!(next_retry, None);
    assert_eq!(
        failed_event,
        Some(failing),
        "the failing event is on record"
    );
    admin_stop.cancel();
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}
