//! The poll thread: the one place librdkafka is polled. It hands each record to the
//! coordinator through a bounded channel, and turns librdkafka's callbacks into messages
//! ([`KafkaEvent`]): a rebalance callback sends what changed and waits for the coordinator's
//! answer, so the coordinator, the one owner of the consumer's state, decides what a revoke or
//! an assignment does while its loop goes on serving the tasks it waits for.
//!
//! Why a thread of its own: librdkafka runs the rebalance callbacks inside the poll. Polled
//! from the coordinator's loop, a revoke's callback would run inside the loop's own turn and
//! could not wait for the loop to settle what is under way without blocking it (the earlier
//! design shared the state behind a mutex for that reason). Here the callback blocks this
//! thread only, which is what librdkafka expects: no record of a revoked partition is handed
//! over, and no record of an assigned one, before the coordinator answered.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc;

use super::ledger::ParkedRecord;

/// How long an assignment waits for a partition's high watermark.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(5);

/// How often [`super::runtime::PartitionView`] is brought up to date, and librdkafka's
/// statistics (with the high watermarks) come.
pub(super) const LAG_INTERVAL: Duration = Duration::from_secs(2);

/// How long one poll waits for a record: the thread looks at its stop flag that often.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// Records handed over but not yet taken in, at most: the coordinator's own back-pressure
/// (`max_queued`) decides how many it holds; this only lets the fetches run ahead of it.
pub(super) const RECORDS_AHEAD: usize = 1024;

/// What librdkafka's callbacks tell the coordinator.
pub(super) enum KafkaEvent {
    /// These partitions are being revoked: settle and commit what can be, then answer. The
    /// revoke completes (and the next owner may start) once the answer is sent or dropped.
    /// `lost`: librdkafka lost the assignment (the session expired, the broker forgot the
    /// member): another member may own them already, so work under way is cut at once and
    /// nothing of theirs is committed.
    Revoked {
        partitions: Vec<i32>,
        lost: bool,
        reply: Reply,
    },
    /// These partitions were assigned, each in a generation of its own: read the paused
    /// tenants, then answer; no record of theirs is handed over before. `fresh_from`: each
    /// partition's high watermark once it was assigned here. An earlier owner can only have
    /// fetched records below it; a partition missing from it (its watermark could not be
    /// read) counts every record as possibly handled before.
    Assigned {
        partitions: Vec<(i32, u64)>,
        fresh_from: HashMap<i32, i64>,
        reply: Reply,
    },
    /// Each partition's high watermark, from librdkafka's statistics.
    Watermarks(Vec<(i32, i64)>),
}

/// The coordinator's answer to a rebalance: sending it, or dropping it, lets the callback
/// return.
pub(super) type Reply = std::sync::mpsc::SyncSender<()>;

/// A record as the poll thread hands it over.
pub(super) struct Polled {
    /// The record, or the error librdkafka reported instead. Copied out of librdkafka's buffer
    /// once, here, into the form Ferry parks should its tenant be paused, and kept so: the
    /// decoder reads it in place, and parking takes it as it is.
    pub(super) message: KafkaResult<ParkedRecord>,
    /// The generation of the partition's assignment it was read in: a record fetched before a
    /// revoke and handed over after the partition came back is not taken for a new one.
    pub(super) generation: u64,
}

/// The consumer's context: the callbacks, run on the poll thread.
pub(super) struct Context {
    topic: String,
    events: mpsc::UnboundedSender<KafkaEvent>,
    /// Each assigned partition's generation. Only the poll thread touches it (the callbacks
    /// run inside its polls); the mutex is for `&self`, never contended.
    generations: std::sync::Mutex<HashMap<i32, u64>>,
    next_generation: std::sync::atomic::AtomicU64,
}

impl Context {
    /// The generation `partition` is assigned in here, 0 if it is not.
    fn generation_of(&self, partition: i32) -> u64 {
        let generations = self.generations.lock().expect("generations");
        generations.get(&partition).copied().unwrap_or(0)
    }

    /// Sends the coordinator an event and waits for its answer (or for it to be gone).
    fn ask(&self, event: impl FnOnce(Reply) -> KafkaEvent) {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        if self.events.send(event(reply)).is_ok() {
            let _ = answer.recv();
        }
    }

