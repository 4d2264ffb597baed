//! The consumer's durable records in Postgres: the dedupe/outcome record of settled events
//! (`deliveries`), the parked backlog of paused tenants (`parked_events`), and tenant state
//! (`tenants`). Every write is batched: one transaction for many events, because a commit costs
//! a disk flush and per-event commits would cap throughput at the commit rate.
//!
//! Every record is filed under its integration (`integration`, the first argument after the
//! connection): each integration is a consumer group of its own on the same outbox topic, so
//! two of them settle the same event id each for itself, and a tenant paused for one partner
//! keeps flowing to another.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// How an event was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettledAs {
    /// Delivered to the partner.
    Delivered,
    /// Past its `deliver_before`: never delivered.
    Expired,
    /// The tenant has the integration off: recorded, nothing sent.
    Ignored,
    /// Skipped by an operator (audited separately).
    Skipped,
    /// Undecodable: recorded with its reason.
    BadEvent,
}

impl SettledAs {
    /// The outcome as `deliveries` files it.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            SettledAs::Delivered => "delivered",
            SettledAs::Expired => "expired",
            SettledAs::Ignored => "ignored",
            SettledAs::Skipped => "skipped",
            SettledAs::BadEvent => "bad_event",
        }
    }
}

/// One settled event, for [`settle`].
#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    /// The event id (the dedupe key).
    pub event_id: Uuid,
    /// Its tenant.
    pub tenant_id: String,
    /// Its type, as written.
    pub event_type: Option<String>,
    /// The outcome.
    pub outcome: SettledAs,
    /// Attempts made.
    pub attempts: i32,
    /// The last error, for bad events.
    pub error: Option<String>,
    /// Where it was read.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// When the event was written to the outbox (its record's timestamp).
    pub written_at: Option<DateTime<Utc>>,
    /// When the partner acknowledged it (delivered events).
    pub acked_at: Option<DateTime<Utc>>,
    /// The dedupe lookup found no record of it: [`settle`] writes it with `COPY`.
    /// `false` (the conflict clause) is always safe.
    pub unrecorded: bool,
}

impl Settlement {
    /// `event`, read at `attempt`'s record, settled as `outcome` after `attempt.number` attempts;
    /// a delivered event counts as acknowledged now.
    pub fn new(
        event: &crate::outbox::OutboxEvent,
        attempt: &crate::delivery::Attempt,
        outcome: SettledAs,
    ) -> Settlement {
        Settlement {
            event_id: event.id,
            tenant_id: event.tenant_id.to_string(),
            event_type: Some(event.event_type.clone()),
            outcome,
            attempts: attempt.number as i32,
            error: None,
            topic: attempt.topic.clone(),
            partition: attempt.partition,
            offset: attempt.offset,
            written_at: event.occurred_at,
            acked_at: (outcome == SettledAs::Delivered).then(Utc::now),
            unrecorded: false,
        }
    }

    /// The record `raw`, an event of type `event_type` the integration does not know, settled
    /// as ignored (`consume.unknown_event_types = ignore`); `None` when its id is unreadable,
    /// so nothing could record it.
    pub fn unknown_type(raw: &ParkedRecord, event_type: &str) -> Option<Settlement> {
        Some(Settlement {
            event_id: raw.event_id?,
            tenant_id: raw.tenant_id.clone(),
            event_type: Some(event_type.to_owned()),
            outcome: SettledAs::Ignored,
            attempts: 0,
            error: Some(format!(
                "unknown event type `{event_type}`: ignored (consume.unknown_event_types = ignore)"
            )),
            topic: raw.topic.clone(),
            partition: raw.partition,
            offset: raw.offset,
            written_at: raw.timestamp,
            acked_at: None,
            unrecorded: false,
        })
    }
}

/// The dedupe lookup: which of the ids `$2` the integration `$1` has a record of, and whether
/// that record settled (an unsettled one is an event that failed and paused its tenant).
///
/// One probe of the primary key per id, whatever the planner knows of `deliveries`. The plain
/// form, `event_id = ANY($2)`, is planned from the table's statistics, and a table not yet
/// analyzed (a deployment's first minutes, a new integration's first rows) has none: the
/// planner then takes 500 ids for most of the table and reads every row the integration has
/// (45 ms at 200,000 rows, growing with the table; 2 ms as probes). Here each id is looked up by
/// a subquery the planner cannot merge into a join (its `LIMIT`), so the only plans are
/// index probes. (Also planned afresh on every call, as every statement on a pool from
/// [`crate::store::connect`].)
pub const RECORDED_IDS: &str = "SELECT i.event_id, r.settled FROM unnest($2::uuid[]) AS i(event_id) \
     CROSS JOIN LATERAL (SELECT d.settled_at IS NOT NULL AS settled FROM deliveries d \
         WHERE d.integration = $1 AND d.event_id = i.event_id LIMIT 1) AS r";

