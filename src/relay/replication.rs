//! A client for PostgreSQL's streaming replication protocol, logical flavour: just what the
//! relay needs to hold a replication slot open and be pushed each transaction as it commits.
//!
//! Why by hand: sqlx speaks only the ordinary query protocol. Through it, every peek of a slot
//! starts a new decoding session at the slot's `restart_lsn`, which PostgreSQL 15 moves only
//! when it logs a snapshot of running transactions (every 15 s on a busy server): at 1,000
//! events/s each peek decodes megabytes of WAL again and latency grows to seconds. A streaming
//! session decodes each WAL record once, and the server sends a transaction the moment it
//! commits.
//!
//! The framing and the authentication arithmetic are pure functions with unit tests; the
//! [`ReplicationConnection`] at the bottom is the only part that does I/O. References: the
//! PostgreSQL documentation's "Frontend/Backend Protocol" chapter (message formats, streaming
//! replication protocol) and RFC 5802 / RFC 7677 (SCRAM-SHA-256).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use sqlx::postgres::PgConnectOptions;

use super::tls::TlsSettings;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::lsn::Lsn;

/// Why the replication connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The socket failed.
    #[error("replication connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered with an error.
    #[error("postgres replication error {code}: {message}")]
    Server {
        /// The SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server sent something this client does not expect at this point.
    #[error("unexpected replication protocol message: {0}")]
    Unexpected(String),
    /// The server asked for an authentication method this client does not speak.
    #[error("the server asks for authentication method {0}, which the relay does not support")]
    UnsupportedAuth(String),
    /// The server asked for a password and none is configured.
    #[error("the server asks for a password and database.url has none (nor PGPASSWORD)")]
    NoPassword,
    /// The server's SCRAM proof is wrong: it does not know the password, so it is not the
    /// server we meant to talk to.
    #[error("the server's SCRAM signature does not verify")]
    ServerSignature,
    /// The connection settings cannot be used for a replication connection.
    #[error("{0}")]
    Settings(String),
    /// The server closed the stream.
    #[error("the server ended the replication stream")]
    Closed,
    /// TLS could not be had as `sslmode` requires: the server does not offer it, or its
    /// certificate is not trusted.
    #[error("TLS: {0}")]
    Tls(String),
}

impl ReplicationError {
    /// Whether trying again later can help: not for a rejected login or a missing privilege
    /// (an operator must fix those), nor for settings this client cannot use.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplicationError::Server { code, .. } => !(code.starts_with("28") || code == "42501"),
            ReplicationError::UnsupportedAuth(_)
            | ReplicationError::NoPassword
            | ReplicationError::ServerSignature
            | ReplicationError::Settings(_)
            | ReplicationError::Tls(_) => false,
            ReplicationError::Io(_)
            | ReplicationError::Unexpected(_)
            | ReplicationError::Closed => true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Framing (pure)
// ---------------------------------------------------------------------------------------------

/// The startup packet: protocol 3.0 and the given parameters.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for (name, value) in params {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// A frontend message: its type byte, its length, its body.
pub fn frontend_message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A simple query.
pub fn query_message(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    frontend_message(b'Q', &body)
}

/// Takes one whole backend message (type byte and body) off the front of `buf`, if one is
/// there; `None` until enough bytes have arrived. A length below the header's own is an error:
/// waiting for more bytes would never end.
pub fn take_message(
    buf: &mut Vec<u8>,
    start: &mut usize,
) -> Result<Option<(u8, Vec<u8>)>, ReplicationError> {
    let available = &buf[*start..];
    if available.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([available[1], available[2], available[3], available[4]]);
    let len = match usize::try_from(len) {
        Ok(len) if len >= 4 => len,
        _ => {
            return Err(ReplicationError::Unexpected(format!(
                "a message of type {:?} with length {len}",
                available[0] as char
            )));
        }
    };
    if available.len() < 1 + len {
        return Ok(None);
    }
    let tag = available[0];
    let body = available[5..1 + len].to_vec();
    *start += 1 + len;
    // Compact now and then, not on every message: the buffer holds many small messages.
    if *start > 1 << 16 && *start * 2 > buf.len() {
        buf.drain(..*start);
        *start = 0;
    }
    Ok(Some((tag, body)))
}

/// An `ErrorResponse` (or `NoticeResponse`) body as its SQLSTATE and message.
pub fn parse_error(body: &[u8]) -> ReplicationError {
    let (mut code, mut message) = (String::new(), String::new());
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    ReplicationError::Server { code, message }
}

/// A message of the replication stream (the payload of a `CopyData`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMessage {
    /// WAL data: here one pgoutput message.
    XLogData {
        /// Where this data starts in the WAL.
        start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The output plugin's message.
        data: Vec<u8>,
    },
    /// The server's keepalive.
    Keepalive {
        /// How far the server has sent: every transaction that committed before this has
        /// already been sent.
        wal_end: Lsn,
        /// The server asks for a status update at once (it will drop the connection otherwise).
        reply_requested: bool,
    },
}

