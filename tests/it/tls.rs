//! TLS to Postgres against the stack's cluster (`ssl=on`, a certificate for `localhost` signed
//! by the stack's own authority, `FERRY_TEST_PG_CA`): sqlx's connections and the relay's
//! streaming replication connection, with `sslmode` as libpq means it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry::outbox::writer;
use ferry::relay::replication::{ReplicationConnection, ReplicationError, Target};
use sqlx::ConnectOptions as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::relay::{event, start_relay};
use crate::support::{TestDb, config, fresh_topic, read_all, wait_for};

fn ca() -> String {
    std::env::var("FERRY_TEST_PG_CA").expect("FERRY_TEST_PG_CA: run under `scripts/stack env`")
}

/// The test database's URL, at `host`, with `params` added.
fn url_at(db: &TestDb, host: &str, params: &str) -> String {
    let base = db.url.split('?').next().unwrap();
    let at = base.replacen("127.0.0.1", host, 1);
    format!("{at}?{params}")
}

/// Whether the session behind `url` is encrypted, as the server sees it.
async fn encrypted(url: &str) -> Result<bool, sqlx::Error> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let mut conn = options.connect().await?;
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
}

/// `verify-full` connects in TLS to the name the certificate carries, and refuses a server
/// whose certificate another authority signed or that names another host. Guarantee: Ferry talks to the database it was told to, encrypted.
/// Inputs tried: the stack's CA, an unrelated CA, the right certificate reached by address.
#[tokio::test]
async fn sqlx_connections_verify_the_server_as_sslmode_says() {
    let db = TestDb::empty().await;
    let ca = ca();
    let other = std::env::var("FERRY_TEST_PG_OTHER_CA").unwrap();
    let full = format!("sslmode=verify-full&sslrootcert={ca}");
    assert!(encrypted(&url_at(&db, "localhost", &full)).await.unwrap());

    let wrong_ca = format!("sslmode=verify-full&sslrootcert={other}");
    let err = encrypted(&url_at(&db, "localhost", &wrong_ca))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("certificate"),
        "a clear refusal: {err}"
    );

    let err = encrypted(&url_at(&db, "127.0.0.1", &full))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("certificate"),
        "a clear refusal: {err}"
    );
    // verify-ca by address: libpq connects (the chain is checked, not the name). sqlx 0.8 with
    // rustls >= 0.23.24 checks the name too (transact-rs/sqlx#3793, fixed after 0.8.6): stricter,
    // never weaker. Either way the session is encrypted or refused for the name, nothing else.
    let ca_only = format!("sslmode=verify-ca&sslrootcert={ca}");
    match encrypted(&url_at(&db, "127.0.0.1", &ca_only)).await {
        Ok(tls) => assert!(tls, "verify-ca is encrypted"),
        Err(e) => assert!(e.to_string().contains("not valid for name"), "{e}"),
    }
    db.drop().await;
}

