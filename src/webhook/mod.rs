//! Each tenant's own webhooks: the outbox consumer most platforms need first. Every event of a
//! tenant goes to the endpoint that tenant registered, as a CloudEvent over HTTP
//! ([`cloudevent`]), signed as the Standard Webhooks specification describes ([`signing`]), in
//! order per tenant, through the same consumer as every integration: retries with backoff,
//! `Retry-After` honoured, the tenant paused alone and its events parked (rows in Postgres,
//! not memory) when its endpoint keeps failing, resumed by the operator or on schedule.
//!
//! What a delivery meets:
//! - **No endpoint** for the tenant: the event is recorded as ignored, nothing sent.
//! - **2xx**: delivered. **408, 425, 429, 5xx**, a timeout or a refused connection: retried,
//!   then the tenant paused with a retryable cause (resumed on schedule).
//! - **410 Gone**: the endpoint says it is gone for good. It is disabled (with why) and the
//!   tenant paused; its events are parked until the endpoint is set again (`ferry ctl webhook
//!   set`), which resumes the tenant and replays them in order.
//! - **Any other answer** (401, 403, 404, 422...): one tenant's endpoint refusing, never the
//!   whole integration's: the tenant is paused with a permanent cause, the others flow. So the
//!   partner-wide breaker stays closed for webhooks (`ferry consume` sets it so).
//!
//! The integration is declared by a file with a `[webhooks]` table
//! (`integrations/webhooks.toml`; `docs/webhooks.md`). [`receiver`] is a tenant's side: the
//! simulator's webhook receiver, which verifies signatures and checks order.

pub mod cloudevent;
pub mod endpoints;
pub mod receiver;
pub mod signing;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;

use crate::delivery::{Attempt, Failure, FailureClass, Handler, Outcome};
use crate::outbox::{BadEventReason, OutboxEvent, control};
use crate::partner::driver::db;
use crate::partner::rest::payload_json;
use crate::partner::spec::{Spec, WebhookSpec};
use crate::partner::template::{lookup, scalar_text};

/// How much of an endpoint's refusal is kept with the attempt.
const KEEP_BODY: usize = 2_000;

/// The webhooks integration cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The file declares a REST integration, not webhooks.
    #[error("{0}: not a webhooks integration (it has no `[webhooks]` table)")]
    NotWebhooks(std::path::PathBuf),
    /// The HTTP client could not be built.
    #[error("the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The handler of a webhooks integration.
#[derive(Debug, Clone)]
pub struct WebhookIntegration {
    spec: Arc<Spec>,
    hooks: WebhookSpec,
    http: reqwest::Client,
    pool: PgPool,
}

/// What became of a delivery that did not fail.
enum Delivered {
    /// The endpoint took it.
    Sent,
    /// The tenant has no endpoint: recorded as ignored.
    NoEndpoint,
}

impl WebhookIntegration {
    /// The integration `spec` declares (it must have `[webhooks]`), delivering with
    /// `default_timeout` unless the file sets one, keeping its endpoints in `pool`.
    pub fn new(spec: Spec, default_timeout: Duration, pool: PgPool) -> Result<Self, SetupError> {
        let hooks = spec
            .webhooks
            .clone()
            .ok_or_else(|| SetupError::NotWebhooks(spec.file.clone()))?;
        // One client, its connections kept per endpoint host and reused.
        let http = reqwest::Client::builder()
            .timeout(hooks.timeout.unwrap_or(default_timeout))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(WebhookIntegration {
            spec: Arc::new(spec),
            hooks,
            http,
            pool,
        })
    }

    /// The event's `data` (its payload as JSON) and `subject` (our id of the object), or why it
    /// cannot be sent.
    fn read(&self, event: &OutboxEvent) -> Result<(Value, String), BadEventReason> {
        let declared = self
            .spec
            .events
            .get(&event.event_type)
            .ok_or_else(|| BadEventReason::UnknownEventType(event.event_type.clone()))?;
        let data = payload_json(&event.event_type, declared, &event.payload)?;
        let subject = if declared.our_id.is_empty() {
            event.aggregate_id.clone().unwrap_or_default()
        } else {
            lookup(&data, &declared.our_id)
                .and_then(scalar_text)
                .filter(|id| !id.trim().is_empty())
                .ok_or_else(|| BadEventReason::InvalidPayload {
                    event_type: event.event_type.as_str().into(),
                    detail: format!(
                        "our id (`{}`, events.{}.our_id) is missing or empty",
                        declared.our_id.join("."),
                        event.event_type
                    ),
                })?
        };
        Ok((data, subject))
    }
}

