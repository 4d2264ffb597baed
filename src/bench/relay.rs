//! `ferry bench relay`: Ferry's WAL relay against a naive polling relay, side by side, each fed
//! by the same concurrent writers.
//!
//! The writers behave like request handlers of our application: an event's id (a time-ordered
//! UUIDv7) is taken when the request starts, then a transaction bumps the tenant's version (a
//! row lock, so a tenant's transactions serialize and its versions follow commit order) and
//! appends 1 to 8 events for that tenant, whose `aggregateid` is the version. Many writers run
//! at once, so ids are not in commit order: that is what trips a polling relay.
//!
//! The baseline does what hand-written relays do: poll `WHERE id > last ORDER BY id LIMIT 500`,
//! publish the batch (every send in flight at once, then wait for all acknowledgements), mark
//! the batch published, remember the highest id. A row whose transaction commits after the poll passed its id is skipped for good.
//!
//! Each relay runs two phases on its own database and topic:
//! - live: the relay runs while the writers write `rows`; rows/s is measured from the writers'
//!   start to the last acknowledgement (bounded by the writers when the relay keeps up), and
//!   this is where the baseline skips and reorders;
//! - backlog: the writers write `rows` more with the relay stopped, then the relay starts and
//!   drains them; rows/s from its start to the last acknowledgement is its capacity, and the
//!   ratio is taken on it.
//!
//! After both, the topic is read back: every written id must be there (`missing`; Ferry's
//! `lost`), and each tenant's versions must rise (`reordered` counts records behind a version
//! already seen).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::decoding_floor::{self, Floor};
use super::{BenchError, ReadRecord, drop_database, fresh_database, read_topic};
use crate::broker;
use crate::config::Config;
use crate::outbox::writer::{self, NewEvent};
use crate::outbox::{OutboxRow, TenantId, WireRecord};
use crate::relay::Relay;
use crate::shop::{EventPayload, proto};

/// Which broker the relays write to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchBroker {
    /// The configured cluster (the local stack's tansu, or `KAFKA_BROKERS`).
    Configured,
    /// A tansu with in-memory storage that the benchmark starts on a free loopback port: a
    /// real broker whose storage is not the bottleneck ([`super::tansu`]).
    Memory,
    /// librdkafka's in-process mock cluster: a real Kafka protocol peer held in memory, to
    /// measure the relays where the broker's storage is not the bottleneck.
    Mock,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RelayBenchOptions {
    /// The broker.
    pub broker: BenchBroker,
    /// Outbox rows per relay.
    pub rows: usize,
    /// Distinct tenants.
    pub tenants: usize,
    /// Concurrent writers.
    pub writers: usize,
    /// Partitions of each topic.
    pub partitions: i32,
}

impl Default for RelayBenchOptions {
    fn default() -> Self {
        RelayBenchOptions {
            broker: BenchBroker::Configured,
            rows: 100_000,
            tenants: 1_000,
            writers: 8,
            partitions: 4,
        }
    }
}

/// One relay's results.
#[derive(Debug, Clone, Default)]
pub struct RelayRun {
    /// Rows written in each phase.
    pub rows: usize,
    /// Live phase: writers' start to the last acknowledgement.
    pub elapsed: Duration,
    /// Backlog phase: the relay's start to the last acknowledgement of a backlog of `rows`.
    pub backlog_elapsed: Duration,
    /// How long the writers took.
    pub writers_elapsed: Duration,
    /// Written rows that never reached the topic.
    pub missing: usize,
    /// Records behind a later version of their tenant.
    pub reordered: usize,
    /// Records read back (duplicates included).
    pub records: usize,
}

impl RelayRun {
    /// Live phase: rows per second from the writers' start to the last acknowledgement.
    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Backlog phase: rows per second draining committed rows (the relay's capacity).
    pub fn backlog_rows_per_s(&self) -> f64 {
        self.rows as f64 / self.backlog_elapsed.as_secs_f64().max(1e-9)
    }
}

/// Both runs.
#[derive(Debug, Clone)]
pub struct RelayBenchReport {
    /// The options used.
    pub options: RelayBenchOptions,
    /// Ferry's relay.
    pub ferry: RelayRun,
    /// The polling baseline.
    pub polling: RelayRun,
    /// `pg_recvlogical` over the same backlog: the floor of decoding, or why it did not run.
    pub floor: Result<Floor, String>,
}

impl RelayBenchReport {
    /// Ferry's capacity (backlog rows/s) over the baseline's.
    pub fn ratio(&self) -> f64 {
        self.ferry.backlog_rows_per_s() / self.polling.backlog_rows_per_s().max(1e-9)
    }

