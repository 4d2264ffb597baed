//! `ferry bench consume`: the consumer runtime on the configured stack.
//!
//! 1. Key-ordered parallelism: one partition, many tenants, a handler that takes `handler_ms`:
//!    Ferry (many tenants in flight at once) against the same runtime limited to one event in
//!    flight (the classic in-order consumer), on the same records.
//! 2. Overhead: a handler that returns at once; events per second with dedupe records, batched
//!    settlement and commits on.
//! 3. Isolation: 100 tenants on one partition, once all healthy and once with one tenant failing
//!    every event (a 422): the other tenants' throughput against the healthy run, and how far the
//!    committed offset fell behind while the failing tenant was paused and parked.
//! 4. Memory: one tenant paused while its 100,000 events arrive and are parked; the process's
//!    peak RSS over that run (the high-water mark is reset when the run starts).
//! 5. Two integrations at once: run 1's records consumed by two integrations side by side (each
//!    a group of its own, one database), each delivering every event, against run 1's one.
//!
//! Each run reads a topic filled beforehand, in a database of its own, with a group of its own,
//! timed from the consumer's start to the last delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::relay::BenchBroker;
use super::{BenchError, drop_database, fresh_database};
use crate::broker;
use crate::config::Config;
use crate::consumer::runtime::{self, ConsumeOptions, ConsumeStats};
use crate::delivery::{Attempt, Failure, FailureClass, Handler, Outcome};
use crate::outbox::{OutboxEvent, OutboxRow, WireRecord};
use crate::shop::{EventPayload, EventType, proto};

/// What to run.
#[derive(Debug, Clone)]
pub struct ConsumeBenchOptions {
    /// The broker.
    pub broker: BenchBroker,
    /// Events of the parallelism run.
    pub events: usize,
    /// Tenants of the parallelism and overhead runs.
    pub tenants: usize,
    /// The handler's time per event in the parallelism and isolation runs.
    pub handler_ms: u64,
    /// Events of the overhead run.
    pub overhead_events: usize,
    /// Events of each isolation run (over 100 tenants).
    pub isolation_events: usize,
    /// Events parked for the paused tenant in the memory run.
    pub parked_events: usize,
    /// Runs the memory scenario in a process of its own, this executable started as
    /// `ferry bench consume-parked` (so the peak RSS is the consumer's alone, not the
    /// benchmark's other runs' or the producer's); in this process when `None`.
    pub child: Option<std::path::PathBuf>,
}

impl Default for ConsumeBenchOptions {
    fn default() -> Self {
        ConsumeBenchOptions {
            broker: BenchBroker::Configured,
            events: 20_000,
            tenants: 1_000,
            handler_ms: 10,
            overhead_events: 200_000,
            isolation_events: 20_000,
            parked_events: 100_000,
            child: None,
        }
    }
}

/// Tenants of the isolation runs; `tenant-0` is the one that fails.
const ISOLATION_TENANTS: usize = 100;
const FAILING: &str = "tenant-0";

/// The results.
#[derive(Debug, Clone)]
pub struct ConsumeBenchReport {
    /// The options used.
    pub options: ConsumeBenchOptions,
    /// Ferry, parallelism run.
    pub ferry: Duration,
    /// One in flight, parallelism run.
    pub classic: Duration,
    /// The overhead run.
    pub overhead: Duration,
    /// The overhead run's records read by the broker's client alone (the ceiling).
    pub overhead_broker: Duration,
    /// Isolation: the healthy tenants' events, all tenants healthy.
    pub isolation_healthy: Duration,
    /// Isolation: the same events with one tenant failing every event.
    pub isolation_failing: Duration,
    /// Isolation: events parked for the failing tenant.
    pub isolation_parked: u64,
    /// Isolation: the longest the commit point stood still with records behind it.
    pub max_commit_lag: Duration,
    /// Memory: events parked.
    pub parked: u64,
    /// Memory: the run's elapsed time.
    pub parked_elapsed: Duration,
    /// Memory: the process's peak RSS over the run, in KiB.
    pub parked_peak_rss_kb: u64,
    /// Two integrations side by side on run 1's records, until both delivered every event.
    pub two_integrations: Duration,
}

impl ConsumeBenchReport {
    /// Ferry's speed-up over the classic in-order consumer.
    pub fn speedup(&self) -> f64 {
        self.classic.as_secs_f64() / self.ferry.as_secs_f64().max(1e-9)
    }

