//! Ferry's integration tests: one binary, against the real stack (`scripts/stack up`, then
//! `eval "$(scripts/stack env)"`). Each test makes its own fresh database and its own topic.

mod admin;
mod bench;
mod consume;
mod contract;
mod ctl;
mod dashboard;
mod dead_letters;
mod declared;
mod decoder;
mod deploy;
mod example;
mod faults;
mod integrations;
mod kafka;
mod kafka_tls;
mod ledger;
mod operate;
mod partner;
mod proxy;
mod relay;
mod resilience;
mod schema;
mod support;
mod tenant;
mod tls;
mod trace;
mod webhooks;
mod writer;
