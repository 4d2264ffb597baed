//! One event's attempts: the loop that calls the handler, retries in memory and decides, through
//! [`RetryPolicy::decide`] and the breaker's failure window, what a failure means; and the
//! breaker's probe. Before every attempt the event's partition must still be this instance's,
//! the kill switch off, and the event's `deliver_before` not passed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::breaker::FailureWindow;
use super::ledger::{AttemptLog, ParkedRecord, Pause, SettledAs};
use super::rebalance::{Claim, Position};
use super::runtime::{ConsumeOptions, ConsumeStats};
use crate::delivery::{Attempt, Decision, Failure, FailureClass, Handler, Outcome, RetryPolicy};
use crate::outbox::OutboxEvent;

/// An event on its way through the consumer.
pub(super) struct Item {
    /// The decoded event.
    pub(super) event: OutboxEvent,
    /// The record as read, to park should its tenant be paused.
    pub(super) raw: ParkedRecord,
    /// Where it was read.
    pub(super) position: Position,
    /// Settled already (a redelivery, or a copy of an event close by): not handled again.
    pub(super) settled: bool,
    /// Its attempts, once one failed: the operator's history of it.
    pub(super) log: Vec<AttemptLog>,
    /// Log every attempt, the first too (a replayed backlog: it failed before).
    pub(super) log_every: bool,
    /// It may have been handled before this process's first attempt (an earlier owner of its
    /// partition, or its tenant's parked backlog): [`Attempt::seen_before`].
    pub(super) seen_before: bool,
    /// The dedupe lookup found no record of it in `deliveries`: its settlement is a plain
    /// insert ([`super::ledger::Settlement::unrecorded`]). `false` is always safe.
    pub(super) unrecorded: bool,
}

/// How an event's attempts ended.
pub(super) enum Done {
    /// Settled as this after this many attempts: record it.
    Settled(Box<Item>, SettledAs, u32),
    /// Settled before: nothing to record, its offset may pass.
    Duplicate(Box<Item>),
    /// Failed after this many attempts: pause the tenant.
    Pause(Box<Item>, Failure, u32),
    /// The partner refuses everyone (401/403), or most tenants are failing: hold this event,
    /// open the breaker.
    Breaker(Box<Item>, Failure),
    /// Its partition was revoked (or the consumer is stopping) before it settled: nothing is
    /// recorded; whoever owns the partition next reads it again. (One that settled as it was
    /// revoked comes back `Settled`: the coordinator writes it before the revoke's commit.)
    Revoked(Box<Item>),
}

impl Done {
    /// The event whose attempts ended.
    pub(super) fn event_id(&self) -> uuid::Uuid {
        match self {
            Done::Settled(item, ..)
            | Done::Duplicate(item)
            | Done::Pause(item, ..)
            | Done::Breaker(item, _)
            | Done::Revoked(item) => item.event.id,
        }
    }
}

/// How a call ended.
pub(super) enum Called {
    /// The handler answered.
    Answered(Outcome),
    /// The drain deadline cut it.
    Cut,
    /// The kill switch turned on while it ran: attempt it again once it is off.
    Killed,
}

/// What bounds an event's handling: the retry policy, the partition's cancellation (revoke,
/// shutdown), the kill switch, and the failure window that tells a tenant's failure from the
/// partner's.
pub(super) struct Guard<'a> {
    pub(super) retry: &'a RetryPolicy,
    pub(super) cancel: &'a CancellationToken,
    /// Cut the call under way: the partition's drain deadline passed.
    pub(super) abort: &'a CancellationToken,
    pub(super) window: &'a Mutex<FailureWindow<String>>,
    pub(super) stats: &'a ConsumeStats,
    /// Tenants an operator (or another instance) paused while their event is in flight here:
    /// a failing attempt of theirs is not retried but parked at once.
    pub(super) pausing: &'a Mutex<std::collections::HashSet<String>>,
    /// The persisted kill switch, as the coordinator last read it: no attempt starts while on.
    pub(super) killed: watch::Receiver<bool>,
    /// The partition (and generation) the work belongs to.
    pub(super) owner: Position,
    /// What a replayed event of a type the integration does not know does.
    pub(super) unknown_event_types: crate::config::UnknownEventTypes,
}