impl Handler for WebhookIntegration {
    fn integration(&self) -> &str {
        &self.spec.name
    }

    fn admit(&self, event: &OutboxEvent) -> Result<(), BadEventReason> {
        if control::is_control(&event.event_type) {
            return Ok(());
        }
        self.read(event).map(drop)
    }

    async fn handle(&self, event: &OutboxEvent, attempt: &Attempt) -> Outcome {
        // Enable and disable: a tenant's webhooks start and stop with its endpoint, and there
        // is nothing of the tenant's at the endpoint's side for Ferry to roll back.
        if control::is_control(&event.event_type) {
            return Outcome::Done;
        }
        match self.deliver(event, attempt).await {
            Ok(Delivered::Sent) => Outcome::Done,
            Ok(Delivered::NoEndpoint) => Outcome::Ignored,
            Err(failure) => Outcome::Failed(failure),
        }
    }
}

impl WebhookIntegration {
    /// Sends `event` to its tenant's endpoint, signed.
    async fn deliver(&self, event: &OutboxEvent, attempt: &Attempt) -> Result<Delivered, Failure> {
        let tenant = event.tenant_id.as_str();
        let (data, subject) = self
            .read(event)
            .map_err(|reason| Failure::new(FailureClass::Permanent, reason.to_string()))?;
        let endpoint = endpoints::get(&self.pool, &self.spec.name, tenant)
            .await
            .map_err(db)?;
        let Some(endpoint) = endpoint else {
            return Ok(Delivered::NoEndpoint);
        };
        if let Some(reason) = &endpoint.disabled_reason {
            return Err(Failure::new(
                FailureClass::Permanent,
                format!(
                    "{tenant}'s endpoint is disabled ({reason}): set it again (`ferry ctl webhook set`) to deliver what is parked"
                ),
            ));
        }
        let span = tracing::debug_span!(
            "webhook delivery",
            otel.kind = "client",
            http.request.method = "POST",
            http.response.status_code = tracing::field::Empty,
        );
        if let Some(parent) = &event.traceparent {
            crate::telemetry::continue_trace(&span, parent);
        }
        let traceparent = span.in_scope(crate::telemetry::current_traceparent);
        let envelope = cloudevent::Envelope {
            spec: &self.hooks,
            subject: &subject,
            offset: attempt.offset,
            traceparent: traceparent.as_deref(),
        };
        let body = cloudevent::structured(event, data, envelope);
        let (id, now) = (event.id.to_string(), chrono::Utc::now());
        let signature = signing::sign(&endpoint.signing_secrets(now), &id, now.timestamp(), &body)
            .map_err(|e| {
                Failure::new(FailureClass::Permanent, format!("{tenant}'s secret: {e}"))
            })?;
        let mut request = self
            .http
            .post(&endpoint.url)
            .header(reqwest::header::CONTENT_TYPE, cloudevent::CONTENT_TYPE)
            .header(signing::ID, &id)
            .header(signing::TIMESTAMP, now.timestamp().to_string())
            .header(signing::SIGNATURE, signature)
            .body(body);
        if let Some(traceparent) = &traceparent {
            request = request.header("traceparent", traceparent);
        }
        let response = tracing::Instrument::instrument(request.send(), span.clone())
            .await
            .map_err(|e| {
                let to = format!("to {tenant}'s endpoint");
                crate::partner::client::transport(&reqwest::Method::POST, &to, &e)
            })?;
        span.record("http.response.status_code", response.status().as_u16());
        self.answer(tenant, response).await
    }

    /// What the endpoint's answer means; a 410 disables the endpoint first.
    async fn answer(
        &self,
        tenant: &str,
        response: reqwest::Response,
    ) -> Result<Delivered, Failure> {
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(Delivered::Sent);
        }
        let retry_after = crate::partner::client::retry_after(&response);
        let (text, _) = crate::partner::client::read_bounded(response, KEEP_BODY)
            .await
            .unwrap_or_default();
        let class = match status {
            408 | 425 | 429 | 500..=599 => FailureClass::Retryable,
            _ => FailureClass::Permanent,
        };
        let mut message = format!("POST to {tenant}'s endpoint: answered {status}");
        if status == 410 {
            endpoints::disable(&self.pool, &self.spec.name, tenant, "it answered 410 Gone")
                .await
                .map_err(db)?;
            message.push_str(": the endpoint is gone, disabled until it is set again");
        }
        Err(Failure {
            class,
            message,
            status: Some(status),
            response: Some(text),
            retry_after,
        })
    }
}
