//! Kafka: client settings shared by every producer and consumer Ferry makes, topic
//! administration, and the bridge from rdkafka's message type to the decoder's [`RawRecord`].

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::outbox::RawRecord;

/// A Kafka failure at Ferry's boundary.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A client could not be created (bad settings).
    #[error("cannot create a Kafka client: {0}")]
    Client(#[source] KafkaError),
    /// A topic could not be created.
    #[error("cannot create topic {topic}: {source}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's error.
        source: KafkaError,
    },
    /// The broker did not answer a metadata request in time.
    #[error("the broker at {brokers} did not answer: {source}")]
    Unreachable {
        /// The bootstrap servers.
        brokers: String,
        /// The client's error.
        source: KafkaError,
    },
}

/// Settings every client shares: the bootstrap servers and the configured extra properties.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("client.id", "ferry");
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    c
}

/// A producer of the wire contract: idempotent, acknowledged by all in-sync replicas, and
/// partitioned by the Java client's murmur2 of the key, so a tenant lands on the partition
/// Debezium (Kafka Connect) would put it on. librdkafka's default partitioner (crc32) differs.
pub fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(config);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random");
    c
}

/// A consumer in `group_id` with offsets under Ferry's control: nothing is auto-committed and
/// nothing is stored until Ferry says the record is settled.
pub fn consumer_config(config: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut c = client_config(config);
    c.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky");
    c
}

/// Creates `topic` with `partitions` partitions (replication factor 1 unless the cluster
/// decides), succeeding if it already exists.
pub async fn ensure_topic(
    config: &KafkaConfig,
    topic: &str,
    partitions: i32,
) -> Result<(), BrokerError> {
    let admin: AdminClient<DefaultClientContext> = client_config(config)
        .create()
        .map_err(BrokerError::Client)?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results =
        admin
            .create_topics([&new], &opts)
            .await
            .map_err(|source| BrokerError::CreateTopic {
                topic: topic.to_owned(),
                source,
            })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(BrokerError::CreateTopic {
                    topic: name,
                    source: KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(())
}

/// Asks the cluster for its metadata: proof that a broker answers.
pub fn check_reachable(config: &KafkaConfig, timeout: Duration) -> Result<usize, BrokerError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = client_config(config)
        .create()
        .map_err(BrokerError::Client)?;
    let metadata =
        consumer
            .fetch_metadata(None, timeout)
            .map_err(|source| BrokerError::Unreachable {
                brokers: config.brokers.clone(),
                source,
            })?;
    Ok(metadata.brokers().len())
}

/// The decoder's view of a consumed message. Borrowed: no copy on the hot path.
pub fn raw_record<'a, M: Message>(message: &'a M) -> RawRecord<'a> {
    let headers = message
        .headers()
        .map(|hs| hs.iter().map(|h| (h.key, h.value)).collect())
        .unwrap_or_default();
    RawRecord {
        key: message.key(),
        headers,
        value: message.payload(),
        timestamp_ms: message.timestamp().to_millis(),
    }
}

/// The headers of a wire record as rdkafka wants them for producing.
pub fn owned_headers(record: &crate::outbox::WireRecord) -> rdkafka::message::OwnedHeaders {
    record.headers.iter().fold(
        rdkafka::message::OwnedHeaders::new_with_capacity(record.headers.len()),
        |hs, (name, value)| {
            hs.insert(rdkafka::message::Header {
                key: name,
                value: Some(value.as_slice()),
            })
        },
    )
}