/// The replication connection: in TLS under `verify-full`, refused with a clear error under a
/// wrong authority or host name. Guarantee: the relay's stream is encrypted and reaches the
/// database it was told to. Inputs tried: as the sqlx test.
#[tokio::test]
async fn the_replication_connection_verifies_the_server_as_sslmode_says() {
    let db = TestDb::empty().await;
    let ca = ca();
    let other = std::env::var("FERRY_TEST_PG_OTHER_CA").unwrap();
    let connect = |url: String| async move {
        let target = Target::from_url(&url).unwrap();
        ReplicationConnection::connect(&target, "ferry-tls-test")
            .await
            .map(drop)
    };
    connect(url_at(
        &db,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .expect("verify-full with the stack's CA");
    connect(url_at(
        &db,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await
    .expect("verify-ca by address");
    for (what, url) in [
        (
            "an unrelated CA",
            url_at(
                &db,
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={other}"),
            ),
        ),
        (
            "another host name",
            url_at(
                &db,
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
        ),
    ] {
        match connect(url).await {
            Err(e @ ReplicationError::Tls(_)) => {
                assert!(!e.is_retryable(), "{what}: an operator must fix it");
                assert!(e.to_string().contains("certificate"), "{what}: {e}");
            }
            other => panic!("{what}: expected a TLS refusal, got {other:?}"),
        }
    }
    db.drop().await;
}

/// A server that answers the TLS request with "no": what arrived after that request, until
/// the client hung up (or a second passed).
async fn a_server_without_tls() -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 8];
        socket.read_exact(&mut request).await.unwrap();
        assert_eq!(
            request,
            [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
            "a TLS request first"
        );
        socket.write_all(b"N").await.unwrap();
        let mut after = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.read_to_end(&mut after)).await;
        after
    });
    (port, task)
}

/// `require` never falls back to plaintext: against a server without TLS, both kinds of
/// connection give up before sending a byte of the login; `prefer` does fall back. Guarantee:
/// no credential or data crosses the network unencrypted when TLS is required. Input tried: a
/// server that answers the TLS request with `N`.
#[tokio::test]
async fn require_never_falls_back_to_plaintext() {
    let (port, server) = a_server_without_tls().await;
    let url = format!("postgres://relay:secret@127.0.0.1:{port}/shop?sslmode=require");
    let target = Target::from_url(&url).unwrap();
    match ReplicationConnection::connect(&target, "ferry-tls-test").await {
        Err(e @ ReplicationError::Tls(_)) => {
            assert!(e.to_string().contains("does not offer TLS"), "{e}")
        }
        other => panic!("expected a TLS refusal, got {:?}", other.map(drop)),
    }
    assert!(
        server.await.unwrap().is_empty(),
        "nothing after the TLS request"
    );

    let (port, server) = a_server_without_tls().await;
    let url = format!("postgres://relay:secret@127.0.0.1:{port}/shop?sslmode=require");
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let err = options.connect().await.map(drop).unwrap_err();
    assert!(
        server.await.unwrap().is_empty(),
        "sqlx sent nothing after the TLS request: {err}"
    );

    let (port, server) = a_server_without_tls().await;
    let url = format!("postgres://relay:secret@127.0.0.1:{port}/shop?sslmode=prefer");
    let target = Target::from_url(&url).unwrap();
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        ReplicationConnection::connect(&target, "ferry-tls-test"),
    )
    .await;
    let startup = server.await.unwrap();
    assert!(
        startup.windows(5).any(|w| w == b"relay"),
        "prefer logs in in plaintext when the server has no TLS"
    );
}

/// The relay streams the outbox over a `verify-full` connection (its pool and its replication
/// stream alike), and the server sees the stream's session encrypted. Guarantee: the relay
/// runs against a database that requires TLS, losing nothing.
#[tokio::test(flavor = "multi_thread")]
async fn the_relay_streams_over_tls() {
    let db = TestDb::migrated().await;
    let kafka = fresh_topic(2).await;
    let mut cfg = config(&db, &kafka);
    cfg.database.url = url_at(
        &db,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca()),
    );
    let (stop, task, stats) = start_relay(&cfg).await;
    for n in 1..=5 {
        let mut tx = db.pool.begin().await.unwrap();
        writer::append(&mut tx, &event("acme", n, "over TLS"))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    wait_for(
        "five records acknowledged",
        Duration::from_secs(30),
        || async { (stats.records_acked.load(Ordering::Relaxed) >= 5).then_some(()) },
    )
    .await;
    assert_eq!(read_all(&kafka).await.len(), 5);
    let stream_encrypted: bool = sqlx::query_scalar(
        "SELECT s.ssl FROM pg_replication_slots r JOIN pg_stat_ssl s ON s.pid = r.active_pid \
         WHERE r.database = current_database()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(stream_encrypted, "the walsender's session is TLS");
    stop.cancel();
    task.await.unwrap().unwrap();
    db.drop().await;
}