/// What a [`Guard`] borrows: one for all of a coordinator's attempts and drains.
pub(super) struct Limits {
    pub(super) retry: RetryPolicy,
    pub(super) window: std::sync::Arc<Mutex<FailureWindow<String>>>,
    pub(super) stats: std::sync::Arc<ConsumeStats>,
    pub(super) pausing: std::sync::Arc<Mutex<std::collections::HashSet<String>>>,
    pub(super) killed: watch::Receiver<bool>,
    pub(super) unknown_event_types: crate::config::UnknownEventTypes,
}

impl Limits {
    /// The limits `options` set, with a failure window of their breaker's settings and
    /// nobody being paused yet.
    pub(super) fn new(
        options: &ConsumeOptions,
        stats: std::sync::Arc<ConsumeStats>,
        killed: watch::Receiver<bool>,
    ) -> Self {
        Limits {
            retry: options.retry.clone(),
            window: std::sync::Arc::new(Mutex::new(FailureWindow::new(
                options.breaker_window,
                options.breaker_min_tenants,
                options.breaker_failure_ratio,
            ))),
            stats,
            pausing: std::sync::Arc::default(),
            killed,
            unknown_event_types: options.unknown_event_types,
        }
    }

    /// The guard of work under `claim`, for the partition (and generation) `owner` names.
    pub(super) fn guard<'a>(&'a self, claim: &'a Claim, owner: Position) -> Guard<'a> {
        Guard {
            retry: &self.retry,
            cancel: &claim.cancel,
            abort: &claim.abort,
            window: &self.window,
            stats: &self.stats,
            pausing: &self.pausing,
            killed: self.killed.clone(),
            owner,
            unknown_event_types: self.unknown_event_types,
        }
    }
}

impl Guard<'_> {
    /// Sleeps `wait`; false if cancelled first.
    async fn sleep(&self, wait: Duration) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    /// Waits while the kill switch is on; false if the work was cancelled (or the coordinator
    /// stopped) first.
    async fn clear_to_send(&self) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        // The common case costs no waiter on the partition's shared token.
        if !*self.killed.borrow() {
            return true;
        }
        let mut killed = self.killed.clone();
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            off = killed.wait_for(|on| !*on) => off.is_ok(),
        }
    }

    /// Runs a call to its end, unless the drain deadline or the kill switch cuts it first. A
    /// call can wait long before its request goes out (the partner's rate limits), and the kill
    /// switch must stop every request within a second: a cut call is attempted again once the
    /// switch is off, under the same idempotency keys.
    async fn call(&self, call: impl std::future::Future<Output = Outcome>) -> Called {
        if self.abort.is_cancelled() {
            return Called::Cut;
        }
        let mut killed = self.killed.clone();
        // The call first: one that answers at once never registers a waiter on the
        // partition's shared token or the switch.
        tokio::select! {
            biased;
            outcome = call => Called::Answered(outcome),
            _ = self.abort.cancelled() => Called::Cut,
            _ = killed.wait_for(|on| *on) => Called::Killed,
        }
    }

    fn record(&self, tenant: &str, failed: bool) {
        self.window.lock().expect("failure window").record(
            tenant.to_owned(),
            failed,
            Instant::now(),
        );
    }

    fn is_pausing(&self, tenant: &str) -> bool {
        self.pausing
            .lock()
            .expect("pausing tenants")
            .contains(tenant)
    }

    fn most_failing(&self) -> bool {
        self.window
            .lock()
            .expect("failure window")
            .most_failing(Instant::now())
    }

    /// What a failed attempt means, in one place: retry after a wait, or end with a pause or
    /// the breaker. A permanent failure is about this event, not the partner's health.
    fn verdict(
        &self,
        item: &Item,
        failure: &Failure,
        attempt: u32,
        failing_for: Duration,
    ) -> Verdict {
        let tenant = item.event.tenant_id.as_str();
        if failure.class != FailureClass::Permanent {
            self.record(tenant, true);
        }
        let jitter = f64::from(item.event.id.as_u128() as u32 ^ attempt) / f64::from(u32::MAX);
        match self.retry.decide(failure, attempt, failing_for, jitter) {
            // Paused while this event was failing: park it now, ahead of the rest.
            Decision::RetryIn(_) if self.is_pausing(tenant) => Verdict::Pause,
            Decision::RetryIn(wait) => Verdict::RetryIn(wait),
            // Most tenants are failing too: the partner is down, not this tenant.
            Decision::PauseTenant
                if failure.class == FailureClass::Retryable && self.most_failing() =>
            {
                Verdict::Breaker
            }
            Decision::PauseTenant => Verdict::Pause,
            Decision::TripBreaker => Verdict::Breaker,
        }
    }
}

