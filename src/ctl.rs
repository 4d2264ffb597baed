//! `ferry ctl`: the operator's terminal client of the admin API every `ferry consume` serves
//! (see [`crate::admin`]): the same operations, answered as readable tables, or with `--json`
//! as the API's own JSON for scripts.
//!
//! Three parts, kept apart so the rendering is tested without a server:
//! - [`Client`]: one HTTP call per [`Op`], errors typed as [`CtlError`];
//! - the views ([`TenantRow`], [`PartitionRow`], ...): the API's answers as the client reads
//!   them. They are the client's own types rather than the server's so `ferry ctl` of one
//!   version keeps reading a consumer of another: unknown fields are ignored and absent ones
//!   are `None`;
//! - the rendering ([`render`] and the table functions): pure, given the answer and the time now.

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

/// Where `ferry consume` serves the admin API unless `admin.addr` says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9190";

/// How long one call may take. The admin API answers from a few queries; a consumer that does
/// not answer in this time is as good as unreachable to an operator waiting at a terminal.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Longest cell of a free-text column (reasons, errors) in a table: one line per row stays
/// readable on a terminal. `--json` and the key/value views keep the whole text.
pub const MAX_TEXT: usize = 60;

/// Why a `ferry ctl` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// No answer: nothing listens there, or it did not answer in [`TIMEOUT`].
    #[error(
        "cannot reach the admin API at {url}: {}; is `ferry consume` running? (admin.addr; give its address with --url or FERRY_ADMIN_URL)",
        root_cause(source)
    )]
    Unreachable {
        /// The URL called.
        url: String,
        /// What the HTTP client saw.
        source: reqwest::Error,
    },
    /// The API refused, with its `{"error": {"code", "message"}}`.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The API's error code (`unauthorized`, `unknown_tenant`, `not_paused`, ...).
        code: String,
        /// The API's message.
        message: String,
    },
    /// Something answered, but not as the admin API does (another service on that port, a
    /// proxy's error page, or a consumer of a version that answers differently).
    #[error("{url} answered HTTP {status}, not as the admin API does: {detail}")]
    BadAnswer {
        /// The URL called.
        url: String,
        /// The HTTP status.
        status: u16,
        /// What was wrong with the answer.
        detail: String,
    },
    /// The answer is JSON, but not of the shape this `ferry ctl` renders (a consumer of
    /// another version); `--json` still shows it.
    #[error(
        "{url} answered, but not as this ferry ctl expects: {detail} (--json shows the answer whole)"
    )]
    Unreadable {
        /// The URL called.
        url: String,
        /// What did not fit.
        detail: String,
    },
    /// The HTTP client could not be built (its TLS backend failed to start).
    #[error("cannot set up the HTTP client: {0}")]
    Setup(reqwest::Error),
    /// The command line asked for something that cannot be sent.
    #[error("{0}")]
    BadInput(String),
}

impl CtlError {
    /// The process exit code: 2 for bad input (as clap does for bad usage), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::BadInput(_) => 2,
            _ => 1,
        }
    }

    /// What to do about it, when the API's own message speaks of HTTP rather than of
    /// `ferry ctl`'s options.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            CtlError::Api { code, .. } if code == "unauthorized" => {
                Some("give the consumer's admin.token with --token or FERRY_ADMIN_TOKEN")
            }
            // `no such route`: the consumer predates the route, not a typo (ctl builds the paths).
            CtlError::Api { code, .. } if code == "not_found" => {
                Some("the consumer at --url may be of an older version, without this route")
            }
            _ => None,
        }
    }
}

/// The innermost cause: reqwest's own message ("error sending request for url") says less than
/// the "Connection refused" underneath it.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Who did it and why: every operator action is audited in `operator_actions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// Who (a person or a tool).
    pub actor: String,
    /// Why.
    pub reason: String,
}

/// One operation of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `GET /v1/tenants`: the tenants that are not active.
    Tenants,
    /// `GET /v1/tenants/{id}`.
    Tenant(String),
    /// `POST /v1/tenants/{id}/resume`: replay the backlog, then live again.
    Resume(String, Action),
    /// `POST /v1/tenants/{id}/retry`: try the failing event now.
    Retry(String, Action),
    /// `POST /v1/tenants/{id}/skip`: skip the failing event, replay the rest.
    Skip(String, Action),
    /// `POST /v1/tenants/{id}/pause`.
    Pause(String, Action),
    /// `POST /v1/tenants/{id}/replay`: deliver the tenant's events since a time again.
    Replay(String, DateTime<Utc>, Action),
    /// `GET /v1/kill-switch`.
    KillSwitch,
    /// `PUT /v1/kill-switch`.
    SetKillSwitch(bool, Action),
    /// `GET /v1/partitions`: committed offsets and lag.
    Partitions,
    /// `GET /v1/failures`: the latest failed events, at most this many (the API's default
    /// when `None`).
    Failures(Option<u32>),
    /// `GET /v1/events/{id}`: an event's attempts and the operator actions on it.
    Event(uuid::Uuid),
    /// `GET /v1/webhooks/{id}`: a tenant's webhook endpoint.
    Webhook(String),
    /// `PUT /v1/webhooks/{id}`: set its URL (and secret, else a new one).
    SetWebhook(String, WebhookSet, Action),
    /// `POST /v1/webhooks/{id}/rotate`: a new secret, the old one kept for a while.
    RotateWebhook(String, Option<String>, Action),
    /// `DELETE /v1/webhooks/{id}`.
    RemoveWebhook(String, Action),
}

