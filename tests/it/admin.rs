//! The admin API against the real database: the refusals (no token, wrong token, bad input),
//! the paused tenant with the partner's answer, resume, the kill switch and a metrics scrape.

use std::sync::Arc;

use ferry::consumer::ledger;
use ferry::consumer::runtime::ConsumeStats;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::support::TestDb;

pub(crate) const TOKEN: &str = "admin-test-token";

pub(crate) async fn start(db: &TestDb) -> (String, CancellationToken) {
    start_with(db, Arc::new(ConsumeStats::default())).await
}

/// Stats of an instance that owns partition 0: the one that reports the database's gauges.
pub(crate) fn owner_of_partition_0() -> Arc<ConsumeStats> {
    let stats = ConsumeStats::default();
    stats
        .partition_view
        .lock()
        .unwrap()
        .push(ferry::consumer::runtime::PartitionView {
            topic: "ferry.outbox".into(),
            partition: 0,
            committed_offset: None,
            settled_offset: None,
            high_watermark: None,
            lag: None,
            in_flight: 0,
        });
    Arc::new(stats)
}

pub(crate) async fn start_with(
    db: &TestDb,
    stats: Arc<ConsumeStats>,
) -> (String, CancellationToken) {
    crate::support::AdminUnderTest {
        integration: "partner",
        token: TOKEN,
        stats,
        dead_letters: None,
    }
    .serve(db)
    .await
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
        "/v1/partitions",
        "/v1/failures",
        "/v1/events/0191d0a2-0000-7000-8000-000000000000",
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

/// A request whose `Host` is not the API's is refused on every route but the probes, even with
/// the right token: a web page that points a name of its own at 127.0.0.1 (DNS rebinding)
/// reaches nothing. Inputs tried: `Host: evil.example:<port>` and `Host: 127.0.0.1:80`.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_host_is_refused_even_with_the_token() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;
    let client = reqwest::Client::new();
    let port = url.rsplit(':').next().unwrap();
    for host in [format!("evil.example:{port}"), "127.0.0.1:80".to_owned()] {
        for path in ["/v1/tenants", "/dashboard", "/metrics"] {
            let response = client
                .get(format!("{url}{path}"))
                .header(reqwest::header::HOST, &host)
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                StatusCode::MISDIRECTED_REQUEST,
                "{host}{path}"
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(code(&body), "wrong_host", "{host}{path}");
        }
        let health = client
            .get(format!("{url}/health"))
            .header(reqwest::header::HOST, &host)
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), StatusCode::OK, "/health answers any probe");
    }
    let (status, _) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/tenants"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the API's own Host is answered");
    stop.cancel();
    db.drop().await;
}

/// With no token configured, the first instance makes one, shows it once and keeps only its
/// hash; a second instance gets the same token and no secret. Guarantee: the admin API is never
/// open, and its token is printed once and stored nowhere in clear.
#[tokio::test]
async fn an_unconfigured_token_is_made_once_and_stored_as_a_hash() {
    use ferry::admin::access;
    let db = TestDb::migrated().await;
    let (token, secret) = access::stored_or_new(&db.pool).await.unwrap();
    let secret = secret.expect("the first start makes the token");
    assert!(token.accepts(&secret) && secret.len() >= 32);
    let (again, none) = access::stored_or_new(&db.pool).await.unwrap();
    assert_eq!(
        (again == token, none),
        (true, None),
        "one token for every instance"
    );
    let stored: Vec<u8> = sqlx::query_scalar("SELECT admin_token_sha256 FROM control")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 32);
    assert!(
        !String::from_utf8_lossy(&stored).contains(&secret),
        "a hash, not the token"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_sees_why_a_tenant_is_paused_and_resumes_it() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;
    let records = vec![crate::ledger::record(10), crate::ledger::record(11)];
    let pause = crate::ledger::pause_422(records[0].event_id);
    ledger::park(&db.pool, "partner", "acme", Some(&pause), &records)
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
    ledger::park(&db.pool, "partner", "acme", Some(&pause), &[])
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
    let (url, stop) = start_with(&db, owner_of_partition_0()).await;
    // Another instance, not the owner of partition 0: the database's gauges are not its to
    // export, so that a sum() over instances counts each once.
    let (other, other_stop) = start(&db).await;
    let (status, body) = call(
        reqwest::Method::GET,
        &format!("{other}/metrics"),
        Some(TOKEN),
        None,
    )
    .await;
    let text = body
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains("ferry_metrics_database_reporter{integration=\"partner\"} 0"),
        "{text}"
    );
    assert!(!text.contains("ferry_parked_events"), "{text}");
    other_stop.cancel();
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
        &format!(
            "ferry_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        "ferry_metrics_database_reporter{integration=\"partner\"} 1",
        "ferry_consumer_records_received_total{integration=\"partner\"} 0",
        "ferry_consumer_kill_switch{integration=\"partner\"} 0",
        "ferry_tenants_paused{integration=\"partner\"} 0",
        "ferry_parked_events{integration=\"partner\"} 0",
        "ferry_tenant_paused_oldest_seconds{integration=\"partner\"} 0",
        "ferry_deliveries_total{integration=\"partner\",outcome=\"delivered\"} 0",
        "ferry_delivery_latency_seconds_bucket{integration=\"partner\",le=\"0.1\"} 0",
        "ferry_delivery_latency_seconds_bucket{integration=\"partner\",le=\"+Inf\"} 0",
        "ferry_delivery_latency_seconds_count{integration=\"partner\"} 0",
        "ferry_intake_latency_seconds_count{integration=\"partner\"} 0",
        "ferry_handling_seconds_count{integration=\"partner\"} 0",
    ] {
        assert!(text.lines().any(|l| l == series), "{series} in:\n{text}");
    }
    stop.cancel();
    db.drop().await;
}

