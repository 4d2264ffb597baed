//! The benchmarks Ferry ships (`ferry bench ...`): each runs against the configured stack in
//! databases and topics of its own, prints a table with the ratio to its baseline, and ends
//! with one machine-readable line.

pub mod consume;
pub mod cpu;
pub mod decoding_floor;
pub mod pipeline;
pub mod relay;
pub mod relay_latency;
pub mod statements;
pub mod tansu;

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{ConnectOptions as _, Connection as _};

use crate::broker;
use crate::config::{DatabaseConfig, KafkaConfig};

/// A benchmark failure.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// Migrations failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Topic administration failed.
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    /// The relay failed.
    #[error(transparent)]
    Relay(#[from] crate::relay::RelayError),
    /// The benchmark's own broker (`--broker memory`) did not start.
    #[error("the in-memory tansu: {0}")]
    Tansu(String),
    /// The run did not finish in time.
    #[error("{0}")]
    Stalled(String),
    /// The run could not be set up (an integration file, a child process, a port).
    #[error("{0}")]
    Setup(String),
}

/// Creates a fresh, migrated database on the configured server; returns its pool and URL.
pub async fn fresh_database(
    config: &DatabaseConfig,
    prefix: &str,
) -> Result<(PgPool, String), BenchError> {
    let admin: PgConnectOptions = config.url.parse()?;
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let mut conn = admin.connect().await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    // The benchmark's own sessions, told apart from those of the processes it measures.
    let options = admin.database(&name).application_name("ferry-bench");
    let url = options.to_url_lossy().to_string();
    // Pooled as `ferry consume` pools: the consume benchmark runs its consumers on this pool.
    let pool = crate::store::pool_options(16)
        .connect_with(crate::store::session(
            options,
            crate::config::DEFAULT_SCHEMA,
        ))
        .await?;
    crate::store::migrate(&pool).await?;
    Ok((pool, url))
}

/// Drops a database made by [`fresh_database`].
pub async fn drop_database(config: &DatabaseConfig, url: &str) -> Result<(), BenchError> {
    let name = url
        .rsplit('/')
        .next()
        .and_then(|n| n.split('?').next())
        .unwrap_or_default()
        .to_owned();
    let admin: PgConnectOptions = config.url.parse()?;
    let mut conn = admin.connect().await?;
    // A logical slot pins WAL for ever and blocks DROP DATABASE.
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
    )
    .bind(&name)
    .execute(&mut conn)
    .await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// One record read back: where it was and what it said.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    /// Partition.
    pub partition: i32,
    /// The key as text.
    pub key: String,
    /// The `id` header.
    pub id: Option<uuid::Uuid>,
    /// The `aggregateId` header.
    pub aggregate_id: Option<String>,
}

/// Reads every record of `topic` from the beginning up to the high watermarks at call time,
/// partition by partition in offset order.
pub fn read_topic(
    config: &KafkaConfig,
    topic: &str,
    deadline: Duration,
) -> Result<Vec<ReadRecord>, BenchError> {
    let mut c = broker::client_config(config);
    c.set("group.id", "ferry-bench-reader")
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = c.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut high: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (low, hi) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if hi > low {
            high.insert(p, hi);
            tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
        }
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut done: HashMap<i32, bool> = high.keys().map(|&p| (p, false)).collect();
    let until = std::time::Instant::now() + deadline;
    while done.values().any(|d| !d) {
        if std::time::Instant::now() > until {
            return Err(BenchError::Stalled(format!(
                "reading {topic} back did not finish within {deadline:?}"
            )));
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = message?;
        let raw = broker::raw_record(&m);
        let header = |name: &str| {
            raw.headers
                .iter()
                .rev()
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| v.map(|v| String::from_utf8_lossy(v).into_owned()))
        };
        out.push(ReadRecord {
            partition: m.partition(),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            id: header(crate::outbox::header::ID).and_then(|t| t.parse().ok()),
            aggregate_id: header(crate::outbox::header::AGGREGATE_ID),
        });
        if m.offset() + 1 >= high[&m.partition()] {
            done.insert(m.partition(), true);
        }
    }
    Ok(out)
}
