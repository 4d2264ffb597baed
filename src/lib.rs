//! Ferry keeps a partner platform in sync with ours through the transactional outbox pattern.
//!
//! Our application writes each change into the `outbox` table in the same transaction as the
//! change; a change feed (Debezium, or Ferry's relay) carries the outbox into Kafka keyed by
//! tenant; Ferry's consumers deliver every tenant's events to the partner in order. See
//! `README.md` for the architecture and the guarantees.
//!
//! Modules are named after the domain:
//! - [`config`]: configuration from a file plus `FERRY_*` environment, validated at load;
//! - [`outbox`]: the wire contract, i.e. the events, their Kafka encoding and the decoder;
//! - [`store`]: the Postgres schema (embedded migrations) and connections;
//! - [`broker`]: Kafka client settings and topic administration;
//! - [`telemetry`]: logs and traces;
//! - [`relay`]: change data capture from the outbox to Kafka (`ferry relay`);
//! - [`scheduler`], [`consumer`] and [`delivery`]: the consumer's pure core (per-tenant FIFO,
//!   offsets, the handler contract and the one place that classifies failures);
//! - [`partner`]: the partner's API, its client, the integration (the consumer's handler) and
//!   the simulator (`ferry partner-sim`);
//! - [`tenant`]: switching a tenant's integration on (with its backfill) and off (`ferry tenant`);
//! - [`load`]: the reference "our platform" writer (`ferry load`);
//! - [`mappings`]: our ids to the partner's, staged until the settlement batch writes them, and
//!   held per tenant while its partition is owned here;
//! - [`smoke`]: the end-to-end round trip that proves a stack works;
//! - [`bench`]: the benchmarks (`ferry bench ...`);
//! - [`admin`]: the admin HTTP API each consumer serves (health, metrics, tenants, resume,
//!   the kill switch);
//! - [`ctl`]: the operator's terminal client of the admin API (`ferry ctl`);
//! - [`shutdown`]: the signal every long-running task obeys.

pub mod admin;
pub mod bench;
pub mod broker;
pub mod config;
pub mod consumer;
pub mod ctl;
pub mod dead_letter;
pub mod delivery;
pub mod exposition;
pub mod load;
pub mod mappings;
pub mod outbox;
pub mod partner;
pub mod relay;
pub mod scheduler;
pub mod shop;
pub mod shutdown;
pub mod smoke;
pub mod store;
pub mod telemetry;
pub mod tenant;
pub mod webhook;
