//! The operator dashboard in a real headless browser: Debian's chromium, driven through
//! chromedriver's W3C WebDriver HTTP API with reqwest. Without a token, or with a wrong one, the
//! page says so; with the right one it shows the paused tenant with its reason and backlog, and
//! Resume (with the operator's name and reason) moves the tenant to draining, audited.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use ferry::consumer::ledger;
use reqwest::Method;
use serde_json::{Value, json};

use crate::admin::{TOKEN, start_with};
use crate::support::{TestDb, unique, wait_for};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// The W3C name of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long the page may take to show something: it refreshes every 2 s, and this machine's
/// cores are shared with builds.
const PAGE: Duration = Duration::from_secs(20);

/// A chromedriver child process, killed when dropped; its log is kept only if the test failed.
struct Driver {
    child: Child,
    log: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
        if std::thread::panicking() {
            eprintln!("chromedriver's log: {}", self.log.display());
        } else {
            std::fs::remove_file(&self.log).ok();
        }
    }
}

/// A browser session of our own chromedriver.
struct Browser {
    session: String,
    base: String,
    addr: SocketAddr,
    http: reqwest::Client,
    /// Last text seen per wait, printed when it changes: a timed-out wait shows what the page said.
    seen: Mutex<String>,
    // Dropped after `Drop::drop` ended the session, so chromium is closed before its driver.
    _driver: Driver,
}

