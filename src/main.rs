//! The `ferry` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use ferry::config::Config;

/// Ferry keeps a partner platform in sync with ours through the transactional outbox.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    /// A TOML config file; `FERRY_*` environment variables override it.
    #[arg(long, global = true, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the database migrations (idempotent).
    Migrate,
    /// Prove the stack works: migrate, then send one event through Kafka and back.
    Smoke {
        /// How long to wait for the event to come back.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Stream the outbox from the write-ahead log to Kafka until SIGTERM/SIGINT.
    Relay {
        /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 127.0.0.1:9187.
        #[arg(long, env = "FERRY_RELAY_METRICS_ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Print the relay slot's position and lag.
    RelayStatus,
    /// Deliver the outbox topic to the partner, each tenant in order, until SIGTERM/SIGINT.
    Consume,
    /// Play the partner's REST API (for tests and the demo) until SIGTERM/SIGINT.
    PartnerSim {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8081", env = "FERRY_PARTNER_SIM_ADDR")]
        addr: std::net::SocketAddr,
        /// The bearer token it accepts.
        #[arg(long, env = "FERRY_PARTNER_TOKEN", default_value = "sim-token")]
        token: String,
    },
    /// Compare our products with the partner's state per tenant; non-zero exit on drift or
    /// duplicate objects.
    Verify {
        /// Tenants to check besides those with products (e.g. ones whose products were all
        /// deleted).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
    },
    /// Write products and their outbox events like our platform does.
    Load {
        /// Distinct tenants.
        #[arg(long, default_value_t = 100)]
        tenants: usize,
        /// Product changes (one transaction and one event each).
        #[arg(long, default_value_t = 10_000)]
        events: usize,
        /// Concurrent writers.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Tenant name prefix.
        #[arg(long, default_value = "tenant-")]
        tenant_prefix: String,
        /// Seed of the change mix.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Benchmarks, printed as tables with the ratio to their baseline.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The consumer: key-ordered parallelism against one-in-flight, overhead, isolation of a failing
    /// tenant, and memory while a paused tenant's events are parked.
    Consume {
        /// Events of the parallelism run.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// Tenants.
        #[arg(long, default_value_t = 1_000)]
        tenants: usize,
        /// The handler's time per event (ms) in the parallelism run.
        #[arg(long, default_value_t = 10)]
        handler_ms: u64,
        /// Events of the overhead run.
        #[arg(long, default_value_t = 200_000)]
        overhead_events: usize,
        /// Events of each isolation run (100 tenants, one failing).
        #[arg(long, default_value_t = 20_000)]
        isolation_events: usize,
        /// Events parked for the paused tenant in the memory run.
        #[arg(long, default_value_t = 100_000)]
        parked_events: usize,
        /// `configured` (the stack's broker) or `mock` (librdkafka's in-process mock cluster,
        /// where the broker's storage is not the bottleneck).
        #[arg(long, default_value = "configured")]
        broker: String,
    },
    /// The memory scenario of `bench consume`, started by it as a process of its own: consumes
    /// a filled topic until the paused tenant's events are parked, prints its peak RSS.
    #[command(hide = true)]
    ConsumeParked {
        /// The filled topic.
        #[arg(long)]
        topic: String,
        /// Events to park.
        #[arg(long)]
        parked_events: usize,
    },
    /// The WAL relay against a naive polling relay under concurrent writers.
    Relay {
        /// Outbox rows per relay.
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        /// Distinct tenants.
        #[arg(long, default_value_t = 1_000)]
        tenants: usize,
        /// Concurrent writers.
        #[arg(long, default_value_t = 8)]
        writers: usize,
        /// Partitions of each relay's topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// `configured` (the stack's broker) or `mock` (librdkafka's in-process mock cluster,
        /// where the broker's storage is not the bottleneck).
        #[arg(long, default_value = "configured", value_parser = ["configured", "mock"])]
        broker: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(s.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s, 500ms or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("`{s}`: unknown unit `{unit}` (use ms, s or m)")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = ferry::telemetry::init("ferry")?;
    // The simulator is the partner, not Ferry: it needs none of Ferry's settings.
    if let Command::PartnerSim { addr, token } = &cli.command {
        let shutdown = ferry::shutdown::on_signals()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(%addr, "partner simulator listening");
        let sim = ferry::partner::sim::Sim::new(token.clone());
        ferry::partner::sim::serve(listener, sim, shutdown).await?;
        return Ok(());
    }
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::PartnerSim { .. } => unreachable!("handled above"),
        Command::Consume => {
            let shutdown = ferry::shutdown::on_signals()?;
            let pool = ferry::store::connect(&config.database).await?;
            let client = ferry::partner::client::PartnerClient::new(&config.partner)?;
            let handler = std::sync::Arc::new(ferry::partner::integration::Integration::new(
                client,
                pool.clone(),
            ));
            // Whoever starts first, relay or consumer, creates the topic (idempotent).
            ferry::broker::ensure_topic(
                &config.kafka,
                &config.kafka.topic,
                config.relay.topic_partitions,
            )
            .await?;
            let stats = std::sync::Arc::new(ferry::consumer::runtime::ConsumeStats::default());
            tracing::info!(topic = %config.kafka.topic, group = %config.kafka.group_id, "consuming");
            ferry::consumer::runtime::run(
                &config,
                pool,
                handler,
                ferry::consumer::runtime::ConsumeOptions::default(),
                stats,
                shutdown,
            )
            .await?;
        }
        Command::Verify { tenants } => {
            let pool = ferry::store::connect(&config.database).await?;
            let client = ferry::partner::client::PartnerClient::new(&config.partner)?;
            let report = ferry::partner::verify::verify(&pool, &client, &tenants).await?;
            print!("{}", ferry::partner::verify::render(&report));
            let bad: usize = report.iter().map(|d| d.drift() + d.duplicates).sum();
            if bad > 0 {
                anyhow::bail!("{bad} objects differ between our products and the partner");
            }
        }
        Command::Migrate => {
            let pool = ferry::store::connect(&config.database).await?;
            ferry::store::migrate(&pool).await?;
            let version = ferry::store::schema_version(&pool).await?.unwrap_or(0);
            println!("schema at version {version}");
        }
        Command::Smoke { timeout } => {
            let report = ferry::smoke::run(&config, timeout)
                .await
                .context("smoke round trip failed")?;
            println!(
                "smoke ok: schema version {}, {} broker(s), event {} at {}[{}]@{} back in {:?}, group {} committed {}",
                report.schema_version,
                report.brokers,
                report.event_id,
                ferry::smoke::SMOKE_TOPIC,
                report.partition,
                report.offset,
                report.round_trip,
                ferry::smoke::SMOKE_GROUP,
                report.committed,
            );
        }
        Command::Relay { metrics_addr } => {
            let shutdown = ferry::shutdown::on_signals()?;
            let relay = ferry::relay::Relay::connect(&config).await?;
            if let Some(addr) = metrics_addr {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} for metrics"))?;
                let stats = relay.stats();
                let render = move || stats.render_prometheus();
                tokio::spawn(ferry::telemetry::serve_metrics(
                    listener,
                    render,
                    shutdown.clone(),
                ));
                tracing::info!(%addr, "serving relay metrics on /metrics");
            }
            let stats = relay.run(shutdown).await?;
            println!(
                "relay stopped: {} records acknowledged, {} rejected",
                stats
                    .records_acked
                    .load(std::sync::atomic::Ordering::Relaxed),
                stats
                    .rows_rejected
                    .load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        Command::RelayStatus => {
            let mut relay = ferry::relay::Relay::connect(&config).await?;
            relay.setup().await?;
            let lag = relay.slot_lag().await?;
            let confirmed = relay
                .stats()
                .confirmed_lsn
                .load(std::sync::atomic::Ordering::Relaxed);
            println!(
                "slot {} confirmed at {}, lag {} bytes",
                config.relay.slot,
                ferry::relay::lsn::Lsn(confirmed),
                lag
            );
        }
        Command::Load {
            tenants,
            events,
            concurrency,
            tenant_prefix,
            seed,
        } => {
            let pool = ferry::store::connect(&config.database).await?;
            let options = ferry::load::LoadOptions {
                tenants,
                events,
                concurrency,
                tenant_prefix,
                seed,
            };
            let report = ferry::load::run(&pool, &options).await?;
            println!(
                "wrote {} events ({} created, {} updated, {} deleted) across {} tenants in {:.2} s ({:.0} events/s)",
                report.events(),
                report.created,
                report.updated,
                report.deleted,
                tenants,
                report.elapsed.as_secs_f64(),
                report.events() as f64 / report.elapsed.as_secs_f64().max(1e-9)
            );
        }
        Command::Bench {
            which:
                Bench::Consume {
                    events,
                    tenants,
                    handler_ms,
                    overhead_events,
                    isolation_events,
                    parked_events,
                    broker,
                },
        } => {
            let options = ferry::bench::consume::ConsumeBenchOptions {
                broker: bench_broker(&broker)?,
                events,
                tenants,
                handler_ms,
                overhead_events,
                isolation_events,
                parked_events,
                child: std::env::current_exe().ok(),
            };
            let report = ferry::bench::consume::run(&config, &options).await?;
            print!("{}", report.render());
        }
        Command::Bench {
            which:
                Bench::ConsumeParked {
                    topic,
                    parked_events,
                },
        } => {
            let run = ferry::bench::consume::parked(&config, &topic, parked_events).await?;
            println!("{}", run.to_line());
        }
        Command::Bench {
            which:
                Bench::Relay {
                    rows,
                    tenants,
                    writers,
                    partitions,
                    broker,
                },
        } => {
            let options = ferry::bench::relay::RelayBenchOptions {
                broker: bench_broker(&broker)?,
                rows,
                tenants,
                writers,
                partitions,
            };
            let report = ferry::bench::relay::run(&config, &options).await?;
            print!("{}", report.render());
        }
    }
    Ok(())
}

/// The `--broker` of a benchmark: a clear error for anything but the two it knows.
fn bench_broker(name: &str) -> anyhow::Result<ferry::bench::relay::BenchBroker> {
    match name {
        "configured" => Ok(ferry::bench::relay::BenchBroker::Configured),
        "mock" => Ok(ferry::bench::relay::BenchBroker::Mock),
        other => anyhow::bail!("--broker {other:?}: expected `configured` or `mock`"),
    }
}
