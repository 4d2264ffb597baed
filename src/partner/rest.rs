//! The declared REST integration: the consumer's [`Handler`] for an integration file
//! ([`Spec`]). Everything a REST integration does the same way is here and in the generic
//! [`Driver`], written once; the file says only what differs (the partner's paths, bodies,
//! and where the ids are).
//!
//! - **Admission**: an event type the file does not declare is unknown (the
//!   `consume.unknown_event_types` policy decides); a payload whose JSON form cannot be had
//!   (protobuf without its message declared, or that does not decode) or that lacks our id is
//!   a bad event, refused before it waits its turn.
//! - **Creates and updates**: one query reads the tenant's switch and every mapping of our id;
//!   then every object type the event upserts, parents first, each through [`Driver::upsert`]
//!   (the mapping; when an earlier handling may have written, a find by our id; then a
//!   create): a lost answer or a partner that ignores idempotency keys never makes a second
//!   object. A child is created under its parent's id, learnt in the same event.
//! - **Deletes**: children first, each through [`Driver::delete`]; not found counts as deleted.
//! - **Enable and disable** (Ferry's own events): enable sends nothing (the backfill's events
//!   follow it); disable deletes every object mapped for the tenant, children first, each
//!   mapping removed once its object is gone, so a retry resumes where it stopped.
//! - While a tenant has the integration off, its events are recorded as ignored.

use serde_json::Value;
use sqlx::PgPool;

use super::client::{Call, PartnerClient, is_not_found};
use super::driver::{Driver, ObjectApi, Remote, db};
use super::spec::{Body, EventSpec, ObjectSpec, Request, Spec};
use super::template::{Values, lookup, scalar_text};
use crate::delivery::{Attempt, Failure, FailureClass, Handler, Outcome};
use crate::mappings::Mappings;
use crate::outbox::{BadEventReason, OutboxEvent, Payload, PayloadFormat, control};

/// The handler of a declared integration.
#[derive(Debug, Clone)]
pub struct RestIntegration {
    spec: std::sync::Arc<Spec>,
    client: PartnerClient,
    pool: PgPool,
    /// Mappings learnt and not yet written with their events' settlements.
    mappings: std::sync::Arc<Mappings>,
}

impl RestIntegration {
    /// The integration `spec` declares, calling the partner through `client` (built for the
    /// spec's partner: [`PartnerClient::for_spec`]), keeping its mappings in `pool`.
    pub fn new(spec: Spec, client: PartnerClient, pool: PgPool) -> Self {
        RestIntegration {
            spec: std::sync::Arc::new(spec),
            client,
            pool,
            mappings: std::sync::Arc::default(),
        }
    }

    /// Holds at most `budget` mappings in memory, all tenants together (`consume.mapping_views`).
    pub fn with_mapping_views(mut self, budget: usize) -> Self {
        self.mappings = std::sync::Arc::new(Mappings::with_views(budget));
        self
    }

    /// The spec it runs.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }
}

/// An event as the integration reads it: its payload as JSON, and our id.
struct Read {
    payload: Value,
    our_id: String,
}

impl RestIntegration {
    fn read(&self, event: &OutboxEvent) -> Result<Read, BadEventReason> {
        let declared = self
            .spec
            .events
            .get(&event.event_type)
            .ok_or_else(|| BadEventReason::UnknownEventType(event.event_type.clone()))?;
        let payload = payload_json(&event.event_type, declared, &event.payload)?;
        let our_id = lookup(&payload, &declared.our_id)
            .and_then(scalar_text)
            .filter(|id| !id.trim().is_empty())
            .ok_or_else(|| BadEventReason::InvalidPayload {
                event_type: event.event_type.as_str().into(),
                detail: format!(
                    "our id (`{}`, events.{}.our_id) is missing or empty",
                    declared.our_id.join("."),
                    event.event_type
                ),
            })?;
        Ok(Read { payload, our_id })
    }
}

/// The JSON form of `payload`: JSON as it came; protobuf through its declared message, in the
/// proto3 JSON mapping (lowerCamelCase names, 64-bit integers as numbers, defaults written).
pub fn payload_json(
    event_type: &str,
    declared: &EventSpec,
    payload: &Payload,
) -> Result<Value, BadEventReason> {
    let undecodable = |detail: String| BadEventReason::UndecodablePayload {
        event_type: event_type.into(),
        format: PayloadFormat::Protobuf,
        detail,
    };
    match payload {
        Payload::Json(doc) => Ok(doc.clone()),
        Payload::Protobuf(bytes) => {
            let message = declared.message.clone().ok_or_else(|| {
                undecodable(format!(
                    "the payload is bytes, and events.{event_type}.message names no protobuf message to read it with"
                ))
            })?;
            let decoded = prost_reflect::DynamicMessage::decode(message, &bytes[..])
                .map_err(|e| undecodable(e.to_string()))?;
            let options = prost_reflect::SerializeOptions::new()
                .stringify_64_bit_integers(false)
                .skip_default_fields(false);
            decoded
                .serialize_with_options(serde_json::value::Serializer, &options)
                .map_err(|e| undecodable(e.to_string()))
        }
    }
}

