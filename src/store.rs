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
        .connect_with(options.application_name("ferry"))
        .await
        .map_err(StoreError::Connect)
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
