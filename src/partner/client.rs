//! The partner's HTTP client: one method per call of its API, every failure turned into a
//! [`Failure`] the consumer understands (the design's failure table, through
//! [`FailureClass::of_status`]). Timeouts and connection errors are retryable; the partner's
//! `Retry-After` and error body are kept for the retry policy and the operator. Every request
//! first waits its turn under the partner's rate limits ([`RateLimits`]), and no answer is read
//! beyond `partner.max_response_bytes`.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::api::{
    ErrorBody, List, NewShopItem, NewShopPrice, POSITION_HEADER, ShopItem, ShopItemUpdate,
    ShopPrice, ShopPriceUpdate,
};
use super::rate_limits::RateLimits;
use crate::config::PartnerConfig;
use crate::delivery::{Failure, FailureClass};

/// How much of the partner's error body is kept for the operator.
const KEEP_BODY: usize = 2_000;

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `partner.url` is not set.
    #[error(
        "the partner's URL is not set (config key `partner.url` or environment FERRY_PARTNER_URL)"
    )]
    NoUrl,
    /// reqwest refused the settings.
    #[error("cannot build the partner's HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// What one call carries besides its body: whose it is and which event it serves.
#[derive(Debug, Clone, Default)]
pub struct Call {
    /// The account (our tenant id).
    pub account: String,
    /// `Idempotency-Key` for writes.
    pub idempotency_key: Option<String>,
    /// The event's log position (`partition/offset`).
    pub position: Option<String>,
    /// The W3C trace context of the event's span.
    pub traceparent: Option<String>,
}

impl Call {
    /// The calls of `event`'s handling, this `attempt`: the tenant's account, the event's log
    /// position, and the trace context of the consumer's span for it (a child of the
    /// writer's), else the writer's.
    pub fn for_event(
        event: &crate::outbox::OutboxEvent,
        attempt: &crate::delivery::Attempt,
    ) -> Call {
        Call {
            account: event.tenant_id.to_string(),
            idempotency_key: None,
            position: Some(format!("{}/{}", attempt.partition, attempt.offset)),
            traceparent: crate::telemetry::current_traceparent()
                .or_else(|| event.traceparent.clone()),
        }
    }

    /// The same call with `key` as its idempotency key.
    pub fn keyed(&self, key: String) -> Call {
        Call {
            idempotency_key: Some(key),
            ..self.clone()
        }
    }
}

/// The partner's API.
#[derive(Debug, Clone)]
pub struct PartnerClient {
    http: reqwest::Client,
    base: String,
    token: String,
    /// Shared by the clones: one budget per partner and per tenant for the whole process.
    limits: std::sync::Arc<RateLimits>,
    max_response_bytes: usize,
    /// The header the credential goes in, and what precedes the token in it (`Bearer`).
    auth: (String, String),
    /// The header of the idempotency key.
    idempotency_header: String,
}

impl PartnerClient {
    /// A client for `config`.
    pub fn new(config: &PartnerConfig) -> Result<Self, ClientError> {
        let url = config.url.as_deref().ok_or(ClientError::NoUrl)?;
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(PartnerClient {
            http,
            base: url.trim_end_matches('/').to_owned(),
            token: config.token.clone(),
            limits: std::sync::Arc::new(RateLimits::new(
                config.rate_limit,
                config.tenant_rate_limit,
            )),
            max_response_bytes: usize::try_from(config.max_response_bytes).unwrap_or(usize::MAX),
            auth: ("Authorization".to_owned(), "Bearer".to_owned()),
            idempotency_header: "Idempotency-Key".to_owned(),
        })
    }

    /// A client for the partner an integration file declares: its URL, credential, headers
    /// and timeout where the file gives them, Ferry's `partner.*` settings for the rest (rate
    /// limits and the answer bound among them).
    pub fn for_spec(
        config: &PartnerConfig,
        partner: &super::spec::PartnerSpec,
    ) -> Result<Self, ClientError> {
        let mut config = config.clone();
        if let Some(url) = &partner.url {
            config.url = Some(url.clone());
        }
        if let Some(token) = &partner.token {
            config.token = token.clone();
        }
        if let Some(timeout) = partner.timeout {
            config.timeout = timeout;
        }
        let mut client = PartnerClient::new(&config)?;
        client.auth = (partner.auth_header.clone(), partner.auth_scheme.clone());
        client.idempotency_header = partner.idempotency_header.clone();
        Ok(client)
    }

