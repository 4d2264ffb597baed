//! Delivering one event: the handler the consumer calls, what it may answer, and the one place
//! that decides what a failure means (retry in memory, pause the tenant, or trip the partner-wide
//! breaker) and when to try again. Pure: no I/O here, so every rule is table-tested.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::outbox::{BadEventReason, OutboxEvent};

/// What handling an event came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Delivered (or found already delivered on the partner): settle it.
    Done,
    /// Another system must finish first: hold the tenant, try again at this time. Not a
    /// failure, never pauses the tenant.
    Deferred(DateTime<Utc>),
    /// It failed; [`Failure::class`] says what that means.
    Failed(Failure),
    /// Not for this handler (the tenant has the integration off): recorded as ignored,
    /// nothing sent.
    Ignored,
}

/// A failed attempt, as the handler saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// What the failure means for the tenant.
    pub class: FailureClass,
    /// A message for the operator.
    pub message: String,
    /// The partner's HTTP status, when there was a response.
    pub status: Option<u16>,
    /// The partner's response body, kept for the operator (truncated by the handler).
    pub response: Option<String>,
    /// The partner's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

impl Failure {
    /// A failure of `class` with no HTTP answer behind it (a bad payload, a missing id): the
    /// message says why.
    pub fn new(class: FailureClass, message: impl Into<String>) -> Failure {
        Failure {
            class,
            message: message.into(),
            status: None,
            response: None,
            retry_after: None,
        }
    }

    /// What went wrong, in a few stable words, for the retry metrics and the attempt history:
    /// `rate_limited` (429), `server_error` (5xx), `timeout` (408, or no answer at all: a
    /// timeout or a broken connection), `unauthorized` (401/403), `rejected` (another 4xx) or
    /// `handler` (a failure with no HTTP in it, such as a bad event).
    pub fn cause(&self) -> &'static str {
        match (self.status, self.class) {
            (Some(429), _) => "rate_limited",
            (Some(500..=599), _) => "server_error",
            (Some(408), _) | (None, FailureClass::Retryable) => "timeout",
            (Some(401 | 403), _) => "unauthorized",
            (Some(_), _) => "rejected",
            (None, _) => "handler",
        }
    }
}

/// The scope and the remedy of a failure (the design's failure table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// Timeout, 5xx, 429, connection reset: retry in memory with backoff, then pause the tenant.
    Retryable,
    /// 400/404/409/422, a bad event, a handler bug: pause the tenant at once.
    Permanent,
    /// 401/403: the partner refuses everyone: pause the partitions (circuit breaker), not the
    /// tenant.
    PartnerWide,
}

impl FailureClass {
    /// The class of an HTTP response status; `None` for a success.
    pub fn of_status(status: u16) -> Option<FailureClass> {
        match status {
            200..=299 => None,
            401 | 403 => Some(FailureClass::PartnerWide),
            408 | 425 | 429 => Some(FailureClass::Retryable),
            500..=599 => Some(FailureClass::Retryable),
            // 400, 404, 409, 422 and every other client error: our request is wrong for this
            // object, and sending it again will not change the answer.
            _ => Some(FailureClass::Permanent),
        }
    }

    /// A stable name for storage and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Retryable => "retryable",
            FailureClass::Permanent => "permanent",
            FailureClass::PartnerWide => "partner_wide",
        }
    }
}

/// Which attempt, at which record: the handler names the event's place in the log to the
/// partner (for its order checks) and in the dedupe record it may write itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Counts from 1.
    pub number: u32,
    /// Whether the event may have been handled before, beyond this process's earlier
    /// attempts: its record was fetched by an earlier owner of its partition (it lies below
    /// the high watermark at assignment), or it comes from its tenant's parked backlog. An
    /// earlier handling may have written to the partner, so a handler takes its healing steps
    /// (a find by our id before a create); see [`Attempt::may_have_written`].
    pub seen_before: bool,
    /// The topic of the record that carried the event.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

impl Attempt {
    /// Whether an earlier handling of the event may have written to the partner: an earlier
    /// attempt here, or [`Attempt::seen_before`]. When not, nothing can hold the event's
    /// objects but what the mappings say, and a create needs no find first.
    pub fn may_have_written(&self) -> bool {
        self.number > 1 || self.seen_before
    }
}

