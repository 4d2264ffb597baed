//! `ferry load`: the reference "our platform" writer. It creates, updates and deletes products
//! across many tenants, each change in one transaction with its outbox event, exactly as our
//! application does, through [`crate::outbox::writer`].

use std::time::{Duration, Instant};

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::outbox::TenantId;
use crate::outbox::writer::{self, NewEvent};
use crate::shop::{EventPayload, proto};

/// What to write.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Distinct tenants, named `{tenant_prefix}{n}`.
    pub tenants: usize,
    /// Product changes in all (one transaction each).
    pub events: usize,
    /// Concurrent writers; each owns the tenants `n % concurrency == writer`, so a tenant's
    /// changes are written in one order (at most one writer per tenant).
    pub concurrency: usize,
    /// Tenant name prefix.
    pub tenant_prefix: String,
    /// Random seed, for a repeatable mix.
    pub seed: u64,
    /// Changes per second in all, at most (unpaced when `None`).
    pub rate: Option<f64>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            tenants: 100,
            events: 10_000,
            concurrency: 8,
            tenant_prefix: "tenant-".to_owned(),
            seed: 42,
            rate: None,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Products created.
    pub created: usize,
    /// Products updated.
    pub updated: usize,
    /// Products deleted.
    pub deleted: usize,
    /// Wall time.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Events written (one per change).
    pub fn events(&self) -> usize {
        self.created + self.updated + self.deleted
    }
}

/// A load option that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Zero tenants or writers.
    #[error("--tenants and --concurrency must be at least 1")]
    Empty,
    /// A rate that is not a positive number.
    #[error("--rate must be a positive number of changes per second, not {0}")]
    Rate(f64),
    /// A generated tenant id is invalid (the prefix is too long or has control characters).
    #[error("tenant prefix {0:?} makes invalid tenant ids")]
    Prefix(String),
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
}

