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
