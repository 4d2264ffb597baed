//! `ferry relay`: change data capture from the outbox to Kafka, in commit order, nothing lost.
//!
//! The relay reads the outbox from the write-ahead log through a logical replication slot and
//! the built-in `pgoutput` plugin. By default it streams the slot over the streaming replication
//! protocol ([`replication`]): the server pushes each transaction as it commits, and the relay
//! 1. produces every outbox row of the transaction, in commit order, through an idempotent
//!    producer (`acks=all`, murmur2 partitioning);
//! 2. tracks, per record, the end of its transaction ([`progress`]): a transaction is durable
//!    once the broker acknowledged its last record and everything before it;
//! 3. reports only the durable position to the server (a standby status update, every 100 ms
//!    while it moves), which is where the slot's confirmed position goes. A keepalive tells how
//!    far the server has sent: with nothing open and nothing in flight, the slot moves there,
//!    so an idle outbox on a busy server still advances (the heartbeat).
//!
//! `relay.mode = "peek"` reads the same slot through SQL instead (for a server reachable only
//! over TLS, which the streaming client does not speak): note the server's WAL position `upto`,
//! peek the committed transactions before it (`pg_logical_slot_peek_binary_changes`, at most
//! `batch_changes` changes), produce them, wait for every acknowledgement, then advance the slot
//! (`pg_replication_slot_advance`) to the last transaction produced, or to `upto` when the peek
//! was not cut short. Each peek starts a new decoding session at the slot's restart position,
//! which PostgreSQL 15 moves only every 15 s on a busy server: at 1,000 events/s a peek decodes
//! megabytes of WAL again, and latency grows to seconds. Streaming decodes each record once.
//!
//! Either way, a crash before the slot moves leaves it where it was: the next run produces the
//! same rows again (duplicates with the same event id, which the consumer dedupes), never a gap.
//! A row that cannot be sent as-is (no tenant, a payload over the size limit) is sent as a
//! [`WireRecord::rejected`] marker in its place, so it is never silently skipped and never
//! stops the relay; the row itself stays in the outbox table.
//!
//! One relay per slot is active: it holds a lease (a session advisory lock on a connection of
//! its own). Others started on the same slot stand by and take over when the active one's
//! session ends, so running two for availability is safe.

pub mod lsn;
pub mod pgoutput;
pub mod progress;
pub mod replication;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{ConnectOptions as _, Executor as _};
use tokio_util::sync::CancellationToken;

use crate::broker;
use crate::config::{Config, RelayConfig, RelayMode};
use crate::outbox::WireRecord;
use lsn::Lsn;
use pgoutput::{Assembler, ProtocolError, Transaction};
use progress::Progress;
use replication::{ReplicationConnection, ReplicationError, StreamMessage};

/// How often the durable position is reported while it moves: the slot's confirmed position
/// trails the broker's acknowledgements by about this much.
const REPORT_EVERY: Duration = Duration::from_millis(100);
/// A status update at least this often, moving or not, well inside the server's
/// `wal_sender_timeout` (60 s by default).
const REPORT_AT_LEAST_EVERY: Duration = Duration::from_secs(10);

/// Why the relay stopped or a step failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The topic could not be created.
    #[error(transparent)]
    Topic(broker::BrokerError),
    /// A Kafka client could not be created.
    #[error("kafka client: {0}")]
    Client(#[source] KafkaError),
    /// The broker did not acknowledge a record.
    #[error("kafka delivery failed: {0}")]
    Delivery(#[source] KafkaError),
    /// The streaming replication connection failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// The slot produced something that is not pgoutput as Ferry knows it.
    #[error("cannot decode the replication stream: {0}")]
    Protocol(#[from] ProtocolError),
    /// The slot's position is unreadable.
    #[error("replication slot {0} is missing or has no confirmed position")]
    Slot(String),
    /// Slot names are global to the Postgres server: this one was made for another database.
    #[error(
        "replication slot {slot} belongs to database {database}, not this one: configure another relay.slot"
    )]
    SlotOfAnotherDatabase {
        /// The slot.
        slot: String,
        /// The database it decodes.
        database: String,
    },
}

