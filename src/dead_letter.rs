//! The terminal policy's dead letters: what happens to an event an operator gives up on. With
//! `consume.dead_letter_topic` unset, `skip` settles it as `skipped` with an audit row. Set, the
//! skip exports it first, with every attempt at it, to that topic, then settles it as
//! `dead_lettered` and the tenant goes on; `ferry dead-letters copy-back` later writes a
//! tenant's dead letters back into its stream, in the order they were exported, each once.
//!
//! Why nothing is lost or doubled:
//! - **Export before removal.** The skip's transaction holds the parked record (`FOR UPDATE`),
//!   produces it to the topic and waits for the broker's acknowledgement, and only then
//!   deletes it and records the export (`dead_letters`, which names the topic's record). A
//!   broker that does not answer fails the skip: the event stays parked and the tenant paused.
//!   A commit that fails after the acknowledgement leaves a record in the topic that
//!   `dead_letters` does not name: copy-back ignores it, and the skip can be asked again.
//! - **Copy-back once, in order.** Copy-back reads the records `dead_letters` names and has not
//!   copied yet, in their topic order (a tenant's are keyed by it, so on one partition, in
//!   export order), writes each to the outbox as a new event addressed to the integration, and
//!   marks it copied, in one transaction: the outbox's order is the WAL's, and so the change
//!   feed's.
//!
//! The record exported is the parked one as it came (key, headers, value), with headers that
//! say where it came from, who gave up on it and why, and its attempts as JSON.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::KafkaConfig;
use crate::consumer::ledger::{self, ParkedRecord};

/// Headers a dead letter carries besides the record's own.
pub mod header {
    /// The integration that gave up on it.
    pub const INTEGRATION: &str = "ferryDeadLetterIntegration";
    /// Where it was read: `topic/partition/offset`.
    pub const ORIGIN: &str = "ferryDeadLetterOrigin";
    /// Who gave up on it.
    pub const ACTOR: &str = "ferryDeadLetterActor";
    /// Why.
    pub const REASON: &str = "ferryDeadLetterReason";
    /// Every attempt at it, as the attempt history keeps them (a JSON array).
    pub const ATTEMPTS: &str = "ferryDeadLetterAttempts";
}

/// A dead letter could not be exported or copied back.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The broker refused or did not answer: nothing was skipped.
    #[error("the dead-letter topic {topic}: {source}")]
    Kafka {
        /// The topic.
        topic: String,
        /// The client's error.
        source: rdkafka::error::KafkaError,
    },
    /// A record `dead_letters` names is not in the topic any more (retention deleted it).
    #[error("the dead-letter topic {topic} no longer holds partition {partition} offset {offset}")]
    Gone {
        /// The topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
    },
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
}

/// The producer of an integration's dead letters.
pub struct DeadLetters {
    producer: FutureProducer,
    kafka: KafkaConfig,
    topic: String,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("topic", &self.topic)
            .finish()
    }
}

/// Who gives up on an event, and why.
#[derive(Debug, Clone, Copy)]
pub struct GiveUp<'a> {
    /// The integration.
    pub integration: &'a str,
    /// The tenant.
    pub tenant: &'a str,
    /// Who.
    pub actor: &'a str,
    /// Why.
    pub reason: &'a str,
}

impl<'a> GiveUp<'a> {
    /// The audit record of `action` by this actor on this tenant.
    fn audited(self, action: &'a str) -> ledger::Action<'a> {
        ledger::Action {
            integration: self.integration,
            tenant: self.tenant,
            actor: self.actor,
            action,
            reason: self.reason,
        }
    }
}

/// A skip that exported its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The event, when its id was readable.
    pub event_id: Option<Uuid>,
    /// Where it was read.
    pub from: (i32, i64),
    /// Where it is in the dead-letter topic.
    pub to: (i32, i64),
}

