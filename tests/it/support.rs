//! What every integration test needs: a fresh database, a fresh topic, and waiting on a
//! condition with a deadline.

use std::future::Future;
use std::time::Duration;

use ferry::config::{Config, DatabaseConfig, KafkaConfig, RelayConfig};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the stack with `scripts/stack up` and `eval \"$(scripts/stack env)\"`, or run `scripts/test`")
    })
}

fn admin_options() -> PgConnectOptions {
    env("DATABASE_URL")
        .parse()
        .expect("DATABASE_URL is a postgres URL")
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A database of its own, migrated, dropped by [`TestDb::drop`] at the end of a passing test
/// (a failing test leaves it for inspection).
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// An empty database, not migrated.
    pub async fn empty() -> TestDb {
        let admin = admin_options();
        let name = unique("ferry_test");
        let mut conn = admin.connect().await.expect("connect to DATABASE_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();
        let options = admin.database(&name);
        let url = options.to_url_lossy().to_string();
        // Ferry's sessions: its schema first in the search path.
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect_with(ferry::store::session(
                options,
                ferry::config::DEFAULT_SCHEMA,
            ))
            .await
            .expect("connect to the test database");
        TestDb { pool, name, url }
    }

    /// A fresh database with Ferry's schema.
    pub async fn migrated() -> TestDb {
        let db = TestDb::empty().await;
        ferry::store::migrate(&db.pool)
            .await
            .expect("migrations apply");
        // The reference shop's own table, as its application creates it.
        ferry::shop::create_tables(&db.pool)
            .await
            .expect("the shop's table");
        db
    }

    /// Drops the database.
    pub async fn drop(self) {
        self.pool.close().await;
        let mut admin = admin_options()
            .connect()
            .await
            .expect("connect to DATABASE_URL");
        // A logical slot pins WAL for ever and blocks DROP DATABASE: drop the test's slots.
        sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
        )
        .bind(&self.name)
        .execute(&mut admin)
        .await
        .unwrap();
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await
        .unwrap();
    }
}

/// The stack's Kafka settings with `topic` as the outbox topic.
pub fn kafka_config(topic: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: env("KAFKA_BROKERS"),
        topic: topic.to_owned(),
        group_id: unique("ferry-test-group"),
        properties: Default::default(),
    }
}

/// A topic of its own with `partitions` partitions, and settings that name it.
pub async fn fresh_topic(partitions: i32) -> KafkaConfig {
    let config = kafka_config(&unique("ferry-test").replace('_', "-"));
    ferry::broker::ensure_topic(&config, &config.topic, partitions)
        .await
        .expect("create test topic");
    config
}

/// Settings for a relay (or any component) on this database and topic.
pub fn config(db: &TestDb, kafka: &KafkaConfig) -> Config {
    Config {
        database: DatabaseConfig {
            max_connections: 5,
            ..DatabaseConfig::new(db.url.clone())
        },
        kafka: kafka.clone(),
        relay: RelayConfig {
            // Slot names are global to the server: one per test.
            slot: unique("slot"),
            publication: unique("pub"),
            status_interval: Duration::from_millis(500),
            ..RelayConfig::default()
        },
        partner: Default::default(),
        consume: Default::default(),
        admin: Default::default(),
    }
}

/// Polls `probe` until it returns `Some`, failing the test with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every record of the topic from the beginning up to its current end, per partition in offset
/// order (a blocking read, run off the async workers).
pub async fn read_all(kafka: &KafkaConfig) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = ferry::broker::client_config(&kafka);
        c.set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true");
        let consumer: BaseConsumer = c.create().unwrap();
        let md = consumer
            .fetch_metadata(Some(&kafka.topic), Duration::from_secs(10))
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        // Per partition, the offset to read up to. Offsets may have gaps, so a partition is
        // done at its high watermark or at end-of-partition, not after a count of records.
        let mut ends = std::collections::HashMap::new();
        for p in md.topics()[0].partitions() {
            let (lo, hi) = consumer
                .fetch_watermarks(&kafka.topic, p.id(), Duration::from_secs(10))
                .unwrap();
            if hi > lo {
                tpl.add_partition_offset(&kafka.topic, p.id(), rdkafka::Offset::Offset(lo))
                    .unwrap();
                ends.insert(p.id(), hi);
            }
        }
        let mut out = Vec::new();
        if ends.is_empty() {
            return out;
        }
        consumer.assign(&tpl).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while !ends.is_empty() {
            assert!(
                std::time::Instant::now() < until,
                "reading the topic back timed out: {} read, {ends:?} left",
                out.len()
            );
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    if ends
                        .get(&m.partition())
                        .is_some_and(|&hi| m.offset() + 1 >= hi)
                    {
                        ends.remove(&m.partition());
                    }
                    out.push(m.detach());
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    ends.remove(&p);
                }
                Some(Err(e)) => panic!("consume: {e}"),
                None => {}
            }
        }
        out.sort_by_key(|m| (m.partition(), m.offset()));
        out
    })
    .await
    .unwrap()
}

/// Records in the topic now (sum of high minus low watermarks).
pub async fn topic_size(kafka: &KafkaConfig) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ferry::broker::client_config(&kafka).create().unwrap();
        let md = consumer
            .fetch_metadata(Some(&kafka.topic), Duration::from_secs(10))
            .unwrap();
        md.topics()[0]
            .partitions()
            .iter()
            .map(|p| {
                let (lo, hi) = consumer
                    .fetch_watermarks(&kafka.topic, p.id(), Duration::from_secs(10))
                    .unwrap();
                hi - lo
            })
            .sum()
    })
    .await
    .unwrap()
}

/// An admin API as a consumer of `integration` serves it, on a free loopback port, accepting
/// `token`: its URL and what stops it.
pub struct AdminUnderTest<'a> {
    /// The integration the consumer runs.
    pub integration: &'a str,
    /// Its bearer token.
    pub token: &'a str,
    /// The consumer's counters.
    pub stats: std::sync::Arc<ferry::consumer::runtime::ConsumeStats>,
    /// Its dead-letter topic, if its terminal policy exports.
    pub dead_letters: Option<std::sync::Arc<ferry::dead_letter::DeadLetters>>,
}

impl AdminUnderTest<'_> {
    /// Serves it.
    pub async fn serve(self, db: &TestDb) -> (String, tokio_util::sync::CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let admin = ferry::admin::Admin {
            pool: db.pool.clone(),
            integration: self.integration.to_owned(),
            stats: self.stats,
            token: Some(ferry::admin::access::Token::new(self.token)),
            hosts: ferry::admin::access::hosts(addr, &[]),
            dead_letters: self.dead_letters,
        };
        tokio::spawn(ferry::admin::serve(listener, admin, stop.clone()));
        (format!("http://{addr}"), stop)
    }
}
