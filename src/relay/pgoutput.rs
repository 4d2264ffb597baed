//! A decoder for pgoutput, Postgres's built-in logical replication output (protocol version 1),
//! and the assembler that turns its message stream into whole committed transactions of outbox
//! rows. Pure: bytes in, typed values out, so every message shape is unit-tested without a
//! server.
//!
//! Logical decoding emits a transaction only when it commits, whole, in commit order: two
//! transactions that interleave their inserts come out one after the other, the first to
//! commit first, and a rolled-back transaction never appears. The relay relies on that.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime, TimeZone as _, Utc};
use uuid::Uuid;

use super::lsn::Lsn;
use crate::outbox::OutboxRow;

/// Bytes that are not a pgoutput message Ferry understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The message ended early.
    #[error("pgoutput message `{tag}` is truncated")]
    Truncated {
        /// The message tag.
        tag: char,
    },
    /// A tag this decoder does not know.
    #[error("unknown pgoutput message tag {0:#04x}")]
    UnknownTag(u8),
    /// A tuple column kind this decoder does not know.
    #[error("unknown tuple column kind {0:#04x}")]
    UnknownColumnKind(u8),
    /// An insert into a relation whose `Relation` message was not seen.
    #[error("change for relation {0} before its Relation message")]
    UnknownRelation(u32),
    /// A change outside `Begin`…`Commit`.
    #[error("`{0}` message outside a transaction")]
    OutsideTransaction(char),
    /// A text field is not UTF-8.
    #[error("pgoutput text is not UTF-8")]
    NotUtf8,
}

/// One column value of a tuple, as pgoutput sends it (text format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value (only in updates, never in inserts).
    UnchangedToast,
    /// The value's text output.
    Text(Vec<u8>),
}

/// A column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The column name.
    pub name: String,
    /// The type's OID (17 is `bytea`).
    pub type_oid: u32,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A transaction starts.
    Begin {
        /// The LSN of its commit record.
        final_lsn: Lsn,
        /// Commit time.
        commit_time: DateTime<Utc>,
        /// Transaction id.
        xid: u32,
    },
    /// The transaction committed.
    Commit {
        /// The commit record's LSN.
        commit_lsn: Lsn,
        /// The end of the commit record: the slot may advance to here once the transaction is
        /// durable downstream.
        end_lsn: Lsn,
        /// Commit time.
        commit_time: DateTime<Utc>,
    },
    /// A relation's schema, sent before its first change in a session and after it changes.
    Relation {
        /// The relation OID.
        oid: u32,
        /// Its schema.
        namespace: String,
        /// Its name.
        name: String,
        /// Its columns, in tuple order.
        columns: Vec<Column>,
    },
    /// A row inserted.
    Insert {
        /// The relation OID.
        oid: u32,
        /// The new row.
        tuple: Vec<Datum>,
    },
    /// Anything else (origin, type, update, delete, truncate, logical message): not published
    /// for the outbox, ignored if it comes.
    Other(char),
}

/// Microseconds from the Unix epoch to Postgres's epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

struct Reader<'a> {
    buf: &'a [u8],
    tag: char,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated { tag: self.tag });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn time(&mut self) -> Result<DateTime<Utc>, ProtocolError> {
        let micros = self.u64()? as i64;
        Ok(
            DateTime::from_timestamp_micros(micros.saturating_add(PG_EPOCH_OFFSET_MICROS))
                .unwrap_or_default(),
        )
    }
    fn cstring(&mut self) -> Result<String, ProtocolError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(ProtocolError::Truncated { tag: self.tag })?;
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| ProtocolError::NotUtf8)?;
        self.buf = &self.buf[end + 1..];
        Ok(s.to_owned())
    }
    fn tuple(&mut self) -> Result<Vec<Datum>, ProtocolError> {
        let n = self.u16()?;
        (0..n)
            .map(|_| match self.u8()? {
                b'n' => Ok(Datum::Null),
                b'u' => Ok(Datum::UnchangedToast),
                b't' | b'b' => {
                    let len = self.u32()? as usize;
                    Ok(Datum::Text(self.take(len)?.to_vec()))
                }
                other => Err(ProtocolError::UnknownColumnKind(other)),
            })
            .collect()
    }
}