/// Reads a `CopyData` payload of the replication stream.
pub fn parse_stream_message(payload: &[u8]) -> Result<StreamMessage, ReplicationError> {
    let u64_at = |at: usize| -> Result<u64, ReplicationError> {
        payload
            .get(at..at + 8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("eight bytes")))
            .ok_or_else(|| ReplicationError::Unexpected("a short replication message".into()))
    };
    match payload.first() {
        Some(b'w') => {
            let data = payload
                .get(25..)
                .ok_or_else(|| ReplicationError::Unexpected("a short XLogData".into()))?;
            Ok(StreamMessage::XLogData {
                start: Lsn(u64_at(1)?),
                wal_end: Lsn(u64_at(9)?),
                data: data.to_vec(),
            })
        }
        Some(b'k') => Ok(StreamMessage::Keepalive {
            wal_end: Lsn(u64_at(1)?),
            reply_requested: payload.get(17).copied().unwrap_or(0) == 1,
        }),
        Some(&other) => Err(ReplicationError::Unexpected(format!(
            "replication message of type {:?}",
            other as char
        ))),
        None => Err(ReplicationError::Unexpected(
            "an empty replication message".into(),
        )),
    }
}

/// Microseconds since 2000-01-01, PostgreSQL's epoch.
fn pg_timestamp(now: SystemTime) -> i64 {
    const PG_EPOCH_FROM_UNIX: u64 = 946_684_800;
    let since_unix = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    since_unix.as_micros() as i64 - (PG_EPOCH_FROM_UNIX as i64) * 1_000_000
}

/// A standby status update (`CopyData` of `'r'`): `durable` written, flushed and applied.
/// The server moves the slot's confirmed position to it: only what the broker acknowledged.
pub fn standby_status(durable: Lsn, now: SystemTime) -> Vec<u8> {
    let mut payload = vec![b'r'];
    for _ in 0..3 {
        payload.extend_from_slice(&durable.0.to_be_bytes());
    }
    payload.extend_from_slice(&pg_timestamp(now).to_be_bytes());
    payload.push(0);
    frontend_message(b'd', &payload)
}

/// The `START_REPLICATION` command for a slot, from its confirmed position (`0/0` asks the
/// server to start where the slot is).
pub fn start_replication_command(slot: &str, publication: &str) -> String {
    // Both are validated identifiers (config), so quoting is for safety, not for escaping.
    format!(
        "START_REPLICATION SLOT \"{}\" LOGICAL 0/0 (proto_version '1', publication_names '{}')",
        slot.replace('"', "\"\""),
        publication.replace('\'', "''")
    )
}

// ---------------------------------------------------------------------------------------------
// Authentication (pure)
// ---------------------------------------------------------------------------------------------