impl Handler for RestIntegration {
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
        let call = Call::for_event(event, attempt);
        let heal = attempt.may_have_written();
        if control::is_control(&event.event_type) {
            // The switch changed: the tenant's next event reads it ([`crate::mappings::views`]).
            self.mappings.forget_tenant(event.tenant_id.as_str());
        }
        let done = match event.event_type.as_str() {
            control::TENANT_ENABLED => Ok(true),
            control::TENANT_DISABLED => self.rollback(event, &call).await.map(|()| true),
            _ => self.apply(event, &self.driver(event, &call, heal)).await,
        };
        match done {
            Ok(true) => Outcome::Done,
            Ok(false) => Outcome::Ignored,
            Err(failure) => Outcome::Failed(failure),
        }
    }

    fn mappings(&self) -> Option<&Mappings> {
        Some(&self.mappings)
    }
}

impl RestIntegration {
    /// The event's creates, updates and deletes; `false` if the tenant has the integration off.
    async fn apply(&self, event: &OutboxEvent, driver: &Driver<'_>) -> Result<bool, Failure> {
        let read = self
            .read(event)
            .map_err(|reason| permanent(reason.to_string()))?;
        let object_types: Vec<&str> = self.spec.objects.iter().map(|o| o.name.as_str()).collect();
        let known = driver.known(&read.our_id, &object_types).await?;
        if !known.enabled {
            return Ok(false);
        }
        let mut ids: Vec<(&str, String)> = Vec::new();
        for object in &self.spec.objects {
            if !object.upserted_by(&event.event_type) {
                continue;
            }
            let parent = object
                .parent
                .as_deref()
                .and_then(|p| ids.iter().find(|(name, _)| *name == p))
                .map(|(_, id)| id.clone());
            let api = self.object(object, event, &read, parent.as_deref());
            let id = driver
                .upsert(
                    &api,
                    &read.our_id,
                    known.of(&object.name),
                    parent.as_deref(),
                )
                .await?;
            ids.push((&object.name, id));
        }
        for object in self.spec.objects.iter().rev() {
            if object.delete_on.contains(&event.event_type) {
                let api = self.object(object, event, &read, None);
                driver
                    .delete(&api, &read.our_id, known.of(&object.name))
                    .await?;
            }
        }
        Ok(true)
    }

    /// The tenant's rollback: every object mapped for it deleted on the partner, children
    /// before parents, each mapping's removal staged once its object is gone (a retry resumes
    /// where this stopped: what it removed is staged, and skipped).
    async fn rollback(&self, event: &OutboxEvent, call: &Call) -> Result<(), Failure> {
        let tenant = event.tenant_id.as_str();
        let none = Value::Null;
        let driver = self.driver(event, call, true);
        for object in self.spec.objects.iter().rev() {
            let mut objects = driver.tenant_objects(&object.name);
            loop {
                let page = objects.next_page().await.map_err(db)?;
                if page.is_empty() {
                    break;
                }
                for (local_id, foreign_id) in page {
                    let api = RestObject {
                        spec: object,
                        client: &self.client,
                        tenant,
                        our_id: &local_id,
                        payload: &none,
                        parent: None,
                    };
                    let call =
                        call.keyed(format!("{}/rollback/{}/{local_id}", event.id, object.key));
                    match api.delete(&call, &foreign_id).await {
                        Err(f) if !is_not_found(&f) => return Err(f),
                        _ => {}
                    }
                    self.driver(event, &call, true)
                        .forget(&object.name, &local_id);
                }
            }
        }
        Ok(())
    }

    fn driver<'a>(&'a self, event: &'a OutboxEvent, call: &'a Call, heal: bool) -> Driver<'a> {
        Driver {
            pool: &self.pool,
            integration: &self.spec.name,
            mappings: &self.mappings,
            tenant: event.tenant_id.as_str(),
            event_id: event.id,
            call,
            heal,
        }
    }

    fn object<'a>(
        &'a self,
        spec: &'a ObjectSpec,
        event: &'a OutboxEvent,
        read: &'a Read,
        parent: Option<&'a str>,
    ) -> RestObject<'a> {
        RestObject {
            spec,
            client: &self.client,
            tenant: event.tenant_id.as_str(),
            our_id: &read.our_id,
            payload: &read.payload,
            parent,
        }
    }
}

/// One object type of the file, bound to the event being handled.
struct RestObject<'a> {
    spec: &'a ObjectSpec,
    client: &'a PartnerClient,
    tenant: &'a str,
    /// Our id of the object.
    our_id: &'a str,
    payload: &'a Value,
    /// The partner's id of the parent this event puts it under, if it has one.
    parent: Option<&'a str>,
}