impl DeadLetters {
    /// The producer of `topic` on `kafka`'s cluster; an export not acknowledged within 30 s
    /// fails (the skip with it).
    pub fn new(kafka: &KafkaConfig, topic: &str) -> Result<Self, DeadLetterError> {
        Self::with_timeout(kafka, topic, Duration::from_secs(30))
    }

    /// As [`DeadLetters::new`], an export failing after `timeout`.
    pub fn with_timeout(
        kafka: &KafkaConfig,
        topic: &str,
        timeout: Duration,
    ) -> Result<Self, DeadLetterError> {
        let producer = crate::broker::producer_config(kafka)
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .create()
            .map_err(|source| DeadLetterError::Kafka {
                topic: topic.to_owned(),
                source,
            })?;
        Ok(DeadLetters {
            producer,
            kafka: kafka.clone(),
            topic: topic.to_owned(),
        })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Produces `record` as a dead letter; where it landed, once the broker acknowledged it.
    async fn export(
        &self,
        record: &ParkedRecord,
        who: GiveUp<'_>,
        attempts: &serde_json::Value,
    ) -> Result<(i32, i64), DeadLetterError> {
        use rdkafka::message::{Header, OwnedHeaders};
        let origin = format!("{}/{}/{}", record.topic, record.partition, record.offset);
        let attempts = attempts.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 5);
        for (name, value) in &record.headers {
            headers = headers.insert(Header {
                key: name,
                value: value.as_deref(),
            });
        }
        for (key, value) in [
            (header::INTEGRATION, who.integration),
            (header::ORIGIN, origin.as_str()),
            (header::ACTOR, who.actor),
            (header::REASON, who.reason),
            (header::ATTEMPTS, attempts.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut future = FutureRecord::to(&self.topic)
            .key(who.tenant.as_bytes())
            .headers(headers);
        if let Some(value) = &record.value {
            future = future.payload(value.as_slice());
        }
        let delivery = self
            .producer
            .send(future, Duration::from_secs(0))
            .await
            .map_err(|(source, _)| DeadLetterError::Kafka {
                topic: self.topic.clone(),
                source,
            })?;
        Ok((delivery.partition, delivery.offset))
    }
}

/// Gives up on the paused tenant's failing event (its oldest parked record): exports it with
/// its attempts, settles it as `dead_lettered`, records the export and resumes the tenant, in
/// one transaction. `None` when the tenant is not paused or has nothing parked.
pub async fn skip_to_dead_letters(
    pool: &PgPool,
    letters: &DeadLetters,
    who: GiveUp<'_>,
) -> Result<Option<Exported>, DeadLetterError> {
    let mut tx = pool.begin().await?;
    if !ledger::start_drain(&mut tx, who.integration, who.tenant).await? {
        return Ok(None);
    }
    let Some((seq, record)) = ledger::oldest_parked(&mut tx, who.integration, who.tenant).await?
    else {
        return Ok(None);
    };
    let attempts: serde_json::Value = sqlx::query_scalar(
        "SELECT coalesce(jsonb_agg(to_jsonb(a) - 'event_id' - 'integration' ORDER BY attempt), '[]') \
         FROM delivery_attempts a WHERE integration = $1 AND event_id = $2",
    )
    .bind(who.integration)
    .bind(record.event_id)
    .fetch_one(&mut *tx)
    .await?;
    let to = letters.export(&record, who, &attempts).await?;
    sqlx::query("DELETE FROM parked_events WHERE seq = $1")
        .bind(seq)
        .execute(&mut *tx)
        .await?;
    if let Some(id) = record.event_id {
        record_export(&mut tx, letters, who, (&record, id), to).await?;
    }
    let action = who.audited("dead_letter");
    let details = json!({
        "event_id": record.event_id,
        "from": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
        "to": {"topic": letters.topic, "partition": to.0, "offset": to.1},
    });
    ledger::audit(&mut tx, &action, details).await?;
    tx.commit().await?;
    Ok(Some(Exported {
        event_id: record.event_id,
        from: (record.partition, record.offset),
        to,
    }))
}

/// The event settled as `dead_lettered`, and its export named in `dead_letters`.
async fn record_export(
    tx: &mut sqlx::PgConnection,
    letters: &DeadLetters,
    who: GiveUp<'_>,
    (record, id): (&ParkedRecord, Uuid),
    to: (i32, i64),
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO deliveries (integration, event_id, tenant_id, outcome, topic, partition, \"offset\", last_error, settled_at) \
         VALUES ($1, $2, $3, 'dead_lettered', $4, $5, $6, $7, now()) \
         ON CONFLICT (integration, event_id) DO UPDATE SET outcome = 'dead_lettered', settled_at = now(), \
             updated_at = now(), \
             last_error = EXCLUDED.last_error || coalesce('; it had failed with: ' || deliveries.last_error, '') \
         WHERE deliveries.settled_at IS NULL",
    )
    .bind(who.integration)
    .bind(id)
    .bind(who.tenant)
    .bind(&record.topic)
    .bind(record.partition)
    .bind(record.offset)
    .bind(format!(
        "dead-lettered by {} to {}: {}",
        who.actor, letters.topic, who.reason
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO dead_letters (integration, event_id, tenant_id, topic, partition, \"offset\", exported_by, reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (integration, event_id) DO NOTHING",
    )
    .bind(who.integration)
    .bind(id)
    .bind(who.tenant)
    .bind(&letters.topic)
    .bind(to.0)
    .bind(to.1)
    .bind(who.actor)
    .bind(who.reason)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A dead letter as read back from the topic.
#[derive(Debug, Clone)]
struct Letter {
    event_id: Uuid,
    event_type: String,
    aggregate_type: String,
    aggregate_id: String,
    payload: Vec<u8>,
}

/// Writes the tenant's dead letters not copied yet back into its stream: each a new event in
/// the outbox (addressed to the integration alone), in the order they were exported, marked
/// copied in the same transaction. How many.
pub async fn copy_back(
    pool: &PgPool,
    letters: &DeadLetters,
    who: GiveUp<'_>,
) -> Result<u64, DeadLetterError> {
    let pending: Vec<(Uuid, i32, i64)> = sqlx::query_as(
        "SELECT event_id, partition, \"offset\" FROM dead_letters \
         WHERE integration = $1 AND tenant_id = $2 AND topic = $3 AND copied_back_at IS NULL \
         ORDER BY partition, \"offset\"",
    )
    .bind(who.integration)
    .bind(who.tenant)
    .bind(&letters.topic)
    .fetch_all(pool)
    .await?;
    if pending.is_empty() {
        return Ok(0);
    }
    let read = letters.read(pending).await?;
    let mut tx = pool.begin().await?;
    for letter in &read {
        let copy = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, tenant_id, integration) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(copy)
        .bind(&letter.aggregate_type)
        .bind(&letter.aggregate_id)
        .bind(&letter.event_type)
        .bind(&letter.payload)
        .bind(who.tenant)
        .bind(who.integration)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE dead_letters SET copied_back_at = now(), copied_as = $3 \
             WHERE integration = $1 AND event_id = $2",
        )
        .bind(who.integration)
        .bind(letter.event_id)
        .bind(copy)
        .execute(&mut *tx)
        .await?;
    }
    let action = who.audited("dead_letter_copy_back");
    ledger::audit(&mut tx, &action, json!({"events": read.len()})).await?;
    tx.commit().await?;
    Ok(read.len() as u64)
}

impl DeadLetters {
    /// The records at `wanted` (event, partition, offset), read from the topic, in that order.
    async fn read(&self, wanted: Vec<(Uuid, i32, i64)>) -> Result<Vec<Letter>, DeadLetterError> {
        let (kafka, topic) = (self.kafka.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || read_letters(&kafka, &topic, &wanted))
            .await
            .expect("the dead-letter reader panicked")
    }
}

/// Reads `wanted` (sorted by partition and offset) from `topic`: each partition assigned once,
/// at its first wanted offset, and read forward through its last, records between them passed
/// over.
fn read_letters(
    kafka: &KafkaConfig,
    topic: &str,
    wanted: &[(Uuid, i32, i64)],
) -> Result<Vec<Letter>, DeadLetterError> {
    let kafka_error = |source| DeadLetterError::Kafka {
        topic: topic.to_owned(),
        source,
    };
    // No group offsets are committed: the reader only looks.
    let consumer: BaseConsumer = crate::broker::consumer_config(kafka, "ferry-dead-letters")
        .create()
        .map_err(kafka_error)?;
    let mut out = Vec::with_capacity(wanted.len());
    let mut assigned = None;
    for (id, partition, offset) in wanted {
        if assigned != Some(*partition) {
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition_offset(topic, *partition, rdkafka::Offset::Offset(*offset))
                .map_err(kafka_error)?;
            consumer.assign(&tpl).map_err(kafka_error)?;
            assigned = Some(*partition);
        }
        let gone = || DeadLetterError::Gone {
            topic: topic.to_owned(),
            partition: *partition,
            offset: *offset,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let message = loop {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) if m.offset() == *offset => break m.detach(),
                Some(Ok(m)) if m.offset() > *offset => return Err(gone()),
                Some(Ok(_)) => {} // a record between two wanted ones
                Some(Err(e)) => return Err(kafka_error(e)),
                None if std::time::Instant::now() > deadline => return Err(gone()),
                None => {}
            }
        };
        out.push(letter_of(*id, &message));
    }
    Ok(out)
}

/// A dead letter's event, from its record: the type and aggregate from its headers.
fn letter_of(event_id: Uuid, m: &rdkafka::message::OwnedMessage) -> Letter {
    use rdkafka::message::Headers;
    let header = |name: &str| {
        m.headers()
            .and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(|v| v.trim_matches('"').to_owned())
            })
            .unwrap_or_default()
    };
    Letter {
        event_id,
        event_type: header(crate::outbox::header::EVENT_TYPE),
        aggregate_type: header(crate::outbox::header::AGGREGATE_TYPE),
        aggregate_id: header(crate::outbox::header::AGGREGATE_ID),
        payload: m.payload().unwrap_or_default().to_vec(),
    }
}