impl Browser {
    /// Starts chromedriver on a free port, waits until it is ready and opens a headless session.
    async fn start() -> Browser {
        for (path, package) in [(CHROMEDRIVER, "chromium-driver"), (CHROMIUM, "chromium")] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: run scripts/test, which installs it (Debian package {package})"
            );
        }
        // Bound and let go: chromedriver takes it a moment later (a clash fails loudly below).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::env::temp_dir().join(format!("{}.log", unique("chromedriver")));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("start {CHROMEDRIVER}: {e}"));
        let mut driver = Driver { child, log };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let base = format!("http://{addr}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();

        wait_for("chromedriver's /status to say ready", PAGE, || {
            let exited = driver.child.try_wait().unwrap();
            let log = driver.log.clone();
            let (http, status) = (http.clone(), format!("{base}/status"));
            async move {
                if let Some(code) = exited {
                    let said = std::fs::read_to_string(&log).unwrap_or_default();
                    panic!("chromedriver exited ({code}) before it was ready:\n{said}");
                }
                let body: Value = http.get(&status).send().await.ok()?.json().await.ok()?;
                (body["value"]["ready"] == true).then_some(())
            }
        })
        .await;

        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,1000"],
            },
        }}});
        let answer = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap();
        let status = answer.status();
        let body: Value = answer.json().await.unwrap();
        let session = body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| {
                panic!(
                    "no session ({status}): {body}\nchromedriver log: {}",
                    driver.log.display()
                )
            })
            .to_owned();
        Browser {
            session,
            base,
            addr,
            http,
            seen: Mutex::new(String::new()),
            _driver: driver,
        }
    }

    /// One WebDriver command on the session: its `value`, or the W3C error as text.
    async fn command(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method.clone(), url);
        // W3C: every POST carries a JSON object, `{}` when the command takes nothing.
        if method == Method::POST {
            request = request.json(&body.unwrap_or_else(|| json!({})));
        }
        let answer = request.send().await.map_err(|e| e.to_string())?;
        let status = answer.status();
        let body: Value = answer.json().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(body["value"].clone())
        } else {
            Err(format!(
                "{status} {}: {}",
                body["value"]["error"], body["value"]["message"]
            ))
        }
    }

    async fn goto(&self, url: &str) {
        self.command(Method::POST, "/url", Some(json!({"url": url})))
            .await
            .unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    /// The element `css` selects, if it is on the page now.
    async fn find(&self, css: &str) -> Result<String, String> {
        let found = self
            .command(
                Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        found[ELEMENT]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("not an element: {found}"))
    }

    /// The rendered text of `css` (empty while hidden), if it is on the page now.
    async fn text(&self, css: &str) -> Result<String, String> {
        let id = self.find(css).await?;
        let text = self
            .command(Method::GET, &format!("/element/{id}/text"), None)
            .await?;
        Ok(text.as_str().unwrap_or_default().to_owned())
    }

    /// Waits until the text of `css` satisfies `ok`, and returns it.
    async fn wait_text(&self, what: &str, css: &str, ok: impl Fn(&str) -> bool) -> String {
        wait_for(what, PAGE, || async {
            let text = self.text(css).await.unwrap_or_else(|e| format!("({e})"));
            let mut seen = self.seen.lock().unwrap();
            if *seen != text {
                eprintln!("dashboard: {css} = {text:?}");
                seen.clone_from(&text);
            }
            ok(&text).then_some(text)
        })
        .await
    }

    async fn clear(&self, css: &str) {
        let id = self.find(css).await.unwrap();
        self.command(Method::POST, &format!("/element/{id}/clear"), None)
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await.unwrap();
        self.command(
            Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await
        .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Runs `script` in the page, with `args` as `arguments`.
    async fn script(&self, script: &str, args: Value) -> Value {
        self.command(
            Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
        .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await.unwrap();
        self.command(Method::POST, &format!("/element/{id}/click"), None)
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }
}

impl Drop for Browser {
    /// Ends the session, which closes chromium; killing chromedriver alone would leave chromium
    /// running. A plain blocking request: no runtime is at hand while dropping, even in a panic.
    fn drop(&mut self) {
        let end = || -> std::io::Result<()> {
            let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(
                stream,
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.session, self.addr
            )?;
            // chromedriver answers once chromium is closed; it may keep the connection open, so
            // read up to the end of the answer's head, not to the end of the stream.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte)? == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            Ok(())
        };
        if let Err(e) = end() {
            eprintln!("ending the WebDriver session: {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_sees_a_paused_tenant_and_resumes_it_in_the_browser() {
    let browser = Browser::start().await;
    let db = TestDb::migrated().await;
    let records = vec![crate::ledger::record(10), crate::ledger::record(11)];
    let pause = crate::ledger::pause_422(records[0].event_id);
    ledger::park(&db.pool, "partner", "acme", Some(&pause), &records)
        .await
        .unwrap();
    // acme is paused in a second integration too, its own row: one dashboard shows both, and
    // acts on the one asked.
    let hooks_records = vec![crate::ledger::record(20)];
    let hooks_pause = crate::ledger::pause_422(hooks_records[0].event_id);
    ledger::park(
        &db.pool,
        "hooks",
        "acme",
        Some(&hooks_pause),
        &hooks_records,
    )
    .await
    .unwrap();
    let stats = std::sync::Arc::new(ferry::consumer::runtime::ConsumeStats::default());
    let (url, stop) = start_with(&db, std::sync::Arc::clone(&stats)).await;
    let acme = r#"tr[data-tenant="acme"][data-integration="partner"]"#;
    let acme_hooks = r#"tr[data-tenant="acme"][data-integration="hooks"]"#;

    // No token: asked for, nothing shown.
    browser.goto(&format!("{url}/dashboard")).await;
    browser
        .wait_text("the missing token message", "#auth-error", |t| {
            t.contains("Missing token")
        })
        .await;
    assert!(browser.find(acme).await.is_err(), "no data without a token");

    // A wrong token: the API's refusal, shown.
    browser.goto(&format!("{url}/dashboard#token=wrong")).await;
    browser
        .wait_text("the wrong token message", "#auth-error", |t| {
            t.contains("Wrong or missing token") && t.contains("wrong token")
        })
        .await;
    assert!(
        browser.find(acme).await.is_err(),
        "no data with a wrong token"
    );
    assert_eq!(
        browser.text("#status").await.unwrap(),
        "No data: token needed"
    );

    // The right token, on a fresh load: the paused tenant, why, and what waits.
    browser.goto("about:blank").await;
    browser
        .goto(&format!("{url}/dashboard#token={TOKEN}"))
        .await;
    browser
        .wait_text(
            "acme's row with the partner's reason",
            &format!("{acme} td.reason"),
            |t| t.contains("name is required"),
        )
        .await;
    assert_eq!(
        browser.text(&format!("{acme} td.state")).await.unwrap(),
        "paused"
    );
    assert_eq!(
        browser.text(&format!("{acme} td.backlog")).await.unwrap(),
        "2"
    );
    assert_eq!(
        browser
            .text(&format!("{acme} td.integration"))
            .await
            .unwrap(),
        "partner"
    );
    assert_eq!(
        browser
            .text(&format!("{acme_hooks} td.integration"))
            .await
            .unwrap(),
        "hooks"
    );
    assert_eq!(
        browser
            .text(&format!("{acme_hooks} td.backlog"))
            .await
            .unwrap(),
        "1"
    );
    assert!(
        browser
            .text(&format!("{acme} td.since"))
            .await
            .unwrap()
            .contains("ago"),
        "since when"
    );
    browser
        .wait_text("a clean refresh", "#status", |t| {
            t.starts_with("Last refresh")
        })
        .await;
    // The charts draw: events delivered between two refreshes become a rate on the line, and
    // the paused tenant's backlog gets a line of its own.
    stats
        .delivered
        .fetch_add(500, std::sync::atomic::Ordering::Relaxed);
    let attr = |css: &'static str, name: &'static str| {
        let browser = &browser;
        async move {
            browser
                .script(
                    "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
                    json!([css, name]),
                )
                .await
                .as_str()
                .map(str::to_owned)
        }
    };
    wait_for(
        "the delivered rate drawn",
        Duration::from_secs(20),
        || async {
            let points: usize = attr(
                r#"#chart-events polyline[data-series="delivered"]"#,
                "data-points",
            )
            .await?
            .parse()
            .ok()?;
            let max: f64 = attr(
                r#"#chart-events polyline[data-series="delivered"]"#,
                "data-max",
            )
            .await?
            .parse()
            .ok()?;
            (points >= 2 && max > 10.0).then_some(())
        },
    )
    .await;
    wait_for("acme's backlog drawn", Duration::from_secs(20), || async {
        let points: usize = attr(
            r#"tr[data-tenant="acme"][data-integration="partner"] td.trend polyline"#,
            "data-points",
        )
        .await?
        .parse()
        .ok()?;
        let last = attr(
            r#"tr[data-tenant="acme"][data-integration="partner"] td.trend polyline"#,
            "data-last",
        )
        .await?;
        (points >= 2 && last == "2").then_some(())
    })
    .await;
    let failed = records[0].event_id.unwrap();
    let failure = browser
        .text(&format!(r#"#failures tr[data-event="{failed}"]"#))
        .await
        .unwrap();
    assert!(
        failure.contains("acme")
            && failure.contains("name is required")
            && failure.contains("partner"),
        "the failing event among the recent failures: {failure}"
    );
    let hooks_failed = hooks_records[0].event_id.unwrap();
    let hooks_failure = browser
        .text(&format!(
            r#"#failures tr[data-event="{hooks_failed}"] td.integration"#
        ))
        .await
        .unwrap();
    assert_eq!(
        hooks_failure, "hooks",
        "every integration's failures, each named"
    );
    assert_eq!(
        browser.text("#partitions-note").await.unwrap(),
        "This instance owns no partitions right now."
    );
    let address = browser.command(Method::GET, "/url", None).await.unwrap();
    assert!(
        !address.as_str().unwrap().contains(TOKEN),
        "the token is taken out of the address bar: {address}"
    );
    assert_eq!(browser.text("#auth-error").await.unwrap(), "", "hidden now");

    // A refused action shows the API's own error: here a reason over the body limit (set by
    // script: typing 17,000 keys takes long), and nothing changes.
    let reason = format!("{acme} input.reason");
    browser.clear("#operator").await;
    browser.type_into("#operator", "night-ops").await;
    browser
        .script(
            "document.querySelector(arguments[0]).value = 'x'.repeat(17000)",
            json!([reason]),
        )
        .await;
    browser.click(&format!("{acme} button.resume")).await;
    browser
        .wait_text(
            "the API's error for the refused resume",
            "#action-result",
            |t| t.contains("Resume acme in partner failed: 413 body_too_large"),
        )
        .await;
    let state: String = sqlx::query_scalar(
        "SELECT state FROM tenants WHERE integration = 'partner' AND tenant_id = 'acme'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(state, "paused");

    // Resume, as a named operator with a reason.
    browser.clear(&reason).await;
    browser.type_into(&reason, "name fixed upstream").await;
    browser.click(&format!("{acme} button.resume")).await;

    let audit = wait_for("acme draining, the resume audited", PAGE, || async {
        let state: String = sqlx::query_scalar(
            "SELECT state FROM tenants WHERE integration = 'partner' AND tenant_id = 'acme'",
        )
        .fetch_one(&db.pool)
        .await
        .ok()?;
        let audit: Option<(String, String)> = sqlx::query_as(
            "SELECT actor, reason FROM operator_actions \
             WHERE integration = 'partner' AND tenant_id = 'acme' AND action = 'resume'",
        )
        .fetch_optional(&db.pool)
        .await
        .ok()?;
        audit.filter(|_| state == "draining")
    })
    .await;
    assert_eq!(
        audit,
        ("night-ops".to_owned(), "name fixed upstream".to_owned())
    );
    browser
        .wait_text(
            "the page to show acme draining",
            &format!("{acme} td.state"),
            |t| t == "draining",
        )
        .await;
    let row = browser.find(acme).await.unwrap();
    let state = browser
        .command(
            Method::GET,
            &format!("/element/{row}/attribute/data-state"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(state, "draining");
    assert!(
        browser
            .find(&format!("{acme} button.resume"))
            .await
            .is_err(),
        "nothing to resume while draining"
    );
    let said = browser.text("#action-result").await.unwrap();
    assert!(
        said.contains("acme in partner: resumed by night-ops"),
        "{said}"
    );
    let hooks_state: String = sqlx::query_scalar(
        "SELECT state FROM tenants WHERE integration = 'hooks' AND tenant_id = 'acme'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(hooks_state, "paused", "the resume was partner's alone");
    assert_eq!(
        browser
            .text(&format!("{acme_hooks} td.state"))
            .await
            .unwrap(),
        "paused"
    );

    // The kill switch, on with a reason: stored, audited, shown.
    browser
        .wait_text("the kill switch shown off", "#kill-switch-state", |t| {
            t == "off"
        })
        .await;
    browser
        .type_into("#kill-switch-reason", "partner incident")
        .await;
    browser.click("#kill-switch-toggle").await;
    browser
        .wait_text("the kill switch shown on", "#kill-switch-state", |t| {
            t.starts_with("ON")
        })
        .await;
    let (on, actor): (bool, String) = sqlx::query_as(
        "SELECT (SELECT kill_switch FROM control), \
                (SELECT actor FROM operator_actions WHERE action = 'kill_switch' AND reason = 'partner incident')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((on, actor.as_str()), (true, "night-ops"));

    stop.cancel();
    db.drop().await;
}
