//! A tenant's side of the webhooks: the receiver `ferry partner-sim` serves beside the shop's API
//! (`POST /hooks/{tenant}`). It does what a careful receiver does and counts what it saw:
//!
//! - verifies each delivery's Standard Webhooks signature against the secrets the tenant holds
//!   (any of them: a rotation leaves the tenant two), refusing a bad one with 401 and counting
//!   it;
//! - drops a delivery whose `webhook-id` it has seen (a retry after a lost answer), counting it
//!   as a duplicate;
//! - checks order: each new event's CloudEvents `sequence` must not be below the tenant's
//!   previous one.
//!
//! Control routes (the simulator's token): `PUT /_sim/hooks/{tenant}` `{"secrets": [...]}`
//! gives the tenant its secrets; `PUT /_sim/hooks/{tenant}/fault` `{"status": 410}` makes its
//! endpoint answer that status to everything (`null` for none); `GET /_sim/hooks/report` says
//! per tenant what arrived.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::signing;

/// The receiver's state, shared by its routes.
#[derive(Debug, Clone, Default)]
pub struct Receiver {
    tenants: Arc<Mutex<BTreeMap<String, Tenant>>>,
}

/// One tenant's endpoint as the receiver keeps it.
#[derive(Debug, Default)]
struct Tenant {
    secrets: Vec<String>,
    fault: Option<u16>,
    ids: HashSet<String>,
    last_sequence: Option<String>,
    seen: Seen,
}

/// What a tenant's endpoint received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// Deliveries accepted, each event once.
    pub received: u64,
    /// Deliveries of an event accepted before (same `webhook-id`), dropped.
    pub duplicates: u64,
    /// New events whose `sequence` was below the previous one's.
    pub order_violations: u64,
    /// Deliveries refused for their signature (or its headers, or its age).
    pub bad_signatures: u64,
    /// Deliveries answered with the fault set on the endpoint (410, 503...).
    pub faulted: u64,
}

/// `GET /_sim/hooks/report`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Per tenant.
    pub tenants: BTreeMap<String, Seen>,
}

impl Report {
    /// Every tenant's counts added up.
    pub fn total(&self) -> Seen {
        self.tenants.values().fold(Seen::default(), |a, s| Seen {
            received: a.received + s.received,
            duplicates: a.duplicates + s.duplicates,
            order_violations: a.order_violations + s.order_violations,
            bad_signatures: a.bad_signatures + s.bad_signatures,
            faulted: a.faulted + s.faulted,
        })
    }
}

/// `PUT /_sim/hooks/{tenant}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    /// The secrets the tenant holds: a delivery signed with any of them is genuine.
    pub secrets: Vec<String>,
}

/// `PUT /_sim/hooks/{tenant}/fault`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// The status every delivery is answered with; `None` to answer normally again.
    pub status: Option<u16>,
}

impl Receiver {
    /// What every tenant's endpoint received so far.
    pub fn report(&self) -> Report {
        let tenants = self.tenants.lock().expect("receiver state");
        Report {
            tenants: tenants.iter().map(|(t, s)| (t.clone(), s.seen)).collect(),
        }
    }

