//! The webhooks integration end to end: the real broker, Postgres, the consumer running
//! `integrations/webhooks.toml`, and the simulator's receiver as every tenant's endpoint.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry::consumer::runtime::{self, ConsumeOptions, ConsumeStats};
use ferry::outbox::wire::OutboxRow;
use ferry::partner::spec::Spec;
use ferry::webhook::WebhookIntegration;
use ferry::webhook::endpoints;
use ferry::webhook::receiver::{Report, Seen};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::consume::{produce_rows, row};
use crate::partner::{TOKEN as SIM_TOKEN, start_sim};
use crate::support::{AdminUnderTest, TestDb, config, fresh_topic, wait_for};

const ADMIN_TOKEN: &str = "webhooks-admin-token";

/// The shipped webhooks integration.
fn spec() -> Spec {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("integrations/webhooks.toml");
    Spec::load_with(&file, |_| None).unwrap_or_else(|e| panic!("{e}"))
}

/// The simulator's control routes.
struct SimControl {
    url: String,
    http: reqwest::Client,
}

impl SimControl {
    async fn put(&self, path: &str, body: serde_json::Value) {
        let answer = self
            .http
            .put(format!("{}{path}", self.url))
            .bearer_auth(SIM_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{path}: {}", answer.status());
    }

    /// The tenant's endpoint holds these secrets.
    async fn holds(&self, tenant: &str, secrets: &[&str]) {
        self.put(
            &format!("/_sim/hooks/{tenant}"),
            json!({"secrets": secrets}),
        )
        .await;
    }

    /// Every delivery to the tenant's endpoint is answered `status` (`None`: normally).
    async fn fault(&self, tenant: &str, status: Option<u16>) {
        self.put(
            &format!("/_sim/hooks/{tenant}/fault"),
            json!({"status": status}),
        )
        .await;
    }

    async fn report(&self) -> Report {
        self.http
            .get(format!("{}/_sim/hooks/report", self.url))
            .bearer_auth(SIM_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn seen(&self, tenant: &str) -> Seen {
        self.report()
            .await
            .tenants
            .get(tenant)
            .copied()
            .unwrap_or_default()
    }
}

/// The simulator, its receiver every one of `tenants`' endpoint, each with a secret Ferry made.
async fn with_endpoints(db: &TestDb, tenants: &[&str]) -> (SimControl, CancellationToken) {
    let (_sim, url, stop) = start_sim().await;
    let sim = SimControl {
        url,
        http: reqwest::Client::new(),
    };
    for tenant in tenants {
        let url = format!("{}/hooks/{tenant}", sim.url);
        let endpoint = endpoints::set(&db.pool, "webhooks", tenant, &url, None)
            .await
            .unwrap();
        sim.holds(tenant, &[&endpoint.secret]).await;
    }
    (sim, stop)
}

/// Runs the webhooks integration over `cfg`'s topic.
fn run_webhooks(
    cfg: &ferry::config::Config,
    pool: &sqlx::PgPool,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), runtime::ConsumeError>>,
    Arc<ConsumeStats>,
) {
    let hooks = WebhookIntegration::new(spec(), Duration::from_secs(5), pool.clone()).unwrap();
    let stats = Arc::new(ConsumeStats::default());
    let stop = CancellationToken::new();
    let options = ConsumeOptions {
        kill_switch_interval: Duration::from_millis(100),
        breaker_min_tenants: usize::MAX,
        ..ConsumeOptions::default()
    };
    let task = tokio::spawn({
        let (cfg, pool, stats, stop) =
            (cfg.clone(), pool.clone(), Arc::clone(&stats), stop.clone());
        async move { runtime::run(&cfg, pool, Arc::new(hooks), options, stats, stop).await }
    });
    (stop, task, stats)
}

/// Rows `from..=to` of `tenant`, in order.
fn rows(tenant: &str, from: i64, to: i64) -> Vec<OutboxRow> {
    (from..=to).map(|seq| row(tenant, seq)).collect()
}

/// Guarantees: every tenant's events reach its own endpoint once each, in order, signed; a
/// tenant without an endpoint gets nothing; a secret rotated mid-stream refuses no delivery,
/// while the tenant still holds the old one and after it holds only the new.
#[tokio::test(flavor = "multi_thread")]
async fn each_tenants_events_reach_its_own_endpoint_signed_in_order_through_a_rotation() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(2).await;
    let cfg = config(&db, &kafka);
    let (sim, sim_stop) = with_endpoints(&db, &["acme", "globex"]).await;
    let old = endpoints::get(&db.pool, "webhooks", "acme")
        .await
        .unwrap()
        .unwrap()
        .secret;
    let mut first: Vec<OutboxRow> = rows("acme", 1, 20);
    first.extend(rows("globex", 1, 20));
    first.extend(rows("initech", 1, 5)); // no endpoint
    produce_rows(&kafka, &first).await;
    let (stop, task, stats) = run_webhooks(&cfg, &db.pool);
    wait_for(
        "the first events delivered",
        Duration::from_secs(60),
        || async {
            let r = sim.report().await;
            (r.tenants.get("acme").map(|s| s.received) == Some(20)
                && r.tenants.get("globex").map(|s| s.received) == Some(20))
            .then_some(())
        },
    )
    .await;

    // Rotated mid-stream: the tenant still holds only the old secret, then only the new one.
    let rotated = endpoints::rotate(&db.pool, "webhooks", "acme", Duration::from_secs(3600))
        .await
        .unwrap();
    assert_ne!(rotated.secret, old);
    produce_rows(&kafka, &rows("acme", 21, 30)).await;
    wait_for(
        "verified with the old secret",
        Duration::from_secs(60),
        || async { (sim.seen("acme").await.received == 30).then_some(()) },
    )
    .await;
    sim.holds("acme", &[&rotated.secret]).await;
    produce_rows(&kafka, &rows("acme", 31, 40)).await;
    wait_for(
        "verified with the new secret",
        Duration::from_secs(60),
        || async { (sim.seen("acme").await.received == 40).then_some(()) },
    )
    .await;

    let report = sim.report().await;
    for tenant in ["acme", "globex"] {
        let seen = report.tenants[tenant];
        assert_eq!(
            (seen.duplicates, seen.order_violations, seen.bad_signatures),
            (0, 0, 0),
            "{tenant}: {seen:?}"
        );
    }
    assert!(
        !report.tenants.contains_key("initech"),
        "no endpoint, nothing sent"
    );
    let ignored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM deliveries \
         WHERE integration = 'webhooks' AND tenant_id = 'initech' AND outcome = 'ignored'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(ignored, 5, "recorded as ignored");
    assert_eq!(
        stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
        60
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    sim_stop.cancel();
    db.drop().await;
}

/// Guarantee: nothing lost while an endpoint is gone, and nobody else blocked. Its 410 disables
/// it and pauses its tenant alone (the events parked: rows, not memory); setting the endpoint
/// again through `ferry ctl webhook set` resumes the tenant and delivers the backlog in order,
/// each event once.
#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_gone_parks_its_tenant_until_it_is_set_again() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(1).await;
    let cfg = config(&db, &kafka);
    let (sim, sim_stop) = with_endpoints(&db, &["acme", "globex"]).await;
    let sim_url = sim.url.clone();
    sim.fault("acme", Some(410)).await;
    let mut written = rows("acme", 1, 15);
    written.extend(rows("globex", 1, 15));
    produce_rows(&kafka, &written).await;
    let (stop, task, _) = run_webhooks(&cfg, &db.pool);
    wait_for(
        "globex delivered, acme paused with its backlog parked",
        Duration::from_secs(60),
        || async {
            let parked: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM parked_events WHERE integration = 'webhooks' AND tenant_id = 'acme'",
            )
            .fetch_one(&db.pool)
            .await
            .ok()?;
            (sim.seen("globex").await.received == 15 && parked == 15).then_some(())
        },
    )
    .await;
    let endpoint = endpoints::get(&db.pool, "webhooks", "acme")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        endpoint.disabled_reason.as_deref(),
        Some("it answered 410 Gone")
    );
    let (state, cause): (String, String) = sqlx::query_as(
        "SELECT state, pause_cause FROM tenants WHERE integration = 'webhooks' AND tenant_id = 'acme'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), cause.as_str()), ("paused", "permanent"));
    assert_eq!(sim.seen("acme").await.faulted, 1, "tried once, then parked");

    // The tenant comes back with a new endpoint; the operator sets it.
    sim.fault("acme", None).await;
    let admin = start_admin(&db).await;
    let secret = ferry::webhook::signing::new_secret();
    sim.holds("acme", &[&secret]).await;
    let url = format!("{sim_url}/hooks/acme");
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "ctl",
            "--url",
            &admin.0,
            "--token",
            ADMIN_TOKEN,
            "webhook",
            "set",
            "acme",
        ])
        .args([
            "--endpoint",
            &url,
            "--secret",
            &secret,
            "--reason",
            "acme moved its endpoint",
        ])
        .env_remove("FERRY_ADMIN_URL")
        .env_remove("FERRY_ADMIN_TOKEN")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("state ") && l.ends_with(" enabled")),
        "{stdout}"
    );
    assert!(stdout.contains("resumed"), "{stdout}");
    wait_for(
        "acme's backlog delivered",
        Duration::from_secs(60),
        || async { (sim.seen("acme").await.received == 15).then_some(()) },
    )
    .await;
    let seen = sim.seen("acme").await;
    assert_eq!(
        (seen.duplicates, seen.order_violations, seen.bad_signatures),
        (0, 0, 0),
        "{seen:?}"
    );
    wait_for("acme live again", Duration::from_secs(30), || async {
        let state: String = sqlx::query_scalar(
            "SELECT state FROM tenants WHERE integration = 'webhooks' AND tenant_id = 'acme'",
        )
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (state == "active").then_some(())
    })
    .await;
    admin.1.cancel();
    stop.cancel();
    task.await.unwrap().unwrap();
    sim_stop.cancel();
    db.drop().await;
}

