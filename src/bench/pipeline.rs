//! `ferry bench pipeline`: the demo's whole pipeline at a steady write rate, and where its time
//! and processor go.
//!
//! On a database and a topic of its own, the benchmark starts the partner simulator, the relay
//! and `consumers` instances of `ferry consume` running an integration file (the shop's by
//! default), all as processes of their own, from this executable or `--children`; every tenant
//! has the integration on. A warm-up writes a few hundred changes and waits until they are
//! delivered (the consumers have joined and are caught up). Then `ferry load`, a process of its
//! own, writes `rate` changes/s for `seconds`, and the window lasts until every one of them is
//! settled. Over the window:
//!
//! - **CPU** per process, from `/proc` ([`super::cpu`]): the relay, each consumer, the
//!   simulator, the writer, the broker (the local process listening where `kafka.brokers`
//!   points), and Postgres split by who caused the work: each backend is labelled by its
//!   session's `application_name` (the children are started with their own) or its type (the
//!   relay's WAL sender, the server's background processes).
//! - **Statements** from `pg_stat_statements` (when the server loads it): calls per event and
//!   database time per 1,000 events, the round trips that cost the database its time.
//! - **Latency** from the outbox commit: to the partner's acknowledgement for healthy tenants
//!   (`ferry verify`'s figure), against a reader in this process that does nothing but read
//!   the topic with the consumers' own client settings (the relay's and the broker's share
//!   alone). The difference is the consumers'.
//!
//! The last line is machine-readable.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::cpu::{self, CpuLedger, Reading};
use super::statements::{self, Statement};
use super::{BenchError, drop_database, fresh_database};
use crate::broker;
use crate::config::Config;
use crate::partner::verify::{self, Latency};

/// What to run.
#[derive(Debug, Clone)]
pub struct PipelineBenchOptions {
    /// Changes written per second.
    pub rate: f64,
    /// For how long.
    pub seconds: f64,
    /// Distinct tenants.
    pub tenants: usize,
    /// `ferry consume` instances.
    pub consumers: usize,
    /// Partitions of the run's topic.
    pub partitions: i32,
    /// The integration file the consumers run.
    pub integration: PathBuf,
    /// The `ferry` executable the relay, the consumers, the simulator and the writer are
    /// started from (another build of Ferry, to compare two side by side).
    pub children: PathBuf,
    /// The `ferry` executable `ferry load` (the application's writer) is started from: this
    /// build's, whichever build the pipeline's processes come from.
    pub writer: PathBuf,
    /// The configuration file this run was given, passed on to the children.
    pub config_file: Option<PathBuf>,
    /// Changes of the warm-up.
    pub warm_up: usize,
    /// The environment variables the integration file reads, set to the simulator's token
    /// for the children (filled in by [`run`]).
    pub secrets: Vec<String>,
}

impl PipelineBenchOptions {
    /// Changes the window writes.
    pub fn events(&self) -> usize {
        (self.rate * self.seconds).round() as usize
    }
}

/// Who spent the window's processor time, in CPU-seconds.
#[derive(Debug, Clone, Default)]
pub struct CpuReport {
    /// Per label, in the report's order.
    pub rows: Vec<(String, f64)>,
    /// The labels that make Ferry's own cost.
    pub ferry: Vec<String>,
    /// The machine's busy CPU-seconds over every core.
    pub machine_busy: f64,
    /// Its busy and idle CPU-seconds.
    pub machine_total: f64,
    /// Why Postgres is not split (a server on another machine), if it is not.
    pub postgres_unseen: Option<String>,
}

impl CpuReport {
    /// Ferry's own CPU-seconds: its processes and the database work they cause.
    pub fn ferry_seconds(&self) -> f64 {
        self.rows
            .iter()
            .filter(|(label, _)| self.ferry.contains(label))
            .map(|(_, s)| s)
            .sum()
    }
}

