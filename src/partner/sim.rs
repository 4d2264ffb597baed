//! `ferry partner-sim`: a real HTTP server that plays the partner's REST API (see
//! [`crate::partner`]), records every request it receives, and misbehaves on demand.
//!
//! It honours `Idempotency-Key` (a replayed key gets the first response back, counted), keeps
//! our id as each object's searchable `external_id`, and checks per account that the events
//! arrived in order: every request carries the event's log position
//! ([`super::api::POSITION_HEADER`]); the first request of a new event must not be at an earlier
//! position than the account's previous event.
//!
//! Faults (`PUT /_sim/faults`, a [`Faults`] document) apply before the idempotency layer, as a
//! real partner's gateway would: a tenant failing with a given status, a full outage for a time
//! window, latency (fixed plus uniform jitter), 429 with `Retry-After` for a tenant's next
//! requests, 422 for given item names, and lost responses (the write is applied, then the answer
//! is held past the client's timeout). `GET /_sim/report` says per account what it holds and
//! whether its requests were in order; `GET /_sim/accounts/{account}` returns its objects;
//! `GET /_sim/requests` the request log; `POST /_sim/reset` forgets everything.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::api::{
    List, NewShopItem, NewShopPrice, POSITION_HEADER, ShopItem, ShopItemUpdate, ShopPrice,
    ShopPriceUpdate,
};

/// Misbehaviour on demand. Every field is optional in the JSON document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Every request of these accounts is answered with this status (e.g. 503, 422, 401).
    pub tenant_status: BTreeMap<String, u16>,
    /// Every request fails with `outage_status` for this long from when the faults are set.
    pub outage_ms: Option<u64>,
    /// The outage's status (503 if unset).
    pub outage_status: Option<u16>,
    /// Added to every answer, in milliseconds...
    pub latency_ms: u64,
    /// ...plus a uniform random share of this many.
    pub latency_jitter_ms: u64,
    /// The next this-many requests of an account are answered 429 with `Retry-After`.
    pub rate_limit: BTreeMap<String, u32>,
    /// The `Retry-After` of those answers, in seconds (1 if unset).
    pub retry_after_s: Option<u64>,
    /// Items with one of these names are refused with 422.
    pub reject_names: Vec<String>,
    /// The next this-many writes of an account are applied, then their answer is held for
    /// `lose_delay_ms` (past the client's timeout): the response is lost.
    pub lose_responses: BTreeMap<String, u32>,
    /// How long a lost response is held (5000 if unset).
    pub lose_delay_ms: Option<u64>,
    /// Single requests to fail: the next `times` requests matching a rule get its status.
    pub fail: Vec<FailRule>,
    /// The next this-many reads (`GET`) of an account are answered 200 with a list padded to
    /// [`OVERSIZED_ANSWER_BYTES`]: an answer far larger than any the API documents.
    pub oversized_answers: BTreeMap<String, u32>,
    /// The partner ignores `Idempotency-Key`: every write is applied afresh, never answered
    /// from an earlier one (as many real APIs do).
    pub ignore_idempotency_keys: bool,
}

/// The size of an oversized answer (see [`Faults::oversized_answers`]).
pub const OVERSIZED_ANSWER_BYTES: usize = 8 << 20;

/// Fails the next `times` requests of `account` whose method is `method` and whose path
/// contains `path` (e.g. `POST` `/shop-prices`: a create that stops half-way).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailRule {
    /// The account.
    pub account: String,
    /// The HTTP method.
    pub method: String,
    /// A part of the path.
    pub path: String,
    /// The status to answer.
    pub status: u16,
    /// How many requests.
    pub times: u32,
}

/// One request as the simulator received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The account (our tenant).
    pub account: String,
    /// The HTTP method.
    pub method: String,
    /// The path.
    pub path: String,
    /// `Idempotency-Key`, if sent.
    pub idempotency_key: Option<String>,
    /// `traceparent`, if sent.
    pub traceparent: Option<String>,
    /// The event's log position, if sent.
    pub position: Option<String>,
    /// The status answered.
    pub status: u16,
    /// Whether it was a replay of an idempotency key.
    pub replay: bool,
    /// When it arrived, in milliseconds since the simulator started.
    pub at_ms: u64,
}