/// What the dedupe lookup found of a batch of event ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Settled already: a redelivery, skipped rather than handled again.
    pub settled: HashSet<Uuid>,
    /// On record without a settlement: failed before (its tenant paused), to be settled now.
    pub unsettled: HashSet<Uuid>,
}

impl Recorded {
    /// Whether `id` has a record of either kind.
    pub fn knows(&self, id: &Uuid) -> bool {
        self.settled.contains(id) || self.unsettled.contains(id)
    }
}

/// What `integration` has on record of `ids`: the dedupe lookup ([`RECORDED_IDS`]).
pub async fn recorded_ids(
    pool: &PgPool,
    integration: &str,
    ids: &[Uuid],
) -> Result<Recorded, sqlx::Error> {
    let found: Vec<(Uuid, bool)> = sqlx::query_as(RECORDED_IDS)
        .bind(integration)
        .bind(ids)
        .fetch_all(pool)
        .await?;
    let mut recorded = Recorded::default();
    for (id, settled) in found {
        if settled {
            recorded.settled.insert(id);
        } else {
            recorded.unsettled.insert(id);
        }
    }
    Ok(recorded)
}

/// The event ids among `ids` already settled: a redelivered event is skipped, not handled again.
pub async fn settled_ids(
    pool: &PgPool,
    integration: &str,
    ids: &[Uuid],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    Ok(recorded_ids(pool, integration, ids).await?.settled)
}

/// The settlement's insert: one row per event, from arrays (one statement for the batch). An
/// event already on record: a settled one keeps its first record; an unsettled one (failed
/// before) is settled now, its attempts added up.
const INSERT_SETTLED: &str = "INSERT INTO deliveries (event_id, tenant_id, event_type, outcome, \
         attempts, last_error, topic, partition, \"offset\", written_at, acked_at, settled_at, \
         integration) \
     SELECT *, now(), $12 FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], \
                                      $6::text[], $7::text[], $8::int[], $9::bigint[], \
                                      $10::timestamptz[], $11::timestamptz[]) \
     ON CONFLICT (integration, event_id) DO UPDATE SET outcome = EXCLUDED.outcome, \
         attempts = deliveries.attempts + EXCLUDED.attempts, written_at = EXCLUDED.written_at, \
         acked_at = EXCLUDED.acked_at, settled_at = now(), updated_at = now(), \
         event_type = coalesce(deliveries.event_type, EXCLUDED.event_type), \
         topic = coalesce(deliveries.topic, EXCLUDED.topic), \
         partition = coalesce(deliveries.partition, EXCLUDED.partition), \
         \"offset\" = coalesce(deliveries.\"offset\", EXCLUDED.\"offset\") \
     WHERE deliveries.settled_at IS NULL";

/// Records `batch` as its transaction's first write ([`settle`] says why): the unrecorded with
/// `COPY`, the rest through the conflict clause; how many rows it wrote.
async fn record_settled(
    conn: &mut sqlx::PgConnection,
    integration: &str,
    batch: &[Settlement],
) -> Result<u64, sqlx::Error> {
    let (unrecorded, known): (Vec<&Settlement>, Vec<&Settlement>) =
        batch.iter().partition(|s| s.unrecorded);
    let mut written = 0;
    if !unrecorded.is_empty() {
        written += copy_settled(&mut *conn, integration, &unrecorded).await?;
    }
    written += insert_settled(conn, integration, &known).await?;
    Ok(written)
}

/// `batch`, none of it on record, written with `COPY`; how many rows it wrote. Settled at the
/// consumer's clock rather than the transaction's `now()`, which `COPY` cannot compute.
async fn copy_settled(
    conn: &mut sqlx::PgConnection,
    integration: &str,
    batch: &[&Settlement],
) -> Result<u64, sqlx::Error> {
    let rows = super::settled_copy::encode(integration, batch, Utc::now());
    let mut copy = conn.copy_in_raw(super::settled_copy::COPY_SETTLED).await?;
    copy.send(rows).await?;
    copy.finish().await
}

/// Whether `e` is Postgres refusing a row that breaks a unique index.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// [`INSERT_SETTLED`] of `batch`; how many rows it wrote.
async fn insert_settled(
    conn: &mut sqlx::PgConnection,
    integration: &str,
    batch: &[&Settlement],
) -> Result<u64, sqlx::Error> {
    if batch.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(batch.len());
    let mut tenants = Vec::with_capacity(batch.len());
    let mut types = Vec::with_capacity(batch.len());
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut attempts = Vec::with_capacity(batch.len());
    let mut errors = Vec::with_capacity(batch.len());
    let mut topics = Vec::with_capacity(batch.len());
    let mut partitions = Vec::with_capacity(batch.len());
    let mut offsets = Vec::with_capacity(batch.len());
    let mut written = Vec::with_capacity(batch.len());
    let mut acked = Vec::with_capacity(batch.len());
    for s in batch {
        ids.push(s.event_id);
        tenants.push(s.tenant_id.as_str());
        types.push(s.event_type.as_deref());
        outcomes.push(s.outcome.as_str());
        attempts.push(s.attempts);
        errors.push(s.error.as_deref());
        topics.push(s.topic.as_str());
        partitions.push(s.partition);
        offsets.push(s.offset);
        written.push(s.written_at);
        acked.push(s.acked_at);
    }
    let result = sqlx::query(INSERT_SETTLED)
        .bind(&ids)
        .bind(&tenants)
        .bind(&types)
        .bind(&outcomes)
        .bind(&attempts)
        .bind(&errors)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&written)
        .bind(&acked)
        .bind(integration)
        .execute(conn)
        .await?;
    Ok(result.rows_affected())
}

