//! Device tokens, as devices make and present them.
//!
//! Every device has two keys (primary and secondary) of [`KEY_LEN`] random
//! bytes, shown to people as standard base64 with padding ([`encode_key`],
//! [`decode_key`]). A device proves who it is with a token it makes itself
//! from one of its keys:
//!
//! ```text
//! trb1.<expires_at>.<signature>
//! expires_at = seconds since the Unix epoch, in decimal, without sign or leading zeros
//! signature  = base64url without padding of
//!              HMAC-SHA256(key, "trb1\n" + device_id + "\n" + expires_at)
//! ```
//!
//! The token is valid until `expires_at`. Either of the device's keys may
//! sign it, so a key is rotated by moving the device to the other slot first.
//! [`sign`] makes a token, [`parse`] takes one apart, [`verify`] checks a
//! signature in constant time.
//!
//! ```
//! use tributary_registry::token;
//!
//! let key: Vec<u8> = (0u8..32).collect();
//! let text = token::sign("sensor-1", &key, 1_767_225_600);
//! let (expires_at, signature) = token::parse(&text).unwrap();
//! assert_eq!(expires_at, 1_767_225_600);
//! assert!(token::verify("sensor-1", &key, expires_at, &signature));
//! assert!(!token::verify("sensor-2", &key, expires_at, &signature));
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::{Error, Result};

/// The scheme's name: the token's first field and the first line of what
/// is signed.
pub const VERSION: &str = "trb1";

/// Length of a device key, in bytes.
pub const KEY_LEN: usize = 32;

/// Length of a signature (HMAC-SHA256), in bytes.
pub const SIGNATURE_LEN: usize = 32;

/// The longest token [`parse`] looks at, in bytes. Real tokens are about 60.
pub const MAX_TOKEN_LEN: usize = 512;

/// A key as shown to people: standard base64 with padding.
pub fn encode_key(key: &[u8]) -> String {
    STANDARD.encode(key)
}

/// Reads a key in the form [`encode_key`] writes. The reason given on
/// failure never quotes the input, which may be a secret.
pub fn decode_key(text: &str) -> Result<Vec<u8>, String> {
    let key = STANDARD.decode(text).map_err(|_| {
        format!(
            "a device key is standard base64 with padding (A-Z, a-z, 0-9, '+', '/', '='); \
             this one ({} characters) is not",
            text.len()
        )
    })?;
    if key.len() != KEY_LEN {
        return Err(format!(
            "a device key is {KEY_LEN} bytes; this one decodes to {}",
            key.len()
        ));
    }
    Ok(key)
}

/// The token for `device_id`, signed with `key`, valid until `expires_at`
/// (seconds since the Unix epoch; [`parse`] accepts only values from 0 on).
pub fn sign(device_id: &str, key: &[u8], expires_at: i64) -> String {
    let tag = hmac::sign(&hmac_key(key), &message(device_id, expires_at));
    format!(
        "{VERSION}.{expires_at}.{}",
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    )
}

/// Takes a token apart into its expiry (seconds since the Unix epoch) and
/// its signature bytes, or says what is wrong with it. Checks only the form;
/// [`verify`] checks the signature.
pub fn parse(token: &str) -> Result<(i64, Vec<u8>), String> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "the token is {} bytes long; at most {MAX_TOKEN_LEN} are allowed",
            token.len()
        ));
    }
    let shape = || format!("a token has the form {VERSION}.<expires_at>.<signature>");
    let rest = token
        .strip_prefix(VERSION)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(|| format!("{}; this one does not start with '{VERSION}.'", shape()))?;
    let (expires, signature) = rest
        .split_once('.')
        .ok_or_else(|| format!("{}; this one has no second '.'", shape()))?;
    let expires_at = parse_seconds(expires).ok_or_else(|| {
        "the token's expires_at is not seconds since the Unix epoch in decimal (digits only, \
         no leading zeros)"
            .to_string()
    })?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .ok()
        .filter(|s| s.len() == SIGNATURE_LEN)
        .ok_or_else(|| {
            format!(
                "the token's signature is not {SIGNATURE_LEN} bytes in base64url without padding \
                 (43 characters of A-Z, a-z, 0-9, '-', '_')"
            )
        })?;
    Ok((expires_at, signature))
}

/// True if `signature` is `key`'s signature of `device_id` and
/// `expires_at`. Runs in constant time with respect to the signature.
pub fn verify(device_id: &str, key: &[u8], expires_at: i64, signature: &[u8]) -> bool {
    hmac::verify(&hmac_key(key), &message(device_id, expires_at), signature).is_ok()
}

/// A fresh key from the operating system's random generator.
pub(crate) fn generate_key(rng: &SystemRandom) -> Result<[u8; KEY_LEN]> {
    let mut key = [0u8; KEY_LEN];
    rng.fill(&mut key)
        .map_err(|_| Error::Internal("the system random generator failed".into()))?;
    Ok(key)
}