/// Per account: what the partner holds and how its requests went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountReport {
    /// Requests received.
    pub requests: u64,
    /// Requests answered from the idempotency store.
    pub replays: u64,
    /// New events whose position was before the account's previous event.
    pub order_violations: u64,
    /// Items held.
    pub items: usize,
    /// Prices held.
    pub prices: usize,
    /// Objects sharing an `external_id` with another of their kind (duplicates).
    pub duplicate_objects: usize,
}

/// An account's objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountState {
    /// Its items, by id.
    pub items: Vec<ShopItem>,
    /// Its prices, by id.
    pub prices: Vec<ShopPrice>,
}

#[derive(Default)]
struct Account {
    items: BTreeMap<String, ShopItem>,
    prices: BTreeMap<String, ShopPrice>,
    requests: u64,
    replays: u64,
    order_violations: u64,
    /// The last event position seen per partition, and the events seen.
    last_position: HashMap<i32, i64>,
    events: HashSet<String>,
    /// Answers by idempotency key.
    answers: HashMap<String, (u16, Value)>,
    rate_limited: u32,
    lose: u32,
    oversized: u32,
}

impl Account {
    /// The answer this account's faults give a request instead of the operation, if any: its
    /// status, body and `Retry-After` seconds.
    fn fault(
        &mut self,
        faults: &Faults,
        account: &str,
        method: &Method,
    ) -> Option<(u16, Value, Option<u64>)> {
        if let Some(&status) = faults.tenant_status.get(account) {
            return Some((
                status,
                json!({"error": {"code": "simulated", "message": format!("account {account} fails with {status} (simulated)")}}),
                None,
            ));
        }
        if self.rate_limited > 0 {
            self.rate_limited -= 1;
            let (status, body) = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests",
            );
            return Some((status, body, Some(faults.retry_after_s.unwrap_or(1))));
        }
        if self.oversized > 0 && *method == Method::GET {
            self.oversized -= 1;
            return Some((
                200,
                json!({"data": [], "padding": "x".repeat(OVERSIZED_ANSWER_BYTES)}),
                None,
            ));
        }
        None
    }

    /// Order: the first request of a new event (its idempotency key's first part) must not
    /// come from an earlier position of its partition than the account's previous event.
    fn check_order(&mut self, position: Option<&str>, key: Option<&str>) {
        let (Some(position), Some(key)) = (position, key) else {
            return;
        };
        let event = key.split('/').next().unwrap_or(key).to_owned();
        if self.events.insert(event)
            && let Some((p, o)) = position
                .split_once('/')
                .and_then(|(p, o)| Some((p.parse::<i32>().ok()?, o.parse::<i64>().ok()?)))
        {
            let last = self.last_position.entry(p).or_insert(o);
            if o < *last {
                self.order_violations += 1;
            } else {
                *last = o;
            }
        }
    }
}

struct SimState {
    started: Instant,
    accounts: BTreeMap<String, Account>,
    faults: Faults,
    outage_until: Option<Instant>,
    requests: Vec<RequestRecord>,
    next_id: u64,
}

impl Default for SimState {
    fn default() -> Self {
        SimState {
            started: Instant::now(),
            accounts: BTreeMap::new(),
            faults: Faults::default(),
            outage_until: None,
            requests: Vec::new(),
            next_id: 0,
        }
    }
}

/// The simulator.
pub struct Sim {
    token: String,
    state: Mutex<SimState>,
    /// The tenants' webhook endpoints, served beside the shop's API.
    pub hooks: crate::webhook::receiver::Receiver,
}

/// The simulator's shared state, for tests that run it in-process.
pub type SimHandle = Arc<Sim>;

