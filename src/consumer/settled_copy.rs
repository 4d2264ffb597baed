//! Settlements as rows of Postgres's binary `COPY` format: how a batch of events the dedupe
//! lookup found no record of reaches `deliveries` ([`super::ledger::settle`]).
//!
//! Why `COPY` rather than `INSERT ... SELECT FROM UNNEST(...)`: in the consumer's overhead
//! benchmark that insert was most of Postgres's work, about 9 µs per row. `UNNEST` over eleven
//! arrays materialises each array into a tuple store and builds every row from them; `COPY`
//! reads the rows as sent and inserts them in groups (one WAL record per page rather than per
//! row). `COPY` has no conflict clause, which is why only the unrecorded events come this way:
//! the caller runs it in a savepoint and falls back to the conflict clause on a late row.
//!
//! The format (PostgreSQL's documentation, "COPY", "Binary Format"): a signature, a flags
//! word and a header extension length; then per row the number of fields and each field as a
//! length (-1 for NULL) and its bytes in the type's binary form; then -1 as the trailer.

use chrono::{DateTime, Utc};

use super::ledger::Settlement;

/// The columns [`encode`] writes, in its order. `first_seen_at` and `updated_at` take their
/// defaults.
pub const COPY_SETTLED: &str = "COPY deliveries (event_id, tenant_id, event_type, outcome, \
     attempts, last_error, topic, partition, \"offset\", written_at, acked_at, settled_at, \
     integration) FROM STDIN (FORMAT binary)";

/// Fields per row of [`COPY_SETTLED`].
const FIELDS: i16 = 13;

/// The signature every binary `COPY` stream starts with.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Microseconds from the Unix epoch to Postgres's (2000-01-01 UTC), which timestamps count
/// from.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// `batch` of `integration`, settled at `settled_at`, as one binary `COPY` stream.
pub fn encode(integration: &str, batch: &[&Settlement], settled_at: DateTime<Utc>) -> Vec<u8> {
    // Some 150 to 200 bytes a row for the usual event: a guess that spares most regrowth, not a
    // bound.
    let mut out = Vec::with_capacity(19 + batch.len() * 192 + 2);
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
    out.extend_from_slice(&0i32.to_be_bytes()); // no header extension
    for s in batch {
        row(&mut out, integration, s, settled_at);
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// One row, its fields in [`COPY_SETTLED`]'s order.
fn row(out: &mut Vec<u8>, integration: &str, s: &Settlement, settled_at: DateTime<Utc>) {
    out.extend_from_slice(&FIELDS.to_be_bytes());
    field(out, Some(s.event_id.as_bytes()));
    field(out, Some(s.tenant_id.as_bytes()));
    field(out, s.event_type.as_deref().map(str::as_bytes));
    field(out, Some(s.outcome.as_str().as_bytes()));
    field(out, Some(&s.attempts.to_be_bytes()));
    field(out, s.error.as_deref().map(str::as_bytes));
    field(out, Some(s.topic.as_bytes()));
    field(out, Some(&s.partition.to_be_bytes()));
    field(out, Some(&s.offset.to_be_bytes()));
    field(out, s.written_at.map(timestamp).as_ref().map(|t| &t[..]));
    field(out, s.acked_at.map(timestamp).as_ref().map(|t| &t[..]));
    field(out, Some(&timestamp(settled_at)));
    field(out, Some(integration.as_bytes()));
}

/// One field: its length and bytes, or -1 for NULL.
fn field(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(bytes) => {
            // A field longer than 2 GiB is not a settlement Postgres would take either.
            let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(bytes);
        }
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
    }
}

/// A `timestamptz` in binary: microseconds since 2000-01-01 UTC.
fn timestamp(at: DateTime<Utc>) -> [u8; 8] {
    (at.timestamp_micros() - POSTGRES_EPOCH_MICROS).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::ledger::SettledAs;

    fn settlement() -> Settlement {
        Settlement {
            event_id: uuid::Uuid::from_u128(0x0102),
            tenant_id: "t1".into(),
            event_type: None,
            outcome: SettledAs::Delivered,
            attempts: 1,
            error: None,
            topic: "o".into(),
            partition: 3,
            offset: 7,
            written_at: None,
            acked_at: DateTime::from_timestamp_micros(POSTGRES_EPOCH_MICROS + 5),
            unrecorded: true,
        }
    }

    #[test]
    fn a_row_is_laid_out_as_postgres_reads_it() {
        let at = DateTime::from_timestamp_micros(POSTGRES_EPOCH_MICROS - 1).unwrap();
        let bytes = encode("p", &[&settlement()], at);
        let mut want = b"PGCOPY\n\xff\r\n\0".to_vec();
        want.extend([0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend([0, 13]);
        want.extend([0, 0, 0, 16]);
        want.extend(uuid::Uuid::from_u128(0x0102).as_bytes());
        want.extend([0, 0, 0, 2, b't', b'1']);
        want.extend([0xff; 4]); // event_type NULL
        want.extend([0, 0, 0, 9]);
        want.extend(b"delivered");
        want.extend([0, 0, 0, 4, 0, 0, 0, 1]);
        want.extend([0xff; 4]); // last_error NULL
        want.extend([0, 0, 0, 1, b'o']);
        want.extend([0, 0, 0, 4, 0, 0, 0, 3]);
        want.extend([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7]);
        want.extend([0xff; 4]); // written_at NULL
        want.extend([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 5]);
        want.extend([0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        want.extend([0, 0, 0, 1, b'p']);
        want.extend([0xff, 0xff]);
        assert_eq!(bytes, want);
    }

    #[test]
    fn an_empty_batch_is_a_header_and_a_trailer() {
        let bytes = encode("p", &[], Utc::now());
        assert_eq!(bytes.len(), 11 + 8 + 2);
        assert_eq!(&bytes[19..], &[0xff, 0xff]);
    }
}
