//! Intake: a Kafka record becomes an [`Arrival`], a decoded event or a record the decoder
//! refused, each with the copy to park should its tenant be paused. What waits in a tenant's
//! queue is a [`Queued`].

use std::time::Duration;

use rdkafka::message::{Headers, Message};
use uuid::Uuid;

use super::attempt::Item;
use super::ledger::{ParkedRecord, Pause, Settlement};
use super::rebalance::Position;
use crate::config::UnknownEventTypes;
use crate::delivery::Handler;
use crate::outbox;

/// Records taken from Kafka in one turn of the loop, at most: one dedupe query for them all.
pub(super) const INTAKE_BATCH: usize = 500;

/// How long intake waits for more records to fill a batch.
pub(super) const INTAKE_LINGER: Duration = Duration::from_millis(2);

/// Dedupe lookups under way at once, at most (each holds a connection while it runs; the rest
/// of the pool is for settling).
pub(super) const MAX_LOOKUPS: usize = 4;

/// A record on its way from intake to admission.
pub(super) enum Arrival {
    /// A decoded event (boxed: it moves from intake to settlement many times).
    Event(Box<Item>),
    /// A record the decoder refused.
    Bad(Box<Refused>),
}

/// A record the decoder refused: when its turn comes it pauses its tenant with the decoder's
/// reason and is parked first in the backlog.
pub(super) struct Refused {
    pub(super) raw: ParkedRecord,
    pub(super) position: Position,
    pub(super) pause: Pause,
    /// The event's type, when the decoder refused it for being of a type it does not know.
    pub(super) unknown_type: Option<String>,
}

/// What waits in a tenant's queue. A refused record waits its turn like an event: if the
/// tenant's event in flight fails too, that event must be parked ahead of it.
pub(super) enum Queued {
    Event(Box<Item>),
    Refused(Box<Refused>),
}

impl Queued {
    /// The id of the event waiting, if decoded.
    pub(super) fn event_id(&self) -> Option<Uuid> {
        match self {
            Queued::Event(item) => Some(item.event.id),
            Queued::Refused(_) => None,
        }
    }

    /// Where it was read.
    pub(super) fn position(&self) -> Position {
        match self {
            Queued::Event(item) => item.position,
            Queued::Refused(r) => r.position,
        }
    }

    /// The record to park, and where it came from.
    pub(super) fn into_parked(self) -> (ParkedRecord, Position) {
        match self {
            Queued::Event(item) => (item.raw, item.position),
            Queued::Refused(r) => (r.raw, r.position),
        }
    }
}

/// The record `m`, copied out of librdkafka's buffer: what the coordinator takes in, and parks
/// should its tenant be paused. Filed under its key until decoded.
pub(super) fn parked_record<M: Message>(m: &M) -> ParkedRecord {
    ParkedRecord {
        tenant_id: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
        event_id: None,
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        headers: m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default(),
        value: m.payload().map(<[u8]>::to_vec),
        timestamp: m
            .timestamp()
            .to_millis()
            .and_then(chrono::DateTime::from_timestamp_millis),
    }
}

/// Whether `record` is addressed to an integration other than `integration`: its
/// `integration` header names another (as written, or JSON-quoted by a converter).
pub(super) fn for_another(record: &ParkedRecord, integration: &str) -> bool {
    record.headers.iter().any(|(key, value)| {
        key == outbox::header::INTEGRATION
            && value
                .as_deref()
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(|v| v.trim().trim_matches('"'))
                .is_some_and(|v| !v.is_empty() && v != integration)
    })
}

/// The record as an event `handler` admits, or why not: the wire contract's decoder, then the
/// integration's own check of the type and payload ([`Handler::admit`]).
pub(super) fn decode<H: Handler>(
    handler: &H,
    record: &outbox::RawRecord<'_>,
) -> Result<outbox::OutboxEvent, outbox::BadEvent> {
    let event = outbox::decode(record)?;
    match handler.admit(&event) {
        Ok(()) => Ok(event),
        Err(reason) => Err(outbox::BadEvent {
            reason,
            tenant_id: Some(event.tenant_id),
            event_id: Some(event.id),
            event_type: Some(event.event_type),
        }),
    }
}

