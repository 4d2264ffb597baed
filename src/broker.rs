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

/// How long a fetch may wait for records, unless the configured properties say otherwise.
/// Ferry's latency counts from the outbox commit: a broker that holds a fetch for its whole
/// maximum wait even when records arrive (tansu does; librdkafka's default is 500 ms) adds up
/// to that much to every event, while too short a wait makes tansu answer with small batches.
/// Measured on the local stack (2 cores): median outbox-to-partner latency at 200 events/s
/// 510 ms with 500 ms, 106 ms with 10 ms, 134 ms with 50 ms; `ferry bench consume`'s overhead
/// run 17,471/s with 500 ms, 14,201/s with 10 ms, 20,109/s with 50 ms.
pub const FETCH_WAIT_MAX_MS: &str = "50";

/// A consumer in `group_id` with offsets under Ferry's control: nothing is auto-committed and
/// nothing is stored until Ferry says the record is settled.
pub fn consumer_config(config: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut c = client_config(config);
    if !config.properties.contains_key("fetch.wait.max.ms") {
        c.set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS);
    }
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
    // A topic that exists needs no admin rights (and some clusters, like librdkafka's mock
    // cluster, have no CreateTopics at all).
    let (c, t) = (config.clone(), topic.to_owned());
    let existing = tokio::task::spawn_blocking(move || partition_count(&c, &t))
        .await
        .expect("metadata task panicked")?;
    if existing.is_some() {
        return Ok(());
    }
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

/// The number of partitions of `topic`, `None` when it does not exist. Consumers' metadata
/// requests never auto-create a topic, so asking is harmless. Blocking.
pub fn partition_count(config: &KafkaConfig, topic: &str) -> Result<Option<usize>, BrokerError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = client_config(config)
        .create()
        .map_err(BrokerError::Client)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|source| BrokerError::Unreachable {
            brokers: config.brokers.clone(),
            source,
        })?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len()))
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

/// The partition Kafka's Java client (and so Debezium) puts `key` on: murmur2 of the key bytes,
/// sign bit cleared, modulo the partition count. The relay's producer uses librdkafka's
/// `murmur2_random`, which computes the same; the consumer uses this to find the tenants of its
/// assigned partitions.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    assert!(partitions > 0, "a topic has at least one partition");
    ((murmur2(key) & 0x7fff_ffff) % partitions as u32) as i32
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), seed 0x9747b28c.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// A wire record ready to send to `topic`: key (none when empty), value, headers, timestamp.
pub fn future_record<'a>(
    topic: &'a str,
    record: &'a crate::outbox::WireRecord,
) -> rdkafka::producer::FutureRecord<'a, [u8], [u8]> {
    let future = rdkafka::producer::FutureRecord::to(topic)
        .payload(record.value.as_slice())
        .headers(owned_headers(record))
        .timestamp(record.timestamp_ms);
    if record.key.is_empty() {
        future
    } else {
        future.key(record.key.as_slice())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Vectors from Kafka's own UtilsTest.testMurmur2 (signed ints there).
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2(key) as i32,
                expected,
                "{:?}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn partition_is_within_range_and_stable() {
        for n in 1..64 {
            let p = partition_for_key(b"tenant-42", n);
            assert!((0..n).contains(&p));
            assert_eq!(p, partition_for_key(b"tenant-42", n));
        }
    }
}