/// A webhook endpoint, as `ferry ctl webhook set` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSet {
    /// Where the tenant's events go.
    pub url: String,
    /// Its secret (`whsec_...`); Ferry makes one when `None`.
    pub secret: Option<String>,
}

/// Parses a tenant id from the command line (the rules of [`crate::outbox::TenantId`]).
pub fn parse_tenant(raw: &str) -> Result<String, CtlError> {
    crate::outbox::TenantId::new(raw)
        .map(|_| raw.to_owned())
        .map_err(|e| CtlError::BadInput(format!("{raw:?} is not a tenant id: {e}")))
}

/// Parses `--since`: an RFC 3339 time with its offset, refused here rather than by the API so
/// a typo costs no round trip and the message can show what is expected.
pub fn parse_since(raw: &str) -> Result<DateTime<Utc>, CtlError> {
    DateTime::parse_from_rfc3339(raw.trim())
        .map(|t| t.to_utc())
        .map_err(|e| {
            CtlError::BadInput(format!(
                "{raw:?} is not an RFC 3339 time like 2026-11-28T16:00:00Z or 2026-11-28T17:00:00+01:00: {e}"
            ))
        })
}

/// Parses an event id: a UUID, named in the message when it is not one.
pub fn parse_event_id(raw: &str) -> Result<uuid::Uuid, CtlError> {
    uuid::Uuid::parse_str(raw.trim())
        .map_err(|e| CtlError::BadInput(format!("{raw:?} is not an event id (a UUID): {e}")))
}

/// Parses `--reason`: it is the audit record's why, so blank is refused.
pub fn parse_reason(raw: &str) -> Result<String, CtlError> {
    if raw.trim().is_empty() {
        return Err(CtlError::BadInput(
            "the reason must not be blank: every operator action is audited".to_owned(),
        ));
    }
    Ok(raw.to_owned())
}

/// Who an action is recorded as: `--actor` if given, else the login name (`$USER`), else `ctl`.
pub fn actor(explicit: Option<String>, user: Option<String>) -> String {
    [explicit, user]
        .into_iter()
        .flatten()
        .find(|a| !a.trim().is_empty())
        .unwrap_or_else(|| "ctl".to_owned())
}

/// An HTTP client of one consumer's admin API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: reqwest::Url,
    token: Option<String>,
    /// The integration the tenant, event and failure routes read and act on (`--integration`);
    /// `None`: the serving consumer's own for a tenant or an event, every one for the lists.
    integration: Option<String>,
}