/// Decodes one pgoutput message.
pub fn parse(data: &[u8]) -> Result<Message, ProtocolError> {
    let (&tag, rest) = data
        .split_first()
        .ok_or(ProtocolError::Truncated { tag: '?' })?;
    let mut r = Reader {
        buf: rest,
        tag: tag as char,
    };
    Ok(match tag {
        b'B' => Message::Begin {
            final_lsn: Lsn(r.u64()?),
            commit_time: r.time()?,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            Message::Commit {
                commit_lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_time: r.time()?,
            }
        }
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.cstring()?;
            let name = r.cstring()?;
            let _replica_identity = r.u8()?;
            let n = r.u16()?;
            let columns = (0..n)
                .map(|_| {
                    let _flags = r.u8()?;
                    let name = r.cstring()?;
                    let type_oid = r.u32()?;
                    let _typmod = r.u32()?;
                    Ok(Column { name, type_oid })
                })
                .collect::<Result<_, ProtocolError>>()?;
            Message::Relation {
                oid,
                namespace,
                name,
                columns,
            }
        }
        b'I' => {
            let oid = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert {
                    oid,
                    tuple: r.tuple()?,
                },
                _ => return Err(ProtocolError::Truncated { tag: 'I' }),
            }
        }
        b'O' | b'Y' | b'U' | b'D' | b'T' | b'M' => Message::Other(tag as char),
        other => return Err(ProtocolError::UnknownTag(other)),
    })
}

/// An outbox row the relay could not read: it still travels, in order, as a bad event (see
/// [`super::Relay`]), never silently dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// The row's id, when readable.
    pub id: Option<Uuid>,
    /// The tenant, when readable.
    pub tenant_id: Option<String>,
    /// The event type, when readable.
    pub event_type: Option<String>,
    /// What is wrong.
    pub reason: String,
}

/// A committed transaction's outbox rows, in insert order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Transaction id.
    pub xid: u32,
    /// Commit time: the records' timestamp.
    pub commit_time: DateTime<Utc>,
    /// The end of the commit record.
    pub end_lsn: Lsn,
    /// The rows, or why one could not be read.
    pub rows: Vec<Result<OutboxRow, BadRow>>,
}

/// Turns the message stream into whole transactions of the outbox table's inserts.
#[derive(Debug)]
pub struct Assembler {
    namespace: String,
    table: String,
    relations: HashMap<u32, Vec<Column>>,
    open: Option<Transaction>,
}

impl Assembler {
    /// An assembler for inserts into `namespace.table`.
    pub fn new(namespace: &str, table: &str) -> Self {
        Assembler {
            namespace: namespace.to_owned(),
            table: table.to_owned(),
            relations: HashMap::new(),
            open: None,
        }
    }

    /// Whether a transaction has begun and not yet committed: a position the server reports
    /// now is not safe to confirm.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Feeds one message; returns the transaction it completes, if any. Transactions without
    /// outbox rows are returned too: their end LSN is progress.
    pub fn push(&mut self, message: Message) -> Result<Option<Transaction>, ProtocolError> {
        match message {
            Message::Begin {
                commit_time, xid, ..
            } => {
                self.open = Some(Transaction {
                    xid,
                    commit_time,
                    end_lsn: Lsn(0),
                    rows: Vec::new(),
                });
                Ok(None)
            }
            Message::Commit { end_lsn, .. } => {
                let mut tx = self
                    .open
                    .take()
                    .ok_or(ProtocolError::OutsideTransaction('C'))?;
                tx.end_lsn = end_lsn;
                Ok(Some(tx))
            }
            Message::Relation {
                oid,
                namespace,
                name,
                columns,
            } => {
                if namespace == self.namespace && name == self.table {
                    self.relations.insert(oid, columns);
                } else {
                    self.relations.remove(&oid);
                }
                Ok(None)
            }
            Message::Insert { oid, tuple } => {
                let columns = match self.relations.get(&oid) {
                    Some(c) => c,
                    // Another table in the publication: not ours to relay.
                    None => return Ok(None),
                };
                let row = row_from_tuple(columns, tuple);
                self.open
                    .as_mut()
                    .ok_or(ProtocolError::OutsideTransaction('I'))?
                    .rows
                    .push(row);
                Ok(None)
            }
            Message::Other(_) => Ok(None),
        }
    }
}

const BYTEA_OID: u32 = 17;