/// A raw record to park, as read from Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedRecord {
    /// The tenant it belongs to.
    pub tenant_id: String,
    /// The event id, when readable.
    pub event_id: Option<Uuid>,
    /// Where it was read.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The record key.
    pub key: Option<Vec<u8>>,
    /// Header names and values, in record order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The record value.
    pub value: Option<Vec<u8>>,
    /// The record timestamp.
    pub timestamp: Option<DateTime<Utc>>,
}

/// Why a tenant is paused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// `retryable`, `permanent`, `bad_event` or `operator`.
    pub cause: &'static str,
    /// For the operator.
    pub reason: String,
    /// The event that failed, when there is one.
    pub event_id: Option<Uuid>,
    /// When to try again automatically (retryable causes).
    pub next_retry_at: Option<DateTime<Utc>>,
    /// Attempts made at the failing event.
    pub attempts: u32,
    /// The partner's last answer to it: `{"status": 422, "body": "..."}`.
    pub response: Option<serde_json::Value>,
}

/// Records per statement when parking.
const PARK_CHUNK: usize = 500;

/// Pauses `tenant` (if `pause` is given) and parks `records` in order, in one transaction: once
/// it commits, the records are settled and the partition's commit point may pass them. A record
/// parked before (a redelivery) is parked once. Only records of a tenant that is paused or
/// draining are parked: a batch written late by an instance that lost the partition, after the
/// new owner replayed the backlog and flipped the tenant live, parks nothing (the new owner read
/// those records again itself, since they were never settled). A tenant an operator paused
/// stays paused by the operator (no automatic retry) when the event in flight then fails: the
/// failure is added to the reason and becomes the failing event.
pub async fn park(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    pause: Option<&Pause>,
    records: &[ParkedRecord],
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let parked = park_in(&mut tx, integration, tenant, pause, records).await?;
    tx.commit().await?;
    Ok(parked)
}

/// [`park`], inside the caller's transaction.
pub async fn park_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    integration: &str,
    tenant: &str,
    pause: Option<&Pause>,
    records: &[ParkedRecord],
) -> Result<u64, sqlx::Error> {
    if let Some(p) = pause {
        pause_tenant(tx, integration, tenant, p).await?;
        if let Some(event_id) = p.event_id {
            let failing = Failing {
                integration,
                tenant,
                pause: p,
                event_id,
            };
            record_failing_event(tx, &failing, records).await?;
        }
    }
    let mut parked = 0;
    // A statement per chunk: a paused tenant's whole queue (thousands of records) would
    // otherwise be encoded into one statement, and the process's peak memory with it.
    for records in records.chunks(PARK_CHUNK) {
        parked += park_chunk(tx, integration, records).await?;
    }
    Ok(parked)
}

/// Parks `records` whose tenant is paused or draining, in order, in one transaction that holds
/// those tenants' rows (`FOR SHARE`), so none is flipped live (`finish_drain`) before its
/// records are in. Returns how many were stored and the tenants found live: their records are
/// not parked, and the caller must deliver them (its view of the tenant was stale), never
/// count them settled.
pub async fn park_held(
    pool: &PgPool,
    integration: &str,
    records: &[ParkedRecord],
) -> Result<(u64, HashSet<String>), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut tenants: Vec<&str> = records.iter().map(|r| r.tenant_id.as_str()).collect();
    tenants.sort_unstable();
    tenants.dedup();
    let held: HashSet<String> = sqlx::query_scalar(
        "SELECT tenant_id FROM tenants \
         WHERE integration = $1 AND tenant_id = ANY($2) AND state IN ('paused', 'draining') \
         ORDER BY tenant_id FOR SHARE",
    )
    .bind(integration)
    .bind(&tenants)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let live: HashSet<String> = tenants
        .into_iter()
        .filter(|t| !held.contains(*t))
        .map(str::to_owned)
        .collect();
    let mut parked = 0;
    if live.is_empty() {
        for chunk in records.chunks(PARK_CHUNK) {
            parked += park_chunk(&mut tx, integration, chunk).await?;
        }
    } else {
        let kept: Vec<ParkedRecord> = records
            .iter()
            .filter(|r| held.contains(&r.tenant_id))
            .cloned()
            .collect();
        for chunk in kept.chunks(PARK_CHUNK) {
            parked += park_chunk(&mut tx, integration, chunk).await?;
        }
    }
    tx.commit().await?;
    Ok((parked, live))
}