impl Client {
    /// A client of the admin API at `url` (`http://host:port`, or `host:port` as `admin.addr`
    /// is written), sending `token` as the bearer.
    pub fn new(url: &str, token: Option<String>) -> Result<Client, CtlError> {
        let trimmed = url.trim();
        let full = if trimmed.contains("://") {
            trimmed.to_owned()
        } else {
            format!("http://{trimmed}")
        };
        let base = reqwest::Url::parse(&full).map_err(|e| {
            CtlError::BadInput(format!(
                "--url {url:?} is not a URL like {DEFAULT_URL}: {e}"
            ))
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(CtlError::BadInput(format!(
                "--url {url:?} is not an http(s) URL like {DEFAULT_URL}"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(CtlError::Setup)?;
        Ok(Client {
            http,
            base,
            token: token.filter(|t| !t.is_empty()),
            integration: None,
        })
    }

    /// The same client, reading and acting on `integration`'s tenants and events.
    pub fn for_integration(mut self, integration: Option<String>) -> Self {
        self.integration = integration.filter(|i| !i.is_empty());
        self
    }

    /// The `?integration=` of a scoped route, when one is named.
    fn scope(&self) -> Vec<(&'static str, String)> {
        self.integration
            .iter()
            .map(|i| ("integration", i.clone()))
            .collect()
    }

    /// The URL of `segments` under the base, each segment percent-encoded (a tenant id may hold
    /// a `/` or a `?`).
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> reqwest::Url {
        let mut url = self.base.clone();
        {
            let mut path = url
                .path_segments_mut()
                .expect("checked in new: an http(s) URL with a host is a base");
            path.pop_if_empty();
            path.extend(segments);
        }
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (name, value) in query {
                pairs.append_pair(name, value);
            }
        }
        url
    }

    /// Sends `op` and returns the API's JSON answer as it came.
    pub async fn send(&self, op: &Op) -> Result<Value, CtlError> {
        let (method, url, body) = self.request(op);
        self.call(method, url, body).await
    }

    /// The method, URL and body that carry `op`.
    fn request(&self, op: &Op) -> (reqwest::Method, reqwest::Url, Option<Value>) {
        use reqwest::Method;
        let post = |tenant: &str, what: &str, action: &Action, extra: Option<(&str, Value)>| {
            let mut body = json!({"actor": action.actor, "reason": action.reason});
            if let Some((name, value)) = extra {
                body[name] = value;
            }
            (
                Method::POST,
                self.url(&["v1", "tenants", tenant, what], &self.scope()),
                Some(body),
            )
        };
        match op {
            Op::Tenants => (
                Method::GET,
                self.url(&["v1", "tenants"], &self.scope()),
                None,
            ),
            Op::Tenant(t) => (
                Method::GET,
                self.url(&["v1", "tenants", t], &self.scope()),
                None,
            ),
            Op::Resume(t, a) => post(t, "resume", a, None),
            Op::Retry(t, a) => post(t, "retry", a, None),
            Op::Skip(t, a) => post(t, "skip", a, None),
            Op::Pause(t, a) => post(t, "pause", a, None),
            Op::Replay(t, since, a) => post(
                t,
                "replay",
                a,
                Some((
                    "since",
                    json!(since.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
                )),
            ),
            Op::KillSwitch => (Method::GET, self.url(&["v1", "kill-switch"], &[]), None),
            Op::SetKillSwitch(on, a) => (
                Method::PUT,
                self.url(&["v1", "kill-switch"], &[]),
                Some(json!({"on": on, "actor": a.actor, "reason": a.reason})),
            ),
            Op::Partitions => (Method::GET, self.url(&["v1", "partitions"], &[]), None),
            Op::Failures(limit) => {
                let mut query = self.scope();
                query.extend(limit.iter().map(|n| ("limit", n.to_string())));
                (Method::GET, self.url(&["v1", "failures"], &query), None)
            }
            Op::Event(id) => (
                Method::GET,
                self.url(&["v1", "events", &id.to_string()], &self.scope()),
                None,
            ),
            Op::Webhook(t) => (Method::GET, self.webhook_url(t, None), None),
            Op::SetWebhook(t, set, a) => (
                Method::PUT,
                self.webhook_url(t, None),
                Some(
                    json!({"url": set.url, "secret": set.secret, "actor": a.actor, "reason": a.reason}),
                ),
            ),
            Op::RotateWebhook(t, keep, a) => (
                Method::POST,
                self.webhook_url(t, Some("rotate")),
                Some(json!({"keep": keep, "actor": a.actor, "reason": a.reason})),
            ),
            Op::RemoveWebhook(t, a) => (
                Method::DELETE,
                self.webhook_url(t, None),
                Some(json!({"actor": a.actor, "reason": a.reason})),
            ),
        }
    }

    /// `/v1/webhooks/{tenant}[/{what}]`, scoped.
    fn webhook_url(&self, tenant: &str, what: Option<&str>) -> reqwest::Url {
        let mut segments = vec!["v1", "webhooks", tenant];
        segments.extend(what);
        self.url(&segments, &self.scope())
    }

    async fn call(
        &self,
        method: reqwest::Method,
        url: reqwest::Url,
        body: Option<Value>,
    ) -> Result<Value, CtlError> {
        let mut request = self.http.request(method, url.clone());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = &body {
            request = request.json(body);
        }
        let unreachable = |source| CtlError::Unreachable {
            url: url.to_string(),
            source,
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let text = response.text().await.map_err(unreachable)?;
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        if status.is_success() {
            return parsed.ok_or_else(|| CtlError::BadAnswer {
                url: url.to_string(),
                status: status.as_u16(),
                detail: format!("not JSON: {}", truncate(&text, 200)),
            });
        }
        #[derive(Deserialize)]
        struct Refusal {
            error: ErrorBody,
        }
        #[derive(Deserialize)]
        struct ErrorBody {
            code: String,
            message: String,
        }
        match parsed.and_then(|v| serde_json::from_value::<Refusal>(v).ok()) {
            Some(Refusal { error }) => Err(CtlError::Api {
                status: status.as_u16(),
                code: error.code,
                message: error.message,
            }),
            None => Err(CtlError::BadAnswer {
                url: url.to_string(),
                status: status.as_u16(),
                detail: format!(
                    "no {{\"error\": {{\"code\", \"message\"}}}} in {}",
                    if text.trim().is_empty() {
                        "an empty body".to_owned()
                    } else {
                        truncate(&text, 200)
                    }
                ),
            }),
        }
    }
}

/// Sends `op` and renders the answer: the API's JSON, pretty, with `json`; else for a person,
/// times relative to `now`.
pub async fn run(
    client: &Client,
    op: &Op,
    json: bool,
    now: DateTime<Utc>,
) -> Result<String, CtlError> {
    let answer = client.send(op).await?;
    if json {
        let mut out = serde_json::to_string_pretty(&answer).expect("a Value always serializes");
        out.push('\n');
        return Ok(out);
    }
    render(op, answer, now).map_err(|detail| CtlError::Unreadable {
        url: client.request(op).1.to_string(),
        detail,
    })
}

/// A tenant as `GET /v1/tenants` and `GET /v1/tenants/{id}` answer it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TenantRow {
    /// The integration whose state this is (absent from a consumer older than several).
    #[serde(default)]
    pub integration: Option<String>,
    /// The tenant.
    pub tenant_id: String,
    /// Whether the integration is on.
    pub integration_enabled: Option<bool>,
    /// `active`, `paused`, `draining` or `disabled`.
    pub state: String,
    /// `retryable`, `permanent`, `bad_event` or `operator`.
    pub pause_cause: Option<String>,
    /// Why.
    pub pause_reason: Option<String>,
    /// The event that failed.
    pub paused_event_id: Option<String>,
    /// Since when.
    pub paused_at: Option<DateTime<Utc>>,
    /// When it is retried automatically.
    pub next_retry_at: Option<DateTime<Utc>>,
    /// Events parked.
    pub backlog: Option<i64>,
    /// Attempts at the failing event.
    pub failed_attempts: Option<i64>,
    /// The partner's answer to it: `{"status", "body"}`.
    pub partner_response: Option<Value>,
}

/// A partition as `GET /v1/partitions` answers it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PartitionRow {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i64,
    /// The committed offset (none before the first commit).
    pub committed_offset: Option<i64>,
    /// The commit point this instance has settled through (ahead of the committed offset
    /// until the next commit lands).
    pub settled_offset: Option<i64>,
    /// The partition's end.
    pub high_watermark: Option<i64>,
    /// Records not yet committed.
    pub lag: Option<i64>,
    /// Events of it in flight.
    pub in_flight: Option<i64>,
}

/// A failed event as `GET /v1/failures` answers it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FailureRow {
    /// The integration it failed in.
    #[serde(default)]
    pub integration: Option<String>,
    /// The event.
    pub event_id: String,
    /// Its tenant.
    pub tenant_id: Option<String>,
    /// Its type.
    pub event_type: Option<String>,
    /// Where it stands.
    pub outcome: Option<String>,
    /// Attempts made.
    pub attempts: Option<i64>,
    /// The last error.
    pub last_error: Option<String>,
    /// The partner's last answer: `{"status", "body"}`.
    pub last_response: Option<Value>,
    /// Its partition.
    pub partition: Option<i64>,
    /// Its offset.
    pub offset: Option<i64>,
    /// Last change.
    pub updated_at: Option<DateTime<Utc>>,
}

/// One attempt at an event, from `GET /v1/events/{id}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AttemptRow {
    /// 1, 2, ...
    pub attempt: i64,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended (none while in flight).
    pub finished_at: Option<DateTime<Utc>>,
    /// How it ended.
    pub outcome: Option<String>,
    /// The error, if it failed.
    pub error: Option<String>,
    /// The partner's answer: `{"status", "body"}`.
    pub response: Option<Value>,
}

/// An operator action, from `GET /v1/events/{id}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ActionRow {
    /// When.
    pub at: Option<DateTime<Utc>>,
    /// Who.
    pub actor: Option<String>,
    /// What (`resume`, `skip`, ...).
    pub action: Option<String>,
    /// Why.
    pub reason: Option<String>,
}

/// `GET /v1/events/{id}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventHistory {
    /// The event.
    pub event_id: String,
    /// Its delivery record, if it got that far.
    pub delivery: Option<Value>,
    /// Its attempts, oldest first.
    #[serde(default)]
    pub attempts: Vec<AttemptRow>,
    /// Its parked record, while its tenant is paused.
    pub parked: Option<Value>,
    /// Operator actions on it.
    #[serde(default)]
    pub actions: Vec<ActionRow>,
}