    /// Events per second of the overhead run.
    pub fn overhead_events_per_s(&self) -> f64 {
        self.options.overhead_events as f64 / self.overhead.as_secs_f64().max(1e-9)
    }

    /// Records per second the broker serves a plain consumer on the overhead run's topic.
    pub fn broker_events_per_s(&self) -> f64 {
        self.options.overhead_events as f64 / self.overhead_broker.as_secs_f64().max(1e-9)
    }

    /// The overhead run's rate against the broker's alone.
    pub fn overhead_ratio(&self) -> f64 {
        self.overhead_broker.as_secs_f64() / self.overhead.as_secs_f64().max(1e-9)
    }

    /// The healthy tenants' throughput with a failing tenant, against the all-healthy run.
    pub fn isolation_ratio(&self) -> f64 {
        self.isolation_healthy.as_secs_f64() / self.isolation_failing.as_secs_f64().max(1e-9)
    }

    /// Events per second of the two integrations together, against one integration's (run 1).
    pub fn two_integrations_ratio(&self) -> f64 {
        2.0 * self.ferry.as_secs_f64() / self.two_integrations.as_secs_f64().max(1e-9)
    }

    /// Peak RSS of the memory run in MB.
    pub fn parked_peak_rss_mb(&self) -> f64 {
        self.parked_peak_rss_kb as f64 / 1024.0
    }

    /// The table and the machine-readable last line.
    pub fn render(&self) -> String {
        let o = &self.options;
        let mut s = format!(
            "consume benchmark on {}\n\n\
             | run | events | tenants | handler | in flight | elapsed | events/s | ratio |\n\
             |---|---|---|---|---|---|---|---|\n",
            o.broker.describe()
        );
        for row in self.rows() {
            s.push_str(&row.render());
        }
        s.push_str(&format!(
            "\nisolation: with {FAILING} failing, a commit point rested on an event in flight for at most {} ms; \
             memory: peak RSS {:.1} MB while {} events were parked\n\n",
            self.max_commit_lag.as_millis(),
            self.parked_peak_rss_mb(),
            self.parked,
        ));
        s.push_str(&format!(
            "speedup={:.1} overhead_events_per_s={:.0} isolation_ratio={:.2} max_commit_lag_ms={} parked_peak_rss_mb={:.0} two_integrations_ratio={:.2}\n",
            self.speedup(),
            self.overhead_events_per_s(),
            self.isolation_ratio(),
            self.max_commit_lag.as_millis(),
            self.parked_peak_rss_mb(),
            self.two_integrations_ratio(),
        ));
        s
    }

    /// The table's rows, in the order printed.
    fn rows(&self) -> Vec<TableRow> {
        let o = &self.options;
        let healthy = healthy_events(o.isolation_events);
        let h = &format!("{} ms", o.handler_ms);
        let (n, t, big) = (o.events, o.tenants, o.overhead_events);
        let failing = format!("3. isolation, {FAILING} failing every event");
        let ratio = |r: f64| format!("{r:.2}x");
        let base = || "1.0x".to_owned();
        vec![
            TableRow::new("1. key-ordered (ferry)", n, t, self.ferry, n).cells(
                h,
                "256",
                format!("{:.1}x", self.speedup()),
            ),
            TableRow::new("1. classic in-order (baseline)", n, t, self.classic, n).cells(
                h,
                "1",
                base(),
            ),
            TableRow::new(
                "5. two integrations at once, each every event",
                2 * n,
                t,
                self.two_integrations,
                2 * n,
            )
            .cells(h, "256 each", ratio(self.two_integrations_ratio())),
            TableRow::new(
                "2. overhead, the broker's client alone (ceiling)",
                big,
                t,
                self.overhead_broker,
                big,
            )
            .cells("", "", base()),
            TableRow::new(
                "2. overhead (immediate handler)",
                big,
                t,
                self.overhead,
                big,
            )
            .cells("0 ms", "256", ratio(self.overhead_ratio())),
            TableRow::new(
                "3. isolation, all healthy (baseline)",
                healthy,
                ISOLATION_TENANTS,
                self.isolation_healthy,
                healthy,
            )
            .events_as(format!("{healthy} healthy"))
            .cells(h, "256", base()),
            TableRow::new(
                &failing,
                healthy,
                ISOLATION_TENANTS,
                self.isolation_failing,
                healthy,
            )
            .events_as(format!(
                "{healthy} healthy, {} parked",
                self.isolation_parked
            ))
            .cells(h, "256", ratio(self.isolation_ratio())),
            TableRow::new(
                "4. memory, one tenant paused",
                self.parked as usize,
                1,
                self.parked_elapsed,
                self.parked as usize,
            )
            .events_as(format!("{} parked", self.parked))
            .cells("", "", String::new()),
        ]
    }
}