/// Marks `tenant` paused for `p` (an operator's pause stays the operator's, the failure added to
/// its reason).
async fn pause_tenant(
    conn: &mut PgConnection,
    integration: &str,
    tenant: &str,
    p: &Pause,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO tenants (tenant_id, state, pause_cause, pause_reason, paused_event_id, paused_at, next_retry_at, updated_at, integration) \
         VALUES ($1, 'paused', $2, $3, $4, now(), $5, now(), $6) \
         ON CONFLICT (integration, tenant_id) DO UPDATE SET state = 'paused', paused_event_id = $4, updated_at = now(), \
             pause_cause = CASE WHEN tenants.state = 'paused' AND tenants.pause_cause = 'operator' \
                                THEN 'operator' ELSE $2 END, \
             pause_reason = CASE WHEN tenants.state = 'paused' AND tenants.pause_cause = 'operator' \
                                 THEN tenants.pause_reason || '; then ' || $3 ELSE $3 END, \
             paused_at = CASE WHEN tenants.state = 'paused' AND tenants.pause_cause = 'operator' \
                              THEN tenants.paused_at ELSE now() END, \
             next_retry_at = CASE WHEN tenants.state = 'paused' AND tenants.pause_cause = 'operator' \
                                  THEN NULL ELSE $5 END",
    )
    .bind(tenant)
    .bind(p.cause)
    .bind(&p.reason)
    .bind(p.event_id)
    .bind(p.next_retry_at)
    .bind(integration)
    .execute(conn)
    .await?;
    Ok(())
}

/// The failing event's record: why, after how many attempts, what the partner said. Not
/// settled: it stays parked until replayed or skipped.
/// The event a tenant was paused on, for [`record_failing_event`].
struct Failing<'a> {
    integration: &'a str,
    tenant: &'a str,
    pause: &'a Pause,
    event_id: Uuid,
}

async fn record_failing_event(
    conn: &mut PgConnection,
    failing: &Failing<'_>,
    records: &[ParkedRecord],
) -> Result<(), sqlx::Error> {
    let Failing {
        integration,
        tenant,
        pause: p,
        event_id,
    } = *failing;
    let at = records.iter().find(|r| r.event_id == Some(event_id));
    // Its type as the record's header names it (readable even when the payload is not).
    let event_type = at.and_then(|r| {
        r.headers
            .iter()
            .find(|(name, _)| name == crate::outbox::header::EVENT_TYPE)
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|v| v.trim_matches('"').to_owned())
    });
    sqlx::query(
        "INSERT INTO deliveries (event_id, tenant_id, outcome, attempts, last_error, last_response, \
                                 topic, partition, \"offset\", event_type, integration) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (integration, event_id) DO UPDATE SET outcome = $3, attempts = deliveries.attempts + $4, \
             last_error = $5, last_response = $6, \
             event_type = coalesce(deliveries.event_type, EXCLUDED.event_type), updated_at = now() \
         WHERE deliveries.settled_at IS NULL",
    )
    .bind(event_id)
    .bind(tenant)
    .bind(if p.cause == "bad_event" { "bad_event" } else { "failed" })
    .bind(p.attempts as i32)
    .bind(&p.reason)
    .bind(&p.response)
    .bind(at.map(|r| r.topic.as_str()))
    .bind(at.map(|r| r.partition))
    .bind(at.map(|r| r.offset))
    .bind(event_type)
    .bind(integration)
    .execute(conn)
    .await?;
    Ok(())
}

/// Parks one chunk of records, in order; how many were new.
async fn park_chunk(
    conn: &mut PgConnection,
    integration: &str,
    records: &[ParkedRecord],
) -> Result<u64, sqlx::Error> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let headers: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            json!(
                r.headers
                    .iter()
                    .map(|(n, v)| json!({"name": n, "value": v.as_ref().map(|v| b64.encode(v))}))
                    .collect::<Vec<_>>()
            )
        })
        .collect();
    let result = sqlx::query(
        "INSERT INTO parked_events (tenant_id, event_id, topic, partition, \"offset\", record_key, headers, value, record_timestamp, integration) \
         SELECT t, e, tp, p, o, k, h, v, ts, $10 FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::int[], $5::bigint[], \
                                               $6::bytea[], $7::jsonb[], $8::bytea[], $9::timestamptz[]) \
              WITH ORDINALITY AS r(t, e, tp, p, o, k, h, v, ts, n) \
         WHERE EXISTS (SELECT 1 FROM tenants x WHERE x.integration = $10 AND x.tenant_id = r.t \
                                                 AND x.state IN ('paused', 'draining')) \
         ORDER BY n \
         ON CONFLICT (integration, topic, partition, \"offset\") DO NOTHING",
    )
    .bind(records.iter().map(|r| r.tenant_id.as_str()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.event_id).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.topic.as_str()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.partition).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.offset).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.key.as_deref()).collect::<Vec<_>>())
    .bind(headers)
    .bind(records.iter().map(|r| r.value.as_deref()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.timestamp).collect::<Vec<_>>())
    .bind(integration)
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// Tenants not active (paused, draining, disabled): loaded on every partition assignment so
/// whichever instance owns a tenant obeys its state.
pub async fn inactive_tenants(
    pool: &PgPool,
    integration: &str,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT tenant_id, state FROM tenants WHERE integration = $1 AND state <> 'active' \
         ORDER BY tenant_id",
    )
    .bind(integration)
    .fetch_all(pool)
    .await
}