/// The body of an MD5 `PasswordMessage`: `md5` + md5(md5(password + user) + salt), in hex.
pub fn md5_password(user: &str, password: &str, salt: [u8; 4]) -> Vec<u8> {
    let inner = format!(
        "{:x}",
        md5::Md5::digest(format!("{password}{user}").as_bytes())
    );
    let mut outer = md5::Md5::new();
    outer.update(inner.as_bytes());
    outer.update(salt);
    let mut out = format!("md5{:x}", outer.finalize()).into_bytes();
    out.push(0);
    out
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any size");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The client side of one SCRAM-SHA-256 exchange (no channel binding).
#[derive(Debug)]
pub struct Scram {
    password: String,
    client_first_bare: String,
    nonce: String,
    server_signature: Option<[u8; 32]>,
}

impl Scram {
    /// Starts an exchange. PostgreSQL takes the user from the startup packet, so `user` may be
    /// empty; `nonce` must be fresh and random for each exchange.
    pub fn new(user: &str, password: &str, nonce: &str) -> Self {
        // SASLprep, as the server does; a password it rejects is used as it is (so does the
        // server).
        let password = stringprep::saslprep(password)
            .map(|p| p.into_owned())
            .unwrap_or_else(|_| password.to_owned());
        Scram {
            password,
            client_first_bare: format!("n={user},r={nonce}"),
            nonce: nonce.to_owned(),
            server_signature: None,
        }
    }

    /// The client-first-message.
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// The client-final-message for the server-first-message.
    pub fn client_final(&mut self, server_first: &str) -> Result<String, ReplicationError> {
        let bad = |why: &str| ReplicationError::Unexpected(format!("SCRAM server-first: {why}"));
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for part in server_first.split(',') {
            match part.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(BASE64.decode(v).map_err(|_| bad("salt"))?),
                Some(("i", v)) => iterations = Some(v.parse::<u32>().map_err(|_| bad("i"))?),
                _ => {}
            }
        }
        let nonce = nonce.ok_or_else(|| bad("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(bad("the nonce is not ours"));
        }
        let salt = salt.ok_or_else(|| bad("no salt"))?;
        let iterations = iterations.filter(|&i| i > 0).ok_or_else(|| bad("no i"))?;

        // Hi(): PBKDF2 with HMAC-SHA-256, one block.
        let mut block = salt.clone();
        block.extend_from_slice(&1u32.to_be_bytes());
        let mut u = hmac(self.password.as_bytes(), &block);
        let mut salted = u;
        for _ in 1..iterations {
            u = hmac(self.password.as_bytes(), &u);
            for (s, x) in salted.iter_mut().zip(u) {
                *s ^= x;
            }
        }
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        self.server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)))
    }

    /// Checks the server-final-message: the server proves it knows the password too.
    pub fn verify_server(&self, server_final: &str) -> Result<(), ReplicationError> {
        let expected = self
            .server_signature
            .ok_or_else(|| ReplicationError::Unexpected("SCRAM final before first".into()))?;
        let given = server_final
            .strip_prefix("v=")
            .and_then(|v| BASE64.decode(v.trim_end_matches('\0')).ok());
        match given {
            Some(sig) if sig == expected => Ok(()),
            _ => Err(ReplicationError::ServerSignature),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Where to connect
// ---------------------------------------------------------------------------------------------

/// Where and as whom the replication connection logs in: the relay's `database.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// A TCP host, or `None` for a Unix socket.
    pub host: Option<String>,
    /// The Unix socket's path, when that is the way in.
    pub socket: Option<PathBuf>,
    /// The port (also the socket file's suffix).
    pub port: u16,
    /// The role (needs `REPLICATION`, or superuser).
    pub user: String,
    /// Its password, if the server asks for one.
    pub password: Option<String>,
    /// The database whose slot is streamed.
    pub database: String,
    /// What `sslmode` and `sslrootcert` ask of TLS (over TCP; a Unix socket is local).
    pub tls: TlsSettings,
}

impl Target {
    /// Reads the target from the database URL the rest of Ferry uses, `sslmode` and
    /// `sslrootcert` included (else `PGSSLMODE` and `PGSSLROOTCERT`, as libpq).
    pub fn from_url(url: &str) -> Result<Target, ReplicationError> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| ReplicationError::Settings(format!("database.url: {e}")))?;
        let parsed = reqwest::Url::parse(url).ok();
        let password = parsed
            .as_ref()
            .and_then(|u| u.password().map(percent_decode))
            .or_else(|| std::env::var("PGPASSWORD").ok());
        let root_cert = parsed
            .as_ref()
            .and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == "sslrootcert")
                    .map(|(_, v)| v.into_owned())
            })
            .or_else(|| std::env::var("PGSSLROOTCERT").ok())
            .map(PathBuf::from);
        let tls = TlsSettings {
            mode: options.get_ssl_mode().into(),
            root_cert,
        };
        let socket = options.get_socket().cloned().or_else(|| {
            let host = options.get_host();
            host.starts_with('/').then(|| PathBuf::from(host))
        });
        let port = options.get_port();
        Ok(Target {
            host: socket.is_none().then(|| options.get_host().to_owned()),
            socket: socket.map(|dir| {
                if dir.is_dir() || !dir.to_string_lossy().contains(".s.PGSQL.") {
                    dir.join(format!(".s.PGSQL.{port}"))
                } else {
                    dir
                }
            }),
            port,
            user: options.get_username().to_owned(),
            password,
            database: options
                .get_database()
                .unwrap_or(options.get_username())
                .to_owned(),
            tls,
        })
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The connection (I/O)
// ---------------------------------------------------------------------------------------------