/// One row of the consume benchmark's table.
struct TableRow {
    run: String,
    events: String,
    tenants: usize,
    handler: String,
    in_flight: &'static str,
    elapsed: Duration,
    /// The events the rate counts.
    counted: usize,
    /// Against the row's baseline ("1.0x" on the baseline); blank when the row has none.
    ratio: String,
}

impl TableRow {
    /// `run`, over `events` of `tenants`, took `elapsed` for `counted` of them (the rate's).
    fn new(run: &str, events: usize, tenants: usize, elapsed: Duration, counted: usize) -> Self {
        TableRow {
            run: run.to_owned(),
            events: events.to_string(),
            tenants,
            handler: String::new(),
            in_flight: "",
            elapsed,
            counted,
            ratio: String::new(),
        }
    }

    /// The events column as `label`, not the bare count.
    fn events_as(self, label: String) -> Self {
        TableRow {
            events: label,
            ..self
        }
    }

    /// The handler, in-flight and ratio columns.
    fn cells(self, handler: &str, in_flight: &'static str, ratio: String) -> Self {
        TableRow {
            handler: handler.to_owned(),
            in_flight,
            ratio,
            ..self
        }
    }

    fn render(&self) -> String {
        let rate = self.counted as f64 / self.elapsed.as_secs_f64().max(1e-9);
        let cells = [
            self.run.clone(),
            self.events.clone(),
            self.tenants.to_string(),
            self.handler.clone(),
            self.in_flight.to_owned(),
            format!("{:.2} s", self.elapsed.as_secs_f64()),
            format!("{rate:.0}"),
            self.ratio.clone(),
        ];
        let mut line = String::from("|");
        for cell in cells {
            // An empty cell is "| |", as in the table's other blank cells.
            if cell.is_empty() {
                line.push_str(" |");
            } else {
                line.push_str(&format!(" {cell} |"));
            }
        }
        line.push('\n');
        line
    }
}

/// Events of the isolation run that belong to the healthy tenants (all but `tenant-0`).
fn healthy_events(events: usize) -> usize {
    events - events.div_ceil(ISOLATION_TENANTS)
}

/// The benchmark's handler: takes `delay` per event; fails every event of `failing` with a 422.
struct Scripted {
    /// The integration it stands for.
    name: &'static str,
    delay: Duration,
    failing: Option<&'static str>,
    /// A tenant not counted in `healthy` (the isolation runs count the other tenants only).
    uncounted: Option<&'static str>,
    /// Events of the other tenants delivered.
    healthy: AtomicU64,
    /// When the first event reached the handler: runs are timed from there, so the group join
    /// (which varies by seconds on tansu) is not counted.
    first: std::sync::OnceLock<Instant>,
}

impl Scripted {
    fn new(delay: Duration, failing: Option<&'static str>) -> Self {
        Scripted {
            name: "bench",
            delay,
            failing,
            uncounted: failing,
            healthy: AtomicU64::new(0),
            first: std::sync::OnceLock::new(),
        }
    }
}

impl Handler for Scripted {
    fn integration(&self) -> &str {
        self.name
    }