/// A tenant's parked backlog in order, oldest first, `limit` at a time after `after_seq`.
pub async fn parked_backlog(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<(i64, ParkedRecord)>, sqlx::Error> {
    let rows: Vec<ParkedRow> = sqlx::query_as(&format!(
        "SELECT {PARKED_COLUMNS} FROM parked_events \
         WHERE integration = $4 AND tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
    ))
    .bind(tenant)
    .bind(after_seq)
    .bind(limit)
    .bind(integration)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(parked_of).collect())
}

/// The columns of a parked record, as [`ParkedRow`] reads them.
const PARKED_COLUMNS: &str = "seq, tenant_id, event_id, topic, partition, \"offset\", record_key, \
                              headers, value, record_timestamp";

/// A parked record's row.
type ParkedRow = (
    i64,
    String,
    Option<Uuid>,
    String,
    i32,
    i64,
    Option<Vec<u8>>,
    serde_json::Value,
    Option<Vec<u8>>,
    Option<DateTime<Utc>>,
);

/// The paused tenant's oldest parked record (the one that failed), locked for this
/// transaction, with its sequence number.
pub(crate) async fn oldest_parked(
    conn: &mut PgConnection,
    integration: &str,
    tenant: &str,
) -> Result<Option<(i64, ParkedRecord)>, sqlx::Error> {
    let row: Option<ParkedRow> = sqlx::query_as(&format!(
        "SELECT {PARKED_COLUMNS} FROM parked_events \
         WHERE integration = $1 AND tenant_id = $2 ORDER BY seq LIMIT 1 FOR UPDATE"
    ))
    .bind(integration)
    .bind(tenant)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(parked_of))
}

/// A parked record from its row: headers back from their JSON form.
fn parked_of(row: ParkedRow) -> (i64, ParkedRecord) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (seq, tenant_id, event_id, topic, partition, offset, key, headers, value, timestamp) = row;
    let headers = headers
        .as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h["name"].as_str().unwrap_or_default().to_owned(),
                        h["value"].as_str().and_then(|v| b64.decode(v).ok()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let record = ParkedRecord {
        tenant_id,
        event_id,
        topic,
        partition,
        offset,
        key,
        headers,
        value,
        timestamp,
    };
    (seq, record)
}

/// Asks for a paused tenant to be resumed (an operator's call, audited): the consumer that owns
/// the tenant replays its parked backlog in order, keeps parking its new events until the
/// backlog is empty, then flips it back to live delivery. Returns false if the tenant was not
/// paused.
pub async fn request_resume(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    actor: &str,
    reason: &str,
) -> Result<bool, sqlx::Error> {
    match resume(pool, integration, tenant, actor, reason).await {
        Ok(()) => Ok(true),
        Err(ActionError::Postgres(e)) => Err(e),
        Err(_) => Ok(false),
    }
}

/// [`request_resume`], saying why nothing was done.
pub async fn resume(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    actor: &str,
    reason: &str,
) -> Result<(), ActionError> {
    let what = "not paused: nothing to resume";
    drain_by_operator(pool, integration, tenant, actor, reason, "resume", what).await
}

/// Retries a paused tenant now (audited): its owner replays the backlog at once instead of at
/// the scheduled `next_retry_at`. Same effect as a resume; a separate action in the audit trail
/// because it says "the cause may have gone" rather than "the cause was fixed".
pub async fn retry_now(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    actor: &str,
    reason: &str,
) -> Result<(), ActionError> {
    let what = "not paused: nothing to retry";
    drain_by_operator(pool, integration, tenant, actor, reason, "retry", what).await
}

/// Moves a paused tenant to `draining` and audits it as `action`, in one transaction.
async fn drain_by_operator(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    actor: &str,
    reason: &str,
    action: &str,
    what: &'static str,
) -> Result<(), ActionError> {
    let mut tx = pool.begin().await?;
    if !start_drain(&mut tx, integration, tenant).await? {
        return Err(wrong_state(&mut tx, integration, tenant, "not_paused", what).await?);
    }
    let action = Action {
        integration,
        tenant,
        actor,
        action,
        reason,
    };
    audit(&mut tx, &action, json!({})).await?;
    tx.commit().await?;
    Ok(())
}

/// Moves a paused tenant to `draining` (its owner replays the backlog); false if it was not
/// paused.
pub(crate) async fn start_drain(
    conn: &mut sqlx::PgConnection,
    integration: &str,
    tenant: &str,
) -> Result<bool, sqlx::Error> {
    let changed = sqlx::query(
        "UPDATE tenants SET state = 'draining', next_retry_at = NULL, updated_at = now() \
         WHERE integration = $2 AND tenant_id = $1 AND state = 'paused'",
    )
    .bind(tenant)
    .bind(integration)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(changed == 1)
}