fn row_from_tuple(columns: &[Column], tuple: Vec<Datum>) -> Result<OutboxRow, BadRow> {
    let mut values: HashMap<&str, (u32, Datum)> = columns
        .iter()
        .zip(tuple)
        .map(|(c, d)| (c.name.as_str(), (c.type_oid, d)))
        .collect();
    let mut text = |name: &str| -> Option<String> {
        match values.remove(name) {
            Some((_, Datum::Text(b))) => Some(String::from_utf8_lossy(&b).into_owned()),
            _ => None,
        }
    };
    let id_text = text("id");
    let tenant = text("tenant_id").filter(|t| !t.is_empty());
    let event_type = text("type");
    let aggregate_type = text("aggregatetype");
    let aggregate_id = text("aggregateid");
    let traceparent = text("traceparent");
    let created_at = text("created_at");
    let deliver_before = text("deliver_before");
    let integration = text("integration").filter(|i| !i.is_empty());
    let payload = values.remove("payload");

    let id = id_text.as_deref().and_then(|t| Uuid::parse_str(t).ok());
    let bad = |reason: String| BadRow {
        id,
        tenant_id: tenant.clone(),
        event_type: event_type.clone(),
        reason,
    };
    let id = id.ok_or_else(|| bad(format!("`id` {id_text:?} is not a UUID")))?;
    let tenant_id = tenant
        .clone()
        .ok_or_else(|| bad("`tenant_id` is NULL or empty".to_owned()))?;
    let event_type_name = event_type
        .clone()
        .ok_or_else(|| bad("`type` is NULL".to_owned()))?;
    let payload = match payload {
        Some((BYTEA_OID, Datum::Text(hex))) => decode_bytea(&hex)
            .ok_or_else(|| bad("`payload` is not in bytea hex output".to_owned()))?,
        // A json, jsonb or text payload column: its text is the payload.
        Some((_, Datum::Text(text))) => text,
        _ => return Err(bad("`payload` is NULL".to_owned())),
    };
    let created_at = match created_at.as_deref().map(parse_timestamptz) {
        Some(Some(t)) => t,
        Some(None) => return Err(bad(format!("`created_at` {created_at:?} is not a time"))),
        None => Utc::now(),
    };
    let deliver_before = match deliver_before.as_deref() {
        None | Some("infinity") => None,
        Some(text) => Some(
            parse_timestamptz(text)
                .ok_or_else(|| bad(format!("`deliver_before` {text:?} is not a time")))?,
        ),
    };
    Ok(OutboxRow {
        id,
        tenant_id,
        aggregate_type: aggregate_type.unwrap_or_default(),
        aggregate_id: aggregate_id.unwrap_or_default(),
        event_type: event_type_name,
        payload,
        traceparent,
        created_at,
        deliver_before,
        integration,
    })
}