    async fn handle(&self, event: &OutboxEvent, _attempt: &Attempt) -> Outcome {
        self.first.get_or_init(Instant::now);
        if Some(event.tenant_id.as_str()) == self.failing {
            return Outcome::Failed(Failure {
                class: FailureClass::Permanent,
                message: "partner answered 422: name is invalid".into(),
                status: Some(422),
                response: None,
                retry_after: None,
            });
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if Some(event.tenant_id.as_str()) != self.uncounted {
            self.healthy.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::Done
    }
}

/// Runs the four scenarios.
///
/// The isolation scenario times the healthy tenants' events from the first call to the
/// handler, in both runs.
pub async fn run(
    config: &Config,
    options: &ConsumeBenchOptions,
) -> Result<ConsumeBenchReport, BenchError> {
    let delay = Duration::from_millis(options.handler_ms);
    let mut config = config.clone();
    let started = options.broker.start(&mut config)?;
    let (config, mock) = (&config, started.mock());

    // 1. Key-ordered parallelism against one in flight.
    let topic = fill(config, mock, options.events, options.tenants, 1).await?;
    let ferry = consume_all(config, &topic, delay, 256, options.events).await?;
    let classic = consume_all(config, &topic, delay, 1, options.events).await?;
    // 5. The same records, two integrations at once.
    let two_integrations = side_by_side(config, &topic, delay, options.events).await?;

    // 2. Overhead, against what the broker serves a consumer that does nothing with the records.
    let big = fill(config, mock, options.overhead_events, options.tenants, 4).await?;
    let overhead_broker = read_alone(config, &big, options.overhead_events).await?;
    let overhead = consume_all(config, &big, Duration::ZERO, 256, options.overhead_events).await?;

    let isolation = isolation(config, mock, delay, options.isolation_events).await?;

    // 4. Memory: one tenant, paused at its first event, the rest parked as it arrives.
    let parked_topic = fill(config, mock, options.parked_events + 1, 1, 1).await?;
    let memory = match &options.child {
        None => parked(config, &parked_topic, options.parked_events).await?,
        Some(exe) => parked_in_child(exe, config, &parked_topic, options.parked_events).await?,
    };

    Ok(ConsumeBenchReport {
        options: options.clone(),
        ferry,
        classic,
        overhead,
        overhead_broker,
        isolation_healthy: isolation.healthy.elapsed,
        isolation_failing: isolation.failing.elapsed,
        isolation_parked: isolation.failing.stats.parked.load(Ordering::Relaxed),
        max_commit_lag: Duration::from_millis(
            isolation
                .failing
                .stats
                .commit_lag_max_ms
                .load(Ordering::Relaxed),
        ),
        parked: memory.parked,
        parked_elapsed: memory.elapsed,
        parked_peak_rss_kb: memory.peak_rss_kb,
        two_integrations,
    })
}

/// `topic`'s `events` consumed by a handler that takes `delay` each, every tenant healthy:
/// the time until the last is delivered.
async fn consume_all(
    config: &Config,
    topic: &str,
    delay: Duration,
    max_in_flight: usize,
    events: usize,
) -> Result<Duration, BenchError> {
    let handler = Scripted::new(delay, None);
    Ok(consume(
        config,
        topic,
        handler,
        max_in_flight,
        delivered(events),
        any,
    )
    .await?
    .elapsed)
}

/// Done once `n` events of the counted tenants are delivered.
fn delivered(n: usize) -> impl Fn(&ConsumeStats, &Scripted) -> bool {
    move |_: &ConsumeStats, h: &Scripted| h.healthy.load(Ordering::Relaxed) >= n as u64
}

/// Settled as soon as done.
fn any(_: &ConsumeStats, _: &Scripted) -> bool {
    true
}

/// The isolation scenario's two runs.
struct Isolation {
    healthy: Run,
    failing: Run,
}

/// 3. Isolation: the same records, all healthy, then with tenant-0 failing.
async fn isolation(
    config: &Config,
    mock: Option<&super::relay::Mock>,
    delay: Duration,
    events: usize,
) -> Result<Isolation, BenchError> {
    let healthy_events = healthy_events(events);
    let failing_events = (events - healthy_events) as u64;
    let mixed = fill(config, mock, events, ISOLATION_TENANTS, 1).await?;
    let baseline = Scripted {
        uncounted: Some(FAILING),
        ..Scripted::new(delay, None)
    };
    let done = delivered(healthy_events);
    let healthy = consume(config, &mixed, baseline, 256, done, any).await?;
    let failing = consume(
        config,
        &mixed,
        Scripted::new(delay, Some(FAILING)),
        256,
        delivered(healthy_events),
        // Run on until every event of the failing tenant is parked, so the commit lag covers it.
        move |s: &ConsumeStats, _: &Scripted| s.parked.load(Ordering::Relaxed) >= failing_events,
    )
    .await?;
    Ok(Isolation { healthy, failing })
}

/// The memory scenario's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParkedRun {
    /// Events parked.
    pub parked: u64,
    /// From the first event to the last parked.
    pub elapsed: Duration,
    /// The process's peak RSS over the run, in KiB.
    pub peak_rss_kb: u64,
}

impl ParkedRun {
    /// The line `ferry bench consume-parked` prints.
    pub fn to_line(&self) -> String {
        format!(
            "parked={} elapsed_ms={} peak_rss_kb={}",
            self.parked,
            self.elapsed.as_millis(),
            self.peak_rss_kb
        )
    }