/// The run's results.
#[derive(Debug, Clone)]
pub struct PipelineReport {
    /// The options used.
    pub options: PipelineBenchOptions,
    /// Changes written in the window.
    pub events: u64,
    /// How long the writer took.
    pub writing: Duration,
    /// From the writer's start to the last settlement.
    pub window: Duration,
    /// Processor time.
    pub cpu: CpuReport,
    /// The costliest statements, if `pg_stat_statements` is loaded.
    pub statements: Option<Vec<Statement>>,
    /// Commit to the partner's acknowledgement.
    pub delivered: Latency,
    /// Commit to the do-nothing reader, sorted, in milliseconds.
    pub read_ms: Vec<f64>,
    /// Requests the partner simulator received in the window, per event.
    pub partner_calls: f64,
    /// Order violations the simulator saw.
    pub order_violations: u64,
    /// Duplicate objects it holds.
    pub duplicates: u64,
}

/// The `q` quantile (0..=1) of sorted values; 0 when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Runs the pipeline once.
pub async fn run(
    config: &Config,
    options: &PipelineBenchOptions,
) -> Result<PipelineReport, BenchError> {
    // Every variable the file reads (its partner's token) holds the simulator's token, for
    // the children too.
    let read = std::cell::RefCell::new(Vec::new());
    let spec = crate::partner::spec::Spec::load_with(&options.integration, |name| {
        read.borrow_mut().push(name.to_owned());
        Some(SIM_TOKEN.to_owned())
    })
    .map_err(|e| BenchError::Setup(format!("{}: {e}", options.integration.display())))?;
    let mut options = options.clone();
    options.secrets = read.into_inner();
    let options = &options;
    let (pool, url) = fresh_database(&config.database, "ferry_bench_pipeline").await?;
    let result = Pipeline::prepare(config, options, &pool, &url, &spec.name)
        .await
        .map(Box::new);
    let report = match result {
        Ok(mut pipeline) => {
            let report = pipeline.measure().await;
            pipeline.processes.stop().await;
            // The processes' logs are kept only when the run failed (its error names them).
            if report.is_ok() {
                let _ = std::fs::remove_dir_all(&pipeline.processes.logs);
            }
            report
        }
        Err(e) => Err(e),
    };
    pool.close().await;
    drop_database(&config.database, &url).await?;
    report
}

/// One run's moving parts.
struct Pipeline {
    options: PipelineBenchOptions,
    pool: PgPool,
    integration: String,
    processes: Processes,
    reader: Reader,
    sim_url: String,
    statements: bool,
}

const SIM_TOKEN: &str = "bench-token";
const ADMIN_TOKEN: &str = "bench-admin-token";

impl Pipeline {
    /// The database, topic and slot of the run, its tenants on, its processes started.
    async fn prepare(
        config: &Config,
        options: &PipelineBenchOptions,
        pool: &PgPool,
        url: &str,
        integration: &str,
    ) -> Result<Pipeline, BenchError> {
        let statements = statements::enable(pool).await;
        let run_id = Uuid::new_v4().simple().to_string();
        let mut cfg = config.clone();
        cfg.database.url = url.to_owned();
        cfg.kafka.topic = format!("ferry-bench-pipeline-{run_id}");
        cfg.kafka.group_id = format!("ferry-bench-pipeline-{run_id}");
        cfg.relay.slot = format!("ferry_bench_{run_id}");
        cfg.relay.publication = format!("ferry_bench_{run_id}");
        broker::ensure_topic(&cfg.kafka, &cfg.kafka.topic, options.partitions).await?;
        // The slot exists before anything is written: every change is captured.
        crate::relay::Relay::connect(&cfg).await?.setup().await?;
        crate::shop::create_tables(pool).await?;
        sqlx::query(
            "INSERT INTO tenants (integration, tenant_id, integration_enabled) \
             SELECT $1, 'tenant-' || n, true FROM generate_series(0, $2 - 1) AS n",
        )
        .bind(integration)
        .bind(options.tenants as i32)
        .execute(pool)
        .await?;
        let reader = Reader::start(&cfg, options.partitions)?;
        let mut processes = Processes::start(&cfg, options, &run_id).await?;
        processes.group_settled(options.partitions as usize).await?;
        Ok(Pipeline {
            options: options.clone(),
            pool: pool.clone(),
            integration: integration.to_owned(),
            sim_url: processes.sim_url.clone(),
            processes,
            reader,
            statements,
        })
    }

