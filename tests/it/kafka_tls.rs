//! Kafka over TLS with SASL: a broker (a tansu of the test's own, requiring SASL SCRAM-SHA-512)
//! behind stunnel, a TLS-terminating proxy, whose certificate (the stack's, for `localhost`) the
//! clients verify. The relay produces and the consumer consumes through it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry::config::KafkaConfig;
use ferry::outbox::writer;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::partner::{consume, fast_retries, setup_sim, until_delivered};
use crate::relay::{event, start_relay};

/// A free loopback port (free now; taken by the broker or the proxy a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A broker reachable only in TLS, at `localhost:<port>`: tansu on a plaintext port of its own
/// that advertises the proxy's address, and stunnel in front with the stack's certificate.
struct TlsBroker {
    children: Vec<Child>,
    dir: PathBuf,
    brokers: String,
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The broker's one user (SCRAM-SHA-512).
const USER: (&str, &str) = ("ferry", "s3cret-for-the-test");

fn tansu(dir: &Path, plain: u16, tls: u16, authentication: bool) -> Child {
    let mut command = Command::new(ferry::bench::tansu::binary().expect("tansu: scripts/stack up"));
    command
        .args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{plain}"),
        ])
        .args([
            "--advertised-listener-url",
            &format!("tcp://localhost:{tls}"),
        ])
        .args(["--storage-engine", "sqlite://tansu.db"]);
    if authentication {
        command.arg("--authentication");
    }
    command
        .current_dir(dir)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tansu starts")
}

impl TlsBroker {
    /// The broker with its user made (tansu makes users while it does not yet require them),
    /// then started again requiring SASL, behind the proxy.
    fn start(certs: &Path) -> TlsBroker {
        let (plain, tls) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("ferry-kafka-tls-{tls}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut open = tansu(&dir, plain, tls, false);
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let made = Command::new(ferry::bench::tansu::binary().unwrap())
                .args([
                    "user",
                    "create",
                    "--broker",
                    &format!("tcp://127.0.0.1:{plain}"),
                ])
                .args(["--mechanism", "scram512", USER.0, USER.1])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("tansu user create runs");
            if made.success() {
                break;
            }
            assert!(Instant::now() < until, "tansu never took the user");
            std::thread::sleep(Duration::from_millis(200));
        }
        open.kill().unwrap();
        open.wait().unwrap();
        let tansu = tansu(&dir, plain, tls, true);
        let conf = dir.join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{tls}\nconnect = 127.0.0.1:{plain}\n\
                 cert = {}\nkey = {}\n",
                certs.join("server.crt").display(),
                certs.join("server.key").display()
            ),
        )
        .unwrap();
        let stunnel = Command::new("stunnel4")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stunnel4 starts (scripts/test installs it)");
        TlsBroker {
            children: vec![tansu, stunnel],
            dir,
            brokers: format!("localhost:{tls}"),
        }
    }

    /// Client settings that reach it, trusting `ca`, logging in with `password`.
    fn kafka(&self, topic: &str, ca: &Path, password: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers.clone(),
            topic: topic.to_owned(),
            group_id: format!("{topic}-group"),
            properties: [
                ("security.protocol", "sasl_ssl".to_owned()),
                ("ssl.ca.location", ca.display().to_string()),
                ("ssl.endpoint.identification.algorithm", "https".to_owned()),
                ("sasl.mechanisms", "SCRAM-SHA-512".to_owned()),
                ("sasl.username", USER.0.to_owned()),
                ("sasl.password", password.to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        }
    }
}

/// Whether a client with `kafka`'s settings gets the broker's metadata within `deadline`.
fn answers(kafka: &KafkaConfig, deadline: Duration) -> Result<(), String> {
    let client: BaseConsumer = ferry::broker::consumer_config(kafka, "ferry-tls-probe")
        .create()
        .map_err(|e| e.to_string())?;
    let until = Instant::now() + deadline;
    loop {
        match client.fetch_metadata(None, Duration::from_millis(500)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > until => return Err(e.to_string()),
            Err(_) => {}
        }
    }
}

/// The relay and the consumer reach Kafka only through TLS and SASL, verifying the broker's
/// certificate; a client that trusts another authority, or gives a wrong password, gets
/// nothing. Guarantee: events cross to and from a secured broker without loss, and Ferry talks
/// to the broker it was told to. Inputs tried: the stack's CA, an unrelated CA, a wrong password.
#[tokio::test(flavor = "multi_thread")]
async fn the_relay_and_the_consumer_go_through_a_broker_requiring_tls_and_sasl() {
    let ca = PathBuf::from(std::env::var("FERRY_TEST_PG_CA").expect("scripts/stack env"));
    let other = PathBuf::from(std::env::var("FERRY_TEST_PG_OTHER_CA").unwrap());
    let broker = TlsBroker::start(ca.parent().unwrap());
    let topic = format!("ferry.tls.{}", std::process::id());
    let kafka = broker.kafka(&topic, &ca, USER.1);
    let probe = kafka.clone();
    tokio::task::spawn_blocking(move || answers(&probe, Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the broker answers through TLS and SASL");
    for (what, kafka) in [
        ("trusting another CA", broker.kafka(&topic, &other, USER.1)),
        ("with a wrong password", broker.kafka(&topic, &ca, "wrong")),
    ] {
        let refused = tokio::task::spawn_blocking(move || answers(&kafka, Duration::from_secs(3)))
            .await
            .unwrap();
        assert!(refused.is_err(), "a client {what} must get nothing");
    }

    let (db, mut cfg, sim, sim_stop) = setup_sim(Duration::from_secs(10)).await;
    cfg.kafka = kafka;
    sqlx::query("INSERT INTO tenants (integration, tenant_id, integration_enabled) VALUES ('partner', 'acme', true)")
        .execute(&db.pool)
        .await
        .unwrap();
    ferry::broker::ensure_topic(&cfg.kafka, &cfg.kafka.topic, 2)
        .await
        .unwrap();
    let (relay_stop, relay_task, stats) = start_relay(&cfg).await;
    let running = consume(&cfg, &db.pool, fast_retries());
    for n in 1..=5 {
        let mut tx = db.pool.begin().await.unwrap();
        writer::append(&mut tx, &event("acme", n, "through TLS"))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    until_delivered(
        &db.pool,
        5,
        "five events delivered",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(stats.records_acked.load(Ordering::Relaxed), 5);
    let state = sim.account("acme");
    assert_eq!(state.items.len(), 1, "{state:?}");
    assert_eq!(
        state.prices[0].amount_minor, 5,
        "the last of the five, in order"
    );
    running.stop().await;
    relay_stop.cancel();
    relay_task.await.unwrap().unwrap();
    sim_stop.cancel();
    db.drop().await;
}