    /// Reads [`ParkedRun::to_line`]'s line back.
    pub fn from_line(line: &str) -> Option<ParkedRun> {
        let mut fields = line.split(' ').map(|kv| kv.split_once('='));
        let mut next = |key: &str| match fields.next() {
            Some(Some((k, v))) if k == key => v.parse::<u64>().ok(),
            _ => None,
        };
        Some(ParkedRun {
            parked: next("parked")?,
            elapsed: Duration::from_millis(next("elapsed_ms")?),
            peak_rss_kb: next("peak_rss_kb")?,
        })
    }
}

/// The memory scenario in this process: consumes `topic` (one tenant, `parked_events + 1`
/// events) with that tenant failing its first event, until the rest are parked.
pub async fn parked(
    config: &Config,
    topic: &str,
    parked_events: usize,
) -> Result<ParkedRun, BenchError> {
    reset_peak_rss();
    let target = parked_events as u64;
    let run = consume(
        config,
        topic,
        Scripted::new(Duration::ZERO, Some(FAILING)),
        256,
        move |s: &ConsumeStats, _: &Scripted| s.parked.load(Ordering::Relaxed) > target,
        |_: &ConsumeStats, _: &Scripted| true,
    )
    .await?;
    Ok(ParkedRun {
        parked: run.stats.parked.load(Ordering::Relaxed),
        elapsed: run.elapsed,
        peak_rss_kb: peak_rss_kb(),
    })
}

/// The memory scenario in a process of its own: `exe bench consume-parked`.
async fn parked_in_child(
    exe: &std::path::Path,
    config: &Config,
    topic: &str,
    parked_events: usize,
) -> Result<ParkedRun, BenchError> {
    let output = tokio::process::Command::new(exe)
        .args(["bench", "consume-parked", "--topic", topic])
        .args(["--parked-events", &parked_events.to_string()])
        .env("FERRY_DATABASE_URL", &config.database.url)
        .env("FERRY_KAFKA_BROKERS", &config.kafka.brokers)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .map_err(|e| BenchError::Stalled(format!("starting {}: {e}", exe.display())))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .rev()
        .find_map(ParkedRun::from_line)
        .filter(|_| output.status.success())
        .ok_or_else(|| {
            BenchError::Stalled(format!(
                "the memory run ({}) failed with {}: {stdout}",
                exe.display(),
                output.status
            ))
        })
}

/// Resets the process's peak RSS to its current RSS (Linux 4.0+); elsewhere a no-op, and the
/// peak then covers the whole process life.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak RSS in KiB (`VmHWM`), 0 where unknown.
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A fresh topic holding `events` events round-robin over `tenants`.
async fn fill(
    config: &Config,
    mock: Option<&super::relay::Mock>,
    events: usize,
    tenants: usize,
    partitions: i32,
) -> Result<String, BenchError> {
    let topic = format!("ferry-bench-consume-{}", Uuid::new_v4().simple());
    let mut kafka = config.kafka.clone();
    kafka.topic = topic.clone();
    match mock {
        Some(mock) => mock.create_topic(&topic, partitions, 1)?,
        None => broker::ensure_topic(&kafka, &topic, partitions).await?,
    }
    let producer: FutureProducer = broker::producer_config(&kafka)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut pending = Vec::with_capacity(events);
    for n in 0..events {
        let tenant = format!("tenant-{}", n % tenants);
        let payload = EventPayload::ProductUpdated(proto::ProductUpdated {
            product: Some(proto::Product {
                id: format!("{tenant}-p"),
                name: format!("v{n}"),
                description: String::new(),
                price_minor: n as i64,
                currency: "EUR".into(),
            }),
        });
        let row = OutboxRow {
            id: Uuid::now_v7(),
            tenant_id: tenant,
            aggregate_type: "Product".into(),
            aggregate_id: n.to_string(),
            event_type: EventType::ProductUpdated.as_str().into(),
            payload: payload.encode_to_vec(),
            traceparent: None,
            created_at: chrono::Utc::now(),
            deliver_before: None,
            integration: None,
        };
        let r = WireRecord::from_row(&row, None);
        let delivery = producer
            .send_result(broker::future_record(&topic, &r))
            .map_err(|(e, _)| e)?;
        pending.push(delivery);
    }
    for d in pending {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e.into()),
            Err(_) => return Err(rdkafka::error::KafkaError::Canceled.into()),
        }
    }
    Ok(topic)
}

