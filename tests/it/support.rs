//! What every integration test needs: a fresh database, a fresh topic, and waiting on a
//! condition with a deadline.

use ferry::config::KafkaConfig;
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
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect_with(options)
            .await
            .expect("connect to the test database");
        TestDb { pool, name }
    }

    /// A fresh database with Ferry's schema.
    pub async fn migrated() -> TestDb {
        let db = TestDb::empty().await;
        ferry::store::migrate(&db.pool)
            .await
            .expect("migrations apply");
        db
    }

    /// Drops the database.
    pub async fn drop(self) {
        self.pool.close().await;
        let mut admin = admin_options()
            .connect()
            .await
            .expect("connect to DATABASE_URL");
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