    /// The warm-up, then the measured window.
    async fn measure(&mut self) -> Result<PipelineReport, BenchError> {
        self.processes
            .load(self.options.warm_up, self.options.rate, 1)
            .await?;
        // `ferry load` writes about as many as it is asked (its writers share the tenants):
        // what it wrote is what is waited for.
        let warm_up = self.written(None).await?;
        self.settled(None, warm_up).await?;
        self.reader.wait_for(warm_up).await?;
        let before = partner_requests(&self.sim_url).await?;

        if self.statements {
            statements::reset(&self.pool).await?;
        }
        let since = Utc::now();
        self.reader.window_from(since);
        let sampler = Sampler::start(&self.processes, &self.pool).await?;
        let started = Instant::now();
        self.processes
            .load(self.options.events(), self.options.rate, 7)
            .await
            .inspect_err(|_| sampler.stop.cancel())?;
        let writing = started.elapsed();
        let events = self.written(Some(since)).await?;
        let settled = self.settled(Some(since), events).await;
        let window = started.elapsed();
        let cpu = sampler.finish().await;
        settled?;
        let read_ms = self.reader.finish(events).await?;
        let statements = match self.statements {
            true => Some(statements::read(&self.pool).await?),
            false => None,
        };
        let delivered = verify::latency(&self.pool, &self.integration, Some(since)).await?;
        let after = partner_requests(&self.sim_url).await?;
        Ok(PipelineReport {
            options: self.options.clone(),
            events,
            writing,
            window,
            cpu,
            statements,
            delivered,
            read_ms,
            partner_calls: (after.requests - before.requests) as f64 / events.max(1) as f64,
            order_violations: after.order_violations,
            duplicates: after.duplicates,
        })
    }

    /// The changes written to the outbox since `since` (or at all).
    async fn written(&self, since: Option<DateTime<Utc>>) -> Result<u64, BenchError> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM outbox WHERE ($1::timestamptz IS NULL OR created_at >= $1)",
        )
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }

    /// Waits until `n` events written since `since` (or at all) are settled.
    async fn settled(&mut self, since: Option<DateTime<Utc>>, n: u64) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs_f64(self.options.seconds + 180.0);
        loop {
            let (settled,): (i64,) = sqlx::query_as(
                "SELECT /* ferry bench */ count(*) FROM deliveries WHERE integration = $1 \
                 AND settled_at IS NOT NULL AND ($2::timestamptz IS NULL OR written_at >= $2)",
            )
            .bind(&self.integration)
            .bind(since)
            .fetch_one(&self.pool)
            .await?;
            if settled as u64 >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Stalled(format!(
                    "{settled} of {n} events settled in time (the processes' logs: {})",
                    self.processes.logs.display()
                )));
            }
            self.processes.check_alive()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The run's processes, each a child of this one, killed when dropped.
struct Processes {
    children: Vec<(String, tokio::process::Child)>,
    binary: PathBuf,
    /// Tenants `ferry load` writes for.
    tenants: usize,
    /// Where `ferry load` comes from.
    writer: PathBuf,
    /// Every process started, labelled, for the CPU sampler.
    pids: Arc<Mutex<Vec<(String, i32)>>>,
    /// Where the broker listens (`kafka.brokers`' first), to find its process.
    broker_address: String,
    /// Each consumer's admin API.
    admins: Vec<String>,
    env: Vec<(String, String)>,
    logs: PathBuf,
    sim_url: String,
}

