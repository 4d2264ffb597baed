//! `ferry consume`'s building blocks. So far the pure core: [`offsets`], the per-partition
//! offset tracker that says what may be committed. The intake, the handler and the failure
//! handling of the consumer are the next step (see the README's status).

pub mod offsets;