#[derive(Deserialize)]
struct List<T> {
    data: Vec<T>,
}

/// Renders the answer to `op` for a person. `Err` says what in the answer did not fit.
pub fn render(op: &Op, answer: Value, now: DateTime<Utc>) -> Result<String, String> {
    fn read<T: serde::de::DeserializeOwned>(answer: Value) -> Result<T, String> {
        serde_json::from_value(answer).map_err(|e| format!("unexpected answer: {e}"))
    }
    let text = |field: &str| answer[field].as_str().unwrap_or("?").to_owned();
    Ok(match op {
        Op::Tenants => tenants_table(&read::<List<TenantRow>>(answer)?.data, now),
        Op::Tenant(_) => tenant_view(&read(answer)?, now),
        Op::Resume(..) | Op::Retry(..) | Op::Pause(..) => {
            format!("{}: {}\n", text("tenant_id"), text("state"))
        }
        Op::Skip(..) => {
            let skipped = &answer["skipped"];
            let dead = &answer["dead_letter"];
            let exported = match dead["topic"].as_str() {
                Some(topic) => format!(
                    ", exported to {topic} (partition {}, offset {})",
                    dead["partition"], dead["offset"]
                ),
                None => String::new(),
            };
            format!(
                "{}: {}; skipped event {} (partition {}, offset {}){exported}\n",
                text("tenant_id"),
                text("state"),
                skipped["event_id"].as_str().unwrap_or("-"),
                skipped["partition"],
                skipped["offset"],
            )
        }
        Op::Replay(..) => format!(
            "{}: {} events since {} written again, to be delivered in order\n",
            text("tenant_id"),
            answer["events"],
            text("since"),
        ),
        Op::KillSwitch | Op::SetKillSwitch(..) => match answer["on"].as_bool() {
            Some(true) => "kill switch: on (no instance dispatches anything)\n".to_owned(),
            Some(false) => "kill switch: off\n".to_owned(),
            None => return Err(format!("no \"on\" in {answer}")),
        },
        Op::Partitions => partitions_table(&read::<List<PartitionRow>>(answer)?.data),
        Op::Failures(_) => failures_table(&read::<List<FailureRow>>(answer)?.data, now),
        Op::Event(_) => event_view(&read(answer)?, now),
        Op::Webhook(_) | Op::SetWebhook(..) | Op::RotateWebhook(..) => webhook_view(&answer),
        Op::RemoveWebhook(..) => format!("{}: webhook endpoint removed\n", text("tenant_id")),
    })
}