impl Sim {
    /// A simulator that accepts `token` as the bearer token.
    pub fn new(token: impl Into<String>) -> SimHandle {
        Arc::new(Sim {
            token: token.into(),
            state: Mutex::new(SimState::default()),
            hooks: crate::webhook::receiver::Receiver::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().expect("simulator state")
    }

    /// Replaces the faults; an outage starts now.
    pub fn set_faults(&self, faults: Faults) {
        let mut s = self.lock();
        s.outage_until = faults
            .outage_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        for account in s.accounts.values_mut() {
            account.rate_limited = 0;
            account.lose = 0;
            account.oversized = 0;
        }
        for (name, n) in &faults.oversized_answers {
            s.accounts.entry(name.clone()).or_default().oversized = *n;
        }
        for (name, n) in &faults.rate_limit {
            s.accounts.entry(name.clone()).or_default().rate_limited = *n;
        }
        for (name, n) in &faults.lose_responses {
            s.accounts.entry(name.clone()).or_default().lose = *n;
        }
        s.faults = faults;
    }

    /// Per account: what it holds and how its requests went.
    pub fn report(&self) -> BTreeMap<String, AccountReport> {
        let s = self.lock();
        s.accounts
            .iter()
            .map(|(name, a)| {
                let dup = |ids: Vec<&String>| ids.len() - ids.iter().collect::<HashSet<_>>().len();
                (
                    name.clone(),
                    AccountReport {
                        requests: a.requests,
                        replays: a.replays,
                        order_violations: a.order_violations,
                        items: a.items.len(),
                        prices: a.prices.len(),
                        duplicate_objects: dup(a.items.values().map(|i| &i.external_id).collect())
                            + dup(a.prices.values().map(|p| &p.external_id).collect()),
                    },
                )
            })
            .collect()
    }

    /// An account's objects.
    pub fn account(&self, account: &str) -> AccountState {
        let s = self.lock();
        s.accounts
            .get(account)
            .map(|a| AccountState {
                items: a.items.values().cloned().collect(),
                prices: a.prices.values().cloned().collect(),
            })
            .unwrap_or_default()
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    /// Forgets everything.
    pub fn reset(&self) {
        *self.lock() = SimState::default();
    }
}

/// The simulator's routes.
pub fn router(sim: SimHandle) -> Router {
    let api = Router::new()
        .route(
            "/shop-items",
            post(create_one::<ShopItem>).get(find::<ShopItem>),
        )
        .route(
            "/shop-items/{id}",
            get(get_one::<ShopItem>)
                .put(update_one::<ShopItem>)
                .delete(delete_one::<ShopItem>),
        )
        .route(
            "/shop-prices",
            post(create_one::<ShopPrice>).get(find::<ShopPrice>),
        )
        .route(
            "/shop-prices/{id}",
            get(get_one::<ShopPrice>)
                .put(update_one::<ShopPrice>)
                .delete(delete_one::<ShopPrice>),
        );
    let (hooks, hooks_control) = crate::webhook::receiver::router(sim.hooks.clone());
    // The simulator's own control routes need its token too: a fault set by a stranger
    // would be a test's false failure.
    let control = Router::new()
        .merge(hooks_control)
        .route("/_sim/faults", put(put_faults).get(get_faults))
        .route("/_sim/report", get(get_report))
        .route("/_sim/accounts/{account}", get(get_account))
        .route("/_sim/requests", get(get_requests))
        .route("/_sim/reset", post(post_reset))
        .route_layer(axum::middleware::from_fn_with_state(
            sim.clone(),
            control_auth,
        ));
    Router::new()
        .nest("/v1/accounts/{account}", api)
        .merge(control)
        .merge(hooks)
        .route("/healthz", get(|| async { "ok" }))
        .with_state(sim)
}

async fn control_auth(
    State(sim): State<SimHandle>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(sim.token.as_str()) {
        next.run(request).await
    } else {
        let (status, body) = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the simulator's control routes need its bearer token",
        );
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED);
        (status, axum::Json(body)).into_response()
    }
}

/// Serves the simulator on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sim: SimHandle,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(sim))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> (u16, Value) {
    (
        status.as_u16(),
        json!({"error": {"code": code, "message": message.into()}}),
    )
}

fn respond((status, body): (u16, Value)) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status == StatusCode::NO_CONTENT {
        status.into_response()
    } else {
        (status, axum::Json(body)).into_response()
    }
}

/// What the gate decided for a request.
enum Gate {
    /// Answer this now (a fault, a refusal, or a replay).
    Answer(u16, Value, Option<u64>),
    /// Go on; `key` is the idempotency key to store the answer under.
    Proceed { key: Option<String>, lose: bool },
}

