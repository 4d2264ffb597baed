//! `ferry consume`'s building blocks: [`offsets`], the per-partition offset tracker that says
//! what may be committed (pure), and [`ledger`], the batched Postgres records of settled events,
//! parked backlogs and tenant state. The intake loop, rebalance handling and failure handling
//! that tie them to the [`crate::scheduler`] and a [`crate::delivery::Handler`] are the next step
//! (see the README's status).

pub mod ledger;
pub mod offsets;
pub mod runtime;
