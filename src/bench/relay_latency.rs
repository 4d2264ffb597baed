//! `ferry bench relay-latency`: how long an outbox row takes from its commit to a consumer of
//! the topic, at a steady write rate, with the relay streaming the slot (`relay.mode = stream`)
//! against the same relay peeking it (`relay.mode = peek`, the baseline).
//!
//! Each mode runs on a database and a topic of its own: `ferry load` writes products at
//! `rate` changes/s for `seconds` (one transaction per change, as our application does), the
//! relay runs throughout, and a reader follows the topic live. A record's latency is the time
//! it is read minus its timestamp, which the relay sets to the transaction's commit time (the
//! same machine's clock). The reader polls with `fetch.wait.max.ms=10`, so the broker's fetch
//! path adds little of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::relay::{BenchBroker, Mock};
use super::{BenchError, drop_database, fresh_database};
use crate::broker;
use crate::config::{Config, RelayMode};
use crate::load::{self, LoadOptions};
use crate::relay::{Relay, RelayError, RelayStats};

/// What to run.
#[derive(Debug, Clone)]
pub struct LatencyBenchOptions {
    /// The broker.
    pub broker: BenchBroker,
    /// Changes written per second.
    pub rate: f64,
    /// For how long.
    pub seconds: f64,
    /// Distinct tenants.
    pub tenants: usize,
    /// Partitions of each topic.
    pub partitions: i32,
}

impl Default for LatencyBenchOptions {
    fn default() -> Self {
        LatencyBenchOptions {
            broker: BenchBroker::Configured,
            rate: 1_000.0,
            seconds: 10.0,
            tenants: 50,
            partitions: 12,
        }
    }
}

/// One mode's latencies.
#[derive(Debug, Clone)]
pub struct LatencyRun {
    /// The mode.
    pub mode: RelayMode,
    /// Rows written (and read back).
    pub rows: usize,
    /// Writes per second achieved.
    pub write_rate: f64,
    /// Commit-to-read latencies, sorted, in milliseconds.
    pub latencies_ms: Vec<f64>,
}

impl LatencyRun {
    /// The `q` quantile (0..=1) in milliseconds.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_ms.len() - 1) as f64 * q).round() as usize;
        self.latencies_ms[i]
    }
}

/// Both runs.
#[derive(Debug, Clone)]
pub struct LatencyBenchReport {
    /// The options used.
    pub options: LatencyBenchOptions,
    /// Streaming.
    pub stream: LatencyRun,
    /// Peeking (the baseline).
    pub peek: LatencyRun,
}

impl LatencyBenchReport {
    /// The baseline's p99 over streaming's: how many times lower the tail is.
    pub fn ratio(&self) -> f64 {
        self.peek.quantile(0.99) / self.stream.quantile(0.99).max(1e-9)
    }

    /// The table and the machine-readable last line.
    pub fn render(&self) -> String {
        let o = &self.options;
        let broker = o.broker.describe();
        let mut s = format!(
            "relay latency, commit to a reader of the topic: {} changes/s for {} s, {} tenants, {} partitions, on {broker}\n\n",
            o.rate, o.seconds, o.tenants, o.partitions
        );
        s.push_str("| relay mode      |   rows | written/s | p50 ms | p90 ms | p99 ms | max ms | p99 ratio |\n");
        s.push_str("|-----------------|--------|-----------|--------|--------|--------|--------|-----------|\n");
        for (name, run, ratio) in [
            ("stream", &self.stream, self.ratio()),
            ("peek (baseline)", &self.peek, 1.0),
        ] {
            s.push_str(&format!(
                "| {name:<15} | {:>6} | {:>9.0} | {:>6.1} | {:>6.1} | {:>6.1} | {:>6.1} | {:>8.1}x |\n",
                run.rows,
                run.write_rate,
                run.quantile(0.5),
                run.quantile(0.9),
                run.quantile(0.99),
                run.quantile(1.0),
                ratio
            ));
        }
        s.push_str(&format!(
            "\nstream_p50_ms={:.1} stream_p99_ms={:.1} peek_p50_ms={:.1} peek_p99_ms={:.1} ratio={:.1}\n",
            self.stream.quantile(0.5),
            self.stream.quantile(0.99),
            self.peek.quantile(0.5),
            self.peek.quantile(0.99),
            self.ratio()
        ));
        s
    }
}

/// Runs both modes.
pub async fn run(
    config: &Config,
    options: &LatencyBenchOptions,
) -> Result<LatencyBenchReport, BenchError> {
    let mut config = config.clone();
    let started = options.broker.start_for_read_back(&mut config)?;
    let stream = run_mode(&config, options, RelayMode::Stream, started.mock()).await?;
    let peek = run_mode(&config, options, RelayMode::Peek, started.mock()).await?;
    Ok(LatencyBenchReport {
        options: options.clone(),
        stream,
        peek,
    })
}