/// Reads `events` records of `topic` from the start with the consumer's own settings and a
/// group of its own, and nothing else (no decoding, no database, no commit): how fast the broker
/// serves them, timed from the first record as Ferry's runs are.
async fn read_alone(config: &Config, topic: &str, events: usize) -> Result<Duration, BenchError> {
    use rdkafka::Message as _;
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    let group = format!("ferry-bench-alone-{}", Uuid::new_v4().simple());
    let consumer: StreamConsumer = broker::consumer_config(&config.kafka, &group).create()?;
    consumer.subscribe(&[topic])?;
    let until = tokio::time::Instant::now() + Duration::from_secs(1_800);
    let (mut first, mut seen) = (None, 0usize);
    while seen < events {
        let message = tokio::time::timeout_at(until, consumer.recv())
            .await
            .map_err(|_| {
                BenchError::Stalled(format!("the broker served {seen} of {events} records"))
            })?;
        match message {
            Ok(m) => {
                first.get_or_insert_with(Instant::now);
                // Touch the record, so it is read as Ferry reads it.
                std::hint::black_box((m.key(), m.payload()));
                seen += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "kafka error while reading alone; librdkafka retries")
            }
        }
    }
    Ok(first.map_or(Duration::ZERO, |t| t.elapsed()))
}

/// One run's result.
struct Run {
    /// From the consumer's start until `done` first held.
    elapsed: Duration,
    stats: Arc<ConsumeStats>,
}