/// Whether `name` may name an integration: 1 to 64 of `a-z`, `0-9`, `_` and `-` (it is a
/// metrics label, a consumer group's suffix and a path segment as it is).
pub fn is_integration_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Handles one event. Implemented by the partner integration, and by scripted handlers in tests.
pub trait Handler: Send + Sync + 'static {
    /// The integration's name (`a-z`, `0-9`, `_`, `-`). Every record the consumer keeps is
    /// filed under it: tenants' switches and state, the dedupe record, attempts, the parked
    /// backlog, mappings. Integrations that share a database run with names of their own, each
    /// as a consumer group of its own, and an event addressed to one of them
    /// ([`OutboxEvent::integration`]) is recorded as ignored by the others.
    fn integration(&self) -> &str;

    /// Whether this integration can act on `event`, asked as it arrives, before it waits its
    /// turn: its type is one it knows ([`BadEventReason::UnknownEventType`] if not, which
    /// `consume.unknown_event_types` then ignores or pauses on) and its payload holds what the
    /// type needs (a refusal is a bad event: it pauses its tenant with this reason). Pure and
    /// cheap; the default admits everything.
    fn admit(&self, event: &OutboxEvent) -> Result<(), BadEventReason> {
        let _ = event;
        Ok(())
    }

    /// Handles `event`, this `attempt`.
    fn handle(
        &self,
        event: &OutboxEvent,
        attempt: &Attempt,
    ) -> impl std::future::Future<Output = Outcome> + Send;

    /// The mappings this integration stages while it handles events, if it keeps any: the
    /// consumer writes what an event staged in the transaction that settles (or parks) it,
    /// and drops what an attempt cut short staged ([`crate::mappings`]).
    fn mappings(&self) -> Option<&crate::mappings::Mappings> {
        None
    }
}

/// When to retry a retryable failure, and when to stop retrying and pause the tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first backoff.
    pub base: Duration,
    /// The largest backoff.
    pub max: Duration,
    /// Pause after this many failed attempts...
    pub pause_after_attempts: u32,
    /// ...or once the first failure is this old, whichever comes first.
    pub pause_after: Duration,
    /// The longest `Retry-After` honoured: a partner asking for an hour does not hold its
    /// tenant (and its partition's commit point) for an hour.
    pub retry_after_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(200),
            max: Duration::from_secs(30),
            pause_after_attempts: 8,
            pause_after: Duration::from_secs(120),
            retry_after_max: Duration::from_secs(60),
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try the same event again after this long (the tenant waits; others flow).
    RetryIn(Duration),
    /// Pause the tenant: park this event and its successors.
    PauseTenant,
    /// Trip the partner-wide breaker: pause consumption, probe, resume.
    TripBreaker,
}