fn hmac_key(key: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, key)
}

/// What is signed: one string per line, so that no id and expiry can be
/// confused with another (ids cannot contain a newline).
fn message(device_id: &str, expires_at: i64) -> Vec<u8> {
    format!("{VERSION}\n{device_id}\n{expires_at}").into_bytes()
}

/// Decimal digits without sign or leading zeros, so that each expiry has
/// exactly one spelling.
fn parse_seconds(s: &str) -> Option<i64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector_key() -> Vec<u8> {
        (0u8..32).collect()
    }

    /// The published test vector (docs/security.md): device makers check
    /// their own implementation against it.
    #[test]
    fn test_vector() {
        let token = sign("sensor-1", &vector_key(), 1_767_225_600);
        assert_eq!(
            token,
            "trb1.1767225600.Tl0OYWa7mRgQ5blsrf7TEvpTvGBBfhjHw1Aan1ciTio"
        );
        assert_eq!(
            encode_key(&vector_key()),
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
        );
    }

    #[test]
    fn sign_parse_verify_round_trip() {
        let key = vector_key();
        let token = sign("plant.3:line_2", &key, 0);
        assert!(token.starts_with("trb1.0."), "{token}");
        let (exp, sig) = parse(&token).unwrap();
        assert_eq!(exp, 0);
        assert!(verify("plant.3:line_2", &key, exp, &sig));
        assert!(!verify("plant.3:line_2", &key, 1, &sig));
        assert!(!verify("plant.3:line_3", &key, 0, &sig));
        let mut other = key.clone();
        other[0] ^= 1;
        assert!(!verify("plant.3:line_2", &other, 0, &sig));
        let big = sign("d", &key, i64::MAX);
        assert_eq!(parse(&big).unwrap().0, i64::MAX);
    }

    #[test]
    fn keys_round_trip_and_bad_keys_are_explained() {
        let key = vector_key();
        assert_eq!(decode_key(&encode_key(&key)).unwrap(), key);
        let short = decode_key(&encode_key(&key[..16])).unwrap_err();
        assert!(short.contains("decodes to 16"), "{short}");
        let unpadded = encode_key(&key);
        let unpadded = unpadded.trim_end_matches('=');
        let err = decode_key(unpadded).unwrap_err();
        assert!(err.contains("with padding"), "{err}");
        // A url-safe key, or anything else, is refused without being quoted.
        let secretish = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh-_";
        let err = decode_key(secretish).unwrap_err();
        assert!(!err.contains(secretish), "{err}");
        assert!(decode_key("").is_err());
    }

    #[test]
    fn malformed_tokens_are_explained() {
        let good = sign("d", &vector_key(), 1_767_225_600);
        let sig = good.rsplit('.').next().unwrap();
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "does not start with 'trb1.'"),
            ("trb_abc".into(), "does not start with 'trb1.'"),
            ("trb2.1.x".into(), "does not start with 'trb1.'"),
            ("trb1".into(), "does not start with 'trb1.'"),
            ("trb1.1767225600".into(), "no second '.'"),
            (format!("trb1..{sig}"), "expires_at"),
            (format!("trb1.-1.{sig}"), "expires_at"),
            (format!("trb1.+1.{sig}"), "expires_at"),
            (format!("trb1.01.{sig}"), "expires_at"),
            (format!("trb1.1e9.{sig}"), "expires_at"),
            (format!("trb1.99999999999999999999.{sig}"), "expires_at"),
            ("trb1.1.".into(), "signature"),
            (format!("trb1.1.{sig}="), "signature"),
            (format!("trb1.1.{sig}.x"), "signature"),
            (format!("trb1.1.{}", &sig[..42]), "signature"),
            (format!("trb1.1.{sig}AAAA"), "signature"),
            (
                format!("trb1.1.{}", sig.replace(['-', '_'], "+")),
                "signature",
            ),
            ("trb1.1.é".into(), "signature"),
            (format!("trb1.1.{}", "A".repeat(600)), "at most 512"),
        ];
        for (token, want) in cases {
            let err = parse(&token).unwrap_err();
            assert!(err.contains(want), "{token:?}: {err}");
        }
    }

    #[test]
    fn parse_never_panics_on_odd_input() {
        let inputs = [
            "trb1.",
            "trb1..",
            "trb1...",
            ".",
            "trb1.\u{0}.\u{0}",
            "trb1.1.\u{ffff}",
            "trb1.٣.AAAA",
        ];
        for input in inputs {
            assert!(parse(input).is_err(), "{input:?}");
        }
        // Every prefix of a good token (cut on char boundaries) is refused.
        let good = sign("d", &vector_key(), 5);
        for end in 0..good.len() {
            assert!(parse(&good[..end]).is_err(), "{}", &good[..end]);
        }
        assert!(parse(&good).is_ok());
    }
}