enum Transport {
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
    Unix(tokio::net::UnixStream),
}

/// The first message of a connection that asks for TLS (PostgreSQL's `SSLRequest`).
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A TCP connection to `host`, in TLS when `tls` asks for it and the server offers it; refused
/// (before anything of the login is sent) when `tls` requires it and the server does not.
async fn tcp_transport(
    host: &str,
    port: u16,
    tls: &TlsSettings,
) -> Result<Transport, ReplicationError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    if !tls.asks() {
        return Ok(Transport::Tcp(stream));
    }
    let config = tls.client_config().map_err(ReplicationError::Tls)?;
    stream.write_all(&SSL_REQUEST).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = super::tls::server_name(host).map_err(ReplicationError::Tls)?;
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let stream = connector.connect(name, stream).await.map_err(|e| {
                ReplicationError::Tls(format!("{host}:{port} (sslmode={}): {e}", tls.mode))
            })?;
            Ok(Transport::Tls(Box::new(stream)))
        }
        b'N' if !tls.requires() => Ok(Transport::Tcp(stream)),
        b'N' => Err(ReplicationError::Tls(format!(
            "{host}:{port} does not offer TLS, and sslmode={} refuses plaintext",
            tls.mode
        ))),
        other => Err(ReplicationError::Unexpected(format!(
            "answer {:?} to the TLS request",
            other as char
        ))),
    }
}

/// A logical replication connection: logged in, then streaming one slot.
pub struct ReplicationConnection {
    transport: Transport,
    buf: Vec<u8>,
    start: usize,
}

impl ReplicationConnection {
    /// Connects and logs in (trust, password, MD5 or SCRAM-SHA-256). Values decoded from the
    /// slot are the text output of this session's settings, so the ones the row parser relies
    /// on are pinned here, in the startup packet.
    pub async fn connect(
        target: &Target,
        application_name: &str,
    ) -> Result<Self, ReplicationError> {
        let transport = match (&target.socket, &target.host) {
            (Some(path), _) => Transport::Unix(tokio::net::UnixStream::connect(path).await?),
            (None, Some(host)) => tcp_transport(host, target.port, &target.tls).await?,
            (None, None) => {
                return Err(ReplicationError::Settings(
                    "database.url has no host".into(),
                ));
            }
        };
        let mut conn = ReplicationConnection {
            transport,
            buf: Vec::with_capacity(1 << 16),
            start: 0,
        };
        conn.write(&startup_message(&[
            ("user", &target.user),
            ("database", &target.database),
            ("replication", "database"),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
            ("bytea_output", "hex"),
        ]))
        .await?;
        conn.authenticate(target).await?;
        // Parameter statuses and the backend key until the server is ready.
        loop {
            let (tag, body) = conn.read_message().await?;
            match tag {
                b'Z' => return Ok(conn),
                b'E' => return Err(parse_error(&body)),
                b'S' | b'K' | b'N' => {}
                other => {
                    return Err(ReplicationError::Unexpected(format!(
                        "message {:?} while logging in",
                        other as char
                    )));
                }
            }
        }
    }

