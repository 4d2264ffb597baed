//! `ferry consume`. [`runtime`] is its entry point and supervisor; [`coordinator`] the one owner
//! of its state, whose loop takes records in ([`intake`]), runs each tenant's events one at a
//! time through [`crate::scheduler`] and [`attempt`], replays resumed backlogs ([`drain`]),
//! writes what settled and commits ([`settlement`]), and follows partition ownership
//! ([`rebalance`]) as the poll thread ([`poller`]) reports it. Its pure parts: [`offsets`] (what may be committed per partition),
//! [`breaker`] (is it the tenant or the partner that is failing; the breaker's states) and
//! [`copies`] (a copy of an event close by is not handled twice); [`ledger`] holds the
//! Postgres records of settled events, parked backlogs and tenant state.

mod attempt;
pub mod breaker;
mod coordinator;
pub mod copies;
mod drain;
mod intake;
pub mod latency;
pub mod ledger;
pub mod offsets;
mod poller;
mod rebalance;
pub mod runtime;
mod settled_copy;
mod settlement;
pub mod tenants;