/// The admin API of a consumer running the webhooks integration.
async fn start_admin(db: &TestDb) -> (String, CancellationToken) {
    AdminUnderTest {
        integration: "webhooks",
        token: ADMIN_TOKEN,
        stats: Arc::new(ConsumeStats::default()),
        dead_letters: None,
    }
    .serve(db)
    .await
}

/// Bad input: an endpoint that is not an http(s) URL, a secret that is not one, an action
/// without a reason. Each refused with what was wrong; nothing stored.
#[tokio::test(flavor = "multi_thread")]
async fn bad_endpoints_are_refused_with_what_was_wrong() {
    let db = TestDb::migrated().await;
    let (url, stop) = start_admin(&db).await;
    let http = reqwest::Client::new();
    let put = |body: serde_json::Value| {
        http.put(format!("{url}/v1/webhooks/acme"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let cases = [
        (
            json!({"url": "ftp://hooks.example", "actor": "a", "reason": "r"}),
            422,
            "bad_endpoint",
        ),
        (
            json!({"url": "https://hooks.example", "secret": "hunter2", "actor": "a", "reason": "r"}),
            422,
            "bad_endpoint",
        ),
        (
            json!({"url": "https://hooks.example", "actor": "a", "reason": " "}),
            422,
            "missing_actor_or_reason",
        ),
    ];
    for (body, status, code) in cases {
        let answer = put(body.clone()).await.unwrap();
        assert_eq!(answer.status().as_u16(), status, "{body}");
        let said: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(said["error"]["code"], code, "{body}: {said}");
    }
    assert!(
        endpoints::get(&db.pool, "webhooks", "acme")
            .await
            .unwrap()
            .is_none()
    );
    let answer = http
        .post(format!("{url}/v1/webhooks/acme/rotate"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"actor": "a", "reason": "r"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 404, "no endpoint to rotate");
    // A good one: the secret is in the answer to the change, never in a read.
    let set: serde_json::Value =
        put(json!({"url": "https://hooks.example/acme", "actor": "a", "reason": "r"}))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert!(
        set["secret"].as_str().unwrap().starts_with("whsec_"),
        "{set}"
    );
    let read: serde_json::Value = http
        .get(format!("{url}/v1/webhooks/acme"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(read.get("secret").is_none(), "{read}");
    assert_eq!(read["url"], "https://hooks.example/acme");
    stop.cancel();
    db.drop().await;
}