    /// Sends `method path` (after the base URL: the path and query, percent-encoded by the
    /// caller) with a JSON body; the answer's JSON, `None` for 204. What a declared
    /// integration calls; the typed methods below are the shop's.
    pub async fn request(
        &self,
        call: &Call,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Option<serde_json::Value>, Failure> {
        self.send_to(call, method, path, body).await
    }

    /// A call of the shop API, under the tenant's account.
    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        call: &Call,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<T>, Failure> {
        let path = format!("/v1/accounts/{}{path}", segment(&call.account)?);
        self.send_to(call, method, &path, body).await
    }

    async fn send_to<B: Serialize, T: DeserializeOwned>(
        &self,
        call: &Call,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<T>, Failure> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method.clone(), &url);
        if !self.token.is_empty() {
            let (header, scheme) = &self.auth;
            let value = match scheme.as_str() {
                "" => self.token.clone(),
                scheme => format!("{scheme} {}", self.token),
            };
            request = request.header(header.as_str(), value);
        }
        if let Some(key) = &call.idempotency_key {
            request = request.header(self.idempotency_header.as_str(), key);
        }
        if let Some(position) = &call.position {
            request = request.header(POSITION_HEADER, position);
        }
        // A client span per request, child of the event's span: the partner's side of the trace
        // hangs off this request, not off the event as a whole.
        let span = tracing::debug_span!(
            "partner request",
            otel.kind = "client",
            http.request.method = %method,
            url.path = path,
            http.response.status_code = tracing::field::Empty,
        );
        // The call names its parent (the event's span, else the writer's): explicit, so a call
        // made outside any span (a breaker's probe, say) still joins the event's trace.
        if let Some(parent) = &call.traceparent {
            crate::telemetry::continue_trace(&span, parent);
        }
        let traceparent = span
            .in_scope(crate::telemetry::current_traceparent)
            .or_else(|| call.traceparent.clone());
        if let Some(traceparent) = &traceparent {
            request = request.header("traceparent", traceparent);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        // A request that could have been sent earlier waits here, within its attempt (the
        // attempt's deadline and the drain deadline cut the wait like the call).
        self.limits.wait(&call.account).await;
        let response = tracing::Instrument::instrument(request.send(), span.clone())
            .await
            .map_err(|e| transport(&method, path, &e))?;
        span.record("http.response.status_code", response.status().as_u16());
        self.answer(&method, path, response).await
    }

    /// The partner's answer as `T` (`None` for 204), or the failure it means: read no further
    /// than `max_response_bytes`, classified by its status.
    async fn answer<T: DeserializeOwned>(
        &self,
        method: &Method,
        path: &str,
        response: reqwest::Response,
    ) -> Result<Option<T>, Failure> {
        let status = response.status();
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let retry_after = retry_after(&response);
        let (text, whole) = read_bounded(response, self.max_response_bytes)
            .await
            .map_err(|e| transport(method, path, &e))?;
        let failure = |class, message: String, retry_after| Failure {
            class,
            message,
            status: Some(status.as_u16()),
            response: Some(text.chars().take(KEEP_BODY).collect()),
            retry_after,
        };
        match FailureClass::of_status(status.as_u16()) {
            // An answer larger than any the API documents: never parsed, never kept whole.
            None if !whole => Err(failure(
                FailureClass::Retryable,
                format!(
                    "{method} {path}: the partner's answer is larger than {} bytes (partner.max_response_bytes)",
                    self.max_response_bytes
                ),
                None,
            )),
            None => serde_json::from_str(&text).map(Some).map_err(|e| {
                failure(
                    FailureClass::Retryable,
                    format!("{method} {path}: the partner's answer is not what it documents: {e}"),
                    None,
                )
            }),
            Some(class) => {
                let detail = serde_json::from_str::<ErrorBody>(&text)
                    .map(|b| format!("{}: {}", b.error.code, b.error.message))
                    .unwrap_or_else(|_| text.chars().take(200).collect());
                Err(failure(
                    class,
                    format!("{method} {path}: partner answered {status}: {detail}"),
                    retry_after,
                ))
            }
        }
    }

    /// Creates an item.
    pub async fn create_item(&self, call: &Call, item: &NewShopItem) -> Result<ShopItem, Failure> {
        self.send(call, Method::POST, "/shop-items", Some(item))
            .await?
            .ok_or_else(|| empty("POST /shop-items"))
    }

    /// The item whose `external_id` is ours, if any (the first, should there be several).
    pub async fn find_item(
        &self,
        call: &Call,
        external_id: &str,
    ) -> Result<Option<ShopItem>, Failure> {
        let path = format!("/shop-items?external_id={}", encode(external_id));
        let list: Option<List<ShopItem>> =
            self.send::<(), _>(call, Method::GET, &path, None).await?;
        Ok(list.and_then(|l| l.data.into_iter().next()))
    }

    /// Replaces an item's fields.
    pub async fn update_item(
        &self,
        call: &Call,
        id: &str,
        update: &ShopItemUpdate,
    ) -> Result<ShopItem, Failure> {
        let path = format!("/shop-items/{}", segment(id)?);
        self.send(call, Method::PUT, &path, Some(update))
            .await?
            .ok_or_else(|| empty("PUT /shop-items"))
    }

    /// Deletes an item (and its prices).
    pub async fn delete_item(&self, call: &Call, id: &str) -> Result<(), Failure> {
        let path = format!("/shop-items/{}", segment(id)?);
        self.send::<(), serde_json::Value>(call, Method::DELETE, &path, None)
            .await
            .map(|_| ())
    }

    /// Creates a price.
    pub async fn create_price(
        &self,
        call: &Call,
        price: &NewShopPrice,
    ) -> Result<ShopPrice, Failure> {
        self.send(call, Method::POST, "/shop-prices", Some(price))
            .await?
            .ok_or_else(|| empty("POST /shop-prices"))
    }

    /// The price whose `external_id` is ours, if any.
    pub async fn find_price(
        &self,
        call: &Call,
        external_id: &str,
    ) -> Result<Option<ShopPrice>, Failure> {
        let path = format!("/shop-prices?external_id={}", encode(external_id));
        let list: Option<List<ShopPrice>> =
            self.send::<(), _>(call, Method::GET, &path, None).await?;
        Ok(list.and_then(|l| l.data.into_iter().next()))
    }

    /// Replaces a price's amount.
    pub async fn update_price(
        &self,
        call: &Call,
        id: &str,
        update: &ShopPriceUpdate,
    ) -> Result<ShopPrice, Failure> {
        let path = format!("/shop-prices/{}", segment(id)?);
        self.send(call, Method::PUT, &path, Some(update))
            .await?
            .ok_or_else(|| empty("PUT /shop-prices"))
    }

    /// Deletes a price.
    pub async fn delete_price(&self, call: &Call, id: &str) -> Result<(), Failure> {
        let path = format!("/shop-prices/{}", segment(id)?);
        self.send::<(), serde_json::Value>(call, Method::DELETE, &path, None)
            .await
            .map(|_| ())
    }

    /// Every item of an account (for `ferry verify`).
    pub async fn list_items(&self, call: &Call) -> Result<Vec<ShopItem>, Failure> {
        let list: Option<List<ShopItem>> = self
            .send::<(), _>(call, Method::GET, "/shop-items", None)
            .await?;
        Ok(list.map(|l| l.data).unwrap_or_default())
    }

    /// The partner simulator's own report per account (`GET /_sim/report`): what it holds and
    /// whether each account's requests came in order. A real partner has no such thing.
    pub async fn simulator_report(
        &self,
    ) -> Result<std::collections::BTreeMap<String, super::sim::AccountReport>, Failure> {
        self.simulator_get("/_sim/report").await
    }

    /// What the simulator's webhook receiver saw, per tenant (`GET /_sim/hooks/report`).
    pub async fn receiver_report(&self) -> Result<crate::webhook::receiver::Report, Failure> {
        self.simulator_get("/_sim/hooks/report").await
    }

    /// One of the simulator's control routes, read with its token.
    async fn simulator_get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Failure> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| transport(&Method::GET, path, &e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(Failure {
                class: FailureClass::Permanent,
                message: format!("GET {path}: {status}: is the partner the simulator?"),
                status: Some(status.as_u16()),
                response: None,
                retry_after: None,
            });
        }
        response
            .json()
            .await
            .map_err(|e| transport(&Method::GET, path, &e))
    }