    /// The table and the machine-readable last line.
    pub fn render(&self) -> String {
        let o = &self.options;
        let row = |name: &str, r: &RelayRun, ratio: f64| {
            format!(
                "| {name:<20} | {:>14.0} | {:>11.0} | {:>7.2} s | {:>7.2} s | {:>7} | {:>9} | {:>6.2}x |\n",
                r.backlog_rows_per_s(),
                r.rows_per_s(),
                r.elapsed.as_secs_f64(),
                r.writers_elapsed.as_secs_f64(),
                r.missing,
                r.reordered,
                ratio
            )
        };
        let broker = o.broker.describe();
        let mut s = format!(
            "relay benchmark: {} rows per relay, {} tenants, {} concurrent writers, {} partitions, on {broker}\n\n",
            o.rows, o.tenants, o.writers, o.partitions
        );
        s.push_str("| relay                | backlog rows/s | live rows/s | live time |   writers | missing | reordered |   ratio |\n");
        s.push_str("|----------------------|----------------|-------------|-----------|-----------|---------|-----------|---------|\n");
        s.push_str(&row("ferry relay (WAL)", &self.ferry, self.ratio()));
        s.push_str(&row("polling (baseline)", &self.polling, 1.0));
        match &self.floor {
            Ok(floor) => s.push_str(&format!(
                "\nthe floor of decoding: pg_recvlogical took the same {} backlog rows from a slot of its own \
                 at {:.0} rows/s ({:.2} s); the relay drained them at {:.2} of that rate.\n",
                floor.rows,
                floor.rows_per_s(),
                floor.elapsed.as_secs_f64(),
                self.ferry.backlog_rows_per_s() / floor.rows_per_s().max(1e-9)
            )),
            Err(why) => s.push_str(&format!("\nthe floor of decoding was not measured: {why}\n")),
        }
        s.push_str(&format!(
            "\nbacklog rows/s: draining {rows} committed rows (the relay's capacity; the ratio is taken on it).\n\
             live rows/s: {rows} rows while the writers write (bounded by the writers when a relay keeps up): \
             ferry {:.0}, polling {:.0}.\n\
             missing: written rows never in the topic; reordered: records behind a later version of their tenant.\n\n",
            self.ferry.rows_per_s(),
            self.polling.rows_per_s(),
            rows = o.rows,
        ));
        // The last line is for machines.
        let floor = self.floor.as_ref().map_or(0.0, Floor::rows_per_s);
        s.push_str(&format!(
            "relay_rows_per_s={:.0} polling_rows_per_s={:.0} ratio={:.2} polling_skipped={} polling_reordered={} ferry_lost={} \
             recvlogical_rows_per_s={floor:.0} relay_over_recvlogical={:.2}\n",
            self.ferry.backlog_rows_per_s(),
            self.polling.backlog_rows_per_s(),
            self.ratio(),
            self.polling.missing,
            self.polling.reordered,
            self.ferry.missing,
            self.ferry.backlog_rows_per_s() / floor.max(1e-9),
        ));
        s
    }
}

/// Runs both relays and reads their topics back.
pub async fn run(
    config: &Config,
    options: &RelayBenchOptions,
) -> Result<RelayBenchReport, BenchError> {
    let mut config = config.clone();
    // Kept alive for the whole run; dropped (and its brokers stopped) at the end.
    let started = options.broker.start_for_read_back(&mut config)?;
    let (ferry, floor) = run_ferry(&config, options, started.mock()).await?;
    let polling = run_polling(&config, options, started.mock()).await?;
    Ok(RelayBenchReport {
        options: options.clone(),
        ferry,
        polling,
        floor,
    })
}

/// librdkafka's in-process mock cluster, as the benchmarks hold it.
pub type Mock = rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// The broker a benchmark started for its run, if any: keep it alive for the whole run
/// (dropping it stops it).
pub enum Started {
    /// The configured cluster: nothing started.
    Nothing,
    /// librdkafka's mock cluster.
    Mock(Mock),
    /// A tansu with in-memory storage.
    Tansu(super::tansu::MemoryTansu),
}

impl Started {
    /// The mock cluster, where topics are created through its own API (it has no CreateTopics).
    pub fn mock(&self) -> Option<&Mock> {
        match self {
            Started::Mock(mock) => Some(mock),
            _ => None,
        }
    }
}

impl BenchBroker {
    /// What the benchmark's table header says it ran on.
    pub fn describe(self) -> &'static str {
        match self {
            BenchBroker::Configured => "the configured broker",
            BenchBroker::Memory => "a tansu with in-memory storage, started for the run",
            BenchBroker::Mock => "librdkafka's in-process mock cluster",
        }
    }

