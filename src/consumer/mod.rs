//! `ferry consume`: [`runtime`], the loop that takes records from Kafka, runs them through the
//! [`crate::scheduler`] and a [`crate::delivery::Handler`], and commits; its pure parts,
//! [`offsets`] (what may be committed per partition) and [`breaker`] (is it the tenant or the
//! partner that is failing); and [`ledger`], the batched Postgres records of settled events,
//! parked backlogs and tenant state.

pub mod breaker;
pub mod latency;
pub mod ledger;
pub mod offsets;
pub mod runtime;
