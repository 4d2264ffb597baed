//! Who may use the admin API: a bearer token on every route but `/health`, and a `Host` header
//! the server answers to.
//!
//! - **The token** is compared by its SHA-256, in constant time: neither where a guess differs
//!   nor its length shows in the answer's timing. When none is configured, `ferry consume`
//!   generates one at its first start, prints it once, and keeps only its hash in Postgres
//!   (`control.admin_token_sha256`), so every instance accepts the same token and a restart
//!   keeps it.
//! - **The `Host` header** must name the address the API listens on (or one of `admin.hosts`):
//!   a web page in an operator's browser that points a name of its own at 127.0.0.1 (DNS
//!   rebinding) is refused before the token is even looked at.

use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// The admin token, as its SHA-256.
#[derive(Clone, PartialEq, Eq)]
pub struct Token([u8; 32]);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// The token whose secret is `secret`.
    pub fn new(secret: &str) -> Token {
        Token(Sha256::digest(secret.as_bytes()).into())
    }

    /// Whether `given` is the secret, in time independent of where it differs and of its
    /// length.
    pub fn accepts(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        given
            .iter()
            .zip(&self.0)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// The token every instance accepts when none is configured: the one in Postgres, or a new
/// one, stored (by its hash) if no other instance stored one first. Returns the token and,
/// when this call made it, its secret (to print once: it is nowhere else).
pub async fn stored_or_new(pool: &PgPool) -> Result<(Token, Option<String>), sqlx::Error> {
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let fresh = Token::new(&secret);
    // Set only where unset: of two instances starting together, one stores its token and the
    // other reads it back.
    let stored: Vec<u8> = sqlx::query_scalar(
        "UPDATE control SET admin_token_sha256 = coalesce(admin_token_sha256, $1) \
         RETURNING admin_token_sha256",
    )
    .bind(fresh.0.as_slice())
    .fetch_one(pool)
    .await?;
    let stored = Token(stored.try_into().unwrap_or([0; 32]));
    let made = (stored == fresh).then_some(secret);
    Ok((stored, made))
}

/// The `Host` header values the API answers to: the listening address (and its loopback names
/// when it listens on loopback), plus `extra`. Empty when it listens on every interface and no
/// `extra` is configured: then any `Host` is answered (the token still guards every route).
pub fn hosts(addr: std::net::SocketAddr, extra: &[String]) -> Vec<String> {
    let port = addr.port();
    let mut hosts: Vec<String> = extra.to_vec();
    if addr.ip().is_loopback() {
        hosts.extend([
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[::1]:{port}"),
        ]);
    } else if !addr.ip().is_unspecified() {
        hosts.push(addr.to_string());
    }
    hosts
}

/// Whether a request with `host` (its `Host` header) may be answered.
pub fn host_allowed(allowed: &[String], host: Option<&str>) -> bool {
    allowed.is_empty() || host.is_some_and(|h| allowed.iter().any(|a| a.eq_ignore_ascii_case(h)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_accepts_its_secret_only() {
        let token = Token::new("s3cret");
        assert!(token.accepts("s3cret"));
        // Inputs tried: a prefix, a longer string, the empty string, a case change.
        for wrong in ["s3cre", "s3cret!", "", "S3CRET"] {
            assert!(!token.accepts(wrong), "{wrong:?}");
        }
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
    }

    #[test]
    fn hosts_follow_the_listening_address() {
        let loopback = hosts("127.0.0.1:9190".parse().unwrap(), &[]);
        assert!(host_allowed(&loopback, Some("localhost:9190")));
        assert!(host_allowed(&loopback, Some("127.0.0.1:9190")));
        // Inputs tried: a rebinding attacker's name, another port, no Host at all.
        assert!(!host_allowed(&loopback, Some("evil.example:9190")));
        assert!(!host_allowed(&loopback, Some("127.0.0.1:80")));
        assert!(!host_allowed(&loopback, None));
        let pod = hosts("10.1.2.3:9190".parse().unwrap(), &["ferry.svc:9190".into()]);
        assert!(host_allowed(&pod, Some("10.1.2.3:9190")));
        assert!(host_allowed(&pod, Some("ferry.svc:9190")));
        assert!(!host_allowed(&pod, Some("127.0.0.1:9190")));
        let any = hosts("0.0.0.0:9190".parse().unwrap(), &[]);
        assert!(host_allowed(&any, Some("whatever:1")));
    }
}
