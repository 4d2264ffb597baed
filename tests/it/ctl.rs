//! `ferry ctl` end to end: the real `ferry` binary, as an operator runs it, against the admin
//! API served in-process on a fresh database. The child gets no database or Kafka settings:
//! `ferry ctl` must not need them.

use std::sync::Arc;

use ferry::admin::{Admin, serve};
use ferry::consumer::ledger;
use ferry::consumer::runtime::ConsumeStats;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::support::TestDb;

const TOKEN: &str = "ctl-test-token";

async fn start(db: &TestDb) -> (String, CancellationToken) {
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
    ledger::park(&db.pool, "acme", Some(&pause), &records)
        .await
        .unwrap();

    let run = ctl(&url, &["tenants"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines[0].starts_with("TENANT  STATE   CAUSE      BACKLOG  SINCE"),
        "{run}"
    );
    let acme = lines
        .iter()
        .find(|l| l.starts_with("acme "))
        .unwrap_or_else(|| panic!("a row for acme: {run}"));
    for cell in [
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
    ledger::park(&db.pool, "acme", Some(&pause), &[])
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
    assert!(run.stderr.contains("not-a-uuid"), "{run}");
    let run = ferry(&["ctl", "--url", "127.0.0.1:9190", "tenants"]).await;
    assert_eq!(run.code, Some(2), "{run}");
    assert!(run.stderr.contains("is not a URL"), "{run}");
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