impl RestObject<'_> {
    fn values<'v>(&'v self, id: Option<&'v str>, parent: Option<&'v str>) -> Values<'v> {
        Values {
            tenant: self.tenant,
            our_id: self.our_id,
            id,
            parent_id: parent,
            payload: self.payload,
        }
    }

    /// Sends `request` filled from `values`; the answer, if it had a body.
    async fn send(
        &self,
        call: &Call,
        request: &Request,
        values: &Values<'_>,
    ) -> Result<Option<Value>, Failure> {
        let path = request.path.path(values).map_err(permanent)?;
        let body = request.body.as_ref().map(|b| render(b, values));
        self.client
            .request(call, request.method.clone(), &path, body.as_ref())
            .await
    }

    /// The partner's object as the driver sees it: its id, its parent's, and whether it holds
    /// what the update would write already.
    fn remote(&self, answer: &Value, values: &Values<'_>) -> Result<Remote, Failure> {
        let id = lookup(answer, &self.spec.id)
            .and_then(scalar_text)
            .ok_or_else(|| {
                retryable(format!(
                    "{}: the partner's answer has no id at `{}` (objects.{}.id)",
                    self.spec.name,
                    self.spec.id.join("."),
                    self.spec.name
                ))
            })?;
        // Without a declared place for it in answers, the parent is taken to be the one this
        // event puts it under.
        let parent = match &self.spec.parent_id {
            Some(path) => lookup(answer, path).and_then(scalar_text),
            None => self.parent.map(str::to_owned),
        };
        let current = self
            .spec
            .update
            .body
            .as_ref()
            .is_some_and(|b| holds(answer, &render(b, values)));
        Ok(Remote {
            id,
            parent,
            current,
        })
    }
}

impl ObjectApi for RestObject<'_> {
    fn object_type(&self) -> &str {
        &self.spec.name
    }

    fn key(&self) -> &str {
        &self.spec.key
    }

    // The driver passes our id again; this object was made for it (`self.our_id`).
    async fn find(&self, call: &Call, _our_id: &str) -> Result<Option<Remote>, Failure> {
        let values = self.values(None, None);
        let Some(answer) = self.send(call, &self.spec.find, &values).await? else {
            return Ok(None);
        };
        let list = match &self.spec.find.results {
            Some(path) => lookup(&answer, path).cloned().unwrap_or(Value::Null),
            None => answer,
        };
        let first = match list {
            Value::Array(items) => items.into_iter().next(),
            Value::Null => None,
            one => Some(one),
        };
        first.map(|found| self.remote(&found, &values)).transpose()
    }

    async fn create(
        &self,
        call: &Call,
        _our_id: &str,
        parent: Option<&str>,
    ) -> Result<Remote, Failure> {
        let values = self.values(None, parent);
        let answer = self.send(call, &self.spec.create, &values).await?;
        let answer = answer.ok_or_else(|| {
            retryable(format!(
                "{}: the create answered without a body",
                self.spec.name
            ))
        })?;
        self.remote(&answer, &values)
    }

    async fn update(&self, call: &Call, id: &str) -> Result<Remote, Failure> {
        let values = self.values(Some(id), None);
        match self.send(call, &self.spec.update, &values).await? {
            Some(answer) => self.remote(&answer, &values),
            None => Ok(Remote {
                id: id.to_owned(),
                parent: self.parent.map(str::to_owned),
                current: true,
            }),
        }
    }

    async fn delete(&self, call: &Call, id: &str) -> Result<(), Failure> {
        let values = self.values(Some(id), None);
        self.send(call, &self.spec.delete, &values).await.map(drop)
    }
}

/// The body filled from `values`.
fn render(body: &Body, values: &Values<'_>) -> Value {
    match body {
        Body::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), render(v, values)))
                .collect(),
        ),
        Body::List(items) => Value::Array(items.iter().map(|v| render(v, values)).collect()),
        Body::Template(t) => t.value(values),
        Body::Literal(v) => v.clone(),
    }
}

/// Whether `answer` holds every field of `wanted` with the same value (numbers compared as
/// numbers, so `1999` and `1999.0` agree).
fn holds(answer: &Value, wanted: &Value) -> bool {
    match (answer, wanted) {
        (Value::Object(a), Value::Object(w)) => w
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|got| holds(got, v))),
        (Value::Number(a), Value::Number(w)) => a.as_f64() == w.as_f64(),
        (a, w) => a == w,
    }
}

fn permanent(message: String) -> Failure {
    Failure::new(FailureClass::Permanent, message)
}

fn retryable(message: String) -> Failure {
    Failure::new(FailureClass::Retryable, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_answer_holds_what_the_update_would_write() {
        let answer = json!({"id": "1", "name": "Lamp", "amount": 1999, "extra": true});
        assert!(holds(&answer, &json!({"name": "Lamp", "amount": 1999.0})));
        assert!(!holds(&answer, &json!({"name": "Desk"})));
        assert!(!holds(&answer, &json!({"missing": null})));
    }
}
