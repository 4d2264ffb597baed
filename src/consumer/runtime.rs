//! `ferry consume`'s entry point: its options, counters and errors, and [`run`], the supervisor
//! that starts the [`Coordinator`] and starts it again after a retryable error.
//!
//! Why restarting is safe: the coordinator commits only offsets whose settlement is durable, so
//! when Postgres or Kafka fails mid-stream it stops (attempts under way end within
//! `revoke_drain`), leaves the group, and the records it had not settled are read again by
//! whichever member owns their partitions next: this instance once Postgres answers, or another.
//! Each is deduped against `deliveries`, and a repeat reaches the partner under the same
//! `Idempotency-Key`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::coordinator::Coordinator;
use super::ledger::SettledAs;
use crate::config::Config;
use crate::delivery::{Handler, RetryPolicy};

/// Consumer tuning.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Events in flight at once, all tenants together.
    pub max_in_flight: usize,
    /// Events queued in memory before intake pauses (back-pressure).
    pub max_queued: usize,
    /// Settlements per transaction, at most.
    pub settle_batch: usize,
    /// How long a settlement may wait for its batch (`consume.settle_interval_ms`). Each batch
    /// costs a transaction's round trips whatever its size, so this sets the consumer's
    /// Postgres work at a steady rate (docs/consumer.md, step 6).
    pub settle_interval: Duration,
    /// How often the commit points that moved are committed to the broker. Each commit is a
    /// write the broker makes; a point is durable in Postgres (the dedupe records) before it
    /// is committed, so a longer interval only means more records read again, and found
    /// settled, after a crash. A revoke and a shutdown commit at once.
    pub commit_interval: Duration,
    /// Retry policy for retryable failures.
    pub retry: RetryPolicy,
    /// How often the persisted kill switch and resumed tenants are read.
    pub kill_switch_interval: Duration,
    /// A tenant paused for a retryable cause is resumed automatically after this long.
    pub auto_resume_after: Duration,
    /// While the partner-wide breaker is open, how often the held event is tried as a probe.
    pub breaker_probe_interval: Duration,
    /// The breaker also opens when a tenant's retries run out while at least this share of the
    /// tenants active within `breaker_window` are failing too...
    pub breaker_failure_ratio: f64,
    /// ...and at least this many tenants were active.
    pub breaker_min_tenants: usize,
    /// How far back "active" looks.
    pub breaker_window: Duration,
    /// On revoke and shutdown, how long attempts under way may take to end. Keep it below the
    /// group's session timeout.
    pub revoke_drain: Duration,
    /// After a retryable error, the first wait before Postgres is asked again (it doubles up
    /// to ten times this).
    pub restart_backoff: Duration,
    /// What an event of a type the integration does not know does: pause its tenant, or be
    /// recorded as ignored.
    pub unknown_event_types: crate::config::UnknownEventTypes,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions {
            max_in_flight: 256,
            max_queued: 20_000,
            settle_batch: 1_000,
            settle_interval: Duration::from_millis(10),
            commit_interval: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            kill_switch_interval: Duration::from_millis(500),
            auto_resume_after: Duration::from_secs(60),
            breaker_probe_interval: Duration::from_secs(2),
            breaker_failure_ratio: 0.8,
            breaker_min_tenants: 5,
            breaker_window: Duration::from_secs(30),
            revoke_drain: Duration::from_secs(10),
            restart_backoff: Duration::from_millis(500),
            unknown_event_types: crate::config::UnknownEventTypes::Pause,
        }
    }
}

impl ConsumeOptions {
    /// The defaults, with what the configuration overrides.
    pub fn configured(config: &crate::config::ConsumeConfig) -> Self {
        let mut o = ConsumeOptions::default();
        o.max_in_flight = config.max_in_flight.unwrap_or(o.max_in_flight);
        o.retry.base = config.retry_base.unwrap_or(o.retry.base);
        o.retry.max = config.retry_max.unwrap_or(o.retry.max).max(o.retry.base);
        o.retry.pause_after_attempts = config
            .pause_after_attempts
            .unwrap_or(o.retry.pause_after_attempts);
        o.retry.pause_after = config.pause_after.unwrap_or(o.retry.pause_after);
        o.retry.retry_after_max = config.retry_after_max.unwrap_or(o.retry.retry_after_max);
        o.auto_resume_after = config.auto_resume_after.unwrap_or(o.auto_resume_after);
        o.commit_interval = config.commit_interval.unwrap_or(o.commit_interval);
        o.settle_interval = config.settle_interval.unwrap_or(o.settle_interval);
        o.unknown_event_types = config.unknown_event_types;
        o
    }
}

/// Why the consumer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The thread that polls Kafka could not be started.
    #[error("kafka: starting the poll thread: {0}")]
    Poller(std::io::Error),
    /// The thread that polls Kafka ended while the consumer ran.
    #[error("kafka: the poll thread stopped")]
    PollerStopped,
    /// The consumer group is another integration's: sharing it, each would read only some of
    /// the partitions, and the other's events would never reach this partner.
    #[error(
        "consumer group {group:?} belongs to integration {owner:?}, not {integration:?}: give \
         each integration a group of its own (kafka.group_id, FERRY_KAFKA_GROUP_ID)"
    )]
    GroupTaken {
        /// The group.
        group: String,
        /// The integration that claimed it first.
        owner: String,
        /// This consumer's integration.
        integration: String,
    },
}