/// A tenant row, integration on, active.
async fn active_tenant(db: &TestDb, tenant: &str) {
    sqlx::query("INSERT INTO tenants (integration, tenant_id, integration_enabled) VALUES ('partner', $1, true)")
        .bind(tenant)
        .execute(&db.pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_and_retry_now_are_audited_and_refused_in_the_wrong_state() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;
    active_tenant(&db, "acme").await;
    let post = reqwest::Method::POST;
    let why = r#"{"actor": "ops", "reason": "partner asked us to hold acme"}"#;

    let (status, body) = call(
        post.clone(),
        &format!("{url}/v1/tenants/acme/pause"),
        Some(TOKEN),
        Some(why.into()),
    )
    .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (StatusCode::ACCEPTED, Some("paused")),
        "{body}"
    );
    let (state, cause, reason): (String, String, String) = sqlx::query_as(
        "SELECT state, pause_cause, pause_reason FROM tenants WHERE tenant_id = 'acme'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), cause.as_str()), ("paused", "operator"));
    assert!(
        reason.contains("ops") && reason.contains("hold acme"),
        "{reason}"
    );
    // Paused already: a second pause has nothing to do; an unknown tenant is named.
    let (status, body) = call(
        post.clone(),
        &format!("{url}/v1/tenants/acme/pause"),
        Some(TOKEN),
        Some(why.into()),
    )
    .await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "not_active"));
    let (status, body) = call(
        post.clone(),
        &format!("{url}/v1/tenants/nobody/pause"),
        Some(TOKEN),
        Some(why.into()),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "unknown_tenant")
    );
    // Without a reason nothing is paused.
    active_tenant(&db, "other").await;
    let (status, _) = call(
        post.clone(),
        &format!("{url}/v1/tenants/other/pause"),
        Some(TOKEN),
        Some(r#"{"actor": "ops", "reason": ""}"#.into()),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "an empty reason");
    let other: String = sqlx::query_scalar("SELECT state FROM tenants WHERE tenant_id = 'other'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(other, "active");

    // Retry now: the paused tenant drains at once; an active one has nothing to retry.
    let retry = format!("{url}/v1/tenants/acme/retry");
    let (status, body) = call(post.clone(), &retry, Some(TOKEN), Some(why.into())).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (StatusCode::ACCEPTED, Some("draining")),
        "{body}"
    );
    let (status, body) = call(post, &retry, Some(TOKEN), Some(why.into())).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "not_paused"));
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM operator_actions WHERE tenant_id = 'acme' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(actions, ["pause", "retry"]);
    stop.cancel();
    db.drop().await;
}

