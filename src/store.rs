//! Postgres: connections and the schema. The schema lives in `migrations/` and is embedded in
//! the binary, so `ferry migrate` needs nothing but a database URL.
//!
//! Ferry's tables live in a Postgres schema of their own (`database.schema`, `ferry` by
//! default), its migrations table (`_sqlx_migrations`) with them, so neither collides with the
//! application's tables or its own sqlx migrations. Every session of Ferry's sets
//! `search_path` to that schema, then `public`, so its statements name tables unqualified. The
//! outbox is the application's table: it stays in `public`, where the application's
//! transactions write it. A database migrated before Ferry had a schema of its own (its tables
//! and migrations table in `public`) is adopted in place on the next `migrate`: its tables
//! are moved, rows and all, in one transaction.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::DatabaseConfig;

/// The embedded migrations of `migrations/`.
// `ignore_missing`: a database migrated before the shop's `products` table left Ferry's
// migrations (it was version 2; it is the example application's now, `examples/shop/schema.sql`)
// keeps that version in its history, and its table.
pub static MIGRATOR: Migrator = Migrator {
    ignore_missing: true,
    ..sqlx::migrate!("./migrations")
};

/// A Postgres failure at Ferry's boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL does not parse.
    #[error("invalid database URL: {0}")]
    Url(#[source] sqlx::Error),
    /// The server could not be reached or refused the login.
    #[error("cannot connect to Postgres: {0}")]
    Connect(#[source] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("query failed: {0}")]
    Query(#[from] sqlx::Error),
    /// The pool's sessions do not name Ferry's schema first (a pool not made by
    /// [`connect`] or [`session`]).
    #[error(
        "Ferry's schema is not first in the session's search_path ({0:?}): connect through ferry::store::session"
    )]
    NoSchema(String),
}

/// Opens a pool. Fails fast (within `acquire_timeout`) when the server is down, so a start-up
/// error is an error, not a hang.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = config.url.parse().map_err(StoreError::Url)?;
    pool_options(config.max_connections)
        .connect_with(session(options, &config.schema))
        .await
        .map_err(StoreError::Connect)
}

/// How Ferry pools its sessions (made by [`session`]), at most `max_connections` of them.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // sqlx pings a connection before handing it out unless told not to: a round trip
        // before every statement, which `ferry bench pipeline` saw in the consumers' profile
        // and Postgres's CPU. A connection that broke meanwhile fails its statement instead,
        // which every caller already treats as a database failure (retried), and the pool
        // drops it.
        .test_before_acquire(false)
}

/// What every session of Ferry's sets at login: its name (`ferry`, unless the URL gives one),
/// Ferry's schema first in the
/// `search_path` (`schema` must be a plain identifier, see
/// [`crate::config::is_schema_name`]), and custom plans only.
///
/// sqlx prepares each statement once per connection, and after five executions PostgreSQL may
/// switch a prepared statement to a generic plan, made for the tables as they were then and kept
/// until they are analyzed. Ferry's tables start empty and grow fast, so such a plan is a
/// sequential scan that stays: the dedupe lookup of 500 ids took a second at 200,000 settled
/// events, the partner's mapping lookup 100 ms at 200,000 mappings (0.6 ms planned afresh).
/// Planning each execution costs tens of microseconds and keeps every plan fit for the table's
/// size.
pub fn session(options: PgConnectOptions, schema: &str) -> PgConnectOptions {
    // A name the URL gives (`?application_name=...`) is kept: an operator telling instances
    // apart in `pg_stat_activity`, or `ferry bench pipeline` its processes.
    let name = options.get_application_name().unwrap_or("ferry").to_owned();
    options.application_name(&name).options([
        ("plan_cache_mode", "force_custom_plan"),
        ("search_path", &format!("{schema},public")),
    ])
}

/// Ferry's tables in a database migrated before they had a schema of their own. The outbox is
/// the application's and stays, and so does the shop's `products` (created by Ferry's
/// migrations then, the example application's now).
const LEGACY_TABLES: [&str; 8] = [
    "control",
    "deliveries",
    "delivery_attempts",
    "integration_mappings",
    "operator_actions",
    "parked_events",
    "tenants",
    "_sqlx_migrations",
];

/// Applies every pending migration in Ferry's schema (the first of the pool's `search_path`,
/// as [`session`] sets it), creating the schema and adopting a database migrated before it
/// had one. Safe to run concurrently from several instances: both steps hold an advisory
/// lock.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let schema = ferrys_schema(pool).await?;
    let mut tx = pool.begin().await?;
    // One instance at a time creates the schema or adopts the old layout; the next finds it
    // done.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('ferry schema'))")
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&mut *tx)
        .await?;
    if is_legacy_layout(&mut tx, &schema).await? {
        for table in LEGACY_TABLES {
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(format!("public.{table}"))
                .fetch_one(&mut *tx)
                .await?;
            if exists {
                sqlx::query(&format!("ALTER TABLE public.{table} SET SCHEMA {schema}"))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tracing::info!(%schema, "moved Ferry's tables out of public into their own schema");
    }
    tx.commit().await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The schema Ferry's sessions put first in their `search_path`.
async fn ferrys_schema(pool: &PgPool) -> Result<String, StoreError> {
    let path: String = sqlx::query_scalar("SELECT current_setting('search_path')")
        .fetch_one(pool)
        .await?;
    let first = path.split(',').next().unwrap_or_default().trim();
    if crate::config::is_schema_name(first) {
        Ok(first.to_owned())
    } else {
        Err(StoreError::NoSchema(path))
    }
}

/// Whether `public` holds Ferry's migrations table (its first migration, by checksum: not an
/// application's own sqlx table) and `schema` none yet.
async fn is_legacy_layout(tx: &mut sqlx::PgConnection, schema: &str) -> Result<bool, StoreError> {
    let (in_public, in_schema): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('public._sqlx_migrations') IS NOT NULL, to_regclass($1) IS NOT NULL",
    )
    .bind(format!("{schema}._sqlx_migrations"))
    .fetch_one(&mut *tx)
    .await?;
    if !in_public || in_schema || schema == "public" {
        return Ok(false);
    }
    let first = MIGRATOR.iter().next().expect("a first migration");
    let ours: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM public._sqlx_migrations WHERE version = $1 AND checksum = $2)",
    )
    .bind(first.version)
    .bind(first.checksum.as_ref())
    .fetch_one(&mut *tx)
    .await?;
    Ok(ours)
}

/// The newest applied migration version, `None` on an empty database.
pub async fn schema_version(pool: &PgPool) -> Result<Option<i64>, StoreError> {
    let version: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?;
    Ok(version)
}