/// Faults, credentials, ordering and idempotency: everything a request meets before the
/// operation itself.
fn gate(sim: &Sim, account: &str, method: &Method, uri: &Uri, headers: &HeaderMap) -> Gate {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let key = header("idempotency-key");
    let position = header(POSITION_HEADER);
    let mut s = sim.lock();
    let at_ms = s.started.elapsed().as_millis() as u64;
    s.requests.push(RequestRecord {
        account: account.to_owned(),
        method: method.to_string(),
        path: uri.path().to_owned(),
        idempotency_key: key.clone(),
        traceparent: header("traceparent"),
        position: position.clone(),
        status: 0,
        replay: false,
        at_ms,
    });
    let authorized = header("authorization").is_some_and(|v| v == format!("Bearer {}", sim.token));
    let answer = refusal(&mut s, account, method, uri, authorized);
    if let Some((status, body, retry_after)) = answer {
        drop(s);
        return finish_gate(sim, Gate::Answer(status, body, retry_after));
    }
    let ignore_keys = s.faults.ignore_idempotency_keys;
    let a = s.accounts.entry(account.to_owned()).or_default();
    a.check_order(position.as_deref(), key.as_deref());
    if *method != Method::GET
        && !ignore_keys
        && let Some(key) = &key
        && let Some((status, body)) = a.answers.get(key).cloned()
    {
        a.replays += 1;
        drop(s);
        if let Some(last) = sim.lock().requests.last_mut() {
            last.replay = true;
        }
        return finish_gate(sim, Gate::Answer(status, body, None));
    }
    let lose = *method != Method::GET && a.lose > 0;
    if lose {
        a.lose -= 1;
    }
    Gate::Proceed {
        key: key.filter(|_| *method != Method::GET),
        lose,
    }
}

/// The answer a request gets before its operation, if any: a refusal of its credentials, an
/// outage, a failure rule that matches it, or the account's scripted fault. Counts the request
/// against its account.
fn refusal(
    s: &mut SimState,
    account: &str,
    method: &Method,
    uri: &Uri,
    authorized: bool,
) -> Option<(u16, Value, Option<u64>)> {
    let faults = s.faults.clone();
    let outage = s.outage_until.is_some_and(|until| Instant::now() < until);
    let rule = s.faults.fail.iter_mut().find(|r| {
        r.times > 0
            && r.account == account
            && r.method.eq_ignore_ascii_case(method.as_str())
            && uri.path().contains(&r.path)
    });
    let failed_by_rule = rule.map(|r| {
        r.times -= 1;
        r.status
    });
    let a = s.accounts.entry(account.to_owned()).or_default();
    a.requests += 1;
    if !authorized {
        let (status, body) = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        );
        Some((status, body, None))
    } else if outage {
        let status = faults.outage_status.unwrap_or(503);
        Some((
            status,
            json!({"error": {"code": "unavailable", "message": "the partner is down (simulated outage)"}}),
            None,
        ))
    } else if let Some(status) = failed_by_rule {
        Some((
            status,
            json!({"error": {"code": "simulated", "message": format!("{method} {} fails with {status} (simulated)", uri.path())}}),
            None,
        ))
    } else {
        a.fault(&faults, account, method)
    }
}

fn finish_gate(sim: &Sim, gate: Gate) -> Gate {
    if let Gate::Answer(status, _, _) = &gate
        && let Some(last) = sim.lock().requests.last_mut()
    {
        last.status = *status;
    }
    gate
}

/// Runs `op` behind the gate, with the configured latency; stores a write's answer under its
/// idempotency key; holds a lost response.
async fn handle(
    sim: SimHandle,
    account: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    op: impl FnOnce(&mut SimState, &str) -> (u16, Value),
) -> Response {
    let latency = {
        let f = sim.lock().faults.clone();
        let jitter = if f.latency_jitter_ms > 0 {
            // No rand dependency: the clock's nanoseconds are random enough for jitter.
            u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos(),
            ) % (f.latency_jitter_ms + 1)
        } else {
            0
        };
        Duration::from_millis(f.latency_ms + jitter)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match gate(&sim, &account, &method, &uri, &headers) {
        Gate::Answer(status, body, retry_after) => {
            let mut response = respond((status, body));
            if let Some(seconds) = retry_after {
                response.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from(seconds),
                );
            }
            response
        }
        Gate::Proceed { key, lose } => {
            let (answer, lose_delay) = {
                let mut s = sim.lock();
                let answer = op(&mut s, &account);
                if let Some(key) = key
                    && answer.0 < 500
                {
                    let a = s.accounts.entry(account.clone()).or_default();
                    a.answers.insert(key, answer.clone());
                }
                if let Some(last) = s.requests.last_mut() {
                    last.status = answer.0;
                }
                (answer, s.faults.lose_delay_ms.unwrap_or(5_000))
            };
            if lose {
                tokio::time::sleep(Duration::from_millis(lose_delay)).await;
            }
            respond(answer)
        }
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, (u16, Value)> {
    serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "bad_request", format!("body: {e}")))
}

fn next_id(s: &mut SimState, prefix: &str) -> String {
    s.next_id += 1;
    format!("{prefix}_{:08}", s.next_id)
}

