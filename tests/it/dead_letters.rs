//! The terminal policy's dead letters, on the real broker and Postgres: an operator's skip
//! exports the event with its attempts, and copy-back writes it back into the tenant's stream.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::consumer::runtime::ConsumeStats;
use ferry::dead_letter::{DeadLetters, GiveUp, copy_back, header};
use rdkafka::Message as _;
use rdkafka::message::Headers as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::consume::{Recorder, produce_rows, row, start};
use crate::support::{
    AdminUnderTest, TestDb, config, fresh_topic, kafka_config, read_all, unique, wait_for,
};

const TOKEN: &str = "dead-letter-test-token";

async fn start_admin(db: &TestDb, letters: Arc<DeadLetters>) -> (String, CancellationToken) {
    AdminUnderTest {
        integration: "partner",
        token: TOKEN,
        stats: Arc::new(ConsumeStats::default()),
        dead_letters: Some(letters),
    }
    .serve(db)
    .await
}

async fn skip(url: &str) -> (u16, serde_json::Value) {
    let answer = reqwest::Client::new()
        .post(format!("{url}/v1/tenants/acme/skip"))
        .bearer_auth(TOKEN)
        .json(&json!({"actor": "ops", "reason": "the partner will never take it"}))
        .send()
        .await
        .unwrap();
    (answer.status().as_u16(), answer.json().await.unwrap())
}

async fn paused_with(db: &TestDb, parked: i64) -> Option<()> {
    let (state, n): (String, i64) = sqlx::query_as(
        "SELECT state, (SELECT count(*) FROM parked_events WHERE tenant_id = 'acme') \
         FROM tenants WHERE integration = 'partner' AND tenant_id = 'acme'",
    )
    .fetch_one(&db.pool)
    .await
    .ok()?;
    (state == "paused" && n == parked).then_some(())
}

fn calls_of(handler: &Recorder, tenant: &str) -> Vec<i64> {
    let mut per: HashMap<String, Vec<i64>> = HashMap::new();
    for (t, seq) in handler.calls.lock().unwrap().iter() {
        per.entry(t.clone()).or_default().push(*seq);
    }
    per.remove(tenant).unwrap_or_default()
}

/// Guarantee: nothing lost when an operator gives up on events. Each skipped event is exported
/// with its attempts before it leaves the backlog, the tenant goes on (globex never waits), and
/// copy-back writes the dead letters back into acme's stream in the order they were exported,
/// each once: a second copy-back writes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_exported_with_their_attempts_and_copied_back_in_order() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let dead = kafka_config(&unique("ferry-test-dead").replace('_', "-"));
    ferry::broker::ensure_topic(&dead, &dead.topic, 1)
        .await
        .unwrap();
    let letters = Arc::new(DeadLetters::new(&kafka, &dead.topic).unwrap());
    // The copies travel as every outbox row does: through the relay.
    let (relay_stop, relay_task, _) = crate::relay::start_relay(&cfg).await;
    let mut rows: Vec<_> = (1..=4).map(|seq| row("acme", seq)).collect();
    rows.extend((1..=2).map(|seq| row("globex", seq)));
    produce_rows(&kafka, &rows).await;
    let handler = Arc::new(Recorder {
        failing: Mutex::new(["acme".to_owned()].into_iter().collect()),
        ..Default::default()
    });
    let (stop, task, stats) = start(&cfg, &db.pool, &handler);
    wait_for(
        "acme paused, its 4 events parked",
        Duration::from_secs(60),
        || paused_with(&db, 4),
    )
    .await;
    let (url, admin_stop) = start_admin(&db, Arc::clone(&letters)).await;

    let (status, body) = skip(&url).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["dead_letter"]["topic"], dead.topic.as_str(), "{body}");
    wait_for(
        "acme paused again on its 2nd event",
        Duration::from_secs(60),
        || paused_with(&db, 3),
    )
    .await;
    handler.failing.lock().unwrap().clear();
    let (status, body) = skip(&url).await;
    assert_eq!(status, 202, "{body}");
    wait_for(
        "acme's 3rd and 4th delivered",
        Duration::from_secs(60),
        || async { (calls_of(&handler, "acme") == [1, 2, 3, 4]).then_some(()) },
    )
    .await;
    assert_eq!(calls_of(&handler, "globex"), [1, 2], "globex never waited");

    // In the topic: the records as they came, with where from, who, why and the attempts.
    let exported = read_all(&dead).await;
    assert_eq!(exported.len(), 2);
    for (m, seq) in exported.iter().zip([1, 2]) {
        assert_eq!(m.key(), Some(&b"acme"[..]));
        let header = |name: &str| {
            let hs = m.headers().unwrap();
            let h = hs.iter().find(|h| h.key == name).unwrap();
            String::from_utf8(h.value.unwrap().to_vec()).unwrap()
        };
        assert_eq!(header("aggregateId"), seq.to_string());
        assert_eq!(header(header::INTEGRATION), "partner");
        assert_eq!(header(header::ACTOR), "ops");
        let attempts: serde_json::Value = serde_json::from_str(&header(header::ATTEMPTS)).unwrap();
        assert!(attempts.to_string().contains("422"), "{attempts}");
    }
    let settled: Vec<String> = sqlx::query_scalar(
        "SELECT outcome FROM deliveries WHERE integration = 'partner' AND outcome = 'dead_lettered'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(settled.len(), 2);

    // Copied back: both, in the order they were exported; then nothing more.
    let who = GiveUp {
        integration: "partner",
        tenant: "acme",
        actor: "ops",
        reason: "the partner takes them now",
    };
    assert_eq!(copy_back(&db.pool, &letters, who).await.unwrap(), 2);
    wait_for("the copies delivered", Duration::from_secs(60), || async {
        (calls_of(&handler, "acme") == [1, 2, 3, 4, 1, 2]).then_some(())
    })
    .await;
    assert_eq!(copy_back(&db.pool, &letters, who).await.unwrap(), 0);
    let listed = ferry::dead_letter::list(&db.pool, "partner", Some("acme"))
        .await
        .unwrap();
    assert!(
        listed.iter().all(|l| l.copied_back_at.is_some()),
        "{listed:?}"
    );
    // globex's 2, acme's 3rd and 4th, and the two copies: acme's originals were given up on.
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 6);
    admin_stop.cancel();
    stop.cancel();
    task.await.unwrap().unwrap();
    relay_stop.cancel();
    relay_task.await.unwrap().unwrap();
    db.drop().await;
}

/// Guarantee: nothing lost when the dead-letter topic cannot be reached. Input tried: a skip
/// while the broker does not answer. It fails with what was wrong, and the event stays parked,
/// the tenant paused.
#[tokio::test(flavor = "multi_thread")]
async fn a_skip_that_cannot_export_skips_nothing() {
    let db = TestDb::migrated().await;
    let records = vec![crate::ledger::record(10)];
    let pause = crate::ledger::pause_422(records[0].event_id);
    ferry::consumer::ledger::park(&db.pool, "partner", "acme", Some(&pause), &records)
        .await
        .unwrap();
    let mut nowhere = kafka_config("ferry-dead-nowhere");
    nowhere.brokers = "127.0.0.1:1".to_owned();
    let letters =
        DeadLetters::with_timeout(&nowhere, "ferry-dead-nowhere", Duration::from_secs(2)).unwrap();
    let (url, stop) = start_admin(&db, Arc::new(letters)).await;
    let (status, body) = skip(&url).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "dead_letter_unavailable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing was skipped"),
        "{body}"
    );
    paused_with(&db, 1)
        .await
        .expect("still paused, still parked");
    stop.cancel();
    db.drop().await;
}