/// Writes the load and reports what it wrote.
pub async fn run(pool: &PgPool, options: &LoadOptions) -> Result<LoadReport, LoadError> {
    if options.tenants == 0 || options.concurrency == 0 {
        return Err(LoadError::Empty);
    }
    if let Some(rate) = options.rate.filter(|r| !(r.is_finite() && *r > 0.0)) {
        return Err(LoadError::Rate(rate));
    }
    crate::shop::create_tables(pool).await?;
    // A writer owns tenants: with fewer tenants than writers, the rest would own none and
    // their shares of the changes would never be written.
    let concurrency = options.concurrency.min(options.tenants);
    // Each writer's share of the rate: one change every `interval`.
    let interval = options
        .rate
        .map(|r| Duration::from_secs_f64(concurrency as f64 / r));
    TenantId::new(format!("{}{}", options.tenant_prefix, options.tenants))
        .map_err(|_| LoadError::Prefix(options.tenant_prefix.clone()))?;
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let tenants: Vec<String> = (0..options.tenants)
            .filter(|t| t % concurrency == w)
            .map(|t| format!("{}{t}", options.tenant_prefix))
            .collect();
        let share = options.events / concurrency + usize::from(w < options.events % concurrency);
        let pool = pool.clone();
        let seed = options.seed ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        workers.spawn(async move { write_share(pool, tenants, share, seed, interval).await });
    }
    let mut report = LoadReport::default();
    while let Some(done) = workers.join_next().await {
        let r = done.expect("load writer panicked")?;
        report.created += r.created;
        report.updated += r.updated;
        report.deleted += r.deleted;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

async fn write_share(
    pool: PgPool,
    tenants: Vec<String>,
    events: usize,
    seed: u64,
    interval: Option<Duration>,
) -> Result<LoadReport, LoadError> {
    if tenants.is_empty() {
        return Ok(LoadReport::default());
    }
    let mut share = ShareWriter::new(pool, tenants, seed).await?;
    let started = tokio::time::Instant::now();
    for n in 0..events {
        if let Some(interval) = interval {
            tokio::time::sleep_until(started + interval * n as u32).await;
        }
        share.write_one(n).await?;
    }
    Ok(share.report)
}

/// One writer's tenants, the products each owns, and what it wrote.
struct ShareWriter {
    pool: PgPool,
    tenants: Vec<String>,
    /// Per tenant (same index), the products that exist: a change updates or deletes one of them.
    products: Vec<Vec<Uuid>>,
    rng: SplitMix,
    report: LoadReport,
}

impl ShareWriter {
    async fn new(pool: PgPool, tenants: Vec<String>, seed: u64) -> Result<Self, LoadError> {
        // Products written before (by an earlier run, or the application) are changed too.
        let mut products: Vec<Vec<Uuid>> = Vec::with_capacity(tenants.len());
        for tenant in &tenants {
            products.push(
                sqlx::query_scalar("SELECT id FROM products WHERE tenant_id = $1 ORDER BY id")
                    .bind(tenant)
                    .fetch_all(&pool)
                    .await?,
            );
        }
        Ok(ShareWriter {
            pool,
            tenants,
            products,
            rng: SplitMix(seed),
            report: LoadReport::default(),
        })
    }

    /// Change `n`: a random tenant's create (half the time, or when it owns nothing), update
    /// (35%) or delete (15%), with its event, in one transaction.
    async fn write_one(&mut self, n: usize) -> Result<(), LoadError> {
        let t = (self.rng.next() % self.tenants.len() as u64) as usize;
        let tenant = TenantId::new(self.tenants[t].clone()).expect("checked in run");
        let roll = self.rng.next() % 100;
        let mut tx = self.pool.begin().await?;
        let event = if self.products[t].is_empty() || roll < 50 {
            self.report.created += 1;
            self.create(&mut tx, t, tenant, n).await?
        } else if roll < 85 {
            self.report.updated += 1;
            self.update(&mut tx, t, tenant, n).await?
        } else {
            self.report.deleted += 1;
            self.delete(&mut tx, t, tenant).await?
        };
        writer::append(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create(
        &mut self,
        tx: &mut PgConnection,
        t: usize,
        tenant: TenantId,
        n: usize,
    ) -> Result<NewEvent<EventPayload>, LoadError> {
        let product = proto::Product {
            id: Uuid::now_v7().to_string(),
            name: format!("Product {n}"),
            description: format!("Made by load writer, change {n}"),
            price_minor: (self.rng.next() % 100_000) as i64,
            currency: "EUR".to_owned(),
        };
        sqlx::query(
            "INSERT INTO products (tenant_id, id, name, description, price_minor, currency) \
             VALUES ($1, $2::uuid, $3, $4, $5, $6)",
        )
        .bind(tenant.as_str())
        .bind(&product.id)
        .bind(&product.name)
        .bind(&product.description)
        .bind(product.price_minor)
        .bind(&product.currency)
        .execute(&mut *tx)
        .await?;
        self.products[t].push(product.id.parse().expect("uuid"));
        let id = product.id.clone();
        let payload = proto::ProductCreated {
            product: Some(product),
        };
        Ok(NewEvent::new(
            tenant,
            id,
            EventPayload::ProductCreated(payload),
        ))
    }

    async fn update(
        &mut self,
        tx: &mut PgConnection,
        t: usize,
        tenant: TenantId,
        n: usize,
    ) -> Result<NewEvent<EventPayload>, LoadError> {
        let owned = &self.products[t];
        let id = owned[(self.rng.next() % owned.len() as u64) as usize];
        let (name, description, price_minor, currency): (String, String, i64, String) =
            sqlx::query_as(
                "UPDATE products SET name = $3, price_minor = $4, version = version + 1, \
                 updated_at = now() WHERE tenant_id = $1 AND id = $2 \
                 RETURNING name, description, price_minor, currency",
            )
            .bind(tenant.as_str())
            .bind(id)
            .bind(format!("Product {n} (renamed)"))
            .bind((self.rng.next() % 100_000) as i64)
            .fetch_one(&mut *tx)
            .await?;
        let product = proto::Product {
            id: id.to_string(),
            name,
            description,
            price_minor,
            currency,
        };
        let payload = proto::ProductUpdated {
            product: Some(product),
        };
        Ok(NewEvent::new(
            tenant,
            id.to_string(),
            EventPayload::ProductUpdated(payload),
        ))
    }

    async fn delete(
        &mut self,
        tx: &mut PgConnection,
        t: usize,
        tenant: TenantId,
    ) -> Result<NewEvent<EventPayload>, LoadError> {
        let owned = &mut self.products[t];
        let id = owned.swap_remove((self.rng.next() % owned.len() as u64) as usize);
        sqlx::query("DELETE FROM products WHERE tenant_id = $1 AND id = $2")
            .bind(tenant.as_str())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let payload = proto::ProductDeleted {
            product_id: id.to_string(),
        };
        Ok(NewEvent::new(
            tenant,
            id.to_string(),
            EventPayload::ProductDeleted(payload),
        ))
    }
}

/// SplitMix64: a small, fast, seedable generator for a repeatable load mix.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