fn valid_item(s: &SimState, name: &str) -> Result<(), (u16, Value)> {
    if name.trim().is_empty() {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "name is required",
        ));
    }
    if s.faults.reject_names.iter().any(|n| n == name) {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            format!("name {name:?} is not allowed"),
        ));
    }
    Ok(())
}

fn valid_price(amount_minor: i64, currency: &str) -> Result<(), (u16, Value)> {
    if amount_minor < 0 {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "amount_minor must not be negative",
        ));
    }
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            format!("currency {currency:?} is not an ISO 4217 code"),
        ));
    }
    Ok(())
}

fn not_found(what: &str, id: &str) -> (u16, Value) {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no {what} {id}"),
    )
}

#[derive(Deserialize)]
struct Search {
    external_id: Option<String>,
}

type Req = (State<SimHandle>, Method, Uri, HeaderMap);

/// A kind of object the simulator keeps: where it lives in an account, and what deleting one
/// takes with it.
trait Object: Clone + Serialize + Send + 'static {
    /// What a create sends.
    type New: for<'de> Deserialize<'de> + Send;
    /// What an update sends.
    type Update: for<'de> Deserialize<'de> + Send;
    /// Its name in messages and ids.
    const NAME: &'static str;
    /// Refuses a create the partner would refuse (422, or 404 for a missing parent).
    fn check_new(s: &SimState, account: &str, new: &Self::New) -> Result<(), (u16, Value)>;
    /// The object a create makes, with the id the partner assigned.
    fn build(new: Self::New, id: String) -> Self;
    /// Refuses an update the partner would refuse (422).
    fn check_update(s: &SimState, update: &Self::Update) -> Result<(), (u16, Value)>;
    /// Applies an update.
    fn apply(&mut self, update: Self::Update);
    fn all(a: &Account) -> &BTreeMap<String, Self>;
    fn all_mut(a: &mut Account) -> &mut BTreeMap<String, Self>;
    fn id(&self) -> &str;
    fn external_id(&self) -> &str;
    /// After the object `id` was deleted from `a`.
    fn deleted(_a: &mut Account, _id: &str) {}
}

