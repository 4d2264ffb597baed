//! Kafka against the real broker: consumer-group commits and resumption, and the wire
//! contract's records surviving a trip through the broker byte for byte.

use std::time::Duration;

use chrono::Utc;
use ferry::broker;
use ferry::config::KafkaConfig;
use ferry::outbox::{self, OutboxRow, WireRecord};
use ferry::shop::{EventPayload, EventType, proto};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use crate::decoder::{OwnedRecord, all_cases, check};
use crate::support::fresh_topic;

const DEADLINE: Duration = Duration::from_secs(60);

fn row(tenant: &str, n: usize) -> OutboxRow {
    let payload = EventPayload::ProductCreated(proto::ProductCreated {
        product: Some(proto::Product {
            id: format!("p-{n}"),
            name: format!("Product {n}"),
            description: String::new(),
            price_minor: 100 + n as i64,
            currency: "EUR".to_owned(),
        }),
    });
    OutboxRow {
        id: Uuid::now_v7(),
        tenant_id: tenant.to_owned(),
        aggregate_type: "Product".to_owned(),
        aggregate_id: format!("p-{n}"),
        event_type: EventType::ProductCreated.as_str().to_owned(),
        payload: payload.encode_to_vec(),
        traceparent: None,
        created_at: Utc::now(),
        deliver_before: None,
        integration: None,
    }
}

async fn produce(config: &KafkaConfig, records: &[WireRecord]) -> Vec<(i32, i64)> {
    let producer: FutureProducer = broker::producer_config(config).create().unwrap();
    let mut positions = Vec::new();
    for r in records {
        let delivery = producer
            .send(broker::future_record(&config.topic, r), DEADLINE)
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
        positions.push((delivery.partition, delivery.offset));
    }
    positions
}

fn consumer(config: &KafkaConfig) -> StreamConsumer {
    let mut c = broker::consumer_config(config, &config.group_id);
    c.set("session.timeout.ms", "10000");
    let consumer: StreamConsumer = c.create().unwrap();
    consumer.subscribe(&[&config.topic]).unwrap();
    consumer
}

async fn recv(consumer: &StreamConsumer) -> rdkafka::message::OwnedMessage {
    tokio::time::timeout(DEADLINE, consumer.recv())
        .await
        .expect("a record arrives within the deadline")
        .expect("consume")
        .detach()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_commits_and_a_second_member_resumes_after_the_offset() {
    let config = fresh_topic(1).await;
    let rows: Vec<OutboxRow> = (0..10)
        .map(|n| row(&format!("tenant-{}", n % 3), n))
        .collect();
    let records: Vec<WireRecord> = rows.iter().map(|r| WireRecord::from_row(r, None)).collect();
    let positions = produce(&config, &records).await;
    assert!(
        positions.windows(2).all(|w| w[1].1 == w[0].1 + 1),
        "{positions:?}"
    );
    let first_offset = positions[0].1;

    // The first member reads five records and commits the offset after the fifth.
    {
        let a = consumer(&config);
        for (i, expected) in rows.iter().take(5).enumerate() {
            let m = recv(&a).await;
            assert_eq!(m.offset(), first_offset + i as i64);
            let event = outbox::decode(&broker::raw_record(&m)).expect("decodes");
            assert_eq!(event.id, expected.id);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&config.topic, 0, Offset::Offset(first_offset + 5))
            .unwrap();
        tokio::task::block_in_place(|| a.commit(&tpl, CommitMode::Sync)).expect("commit");
        let committed = tokio::task::block_in_place(|| a.committed(Duration::from_secs(10)))
            .expect("committed offsets");
        assert_eq!(
            committed.find_partition(&config.topic, 0).unwrap().offset(),
            Offset::Offset(first_offset + 5)
        );
        // Dropping the consumer leaves the group.
    }

    // A second member of the same group starts at the committed offset, not at the beginning.
    let b = consumer(&config);
    for expected in rows.iter().skip(5) {
        let m = recv(&b).await;
        let event = outbox::decode(&broker::raw_record(&m)).expect("decodes");
        assert_eq!(event.id, expected.id, "resumed in order after the commit");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn debezium_shaped_records_survive_the_broker() {
    let config = fresh_topic(1).await;
    let cases = all_cases();
    let producer: FutureProducer = broker::producer_config(&config).create().unwrap();
    for (_, case) in &cases {
        let owned = OwnedRecord::from_fixture(&case.record);
        let headers = owned
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |hs, (k, v)| {
                hs.insert(Header {
                    key: k,
                    value: v.as_deref(),
                })
            });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&config.topic)
            .headers(headers)
            .partition(0);
        if let Some(k) = owned.key.as_deref() {
            record = record.key(k);
        }
        if let Some(v) = owned.value.as_deref() {
            record = record.payload(v);
        }
        producer
            .send(record, DEADLINE)
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let c = consumer(&config);
    for (name, case) in &cases {
        let m = recv(&c).await;
        check(name, case, super::decoder::read(&broker::raw_record(&m)));
    }
}