    /// [`start`](Self::start) for the relay benchmarks, which read their topics back: refuses
    /// the in-memory tansu. Its `ListOffsets` answers a high watermark of 1 on every partition,
    /// so `bench relay`'s read-back stops early and reports rows as lost (seen: 1,297 of 5,000);
    /// `bench relay-latency` has not been checked against it.
    pub fn start_for_read_back(self, config: &mut Config) -> Result<Started, BenchError> {
        if self == BenchBroker::Memory {
            return Err(BenchError::Tansu(
                "the relay benchmarks are not run on the in-memory tansu: its watermarks are \
                 wrong, so reading the topic back loses rows; use the configured broker or the \
                 mock cluster"
                    .into(),
            ));
        }
        self.start(config)
    }

    /// Points `config` at this broker, starting it unless it is the configured one.
    pub fn start(self, config: &mut Config) -> Result<Started, BenchError> {
        match self {
            BenchBroker::Configured => Ok(Started::Nothing),
            BenchBroker::Memory => {
                let tansu = super::tansu::MemoryTansu::start()?;
                config.kafka.brokers = tansu.brokers().to_owned();
                Ok(Started::Tansu(tansu))
            }
            BenchBroker::Mock => {
                let mock = rdkafka::mocking::MockCluster::new(1)?;
                config.kafka.brokers = mock.bootstrap_servers();
                Ok(Started::Mock(mock))
            }
        }
    }
}

async fn prepare(
    config: &Config,
    options: &RelayBenchOptions,
    name: &str,
    mock: Option<&Mock>,
) -> Result<(PgPool, String, Config), BenchError> {
    let (pool, url) = fresh_database(&config.database, &format!("ferry_bench_{name}")).await?;
    sqlx::query(
        "CREATE TABLE bench_versions (tenant_id text PRIMARY KEY, version bigint NOT NULL)",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO bench_versions SELECT 'tenant-' || n, 0 FROM generate_series(0, $1 - 1) n",
    )
    .bind(options.tenants as i64)
    .execute(&pool)
    .await?;
    let mut bench_config = config.clone();
    bench_config.database.url = url.clone();
    let run_id = Uuid::new_v4().simple().to_string();
    bench_config.kafka.topic = format!("ferry-bench-{name}-{run_id}");
    // Slot names are global to the server.
    bench_config.relay.slot = format!("ferry_bench_{run_id}");
    bench_config.relay.publication = format!("ferry_bench_{run_id}");
    match mock {
        Some(mock) => mock.create_topic(&bench_config.kafka.topic, options.partitions, 1)?,
        None => {
            broker::ensure_topic(
                &bench_config.kafka,
                &bench_config.kafka.topic,
                options.partitions,
            )
            .await?
        }
    }
    Ok((pool, url, bench_config))
}

async fn run_ferry(
    config: &Config,
    options: &RelayBenchOptions,
    mock: Option<&Mock>,
) -> Result<(RelayRun, Result<Floor, String>), BenchError> {
    let (pool, url, bench_config) = prepare(config, options, "ferry", mock).await?;
    // Live: the relay runs while the writers write.
    let ((ids, started, writers_elapsed), acked_at) =
        relay_until_acked(&bench_config, options.rows, async {
            let started = Instant::now();
            let ids = write(&pool, options).await;
            (ids, started, started.elapsed())
        })
        .await?;
    let mut ids = ids?;
    let elapsed = acked_at - started;

    // Backlog: the same writers again while no relay runs, then pg_recvlogical decodes it from
    // a slot of its own (the floor), then a fresh relay drains it.
    let floor_slot = format!("{}_floor", bench_config.relay.slot);
    decoding_floor::create_slot(&pool, &floor_slot).await?;
    ids.extend(write(&pool, options).await?);
    let names = (floor_slot.as_str(), bench_config.relay.publication.as_str());
    let floor = decoding_floor::read(&pool, &url, names, options.rows).await;
    let (started, acked_at) =
        relay_until_acked(&bench_config, options.rows, async { Instant::now() }).await?;
    let backlog_elapsed = acked_at - started;

    let timings = Timings {
        elapsed,
        writers_elapsed,
        backlog_elapsed,
    };
    let run = finish(config, pool, &url, &bench_config, ids, timings).await?;
    Ok((run, floor))
}