impl Object for ShopItem {
    type New = NewShopItem;
    type Update = ShopItemUpdate;
    const NAME: &'static str = "item";
    fn check_new(s: &SimState, _account: &str, new: &NewShopItem) -> Result<(), (u16, Value)> {
        valid_item(s, &new.name)
    }
    fn build(new: NewShopItem, id: String) -> Self {
        ShopItem {
            id,
            name: new.name,
            description: new.description,
            external_id: new.external_id,
        }
    }
    fn check_update(s: &SimState, update: &ShopItemUpdate) -> Result<(), (u16, Value)> {
        valid_item(s, &update.name)
    }
    fn apply(&mut self, update: ShopItemUpdate) {
        self.name = update.name;
        self.description = update.description;
    }
    fn all(a: &Account) -> &BTreeMap<String, Self> {
        &a.items
    }
    fn all_mut(a: &mut Account) -> &mut BTreeMap<String, Self> {
        &mut a.items
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn external_id(&self) -> &str {
        &self.external_id
    }
    /// An item's prices go with it.
    fn deleted(a: &mut Account, id: &str) {
        a.prices.retain(|_, p| p.item_id != id);
    }
}

impl Object for ShopPrice {
    type New = NewShopPrice;
    type Update = ShopPriceUpdate;
    const NAME: &'static str = "price";
    /// A price needs its item, in the same account.
    fn check_new(s: &SimState, account: &str, new: &NewShopPrice) -> Result<(), (u16, Value)> {
        valid_price(new.amount_minor, &new.currency)?;
        if !s
            .accounts
            .get(account)
            .is_some_and(|a| a.items.contains_key(&new.item_id))
        {
            return Err(not_found("item", &new.item_id));
        }
        Ok(())
    }
    fn build(new: NewShopPrice, id: String) -> Self {
        ShopPrice {
            id,
            item_id: new.item_id,
            amount_minor: new.amount_minor,
            currency: new.currency,
            external_id: new.external_id,
        }
    }
    fn check_update(_s: &SimState, update: &ShopPriceUpdate) -> Result<(), (u16, Value)> {
        valid_price(update.amount_minor, &update.currency)
    }
    fn apply(&mut self, update: ShopPriceUpdate) {
        self.amount_minor = update.amount_minor;
        self.currency = update.currency;
    }
    fn all(a: &Account) -> &BTreeMap<String, Self> {
        &a.prices
    }
    fn all_mut(a: &mut Account) -> &mut BTreeMap<String, Self> {
        &mut a.prices
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn external_id(&self) -> &str {
        &self.external_id
    }
}

/// `GET /shop-items` or `/shop-prices`, optionally `?external_id=`.
async fn find<O: Object>(
    (State(sim), method, uri, headers): Req,
    Path(account): Path<String>,
    Query(search): Query<Search>,
) -> Response {
    handle(sim, account, method, uri, headers, move |s, account| {
        let data: Vec<O> = s
            .accounts
            .get(account)
            .map(|a| {
                O::all(a)
                    .values()
                    .filter(|o| {
                        search
                            .external_id
                            .as_deref()
                            .is_none_or(|e| e == o.external_id())
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        (200, json!(List { data }))
    })
    .await
}

/// `GET /shop-items/{id}` or `/shop-prices/{id}`.
async fn get_one<O: Object>(
    (State(sim), method, uri, headers): Req,
    Path((account, id)): Path<(String, String)>,
) -> Response {
    handle(
        sim,
        account,
        method,
        uri,
        headers,
        move |s, account| match s.accounts.get(account).and_then(|a| O::all(a).get(&id)) {
            Some(object) => (200, json!(object)),
            None => not_found(O::NAME, &id),
        },
    )
    .await
}

/// `DELETE /shop-items/{id}` or `/shop-prices/{id}`.
async fn delete_one<O: Object>(
    (State(sim), method, uri, headers): Req,
    Path((account, id)): Path<(String, String)>,
) -> Response {
    handle(sim, account, method, uri, headers, move |s, account| {
        let Some(a) = s.accounts.get_mut(account) else {
            return not_found(O::NAME, &id);
        };
        match O::all_mut(a).remove(&id) {
            Some(_) => {
                O::deleted(a, &id);
                (204, Value::Null)
            }
            None => not_found(O::NAME, &id),
        }
    })
    .await
}

/// `POST /shop-items` or `/shop-prices`: the partner assigns the id.
async fn create_one<O: Object>(
    (State(sim), method, uri, headers): Req,
    Path(account): Path<String>,
    body: Bytes,
) -> Response {
    handle(sim, account, method, uri, headers, move |s, account| {
        let new: O::New = match parse(&body) {
            Ok(v) => v,
            Err(e) => return e,
        };
        if let Err(e) = O::check_new(s, account, &new) {
            return e;
        }
        let object = O::build(new, next_id(s, O::NAME));
        let a = s.accounts.entry(account.to_owned()).or_default();
        O::all_mut(a).insert(object.id().to_owned(), object.clone());
        (201, json!(object))
    })
    .await
}

/// `PUT /shop-items/{id}` or `/shop-prices/{id}`: replaces the fields an update carries.
async fn update_one<O: Object>(
    (State(sim), method, uri, headers): Req,
    Path((account, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    handle(sim, account, method, uri, headers, move |s, account| {
        let update: O::Update = match parse(&body) {
            Ok(v) => v,
            Err(e) => return e,
        };
        if let Err(e) = O::check_update(s, &update) {
            return e;
        }
        match s
            .accounts
            .get_mut(account)
            .and_then(|a| O::all_mut(a).get_mut(&id))
        {
            Some(object) => {
                object.apply(update);
                (200, json!(object))
            }
            None => not_found(O::NAME, &id),
        }
    })
    .await
}

async fn put_faults(State(sim): State<SimHandle>, body: Bytes) -> Response {
    match parse::<Faults>(&body) {
        Ok(faults) => {
            sim.set_faults(faults.clone());
            (StatusCode::OK, axum::Json(faults)).into_response()
        }
        Err(e) => respond(e),
    }
}

async fn get_faults(State(sim): State<SimHandle>) -> Response {
    axum::Json(sim.lock().faults.clone()).into_response()
}

async fn get_report(State(sim): State<SimHandle>) -> Response {
    axum::Json(sim.report()).into_response()
}

async fn get_account(State(sim): State<SimHandle>, Path(account): Path<String>) -> Response {
    axum::Json(sim.account(&account)).into_response()
}

async fn get_requests(State(sim): State<SimHandle>) -> Response {
    axum::Json(sim.requests()).into_response()
}

async fn post_reset(State(sim): State<SimHandle>) -> Response {
    sim.reset();
    StatusCode::NO_CONTENT.into_response()
}