/// `ferry ctl webhook ...`: the endpoint, and its secret when the change made one (shown once:
/// the tenant must be given it).
pub fn webhook_view(answer: &Value) -> String {
    let field = |name: &str| plain(&answer[name]);
    let mut pairs = vec![
        ("tenant", field("tenant_id")),
        ("integration", field("integration")),
        ("url", field("url")),
        (
            "state",
            match answer["disabled_at"].as_str() {
                Some(at) => format!("disabled since {at}: {}", field("disabled_reason")),
                None => "enabled".to_owned(),
            },
        ),
    ];
    if let Some(until) = answer["previous_until"].as_str() {
        pairs.push(("previous secret", format!("still signs until {until}")));
    }
    if let Some(secret) = answer["secret"].as_str() {
        pairs.push(("secret", secret.to_owned()));
    }
    if answer["resumed"].as_bool() == Some(true) {
        pairs.push((
            "tenant",
            "resumed: its parked events are delivered in order".to_owned(),
        ));
    }
    key_values(&pairs)
}

/// The text of `s` cut to `max` characters, the cut shown by an ellipsis; control characters
/// (a partner's multi-line body) become spaces so a table row stays one line.
pub fn truncate(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// A table: a header row, columns as wide as their widest cell (counted in characters), two
/// spaces between them, no trailing blanks. No rows: the `empty` line instead, so an empty
/// answer reads as one rather than as a lone header.
pub fn table(headers: &[&str], rows: &[Vec<String>], empty: &str) -> String {
    if rows.is_empty() {
        return format!("{empty}\n");
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(cell);
            l.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// How long, compactly: `45s`, `12m`, `3h12m`, `2d4h`.
pub fn age(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn ago(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| format!("{} ago", age(now - t)))
}

fn until(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        None => "-".to_owned(),
        Some(t) if t <= now => "due".to_owned(),
        Some(t) => format!("in {}", age(t - now)),
    }
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".to_owned(),
        |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
    )
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The HTTP status in a `{"status", "body"}` answer.
fn status_of(response: Option<&Value>) -> String {
    or_dash(
        response
            .and_then(|r| r.get("status"))
            .and_then(Value::as_i64),
    )
}

/// A JSON value as text: a string as it is, anything else compact JSON.
fn plain(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `ferry ctl tenants`.
pub fn tenants_table(tenants: &[TenantRow], now: DateTime<Utc>) -> String {
    let rows: Vec<Vec<String>> = tenants
        .iter()
        .map(|t| {
            vec![
                t.tenant_id.clone(),
                or_dash(t.integration.as_deref()),
                t.state.clone(),
                or_dash(t.pause_cause.as_deref()),
                or_dash(t.backlog),
                ago(t.paused_at, now),
                until(t.next_retry_at, now),
                t.pause_reason
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |r| truncate(r, MAX_TEXT)),
            ]
        })
        .collect();
    table(
        &[
            "TENANT",
            "INTEGRATION",
            "STATE",
            "CAUSE",
            "BACKLOG",
            "SINCE",
            "NEXT-RETRY",
            "REASON",
        ],
        &rows,
        "no tenant is paused, draining or disabled",
    )
}

/// Key/value lines, the keys aligned; a value of several lines continues under the first.
fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let mut lines = value.lines();
        let first = lines.next().unwrap_or("");
        let _ = writeln!(out, "{key:width$}  {first}");
        for more in lines {
            let _ = writeln!(out, "{:width$}  {more}", "");
        }
    }
    out
}

/// `ferry ctl tenant <id>`: every field, reasons and the partner's body whole.
pub fn tenant_view(t: &TenantRow, now: DateTime<Utc>) -> String {
    let when = |at: Option<DateTime<Utc>>, rel: String| match at {
        None => "-".to_owned(),
        Some(_) => format!("{} ({rel})", time(at)),
    };
    let response = t.partner_response.as_ref();
    key_values(&[
        ("tenant", t.tenant_id.clone()),
        ("integration", or_dash(t.integration.as_deref())),
        (
            "switched",
            or_dash(
                t.integration_enabled
                    .map(|on| if on { "on" } else { "off" }),
            ),
        ),
        ("state", t.state.clone()),
        ("cause", or_dash(t.pause_cause.as_deref())),
        ("reason", or_dash(t.pause_reason.as_deref())),
        ("paused at", when(t.paused_at, ago(t.paused_at, now))),
        (
            "next retry",
            when(t.next_retry_at, until(t.next_retry_at, now)),
        ),
        (
            "backlog",
            or_dash(t.backlog.map(|n| format!("{n} events parked"))),
        ),
        ("failing event", or_dash(t.paused_event_id.as_deref())),
        ("attempts", or_dash(t.failed_attempts)),
        ("partner status", status_of(response)),
        (
            "partner body",
            response
                .and_then(|r| r.get("body"))
                .map_or_else(|| "-".to_owned(), plain),
        ),
    ])
}

