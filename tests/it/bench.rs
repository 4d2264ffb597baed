//! The relay benchmark stays runnable and honest: a small run on librdkafka's mock cluster must
//! find Ferry's relay losing and reordering nothing, and end with the machine-readable line.
//! (Speed is the benchmark's business, run on demand; nothing here is timed.)

use ferry::bench::relay::{BenchBroker, RelayBenchOptions};
use ferry::config::{Config, DatabaseConfig, RelayConfig};

/// The stack's settings: a benchmark makes its own databases and topics on them.
fn stack_config() -> Config {
    Config {
        database: DatabaseConfig {
            max_connections: 5,
            ..DatabaseConfig::new(
                std::env::var("DATABASE_URL").expect("DATABASE_URL: run scripts/test"),
            )
        },
        kafka: crate::support::kafka_config("unused"),
        relay: RelayConfig::default(),
        partner: Default::default(),
        consume: Default::default(),
        admin: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_relay_benchmark_runs_and_reports() {
    let config = stack_config();
    let options = RelayBenchOptions {
        broker: BenchBroker::Mock,
        rows: 1_000,
        tenants: 50,
        writers: 4,
        partitions: 4,
    };
    let report = ferry::bench::relay::run(&config, &options)
        .await
        .expect("benchmark runs");
    assert_eq!(report.ferry.rows, 1_000);
    assert_eq!(report.ferry.missing, 0, "Ferry's relay lost rows");
    assert_eq!(
        report.ferry.reordered, 0,
        "Ferry's relay reordered a tenant"
    );
    assert!(report.ferry.records >= 2_000, "both phases read back");
    let text = report.render();
    let last = text.lines().last().unwrap();
    let keys: Vec<&str> = last
        .split(' ')
        .map(|kv| kv.split('=').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "relay_rows_per_s",
            "polling_rows_per_s",
            "ratio",
            "polling_skipped",
            "polling_reordered",
            "ferry_lost",
            "recvlogical_rows_per_s",
            "relay_over_recvlogical"
        ]
    );
    assert!(last.contains("ferry_lost=0"), "{last}");
    // pg_recvlogical decoded the same backlog beside it.
    let floor = report.floor.as_ref().expect("pg_recvlogical ran");
    assert_eq!(floor.rows, 1_000);
}

/// The pipeline benchmark stays runnable: a small run (its processes started from this build's
/// `ferry`) delivers every change, measures both latencies and labels every process it
/// started. Nothing here is timed.
#[tokio::test(flavor = "multi_thread")]
async fn a_small_pipeline_benchmark_runs_and_reports() {
    let mut config = stack_config();
    config.kafka = crate::support::kafka_config("unused");
    let options = ferry::bench::pipeline::PipelineBenchOptions {
        rate: 100.0,
        seconds: 2.0,
        tenants: 5,
        consumers: 1,
        partitions: 2,
        integration: std::path::absolute("integrations/shop.toml").unwrap(),
        children: env!("CARGO_BIN_EXE_ferry").into(),
        writer: env!("CARGO_BIN_EXE_ferry").into(),
        config_file: None,
        warm_up: 20,
        secrets: Vec::new(),
    };
    let report = ferry::bench::pipeline::run(&config, &options)
        .await
        .expect("benchmark runs");
    // `ferry load` writes about as many as asked (its 8 writers share the 5 tenants).
    let events = report.events;
    assert!((100..=200).contains(&events), "{events} written");
    assert_eq!(
        report.read_ms.len() as u64,
        events,
        "the reader read every change"
    );
    assert_eq!(report.delivered.healthy, events, "{:?}", report.delivered);
    assert_eq!((report.order_violations, report.duplicates), (0, 0));
    let labels: Vec<&str> = report.cpu.rows.iter().map(|(l, _)| l.as_str()).collect();
    for process in [
        "relay",
        "consumer 1",
        "partner simulator",
        "writer (ferry load)",
    ] {
        assert!(
            labels.contains(&process),
            "{process} not sampled: {labels:?}"
        );
    }
    let text = report.render();
    let last = text.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("rate=100 seconds=2 events={events} ")),
        "{last}"
    );
    assert!(last.ends_with("order_violations=0 duplicates=0"), "{last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_consume_benchmark_runs_and_reports() {
    let config = stack_config();
    let options = ferry::bench::consume::ConsumeBenchOptions {
        broker: ferry::bench::relay::BenchBroker::Configured,
        events: 100,
        tenants: 20,
        handler_ms: 5,
        overhead_events: 300,
        isolation_events: 400,
        parked_events: 200,
        child: None,
    };
    let report = ferry::bench::consume::run(&config, &options)
        .await
        .expect("benchmark runs");
    // Every event of each run was delivered (run returns only then); the report is complete.
    let text = report.render();
    assert!(text.contains("| 1. key-ordered (ferry) | 100 |"), "{text}");
    assert!(
        text.contains("| 1. classic in-order (baseline) | 100 |"),
        "{text}"
    );
    assert!(
        text.contains("| 4. memory, one tenant paused | 201 parked |"),
        "{text}"
    );
    // Two integrations at once, each delivering all 100 events.
    assert!(
        text.contains("| 5. two integrations at once, each every event | 200 |"),
        "{text}"
    );
    assert!(report.two_integrations > std::time::Duration::ZERO);
    // The overhead run beside what the broker serves a consumer that does nothing.
    assert!(
        text.contains("| 2. overhead, the broker's client alone (ceiling) | 300 |"),
        "{text}"
    );
    assert!(report.overhead_broker > std::time::Duration::ZERO);
    let last = text.lines().last().unwrap();
    let keys: Vec<&str> = last
        .split(' ')
        .map(|kv| kv.split('=').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "speedup",
            "overhead_events_per_s",
            "isolation_ratio",
            "max_commit_lag_ms",
            "parked_peak_rss_mb",
            "two_integrations_ratio"
        ],
        "{last}"
    );
    // Tenant-0's 4 events were parked, not delivered; the memory run parked all 200 after the
    // first (which paused the tenant and was parked with it).
    assert_eq!(report.isolation_parked, 4);
    assert_eq!(report.parked, 201);
    assert!(report.parked_peak_rss_kb > 0, "VmHWM is read on Linux");
}