impl Processes {
    /// The simulator, the relay and the consumers, each with its own session name, so their
    /// Postgres backends can be told apart.
    async fn start(
        cfg: &Config,
        options: &PipelineBenchOptions,
        run_id: &str,
    ) -> Result<Processes, BenchError> {
        let logs = std::env::temp_dir().join(format!("ferry-bench-pipeline-{run_id}"));
        std::fs::create_dir_all(&logs).map_err(|e| BenchError::Setup(e.to_string()))?;
        let sim_port = free_port()?;
        let sim_url = format!("http://127.0.0.1:{sim_port}");
        let mut env = vec![
            ("FERRY_KAFKA_BROKERS".into(), cfg.kafka.brokers.clone()),
            ("FERRY_KAFKA_TOPIC".into(), cfg.kafka.topic.clone()),
            ("FERRY_KAFKA_GROUP_ID".into(), cfg.kafka.group_id.clone()),
            ("FERRY_RELAY_SLOT".into(), cfg.relay.slot.clone()),
            (
                "FERRY_RELAY_PUBLICATION".into(),
                cfg.relay.publication.clone(),
            ),
            ("FERRY_PARTNER_URL".into(), sim_url.clone()),
            ("FERRY_PARTNER_TOKEN".into(), SIM_TOKEN.into()),
            ("FERRY_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            (
                "FERRY_CONSUME_INTEGRATION".into(),
                options.integration.display().to_string(),
            ),
            ("RUST_LOG".into(), "warn".into()),
        ];
        env.extend(
            options
                .secrets
                .iter()
                .map(|v| (v.clone(), SIM_TOKEN.to_owned())),
        );
        if let Some(file) = &options.config_file {
            env.push(("FERRY_CONFIG".into(), file.display().to_string()));
        }
        let mut processes = Processes {
            children: Vec::new(),
            binary: options.children.clone(),
            tenants: options.tenants,
            writer: options.writer.clone(),
            pids: Arc::default(),
            broker_address: broker_address(&cfg.kafka.brokers),
            admins: Vec::new(),
            env,
            logs,
            sim_url,
        };
        let addr = format!("127.0.0.1:{sim_port}");
        processes.spawn("partner simulator", &["partner-sim", "--addr", &addr], &[])?;
        let url = |name: &str| session_url(&cfg.database.url, name);
        processes.spawn(
            "relay",
            &["relay"],
            &[("FERRY_DATABASE_URL", url("ferry-relay"))],
        )?;
        for n in 1..=options.consumers {
            let admin = format!("127.0.0.1:{}", free_port()?);
            processes.admins.push(admin.clone());
            let env = [
                ("FERRY_DATABASE_URL", url("ferry-consume")),
                ("FERRY_ADMIN_ADDR", admin),
            ];
            processes.spawn(&format!("consumer {n}"), &["consume"], &env)?;
        }
        processes.env.push((
            "FERRY_DATABASE_URL".into(),
            url(statements::APPLICATION_SESSION),
        ));
        Ok(processes)
    }

    fn spawn(
        &mut self,
        label: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> Result<(), BenchError> {
        let log = |suffix: &str| {
            std::fs::File::create(
                self.logs
                    .join(format!("{}.{suffix}", label.replace(' ', "-"))),
            )
            .map_err(|e| BenchError::Setup(e.to_string()))
        };
        let child = tokio::process::Command::new(&self.binary)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(log("out")?)
            .stderr(log("log")?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::Setup(format!("{}: {e}", self.binary.display())))?;
        self.register(label, &child);
        self.children.push((label.to_owned(), child));
        Ok(())
    }

    /// `ferry load` writing `events` changes at `rate`, to its end. The writer is the
    /// application, not the Ferry under test: the same build whatever `--children` says.
    async fn load(&self, events: usize, rate: f64, seed: u64) -> Result<(), BenchError> {
        let mut child = tokio::process::Command::new(&self.writer)
            .args(["load", "--tenants"])
            .arg(self.tenants.to_string())
            .args(["--events", &events.to_string(), "--rate", &rate.to_string()])
            .args(["--seed", &seed.to_string()])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::Setup(format!("ferry load: {e}")))?;
        self.register("writer (ferry load)", &child);
        let status = child
            .wait()
            .await
            .map_err(|e| BenchError::Setup(format!("ferry load: {e}")))?;
        if !status.success() {
            return Err(BenchError::Stalled(format!(
                "ferry load exited with {status}"
            )));
        }
        Ok(())
    }

    /// An error naming the first child that exited.
    fn check_alive(&mut self) -> Result<(), BenchError> {
        for (label, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BenchError::Stalled(format!(
                    "the {label} exited with {status} (its log: {})",
                    self.logs.display()
                )));
            }
        }
        Ok(())
    }

    /// Waits until every consumer owns partitions and they own all `partitions` between them:
    /// the group is settled, so no rebalance hands the window's records to a new owner (which
    /// would handle them as possibly handled before).
    async fn group_settled(&mut self, partitions: usize) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let http = reqwest::Client::new();
        loop {
            let mut owned = Vec::new();
            for admin in &self.admins {
                let view: Option<serde_json::Value> = match http
                    .get(format!("http://{admin}/v1/partitions"))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                {
                    Ok(r) => r.json().await.ok(),
                    Err(_) => None,
                };
                let n = view
                    .and_then(|v| Some(v.get("data")?.as_array()?.len()))
                    .unwrap_or(0);
                owned.push(n);
            }
            if owned.iter().all(|n| *n > 0) && owned.iter().sum::<usize>() == partitions {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Stalled(format!(
                    "the consumers' group did not settle: partitions owned {owned:?} of {partitions}"
                )));
            }
            self.check_alive()?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn register(&self, label: &str, child: &tokio::process::Child) {
        if let Some(pid) = child.id() {
            let mut pids = self.pids.lock().expect("the pid list");
            pids.push((label.to_owned(), pid as i32));
        }
    }

    async fn stop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill().await;
        }
    }
}

