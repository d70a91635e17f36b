//! Legacy device tokens, from before devices had keys (schema version 1).
//!
//! Such a token is `trb_` followed by 32 random bytes in unpadded base64url,
//! made by the registry. Only its SHA-256 digest is stored. A plain
//! (unsalted, fast) hash is enough here because the token has 256 bits of
//! entropy: there is nothing to brute-force that a slow password hash would
//! protect.
//!
//! No new token of this kind is made; devices created before keys keep
//! working with theirs until their primary key is rotated (see
//! [`crate::Registry::rotate_key`]). Devices made since store an empty
//! digest, which no token matches.

use ring::digest;

/// Every legacy token starts with this, so that leaked tokens are easy to
/// spot in logs and by secret scanners. (Tokens of the current scheme start
/// with [`crate::token::VERSION`] and a dot.)
pub const TOKEN_PREFIX: &str = "trb_";

#[cfg(test)]
const TOKEN_BYTES: usize = 32;

/// Length of a stored token digest.
pub(crate) const DIGEST_LEN: usize = 32;

/// A SHA-256 digest of a token, as stored.
pub(crate) type TokenDigest = [u8; DIGEST_LEN];

/// Makes a fresh token from the operating system's random generator, as
/// schema version 1 did; tests use it to build old databases.
#[cfg(test)]
pub(crate) fn generate_token(rng: &ring::rand::SystemRandom) -> crate::Result<String> {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;

    let mut bytes = [0u8; TOKEN_BYTES];
    rng.fill(&mut bytes)
        .map_err(|_| crate::Error::Internal("the system random generator failed".into()))?;
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + 43);
    token.push_str(TOKEN_PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes, &mut token);
    Ok(token)
}

/// The digest stored in place of the token.
pub(crate) fn digest_token(token: &str) -> TokenDigest {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(d.as_ref());
    out
}

/// Checks a presented token against a stored digest in constant time.
///
/// `stored` is `None` for an unknown device: the token is then checked
/// against a dummy digest so that the work done does not reveal whether the
/// device exists.
pub(crate) fn verify_token(token: &str, stored: Option<&[u8]>) -> bool {
    let presented = digest_token(token);
    let dummy = [0u8; DIGEST_LEN];
    let (expected, known) = match stored {
        Some(s) if s.len() == DIGEST_LEN => (s, true),
        // A wrong-length digest is a corrupt row; refuse, but do the same work.
        Some(_) | None => (&dummy[..], false),
    };
    constant_time_eq(&presented, expected) & known
}

/// Compares two equally long byte strings without branching on their
/// contents. ring's `constant_time::verify_slices_are_equal` would do, but it
/// is deprecated as of ring 0.17.14 ("internal API, will be removed").
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::rand::SystemRandom;

    #[test]
    fn tokens_have_the_documented_shape() {
        let rng = SystemRandom::new();
        let a = generate_token(&rng).unwrap();
        let b = generate_token(&rng).unwrap();
        assert_ne!(a, b);
        let body = a.strip_prefix(TOKEN_PREFIX).unwrap();
        assert_eq!(body.len(), 43, "32 bytes in unpadded base64 are 43 chars");
        assert_eq!(URL_SAFE_NO_PAD.decode(body).unwrap().len(), TOKEN_BYTES);
    }

    #[test]
    fn verify_accepts_only_the_right_token() {
        let rng = SystemRandom::new();
        let token = generate_token(&rng).unwrap();
        let stored = digest_token(&token);
        assert!(verify_token(&token, Some(&stored)));
        assert!(!verify_token("trb_wrong", Some(&stored)));
        assert!(!verify_token(&token, None));
        assert!(!verify_token(&token, Some(&stored[..31])));
        // The dummy digest for unknown devices must not be reachable.
        assert!(!verify_token("", None));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