/// `ferry ctl partitions`.
pub fn partitions_table(partitions: &[PartitionRow]) -> String {
    let rows: Vec<Vec<String>> = partitions
        .iter()
        .map(|p| {
            vec![
                p.topic.clone(),
                p.partition.to_string(),
                or_dash(p.committed_offset),
                or_dash(p.settled_offset),
                or_dash(p.high_watermark),
                or_dash(p.lag),
                or_dash(p.in_flight),
            ]
        })
        .collect();
    table(
        &[
            "TOPIC",
            "PARTITION",
            "COMMITTED",
            "SETTLED",
            "HIGH-WATERMARK",
            "LAG",
            "IN-FLIGHT",
        ],
        &rows,
        "no partitions assigned to this instance",
    )
}

/// `ferry ctl failures`.
pub fn failures_table(failures: &[FailureRow], now: DateTime<Utc>) -> String {
    let rows: Vec<Vec<String>> = failures
        .iter()
        .map(|f| {
            vec![
                f.event_id.clone(),
                or_dash(f.integration.as_deref()),
                or_dash(f.tenant_id.as_deref()),
                or_dash(f.event_type.as_deref()),
                or_dash(f.outcome.as_deref()),
                or_dash(f.attempts),
                match (f.partition, f.offset) {
                    (Some(p), Some(o)) => format!("{p}@{o}"),
                    _ => "-".to_owned(),
                },
                status_of(f.last_response.as_ref()),
                ago(f.updated_at, now),
                f.last_error
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |e| truncate(e, MAX_TEXT)),
            ]
        })
        .collect();
    table(
        &[
            "EVENT",
            "INTEGRATION",
            "TENANT",
            "TYPE",
            "OUTCOME",
            "ATTEMPTS",
            "AT",
            "STATUS",
            "UPDATED",
            "ERROR",
        ],
        &rows,
        "no failed events on record",
    )
}