/// Writes `tenant`'s outbox rows, one per age (minutes ago), oldest first (their aggregate ids
/// count from 1); returns their ids.
pub(crate) async fn outbox_history(db: &TestDb, tenant: &str, ages_min: &[i64]) -> Vec<uuid::Uuid> {
    let mut ids = Vec::new();
    for (seq, age) in ages_min.iter().enumerate() {
        let mut row = crate::consume::row(tenant, seq as i64 + 1);
        row.created_at = chrono::Utc::now() - chrono::Duration::minutes(*age);
        sqlx::query(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, tenant_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(row.id)
        .bind(&row.aggregate_type)
        .bind(&row.aggregate_id)
        .bind(&row.event_type)
        .bind(&row.payload)
        .bind(&row.tenant_id)
        .bind(row.created_at)
        .execute(&db.pool)
        .await
        .unwrap();
        ids.push(row.id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_writes_the_tenants_history_again_in_order() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;
    let cutoff = chrono::Utc::now() - chrono::Duration::hours(1);
    // Two old events (before the cut-off), three since, and another tenant's event.
    let mut ids = outbox_history(&db, "acme", &[120, 90, 30, 20, 10]).await;
    ids.extend(outbox_history(&db, "other", &[0]).await);
    let replay = format!("{url}/v1/tenants/acme/replay");
    let post = reqwest::Method::POST;
    // Bad times, each named, and nothing written.
    for (what, since) in [
        ("a word", "yesterday"),
        ("a date without a time", "2026-12-01"),
        ("an empty time", ""),
        ("the future", "2999-01-01T00:00:00Z"),
    ] {
        let body = json!({"actor": "ops", "reason": "partner lost data", "since": since});
        let (status, answer) =
            call(post.clone(), &replay, Some(TOKEN), Some(body.to_string())).await;
        assert_eq!(
            (status, code(&answer)),
            (StatusCode::UNPROCESSABLE_ENTITY, "bad_time"),
            "{what}: {answer}"
        );
    }
    let (status, answer) = call(
        post.clone(),
        &format!("{url}/v1/tenants/nobody/replay"),
        Some(TOKEN),
        Some(json!({"actor": "ops", "reason": "x", "since": cutoff.to_rfc3339()}).to_string()),
    )
    .await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::NOT_FOUND, "unknown_tenant")
    );
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert_eq!(count().await, 6, "the refusals wrote nothing");

    let body = json!({"actor": "ops", "reason": "partner lost data", "since": cutoff.to_rfc3339()});
    let (status, answer) = call(post, &replay, Some(TOKEN), Some(body.to_string())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["events"], 3, "{answer}");
    // The copies: new ids, the same payloads, in the original order, after the originals.
    let copies: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT id, aggregateid FROM outbox WHERE tenant_id = 'acme' AND created_at > now() - interval '1 minute' \
         ORDER BY created_at, id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let seqs: Vec<&str> = copies.iter().map(|(_, seq)| seq.as_str()).collect();
    assert_eq!(seqs, ["3", "4", "5"]);
    assert!(
        copies.iter().all(|(id, _)| !ids.contains(id)),
        "every copy is a new event"
    );
    let details: serde_json::Value = sqlx::query_scalar(
        "SELECT details FROM operator_actions WHERE action = 'replay' AND tenant_id = 'acme'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(details["events"], 3, "{details}");
    stop.cancel();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_and_an_events_history_are_one_call_away() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;
    let records = vec![crate::ledger::record(10), crate::ledger::record(11)];
    let failed = records[0].event_id.unwrap();
    ledger::park(
        &db.pool,
        "partner",
        "acme",
        Some(&crate::ledger::pause_422(Some(failed))),
        &records,
    )
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let now = chrono::Utc::now();
    ledger::record_attempts(
        &mut conn,
        "partner",
        &[ledger::AttemptLog {
            event_id: failed,
            attempt: 1,
            started_at: now,
            finished_at: now,
            outcome: "failed",
            error: Some("rejected: name is required".into()),
            response: Some(json!({"status": 422, "body": "name is required"})),
            instance: "test:1".into(),
        }],
    )
    .await
    .unwrap();
    drop(conn);
    let get = reqwest::Method::GET;

    let (status, body) = call(
        get.clone(),
        &format!("{url}/v1/failures"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"][0]["event_id"], failed.to_string(), "{body}");
    assert_eq!(body["data"][0]["last_response"]["status"], 422, "{body}");
    for (what, query) in [
        ("zero", "limit=0"),
        ("too many", "limit=5000"),
        ("not a number", "limit=ten"),
        ("an unknown parameter", "since=today"),
    ] {
        let (status, body) = call(
            get.clone(),
            &format!("{url}/v1/failures?{query}"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::BAD_REQUEST, "bad_query"),
            "{what}: {body}"
        );
    }

    let (status, body) = call(
        get.clone(),
        &format!("{url}/v1/events/{failed}"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["delivery"]["outcome"], "failed", "{body}");
    assert_eq!(body["attempts"][0]["attempt"], 1, "{body}");
    assert_eq!(body["attempts"][0]["response"]["status"], 422, "{body}");
    assert_eq!(body["parked"]["offset"], 10, "{body}");
    let (status, body) = call(
        get.clone(),
        &format!("{url}/v1/events/not-a-uuid"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "bad_event_id"),
        "{body}"
    );
    let (status, body) = call(
        get.clone(),
        &format!("{url}/v1/events/{}", uuid::Uuid::new_v4()),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "unknown_event")
    );

    let (status, body) = call(get.clone(), &format!("{url}/ready"), None, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ready")),
        "readiness needs no token: {body}"
    );
    let (status, body) = call(get, &format!("{url}/v1/partitions"), Some(TOKEN), None).await;
    assert_eq!(
        (status, body["data"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(0)),
        "no consumer, no partitions: {body}"
    );
    stop.cancel();
    db.drop().await;
}