/// What a failed attempt leads to.
enum Verdict {
    RetryIn(Duration),
    Pause,
    Breaker,
}

/// Runs one event to an end, counting its handling time and, if delivered,
/// its latency from the outbox.
pub(super) async fn run<H: Handler>(handler: &H, item: Box<Item>, guard: &Guard<'_>) -> Done {
    let dispatched = Instant::now();
    let done = handle(handler, item, guard).await;
    guard.stats.handling_latency.record(dispatched.elapsed());
    if let Done::Settled(item, SettledAs::Delivered, _) = &done
        && let Some(written) = item.event.occurred_at
    {
        let behind = (chrono::Utc::now() - written).to_std().unwrap_or_default();
        guard.stats.ack_latency.record(behind);
    }
    done
}

/// Runs one event to an end, in its span: a duplicate (already settled), expired, delivered, a
/// failure that pauses its tenant or trips the breaker, or revoked.
pub(super) async fn handle<H: Handler>(handler: &H, item: Box<Item>, guard: &Guard<'_>) -> Done {
    let span = event_span(&item);
    tracing::Instrument::instrument(attempts(handler, item, guard), span).await
}

/// Whether `item` is past its `deliver_before`: settled as expired, never sent late.
fn expired(item: &Item) -> bool {
    item.event
        .deliver_before
        .is_some_and(|deadline| deadline <= chrono::Utc::now())
}

/// The attempts themselves. Retries happen here, holding only this tenant; no attempt starts
/// once the partition's work is cancelled, while the kill switch is on, or past the event's
/// deadline. Once an attempt fails, every attempt of the event is logged on it for the
/// operator's history.
async fn attempts<H: Handler>(handler: &H, mut item: Box<Item>, guard: &Guard<'_>) -> Done {
    if item.settled {
        return Done::Duplicate(item);
    }
    let first_failure = Instant::now();
    // After a breaker's hold the event was attempted before: number on from there.
    let mut attempt = item.log.len() as u32 + 1;
    loop {
        if !guard.clear_to_send().await {
            return Done::Revoked(item);
        }
        if expired(&item) {
            return Done::Settled(item, SettledAs::Expired, attempt - 1);
        }
        tracing::Span::current().record("attempt", attempt);
        let started = chrono::Utc::now();
        let at = attempt_at(&item, attempt);
        let outcome = match guard.call(handler.handle(&item.event, &at)).await {
            Called::Answered(outcome) => outcome,
            Called::Cut => return Done::Revoked(item),
            Called::Killed => continue,
        };
        let settled_as = match outcome {
            Outcome::Done => {
                guard.record(item.event.tenant_id.as_str(), false);
                Some((SettledAs::Delivered, "delivered"))
            }
            Outcome::Ignored => Some((SettledAs::Ignored, "ignored")),
            Outcome::Deferred(until) => {
                let wait = (until - chrono::Utc::now()).to_std().unwrap_or_default();
                if !guard.sleep(wait).await {
                    return Done::Revoked(item);
                }
                continue;
            }
            Outcome::Failed(failure) => {
                let log = attempt_log(&item, attempt, started, "failed", Some(&failure));
                item.log.push(log);
                match guard.verdict(&item, &failure, attempt, first_failure.elapsed()) {
                    Verdict::RetryIn(wait) => {
                        guard.stats.retries.add(failure.cause());
                        if !guard.sleep(wait).await {
                            return Done::Revoked(item);
                        }
                    }
                    Verdict::Pause => return Done::Pause(item, failure, attempt),
                    Verdict::Breaker => return Done::Breaker(item, failure),
                }
                None
            }
        };
        if let Some((outcome, label)) = settled_as {
            if item.log_every || !item.log.is_empty() {
                let log = attempt_log(&item, attempt, started, label, None);
                item.log.push(log);
            }
            return Done::Settled(item, outcome, attempt);
        }
        attempt += 1;
    }
}

