//! `ferry bench consume`: the consumer runtime on the configured stack.
//!
//! 1. Key-ordered parallelism: one partition, many tenants, a handler that takes `handler_ms`:
//!    Ferry (many tenants in flight at once) against the same runtime limited to one event in
//!    flight (the classic in-order consumer), on the same records.
//! 2. Overhead: a handler that returns at once; events per second with dedupe records, batched
//!    settlement and commits on.
//!
//! Each run reads a topic filled beforehand, in a database of its own, with a group of its own,
//! timed from the consumer's start to the last delivery.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{BenchError, drop_database, fresh_database};
use crate::broker;
use crate::config::Config;
use crate::consumer::runtime::{self, ConsumeOptions, ConsumeStats};
use crate::delivery::{Handler, Outcome};
use crate::outbox::{EventPayload, EventType, OutboxEvent, OutboxRow, WireRecord, proto};

/// What to run.
#[derive(Debug, Clone)]
pub struct ConsumeBenchOptions {
    /// Events of the parallelism run.
    pub events: usize,
    /// Tenants of both runs.
    pub tenants: usize,
    /// The handler's time per event in the parallelism run.
    pub handler_ms: u64,
    /// Events of the overhead run.
    pub overhead_events: usize,
}

impl Default for ConsumeBenchOptions {
    fn default() -> Self {
        ConsumeBenchOptions {
            events: 20_000,
            tenants: 1_000,
            handler_ms: 10,
            overhead_events: 200_000,
        }
    }
}

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

    /// The table and the machine-readable last line.
    pub fn render(&self) -> String {
        let o = &self.options;
        let per_s = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        let mut s = String::from(
            "consume benchmark on the configured broker\n\n\
             | run | events | tenants | handler | in flight | elapsed | events/s | ratio |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        s.push_str(&format!(
            "| key-ordered (ferry) | {} | {} | {} ms | 256 | {:.2} s | {:.0} | {:.1}x |\n",
            o.events,
            o.tenants,
            o.handler_ms,
            self.ferry.as_secs_f64(),
            per_s(o.events, self.ferry),
            self.speedup()
        ));
        s.push_str(&format!(
            "| classic in-order (baseline) | {} | {} | {} ms | 1 | {:.2} s | {:.0} | 1.0x |\n",
            o.events,
            o.tenants,
            o.handler_ms,
            self.classic.as_secs_f64(),
            per_s(o.events, self.classic)
        ));
        s.push_str(&format!(
            "| overhead (immediate handler) | {} | {} | 0 ms | 256 | {:.2} s | {:.0} | |\n\n",
            o.overhead_events,
            o.tenants,
            self.overhead.as_secs_f64(),
            self.overhead_events_per_s()
        ));
        s.push_str(&format!(
            "speedup={:.1} overhead_events_per_s={:.0}\n",
            self.speedup(),
            self.overhead_events_per_s()
        ));
        s
    }
}

struct Sleeper(Duration);

impl Handler for Sleeper {
    async fn handle(&self, _event: &OutboxEvent, _attempt: u32) -> Outcome {
        if !self.0.is_zero() {
            tokio::time::sleep(self.0).await;
        }
        Outcome::Done
    }
}

/// Runs both scenarios.
pub async fn run(
    config: &Config,
    options: &ConsumeBenchOptions,
) -> Result<ConsumeBenchReport, BenchError> {
    let topic = fill(config, options.events, options.tenants, 1).await?;
    let delay = Duration::from_millis(options.handler_ms);
    let ferry = consume(config, &topic, options.events, 256, delay).await?;
    let classic = consume(config, &topic, options.events, 1, delay).await?;
    let big = fill(config, options.overhead_events, options.tenants, 4).await?;
    let overhead = consume(config, &big, options.overhead_events, 256, Duration::ZERO).await?;
    Ok(ConsumeBenchReport {
        options: options.clone(),
        ferry,
        classic,
        overhead,
    })
}

/// A fresh topic holding `events` events round-robin over `tenants`.
async fn fill(
    config: &Config,
    events: usize,
    tenants: usize,
    partitions: i32,
) -> Result<String, BenchError> {
    let topic = format!("ferry-bench-consume-{}", Uuid::new_v4().simple());
    let mut kafka = config.kafka.clone();
    kafka.topic = topic.clone();
    broker::ensure_topic(&kafka, &topic, partitions).await?;
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

/// Consumes `topic` from the start with a fresh group and database until `events` are delivered.
async fn consume(
    config: &Config,
    topic: &str,
    events: usize,
    max_in_flight: usize,
    delay: Duration,
) -> Result<Duration, BenchError> {
    let (pool, url) = fresh_database(&config.database, "ferry_bench_consume").await?;
    let mut cfg = config.clone();
    cfg.database.url = url.clone();
    cfg.kafka.topic = topic.to_owned();
    cfg.kafka.group_id = format!("ferry-bench-{}", Uuid::new_v4().simple());
    let stats = Arc::new(ConsumeStats::default());
    let stop = CancellationToken::new();
    let options = ConsumeOptions {
        max_in_flight,
        ..ConsumeOptions::default()
    };
    let started = Instant::now();
    let task = tokio::spawn({
        let (pool, stats, stop) = (pool.clone(), Arc::clone(&stats), stop.clone());
        async move { runtime::run(&cfg, pool, Arc::new(Sleeper(delay)), options, stats, stop).await }
    });
    let until = Instant::now() + Duration::from_secs(1_800);
    while stats.delivered.load(Ordering::Relaxed) < events as u64 {
        if Instant::now() > until || task.is_finished() {
            return Err(BenchError::Stalled(
                "the consumer stopped before delivering every event".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    task.await
        .expect("consumer panicked")
        .map_err(|e| BenchError::Stalled(e.to_string()))?;
    pool.close().await;
    drop_database(&config.database, &url).await?;
    Ok(elapsed)
}