/// Decodes `raw`, read at `position` (from Kafka, or set aside for parking and taken back
/// because its tenant turned out to be live). The parked copy names the event and its tenant
/// as decoded, so a replay can dedupe it and the backlog is filed under the right tenant.
pub(super) fn arrival<H: Handler>(
    handler: &H,
    mut raw: ParkedRecord,
    position: Position,
) -> Arrival {
    match decode(handler, &raw_of(&raw)) {
        Ok(event) => {
            raw.event_id = Some(event.id);
            raw.tenant_id = event.tenant_id.to_string();
            event_arrival(event, raw, position)
        }
        Err(bad) => {
            raw.event_id = bad.event_id;
            raw.tenant_id = bad
                .tenant_id
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), |t| t.to_string());
            refused(raw, position, &bad)
        }
    }
}

/// A decoded event on its way in, not yet looked up.
fn event_arrival(event: outbox::OutboxEvent, raw: ParkedRecord, position: Position) -> Arrival {
    Arrival::Event(Box::new(Item {
        event,
        raw,
        position,
        settled: false,
        log: Vec::new(),
        log_every: false,
        // The coordinator tells, from the partition's ownership.
        seen_before: true,
        // The coordinator tells, from the dedupe lookup.
        unrecorded: false,
    }))
}

/// A record the decoder refused: it pauses its tenant with the decoder's reason.
fn refused(raw: ParkedRecord, position: Position, bad: &outbox::BadEvent) -> Arrival {
    let pause = Pause {
        cause: "bad_event",
        reason: bad.reason.to_string(),
        event_id: bad.event_id,
        next_retry_at: None,
        attempts: 0,
        response: None,
    };
    let unknown_type = unknown_type(bad).map(str::to_owned);
    Arrival::Bad(Box::new(Refused {
        raw,
        position,
        pause,
        unknown_type,
    }))
}

/// The event's type, when the decoder refused it for being of a type it does not know.
pub(super) fn unknown_type(bad: &outbox::BadEvent) -> Option<&str> {
    match &bad.reason {
        outbox::BadEventReason::UnknownEventType(t) => Some(t),
        _ => None,
    }
}

/// The settlement of `raw`, refused as an event of type `unknown_type` the integration does not
/// know, as ignored: when the policy says to ignore those (`consume.unknown_event_types`), live
/// or in a backlog's replay alike.
pub(super) fn ignored(
    policy: UnknownEventTypes,
    raw: &ParkedRecord,
    unknown_type: Option<&str>,
) -> Option<Settlement> {
    if policy != UnknownEventTypes::Ignore {
        return None;
    }
    Settlement::unknown_type(raw, unknown_type?)
}

/// The decoder's view of a parked record.
pub(super) fn raw_of(raw: &ParkedRecord) -> outbox::RawRecord<'_> {
    outbox::RawRecord {
        key: raw.key.as_deref(),
        headers: raw
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_deref()))
            .collect(),
        value: raw.value.as_deref(),
        timestamp_ms: raw.timestamp.map(|t| t.timestamp_millis()),
    }
}

impl Arrival {
    /// The event's id, for the dedupe lookup (a refused record has none to look up).
    pub(super) fn event_id(&self) -> Option<Uuid> {
        match self {
            Arrival::Event(item) => Some(item.event.id),
            Arrival::Bad(_) => None,
        }
    }

    /// Where it was read.
    pub(super) fn position(&self) -> Position {
        match self {
            Arrival::Event(item) => item.position,
            Arrival::Bad(r) => r.position,
        }
    }

    /// Its tenant, as decoded (or `unknown`).
    pub(super) fn tenant(&self) -> &str {
        match self {
            Arrival::Event(item) => &item.raw.tenant_id,
            Arrival::Bad(r) => &r.raw.tenant_id,
        }
    }

    /// The record to park, and where it came from.
    pub(super) fn into_parked(self) -> (ParkedRecord, Position) {
        match self {
            Arrival::Event(item) => (item.raw, item.position),
            Arrival::Bad(r) => (r.raw, r.position),
        }
    }
}