/// `url` with its sessions named `name` (`application_name`), which Ferry keeps.
fn session_url(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

/// The first of `brokers` as it appears in a broker's command line (`tcp://host:port`).
fn broker_address(brokers: &str) -> String {
    let first = brokers.split(',').next().unwrap_or_default().trim();
    first
        .split_once("://")
        .map_or(first, |(_, address)| address)
        .to_owned()
}

fn free_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::Setup(format!("no free port: {e}")))
}

/// What the simulator saw, over every account.
struct PartnerTotals {
    requests: u64,
    order_violations: u64,
    duplicates: u64,
}

async fn partner_requests(sim_url: &str) -> Result<PartnerTotals, BenchError> {
    let report: serde_json::Value = reqwest::Client::new()
        .get(format!("{sim_url}/_sim/report"))
        .bearer_auth(SIM_TOKEN)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| BenchError::Setup(format!("the simulator's report: {e}")))?
        .json()
        .await
        .map_err(|e| BenchError::Setup(format!("the simulator's report: {e}")))?;
    let sum = |field: &str| {
        report
            .as_object()
            .map(|accounts| {
                accounts
                    .values()
                    .filter_map(|a| a.get(field)?.as_u64())
                    .sum()
            })
            .unwrap_or(0)
    };
    Ok(PartnerTotals {
        requests: sum("requests"),
        order_violations: sum("order_violations"),
        duplicates: sum("duplicate_objects"),
    })
}

/// A reader of the topic that does nothing else: the commit-to-read latency of the relay and
/// the broker alone.
struct Reader {
    stop: CancellationToken,
    read: Arc<AtomicU64>,
    since_ms: Arc<AtomicI64>,
    task: Option<tokio::task::JoinHandle<Result<Vec<f64>, BenchError>>>,
}

impl Reader {
    fn start(cfg: &Config, partitions: i32) -> Result<Reader, BenchError> {
        // The consumers' own settings (their fetch wait above all: librdkafka's default of
        // 500 ms, which tansu holds a fetch for, would be the reader's and not theirs).
        let group = format!("{}-reader", cfg.kafka.group_id);
        let consumer: StreamConsumer = broker::consumer_config(&cfg.kafka, &group).create()?;
        // Assigned, not subscribed: no group join to wait for.
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&cfg.kafka.topic, p, rdkafka::Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let stop = CancellationToken::new();
        let read = Arc::new(AtomicU64::new(0));
        let since_ms = Arc::new(AtomicI64::new(i64::MAX));
        let task = tokio::spawn(read_until(
            consumer,
            stop.clone(),
            read.clone(),
            since_ms.clone(),
        ));
        Ok(Reader {
            stop,
            read,
            since_ms,
            task: Some(task),
        })
    }

    /// Records written from `since` on are the window's.
    fn window_from(&self, since: DateTime<Utc>) {
        self.read.store(0, Ordering::SeqCst);
        self.since_ms
            .store(since.timestamp_millis(), Ordering::SeqCst);
    }