/// What an operator skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The skipped record's event id, when it had a readable one.
    pub event_id: Option<Uuid>,
    /// Where it was read.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

/// Skips the paused tenant's oldest parked record (the one that failed: it is always parked
/// first), records it as `skipped` with who and why, and resumes the tenant, in one
/// transaction. `None` when the tenant is not paused or has nothing parked.
pub async fn skip_failed(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    actor: &str,
    reason: &str,
) -> Result<Option<Skipped>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Resumed first, in this transaction: that checks the tenant is paused and holds its row;
    // with nothing parked the transaction is dropped, and it stays paused.
    if !start_drain(&mut tx, integration, tenant).await? {
        return Ok(None);
    }
    let oldest: Option<(Option<Uuid>, String, i32, i64)> = sqlx::query_as(
        "DELETE FROM parked_events WHERE seq = \
             (SELECT seq FROM parked_events WHERE integration = $2 AND tenant_id = $1 \
              ORDER BY seq LIMIT 1) \
         RETURNING event_id, topic, partition, \"offset\"",
    )
    .bind(tenant)
    .bind(integration)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((event_id, topic, partition, offset)) = oldest else {
        return Ok(None);
    };
    if let Some(id) = event_id {
        sqlx::query(
            "INSERT INTO deliveries (event_id, tenant_id, outcome, topic, partition, \"offset\", last_error, settled_at, integration) \
             VALUES ($1, $2, 'skipped', $3, $4, $5, $6, now(), $7) \
             ON CONFLICT (integration, event_id) DO UPDATE SET outcome = 'skipped', settled_at = now(), updated_at = now(), \
                 last_error = EXCLUDED.last_error || coalesce('; it had failed with: ' || deliveries.last_error, '') \
             WHERE deliveries.settled_at IS NULL",
        )
        .bind(id)
        .bind(tenant)
        .bind(&topic)
        .bind(partition)
        .bind(offset)
        .bind(format!("skipped by {actor}: {reason}"))
        .bind(integration)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO operator_actions (actor, action, tenant_id, event_id, reason, details, integration) \
         VALUES ($1, 'skip', $2, $3, $4, $5, $6)",
    )
    .bind(actor)
    .bind(tenant)
    .bind(event_id)
    .bind(reason)
    .bind(json!({"topic": topic, "partition": partition, "offset": offset}))
    .bind(integration)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Skipped {
        event_id,
        partition,
        offset,
    }))
}

/// Tenants to drain now: resumed by an operator, or paused for a retryable cause whose retry
/// time has come (these are moved to `draining` here); each with the partition its backlog's
/// first record was read from, if it has a backlog. The instance owning that partition drains
/// it: the tenant id's own hash may name another partition (a record without a key, filed under
/// `unknown`; a key written as a JSON string, hashed with its quotes).
pub async fn tenants_to_drain(
    pool: &PgPool,
    integration: &str,
) -> Result<Vec<(String, Option<i32>)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE tenants SET state = 'draining', updated_at = now() \
         WHERE integration = $1 \
           AND (state = 'draining' \
                OR (state = 'paused' AND pause_cause = 'retryable' AND next_retry_at <= now())) \
         RETURNING tenant_id, \
                   (SELECT p.partition FROM parked_events p \
                     WHERE p.integration = $1 AND p.tenant_id = tenants.tenant_id \
                     ORDER BY p.seq LIMIT 1)",
    )
    .bind(integration)
    .fetch_all(pool)
    .await
}

/// Removes replayed records from a tenant's backlog (up to and including `seq`), recording their
/// settlements and the attempts at them in the same transaction ([`settle`]).
pub async fn unpark(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    through_seq: i64,
    settlements: &[Settlement],
    writes: (&[AttemptLog], &crate::mappings::Staged),
) -> Result<(), sqlx::Error> {
    let unparked = Some((tenant, through_seq));
    settle(pool, integration, settlements, writes, unparked).await?;
    Ok(())
}