    /// Every price of an account (for `ferry verify`).
    pub async fn list_prices(&self, call: &Call) -> Result<Vec<ShopPrice>, Failure> {
        let list: Option<List<ShopPrice>> = self
            .send::<(), _>(call, Method::GET, "/shop-prices", None)
            .await?;
        Ok(list.map(|l| l.data).unwrap_or_default())
    }
}

/// The answer's `Retry-After`, when it gives seconds.
pub(crate) fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Reads at most `limit` bytes of `response`'s body; whether that was all of it. A longer
/// answer is cut off there (the connection is dropped rather than drained).
pub(crate) async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<(String, bool), reqwest::Error> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Ok((String::new(), false));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            let room = limit - body.len();
            body.extend_from_slice(&chunk[..room]);
            return Ok((String::from_utf8_lossy(&body).into_owned(), false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((String::from_utf8_lossy(&body).into_owned(), true))
}

/// Whether a failure is the partner saying the object does not exist.
pub fn is_not_found(failure: &Failure) -> bool {
    failure.status == Some(404)
}

pub(crate) fn transport(method: &Method, path: &str, e: &reqwest::Error) -> Failure {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    Failure {
        class: FailureClass::Retryable,
        message: format!("{method} {path}: the request {what}: {e}"),
        status: None,
        response: None,
        retry_after: None,
    }
}

fn empty(what: &str) -> Failure {
    Failure {
        class: FailureClass::Retryable,
        message: format!("{what}: the partner answered without a body"),
        status: None,
        response: None,
        retry_after: None,
    }
}

/// A path segment: percent-encoded, and never one a URL resolves as a step (`.`, `..`) or an
/// empty one: a tenant id such as `..` would otherwise reach another account's URL.
fn segment(s: &str) -> Result<String, Failure> {
    if matches!(s, "" | "." | "..") {
        return Err(Failure {
            class: crate::delivery::FailureClass::Permanent,
            message: format!(
                "{s:?} cannot name a URL path segment: refused, so that it cannot reach another account's URL"
            ),
            status: None,
            response: None,
            retry_after: None,
        });
    }
    Ok(encode(s))
}

/// Percent-encodes a path segment or query value (ids are ours or the partner's: keep it safe).
pub(super) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_encoded_for_paths_and_queries() {
        assert_eq!(encode("item_00000001"), "item_00000001");
        assert_eq!(encode("a/b c?d=e&f"), "a%2Fb%20c%3Fd%3De%26f");
        assert_eq!(encode("ü"), "%C3%BC");
    }

    #[test]
    fn a_segment_cannot_step_out_of_its_account() {
        // Tried: tenant ids with a slash, a query, a fragment, spaces, and the dot steps.
        assert_eq!(segment("a/../b").unwrap(), "a%2F..%2Fb");
        assert_eq!(segment("t?x=1#f").unwrap(), "t%3Fx%3D1%23f");
        assert_eq!(segment("acme corp").unwrap(), "acme%20corp");
        for step in ["", ".", ".."] {
            let refused = segment(step).unwrap_err();
            assert_eq!(
                refused.class,
                crate::delivery::FailureClass::Permanent,
                "{step:?}"
            );
        }
    }
}