    async fn wait_for(&self, n: u64) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.read.load(Ordering::SeqCst) < n {
            if Instant::now() > deadline || self.task.as_ref().is_none_or(|t| t.is_finished()) {
                return Err(BenchError::Stalled(format!(
                    "the reader read {} of {n} records in time",
                    self.read.load(Ordering::SeqCst)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The window's latencies, sorted, once `n` records are read.
    async fn finish(&mut self, n: u64) -> Result<Vec<f64>, BenchError> {
        self.wait_for(n).await?;
        self.stop.cancel();
        let task = self.task.take().expect("the reader finishes once");
        let mut ms = task
            .await
            .map_err(|e| BenchError::Stalled(format!("the reader: {e}")))??;
        ms.sort_by(f64::total_cmp);
        Ok(ms)
    }
}

async fn read_until(
    consumer: StreamConsumer,
    stop: CancellationToken,
    read: Arc<AtomicU64>,
    since_ms: Arc<AtomicI64>,
) -> Result<Vec<f64>, BenchError> {
    let mut latencies = Vec::new();
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return Ok(latencies),
            m = consumer.recv() => m?,
        };
        let now_ms = Utc::now().timestamp_micros() as f64 / 1000.0;
        let Some(committed_ms) = message.timestamp().to_millis() else {
            continue;
        };
        if committed_ms >= since_ms.load(Ordering::SeqCst) {
            latencies.push((now_ms - committed_ms as f64).max(0.0));
            read.fetch_add(1, Ordering::SeqCst);
        } else if since_ms.load(Ordering::SeqCst) == i64::MAX {
            read.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The labels whose CPU is Ferry's own cost (besides the consumers, each labelled
/// `consumer N`).
const FERRY_LABELS: [&str; 5] = [
    "relay",
    POSTGRES_DECODING,
    "postgres: the relay's sessions",
    "postgres: the consumers' statements",
    POSTGRES_UNNAMED,
];
/// Sessions of a Ferry that names them all `ferry` (one built before its sessions took the
/// name the URL gives): the relay's and the consumers' together.
const POSTGRES_UNNAMED: &str = "postgres: Ferry's sessions, not told apart";
const POSTGRES_DECODING: &str = "postgres: relay decoding (WAL sender)";
const POSTGRES_APPLICATION: &str = "postgres: the application's writes";
const POSTGRES_BACKGROUND: &str = "postgres: background (WAL writer, checkpointer, autovacuum)";
const POSTGRES_BENCH: &str = "postgres: this benchmark's queries";

/// Who caused a Postgres backend's work: by its type, and for sessions of the run's database
/// by the `application_name` its process gave; `None` for another database's sessions.
pub fn postgres_label(
    backend_type: &str,
    application: &str,
    this_database: Option<bool>,
) -> Option<&'static str> {
    match (this_database, backend_type) {
        (Some(true), "walsender") => Some(POSTGRES_DECODING),
        (Some(true), "client backend") => Some(if application.starts_with("ferry-relay") {
            "postgres: the relay's sessions"
        } else if application == "ferry-consume" {
            "postgres: the consumers' statements"
        } else if application == statements::APPLICATION_SESSION {
            POSTGRES_APPLICATION
        } else if application == "ferry" {
            POSTGRES_UNNAMED
        } else {
            POSTGRES_BENCH
        }),
        (Some(false), _) => None,
        // Autovacuum of this database, and the server's own processes (no database).
        (_, "client backend") => None,
        _ => Some(POSTGRES_BACKGROUND),
    }
}

/// Samples the CPU of every process of the run, four times a second, until stopped.
struct Sampler {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<CpuReport>,
}

type Backend = (i32, Option<String>, Option<String>, Option<bool>);

impl Sampler {
    async fn start(processes: &Processes, pool: &PgPool) -> Result<Sampler, BenchError> {
        let pids = processes.pids.clone();
        let pool = pool.clone();
        let broker = cpu::find_process(&[processes.broker_address.as_str()]);
        let own_backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&pool)
            .await?;
        let postgres_seen = cpu::ticks_of(own_backend).is_some();
        let stop = CancellationToken::new();
        let until = stop.clone();
        let task = tokio::spawn(async move {
            let mut ledger = CpuLedger::default();
            let machine_before = cpu::machine_ticks();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                let stopping = tokio::select! {
                    _ = until.cancelled() => true,
                    _ = tick.tick() => false,
                };
                let mut readings = children_readings(&pids, broker);
                if postgres_seen {
                    readings.extend(postgres_readings(&pool).await);
                }
                ledger.sample(readings);
                if stopping {
                    break;
                }
            }
            cpu_report(&ledger, machine_before, cpu::machine_ticks(), postgres_seen)
        });
        Ok(Sampler { stop, task })
    }

    async fn finish(self) -> CpuReport {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

fn children_readings(pids: &Mutex<Vec<(String, i32)>>, broker: Option<i32>) -> Vec<Reading> {
    let pids = pids.lock().expect("the pid list").clone();
    let broker = broker.map(|pid| ("broker".to_owned(), pid));
    pids.into_iter()
        .chain(broker)
        .filter_map(|(label, pid)| {
            Some(Reading {
                pid,
                label,
                ticks: cpu::ticks_of(pid)?,
            })
        })
        .collect()
}

async fn postgres_readings(pool: &PgPool) -> Vec<Reading> {
    let backends: Vec<Backend> = sqlx::query_as(
        "SELECT pid, backend_type, application_name, datname = current_database() \
         FROM pg_stat_activity",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    backends
        .into_iter()
        .filter_map(|(pid, kind, application, here)| {
            let label = postgres_label(
                kind.as_deref().unwrap_or_default(),
                application.as_deref().unwrap_or_default(),
                here,
            )?;
            Some(Reading {
                pid,
                label: label.to_owned(),
                ticks: cpu::ticks_of(pid)?,
            })
        })
        .collect()
}

fn cpu_report(
    ledger: &CpuLedger,
    before: Option<(u64, u64)>,
    after: Option<(u64, u64)>,
    postgres_seen: bool,
) -> CpuReport {
    let tick = cpu::seconds_per_tick();
    let by_label = ledger.by_label();
    let (machine_busy, machine_total) = match (before, after) {
        (Some((b0, t0)), Some((b1, t1))) => ((b1 - b0) as f64 * tick, (t1 - t0) as f64 * tick),
        _ => (0.0, 0.0),
    };
    let mut ferry: Vec<String> = FERRY_LABELS.iter().map(|l| (*l).to_owned()).collect();
    ferry.extend(
        by_label
            .keys()
            .filter(|l| l.starts_with("consumer"))
            .cloned(),
    );
    let rows = by_label
        .iter()
        .map(|(label, ticks)| (label.clone(), *ticks as f64 * tick))
        .collect();
    CpuReport {
        rows,
        ferry,
        machine_busy,
        machine_total,
        postgres_unseen: (!postgres_seen)
            .then(|| "Postgres runs where this benchmark cannot read its processes".to_owned()),
    }
}

impl PipelineReport {
    /// Ferry's own CPU per event, milliseconds (CPU-seconds per 1,000 events).
    pub fn ferry_ms_per_event(&self) -> f64 {
        self.cpu.ferry_seconds() * 1000.0 / self.events.max(1) as f64
    }

    /// The share of the machine's cores left idle over the window.
    pub fn idle_share(&self) -> f64 {
        1.0 - self.cpu.machine_busy / self.cpu.machine_total.max(1e-9)
    }

    /// The tables and the machine-readable last line.
    pub fn render(&self) -> String {
        let o = &self.options;
        let mut s = format!(
            "pipeline: {} changes/s for {} s, {} tenants, {} consumers, {} partitions, integration {}\n\
             written: {} changes in {:.1} s ({:.0}/s); all settled {:.1} s after the first write\n\n",
            o.rate,
            o.seconds,
            o.tenants,
            o.consumers,
            o.partitions,
            o.integration.display(),
            self.events,
            self.writing.as_secs_f64(),
            self.events as f64 / self.writing.as_secs_f64().max(1e-9),
            self.window.as_secs_f64(),
        );
        s.push_str(&self.render_cpu());
        s.push_str(&self.render_statements());
        s.push_str(&self.render_latency());
        s.push_str(&self.to_line());
        s
    }

    fn render_cpu(&self) -> String {
        let per_1000 = |secs: f64| secs * 1000.0 / self.events.max(1) as f64;
        let cores = self.cpu.machine_total / self.window.as_secs_f64().max(1e-9);
        let mut s = String::from(
            "| process | CPU s | CPU s per 1,000 events | share of the machine |\n|---|---|---|---|\n",
        );
        let mut row = |label: &str, secs: f64| {
            s.push_str(&format!(
                "| {label} | {secs:.2} | {:.3} | {:.1}% |\n",
                per_1000(secs),
                100.0 * secs / self.cpu.machine_total.max(1e-9)
            ));
        };
        let (ours, others): (Vec<_>, Vec<_>) = self
            .cpu
            .rows
            .iter()
            .partition(|(label, _)| self.cpu.ferry.contains(label));
        for (label, secs) in ours {
            row(label, *secs);
        }
        row(
            "**Ferry's own** (target: 0.5 per 1,000)",
            self.cpu.ferry_seconds(),
        );
        for (label, secs) in others {
            row(label, *secs);
        }
        row("machine, busy", self.cpu.machine_busy);
        s.push_str(&format!(
            "\n{:.1} cores over {:.1} s; idle {:.0}% of them\n",
            cores,
            self.window.as_secs_f64(),
            100.0 * self.idle_share()
        ));
        if let Some(why) = &self.cpu.postgres_unseen {
            s.push_str(&format!("Postgres is not split: {why}\n"));
        }
        s.push('\n');
        s
    }

    fn render_statements(&self) -> String {
        let Some(statements) = &self.statements else {
            return "statements: pg_stat_statements is not loaded by this server \
                    (shared_preload_libraries), so the database's time is not split\n\n"
                .to_owned();
        };
        let events = self.events.max(1) as f64;
        let mut s = String::from(
            "| statement (pg_stat_statements, costliest first) | who | calls per event | executing, ms per 1,000 events | planning, ms per 1,000 events | mean ms |\n|---|---|---|---|---|---|\n",
        );
        for st in statements.iter().take(12) {
            s.push_str(&format!(
                "| `{}` | {} | {:.2} | {:.0} | {:.0} | {:.3} |\n",
                st.short(70).replace('|', "\\|"),
                st.who(),
                st.calls as f64 / events,
                st.total_ms * 1000.0 / events,
                st.plan_ms * 1000.0 / events,
                (st.total_ms + st.plan_ms) / st.calls.max(1) as f64
            ));
        }
        let consumers: Vec<&Statement> = statements
            .iter()
            .filter(|st| st.who() == "consumers")
            .collect();
        s.push_str(&format!(
            "\nthe consumers' statements: {:.2} per event, {:.3} ms of database time per event (planning included)\n\n",
            consumers.iter().map(|st| st.calls).sum::<i64>() as f64 / events,
            consumers
                .iter()
                .map(|st| st.total_ms + st.plan_ms)
                .sum::<f64>()
                / events
        ));
        s
    }

    fn render_latency(&self) -> String {
        let d = &self.delivered;
        let r = &self.read_ms;
        let mut s = String::from(
            "| latency from the outbox commit | events | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n",
        );
        s.push_str(&format!(
            "| to a reader that does nothing else (the relay and the broker) | {} | {:.0} | {:.0} | {:.0} |\n",
            r.len(),
            quantile(r, 0.5),
            quantile(r, 0.99),
            quantile(r, 1.0)
        ));
        s.push_str(&format!(
            "| to the partner's acknowledgement (healthy tenants) | {} | {:.0} | {:.0} | {:.0} |\n",
            d.healthy, d.p50_ms, d.p99_ms, d.max_ms
        ));
        s.push_str(&format!(
            "| the consumers' share (difference; target: p50 +20, p99 +100) | | {:+.0} | {:+.0} | |\n",
            d.p50_ms - quantile(r, 0.5),
            d.p99_ms - quantile(r, 0.99)
        ));
        s.push_str(&format!(
            "\npartner calls per event: {:.2}; order violations {}, duplicate objects {} (the simulator's count)\n\n",
            self.partner_calls, self.order_violations, self.duplicates
        ));
        s
    }

    /// The machine-readable last line.
    pub fn to_line(&self) -> String {
        let r = &self.read_ms;
        let d = &self.delivered;
        format!(
            "rate={} seconds={} events={} written_per_s={:.0} ferry_cpu_ms_per_event={:.3} idle_share={:.2} \
             e2e_p50_ms={:.0} e2e_p99_ms={:.0} e2e_max_ms={:.0} broker_p50_ms={:.0} broker_p99_ms={:.0} \
             broker_max_ms={:.0} over_broker_p50_ms={:.0} over_broker_p99_ms={:.0} partner_calls_per_event={:.2} \
             order_violations={} duplicates={}\n",
            self.options.rate,
            self.options.seconds,
            self.events,
            self.events as f64 / self.writing.as_secs_f64().max(1e-9),
            self.ferry_ms_per_event(),
            self.idle_share(),
            d.p50_ms,
            d.p99_ms,
            d.max_ms,
            quantile(r, 0.5),
            quantile(r, 0.99),
            quantile(r, 1.0),
            d.p50_ms - quantile(r, 0.5),
            d.p99_ms - quantile(r, 0.99),
            self.partner_calls,
            self.order_violations,
            self.duplicates
        )
    }
}