impl ConsumeError {
    /// Whether the consumer should start again once the failing part answers: every Postgres
    /// error that is about the connection (the server stopped, restarted, unreachable, the
    /// pool timed out waiting for it) and every Kafka error but librdkafka's fatal ones. A
    /// query Ferry got wrong is not retried: it would fail the same way again.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConsumeError::Kafka(e) => !is_fatal(e),
            ConsumeError::Postgres(e) => postgres_is_transient(e),
            ConsumeError::Poller(_) | ConsumeError::PollerStopped => true,
            ConsumeError::GroupTaken { .. } => false,
        }
    }
}

/// Whether a Postgres error is about reaching the server rather than the statement.
pub fn postgres_is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        // Class 08 (connection exception), 57P01..57P03 (admin shutdown, crash shutdown,
        // cannot connect now), 53300 (too many connections), 40001/40P01 (serialization,
        // deadlock: the transaction may simply be tried again).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || matches!(
                    &*code,
                    "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
                )
        }),
        _ => false,
    }
}

/// Counters, shared so tests and metrics can read them live.
#[derive(Debug, Default)]
pub struct ConsumeStats {
    /// Events the handler delivered.
    pub delivered: std::sync::atomic::AtomicU64,
    /// Events skipped as already settled (redeliveries).
    pub duplicates: std::sync::atomic::AtomicU64,
    /// Records parked for paused tenants.
    pub parked: std::sync::atomic::AtomicU64,
    /// Offsets committed (commit calls).
    pub commits: std::sync::atomic::AtomicU64,
    /// Records received from Kafka.
    pub received: std::sync::atomic::AtomicU64,
    /// Events settled as expired (past `deliver_before`).
    pub expired: std::sync::atomic::AtomicU64,
    /// 1 while the persisted kill switch is on (nothing is dispatched), else 0.
    pub kill_switch: std::sync::atomic::AtomicU64,
    /// 1 while the partner-wide circuit breaker is open (consumption paused), else 0.
    pub breaker_open: std::sync::atomic::AtomicU64,
    /// Times the breaker opened.
    pub breaker_trips: std::sync::atomic::AtomicU64,
    /// Partitions this instance owns now.
    pub partitions: std::sync::atomic::AtomicU64,
    /// Times the consumer started again after a retryable error (Postgres or Kafka down).
    pub restarts: std::sync::atomic::AtomicU64,
    /// 1 while the consumer is stopped by a retryable error, waiting for Postgres to answer
    /// (nothing is dispatched, nothing committed), else 0.
    pub recovering: std::sync::atomic::AtomicU64,
    /// Transient Kafka errors seen (brokers down, request errors); librdkafka recovers.
    pub kafka_errors: std::sync::atomic::AtomicU64,
    /// How long, at most, a partition's commit point rested on a record in flight, in
    /// milliseconds (as seen at flushes): how far one tenant's slow or failing event (until it
    /// is parked) held every other tenant's commits back. Records merely waiting their turn in
    /// their tenant's queue are consumption, not counted.
    pub commit_lag_max_ms: std::sync::atomic::AtomicU64,
    /// From the record's timestamp (the outbox row's commit) to Ferry receiving it: the relay's
    /// and the broker's share of the latency.
    pub intake_latency: super::latency::Histogram,
    /// From the record's timestamp to the partner's acknowledgement (the handler returned done):
    /// the end-to-end latency of delivered events.
    pub ack_latency: super::latency::Histogram,
    /// From an event's dispatch to its handler's last outcome, retries included: the time
    /// its tenant is busy with it. Beside `intake_latency` and `ack_latency` it tells the
    /// partner's share of the latency from the wait in the tenant's queue.
    pub handling_latency: super::latency::Histogram,
    /// Events settled as ignored (their tenant has the integration off).
    pub ignored: std::sync::atomic::AtomicU64,
    /// Events whose failure paused their tenant.
    pub failed: std::sync::atomic::AtomicU64,
    /// Records the decoder refused (each paused its tenant, or joined a paused backlog).
    pub bad_events: std::sync::atomic::AtomicU64,
    /// Events being handled now.
    pub in_flight: std::sync::atomic::AtomicU64,
    /// Events in memory waiting for their tenant's turn.
    pub queued: std::sync::atomic::AtomicU64,
    /// Tenants this instance holds paused (their records are parked, not delivered).
    pub tenants_held: std::sync::atomic::AtomicU64,
    /// Retries made, by the failure's cause ([`Failure::cause`]).
    pub retries: CauseCounts,
    /// This instance's partitions, as last looked at (every `LAG_INTERVAL`).
    pub partition_view: Mutex<Vec<PartitionView>>,
}