impl RetryPolicy {
    /// Decides after attempt number `attempt` (from 1) failed with `failure`, `failing_for`
    /// after the event's first failure. `jitter` in [0, 1) spreads retries (full jitter); the
    /// partner's `Retry-After`, capped at `retry_after_max`, is a floor. A retry that could not
    /// start before `pause_after` has passed pauses the tenant now: waiting would hold the
    /// tenant's partition for nothing.
    pub fn decide(
        &self,
        failure: &Failure,
        attempt: u32,
        failing_for: Duration,
        jitter: f64,
    ) -> Decision {
        match failure.class {
            FailureClass::Permanent => Decision::PauseTenant,
            FailureClass::PartnerWide => Decision::TripBreaker,
            FailureClass::Retryable => {
                if attempt >= self.pause_after_attempts || failing_for >= self.pause_after {
                    return Decision::PauseTenant;
                }
                let ceiling = self
                    .base
                    .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(20))
                    .min(self.max);
                let asked = failure
                    .retry_after
                    .unwrap_or(Duration::ZERO)
                    .min(self.retry_after_max);
                let wait = ceiling.mul_f64(jitter.clamp(0.0, 1.0)).max(asked);
                if failing_for.saturating_add(wait) >= self.pause_after {
                    return Decision::PauseTenant;
                }
                Decision::RetryIn(wait)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(class: FailureClass, retry_after: Option<Duration>) -> Failure {
        Failure {
            class,
            message: "x".into(),
            status: None,
            response: None,
            retry_after,
        }
    }

    #[test]
    fn statuses_map_to_the_design_table() {
        use FailureClass::*;
        let table = [
            (200, None),
            (201, None),
            (204, None),
            (400, Some(Permanent)),
            (404, Some(Permanent)),
            (409, Some(Permanent)),
            (422, Some(Permanent)),
            (401, Some(PartnerWide)),
            (403, Some(PartnerWide)),
            (408, Some(Retryable)),
            (429, Some(Retryable)),
            (500, Some(Retryable)),
            (502, Some(Retryable)),
            (503, Some(Retryable)),
            (504, Some(Retryable)),
        ];
        for (status, class) in table {
            assert_eq!(FailureClass::of_status(status), class, "HTTP {status}");
        }
    }

    #[test]
    fn causes_name_what_went_wrong() {
        let with = |status, class| Failure {
            status,
            ..failure(class, None)
        };
        use FailureClass::*;
        let table = [
            (Some(429), Retryable, "rate_limited"),
            (Some(503), Retryable, "server_error"),
            (Some(408), Retryable, "timeout"),
            (None, Retryable, "timeout"),
            (Some(401), PartnerWide, "unauthorized"),
            (Some(422), Permanent, "rejected"),
            (None, Permanent, "handler"),
        ];
        for (status, class, cause) in table {
            assert_eq!(with(status, class).cause(), cause, "{status:?} {class:?}");
        }
    }

    #[test]
    fn permanent_pauses_at_once_and_partner_wide_trips_the_breaker() {
        let p = RetryPolicy::default();
        let d = |c| p.decide(&failure(c, None), 1, Duration::ZERO, 0.5);
        assert_eq!(d(FailureClass::Permanent), Decision::PauseTenant);
        assert_eq!(d(FailureClass::PartnerWide), Decision::TripBreaker);
    }

    #[test]
    fn retryable_backs_off_exponentially_within_bounds_then_pauses() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            pause_after_attempts: 6,
            pause_after: Duration::from_secs(60),
            retry_after_max: Duration::from_secs(60),
        };
        let f = failure(FailureClass::Retryable, None);
        // With the jitter at its top, the wait is the ceiling: 100, 200, 400, 800, 1600 ms.
        let waits: Vec<Decision> = (1..=5)
            .map(|a| p.decide(&f, a, Duration::ZERO, 0.999_999))
            .collect();
        let ms: Vec<u128> = waits
            .iter()
            .map(|d| match d {
                Decision::RetryIn(w) => w.as_millis(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ms, [99, 199, 399, 799, 1599]);
        assert_eq!(
            p.decide(&f, 6, Duration::ZERO, 0.5),
            Decision::PauseTenant,
            "attempts"
        );
        assert_eq!(
            p.decide(&f, 2, Duration::from_secs(60), 0.5),
            Decision::PauseTenant,
            "duration"
        );
        // The ceiling never passes `max`, however many attempts.
        let long = RetryPolicy {
            pause_after_attempts: 100,
            ..p.clone()
        };
        assert_eq!(
            long.decide(&f, 40, Duration::ZERO, 0.999_999),
            Decision::RetryIn(Duration::from_secs(2).mul_f64(0.999_999))
        );
        // No jitter at all is a retry now.
        assert_eq!(
            p.decide(&f, 3, Duration::ZERO, 0.0),
            Decision::RetryIn(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_is_honoured_as_a_floor() {
        let p = RetryPolicy::default();
        let f = failure(FailureClass::Retryable, Some(Duration::from_secs(7)));
        assert_eq!(
            p.decide(&f, 1, Duration::ZERO, 0.1),
            Decision::RetryIn(Duration::from_secs(7))
        );
    }

    #[test]
    fn retry_after_is_capped_and_never_holds_a_tenant_past_pause_after() {
        // The fault seen: 429 with Retry-After: 3600 under a 5 s pause_after.
        let p = RetryPolicy {
            pause_after: Duration::from_secs(5),
            retry_after_max: Duration::from_secs(2),
            ..RetryPolicy::default()
        };
        let hour = failure(FailureClass::Retryable, Some(Duration::from_secs(3600)));
        assert_eq!(
            p.decide(&hour, 1, Duration::ZERO, 0.0),
            Decision::RetryIn(Duration::from_secs(2)),
            "capped"
        );
        assert_eq!(
            p.decide(&hour, 2, Duration::from_secs(3), 0.0),
            Decision::PauseTenant,
            "a retry at 5 s or later would pass pause_after: pause now"
        );
        let long = RetryPolicy {
            retry_after_max: Duration::from_secs(3600),
            ..p
        };
        assert_eq!(
            long.decide(&hour, 1, Duration::ZERO, 0.0),
            Decision::PauseTenant,
            "honouring an hour would hold the tenant past pause_after"
        );
    }
}
