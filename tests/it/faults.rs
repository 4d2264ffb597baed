//! Broker faults a real broker cannot stage on demand, on librdkafka's in-process mock cluster:
//! every broker down mid-stream, and request errors on fetches and offset commits. Postgres is
//! the real one. Each test asserts, from what the handler saw, that every event came through in
//! per-tenant order, and that the committed offset reached the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaApiKey;
use rdkafka::types::RDKafkaRespErr;

use crate::consume::{Recorder, committed, produce, start};
use crate::support::{TestDb, config, kafka_config, wait_for};

const TENANTS: usize = 12;

/// Per tenant, the first call of each event is in order and none is missing.
fn assert_all_in_order(handler: &Recorder, per_tenant: i64) {
    let calls = handler.calls.lock().unwrap().clone();
    let mut firsts: HashMap<String, Vec<i64>> = HashMap::new();
    for (tenant, seq) in calls {
        let seen = firsts.entry(tenant).or_default();
        if !seen.contains(&seq) {
            seen.push(seq);
        }
    }
    assert_eq!(firsts.len(), TENANTS);
    for (tenant, seqs) in firsts {
        assert_eq!(seqs, (1..=per_tenant).collect::<Vec<_>>(), "{tenant}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_rides_out_every_broker_going_down_and_loses_nothing() {
    let mock = MockCluster::new(3).unwrap();
    let db = TestDb::migrated().await;
    let mut kafka = kafka_config("unused");
    kafka.brokers = mock.bootstrap_servers();
    kafka.topic = "faults-down".into();
    mock.create_topic(&kafka.topic, 1, 3).unwrap();
    let cfg = config(&db, &kafka);

    produce(&kafka, TENANTS, 10).await;
    let handler = Arc::new(Recorder::default());
    let (stop, task, stats) = start(&cfg, &db.pool, &handler);
    wait_for(
        "the first half delivered",
        Duration::from_secs(60),
        || async { (stats.delivered.load(Ordering::Relaxed) == TENANTS as u64 * 10).then_some(()) },
    )
    .await;

    // The outage is the scenario: every broker down for three seconds, fetches and commits
    // failing meanwhile; then they come back.
    for broker in 1..=3 {
        mock.broker_down(broker).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!task.is_finished(), "the consumer survives the outage");
    for broker in 1..=3 {
        mock.broker_up(broker).unwrap();
    }

    // The second half goes out after the outage: seqs 11..=20 per tenant.
    let rows: Vec<_> = (11..=20)
        .flat_map(|seq| (0..TENANTS).map(move |t| crate::consume::row(&format!("tenant-{t}"), seq)))
        .collect();
    let last = crate::consume::produce_rows(&kafka, &rows).await;
    wait_for("every event delivered", Duration::from_secs(60), || async {
        (stats.delivered.load(Ordering::Relaxed) == TENANTS as u64 * 20).then_some(())
    })
    .await;
    wait_for("the commit at the end", Duration::from_secs(60), || async {
        (committed(&kafka).await == Some(last + 1)).then_some(())
    })
    .await;
    assert_all_in_order(&handler, 20);
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 0);
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_fetches_and_failed_commits_are_retried_until_the_commit_lands() {
    let mock = MockCluster::new(1).unwrap();
    let db = TestDb::migrated().await;
    let mut kafka = kafka_config("unused");
    kafka.brokers = mock.bootstrap_servers();
    kafka.topic = "faults-requests".into();
    mock.create_topic(&kafka.topic, 1, 1).unwrap();
    let cfg = config(&db, &kafka);
    let last = produce(&kafka, TENANTS, 15).await;

    // The next fetches fail as if leadership moved, and the next commits fail as if the
    // coordinator were loading: each is retried, none may lose or reorder an event.
    mock.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 3],
    );
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_COMMIT_OFFSET_SIZE; 8],
    );
    let handler = Arc::new(Recorder::default());
    let (stop, task, stats) = start(&cfg, &db.pool, &handler);
    wait_for("every event delivered", Duration::from_secs(60), || async {
        (stats.delivered.load(Ordering::Relaxed) == TENANTS as u64 * 15).then_some(())
    })
    .await;
    wait_for(
        "the commit at the end despite failed commits",
        Duration::from_secs(60),
        || async { (committed(&kafka).await == Some(last + 1)).then_some(()) },
    )
    .await;
    assert_all_in_order(&handler, 15);
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}

/// Fault: the group forgets this member (heartbeats answered UNKNOWN_MEMBER_ID), so librdkafka
/// reports its assignment lost; another member may own the partition already. Guarantee: the
/// old owner's call under way is cut at once, not after `revoke_drain`, so it cannot land after
/// the new owner's; the partition is read again from the last commit and nothing is lost.
/// Input: a tenant whose call hangs, `revoke_drain` of 60 s, the loss staged mid-call.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_assignment_cuts_the_calls_under_way_at_once() {
    let mock = MockCluster::new(1).unwrap();
    let db = TestDb::migrated().await;
    let mut kafka = kafka_config("unused");
    kafka.brokers = mock.bootstrap_servers();
    kafka.topic = "faults-lost".into();
    // The forgotten member's old session ends soon, so the group reassigns the partition soon.
    for (name, value) in [
        ("heartbeat.interval.ms", "300"),
        ("session.timeout.ms", "6000"),
    ] {
        kafka.properties.insert(name.into(), value.into());
    }
    mock.create_topic(&kafka.topic, 1, 1).unwrap();
    let cfg = config(&db, &kafka);
    crate::consume::produce_rows(&kafka, &[crate::consume::row("slow", 1)]).await;
    let handler = Arc::new(Recorder::default());
    handler.stalled.lock().unwrap().insert("slow".into());
    let options = ferry::consumer::runtime::ConsumeOptions {
        revoke_drain: Duration::from_secs(60),
        ..ferry::consumer::runtime::ConsumeOptions::default()
    };
    let (stop, task, _stats) = crate::consume::start_with(&cfg, &db.pool, &handler, options);
    let calls = || handler.calls.lock().unwrap().len();
    wait_for(
        "the slow call under way",
        Duration::from_secs(30),
        || async { (calls() == 1).then_some(()) },
    )
    .await;
    mock.request_errors(
        RDKafkaApiKey::Heartbeat,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID],
    );
    // Cut at once, the member rejoins and reads the event again: a second call, long before
    // the 60 s a drain would have waited.
    wait_for(
        "the call cut and the event read again after the lost assignment",
        Duration::from_secs(30),
        || async { (calls() == 2).then_some(()) },
    )
    .await;
    let spans = handler.spans.lock().unwrap().clone();
    assert_eq!(
        spans.len(),
        1,
        "the first call ended (cut), the second is under way"
    );
    handler.stalled.lock().unwrap().clear();
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}