/// bytea's hex output: `\x` then two hex digits a byte.
fn decode_bytea(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// timestamptz's ISO output in any session time zone: `2026-11-28 10:12:42.123456+00`,
/// `…+05:30`, or without fraction.
fn parse_timestamptz(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
        .ok()
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| {
            // A plain timestamp column (no zone): taken as UTC.
            NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
                .ok()
                .map(|t| Utc.from_utc_datetime(&t))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn begin(xid: u32) -> Vec<u8> {
        let mut m = vec![b'B'];
        m.extend(100u64.to_be_bytes());
        m.extend(0u64.to_be_bytes()); // 2000-01-01
        m.extend(xid.to_be_bytes());
        m
    }

    fn commit(end: u64) -> Vec<u8> {
        let mut m = vec![b'C', 0];
        m.extend((end - 8).to_be_bytes());
        m.extend(end.to_be_bytes());
        m.extend(1_000_000u64.to_be_bytes());
        m
    }

    const COLUMNS: [(&str, u32); 9] = [
        ("id", 2950),
        ("aggregatetype", 25),
        ("aggregateid", 25),
        ("type", 25),
        ("payload", 17),
        ("tenant_id", 25),
        ("traceparent", 25),
        ("created_at", 1184),
        ("deliver_before", 1184),
    ];

    fn relation(oid: u32, name: &str) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(oid.to_be_bytes());
        m.extend(cstr("public"));
        m.extend(cstr(name));
        m.push(b'd');
        m.extend((COLUMNS.len() as u16).to_be_bytes());
        for (name, oid) in COLUMNS {
            m.push(1);
            m.extend(cstr(name));
            m.extend(oid.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        m
    }

    fn insert(oid: u32, values: [Option<&str>; 9]) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend(oid.to_be_bytes());
        m.push(b'N');
        m.extend((values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                None => m.push(b'n'),
                Some(t) => {
                    m.push(b't');
                    m.extend((t.len() as u32).to_be_bytes());
                    m.extend(t.as_bytes());
                }
            }
        }
        m
    }

    const ID: &str = "0b6c6f0e-2f4a-4c6e-9a51-3f1f0c2d9e11";

    fn values<'a>(tenant: Option<&'a str>, payload: Option<&'a str>) -> [Option<&'a str>; 9] {
        [
            Some(ID),
            Some("Product"),
            Some("p-1"),
            Some("ProductDeleted"),
            payload,
            tenant,
            None,
            Some("2026-11-28 10:12:42.123456+00"),
            Some("2026-11-29 00:00:00+05:30"),
        ]
    }

    fn feed(a: &mut Assembler, msgs: &[Vec<u8>]) -> Vec<Transaction> {
        msgs.iter()
            .filter_map(|m| a.push(parse(m).unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn a_transaction_of_outbox_inserts_assembles_in_order() {
        let mut a = Assembler::new("public", "outbox");
        let txs = feed(
            &mut a,
            &[
                begin(7),
                relation(16384, "outbox"),
                insert(16384, values(Some("acme"), Some("\\x0a02"))),
                insert(16384, values(Some("beta"), Some("\\xff"))),
                commit(0x1000),
            ],
        );
        assert_eq!(txs.len(), 1);
        let tx = &txs[0];
        assert_eq!((tx.xid, tx.end_lsn), (7, Lsn(0x1000)));
        assert_eq!(
            tx.commit_time.timestamp(),
            946_684_800,
            "the commit time Begin announces"
        );
        let rows: Vec<&OutboxRow> = tx.rows.iter().map(|r| r.as_ref().unwrap()).collect();
        assert_eq!(rows[0].tenant_id, "acme");
        assert_eq!(rows[0].payload, vec![0x0a, 0x02]);
        assert_eq!(rows[1].tenant_id, "beta");
        assert_eq!(rows[1].payload, vec![0xff]);
        assert_eq!(rows[0].id.to_string(), ID);
        assert_eq!(
            rows[0].created_at.to_rfc3339(),
            "2026-11-28T10:12:42.123456+00:00"
        );
        assert_eq!(
            rows[0].deliver_before.unwrap().to_rfc3339(),
            "2026-11-28T18:30:00+00:00"
        );
    }

    #[test]
    fn other_tables_and_empty_transactions_still_report_progress() {
        let mut a = Assembler::new("public", "outbox");
        let txs = feed(
            &mut a,
            &[
                begin(1),
                relation(99, "products"),
                insert(99, values(Some("acme"), Some("\\x00"))),
                commit(0x2000),
            ],
        );
        assert_eq!(txs.len(), 1);
        assert!(txs[0].rows.is_empty());
        assert_eq!(txs[0].end_lsn, Lsn(0x2000));
    }

    #[test]
    fn unreadable_rows_become_bad_rows_that_keep_their_identity() {
        let mut a = Assembler::new("public", "outbox");
        let txs = feed(
            &mut a,
            &[
                begin(1),
                relation(5, "outbox"),
                insert(5, values(None, Some("\\x00"))),
                insert(5, values(Some("acme"), None)),
                insert(5, values(Some("acme"), Some("\\xZZ"))),
                commit(0x10),
            ],
        );
        let bad: Vec<&BadRow> = txs[0]
            .rows
            .iter()
            .map(|r| r.as_ref().unwrap_err())
            .collect();
        assert_eq!(bad.len(), 3);
        assert!(bad[0].reason.contains("tenant_id"), "{:?}", bad[0]);
        assert_eq!(bad[0].id.unwrap().to_string(), ID);
        assert!(bad[1].reason.contains("payload"));
        assert_eq!(bad[1].tenant_id.as_deref(), Some("acme"));
        assert!(bad[2].reason.contains("hex"));
    }

    #[test]
    fn a_json_payload_column_passes_its_text() {
        let mut a = Assembler::new("public", "outbox");
        let mut rel = relation(5, "outbox");
        // Make `payload` a jsonb column (OID 3802) in the Relation message.
        let pos = rel.windows(8).position(|w| w == b"payload\0").unwrap() + 8;
        rel[pos..pos + 4].copy_from_slice(&3802u32.to_be_bytes());
        let txs = feed(
            &mut a,
            &[
                begin(1),
                rel,
                insert(5, values(Some("acme"), Some("{\"a\":1}"))),
                commit(0x10),
            ],
        );
        assert_eq!(
            txs[0].rows[0].as_ref().unwrap().payload,
            b"{\"a\":1}".to_vec()
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        assert_eq!(parse(b""), Err(ProtocolError::Truncated { tag: '?' }));
        assert_eq!(parse(b"B\x00"), Err(ProtocolError::Truncated { tag: 'B' }));
        assert_eq!(parse(b"Z"), Err(ProtocolError::UnknownTag(b'Z')));
        let mut i = insert(5, values(Some("a"), Some("\\x00")));
        i.truncate(20);
        assert!(parse(&i).is_err());
        let mut a = Assembler::new("public", "outbox");
        assert_eq!(
            a.push(parse(&commit(16)).unwrap()),
            Err(ProtocolError::OutsideTransaction('C'))
        );
        for tag in [b'O', b'Y', b'U', b'D', b'T'] {
            assert_eq!(parse(&[tag, 0, 0]).unwrap(), Message::Other(tag as char));
        }
    }

    #[test]
    fn timestamps_in_any_session_zone() {
        let utc = parse_timestamptz("2026-11-28 10:12:42+00").unwrap();
        assert_eq!(parse_timestamptz("2026-11-28 11:12:42+01").unwrap(), utc);
        assert_eq!(parse_timestamptz("2026-11-28 15:42:42+05:30").unwrap(), utc);
        assert_eq!(parse_timestamptz("2026-11-28 10:12:42").unwrap(), utc);
        assert!(parse_timestamptz("yesterday").is_none());
    }
}
