//! The partner: the client that calls it and classifies its answers ([`client`]); the generic
//! driver every integration's objects go through ([`driver`]: mapping, healing, idempotency
//! keys); integrations declared in a file ([`spec`], [`template`], run by [`rest`]); the
//! reference shop's integration written in Rust ([`integration`], over the shop API of
//! [`api`]); and a simulator that plays the partner for tests and the demo ([`sim`]).
//!
//! The partner's API, in short (every route is under `/v1/accounts/{account}`, the account is
//! our tenant id; every request carries `Authorization: Bearer <token>`):
//!
//! | route | does |
//! |---|---|
//! | `POST /shop-items` `{name, description, external_id}` | creates an item, 201 with its `id` |
//! | `GET /shop-items?external_id=X` | finds items by our id (`{"data": [...]}`) |
//! | `GET`, `PUT`, `DELETE /shop-items/{id}` | reads, replaces (`{name, description}`), deletes (and its prices) |
//! | `POST /shop-prices` `{item_id, amount_minor, currency, external_id}` | creates a price for an item |
//! | `GET /shop-prices?external_id=X` | finds prices by our id |
//! | `GET`, `PUT`, `DELETE /shop-prices/{id}` | reads, replaces (`{amount_minor, currency}`), deletes |
//!
//! Writes honour `Idempotency-Key`: a replayed key gets the first response back. Errors are
//! `{"error": {"code", "message"}}` with 400/404/409/422 for a request that is wrong, 401/403
//! for credentials, 429 with `Retry-After` for too many requests, 5xx for the partner's trouble.

pub mod api;
pub mod client;
pub mod driver;
pub mod integration;
pub mod rate_limits;
pub mod rest;
pub mod sim;
pub mod spec;
pub mod template;
pub mod verify;