async fn run_mode(
    config: &Config,
    options: &LatencyBenchOptions,
    mode: RelayMode,
    mock: Option<&Mock>,
) -> Result<LatencyRun, BenchError> {
    let (pool, url) = fresh_database(&config.database, "ferry_bench_latency").await?;
    let cfg = mode_config(config, &url, mode);
    match mock {
        Some(mock) => mock.create_topic(&cfg.kafka.topic, options.partitions, 1)?,
        None => broker::ensure_topic(&cfg.kafka, &cfg.kafka.topic, options.partitions).await?,
    }
    let reader = assigned_reader(&cfg, options.partitions)?;

    let mut relay = Relay::connect(&cfg).await?;
    relay.setup().await?;
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    if let Err(e) = warm_up(&pool, &reader, mode).await {
        stop.cancel();
        return Err(e);
    }

    let rows = (options.rate * options.seconds).round() as usize;
    let load_options = LoadOptions {
        tenants: options.tenants,
        events: rows,
        rate: Some(options.rate),
        ..LoadOptions::default()
    };
    let writer_pool = pool.clone();
    let writers = tokio::spawn(async move { load::run(&writer_pool, &load_options).await });
    let until =
        Instant::now() + Duration::from_secs_f64(options.seconds) + Duration::from_secs(120);
    let mut latencies_ms = match read_latencies(&reader, rows, until, &relay_task, mode).await {
        Ok(latencies_ms) => latencies_ms,
        Err(e) => {
            stop.cancel();
            return Err(e);
        }
    };
    let report = writers
        .await
        .expect("writers panicked")
        .map_err(|e| BenchError::Stalled(format!("the writers failed: {e}")))?;
    stop.cancel();
    relay_task.await.expect("relay task panicked")?;
    drop(reader);
    pool.close().await;
    drop_database(&config.database, &url).await?;
    latencies_ms.sort_by(f64::total_cmp);
    Ok(LatencyRun {
        mode,
        rows: latencies_ms.len(),
        write_rate: report.events() as f64 / report.elapsed.as_secs_f64().max(1e-9),
        latencies_ms,
    })
}

/// The run's configuration: its database, and a topic, slot and publication of its own.
fn mode_config(config: &Config, url: &str, mode: RelayMode) -> Config {
    let mut cfg = config.clone();
    cfg.database.url = url.to_owned();
    let run_id = Uuid::new_v4().simple().to_string();
    cfg.kafka.topic = format!("ferry-bench-latency-{run_id}");
    cfg.relay.slot = format!("ferry_bench_{run_id}");
    cfg.relay.publication = format!("ferry_bench_{run_id}");
    cfg.relay.mode = mode;
    cfg
}

/// A reader of every partition from the beginning, fetching with a short wait.
fn assigned_reader(cfg: &Config, partitions: i32) -> Result<StreamConsumer, BenchError> {
    let mut reader_config = broker::client_config(&cfg.kafka);
    reader_config
        .set("group.id", cfg.kafka.topic.clone())
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10");
    let reader: StreamConsumer = reader_config.create()?;
    // Assigned, not subscribed: a group join would delay the first records by seconds.
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(&cfg.kafka.topic, p, rdkafka::Offset::Beginning)?;
    }
    reader.assign(&assignment)?;
    Ok(reader)
}

/// One warm-up change, read back before the clock starts: the relay is streaming and the
/// reader fetching when the measured writes begin.
async fn warm_up(
    pool: &PgPool,
    reader: &StreamConsumer,
    mode: RelayMode,
) -> Result<(), BenchError> {
    let warm_up = LoadOptions {
        tenants: 1,
        events: 1,
        concurrency: 1,
        tenant_prefix: "warm-up-".to_owned(),
        ..LoadOptions::default()
    };
    load::run(pool, &warm_up)
        .await
        .map_err(|e| BenchError::Stalled(format!("the warm-up write failed: {e}")))?;
    match tokio::time::timeout(Duration::from_secs(60), reader.recv()).await {
        Ok(m) => m.map(drop).map_err(BenchError::from),
        Err(_) => Err(BenchError::Stalled(format!(
            "{mode:?}: the warm-up record was not read within 60 s"
        ))),
    }
}

type RelayTask = tokio::task::JoinHandle<Result<Arc<RelayStats>, RelayError>>;

/// Reads until `rows` records or `until`, each record's commit-to-read latency in ms; stops
/// early if the relay ends.
async fn read_latencies(
    reader: &StreamConsumer,
    rows: usize,
    until: Instant,
    relay_task: &RelayTask,
    mode: RelayMode,
) -> Result<Vec<f64>, BenchError> {
    let mut latencies_ms = Vec::with_capacity(rows);
    while latencies_ms.len() < rows {
        let left = until.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(left, reader.recv()).await {
            Ok(m) => m?,
            Err(_) => {
                let read = latencies_ms.len();
                let stalled = format!("{mode:?}: {read} of {rows} records read in time");
                return Err(BenchError::Stalled(stalled));
            }
        };
        let now_ms = chrono::Utc::now().timestamp_micros() as f64 / 1000.0;
        if let Some(committed_ms) = message.timestamp().to_millis() {
            latencies_ms.push((now_ms - committed_ms as f64).max(0.0));
        }
        if relay_task.is_finished() {
            break;
        }
    }
    Ok(latencies_ms)
}
