//! The database's side of `ferry bench pipeline`: which statements cost its time, from
//! `pg_stat_statements` (loaded by the server: the local stack loads it; elsewhere the
//! benchmark says it is missing and goes on without it).

use sqlx::PgPool;

/// The `application_name` of the writer's sessions (`ferry load`, the application).
pub const APPLICATION_SESSION: &str = "ferry-load";

/// One statement's totals over the window.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// Its text, normalized by `pg_stat_statements` (constants as `$n`).
    pub query: String,
    /// Executions.
    pub calls: i64,
    /// Time spent executing it, in all, milliseconds.
    pub total_ms: f64,
    /// Time spent planning it, in all, milliseconds (0 unless the server sets
    /// `pg_stat_statements.track_planning`, as the local stack does).
    pub plan_ms: f64,
}

impl Statement {
    /// Who runs it, from what it touches: the application writes the outbox and its products;
    /// the relay reads slots and holds its lease; the benchmark reads the server's views; the
    /// consumers the rest.
    pub fn who(&self) -> &'static str {
        let q = self.query.to_lowercase();
        if q.contains("pg_stat_") || q.contains("pg_backend_pid") || q.contains("ferry bench") {
            "benchmark"
        } else if q.contains("outbox") || q.contains("products") {
            "application"
        } else if q.contains("replication") || q.contains("advisory") || q.contains("wal_lsn") {
            "relay"
        } else if matches!(q.trim(), "begin" | "commit" | "rollback" | "select $1") {
            "any"
        } else {
            "consumers"
        }
    }

    /// The text on one line, cut to `width` characters.
    pub fn short(&self, width: usize) -> String {
        let line = self.query.split_whitespace().collect::<Vec<_>>().join(" ");
        match line.char_indices().nth(width) {
            Some((cut, _)) => format!("{}...", &line[..cut]),
            None => line,
        }
    }
}

/// Creates the extension in the run's database; whether its view can be read (the server
/// loads the library).
pub async fn enable(pool: &PgPool) -> bool {
    let created = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await;
    created.is_ok()
        && sqlx::query("SELECT 1 FROM pg_stat_statements LIMIT 1")
            .execute(pool)
            .await
            .is_ok()
}

/// Forgets what the run's database ran so far.
pub async fn reset(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_stat_statements_reset(0, \
             (SELECT oid FROM pg_database WHERE datname = current_database()), 0)",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// What the run's database ran since the reset, costliest first.
pub async fn read(pool: &PgPool) -> Result<Vec<Statement>, sqlx::Error> {
    let rows: Vec<(String, i64, f64, f64)> = sqlx::query_as(
        "SELECT query, calls, total_exec_time, total_plan_time FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         ORDER BY total_exec_time + total_plan_time DESC",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(query, calls, total_ms, plan_ms)| Statement {
            query,
            calls,
            total_ms,
            plan_ms,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(query: &str) -> Statement {
        Statement {
            query: query.to_owned(),
            calls: 1,
            total_ms: 1.0,
            plan_ms: 0.0,
        }
    }

    #[test]
    fn statements_are_told_apart_by_what_they_touch() {
        assert_eq!(
            s("INSERT INTO outbox (id) VALUES ($1)").who(),
            "application"
        );
        assert_eq!(s("UPDATE products SET name = $1").who(), "application");
        assert_eq!(s("SELECT pg_try_advisory_lock($1)").who(), "relay");
        assert_eq!(s("SELECT pid FROM pg_stat_activity").who(), "benchmark");
        assert_eq!(
            s("INSERT INTO deliveries SELECT * FROM UNNEST($1)").who(),
            "consumers"
        );
        assert_eq!(s("COMMIT").who(), "any");
    }

    #[test]
    fn a_long_statement_is_cut_on_one_line() {
        let st = s("SELECT a,\n       b\nFROM deliveries WHERE x = $1");
        assert_eq!(st.short(12), "SELECT a, b ...");
        assert_eq!(s("COMMIT").short(12), "COMMIT");
    }
}
