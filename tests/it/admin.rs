//! The admin API against the real database: the refusals (no token, wrong token, bad input),
//! the paused tenant with the partner's answer, resume, the kill switch and a metrics scrape.

use std::sync::Arc;

use ferry::admin::{Admin, serve};
use ferry::consumer::ledger;
use ferry::consumer::runtime::ConsumeStats;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::support::TestDb;

pub(crate) const TOKEN: &str = "admin-test-token";

pub(crate) async fn start(db: &TestDb) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let admin = Admin {
        pool: db.pool.clone(),
        stats: Arc::new(ConsumeStats::default()),
        token: Some(TOKEN.into()),
    };
    tokio::spawn(serve(listener, admin, stop.clone()));
    (url, stop)
}

async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("(no error code)")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_but_health_needs_the_token() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;
    let get = reqwest::Method::GET;
    let (status, body) = call(get.clone(), &format!("{url}/health"), None, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    for path in [
        "/metrics",
        "/v1/tenants",
        "/v1/tenants/acme",
        "/v1/kill-switch",
    ] {
        let (status, body) = call(get.clone(), &format!("{url}{path}"), None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} without a token");
        assert_eq!(code(&body), "unauthorized", "{path}: {body}");
        let (status, _) = call(get.clone(), &format!("{url}{path}"), Some("wrong"), None).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{path} with a wrong token"
        );
    }
    let (status, body) = call(get, &format!("{url}/v1/nothing-here"), Some(TOKEN), None).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    stop.cancel();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_sees_why_a_tenant_is_paused_and_resumes_it() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;
    let records = vec![crate::ledger::record(10), crate::ledger::record(11)];
    let pause = crate::ledger::pause_422(records[0].event_id);
    ledger::park(&db.pool, "acme", Some(&pause), &records)
        .await
        .unwrap();
    let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);

    let (status, body) = call(get.clone(), &format!("{url}/v1/tenants"), Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    let acme = &body["data"][0];
    assert_eq!(acme["tenant_id"], "acme");
    assert_eq!(acme["state"], "paused");
    assert_eq!(acme["pause_cause"], "permanent");
    assert_eq!(acme["backlog"], 2);
    assert_eq!(acme["failed_attempts"], 1);
    assert_eq!(acme["partner_response"]["status"], 422, "{acme}");
    assert!(
        acme["pause_reason"]
            .as_str()
            .unwrap()
            .contains("name is required")
    );

    let (status, body) = call(
        get.clone(),
        &format!("{url}/v1/tenants/nobody"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "unknown_tenant")
    );

    // Bad input, each refused with what was wrong, and nothing changed.
    let resume = format!("{url}/v1/tenants/acme/resume");
    let cases = [
        ("not json", "{actor: ", StatusCode::BAD_REQUEST),
        (
            "a missing reason",
            r#"{"actor": "ops"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "an unknown field",
            r#"{"actor": "ops", "reason": "x", "force": true}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "an empty actor",
            r#"{"actor": " ", "reason": "fixed"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (what, body, expected) in cases {
        let (status, answer) = call(post.clone(), &resume, Some(TOKEN), Some(body.into())).await;
        assert_eq!(status, expected, "{what}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {answer}"
        );
    }
    let huge = json!({"actor": "ops", "reason": "x".repeat(20_000)}).to_string();
    let (status, answer) = call(post.clone(), &resume, Some(TOKEN), Some(huge)).await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );
    let (status, body) = call(
        get.clone(),
        &format!("{url}/v1/tenants/acme"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (StatusCode::OK, Some("paused"))
    );

    // Resumed, audited; a second resume has nothing to do.
    let ok = r#"{"actor": "ops@example.com", "reason": "name fixed upstream"}"#;
    let (status, body) = call(post.clone(), &resume, Some(TOKEN), Some(ok.into())).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (StatusCode::ACCEPTED, Some("draining"))
    );
    let (actor, action): (String, String) =
        sqlx::query_as("SELECT actor, action FROM operator_actions WHERE tenant_id = 'acme'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (actor.as_str(), action.as_str()),
        ("ops@example.com", "resume")
    );
    let (status, body) = call(post.clone(), &resume, Some(TOKEN), Some(ok.into())).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "not_paused"));
    let (status, body) = call(
        post.clone(),
        &format!("{url}/v1/tenants/nobody/resume"),
        Some(TOKEN),
        Some(ok.into()),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "unknown_tenant")
    );

    // Paused again by the same event: this time the operator skips it.
    ledger::park(&db.pool, "acme", Some(&pause), &[])
        .await
        .unwrap();
    let skip = format!("{url}/v1/tenants/acme/skip");
    let why = r#"{"actor": "ops@example.com", "reason": "obsolete product"}"#;
    let (status, body) = call(post.clone(), &skip, Some(TOKEN), Some(why.into())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        body["skipped"]["offset"], 10,
        "the failing event, parked first: {body}"
    );
    let (outcome, settled, error): (String, bool, String) = sqlx::query_as(
        "SELECT outcome, settled_at IS NOT NULL, last_error FROM deliveries WHERE event_id = $1",
    )
    .bind(records[0].event_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((outcome.as_str(), settled), ("skipped", true));
    assert!(
        error.contains("ops@example.com") && error.contains("obsolete product"),
        "{error}"
    );
    let left: Vec<i64> =
        sqlx::query_scalar("SELECT \"offset\" FROM parked_events WHERE tenant_id = 'acme'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, [11], "the rest of the backlog stays, to be replayed");
    let (status, body) = call(post, &skip, Some(TOKEN), Some(why.into())).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "not_paused"),
        "draining now"
    );
    stop.cancel();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kill_switch_is_set_audited_and_metrics_are_scraped() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;
    let put = reqwest::Method::PUT;
    let on = r#"{"on": true, "actor": "ops", "reason": "partner incident"}"#;
    let (status, body) = call(
        put.clone(),
        &format!("{url}/v1/kill-switch"),
        Some(TOKEN),
        Some(on.into()),
    )
    .await;
    assert_eq!((status, body["on"].as_bool()), (StatusCode::OK, Some(true)));
    let stored: bool = sqlx::query_scalar("SELECT kill_switch FROM control")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(stored);
    let (status, body) = call(
        put,
        &format!("{url}/v1/kill-switch"),
        Some(TOKEN),
        Some(r#"{"on": "yes"}"#.into()),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM operator_actions WHERE action = 'kill_switch'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(audited, 1);

    let (status, text) = call(
        reqwest::Method::GET,
        &format!("{url}/metrics"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().unwrap().to_owned();
    for series in [
        "ferry_consumer_records_received_total 0",
        "ferry_consumer_kill_switch 0",
        "ferry_tenants_paused 0",
        "ferry_parked_events 0",
        "ferry_deliveries_total{outcome=\"delivered\"} 0",
        "ferry_delivery_latency_seconds_bucket{le=\"0.1\"} 0",
        "ferry_delivery_latency_seconds_bucket{le=\"+Inf\"} 0",
        "ferry_delivery_latency_seconds_count 0",
        "ferry_intake_latency_seconds_count 0",
    ] {
        assert!(text.lines().any(|l| l == series), "{series} in:\n{text}");
    }
    stop.cancel();
    db.drop().await;
}