    /// The high watermark of each of `partitions`, asked of the broker now that they are
    /// assigned here (the previous owner let go before): every record an earlier owner fetched
    /// lies below it. One that cannot be read is left out.
    fn high_watermarks(
        &self,
        consumer: &BaseConsumer<Self>,
        partitions: &[(i32, u64)],
    ) -> HashMap<i32, i64> {
        partitions
            .iter()
            .filter_map(|&(p, _)| {
                match consumer.fetch_watermarks(&self.topic, p, WATERMARK_TIMEOUT) {
                    Ok((_, high)) => Some((p, high)),
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "no high watermark at assignment: its records count as handled before");
                        None
                    }
                }
            })
            .collect()
    }

    fn partitions(&self, list: &TopicPartitionList) -> Vec<i32> {
        list.elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect()
    }
}

impl ClientContext for Context {
    /// librdkafka's statistics (every `statistics.interval.ms`): the high watermark it learnt
    /// from the fetches, for the partitions' lag. No request of its own, so a slow broker's
    /// answers to watermark requests never hold the fetches back.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let highs = topic
            .partitions
            .iter()
            .filter(|(p, s)| **p >= 0 && s.hi_offset >= 0)
            .map(|(&p, s)| (p, s.hi_offset))
            .collect();
        let _ = self.events.send(KafkaEvent::Watermarks(highs));
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions = self.partitions(list);
                let lost = consumer.assignment_lost();
                tracing::info!(?partitions, lost, "partitions being revoked");
                self.ask(|reply| KafkaEvent::Revoked {
                    partitions: partitions.clone(),
                    lost,
                    reply,
                });
                let mut generations = self.generations.lock().expect("generations");
                generations.retain(|p, _| !partitions.contains(p));
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions: Vec<(i32, u64)> = self
                .partitions(list)
                .into_iter()
                .map(|p| (p, self.next_generation.fetch_add(1, Ordering::Relaxed) + 1))
                .collect();
            self.generations
                .lock()
                .expect("generations")
                .extend(partitions.iter().copied());
            tracing::info!(partitions = ?partitions.iter().map(|p| p.0).collect::<Vec<_>>(), "partitions assigned");
            let fresh_from = self.high_watermarks(consumer, &partitions);
            self.ask(|reply| KafkaEvent::Assigned {
                partitions,
                fresh_from,
                reply,
            });
        }
    }
}

/// The consumer's settings with librdkafka's statistics on (unless set already), for the high
/// watermarks.
pub(super) fn with_statistics(mut config: rdkafka::ClientConfig) -> rdkafka::ClientConfig {
    if config.get("statistics.interval.ms").is_none() {
        config.set(
            "statistics.interval.ms",
            LAG_INTERVAL.as_millis().to_string(),
        );
    }
    config
}

/// The group member, subscribed to the configured topic, and the channel its callbacks speak
/// through.
pub(super) fn consumer(
    config: &crate::config::Config,
) -> KafkaResult<(
    Arc<BaseConsumer<Context>>,
    mpsc::UnboundedReceiver<KafkaEvent>,
)> {
    let (events, received) = mpsc::unbounded_channel();
    let settings = crate::broker::consumer_config(&config.kafka, &config.kafka.group_id);
    let consumer: BaseConsumer<Context> =
        with_statistics(settings).create_with_context(Context {
            topic: config.kafka.topic.clone(),
            events,
            generations: std::sync::Mutex::default(),
            next_generation: std::sync::atomic::AtomicU64::new(0),
        })?;
    consumer.subscribe(&[&config.kafka.topic])?;
    Ok((Arc::new(consumer), received))
}

/// The poll thread's handle: dropping it stops the thread (within one poll, or as soon as
/// its hand-over finds the coordinator gone).
pub(super) struct Poller {
    stop: Arc<AtomicBool>,
}

impl Poller {
    /// Starts polling `consumer`, handing records to `records`.
    pub(super) fn spawn(
        consumer: Arc<BaseConsumer<Context>>,
        records: mpsc::Sender<Polled>,
    ) -> std::io::Result<Poller> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("ferry-kafka-poll".into())
            .spawn(move || poll(&consumer, &records, &stopped))?;
        Ok(Poller { stop })
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The thread's loop. It holds a handle of the consumer: whichever of it and the coordinator
/// lets go last closes the consumer, and by then the coordinator's end of the events channel
/// is gone, so the close's revoke callback does not wait.
fn poll(consumer: &BaseConsumer<Context>, records: &mpsc::Sender<Polled>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let polled = match consumer.poll(POLL_TIMEOUT) {
            None => continue,
            Some(Ok(m)) => Polled {
                generation: consumer.context().generation_of(m.partition()),
                message: Ok(super::intake::parked_record(&m)),
            },
            Some(Err(e)) => Polled {
                generation: 0,
                message: Err(e),
            },
        };
        if records.blocking_send(polled).is_err() {
            return;
        }
    }
}