/// One attempt at the breaker's first held event. Delivered (or ignored) proves the partner is
/// back; a permanent failure is the event's own (its tenant is paused and the breaker closes);
/// anything else keeps the breaker open.
pub(super) async fn probe<H: Handler>(
    handler: &H,
    mut item: Box<Item>,
    abort: &CancellationToken,
) -> Done {
    if expired(&item) {
        let attempts = item.log.len() as u32;
        return Done::Settled(item, SettledAs::Expired, attempts);
    }
    let number = item.log.len() as u32 + 1;
    let started = chrono::Utc::now();
    let span = event_span(&item);
    let at = attempt_at(&item, number);
    let call = tracing::Instrument::instrument(handler.handle(&item.event, &at), span);
    let outcome = tokio::select! {
        biased;
        _ = abort.cancelled() => return Done::Revoked(item),
        outcome = call => outcome,
    };
    let (label, failure) = match &outcome {
        Outcome::Done => ("delivered", None),
        Outcome::Ignored => ("ignored", None),
        Outcome::Failed(f) => ("failed", Some(f)),
        Outcome::Deferred(_) => return Done::Breaker(item, deferred_during_probe()),
    };
    let log = attempt_log(&item, number, started, label, failure);
    item.log.push(log);
    match outcome {
        Outcome::Done => Done::Settled(item, SettledAs::Delivered, number),
        Outcome::Ignored => Done::Settled(item, SettledAs::Ignored, number),
        Outcome::Failed(f) if f.class == FailureClass::Permanent => Done::Pause(item, f, number),
        Outcome::Failed(f) => Done::Breaker(item, f),
        Outcome::Deferred(_) => Done::Breaker(item, deferred_during_probe()),
    }
}

/// A probe the handler deferred proves nothing: the breaker stays open.
fn deferred_during_probe() -> Failure {
    Failure {
        class: FailureClass::PartnerWide,
        message: "deferred during a probe".into(),
        status: None,
        response: None,
        retry_after: None,
    }
}

/// Who this consumer is, in the attempt history: host and process.
pub(super) fn instance() -> &'static str {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "ferry".to_owned());
        format!("{host}:{}", std::process::id())
    })
}

/// The history entry of attempt `number` at `item`, started at `started` and ending now.
pub(super) fn attempt_log(
    item: &Item,
    number: u32,
    started: chrono::DateTime<chrono::Utc>,
    outcome: &'static str,
    failure: Option<&Failure>,
) -> AttemptLog {
    AttemptLog {
        event_id: item.event.id,
        attempt: number as i32,
        started_at: started,
        finished_at: chrono::Utc::now(),
        outcome,
        error: failure.map(|f| format!("{}: {}", f.cause(), f.message)),
        response: failure.and_then(|f| {
            f.status
                .map(|status| serde_json::json!({"status": status, "body": f.response}))
        }),
        instance: instance().to_owned(),
    }
}

/// The span of one event's handling: a child of the writer's span when the record carried its
/// `traceparent`, with the event's coordinates as attributes. At debug level, so it costs
/// nothing unless a trace exporter (which takes every level) or `RUST_LOG=debug` wants it.
pub(super) fn event_span(item: &Item) -> tracing::Span {
    let span = tracing::debug_span!(
        "deliver event",
        otel.kind = "consumer",
        tenant = %item.event.tenant_id,
        partition = item.position.partition,
        offset = item.position.offset,
        event_id = %item.event.id,
        event_type = item.event.event_type(),
        attempt = tracing::field::Empty,
    );
    if let Some(traceparent) = &item.event.traceparent {
        crate::telemetry::continue_trace(&span, traceparent);
    }
    span
}

/// Attempt `number` at the record that carried `item`.
pub(super) fn attempt_at(item: &Item, number: u32) -> Attempt {
    Attempt {
        number,
        seen_before: item.seen_before,
        topic: item.raw.topic.clone(),
        partition: item.raw.partition,
        offset: item.raw.offset,
    }
}

/// The pause a failure calls for: a retryable cause is retried automatically later.
pub(super) fn pause_for(
    failure: &Failure,
    event_id: Option<uuid::Uuid>,
    attempts: u32,
    options: &ConsumeOptions,
) -> Pause {
    // Not before the partner said it would answer again (within the cap).
    let resume_after = options.auto_resume_after.max(
        failure
            .retry_after
            .unwrap_or_default()
            .min(options.retry.retry_after_max),
    );
    // A partner-wide refusal met while replaying a backlog is retried later, like a timeout.
    let retryable = failure.class != crate::delivery::FailureClass::Permanent;
    Pause {
        cause: if retryable { "retryable" } else { "permanent" },
        reason: match failure.status {
            Some(status) => format!("{} (HTTP {status})", failure.message),
            None => failure.message.clone(),
        },
        event_id,
        next_retry_at: retryable.then(|| {
            chrono::Utc::now() + chrono::Duration::from_std(resume_after).unwrap_or_default()
        }),
        attempts,
        // What the partner answered, kept for the operator.
        response: failure
            .status
            .map(|status| serde_json::json!({"status": status, "body": failure.response})),
    }
}