impl RelayError {
    /// Whether waiting and trying again can help. A protocol error cannot: the same bytes come
    /// back, so the relay stops and says so.
    pub fn is_retryable(&self) -> bool {
        match self {
            RelayError::Protocol(_) | RelayError::SlotOfAnotherDatabase { .. } => false,
            RelayError::Replication(e) => e.is_retryable(),
            _ => true,
        }
    }
}

/// Counters the relay keeps; shared, so a status reporter or a test can read them while it runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Records the broker acknowledged (including rejection markers).
    pub records_acked: AtomicU64,
    /// Committed transactions relayed (including those with no outbox row).
    pub transactions: AtomicU64,
    /// Rows sent as rejection markers.
    pub rows_rejected: AtomicU64,
    /// The slot's confirmed position, as a number.
    pub confirmed_lsn: AtomicU64,
    /// WAL bytes between the server's current position and the slot's confirmed position, as
    /// of the last status check.
    pub slot_lag_bytes: AtomicU64,
    /// Failed steps that were retried.
    pub retries: AtomicU64,
    /// 1 while this relay holds the slot's lease (is the active relay), 0 while it stands by.
    pub active: AtomicU64,
    /// 1 from a failed step until Postgres answers again (`/ready` is 503 meanwhile).
    pub failing: AtomicU64,
}

impl RelayStats {
    /// Whether the relay is ready: not between a failed step and Postgres answering again.
    pub fn is_ready(&self) -> bool {
        self.failing.load(Ordering::Relaxed) == 0
    }

    /// The counters and gauges in OpenMetrics, through `prometheus-client`
    /// ([`crate::exposition`]).
    pub fn render_prometheus(self: &Arc<Self>) -> String {
        let stats = Arc::clone(self);
        crate::exposition::render(move |out| stats.write_series(out))
    }

    fn write_series(&self, out: &mut crate::exposition::Series<'_, '_>) -> std::fmt::Result {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        // (name, help, value): the counters (the encoder adds `_total`).
        for (name, help, value) in [
            (
                "ferry_relay_records_acked",
                "Records the broker acknowledged, rejection markers included.",
                &self.records_acked,
            ),
            (
                "ferry_relay_rows_rejected",
                "Outbox rows sent as rejection markers (no tenant, too large, unreadable).",
                &self.rows_rejected,
            ),
            (
                "ferry_relay_transactions",
                "Committed transactions relayed.",
                &self.transactions,
            ),
            (
                "ferry_relay_retries",
                "Failed relay steps retried (the slot was not advanced).",
                &self.retries,
            ),
        ] {
            out.counter(name, help, load(value))?;
        }
        for (name, help, value) in [
            (
                "ferry_relay_slot_lag_bytes",
                "WAL bytes between the server's position and the slot's confirmed position.",
                &self.slot_lag_bytes,
            ),
            (
                "ferry_relay_active",
                "1 when this relay holds the slot's lease, 0 while it stands by.",
                &self.active,
            ),
            (
                "ferry_relay_failing",
                "1 from a failed step until Postgres answers again.",
                &self.failing,
            ),
            (
                "ferry_relay_confirmed_lsn",
                "The slot's confirmed WAL position, as a number.",
                &self.confirmed_lsn,
            ),
        ] {
            out.gauge(name, help, load(value) as i64)?;
        }
        Ok(())
    }
}

/// The outbox relay.
pub struct Relay {
    kafka: crate::config::KafkaConfig,
    database_url: String,
    connect_options: sqlx::postgres::PgConnectOptions,
    pool: PgPool,
    producer: FutureProducer,
    topic: String,
    options: RelayConfig,
    stats: Arc<RelayStats>,
    confirmed: Lsn,
}

