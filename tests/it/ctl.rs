//! `ferry ctl` end to end: the real `ferry` binary, as an operator runs it, against the admin
//! API served in-process on a fresh database. The child gets no database or Kafka settings:
//! `ferry ctl` must not need them. Every subcommand is run: tenants, tenant, resume, skip,
//! retry, pause, replay, kill-switch, partitions, failures and event.

use std::sync::Arc;

use ferry::consumer::ledger;
use ferry::consumer::runtime::ConsumeStats;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::support::{AdminUnderTest, TestDb};

const TOKEN: &str = "ctl-test-token";

async fn start(db: &TestDb) -> (String, CancellationToken) {
    start_with(db, Arc::new(ConsumeStats::default())).await
}

/// The admin API over `stats`, as a consumer would serve it.
async fn start_with(db: &TestDb, stats: Arc<ConsumeStats>) -> (String, CancellationToken) {
    AdminUnderTest {
        integration: "partner",
        token: TOKEN,
        stats,
        dead_letters: None,
    }
    .serve(db)
    .await
}

/// What one run of the binary did, shown whole in assertion messages.
struct Run {
    args: Vec<String>,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`ferry {}` exited {:?}\n--- stdout\n{}--- stderr\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `ferry <args>` with `USER=night-shift` and none of Ferry's settings in its environment.
async fn ferry(args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
    command.args(args).env("USER", "night-shift");
    for name in [
        "DATABASE_URL",
        "FERRY_DATABASE_URL",
        "KAFKA_BROKERS",
        "FERRY_KAFKA_BROKERS",
        "FERRY_CONFIG",
        "FERRY_ADMIN_URL",
        "FERRY_ADMIN_TOKEN",
    ] {
        command.env_remove(name);
    }
    let out = command.output().await.expect("run the ferry binary");
    Run {
        args: args.iter().map(|a| a.to_string()).collect(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `ferry ctl --url <url> --token <TOKEN> <args>`.
async fn ctl(url: &str, args: &[&str]) -> Run {
    let mut all = vec!["ctl", "--url", url, "--token", TOKEN];
    all.extend(args);
    ferry(&all).await
}

async fn state(db: &TestDb, tenant: &str) -> String {
    sqlx::query_scalar("SELECT state FROM tenants WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn audited(db: &TestDb) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT actor, action, reason FROM operator_actions ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_finds_a_paused_tenant_and_resumes_it() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;
    let records = vec![crate::ledger::record(10), crate::ledger::record(11)];
    let pause = crate::ledger::pause_422(records[0].event_id);
    ledger::park(&db.pool, "partner", "acme", Some(&pause), &records)
        .await
        .unwrap();

    let run = ctl(&url, &["tenants"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines[0].starts_with("TENANT  INTEGRATION  STATE   CAUSE      BACKLOG  SINCE"),
        "{run}"
    );
    let acme = lines
        .iter()
        .find(|l| l.starts_with("acme "))
        .unwrap_or_else(|| panic!("a row for acme: {run}"));
    for cell in [
        "partner",
        "paused",
        "permanent",
        "2",
        "partner answered 422: name is required",
    ] {
        assert!(acme.contains(cell), "{cell:?} in the row of acme: {run}");
    }

    // Options after the command, as well as before it.
    let run = ctl(&url, &["tenants", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    let body: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"));
    let acme = &body["data"][0];
    assert_eq!(acme["tenant_id"], "acme", "{run}");
    assert_eq!(acme["state"], "paused", "{run}");
    assert_eq!(acme["backlog"], 2, "{run}");
    assert_eq!(acme["partner_response"]["status"], 422, "{run}");
    assert_eq!(
        acme["pause_reason"], "partner answered 422: name is required",
        "{run}"
    );

    let run = ctl(&url, &["tenant", "acme"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    for line in [
        "state           paused",
        "partner status  422",
        "partner body    {\"error\":\"name is required\"}",
    ] {
        assert!(run.stdout.lines().any(|l| l == line), "{line:?}: {run}");
    }
    let run = ctl(&url, &["tenant", "nobody"]).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stderr
            .contains("error: no tenant \"nobody\" is known to Ferry (unknown_tenant, HTTP 404)"),
        "{run}"
    );

    // No reason, no action: refused by the command line, nothing sent, nothing changed.
    let run = ctl(&url, &["resume", "acme"]).await;
    assert_eq!(run.code, Some(2), "{run}");
    assert!(run.stderr.contains("--reason"), "{run}");
    let run = ctl(&url, &["resume", "acme", "--reason", " "]).await;
    assert_eq!(run.code, Some(2), "{run}");
    assert_eq!(state(&db, "acme").await, "paused");
    assert_eq!(audited(&db).await, []);

    let run = ctl(&url, &["resume", "acme", "--reason", "fixed"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(run.stdout, "acme: draining\n", "{run}");
    assert_eq!(state(&db, "acme").await, "draining");
    assert_eq!(
        audited(&db).await,
        [("night-shift".into(), "resume".into(), "fixed".into())],
        "the actor defaults to $USER"
    );
    let run = ctl(&url, &["resume", "acme", "--reason", "fixed"]).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("(not_paused, HTTP 409)"), "{run}");

    // Paused again by the same event: skipped this time, by a named actor.
    ledger::park(&db.pool, "partner", "acme", Some(&pause), &[])
        .await
        .unwrap();
    let args = [
        "skip",
        "acme",
        "--reason",
        "obsolete product",
        "--actor",
        "ann",
    ];
    let run = ctl(&url, &args).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(
        run.stdout,
        format!(
            "acme: draining; skipped event {} (partition 2, offset 10)\n",
            records[0].event_id.unwrap()
        ),
        "{run}"
    );
    assert_eq!(
        audited(&db).await.last().unwrap(),
        &("ann".into(), "skip".into(), "obsolete product".into())
    );
    stop.cancel();
    db.drop().await;
}

/// Several integrations share the database: `tenants` lists a tenant once per integration it is
/// paused in, and `--integration` names the one a command reads or acts on (the consumer's own
/// by default). Input tried: a name that cannot be an integration's.
#[tokio::test(flavor = "multi_thread")]
async fn the_integration_a_command_acts_on_is_named() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;
    for integration in ["partner", "hooks"] {
        let records = vec![crate::ledger::record(10)];
        let pause = crate::ledger::pause_422(records[0].event_id);
        ledger::park(&db.pool, integration, "acme", Some(&pause), &records)
            .await
            .unwrap();
    }
    let run = ctl(&url, &["tenants"]).await;
    let rows: Vec<&str> = run.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "acme in each integration: {run}");
    assert!(
        rows.iter().any(|r| r.starts_with("acme    hooks ")),
        "{run}"
    );
    assert!(
        rows.iter().any(|r| r.starts_with("acme    partner ")),
        "{run}"
    );
    let run = ctl(&url, &["tenants", "--integration", "hooks"]).await;
    assert_eq!(run.stdout.lines().count(), 2, "hooks' alone: {run}");

    let run = ctl(&url, &["--integration", "hooks", "tenant", "acme"]).await;
    assert!(
        run.stdout.lines().any(|l| l == "integration     hooks"),
        "{run}"
    );
    let run = ctl(
        &url,
        &[
            "resume",
            "acme",
            "--integration",
            "hooks",
            "--reason",
            "endpoint back",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run}");
    let states: Vec<(String, String)> =
        sqlx::query_as("SELECT integration, state FROM tenants ORDER BY integration")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        states,
        [
            ("hooks".to_owned(), "draining".to_owned()),
            ("partner".to_owned(), "paused".to_owned())
        ],
        "the resume was hooks' alone"
    );
    let audit: (String, String) =
        sqlx::query_as("SELECT integration, reason FROM operator_actions WHERE action = 'resume'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(audit, ("hooks".to_owned(), "endpoint back".to_owned()));

    let run = ctl(&url, &["tenants", "--integration", "Hooks!"]).await;
    assert_eq!(run.code, Some(2), "refused by the command line: {run}");
    assert!(run.stderr.contains("not an integration's name"), "{run}");
    stop.cancel();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_say_what_was_wrong() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;

    let run = ferry(&["ctl", "--url", &url, "--token", "wrong", "tenants"]).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stderr
            .contains("error: wrong token (unauthorized, HTTP 401)"),
        "{run}"
    );
    assert!(
        run.stderr
            .contains("hint: give the consumer's admin.token with --token"),
        "{run}"
    );
    let run = ferry(&["ctl", "--url", &url, "tenants"]).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("(unauthorized, HTTP 401)"), "{run}");

    // A port nothing listens on: the one just released.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let run = ctl(&closed, &["tenants"]).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stderr.contains(&format!(
            "cannot reach the admin API at {closed}/v1/tenants"
        )),
        "{run}"
    );
    assert!(run.stderr.contains("is `ferry consume` running?"), "{run}");

    let run = ctl(
        &url,
        &["replay", "x", "--since", "yesterday", "--reason", "r"],
    )
    .await;
    assert_eq!(run.code, Some(2), "{run}");
    assert!(
        run.stderr.contains("\"yesterday\" is not an RFC 3339 time"),
        "{run}"
    );
    let run = ctl(&url, &["event", "not-a-uuid"]).await;
    assert_eq!(run.code, Some(2), "{run}");
    assert!(
        run.stderr.contains("\"not-a-uuid\" is not an event id"),
        "{run}"
    );
    let run = ferry(&["ctl", "--url", "ftp://127.0.0.1:9190", "tenants"]).await;
    assert_eq!(run.code, Some(2), "{run}");
    assert!(run.stderr.contains("is not an http(s) URL"), "{run}");
    // As `admin.addr` is written, without the scheme.
    let addr = url.trim_start_matches("http://");
    let run = ferry(&["ctl", "--url", addr, "--token", TOKEN, "kill-switch"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(audited(&db).await, []);
    stop.cancel();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kill_switch_goes_on_and_off() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;
    let stored = || async {
        sqlx::query_scalar::<_, bool>("SELECT kill_switch FROM control")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };

    let run = ctl(&url, &["kill-switch"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "kill switch: off\n"),
        "{run}"
    );
    let run = ctl(&url, &["kill-switch", "on"]).await;
    assert_eq!(run.code, Some(2), "{run}");
    assert!(!stored().await, "nothing changed without a reason");

    let run = ctl(&url, &["kill-switch", "on", "--reason", "partner incident"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.starts_with("kill switch: on"), "{run}");
    assert!(stored().await);
    let run = ctl(&url, &["--json", "kill-switch"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    let body: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"));
    assert_eq!(body, serde_json::json!({"on": true}), "{run}");

    let run = ctl(&url, &["kill-switch", "off", "--reason", "partner back"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "kill switch: off\n"),
        "{run}"
    );
    assert!(!stored().await);
    let actions: Vec<String> = audited(&db)
        .await
        .into_iter()
        .map(|(actor, action, reason)| format!("{actor} {action} {reason}"))
        .collect();
    assert_eq!(
        actions,
        [
            "night-shift kill_switch partner incident",
            "night-shift kill_switch partner back"
        ]
    );
    stop.cancel();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_pauses_retries_and_replays_a_tenant() {
    let db = TestDb::migrated().await;
    let (url, stop) = start(&db).await;
    sqlx::query("INSERT INTO tenants (integration, tenant_id, integration_enabled) VALUES ('partner', 'acme', true)")
        .execute(&db.pool)
        .await
        .unwrap();
    crate::admin::outbox_history(&db, "acme", &[120, 90, 30, 20, 10]).await;

    let run = ctl(
        &url,
        &["pause", "acme", "--reason", "partner asked to hold"],
    )
    .await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "acme: paused\n"),
        "{run}"
    );
    assert_eq!(state(&db, "acme").await, "paused");
    let run = ctl(&url, &["tenants"]).await;
    let row = run.stdout.lines().nth(1).unwrap_or_default().to_owned();
    assert!(
        row.starts_with("acme    partner      paused  operator")
            && row.contains("partner asked to hold"),
        "{run}"
    );
    let run = ctl(&url, &["pause", "acme", "--reason", "again"]).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("(not_active, HTTP 409)"), "{run}");

    let run = ctl(&url, &["retry", "acme", "--reason", "partner ready"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "acme: draining\n"),
        "{run}"
    );
    assert_eq!(state(&db, "acme").await, "draining");

    let cutoff = (chrono::Utc::now() - chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let args = [
        "replay",
        "acme",
        "--since",
        &cutoff,
        "--reason",
        "partner lost data",
    ];
    let run = ctl(&url, &args).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(
        run.stdout,
        format!("acme: 3 events since {cutoff} written again, to be delivered in order\n"),
        "the three written since: {run}"
    );
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE tenant_id = 'acme'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(written, 8, "five originals and three copies");
    // A time the command line takes but the API refuses: its answer, as it gave it.
    let args = [
        "replay",
        "acme",
        "--since",
        "2999-01-01T00:00:00Z",
        "--reason",
        "r",
    ];
    let run = ctl(&url, &args).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("(bad_time, HTTP 422)"), "{run}");

    let actions: Vec<String> = audited(&db)
        .await
        .into_iter()
        .map(|(actor, action, reason)| format!("{actor} {action} {reason}"))
        .collect();
    assert_eq!(
        actions,
        [
            "night-shift pause partner asked to hold",
            "night-shift retry partner ready",
            "night-shift replay partner lost data"
        ]
    );
    stop.cancel();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_partitions_and_an_events_history() {
    let db = TestDb::migrated().await;
    let stats = Arc::new(ConsumeStats::default());
    *stats.partition_view.lock().unwrap() = vec![ferry::consumer::runtime::PartitionView {
        topic: "ferry.outbox".into(),
        partition: 2,
        committed_offset: Some(10),
        settled_offset: Some(10),
        high_watermark: Some(12),
        lag: Some(2),
        in_flight: 0,
    }];
    let (url, stop) = start_with(&db, stats).await;

    let run = ctl(&url, &["failures"]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "no failed events on record\n"),
        "{run}"
    );

    let records = vec![crate::ledger::record(10), crate::ledger::record(11)];
    let failed = records[0].event_id.unwrap();
    let pause = crate::ledger::pause_422(Some(failed));
    ledger::park(&db.pool, "partner", "acme", Some(&pause), &records)
        .await
        .unwrap();
    let started = chrono::Utc::now();
    let mut conn = db.pool.acquire().await.unwrap();
    ledger::record_attempts(
        &mut conn,
        "partner",
        &[ledger::AttemptLog {
            event_id: failed,
            attempt: 1,
            started_at: started,
            finished_at: started + chrono::Duration::milliseconds(250),
            outcome: "failed",
            error: Some("rejected: name is required".into()),
            response: Some(serde_json::json!({"status": 422, "body": "name is required"})),
            instance: "test:1".into(),
        }],
    )
    .await
    .unwrap();
    drop(conn);

    let run = ctl(&url, &["failures", "--limit", "5"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with(&failed.to_string()))
        .unwrap_or_else(|| panic!("a row for {failed}: {run}"));
    for cell in ["acme", "failed", "2@10", "422", "name is required"] {
        assert!(row.contains(cell), "{cell:?} in the row of {failed}: {run}");
    }
    let run = ctl(&url, &["failures", "--limit", "0"]).await;
    assert_eq!(run.code, Some(2), "{run}");
    let run = ctl(&url, &["--json", "failures"]).await;
    let body: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"));
    assert_eq!(body["data"][0]["last_response"]["status"], 422, "{run}");

    let run = ctl(&url, &["partitions"]).await;
    assert_eq!(
        run.stdout,
        "TOPIC         PARTITION  COMMITTED  SETTLED  HIGH-WATERMARK  LAG  IN-FLIGHT\n\
         ferry.outbox  2          10         10       12              2    0\n",
        "{run}"
    );

    // The operator skips it; its history shows the attempt, the parked record gone, the skip.
    let run = ctl(&url, &["skip", "acme", "--reason", "obsolete product"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    let run = ctl(&url, &["event", &failed.to_string()]).await;
    assert_eq!(run.code, Some(0), "{run}");
    let attempt = format!(
        "1  {}  250ms  failed   422     rejected: name is required",
        started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    for line in [
        format!("event     {failed}"),
        "          outcome: skipped".to_owned(),
        "parked    no".to_owned(),
        attempt,
    ] {
        assert!(run.stdout.lines().any(|l| l == line), "{line:?}: {run}");
    }
    let skip = run
        .stdout
        .lines()
        .skip_while(|l| *l != "operator actions")
        .nth(2)
        .unwrap_or_default();
    assert!(
        skip.contains("night-shift") && skip.ends_with("skip    obsolete product"),
        "{run}"
    );
    let run = ctl(&url, &["--json", "event", &failed.to_string()]).await;
    let body: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"));
    assert_eq!(body["attempts"][0]["response"]["status"], 422, "{run}");
    let unknown = uuid::Uuid::new_v4().to_string();
    let run = ctl(&url, &["event", &unknown]).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("(unknown_event, HTTP 404)"), "{run}");
    stop.cancel();
    db.drop().await;
}