/// Records `settlements`, the `attempts` at them and the `mappings` they learnt in one
/// transaction (so a handler's own writes commit with their dedupe record), and removes the
/// records `unparked` names from their tenant's backlog (up to and including a `seq`) in it
/// too; returns how many settlements it wrote. An event already settled keeps its first
/// record: replays never rewrite history. One that failed before (recorded unsettled when its
/// tenant paused) is settled now, its attempts added up.
///
/// Events the dedupe lookup found no record of ([`Settlement::unrecorded`]) are written with
/// `COPY` ([`super::settled_copy`]), which has no conflict clause: the clause checks the
/// primary key once more per row before inserting (a fifth of Postgres's work per event in the
/// consumer's overhead benchmark), and no row can appear for them meanwhile unless an earlier
/// owner of the partition settles them late. Such a late row fails the `COPY`. The settlements
/// are the transaction's first write, so the `COPY` needs no savepoint (two round trips of
/// every batch): the transaction is rolled back and written again whole, every settlement
/// through the conflict clause.
pub async fn settle(
    pool: &PgPool,
    integration: &str,
    settlements: &[Settlement],
    (attempts, mappings): (&[AttemptLog], &crate::mappings::Staged),
    unparked: Option<(&str, i64)>,
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let written = match record_settled(&mut tx, integration, settlements).await {
        Err(e) if is_unique_violation(&e) => {
            // A late row. The transaction holds nothing else yet: write it again, every
            // settlement through the conflict clause.
            tx.rollback().await?;
            tx = pool.begin().await?;
            let all: Vec<&Settlement> = settlements.iter().collect();
            insert_settled(&mut tx, integration, &all).await?
        }
        other => other?,
    };
    mappings.write(&mut tx, integration).await?;
    record_attempts(&mut tx, integration, attempts).await?;
    if let Some((tenant, through_seq)) = unparked {
        sqlx::query(
            "DELETE FROM parked_events WHERE integration = $3 AND tenant_id = $1 AND seq <= $2",
        )
        .bind(tenant)
        .bind(through_seq)
        .bind(integration)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(written)
}

/// Flips a drained tenant back to live delivery if its backlog is empty (the caller is the only
/// one parking for it, so nothing can arrive in between). Returns whether it flipped.
pub async fn finish_drain(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
) -> Result<bool, sqlx::Error> {
    let flipped = sqlx::query(
        "UPDATE tenants SET state = 'active', pause_cause = NULL, pause_reason = NULL, \
                paused_event_id = NULL, paused_at = NULL, next_retry_at = NULL, updated_at = now() \
         WHERE integration = $2 AND tenant_id = $1 AND state = 'draining' \
           AND NOT EXISTS (SELECT 1 FROM parked_events WHERE integration = $2 AND tenant_id = $1)",
    )
    .bind(tenant)
    .bind(integration)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(flipped == 1)
}

/// One attempt at an event, for the operator's history (`delivery_attempts`). Attempts are
/// recorded for events that failed at least once: every attempt of theirs, the last one
/// included. A first-try delivery has its `deliveries` row only (attempts = 1), which keeps a
/// healthy stream at one row per event.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptLog {
    /// The event.
    pub event_id: Uuid,
    /// Counts from 1 (attempts of a replay go on from the number recorded before).
    pub attempt: i32,
    /// When the attempt started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// `delivered`, `ignored`, `failed` or `deferred`.
    pub outcome: &'static str,
    /// The failure's cause and message, for a failed attempt.
    pub error: Option<String>,
    /// The partner's answer, `{"status": 503, "body": "..."}`, when there was one.
    pub response: Option<serde_json::Value>,
    /// Which consumer made it (host and process).
    pub instance: String,
}

/// Records attempts, in the caller's transaction; an attempt recorded before is kept.
/// Attempt numbers of an event already recorded (it failed, was parked, and is now replayed)
/// go on after the highest one recorded, so the history reads in order.
pub async fn record_attempts(
    conn: &mut sqlx::PgConnection,
    integration: &str,
    attempts: &[AttemptLog],
) -> Result<u64, sqlx::Error> {
    if attempts.is_empty() {
        return Ok(0);
    }
    let result = sqlx::query(
        "INSERT INTO delivery_attempts (event_id, attempt, started_at, finished_at, outcome, error, response, instance, integration) \
         SELECT a.e, a.n + coalesce((SELECT max(attempt) FROM delivery_attempts d \
                                     WHERE d.integration = $9 AND d.event_id = a.e \
                                       AND d.started_at < a.s), 0), \
                a.s, a.f, a.o, a.err, a.r, a.i, $9 \
         FROM UNNEST($1::uuid[], $2::int[], $3::timestamptz[], $4::timestamptz[], $5::text[], \
                     $6::text[], $7::jsonb[], $8::text[]) AS a(e, n, s, f, o, err, r, i) \
         ON CONFLICT (integration, event_id, attempt) DO NOTHING",
    )
    .bind(attempts.iter().map(|a| a.event_id).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.attempt).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.started_at).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.finished_at).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.outcome).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.error.as_deref()).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.response.clone()).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.instance.as_str()).collect::<Vec<_>>())
    .bind(integration)
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// Why an operator's action on a tenant did nothing.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// No such tenant.
    #[error("no tenant {0:?} is known to Ferry")]
    UnknownTenant(String),
    /// The tenant is in a state the action does not apply to.
    #[error("tenant {tenant:?} is {state}, {what}")]
    WrongState {
        /// The tenant.
        tenant: String,
        /// Its state.
        state: String,
        /// Why that stops the action.
        what: &'static str,
        /// A stable name for it: `not_paused`, `not_active`.
        code: &'static str,
    },
    /// The database failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
}