/// Counts by a failure's cause.
#[derive(Debug, Default)]
pub struct CauseCounts(Mutex<std::collections::BTreeMap<&'static str, u64>>);

impl CauseCounts {
    /// Counts one of `cause`.
    pub fn add(&self, cause: &'static str) {
        *self
            .0
            .lock()
            .expect("cause counts")
            .entry(cause)
            .or_default() += 1;
    }

    /// Every cause seen, with its count, by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let counts = self.0.lock().expect("cause counts");
        counts.iter().map(|(c, n)| (*c, *n)).collect()
    }
}

/// A partition this instance owns, for the operator: where its commits are and how far behind
/// the log's end.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionView {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The group's committed offset as the broker last confirmed it (the next record to
    /// read), if known.
    pub committed_offset: Option<i64>,
    /// The commit point this instance has settled through (may be ahead of the broker's
    /// until the next commit lands).
    pub settled_offset: Option<i64>,
    /// The log's end (the offset the next record will get).
    pub high_watermark: Option<i64>,
    /// Records not yet committed: the high watermark less the committed offset.
    pub lag: Option<i64>,
    /// Events of this partition being handled now.
    pub in_flight: usize,
}

impl ConsumeStats {
    /// Counts a settled event by its outcome.
    pub(super) fn count(&self, outcome: SettledAs) {
        use std::sync::atomic::Ordering::Relaxed;
        match outcome {
            SettledAs::Delivered => self.delivered.fetch_add(1, Relaxed),
            SettledAs::Expired => self.expired.fetch_add(1, Relaxed),
            SettledAs::Ignored => self.ignored.fetch_add(1, Relaxed),
            // Counted as they arrive; skips are the admin API's.
            SettledAs::BadEvent | SettledAs::Skipped => 0,
        };
    }
}

/// Whether a consume error ends the consumer: librdkafka's fatal errors (the idempotence or
/// group membership can no longer be kept); every other error is transient and retried inside
/// librdkafka.
pub(super) fn is_fatal(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode;
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::InvalidArgument
                | RDKafkaErrorCode::Authentication
        )
    )
}

/// Runs the consumer until `shutdown`, counting into `stats`. A retryable error (Postgres
/// down, a Kafka error that is not fatal) never ends it: the coordinator stops, the supervisor
/// waits for Postgres to answer, with backoff, and starts it again.
pub async fn run<H: Handler>(
    config: &Config,
    pool: PgPool,
    handler: Arc<H>,
    options: ConsumeOptions,
    stats: Arc<ConsumeStats>,
    shutdown: CancellationToken,
) -> Result<(), ConsumeError> {
    use std::sync::atomic::Ordering::Relaxed;
    claim_group(&pool, &config.kafka.group_id, handler.integration()).await?;
    loop {
        let started = Coordinator::start(
            config,
            pool.clone(),
            Arc::clone(&handler),
            options.clone(),
            Arc::clone(&stats),
            shutdown.clone(),
        )
        .await;
        let result = match started {
            Ok(coordinator) => coordinator.run().await,
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.is_retryable() && !shutdown.is_cancelled() => {
                stats.recovering.store(1, Relaxed);
                stats.restarts.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "the consumer stopped on a retryable error; starting again once Postgres answers");
                wait_for_postgres(&pool, &options, &shutdown).await;
                stats.recovering.store(0, Relaxed);
            }
            other => return other,
        }
    }
}

/// Claims the consumer group `group` for `integration`, the first time it is used; refused
/// when another integration claimed it.
async fn claim_group(pool: &PgPool, group: &str, integration: &str) -> Result<(), ConsumeError> {
    let owner: Option<String> = sqlx::query_scalar(
        "WITH claimed AS (INSERT INTO consumer_groups (group_id, integration) VALUES ($1, $2) \
                          ON CONFLICT (group_id) DO NOTHING RETURNING integration) \
         SELECT integration FROM claimed \
         UNION ALL SELECT integration FROM consumer_groups WHERE group_id = $1 \
         LIMIT 1",
    )
    .bind(group)
    .bind(integration)
    .fetch_optional(pool)
    .await?;
    // None: another instance claimed it as this statement ran (its snapshot predates that).
    let owner = match owner {
        Some(owner) => owner,
        None => {
            sqlx::query_scalar("SELECT integration FROM consumer_groups WHERE group_id = $1")
                .bind(group)
                .fetch_one(pool)
                .await?
        }
    };
    if owner == integration {
        return Ok(());
    }
    Err(ConsumeError::GroupTaken {
        group: group.to_owned(),
        owner,
        integration: integration.to_owned(),
    })
}

/// Waits until Postgres answers a query (or `shutdown`), trying at growing intervals from
/// `restart_backoff` up to ten times that.
async fn wait_for_postgres(pool: &PgPool, options: &ConsumeOptions, shutdown: &CancellationToken) {
    let mut wait = options.restart_backoff;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match sqlx::query("SELECT 1").execute(pool).await {
            Ok(_) => return,
            Err(e) => tracing::warn!(error = %e, retry_in = ?wait, "Postgres does not answer yet"),
        }
        wait = (wait * 2).min(options.restart_backoff * 10);
    }
}