/// A dead letter as `ferry dead-letters list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct Listed {
    /// The tenant.
    pub tenant_id: String,
    /// The event.
    pub event_id: Uuid,
    /// The topic that holds it.
    pub topic: String,
    /// Its partition there.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// When it was exported.
    pub exported_at: chrono::DateTime<chrono::Utc>,
    /// By whom.
    pub exported_by: String,
    /// Why.
    pub reason: String,
    /// When it was copied back, if it was.
    pub copied_back_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The integration's dead letters (one tenant's when given), in export order.
pub async fn list(
    pool: &PgPool,
    integration: &str,
    tenant: Option<&str>,
) -> Result<Vec<Listed>, sqlx::Error> {
    sqlx::query_as(
        "SELECT tenant_id, event_id, topic, partition, \"offset\", exported_at, exported_by, reason, \
                copied_back_at \
         FROM dead_letters WHERE integration = $1 AND ($2::text IS NULL OR tenant_id = $2) \
         ORDER BY exported_at, tenant_id",
    )
    .bind(integration)
    .bind(tenant)
    .fetch_all(pool)
    .await
}

/// `rows` as a Markdown table.
pub fn table(rows: &[Listed]) -> String {
    let mut s = String::from(
        "| tenant | event | at | exported | by | reason | copied back |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {}/{}@{} | {} | {} | {} | {} |\n",
            r.tenant_id,
            r.event_id,
            r.topic,
            r.partition,
            r.offset,
            r.exported_at.format("%Y-%m-%dT%H:%M:%SZ"),
            r.exported_by,
            r.reason,
            r.copied_back_at.map_or_else(
                || "no".to_owned(),
                |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
            )
        ));
    }
    s
}