    /// One delivery to `tenant`'s endpoint: the status to answer.
    fn receive(&self, tenant: &str, headers: &HeaderMap, body: &[u8]) -> StatusCode {
        let mut tenants = self.tenants.lock().expect("receiver state");
        let t = tenants.entry(tenant.to_owned()).or_default();
        if let Some(status) = t.fault {
            t.seen.faulted += 1;
            return StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        }
        let secrets: Vec<&str> = t.secrets.iter().map(String::as_str).collect();
        if signing::verify(&secrets, body, headers).is_err() {
            t.seen.bad_signatures += 1;
            return StatusCode::UNAUTHORIZED;
        }
        let Ok(event) = serde_json::from_slice::<Value>(body) else {
            return StatusCode::BAD_REQUEST;
        };
        let id = headers
            .get(signing::ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !t.ids.insert(id.to_owned()) {
            t.seen.duplicates += 1;
            return StatusCode::NO_CONTENT;
        }
        if let Some(sequence) = event["sequence"].as_str() {
            match &t.last_sequence {
                Some(last) if sequence < last.as_str() => t.seen.order_violations += 1,
                _ => t.last_sequence = Some(sequence.to_owned()),
            }
        }
        t.seen.received += 1;
        StatusCode::NO_CONTENT
    }
}

/// The receiver's routes; the control ones need `auth` (the simulator's token check).
pub fn router<S>(receiver: Receiver) -> (Router<S>, Router<S>)
where
    S: Clone + Send + Sync + 'static,
{
    let hooks = Router::new()
        .route("/hooks/{tenant}", post(receive))
        .with_state(receiver.clone());
    let control = Router::new()
        .route("/_sim/hooks/report", get(report))
        .route("/_sim/hooks/{tenant}", put(put_secrets))
        .route("/_sim/hooks/{tenant}/fault", put(put_fault))
        .with_state(receiver);
    (hooks, control)
}

async fn receive(
    State(receiver): State<Receiver>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    receiver.receive(&tenant, &headers, &body).into_response()
}

async fn report(State(receiver): State<Receiver>) -> Response {
    axum::Json(receiver.report()).into_response()
}

async fn put_secrets(
    State(receiver): State<Receiver>,
    Path(tenant): Path<String>,
    axum::Json(given): axum::Json<Secrets>,
) -> Response {
    for secret in &given.secrets {
        if let Err(e) = signing::check_secret(secret) {
            return (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()).into_response();
        }
    }
    let mut tenants = receiver.tenants.lock().expect("receiver state");
    tenants.entry(tenant).or_default().secrets = given.secrets;
    StatusCode::NO_CONTENT.into_response()
}

async fn put_fault(
    State(receiver): State<Receiver>,
    Path(tenant): Path<String>,
    axum::Json(fault): axum::Json<Fault>,
) -> Response {
    let mut tenants = receiver.tenants.lock().expect("receiver state");
    tenants.entry(tenant).or_default().fault = fault.status;
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(secrets: &[&str], id: &str, sequence: i64) -> (HeaderMap, Vec<u8>) {
        let body = serde_json::to_vec(&serde_json::json!({
            "specversion": "1.0", "id": id,
            "sequence": super::super::cloudevent::sequence(sequence),
        }))
        .unwrap();
        let now = chrono::Utc::now().timestamp();
        let mut h = HeaderMap::new();
        h.insert(signing::ID, id.parse().unwrap());
        h.insert(signing::TIMESTAMP, now.to_string().parse().unwrap());
        let signature = signing::sign(secrets, id, now, &body).unwrap();
        h.insert(signing::SIGNATURE, signature.parse().unwrap());
        (h, body)
    }

    #[test]
    fn the_receiver_counts_what_a_careful_tenant_would() {
        let r = Receiver::default();
        let (secret, stranger) = (signing::new_secret(), signing::new_secret());
        r.tenants
            .lock()
            .unwrap()
            .entry("acme".into())
            .or_default()
            .secrets = vec![secret.clone()];
        let send = |secrets: &[&str], id: &str, seq| {
            let (h, body) = delivery(secrets, id, seq);
            r.receive("acme", &h, &body)
        };
        assert_eq!(send(&[&secret], "e1", 1), StatusCode::NO_CONTENT);
        assert_eq!(send(&[&secret], "e2", 2), StatusCode::NO_CONTENT);
        assert_eq!(send(&[&secret], "e2", 2), StatusCode::NO_CONTENT, "a retry");
        assert_eq!(send(&[&stranger], "e3", 3), StatusCode::UNAUTHORIZED);
        assert_eq!(
            send(&[&secret], "e0", 0),
            StatusCode::NO_CONTENT,
            "out of order"
        );
        let seen = r.report().tenants["acme"];
        assert_eq!(
            seen,
            Seen {
                received: 3,
                duplicates: 1,
                order_violations: 1,
                bad_signatures: 1,
                faulted: 0
            }
        );
    }
}