/// `--broker memory`: a tansu with in-memory storage on a free port, serving the run, gone when
/// the benchmark lets go of it.
#[tokio::test(flavor = "multi_thread")]
async fn the_in_memory_broker_serves_a_consume_benchmark_and_stops_after() {
    // `scripts/stack up` installs tansu; a stack pointed at another broker (`KAFKA_BROKERS`)
    // may have none, and then there is nothing to start.
    if !ferry::bench::tansu::MemoryTansu::available() {
        eprintln!("no tansu binary here: the in-memory broker is not checked");
        return;
    }
    let tansu = ferry::bench::tansu::MemoryTansu::start().expect("tansu starts");
    let address = tansu.brokers().to_owned();
    let mut config = stack_config();
    config.kafka.brokers = address.clone();
    let options = ferry::bench::consume::ConsumeBenchOptions {
        broker: ferry::bench::relay::BenchBroker::Configured,
        events: 50,
        tenants: 10,
        handler_ms: 1,
        overhead_events: 200,
        isolation_events: 200,
        parked_events: 50,
        child: None,
    };
    let report = ferry::bench::consume::run(&config, &options)
        .await
        .expect("the benchmark runs on the in-memory broker");
    assert_eq!(report.parked, 51);
    drop(tansu);
    assert!(
        std::net::TcpStream::connect(&address).is_err(),
        "the broker on {address} was stopped with its handle"
    );
}

/// The relay benchmark on the in-memory tansu (input tried: `BenchBroker::Memory`) is refused
/// with a reason before anything runs, rather than reporting rows lost that the broker's wrong
/// watermarks hid from the read-back.
#[tokio::test]
async fn the_relay_benchmark_refuses_the_in_memory_broker() {
    let options = RelayBenchOptions {
        broker: BenchBroker::Memory,
        rows: 10,
        tenants: 1,
        writers: 1,
        partitions: 1,
    };
    let err = ferry::bench::relay::run(&stack_config(), &options)
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, ferry::bench::BenchError::Tansu(why) if why.contains("watermarks")),
        "{err}"
    );
}
