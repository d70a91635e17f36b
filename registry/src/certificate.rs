//! X.509 client certificates registered to devices.
//!
//! The TLS layer checks that a client certificate chains to a CA the server
//! trusts and is within its validity. The registry then says which device
//! the certificate belongs to: a certificate is registered to one device by
//! its thumbprint (SHA-256 of its DER encoding, lowercase hex), and can be
//! revoked on its own, like AWS IoT's ACTIVE / REVOKED certificates.

use serde::{Deserialize, Serialize};

/// A certificate registered to a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// SHA-256 of the certificate's DER encoding, 64 lowercase hex digits.
    pub thumbprint: String,
    pub device_id: String,
    pub status: CertificateStatus,
    /// The certificate's `notAfter`, milliseconds since the Unix epoch.
    pub not_after: i64,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    /// Milliseconds since the Unix epoch.
    pub updated_at: i64,
}

impl Certificate {
    /// A certificate just registered to `device_id` at `now_ms`.
    pub(crate) fn registered(
        thumbprint: &str,
        device_id: &str,
        not_after: i64,
        now_ms: i64,
    ) -> Self {
        Certificate {
            thumbprint: thumbprint.to_string(),
            device_id: device_id.to_string(),
            status: CertificateStatus::Active,
            not_after,
            created_at: now_ms,
            updated_at: now_ms,
        }
    }
}

/// Whether a registered certificate may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateStatus {
    Active,
    Revoked,
}

impl CertificateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CertificateStatus::Active => "active",
            CertificateStatus::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(CertificateStatus::Active),
            "revoked" => Some(CertificateStatus::Revoked),
            _ => None,
        }
    }
}

/// The thumbprint of a DER-encoded certificate.
pub fn thumbprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = String::with_capacity(64);
    for byte in digest.as_ref() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Checks a thumbprint's form: 64 lowercase hex digits.
pub fn validate_thumbprint(thumbprint: &str) -> crate::Result<()> {
    if thumbprint.len() == 64
        && thumbprint
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(crate::Error::InvalidRequest(
            "a certificate thumbprint is 64 lowercase hex digits (SHA-256 of the DER)".into(),
        ))
    }
}