impl Relay {
    /// Connects to Postgres and Kafka. Nothing is created yet: see [`Relay::setup`].
    pub async fn connect(config: &Config) -> Result<Self, RelayError> {
        let options: sqlx::postgres::PgConnectOptions = config.database.url.parse()?;
        let connect_options = options.clone().application_name("ferry-relay-lease");
        // Values come through the slot as their text output in this session's settings: pin
        // the ones the row parser relies on.
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(
                        "SET bytea_output = 'hex'; SET DateStyle = 'ISO'; SET TimeZone = 'UTC'",
                    )
                    .await
                    .map(|_| ())
                })
            })
            // A first peek after a long pause decodes all the WAL since: seconds, and expected.
            .connect_with(
                options
                    .application_name("ferry-relay")
                    .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(30)),
            )
            .await?;
        let mut producer_config = broker::producer_config(&config.kafka);
        // Throughput defaults for a relay; `[kafka.properties]` in the config file wins.
        let defaults = [
            ("linger.ms", "5".to_owned()),
            ("batch.num.messages", "10000".to_owned()),
            ("queue.buffering.max.messages", "200000".to_owned()),
            // Bounds the relay's memory by bytes, whatever the batch size.
            ("queue.buffering.max.kbytes", "65536".to_owned()),
            (
                "message.max.bytes",
                (config.relay.max_message_bytes + 1024).to_string(),
            ),
        ];
        for (key, value) in defaults {
            if !config.kafka.properties.contains_key(key) {
                producer_config.set(key, value);
            }
        }
        let producer: FutureProducer = producer_config.create().map_err(RelayError::Client)?;
        Ok(Relay {
            kafka: config.kafka.clone(),
            database_url: config.database.url.clone(),
            connect_options,
            pool,
            producer,
            topic: config.kafka.topic.clone(),
            options: config.relay.clone(),
            stats: Arc::new(RelayStats::default()),
            confirmed: Lsn(0),
        })
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// Creates the topic (with `relay.topic_partitions` partitions), the publication (inserts
    /// into the outbox only) and the logical replication slot, each only if missing. Safe to run
    /// from several relays at once.
    pub async fn setup(&mut self) -> Result<(), RelayError> {
        broker::ensure_topic(&self.kafka, &self.topic, self.options.topic_partitions)
            .await
            .map_err(RelayError::Topic)?;
        let o = &self.options;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
                .bind(&o.publication)
                .fetch_one(&self.pool)
                .await?;
        if !exists {
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {}.{} WITH (publish = 'insert')",
                quote_ident(&o.publication),
                quote_ident(&o.schema),
                quote_ident(&o.table)
            );
            ignore_duplicate(self.pool.execute(sql.as_str()).await)?;
            tracing::info!(publication = %o.publication, "created publication");
        }
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
        )
        .bind(&o.slot)
        .fetch_one(&self.pool)
        .await?;
        if !exists {
            ignore_duplicate(
                sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
                    .bind(&o.slot)
                    .execute(&self.pool)
                    .await,
            )?;
            tracing::info!(slot = %o.slot, "created logical replication slot");
        }
        let (database, here): (Option<String>, String) = sqlx::query_as(
            "SELECT database::text, current_database()::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&o.slot)
        .fetch_one(&self.pool)
        .await?;
        if database.as_deref() != Some(here.as_str()) {
            return Err(RelayError::SlotOfAnotherDatabase {
                slot: o.slot.clone(),
                database: database.unwrap_or_default(),
            });
        }
        self.confirmed = self.confirmed_lsn().await?;
        self.stats
            .confirmed_lsn
            .store(self.confirmed.0, Ordering::Relaxed);
        // The lag gauge is refreshed every `status_interval`; start it true.
        self.slot_lag().await?;
        Ok(())
    }

    async fn confirmed_lsn(&self) -> Result<Lsn, RelayError> {
        let text: Option<String> = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.options.slot)
        .fetch_optional(&self.pool)
        .await?
        .flatten();
        text.and_then(|t| t.parse().ok())
            .ok_or_else(|| RelayError::Slot(self.options.slot.clone()))
    }

    /// Reads the slot's lag in bytes (and remembers it in the stats).
    pub async fn slot_lag(&self) -> Result<u64, RelayError> {
        let lag: Option<i64> = sqlx::query_scalar(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.options.slot)
        .fetch_optional(&self.pool)
        .await?
        .flatten();
        let lag = lag.unwrap_or(0).max(0) as u64;
        self.stats.slot_lag_bytes.store(lag, Ordering::Relaxed);
        Ok(lag)
    }

    /// Relays until `shutdown` is cancelled, then finishes the work in hand (produce, wait
    /// for acknowledgements, move the slot) and returns. Retryable failures are retried with
    /// exponential backoff; the slot does not move past anything the broker has not
    /// acknowledged.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<Arc<RelayStats>, RelayError> {
        if !self.set_up(&shutdown).await? {
            return Ok(self.stats);
        }
        let Some(mut lease) = self.acquire_lease(&shutdown).await? else {
            return Ok(self.stats);
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        while !shutdown.is_cancelled() {
            let session = match self.options.mode {
                RelayMode::Stream => self.stream(&shutdown, &mut lease, &mut backoff).await,
                RelayMode::Peek => self.poll(&shutdown, &mut lease, &mut backoff).await,
            };
            match session {
                Ok(Ended::Shutdown) => break,
                Ok(Ended::LostLease) => {
                    // Another relay may have taken over: stand by again rather than run beside it.
                    self.stats.active.store(0, Ordering::Relaxed);
                    tracing::warn!(slot = %self.options.slot, "lost the relay lease; standing by");
                    match self.acquire_lease(&shutdown).await? {
                        Some(l) => lease = l,
                        None => break,
                    }
                }
                Err(e) if e.is_retryable() => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    self.stats.failing.store(1, Ordering::Relaxed);
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "relay failed; the slot did not move past what the broker acknowledged");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                    // Whatever happened, re-read where the slot really is.
                    if let Ok(l) = self.confirmed_lsn().await {
                        self.confirmed = l;
                        self.stats.failing.store(0, Ordering::Relaxed);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(
            records = self.stats.records_acked.load(Ordering::Relaxed),
            confirmed = %self.confirmed,
            "relay stopped"
        );
        Ok(self.stats)
    }

    /// [`Relay::setup`], tried again with backoff while the broker or Postgres does not answer
    /// (both may be starting, or restarting, with the relay); false if shut down first.
    async fn set_up(&mut self, shutdown: &CancellationToken) -> Result<bool, RelayError> {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        loop {
            match self.setup().await {
                Ok(()) => return Ok(true),
                Err(e) if e.is_retryable() => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "relay setup failed; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The periodic check: whether the lease is still held (a lost lease connection means
    /// another relay may have taken over), and the slot's lag, logged.
    async fn check_status(&self, lease: &mut sqlx::PgConnection) -> bool {
        if sqlx::query("SELECT 1").execute(&mut *lease).await.is_err() {
            return false;
        }
        if let Ok(lag) = self.slot_lag().await {
            tracing::info!(
                slot = %self.options.slot,
                slot_lag_bytes = lag,
                records = self.stats.records_acked.load(Ordering::Relaxed),
                "relay status"
            );
        }
        true
    }

    /// Streams the slot until shut down (or the lease is lost): each transaction produced as
    /// its commit arrives, the durable position reported as acknowledgements come in.
    async fn stream(
        &mut self,
        shutdown: &CancellationToken,
        lease: &mut sqlx::PgConnection,
        backoff: &mut Backoff,
    ) -> Result<Ended, RelayError> {
        let target = replication::Target::from_url(&self.database_url)?;
        let mut conn = ReplicationConnection::connect(&target, "ferry-relay").await?;
        conn.start(&self.options.slot, &self.options.publication)
            .await?;
        tracing::info!(slot = %self.options.slot, from = %self.confirmed, "streaming the slot");
        let mut assembler = Assembler::new(&self.options.schema, &self.options.table);
        let mut progress: Progress<DeliveryFuture> = Progress::new(self.confirmed);
        let mut last_report = tokio::time::Instant::now();
        let mut last_status = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(REPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            let mut reply_now = false;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ended::Shutdown,
                acked = async { progress.oldest().expect("guarded by in_flight").await },
                    if progress.in_flight() > 0 =>
                {
                    self.acknowledged(acked, &mut progress)?;
                    // Only what the broker took counts as recovery: a stream that flows while
                    // every send fails must not reset the backoff into a tight loop.
                    backoff.reset();
                }
                message = conn.next() => {
                    match message? {
                        StreamMessage::XLogData { data, .. } => {
                            if let Some(tx) = assembler.push(pgoutput::parse(&data)?)? {
                                self.produce(&tx, &mut progress).await?;
                                progress.received(tx.end_lsn);
                                self.stats.transactions.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        StreamMessage::Keepalive { wal_end, reply_requested } => {
                            if !assembler.in_transaction() {
                                progress.caught_up(wal_end);
                            }
                            self.stats
                                .slot_lag_bytes
                                .store(progress.durable().bytes_until(wal_end), Ordering::Relaxed);
                            reply_now = reply_requested;
                        }
                    }
                }
                _ = tick.tick() => {}
            }
            let durable = progress.durable();
            if reply_now
                || (durable > self.confirmed && last_report.elapsed() >= REPORT_EVERY)
                || last_report.elapsed() >= REPORT_AT_LEAST_EVERY
            {
                conn.send_status(durable).await?;
                last_report = tokio::time::Instant::now();
                self.set_confirmed(durable);
            }
            if last_status.elapsed() >= self.options.status_interval {
                last_status = tokio::time::Instant::now();
                if !self.check_status(lease).await {
                    break Ended::LostLease;
                }
            }
        };
        self.finish_stream(conn, progress).await?;
        Ok(ended)
    }

    /// Finishes what is in hand at the end of a streaming session: every acknowledgement, then
    /// the position they make durable. The server is answered meanwhile (it drops a receiver
    /// that stays silent past its `wal_sender_timeout`); what it still sends is not produced,
    /// and not confirmed, so the next session gets it again.
    async fn finish_stream(
        &mut self,
        mut conn: ReplicationConnection,
        mut progress: Progress<DeliveryFuture>,
    ) -> Result<(), RelayError> {
        let mut answering = true;
        while progress.in_flight() > 0 {
            tokio::select! {
                acked = async { progress.oldest().expect("guarded by in_flight").await } => {
                    self.acknowledged(acked, &mut progress)?;
                }
                message = conn.next(), if answering => match message {
                    Ok(StreamMessage::Keepalive { reply_requested: true, .. }) => {
                        answering = conn.send_status(progress.durable()).await.is_ok();
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the replication stream ended while the last records were acknowledged");
                        answering = false;
                    }
                },
            }
        }
        if answering {
            conn.send_status(progress.durable()).await?;
            self.set_confirmed(progress.durable());
            conn.close().await?;
        }
        Ok(())
    }

    /// Peeks and advances the slot, batch after batch, until shut down (or the lease is lost).
    async fn poll(
        &mut self,
        shutdown: &CancellationToken,
        lease: &mut sqlx::PgConnection,
        backoff: &mut Backoff,
    ) -> Result<Ended, RelayError> {
        let mut last_status = tokio::time::Instant::now();
        loop {
            let step = self.step().await?;
            backoff.reset();
            if last_status.elapsed() >= self.options.status_interval {
                last_status = tokio::time::Instant::now();
                if !self.check_status(lease).await {
                    return Ok(Ended::LostLease);
                }
            }
            if shutdown.is_cancelled() {
                return Ok(Ended::Shutdown);
            }
            if !step.more {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                    _ = tokio::time::sleep(self.options.poll_interval) => {}
                }
            }
        }
    }

    fn set_confirmed(&mut self, lsn: Lsn) {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            self.stats.confirmed_lsn.store(lsn.0, Ordering::Relaxed);
        }
    }

    /// Waits until this relay holds the slot's lease: a session-level advisory lock on a
    /// connection of its own, held for as long as it relays. One relay per slot is active; the
    /// others stand by and take over when its session ends. `None` if shut down while waiting.
    async fn acquire_lease(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<sqlx::PgConnection>, RelayError> {
        let key = format!("ferry-relay/{}", self.options.slot);
        let mut said = false;
        loop {
            let attempt = async {
                let mut conn = self.connect_options.connect().await?;
                let held: bool =
                    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                        .bind(&key)
                        .fetch_one(&mut conn)
                        .await?;
                Ok::<_, sqlx::Error>(held.then_some(conn))
            };
            match attempt.await {
                Ok(Some(conn)) => {
                    self.stats.active.store(1, Ordering::Relaxed);
                    tracing::info!(slot = %self.options.slot, "holding the relay lease: active");
                    return Ok(Some(conn));
                }
                Ok(None) if !said => {
                    said = true;
                    tracing::info!(slot = %self.options.slot, "another relay is active on this slot; standing by");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot reach Postgres for the relay lease"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(self.options.poll_interval.max(Duration::from_millis(500))) => {}
            }
        }
    }

    /// One batch: peek, produce, wait for acknowledgements, advance.
    pub async fn step(&mut self) -> Result<Step, RelayError> {
        use futures::TryStreamExt as _;
        let started = std::time::Instant::now();
        let upto: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&self.pool)
            .await?;
        let upto: Lsn = upto
            .parse()
            .map_err(|_| RelayError::Slot(self.options.slot.clone()))?;
        // Streamed: each transaction is produced as soon as its commit is decoded, while Postgres
        // decodes the next, and memory is bounded by the producer's queue, not by the batch.
        let mut changes = sqlx::query_as::<_, (String, Vec<u8>)>(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes(\
                $1, $2::pg_lsn, $3, 'proto_version', '1', 'publication_names', $4)",
        )
        .bind(&self.options.slot)
        .bind(upto.to_string())
        .bind(self.options.batch_changes as i32)
        .bind(&self.options.publication)
        .fetch(&self.pool);
        let mut assembler = Assembler::new(&self.options.schema, &self.options.table);
        let mut progress: Progress<DeliveryFuture> = Progress::new(self.confirmed);
        let (mut seen, mut records, mut transactions) = (0usize, 0usize, 0u64);
        while let Some((_, data)) = changes.try_next().await? {
            seen += 1;
            if let Some(tx) = assembler.push(pgoutput::parse(&data)?)? {
                records += self.produce(&tx, &mut progress).await?;
                progress.received(tx.end_lsn);
                transactions += 1;
            }
        }
        drop(changes);
        let decoded = started.elapsed();
        while self.ack_oldest(&mut progress).await? {}
        let acked = started.elapsed();
        let cut_short = seen >= self.options.batch_changes as usize;
        // When the peek was not cut short, nothing else committed before `upto`, so the slot
        // may pass it (the heartbeat), as it passes a keepalive's position when streaming.
        if !cut_short {
            progress.caught_up(upto);
        }
        let target = progress.durable();
        if target > self.confirmed {
            sqlx::query("SELECT pg_replication_slot_advance($1, $2::pg_lsn)")
                .bind(&self.options.slot)
                .bind(target.to_string())
                .execute(&self.pool)
                .await?;
            self.set_confirmed(target);
        }
        tracing::debug!(
            records,
            decoded_ms = decoded.as_millis() as u64,
            acked_ms = acked.as_millis() as u64,
            advanced_ms = started.elapsed().as_millis() as u64,
            "relay step"
        );
        // The lag as of this step's start, without another query (the periodic status check
        // measures it exactly).
        self.stats
            .slot_lag_bytes
            .store(self.confirmed.bytes_until(upto), Ordering::Relaxed);
        self.stats
            .transactions
            .fetch_add(transactions, Ordering::Relaxed);
        Ok(Step {
            records,
            more: cut_short,
        })
    }

    /// Queues one transaction's rows, in order, for the broker; their acknowledgements join
    /// `progress`. When the producer's queue is full, waits for the oldest acknowledgement.
    async fn produce(
        &self,
        tx: &Transaction,
        progress: &mut Progress<DeliveryFuture>,
    ) -> Result<usize, RelayError> {
        let mut count = 0;
        for row in &tx.rows {
            let record = match row {
                Ok(row) => {
                    let record = WireRecord::from_row(row, Some(tx.commit_time));
                    let size = record.approximate_size();
                    if size > self.options.max_message_bytes {
                        self.reject(
                                Some(row.id),
                                Some(&row.tenant_id),
                                Some(&row.event_type),
                                &format!(
                                    "the record is {size} bytes, over the {}-byte limit (relay.max_message_bytes)",
                                    self.options.max_message_bytes
                                ),
                                tx,
                            )
                    } else {
                        record
                    }
                }
                Err(bad) => self.reject(
                    bad.id,
                    bad.tenant_id.as_deref(),
                    bad.event_type.as_deref(),
                    &bad.reason,
                    tx,
                ),
            };
            let mut future_record = broker::future_record(&self.topic, &record);
            loop {
                match self.producer.send_result(future_record) {
                    Ok(delivery) => {
                        progress.push(delivery, tx.end_lsn);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        // Back-pressure: wait for the oldest record in flight.
                        future_record = r;
                        if !self.ack_oldest(progress).await? {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    Err((e, _)) => return Err(RelayError::Delivery(e)),
                }
            }
            count += 1;
        }
        Ok(count)
    }

    /// Waits for the oldest record's acknowledgement; `false` when nothing is in flight.
    async fn ack_oldest(
        &self,
        progress: &mut Progress<DeliveryFuture>,
    ) -> Result<bool, RelayError> {
        let Some(delivery) = progress.oldest() else {
            return Ok(false);
        };
        let report = delivery.await;
        self.acknowledged(report, progress)?;
        Ok(true)
    }

    /// The oldest record's delivery report: on success it is acknowledged (and counted).
    fn acknowledged(
        &self,
        report: <DeliveryFuture as std::future::Future>::Output,
        progress: &mut Progress<DeliveryFuture>,
    ) -> Result<(), RelayError> {
        match report {
            Ok(Ok(_)) => {
                progress.acknowledged();
                self.stats.records_acked.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err((e, _))) => Err(RelayError::Delivery(e)),
            Err(_canceled) => Err(RelayError::Delivery(KafkaError::Canceled)),
        }
    }

    fn reject(
        &self,
        id: Option<uuid::Uuid>,
        tenant: Option<&str>,
        event_type: Option<&str>,
        reason: &str,
        tx: &Transaction,
    ) -> WireRecord {
        self.stats.rows_rejected.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            event_id = ?id,
            tenant = ?tenant,
            reason,
            "outbox row sent as a rejection marker; the row stays in the outbox table"
        );
        WireRecord::rejected(id, tenant, event_type, reason, tx.commit_time)
    }
}

/// Why a relay session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Shut down: the work in hand was finished.
    Shutdown,
    /// The lease connection failed: another relay may be active now.
    LostLease,
}

/// What one [`Relay::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Records produced and acknowledged.
    pub records: usize,
    /// Whether the peek was cut short by the batch size (so more is waiting now).
    pub more: bool,
}

fn ignore_duplicate(
    result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>,
) -> Result<(), RelayError> {
    match result {
        Ok(_) => Ok(()),
        // Another relay created it between our check and our create: that is success.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, doubles per attempt, never above `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next wait: uniform in [0, min(max, base·2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt += 1;
        ceiling.mul_f64(rand_unit())
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A number in [0, 1) from the clock and a counter: jitter needs spread, not cryptography.
fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    let h = RandomState::new().hash_one(std::time::Instant::now());
    (h >> 11) as f64 / (1u64 << 53) as f64
}
