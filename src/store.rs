//! Postgres: connections and the schema. The schema lives in `migrations/` and is embedded in
//! the binary, so `ferry migrate` needs nothing but a database URL.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::DatabaseConfig;

/// The embedded migrations of `migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

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
}

/// Opens a pool. Fails fast (within `acquire_timeout`) when the server is down, so a start-up
/// error is an error, not a hang.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = config.url.parse().map_err(StoreError::Url)?;
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(session(options))
        .await
        .map_err(StoreError::Connect)
}

/// What every session of Ferry's sets at login: its name, and custom plans only.
///
/// sqlx prepares each statement once per connection, and after five executions PostgreSQL may
/// switch a prepared statement to a generic plan, made for the tables as they were then and kept
/// until they are analyzed. Ferry's tables start empty and grow fast, so such a plan is a
/// sequential scan that stays: the dedupe lookup of 500 ids took a second at 200,000 settled
/// events, the partner's mapping lookup 100 ms at 200,000 mappings (0.6 ms planned afresh).
/// Planning each execution costs tens of microseconds and keeps every plan fit for the table's
/// size.
pub fn session(options: PgConnectOptions) -> PgConnectOptions {
    options
        .application_name("ferry")
        .options([("plan_cache_mode", "force_custom_plan")])
}

/// Applies every pending migration. Safe to run concurrently from several instances: sqlx
/// takes an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The newest applied migration version, `None` on an empty database.
pub async fn schema_version(pool: &PgPool) -> Result<Option<i64>, StoreError> {
    let version: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?;
    Ok(version)
}
