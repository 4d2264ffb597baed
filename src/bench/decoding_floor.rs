//! The floor of logical decoding, for `ferry bench relay`: PostgreSQL's own `pg_recvlogical`
//! streaming a slot of the same plugin (`pgoutput`, the relay's publication) over the same
//! rows, writing what it receives to `/dev/null`. Nothing can relay rows faster than the server
//! decodes them and a client as plain as this one takes them in, so the relay's rate is judged
//! against it.
//!
//! The slot is made beside the relay's, before the backlog is written, so both hold exactly
//! the backlog's changes; `pg_recvlogical` stops at the WAL position read after the writes.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

/// How `pg_recvlogical` fared.
#[derive(Debug, Clone)]
pub struct Floor {
    /// Rows it decoded.
    pub rows: usize,
    /// From its start to its exit at the end position.
    pub elapsed: Duration,
}

impl Floor {
    /// Rows per second.
    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Creates `slot` (pgoutput) where the WAL is now.
pub async fn create_slot(pool: &PgPool, slot: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(slot)
        .execute(pool)
        .await?;
    Ok(())
}

/// Streams `slot` with `pg_recvlogical` up to the current WAL position (`rows` changes of the
/// outbox behind it) and drops the slot; an error names what failed (no `pg_recvlogical` on
/// the path, a server it cannot reach).
pub async fn read(
    pool: &PgPool,
    url: &str,
    (slot, publication): (&str, &str),
    rows: usize,
) -> Result<Floor, String> {
    let end: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())?;
    let conninfo = conninfo(url)?;
    let started = Instant::now();
    let output = tokio::process::Command::new("pg_recvlogical")
        .args(["-d", &conninfo, "--slot", slot, "--start", "--no-loop"])
        .args(["--endpos", &end, "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={publication}"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(600), output)
        .await
        .map_err(|_| "pg_recvlogical did not reach the end position in 10 minutes".to_owned())?
        .map_err(|e| format!("pg_recvlogical: {e}"))?;
    let elapsed = started.elapsed();
    let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(slot)
        .execute(pool)
        .await;
    if !output.status.success() {
        return Err(format!(
            "pg_recvlogical exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(Floor { rows, elapsed })
}

/// libpq's connection string for the database `url` names (sqlx's URL parameters are not all
/// libpq's). The password, if any, goes through `PGPASSWORD` of the caller's environment.
fn conninfo(url: &str) -> Result<String, String> {
    let options: PgConnectOptions = url.parse().map_err(|e| format!("{e}"))?;
    Ok(format!(
        "host={} port={} user={} dbname={} application_name=pg_recvlogical",
        options.get_host(),
        options.get_port(),
        options.get_username(),
        options.get_database().unwrap_or("postgres"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_string_is_libpqs() {
        let c = conninfo("postgres://postgres@127.0.0.1:54329/bench_1?sslmode=prefer").unwrap();
        assert_eq!(
            c,
            "host=127.0.0.1 port=54329 user=postgres dbname=bench_1 application_name=pg_recvlogical"
        );
    }
}