/// Runs a relay (its slot set up first) alongside `work` until it has acknowledged `rows`
/// records, then stops it; returns `work`'s output and when the last record was acknowledged.
async fn relay_until_acked<T>(
    config: &Config,
    rows: usize,
    work: impl std::future::Future<Output = T>,
) -> Result<(T, Instant), BenchError> {
    let mut relay = Relay::connect(config).await?;
    relay.setup().await?;
    let stats = relay.stats();
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    let output = work.await;
    wait_until(
        || stats.records_acked.load(Ordering::Relaxed) >= rows as u64,
        || relay_task.is_finished(),
    )
    .await?;
    let acked_at = Instant::now();
    stop.cancel();
    relay_task.await.expect("relay task panicked")?;
    Ok((output, acked_at))
}

/// Polls `done` every few milliseconds (a benchmark's own progress, not a test condition),
/// failing when `dead` says the worker stopped or after ten minutes.
async fn wait_until(done: impl Fn() -> bool, dead: impl Fn() -> bool) -> Result<(), BenchError> {
    let until = Instant::now() + Duration::from_secs(600);
    while !done() {
        if Instant::now() > until || dead() {
            return Err(BenchError::Stalled(
                "the relay stopped before relaying every row".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

async fn run_polling(
    config: &Config,
    options: &RelayBenchOptions,
    mock: Option<&Mock>,
) -> Result<RelayRun, BenchError> {
    let (pool, url, bench_config) = prepare(config, options, "polling", mock).await?;
    sqlx::query("ALTER TABLE outbox ADD COLUMN published_at timestamptz")
        .execute(&pool)
        .await?;
    let done_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let pool = pool.clone();
        let kafka = bench_config.kafka.clone();
        let done_flag = Arc::clone(&done_flag);
        tokio::spawn(async move { poll_relay(pool, kafka, done_flag, Uuid::nil()).await })
    };
    let started = Instant::now();
    let mut ids = write(&pool, options).await?;
    let writers_elapsed = started.elapsed();
    done_flag.store(true, Ordering::SeqCst);
    let last = poller.await.expect("poller panicked")?;
    let elapsed = started.elapsed();

    // Backlog: the writers again with the poller stopped, then it resumes from its last id.
    ids.extend(write(&pool, options).await?);
    let started = Instant::now();
    poll_relay(pool.clone(), bench_config.kafka.clone(), done_flag, last).await?;
    let backlog_elapsed = started.elapsed();

    let timings = Timings {
        elapsed,
        writers_elapsed,
        backlog_elapsed,
    };
    finish(config, pool, &url, &bench_config, ids, timings).await
}

/// The naive relay: poll by id, publish the batch, mark, remember the highest id.
async fn poll_relay(
    pool: PgPool,
    kafka: crate::config::KafkaConfig,
    writers_done: Arc<std::sync::atomic::AtomicBool>,
    mut last: Uuid,
) -> Result<Uuid, BenchError> {
    let producer: FutureProducer = broker::producer_config(&kafka).create()?;
    loop {
        // Read the flag before polling: an empty poll after the writers finished means done.
        let finished = writers_done.load(Ordering::SeqCst);
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, tenant_id, aggregatetype, aggregateid, type, payload, traceparent, created_at, deliver_before \
             FROM outbox WHERE id > $1 ORDER BY id LIMIT 500",
        )
        .bind(last)
        .fetch_all(&pool)
        .await?;
        if rows.is_empty() {
            if finished {
                return Ok(last);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in rows {
            let record = WireRecord::from_row(&row, None);
            let delivery = producer
                .send_result(broker::future_record(&kafka.topic, &record))
                .map_err(|(e, _)| e)?;
            deliveries.push(delivery);
            ids.push(row.id);
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(e.into()),
                Err(_) => return Err(rdkafka::error::KafkaError::Canceled.into()),
            }
        }
        sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&pool)
            .await?;
        last = *ids.last().expect("non-empty batch");
    }
}

/// The concurrent writers; returns every id written with its tenant and version.
async fn write(
    pool: &PgPool,
    options: &RelayBenchOptions,
) -> Result<Vec<(Uuid, String, i64)>, BenchError> {
    let claimed = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..options.writers {
        let pool = pool.clone();
        let claimed = Arc::clone(&claimed);
        let (rows, tenants) = (options.rows, options.tenants);
        tasks.spawn(async move {
            let mut written = Vec::new();
            let mut seed = 0x5EED_u64 ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            loop {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let want = 1 + (seed % 8) as usize;
                let start = claimed.fetch_add(want, Ordering::Relaxed);
                if start >= rows {
                    return Ok::<_, sqlx::Error>(written);
                }
                let n = want.min(rows - start);
                let tenant = format!("tenant-{}", (seed >> 8) % tenants as u64);
                // The request takes its event ids when it starts, before it waits on anything.
                let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
                let mut tx = pool.begin().await?;
                let version: i64 = sqlx::query_scalar(
                    "UPDATE bench_versions SET version = version + $2 WHERE tenant_id = $1 RETURNING version",
                )
                .bind(&tenant)
                .bind(n as i64)
                .fetch_one(&mut *tx)
                .await?;
                let tenant_id = TenantId::new(tenant.clone()).expect("valid tenant");
                let events: Vec<NewEvent<EventPayload>> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        let v = version - n as i64 + 1 + i as i64;
                        NewEvent {
                            id: *id,
                            tenant_id: tenant_id.clone(),
                            aggregate_id: v.to_string(),
                            payload: EventPayload::ProductUpdated(proto::ProductUpdated {
                                product: Some(proto::Product {
                                    id: format!("{tenant}-product"),
                                    name: format!("version {v}"),
                                    description: String::new(),
                                    price_minor: v,
                                    currency: "EUR".to_owned(),
                                }),
                            }),
                            deliver_before: None,
                            traceparent: None,
                            integration: None,
                        }
                    })
                    .collect();
                writer::append_many(&mut tx, &events).await?;
                tx.commit().await?;
                written.extend(events.into_iter().map(|e| (e.id, tenant.clone(), e.aggregate_id.parse().unwrap_or(0))));
            }
        });
    }
    let mut all = Vec::with_capacity(options.rows);
    while let Some(done) = tasks.join_next().await {
        all.extend(done.expect("writer panicked")?);
    }
    Ok(all)
}

/// A run's measured times.
struct Timings {
    elapsed: Duration,
    writers_elapsed: Duration,
    backlog_elapsed: Duration,
}

/// Reads the run's topic back, drops its database, and judges what arrived.
async fn finish(
    config: &Config,
    pool: PgPool,
    url: &str,
    bench_config: &Config,
    ids: Vec<(Uuid, String, i64)>,
    timings: Timings,
) -> Result<RelayRun, BenchError> {
    let records = read_back(bench_config).await?;
    pool.close().await;
    drop_database(&config.database, url).await?;
    let mut run = judge(ids, &records, timings.elapsed, timings.writers_elapsed);
    run.backlog_elapsed = timings.backlog_elapsed;
    Ok(run)
}

async fn read_back(config: &Config) -> Result<Vec<ReadRecord>, BenchError> {
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || read_topic(&kafka, &kafka.topic, Duration::from_secs(300)))
        .await
        .expect("reader panicked")
}

fn judge(
    written: Vec<(Uuid, String, i64)>,
    records: &[ReadRecord],
    elapsed: Duration,
    writers_elapsed: Duration,
) -> RelayRun {
    let seen: HashSet<Uuid> = records.iter().filter_map(|r| r.id).collect();
    let missing = written
        .iter()
        .filter(|(id, _, _)| !seen.contains(id))
        .count();
    // Per tenant, in the order its partition holds them: a version below the highest already
    // seen is out of order (a repeated id is a replay, not a reorder, and is passed over).
    let mut highest: HashMap<&str, i64> = HashMap::new();
    let mut first_seen: HashSet<Uuid> = HashSet::new();
    let mut reordered = 0;
    for r in records {
        if r.id.is_some_and(|id| !first_seen.insert(id)) {
            continue;
        }
        let version: i64 = r
            .aggregate_id
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let h = highest.entry(r.key.as_str()).or_insert(0);
        if version < *h {
            reordered += 1;
        }
        *h = (*h).max(version);
    }
    RelayRun {
        rows: written.len() / 2,
        elapsed,
        backlog_elapsed: Duration::ZERO,
        writers_elapsed,
        missing,
        reordered,
        records: records.len(),
    }
}