/// Consumes `topic` from the start with a fresh group and database: timed until `done` holds,
/// then run on until `settled` holds too.
async fn consume(
    config: &Config,
    topic: &str,
    handler: Scripted,
    max_in_flight: usize,
    done: impl Fn(&ConsumeStats, &Scripted) -> bool,
    settled: impl Fn(&ConsumeStats, &Scripted) -> bool,
) -> Result<Run, BenchError> {
    let (pool, url) = fresh_database(&config.database, "ferry_bench_consume").await?;
    let mut cfg = config.clone();
    cfg.database.url = url.clone();
    cfg.kafka.topic = topic.to_owned();
    cfg.kafka.group_id = format!("ferry-bench-{}", Uuid::new_v4().simple());
    let stats = Arc::new(ConsumeStats::default());
    let handler = Arc::new(handler);
    let stop = CancellationToken::new();
    let options = ConsumeOptions {
        max_in_flight,
        ..ConsumeOptions::default()
    };
    let task = tokio::spawn({
        let (pool, stats, stop, handler) = (
            pool.clone(),
            Arc::clone(&stats),
            stop.clone(),
            Arc::clone(&handler),
        );
        async move { runtime::run(&cfg, pool, handler, options, stats, stop).await }
    });
    let until = Instant::now() + Duration::from_secs(1_800);
    let mut elapsed = None;
    loop {
        if elapsed.is_none() && done(&stats, &handler) {
            elapsed = Some(handler.first.get().map_or(Duration::ZERO, Instant::elapsed));
        }
        if let Some(elapsed) = elapsed
            && settled(&stats, &handler)
        {
            stop.cancel();
            task.await
                .expect("consumer panicked")
                .map_err(|e| BenchError::Stalled(e.to_string()))?;
            pool.close().await;
            drop_database(&config.database, &url).await?;
            return Ok(Run { elapsed, stats });
        }
        if Instant::now() > until || task.is_finished() {
            return Err(BenchError::Stalled(
                "the consumer stopped before the run was complete".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Consumes `topic` from the start with two integrations at once, each a group of its own, in
/// one fresh database: from the first event either handler saw until both delivered `events`.
async fn side_by_side(
    config: &Config,
    topic: &str,
    delay: Duration,
    events: usize,
) -> Result<Duration, BenchError> {
    let (pool, url) = fresh_database(&config.database, "ferry_bench_consume").await?;
    let stop = CancellationToken::new();
    let mut running = Vec::new();
    for name in ["bench-a", "bench-b"] {
        let mut cfg = config.clone();
        cfg.database.url = url.clone();
        cfg.kafka.topic = topic.to_owned();
        cfg.kafka.group_id = format!("ferry-bench-{name}-{}", Uuid::new_v4().simple());
        let handler = Arc::new(Scripted {
            name,
            ..Scripted::new(delay, None)
        });
        let task = tokio::spawn({
            let (pool, stop, handler) = (pool.clone(), stop.clone(), Arc::clone(&handler));
            let stats = Arc::new(ConsumeStats::default());
            async move {
                runtime::run(&cfg, pool, handler, ConsumeOptions::default(), stats, stop).await
            }
        });
        running.push((handler, task));
    }
    let until = Instant::now() + Duration::from_secs(1_800);
    while !running
        .iter()
        .all(|(h, _)| h.healthy.load(Ordering::Relaxed) >= events as u64)
    {
        if Instant::now() > until || running.iter().any(|(_, t)| t.is_finished()) {
            return Err(BenchError::Stalled(
                "an integration stopped before it delivered every event".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let first = running
        .iter()
        .filter_map(|(h, _)| h.first.get().copied())
        .min();
    let elapsed = first.map_or(Duration::ZERO, |t| t.elapsed());
    stop.cancel();
    for (_, task) in running {
        task.await
            .expect("consumer panicked")
            .map_err(|e| BenchError::Stalled(e.to_string()))?;
    }
    pool.close().await;
    drop_database(&config.database, &url).await?;
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_runs_line_reads_back() {
        let run = ParkedRun {
            parked: 100_001,
            elapsed: Duration::from_millis(7_630),
            peak_rss_kb: 98_304,
        };
        assert_eq!(
            run.to_line(),
            "parked=100001 elapsed_ms=7630 peak_rss_kb=98304"
        );
        assert_eq!(ParkedRun::from_line(&run.to_line()), Some(run));
        assert_eq!(
            ParkedRun::from_line("parked=1 elapsed_ms=x peak_rss_kb=1"),
            None
        );
        assert_eq!(
            ParkedRun::from_line("2026-11-28 INFO partitions assigned"),
            None
        );
    }

    #[test]
    fn the_healthy_share_leaves_out_tenant_0s_events() {
        // Round-robin over 100 tenants: tenant-0 has events 0, 100, 200, ...
        assert_eq!(healthy_events(20_000), 19_800);
        assert_eq!(healthy_events(401), 396);
    }

    #[test]
    fn the_table_prints_each_run_with_its_rate_and_ratio() {
        let secs = Duration::from_secs_f64;
        let report = ConsumeBenchReport {
            options: ConsumeBenchOptions::default(),
            ferry: secs(2.0),
            classic: secs(20.0),
            overhead: secs(2.0),
            overhead_broker: secs(1.0),
            isolation_healthy: secs(1.98),
            isolation_failing: secs(2.2),
            isolation_parked: 200,
            max_commit_lag: Duration::from_millis(40),
            parked: 100_000,
            parked_elapsed: secs(5.0),
            parked_peak_rss_kb: 20 * 1024,
            two_integrations: secs(2.5),
        };
        let table = report.render();
        for row in [
            "| 1. key-ordered (ferry) | 20000 | 1000 | 10 ms | 256 | 2.00 s | 10000 | 10.0x |",
            "| 1. classic in-order (baseline) | 20000 | 1000 | 10 ms | 1 | 20.00 s | 1000 | 1.0x |",
            "| 5. two integrations at once, each every event | 40000 | 1000 | 10 ms | 256 each | 2.50 s | 16000 | 1.60x |",
            "| 2. overhead, the broker's client alone (ceiling) | 200000 | 1000 | | | 1.00 s | 200000 | 1.0x |",
            "| 2. overhead (immediate handler) | 200000 | 1000 | 0 ms | 256 | 2.00 s | 100000 | 0.50x |",
            "| 3. isolation, all healthy (baseline) | 19800 healthy | 100 | 10 ms | 256 | 1.98 s | 10000 | 1.0x |",
            "| 3. isolation, tenant-0 failing every event | 19800 healthy, 200 parked | 100 | 10 ms | 256 | 2.20 s | 9000 | 0.90x |",
            "| 4. memory, one tenant paused | 100000 parked | 1 | | | 5.00 s | 20000 | |",
        ] {
            assert!(
                table.contains(&format!("{row}\n")),
                "{row} missing from\n{table}"
            );
        }
        assert!(table.ends_with(
            "speedup=10.0 overhead_events_per_s=100000 isolation_ratio=0.90 max_commit_lag_ms=40 parked_peak_rss_mb=20 two_integrations_ratio=1.60\n"
        ));
    }
}
