//! The smoke round trip: proof that a stack works end to end, in seconds. It migrates the
//! database, produces one event of the wire contract to the smoke topic, consumes it back in a
//! consumer group, decodes it, checks it is the same event, and commits the group's offset.

use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use crate::broker::{self, BrokerError};
use crate::config::Config;
use crate::outbox::{self, BadEvent, OutboxRow, Payload, WireRecord};
use crate::shop::{self, EventPayload, EventType, proto};
use crate::store::{self, StoreError};

/// The topic the smoke test uses, apart from the outbox topic so it never mixes with real
/// events.
pub const SMOKE_TOPIC: &str = "ferry.smoke";
/// The smoke test's consumer group.
pub const SMOKE_GROUP: &str = "ferry-smoke";

/// What the round trip saw.
#[derive(Debug, Clone)]
pub struct SmokeReport {
    /// The newest applied migration.
    pub schema_version: i64,
    /// Brokers in the cluster's metadata.
    pub brokers: usize,
    /// The event sent.
    pub event_id: Uuid,
    /// Where it landed.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The group's committed offset afterwards (the next record to read).
    pub committed: i64,
    /// From produce to decoded.
    pub round_trip: Duration,
}

/// Why the smoke round trip failed.
#[derive(Debug, thiserror::Error)]
pub enum SmokeError {
    /// Postgres failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Kafka administration failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A Kafka client call failed.
    #[error("Kafka {what} failed: {source}")]
    Kafka {
        /// The operation.
        what: &'static str,
        /// The client's error.
        source: KafkaError,
    },
    /// The event came back but did not decode.
    #[error("the smoke event came back undecodable: {0}")]
    Decode(#[from] BadEvent),
    /// The event came back changed.
    #[error("the smoke event came back changed: sent {sent:?}, received {received:?}")]
    Mismatch {
        /// What was sent.
        sent: Box<Payload>,
        /// What came back.
        received: Box<Payload>,
    },
    /// The event did not come back in time.
    #[error("the smoke event did not come back within {0:?}")]
    Timeout(Duration),
    /// The committed offset is not the one committed.
    #[error("the group's committed offset is {found:?}, expected {expected}")]
    Commit {
        /// What the broker reports.
        found: Option<i64>,
        /// What was committed.
        expected: i64,
    },
}

fn kafka(what: &'static str) -> impl FnOnce(KafkaError) -> SmokeError {
    move |source| SmokeError::Kafka { what, source }
}

/// Runs the round trip against the configured stack.
pub async fn run(config: &Config, timeout: Duration) -> Result<SmokeReport, SmokeError> {
    let pool = store::connect(&config.database).await?;
    store::migrate(&pool).await?;
    let schema_version = store::schema_version(&pool).await?.unwrap_or(0);
    pool.close().await;

    let kafka_config = config.kafka.clone();
    let brokers = tokio::task::spawn_blocking(move || {
        broker::check_reachable(&kafka_config, Duration::from_secs(10))
    })
    .await
    .expect("metadata task panicked")?;
    broker::ensure_topic(&config.kafka, SMOKE_TOPIC, 1).await?;

    let (row, payload) = smoke_event();
    let record = WireRecord::from_row(&row, None);
    let producer: FutureProducer = broker::producer_config(&config.kafka)
        .create()
        .map_err(kafka("producer creation"))?;
    let started = Instant::now();
    let delivery = producer
        .send(broker::future_record(SMOKE_TOPIC, &record), timeout)
        .await
        .map_err(|(source, _)| SmokeError::Kafka {
            what: "produce",
            source,
        })?;
    let (partition, offset) = (delivery.partition, delivery.offset);

    let consumer: StreamConsumer = broker::consumer_config(&config.kafka, SMOKE_GROUP)
        .create()
        .map_err(kafka("consumer creation"))?;
    consumer
        .subscribe(&[SMOKE_TOPIC])
        .map_err(kafka("subscribe"))?;
    read_back(&consumer, &row, &payload, timeout).await?;
    let round_trip = started.elapsed();
    commit_and_check(&consumer, partition, offset + 1)?;
    Ok(SmokeReport {
        schema_version,
        brokers,
        event_id: row.id,
        partition,
        offset,
        committed: offset + 1,
        round_trip,
    })
}

/// A fresh product's creation, as the outbox row the application would write.
fn smoke_event() -> (OutboxRow, EventPayload) {
    let payload = EventPayload::ProductCreated(proto::ProductCreated {
        product: Some(proto::Product {
            id: Uuid::new_v4().to_string(),
            name: "Smoke test lamp".to_owned(),
            description: "Proves the stack works".to_owned(),
            price_minor: 1999,
            currency: "EUR".to_owned(),
        }),
    });
    let row = OutboxRow {
        id: Uuid::now_v7(),
        tenant_id: "smoke".to_owned(),
        aggregate_type: shop::AGGREGATE.to_owned(),
        aggregate_id: "smoke".to_owned(),
        event_type: EventType::ProductCreated.as_str().to_owned(),
        payload: payload.encode_to_vec(),
        traceparent: None,
        created_at: Utc::now(),
        deliver_before: None,
        integration: None,
    };
    (row, payload)
}

/// Reads until the event `row` comes back, and checks it came back unchanged.
async fn read_back(
    consumer: &StreamConsumer,
    row: &OutboxRow,
    payload: &EventPayload,
    timeout: Duration,
) -> Result<(), SmokeError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .map_err(|_| SmokeError::Timeout(timeout))?
            .map_err(kafka("consume"))?;
        // Earlier smoke runs' records may still be ahead of the group's offset: skip them.
        let event = outbox::decode(&broker::raw_record(&message))?;
        if event.id != row.id {
            continue;
        }
        let sent = Payload::Protobuf(payload.encode_to_vec());
        if event.payload != sent {
            return Err(SmokeError::Mismatch {
                sent: Box::new(sent),
                received: Box::new(event.payload),
            });
        }
        return Ok(());
    }
}

/// Commits `next` for the smoke partition and checks the broker reports it back.
fn commit_and_check(
    consumer: &StreamConsumer,
    partition: i32,
    next: i64,
) -> Result<(), SmokeError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(SMOKE_TOPIC, partition, Offset::Offset(next))
        .map_err(kafka("offset list"))?;
    // A synchronous commit blocks its thread until the broker answers: keep it off the
    // runtime's workers.
    let committed = tokio::task::block_in_place(|| {
        consumer.commit(&tpl, CommitMode::Sync)?;
        consumer.committed(Duration::from_secs(10))
    })
    .map_err(kafka("commit"))?;
    let committed = committed
        .find_partition(SMOKE_TOPIC, partition)
        .and_then(|p| p.offset().to_raw());
    if committed != Some(next) {
        return Err(SmokeError::Commit {
            found: committed,
            expected: next,
        });
    }
    Ok(())
}