/// `ferry ctl event <id>`: where it stands, its attempts and the operator actions on it.
pub fn event_view(e: &EventHistory, now: DateTime<Utc>) -> String {
    let object = |v: &Option<Value>, none: &str| match v {
        Some(Value::Object(fields)) => fields
            .iter()
            .map(|(k, v)| format!("{k}: {}", plain(v)))
            .collect::<Vec<_>>()
            .join("\n"),
        Some(other) if !other.is_null() => plain(other),
        _ => none.to_owned(),
    };
    let mut out = key_values(&[
        ("event", e.event_id.clone()),
        ("delivery", object(&e.delivery, "none (never dispatched)")),
        ("parked", object(&e.parked, "no")),
    ]);
    out.push_str("\nattempts\n");
    let attempts: Vec<Vec<String>> = e
        .attempts
        .iter()
        .map(|a| {
            vec![
                a.attempt.to_string(),
                time(a.started_at),
                match (a.started_at, a.finished_at) {
                    (Some(s), Some(f)) => format!("{}ms", (f - s).num_milliseconds()),
                    (Some(_), None) => "in flight".to_owned(),
                    _ => "-".to_owned(),
                },
                or_dash(a.outcome.as_deref()),
                status_of(a.response.as_ref()),
                a.error
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |e| truncate(e, MAX_TEXT)),
            ]
        })
        .collect();
    out.push_str(&table(
        &["#", "STARTED", "TOOK", "OUTCOME", "STATUS", "ERROR"],
        &attempts,
        "no attempts on record",
    ));
    out.push_str("\noperator actions\n");
    let actions: Vec<Vec<String>> = e
        .actions
        .iter()
        .map(|a| {
            vec![
                ago(a.at, now),
                or_dash(a.actor.as_deref()),
                or_dash(a.action.as_deref()),
                a.reason
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |r| truncate(r, MAX_TEXT)),
            ]
        })
        .collect();
    out.push_str(&table(
        &["AT", "ACTOR", "ACTION", "REASON"],
        &actions,
        "none",
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-28T16:00:00Z".parse().unwrap()
    }

    fn paused(tenant: &str, reason: &str) -> TenantRow {
        TenantRow {
            integration: Some("partner".into()),
            tenant_id: tenant.into(),
            integration_enabled: Some(true),
            state: "paused".into(),
            pause_cause: Some("permanent".into()),
            pause_reason: Some(reason.into()),
            paused_event_id: Some("0190a1b2-0000-7000-8000-000000000001".into()),
            paused_at: Some("2026-11-28T15:48:00Z".parse().unwrap()),
            next_retry_at: None,
            backlog: Some(145),
            failed_attempts: Some(1),
            partner_response: Some(
                json!({"status": 422, "body": "{\"error\":\"name is required\"}"}),
            ),
        }
    }

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let out = table(
            &["A", "LONG HEADER", "C"],
            &[
                vec!["wide cell".into(), "x".into(), "last".into()],
                vec!["y".into(), "z".into(), "é".into()],
            ],
            "nothing",
        );
        assert_eq!(
            out,
            "A          LONG HEADER  C\n\
             wide cell  x            last\n\
             y          z            é\n",
            "{out}"
        );
        assert!(
            out.lines().all(|l| l == l.trim_end()),
            "no trailing blanks:\n{out}"
        );
    }

    #[test]
    fn an_empty_list_says_so() {
        assert_eq!(
            tenants_table(&[], now()),
            "no tenant is paused, draining or disabled\n"
        );
        assert_eq!(
            partitions_table(&[]),
            "no partitions assigned to this instance\n"
        );
        assert_eq!(failures_table(&[], now()), "no failed events on record\n");
    }

    #[test]
    fn long_reasons_are_cut_in_tables_with_an_ellipsis() {
        let long = format!("partner answered 422: {}", "name is required; ".repeat(10));
        let out = tenants_table(&[paused("acme", &long), paused("b", "short")], now());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(
            lines[0].starts_with(
                "TENANT  INTEGRATION  STATE   CAUSE      BACKLOG  SINCE    NEXT-RETRY  REASON"
            ),
            "{out}"
        );
        assert!(
            lines[1].starts_with(
                "acme    partner      paused  permanent  145      12m ago  -           partner answered 422"
            ),
            "{out}"
        );
        let reason = &lines[1][lines[1].find("partner answered").unwrap()..];
        assert_eq!(reason.chars().count(), MAX_TEXT, "{reason}");
        assert!(reason.ends_with('…'), "{reason}");
        assert!(lines[2].ends_with("short"), "{out}");
        // The key/value view keeps it whole.
        let view = tenant_view(&paused("acme", &long), now());
        assert!(view.contains(&long), "{view}");
    }

    #[test]
    fn truncation_counts_characters_and_flattens_lines() {
        assert_eq!(truncate("ééééé", 5), "ééééé");
        assert_eq!(truncate("éééééé", 5), "éééé…");
        assert_eq!(truncate("line one\nline two", 60), "line one line two");
    }

    #[test]
    fn a_tenant_shows_the_partners_answer() {
        let view = tenant_view(
            &paused("acme", "partner answered 422: name is required"),
            now(),
        );
        for line in [
            "tenant          acme",
            "state           paused",
            "paused at       2026-11-28T15:48:00Z (12m ago)",
            "backlog         145 events parked",
            "partner status  422",
            "partner body    {\"error\":\"name is required\"}",
        ] {
            assert!(view.lines().any(|l| l == line), "{line:?} in:\n{view}");
        }
    }

    #[test]
    fn ages_and_retries_read_at_a_glance() {
        let d = chrono::TimeDelta::seconds;
        assert_eq!(
            [
                d(45),
                d(12 * 60 + 5),
                d(3 * 3600 + 12 * 60),
                d(2 * 86_400 + 4 * 3600)
            ]
            .map(age),
            ["45s", "12m", "3h12m", "2d4h"]
        );
        assert_eq!(until(Some(now() + d(90)), now()), "in 1m");
        assert_eq!(until(Some(now() - d(1)), now()), "due");
        assert_eq!(until(None, now()), "-");
    }

    #[test]
    fn answers_render_from_the_apis_json() {
        let tenants = json!({"data": [{
            "integration": "hooks", "tenant_id": "acme", "integration_enabled": true, "state": "draining",
            "pause_cause": null, "pause_reason": null, "paused_event_id": null, "paused_at": null,
            "next_retry_at": null, "backlog": 0, "failed_attempts": null, "partner_response": null,
            "some_future_field": 1
        }]});
        let out = render(&Op::Tenants, tenants, now()).unwrap();
        assert!(
            out.lines()
                .nth(1)
                .unwrap()
                .starts_with("acme    hooks        draining  -"),
            "{out}"
        );

        let skip = json!({"tenant_id": "acme", "state": "draining",
            "skipped": {"event_id": "e1", "partition": 2, "offset": 10}});
        let action = Action {
            actor: "ops".into(),
            reason: "r".into(),
        };
        assert_eq!(
            render(&Op::Skip("acme".into(), action.clone()), skip, now()).unwrap(),
            "acme: draining; skipped event e1 (partition 2, offset 10)\n"
        );
        assert_eq!(
            render(&Op::KillSwitch, json!({"on": false}), now()).unwrap(),
            "kill switch: off\n"
        );
        assert!(render(&Op::Partitions, json!({"rows": []}), now()).is_err());

        let partitions = json!({"data": [
            {"topic": "ferry.outbox", "partition": 0, "committed_offset": 120, "settled_offset": 123, "high_watermark": 125, "lag": 5, "in_flight": 2},
            {"topic": "ferry.outbox", "partition": 11, "committed_offset": null, "high_watermark": 0, "lag": 0, "in_flight": 0}
        ]});
        assert_eq!(
            render(&Op::Partitions, partitions, now()).unwrap(),
            "TOPIC         PARTITION  COMMITTED  SETTLED  HIGH-WATERMARK  LAG  IN-FLIGHT\n\
             ferry.outbox  0          120        123      125             5    2\n\
             ferry.outbox  11         -          -        0               0    0\n"
        );

        let failures = json!({"data": [{
            "integration": "partner", "event_id": "e1", "tenant_id": "acme", "event_type": "ProductCreated",
            "outcome": "failed", "attempts": 3, "last_error": "HTTP 503",
            "last_response": {"status": 503, "body": ""}, "partition": 2, "offset": 10,
            "updated_at": "2026-11-28T15:59:00Z"
        }]});
        let out = render(&Op::Failures(None), failures, now()).unwrap();
        assert!(
            out.lines().nth(1).unwrap()
                == "e1     partner      acme    ProductCreated  failed   3         2@10  503     1m ago   HTTP 503",
            "{out}"
        );
    }

    #[test]
    fn an_events_history_is_its_attempts() {
        let answer = json!({
            "event_id": "e1",
            "delivery": {"outcome": "skipped", "tenant_id": "acme"},
            "attempts": [
                {"attempt": 1, "started_at": "2026-11-28T15:00:00Z", "finished_at": "2026-11-28T15:00:00.250Z",
                 "outcome": "failed", "error": "partner answered 422", "response": {"status": 422, "body": "no"}},
                {"attempt": 2, "started_at": "2026-11-28T15:01:00Z", "finished_at": null,
                 "outcome": null, "error": null, "response": null}
            ],
            "parked": null,
            "actions": [{"at": "2026-11-28T15:30:00Z", "actor": "ops", "action": "skip", "reason": "obsolete"}]
        });
        let out = render(&Op::Event(uuid::Uuid::nil()), answer, now()).unwrap();
        for line in [
            "event     e1",
            "delivery  outcome: skipped",
            "          tenant_id: acme",
            "parked    no",
            "#  STARTED               TOOK       OUTCOME  STATUS  ERROR",
            "1  2026-11-28T15:00:00Z  250ms      failed   422     partner answered 422",
            "2  2026-11-28T15:01:00Z  in flight  -        -       -",
            "30m ago  ops    skip    obsolete",
        ] {
            assert!(out.lines().any(|l| l == line), "{line:?} in:\n{out}");
        }
    }

    #[test]
    fn bad_input_is_refused_before_any_call() {
        for bad in ["yesterday", "2026-11-28", "2026-11-28T16:00:00", ""] {
            let e = parse_since(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
        assert_eq!(
            parse_since("2026-11-28T17:00:00+01:00").unwrap(),
            now(),
            "an offset is taken into account"
        );
        assert!(parse_reason("  ").is_err());
        assert!(parse_tenant("").is_err());
        assert!(parse_tenant("a/b").is_ok(), "sent percent-encoded");
        for url in ["ftp://x", "not a url", "http://"] {
            assert!(Client::new(url, None).is_err(), "{url}");
        }
        assert!(parse_event_id("not-a-uuid").is_err());
        // As `admin.addr` is written.
        let client = Client::new("127.0.0.1:9190", None).unwrap();
        assert_eq!(client.base.as_str(), "http://127.0.0.1:9190/");
    }

    #[test]
    fn the_actor_is_given_or_the_login_name_or_ctl() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(actor(s("ann"), s("root")), "ann");
        assert_eq!(actor(None, s("root")), "root");
        assert_eq!(actor(None, s("")), "ctl");
        assert_eq!(actor(None, None), "ctl");
    }

    #[test]
    fn actions_send_who_and_why() {
        use reqwest::Method;
        let client = Client::new(DEFAULT_URL, Some("t".into())).unwrap();
        let who = Action {
            actor: "ann".into(),
            reason: "fixed".into(),
        };
        let since = parse_since("2026-11-28T17:00:00+01:00").unwrap();
        let (method, url, body) = client.request(&Op::Replay("acme".into(), since, who.clone()));
        assert_eq!(
            (method, url.as_str(), body),
            (
                Method::POST,
                "http://127.0.0.1:9190/v1/tenants/acme/replay",
                Some(json!({"actor": "ann", "reason": "fixed", "since": "2026-11-28T16:00:00Z"}))
            )
        );
        let (method, url, body) = client.request(&Op::SetKillSwitch(true, who));
        assert_eq!(
            (method, url.as_str(), body),
            (
                Method::PUT,
                "http://127.0.0.1:9190/v1/kill-switch",
                Some(json!({"on": true, "actor": "ann", "reason": "fixed"}))
            )
        );
        let (method, _, body) = client.request(&Op::Tenants);
        assert_eq!((method, body), (Method::GET, None));
    }

    #[test]
    fn paths_are_encoded_and_the_limit_is_a_query() {
        let client = Client::new("http://127.0.0.1:9190/", None).unwrap();
        assert_eq!(
            client
                .url(&["v1", "tenants", "a/b?c", "resume"], &[])
                .as_str(),
            "http://127.0.0.1:9190/v1/tenants/a%2Fb%3Fc/resume"
        );
        assert_eq!(
            client
                .url(&["v1", "failures"], &[("limit", "5".into())])
                .as_str(),
            "http://127.0.0.1:9190/v1/failures?limit=5"
        );
        let api = CtlError::Api {
            status: 409,
            code: "not_paused".into(),
            message: "tenant \"acme\" is active, not paused: nothing to resume".into(),
        };
        assert_eq!(
            api.to_string(),
            "tenant \"acme\" is active, not paused: nothing to resume (not_paused, HTTP 409)"
        );
        assert_eq!((api.exit_code(), api.hint()), (1, None));
        let unauthorized = CtlError::Api {
            status: 401,
            code: "unauthorized".into(),
            message: "wrong token".into(),
        };
        assert!(unauthorized.hint().unwrap().contains("--token"));
    }
}