    async fn authenticate(&mut self, target: &Target) -> Result<(), ReplicationError> {
        let mut scram: Option<Scram> = None;
        let mut server_verified = false;
        loop {
            let (code, body) = self.authentication_request().await?;
            let password = || target.password.clone().ok_or(ReplicationError::NoPassword);
            match code {
                // A server that began SCRAM must prove it knows the password before it may
                // say "ok" (libpq insists on the same).
                0 if scram.is_some() && !server_verified => {
                    return Err(ReplicationError::ServerSignature);
                }
                0 => return Ok(()),
                3 => {
                    let mut body = password()?.into_bytes();
                    body.push(0);
                    self.write(&frontend_message(b'p', &body)).await?;
                }
                5 => {
                    let salt: [u8; 4] =
                        body.get(4..8)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| {
                                ReplicationError::Unexpected("an MD5 request without salt".into())
                            })?;
                    let reply = md5_password(&target.user, &password()?, salt);
                    self.write(&frontend_message(b'p', &reply)).await?;
                }
                10 => scram = Some(self.sasl_begin(&body[4..], &password()?).await?),
                11 => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Unexpected("SASL continue before SASL".into())
                    })?;
                    let server_first = String::from_utf8_lossy(&body[4..]).into_owned();
                    let reply = s.client_final(&server_first)?;
                    self.write(&frontend_message(b'p', reply.as_bytes()))
                        .await?;
                }
                12 => {
                    let s = scram.as_ref().ok_or_else(|| {
                        ReplicationError::Unexpected("SASL final before SASL".into())
                    })?;
                    s.verify_server(&String::from_utf8_lossy(&body[4..]))?;
                    server_verified = true;
                }
                other => {
                    return Err(ReplicationError::UnsupportedAuth(format!("code {other}")));
                }
            }
        }
    }

    /// The next authentication request: its code and the whole body (the code included).
    async fn authentication_request(&mut self) -> Result<(i32, Vec<u8>), ReplicationError> {
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'E' => return Err(parse_error(&body)),
                b'N' => continue,
                b'R' => {}
                other => {
                    return Err(ReplicationError::Unexpected(format!(
                        "message {:?} during authentication",
                        other as char
                    )));
                }
            }
            let code = body
                .get(..4)
                .map(|b| i32::from_be_bytes(b.try_into().expect("four bytes")))
                .ok_or_else(|| ReplicationError::Unexpected("a short authentication".into()))?;
            return Ok((code, body));
        }
    }

    /// Answers a SASL request listing `mechanisms` with SCRAM-SHA-256's first message.
    async fn sasl_begin(
        &mut self,
        mechanisms: &[u8],
        password: &str,
    ) -> Result<Scram, ReplicationError> {
        let mechanisms = String::from_utf8_lossy(mechanisms).into_owned();
        if !mechanisms.split('\0').any(|m| m == "SCRAM-SHA-256") {
            return Err(ReplicationError::UnsupportedAuth(format!(
                "SASL ({})",
                mechanisms.trim_end_matches('\0').replace('\0', ", ")
            )));
        }
        let nonce_bytes: Vec<u8> = uuid::Uuid::new_v4()
            .as_bytes()
            .iter()
            .chain(uuid::Uuid::new_v4().as_bytes())
            .copied()
            .collect();
        let scram = Scram::new("", password, &BASE64.encode(nonce_bytes));
        let first = scram.client_first();
        let mut msg = b"SCRAM-SHA-256\0".to_vec();
        msg.extend_from_slice(&(first.len() as i32).to_be_bytes());
        msg.extend_from_slice(first.as_bytes());
        self.write(&frontend_message(b'p', &msg)).await?;
        Ok(scram)
    }

    /// Starts streaming `slot` from its confirmed position, with pgoutput and `publication`.
    pub async fn start(&mut self, slot: &str, publication: &str) -> Result<(), ReplicationError> {
        self.write(&query_message(&start_replication_command(
            slot,
            publication,
        )))
        .await?;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'W' => return Ok(()),
                b'E' => return Err(parse_error(&body)),
                b'N' => {}
                other => {
                    return Err(ReplicationError::Unexpected(format!(
                        "message {:?} in reply to START_REPLICATION",
                        other as char
                    )));
                }
            }
        }
    }

    /// The next message of the stream. Cancel-safe: a partly received message stays in the
    /// buffer for the next call, so this can be one branch of a `select!`.
    pub async fn next(&mut self) -> Result<StreamMessage, ReplicationError> {
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'd' => return parse_stream_message(&body),
                b'E' => return Err(parse_error(&body)),
                b'N' => {}
                // The server ended the stream (a shutdown, the slot dropped).
                b'c' | b'C' | b'Z' => return Err(ReplicationError::Closed),
                other => {
                    return Err(ReplicationError::Unexpected(format!(
                        "message {:?} in the replication stream",
                        other as char
                    )));
                }
            }
        }
    }

    /// Tells the server that everything before `durable` is safe: the slot may move there.
    pub async fn send_status(&mut self, durable: Lsn) -> Result<(), ReplicationError> {
        self.write(&standby_status(durable, SystemTime::now()))
            .await
    }

    /// Ends the stream and the session politely (the server then releases the slot at once).
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        self.write(&frontend_message(b'c', &[])).await?;
        // The server may still send data it had queued; wait (briefly) for its CopyDone.
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Ok((tag, _))) = tokio::time::timeout_at(until, self.read_message()).await {
            if tag == b'Z' || tag == b'E' {
                break;
            }
        }
        self.write(&frontend_message(b'X', &[])).await
    }

    async fn read_message(&mut self) -> Result<(u8, Vec<u8>), ReplicationError> {
        loop {
            if let Some(message) = take_message(&mut self.buf, &mut self.start)? {
                return Ok(message);
            }
            if self.buf.len() == self.buf.capacity() {
                self.buf.reserve(self.buf.capacity().max(1 << 16));
            }
            // `read_buf` is cancel-safe: bytes are either in the buffer or still in the socket.
            let n = match &mut self.transport {
                Transport::Tcp(s) => s.read_buf(&mut self.buf).await?,
                Transport::Tls(s) => s.read_buf(&mut self.buf).await?,
                Transport::Unix(s) => s.read_buf(&mut self.buf).await?,
            };
            if n == 0 {
                return Err(ReplicationError::Closed);
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ReplicationError> {
        match &mut self.transport {
            Transport::Tcp(s) => s.write_all(bytes).await?,
            // TLS buffers what it encrypts: a status update must leave now, not with the next.
            Transport::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await?;
            }
            Transport::Unix(s) => s.write_all(bytes).await?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scram_matches_rfc_7677() {
        // RFC 7677, section 3: user "user", password "pencil".
        let mut s = Scram::new("user", "pencil", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(s.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        assert_eq!(
            s.client_final(server_first).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify_server("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(matches!(
            s.verify_server("v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Err(ReplicationError::ServerSignature)
        ));
    }

    #[test]
    fn scram_refuses_a_nonce_that_is_not_an_extension_of_ours() {
        let mut s = Scram::new("", "pencil", "abc");
        for server_first in [
            "r=xyz123,s=AAAA,i=4096",
            "r=abc,s=AAAA,i=4096",
            "s=AAAA,i=1",
        ] {
            assert!(
                matches!(
                    s.client_final(server_first),
                    Err(ReplicationError::Unexpected(_))
                ),
                "{server_first}"
            );
        }
    }

    #[test]
    fn md5_password_is_what_libpq_sends() {
        // md5(md5("secret" + "alice") + salt), salt 01 02 03 04: computed with Python's hashlib.
        let body = md5_password("alice", "secret", [1, 2, 3, 4]);
        let inner = format!("{:x}", md5::Md5::digest(b"secretalice"));
        let mut outer = inner.into_bytes();
        outer.extend_from_slice(&[1, 2, 3, 4]);
        let expected = format!("md5{:x}\0", md5::Md5::digest(&outer));
        assert_eq!(body, expected.into_bytes());
        assert_eq!(body.len(), 3 + 32 + 1);
    }

    #[test]
    fn messages_are_taken_whole_and_only_when_complete() {
        let mut buf = Vec::new();
        let mut start = 0;
        let msg = frontend_message(b'd', b"hello");
        buf.extend_from_slice(&msg[..4]);
        assert_eq!(
            take_message(&mut buf, &mut start).unwrap(),
            None,
            "header incomplete"
        );
        buf.extend_from_slice(&msg[4..8]);
        assert_eq!(
            take_message(&mut buf, &mut start).unwrap(),
            None,
            "body incomplete"
        );
        buf.extend_from_slice(&msg[8..]);
        buf.extend_from_slice(&frontend_message(b'Z', b"I"));
        assert_eq!(
            take_message(&mut buf, &mut start).unwrap(),
            Some((b'd', b"hello".to_vec()))
        );
        assert_eq!(
            take_message(&mut buf, &mut start).unwrap(),
            Some((b'Z', b"I".to_vec()))
        );
        assert_eq!(take_message(&mut buf, &mut start).unwrap(), None);
        // Inputs tried: lengths below the four bytes of the length itself, and negative.
        for len in [3i32, 0, -1] {
            let mut bad = vec![b'd'];
            bad.extend_from_slice(&len.to_be_bytes());
            assert!(take_message(&mut bad, &mut 0).is_err(), "length {len}");
        }
    }

    #[test]
    fn stream_messages_decode() {
        let mut xlog = vec![b'w'];
        xlog.extend_from_slice(&0x10u64.to_be_bytes());
        xlog.extend_from_slice(&0x20u64.to_be_bytes());
        xlog.extend_from_slice(&0u64.to_be_bytes());
        xlog.extend_from_slice(b"B...");
        assert_eq!(
            parse_stream_message(&xlog).unwrap(),
            StreamMessage::XLogData {
                start: Lsn(0x10),
                wal_end: Lsn(0x20),
                data: b"B...".to_vec()
            }
        );
        let mut keepalive = vec![b'k'];
        keepalive.extend_from_slice(&0x30u64.to_be_bytes());
        keepalive.extend_from_slice(&0u64.to_be_bytes());
        keepalive.push(1);
        assert_eq!(
            parse_stream_message(&keepalive).unwrap(),
            StreamMessage::Keepalive {
                wal_end: Lsn(0x30),
                reply_requested: true
            }
        );
        for bad in [&b""[..], b"w\0\0", b"k\0", b"x123"] {
            assert!(parse_stream_message(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_status_update_reports_the_durable_position_three_times() {
        let at = UNIX_EPOCH + Duration::from_secs(946_684_800 + 1);
        let msg = standby_status(Lsn(0x0102), at);
        assert_eq!(msg[0], b'd');
        assert_eq!(
            i32::from_be_bytes(msg[1..5].try_into().unwrap()),
            4 + 1 + 8 * 4 + 1
        );
        assert_eq!(msg[5], b'r');
        for i in 0..3 {
            let at = 6 + 8 * i;
            assert_eq!(
                u64::from_be_bytes(msg[at..at + 8].try_into().unwrap()),
                0x0102
            );
        }
        assert_eq!(
            i64::from_be_bytes(msg[30..38].try_into().unwrap()),
            1_000_000,
            "one second after PostgreSQL's epoch"
        );
        assert_eq!(msg[38], 0, "no reply requested");
    }

    #[test]
    fn errors_carry_sqlstate_and_message_and_say_whether_to_retry() {
        let body = b"SERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0\0";
        let e = parse_error(body);
        assert!(e.is_retryable());
        assert_eq!(
            e.to_string(),
            "postgres replication error 55006: replication slot \"s\" is active for PID 7"
        );
        let e = parse_error(b"C28P01\0Mpassword authentication failed\0\0");
        assert!(!e.is_retryable(), "a wrong password needs an operator");
        let e = parse_error(b"C42501\0Mmust be superuser or replication role\0\0");
        assert!(!e.is_retryable());
    }

    #[test]
    fn the_target_comes_from_the_database_url() {
        let t = Target::from_url("postgres://relay:p%40ss@db.example:6543/shop").unwrap();
        assert_eq!(t.host.as_deref(), Some("db.example"));
        assert_eq!(t.port, 6543);
        assert_eq!(t.user, "relay");
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        assert_eq!(t.database, "shop");
        assert_eq!(t.socket, None);

        let t = Target::from_url("postgres://relay@localhost/shop?host=/run/postgresql").unwrap();
        assert_eq!(
            t.socket,
            Some(PathBuf::from("/run/postgresql/.s.PGSQL.5432"))
        );
        assert_eq!(t.host, None);

        // TLS settings are read from the URL as libpq reads them.
        let t = Target::from_url(
            "postgres://relay@db.example/shop?sslmode=verify-full&sslrootcert=/etc/ferry/ca.pem",
        )
        .unwrap();
        assert_eq!(t.tls.mode, super::super::tls::SslMode::VerifyFull);
        assert_eq!(t.tls.root_cert, Some(PathBuf::from("/etc/ferry/ca.pem")));
        assert!(t.tls.requires());
    }

    #[test]
    fn the_start_command_names_the_slot_and_the_publication() {
        assert_eq!(
            start_replication_command("ferry_outbox", "ferry_pub"),
            "START_REPLICATION SLOT \"ferry_outbox\" LOGICAL 0/0 (proto_version '1', publication_names 'ferry_pub')"
        );
    }
}