/// Why an action found `tenant` in the wrong state (or found no such tenant).
pub async fn wrong_state(
    conn: &mut sqlx::PgConnection,
    integration: &str,
    tenant: &str,
    code: &'static str,
    what: &'static str,
) -> Result<ActionError, sqlx::Error> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM tenants WHERE integration = $2 AND tenant_id = $1")
            .bind(tenant)
            .bind(integration)
            .fetch_optional(conn)
            .await?;
    Ok(match state {
        None => ActionError::UnknownTenant(tenant.to_owned()),
        Some(state) => ActionError::WrongState {
            tenant: tenant.to_owned(),
            state,
            what,
            code,
        },
    })
}

/// Pauses an active tenant by hand (audited). The instance that owns the tenant's partition
/// notices within its `kill_switch_interval`: an attempt already under way ends first, then the
/// tenant's queue and its later events are parked in order, and nothing more is sent until an
/// operator resumes it.
pub async fn pause_by_operator(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    actor: &str,
    reason: &str,
) -> Result<(), ActionError> {
    let mut tx = pool.begin().await?;
    let changed = sqlx::query(
        "UPDATE tenants SET state = 'paused', pause_cause = 'operator', pause_reason = $2, \
                paused_event_id = NULL, paused_at = now(), next_retry_at = NULL, updated_at = now() \
         WHERE integration = $3 AND tenant_id = $1 AND state = 'active'",
    )
    .bind(tenant)
    .bind(format!("paused by {actor}: {reason}"))
    .bind(integration)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed != 1 {
        return Err(wrong_state(
            &mut tx,
            integration,
            tenant,
            "not_active",
            "only an active tenant can be paused",
        )
        .await?);
    }
    let action = Action {
        integration,
        tenant,
        actor,
        action: "pause",
        reason,
    };
    audit(&mut tx, &action, json!({})).await?;
    tx.commit().await?;
    Ok(())
}

/// Replays a tenant's events written since `since` (audited): each outbox row of the tenant
/// from then on is written to the outbox again as a new event (a new id, so neither the dedupe
/// record nor the partner's idempotency keys swallow it), in the order Kafka carried the
/// originals. The copies go through the same path as live traffic (the change feed, the
/// tenant's partition, its queue), so they are ordered after everything committed before the
/// replay and before everything committed after it. Returns how many events were written.
pub async fn replay_since(
    pool: &PgPool,
    integration: &str,
    tenant: &str,
    since: DateTime<Utc>,
    actor: &str,
    reason: &str,
) -> Result<u64, ActionError> {
    let mut tx = pool.begin().await?;
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM tenants WHERE integration = $2 AND tenant_id = $1) \
             OR EXISTS (SELECT 1 FROM outbox WHERE tenant_id = $1)",
    )
    .bind(tenant)
    .bind(integration)
    .fetch_one(&mut *tx)
    .await?;
    if !known {
        return Err(ActionError::UnknownTenant(tenant.to_owned()));
    }
    // Kafka's order is the truth for what was delivered (`deliveries` keeps each event's
    // position); rows not consumed yet follow in the order they were written. A tenant's events
    // all live on one partition, so offsets compare. The rows are inserted in that order (which
    // is the WAL's, hence the change feed's), and their `created_at` keeps it for readers.
    // The copies are this integration's alone: every other one records them as ignored, so a
    // replay for one partner sends nothing twice to another.
    let written = sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, tenant_id, traceparent, deliver_before, created_at, integration) \
         SELECT gen_random_uuid(), aggregatetype, aggregateid, type, payload, tenant_id, NULL, deliver_before, \
                now() + n * interval '1 microsecond', $3 \
         FROM (SELECT o.*, row_number() OVER (ORDER BY d.\"offset\" NULLS LAST, o.created_at, o.id) AS n \
               FROM outbox o LEFT JOIN deliveries d ON d.integration = $3 AND d.event_id = o.id \
               WHERE o.tenant_id = $1 AND o.created_at >= $2 \
                 AND (o.integration IS NULL OR o.integration = $3)) history \
         ORDER BY n",
    )
    .bind(tenant)
    .bind(since)
    .bind(integration)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let action = Action {
        integration,
        tenant,
        actor,
        action: "replay",
        reason,
    };
    audit(&mut tx, &action, json!({"since": since, "events": written})).await?;
    tx.commit().await?;
    Ok(written)
}

/// An operator's action on one integration's tenant, for the audit trail.
#[derive(Debug, Clone, Copy)]
pub struct Action<'a> {
    /// The integration.
    pub integration: &'a str,
    /// The tenant.
    pub tenant: &'a str,
    /// Who.
    pub actor: &'a str,
    /// What (`resume`, `webhook_set`...).
    pub action: &'a str,
    /// Why.
    pub reason: &'a str,
}

/// Records `action`, with `details`, in `operator_actions`.
pub async fn audit(
    conn: &mut sqlx::PgConnection,
    action: &Action<'_>,
    details: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO operator_actions (actor, action, tenant_id, reason, details, integration) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(action.actor)
    .bind(action.action)
    .bind(action.tenant)
    .bind(action.reason)
    .bind(details)
    .bind(action.integration)
    .execute(conn)
    .await?;
    Ok(())
}
