//! Signatures as the Standard Webhooks specification writes them, through its own crate
//! (`standardwebhooks`): `webhook-id`, `webhook-timestamp` (Unix seconds) and
//! `webhook-signature`, a space-separated list of `v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">`, one per secret. Two secrets are valid while one is rotated
//! out, so a delivery carries a signature for each and the receiver accepts either.

use standardwebhooks::Webhook;

pub use standardwebhooks::{
    HEADER_WEBHOOK_ID as ID, HEADER_WEBHOOK_SIGNATURE as SIGNATURE,
    HEADER_WEBHOOK_TIMESTAMP as TIMESTAMP,
};

/// A secret or a delivery that cannot be signed or checked.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// The secret is not `whsec_` and base64 of at least 24 bytes.
    #[error("a webhook secret is `whsec_` and the base64 of 24 to 64 random bytes")]
    BadSecret,
    /// The body is not UTF-8 (CloudEvents in JSON always is).
    #[error("the body is not UTF-8")]
    BadBody,
    /// No secret given to sign with.
    #[error("no secret to sign with")]
    NoSecret,
    /// The delivery's signature matches none of the secrets, or its headers are missing, or
    /// its timestamp is more than five minutes off.
    #[error("signature refused: {0}")]
    Refused(String),
}

/// Whether `secret` can sign: `whsec_` and the base64 of 24 to 64 bytes.
pub fn check_secret(secret: &str) -> Result<(), SigningError> {
    use base64::Engine as _;
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or(SigningError::BadSecret)?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| SigningError::BadSecret)?;
    if (24..=64).contains(&key.len()) {
        Ok(())
    } else {
        Err(SigningError::BadSecret)
    }
}

/// A new random secret: `whsec_` and the base64 of 32 bytes.
pub fn new_secret() -> String {
    use base64::Engine as _;
    // Two v4 UUIDs: 244 random bits from the operating system's generator.
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// The `webhook-signature` value of `body`, delivered as message `id` at `timestamp`: one
/// signature per secret, separated by spaces.
pub fn sign(
    secrets: &[&str],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, SigningError> {
    if secrets.is_empty() {
        return Err(SigningError::NoSecret);
    }
    let mut signatures = Vec::with_capacity(secrets.len());
    for secret in secrets {
        check_secret(secret)?;
        let webhook = Webhook::new(secret).map_err(|_| SigningError::BadSecret)?;
        let signature = webhook
            .sign(id, timestamp, body)
            .map_err(|_| SigningError::BadBody)?;
        signatures.push(signature);
    }
    Ok(signatures.join(" "))
}

/// Checks a delivery as a receiver does: its headers name it, its timestamp is within five
/// minutes, and one of its signatures is one of `secrets`'.
pub fn verify(
    secrets: &[&str],
    body: &[u8],
    headers: &axum::http::HeaderMap,
) -> Result<(), SigningError> {
    let mut last = String::from("no secret registered");
    for secret in secrets {
        let webhook = Webhook::new(secret).map_err(|_| SigningError::BadSecret)?;
        match webhook.verify(body, headers) {
            Ok(()) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(SigningError::Refused(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(id: &str, timestamp: i64, signature: &str) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        h.insert(ID, id.parse().unwrap());
        h.insert(TIMESTAMP, timestamp.to_string().parse().unwrap());
        h.insert(SIGNATURE, signature.parse().unwrap());
        h
    }

    #[test]
    fn the_specifications_example_is_signed_as_it_says() {
        // The example of the Standard Webhooks specification (its secret, id, time and body).
        let signature = sign(
            &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn during_a_rotation_either_secret_verifies_and_a_stranger_does_not() {
        let (old, new, stranger) = (new_secret(), new_secret(), new_secret());
        let now = chrono::Utc::now().timestamp();
        let body = br#"{"specversion":"1.0"}"#;
        let signature = sign(&[&new, &old], "evt-1", now, body).unwrap();
        assert_eq!(signature.split(' ').count(), 2);
        let h = headers("evt-1", now, &signature);
        assert!(
            verify(&[&old], body, &h).is_ok(),
            "the tenant still on the old one"
        );
        assert!(
            verify(&[&new], body, &h).is_ok(),
            "the tenant on the new one"
        );
        assert!(verify(&[&stranger], body, &h).is_err());
        // Input tried: the body changed after signing, and a timestamp an hour old.
        assert!(verify(&[&new], br#"{"specversion":"1.1"}"#, &h).is_err());
        let stale = sign(&[&new], "evt-1", now - 3600, body).unwrap();
        assert!(verify(&[&new], body, &headers("evt-1", now - 3600, &stale)).is_err());
    }

    #[test]
    fn a_secret_must_be_whsec_and_enough_random_bytes() {
        assert!(check_secret(&new_secret()).is_ok());
        // Input tried: no prefix, not base64, too short.
        for bad in ["c2VjcmV0c2VjcmV0c2VjcmV0", "whsec_!!!", "whsec_c2hvcnQ="] {
            assert!(check_secret(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            sign(&[], "id", 1, b"{}"),
            Err(SigningError::NoSecret)
        ));
    }
}
