//! `/devices/{id}/certificates`: X.509 client certificates registered to a
//! device, by thumbprint (SHA-256 of the DER, lowercase hex).
//!
//! A certificate is issued here by the development CA (the key is shown
//! once and not kept) or made elsewhere and registered from its PEM; either
//! way the gateway accepts it only while it is registered, active and not
//! past its `notAfter`, and only if it chains to a CA the gateway trusts.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use tributary_engine::event::now_millis;
use tributary_registry::{Certificate, CertificateStatus, thumbprint, validate_thumbprint};
use utoipa::ToSchema;

use super::{ApiError, ApiState, Body, ErrorBody, for_path, parse_body};

/// Days an issued certificate lasts unless asked otherwise.
pub const DEFAULT_VALID_DAYS: u32 = 365;
/// The longest validity asked of the development CA.
pub const MAX_VALID_DAYS: u32 = 3650;

/// The body of `POST /devices/{id}/certificates`: issue one, or register
/// one made elsewhere.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AddCertificate {
    /// `true`: the development CA issues a certificate and key.
    issue: Option<bool>,
    /// With `issue`: how long the certificate lasts, 1 to 3650 days
    /// (default 365).
    #[schema(example = 365)]
    valid_days: Option<u32>,
    /// Instead of `issue`: a certificate (PEM) to register. Its `notAfter`
    /// is read from it.
    #[schema(example = "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n")]
    certificate_pem: Option<String>,
}

/// A certificate registered to a device.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CertificateView {
    /// SHA-256 of the certificate's DER, 64 lowercase hex digits.
    #[schema(example = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")]
    thumbprint: String,
    device_id: String,
    status: CertificateStatusView,
    /// The certificate's `notAfter`, milliseconds since the Unix epoch.
    not_after: i64,
    /// Milliseconds since the Unix epoch.
    created_at: i64,
    /// Milliseconds since the Unix epoch.
    updated_at: i64,
}

/// Whether a registered certificate may be used.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum CertificateStatusView {
    Active,
    Revoked,
}

impl From<Certificate> for CertificateView {
    fn from(c: Certificate) -> Self {
        CertificateView {
            thumbprint: c.thumbprint,
            device_id: c.device_id,
            status: match c.status {
                CertificateStatus::Active => CertificateStatusView::Active,
                CertificateStatus::Revoked => CertificateStatusView::Revoked,
            },
            not_after: c.not_after,
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }
}

/// A newly registered certificate; an issued one with its PEM and key,
/// shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct AddedCertificate {
    #[serde(flatten)]
    certificate: CertificateView,
    /// The issued certificate (PEM); absent when one was registered.
    #[serde(skip_serializing_if = "Option::is_none")]
    cert_pem: Option<String>,
    /// The issued certificate's private key (PKCS#8 PEM), shown only now;
    /// absent when one was registered.
    #[serde(skip_serializing_if = "Option::is_none")]
    key_pem: Option<String>,
}

/// Issues a certificate for a device from the development CA, or registers
/// one made elsewhere.
///
/// `{"issue": true, "valid_days": 365}` issues one: the answer holds the
/// certificate and its private key, which is shown only this once.
/// `{"certificate_pem": "..."}` registers an existing certificate; its
/// `notAfter` is read from it.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/certificates",
    tag = "certificates",
    params(("id" = String, Path, description = "The device id")),
    request_body = AddCertificate,
    responses(
        (status = 201, description = "The registered certificate (and, issued, its PEM and key)", body = AddedCertificate),
        (status = 400, description = "`invalid_request`: not JSON of this shape, neither or both of `issue` and `certificate_pem`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such device", body = ErrorBody),
        (status = 409, description = "`conflict`: the certificate is registered already (to this or another device)", body = ErrorBody),
        (status = 422, description = "`invalid_certificate`: not a PEM certificate, unreadable or expired; `invalid_parameter`: `valid_days` out of range", body = ErrorBody),
    )
)]
pub(super) async fn add_certificate(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let request: AddCertificate = parse_body(
        &body,
        "{\"issue\": true, \"valid_days\"?: days} or {\"certificate_pem\": \"...\"}",
    )?;
    // No certificate is made for a device that does not exist.
    state
        .registry
        .get_device(&id)
        .await
        .map_err(for_path(&id))?
        .ok_or_else(|| ApiError::not_found(&id))?;
    let now = now_millis();
    let (print, not_after, cert_pem, key_pem) = match request {
        AddCertificate {
            issue: Some(true),
            valid_days,
            certificate_pem: None,
        } => {
            let days = valid_days.unwrap_or(DEFAULT_VALID_DAYS);
            if !(1..=MAX_VALID_DAYS).contains(&days) {
                return Err(ApiError::invalid_parameter(format!(
                    "valid_days must be from 1 to {MAX_VALID_DAYS}, got {days}"
                )));
            }
            let tls = state.tls.clone();
            let device = id.clone();
            // Key generation and signing take a few milliseconds of CPU.
            let issued = tokio::task::spawn_blocking(move || {
                tributary_ingest::tls::issue_device_certificate(&tls, &device, days)
            })
            .await
            .map_err(|e| ApiError::internal(format!("issuing a certificate failed: {e}")))?
            .map_err(|e| {
                tracing::error!(device = %id, error = %e, "issuing a certificate failed");
                ApiError::internal(format!(
                    "the development CA could not issue a certificate for '{id}': {e}"
                ))
            })?;
            (
                issued.thumbprint,
                issued.not_after_ms,
                Some(issued.cert_pem),
                Some(issued.key_pem),
            )
        }
        AddCertificate {
            issue: None | Some(false),
            valid_days: None,
            certificate_pem: Some(pem),
        } => {
            let (print, not_after) = read_certificate(&pem, now)?;
            (print, not_after, None, None)
        }
        _ => {
            return Err(ApiError::invalid_request(
                "give either {\"issue\": true, \"valid_days\"?: days} or \
                 {\"certificate_pem\": \"...\"}",
            ));
        }
    };
    let certificate = state
        .registry
        .add_certificate(&id, &print, not_after, now)
        .await
        .map_err(for_path(&id))?;
    let added = AddedCertificate {
        certificate: certificate.into(),
        cert_pem,
        key_pem,
    };
    Ok((StatusCode::CREATED, Json(added)).into_response())
}

/// The thumbprint and `notAfter` (ms) of a PEM certificate; refused if it
/// is not one, or expired at `now`.
fn read_certificate(pem: &str, now: i64) -> Result<(String, i64), ApiError> {
    let invalid =
        |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_certificate", m);
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        invalid(format!(
            "certificate_pem holds no PEM certificate (-----BEGIN CERTIFICATE-----): {e}"
        ))
    })?;
    let not_after = der::not_after_ms(&der).ok_or_else(|| {
        invalid("certificate_pem is not an X.509 certificate: its validity cannot be read".into())
    })?;
    if not_after <= now {
        return Err(invalid(format!(
            "the certificate expired at {} (its notAfter)",
            chrono::DateTime::from_timestamp_millis(not_after)
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| not_after.to_string())
        )));
    }
    Ok((thumbprint(&der), not_after))
}

/// A device's certificates.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CertificateList {
    /// Oldest first.
    certificates: Vec<CertificateView>,
}

/// Lists a device's certificates, active and revoked, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/certificates",
    tag = "certificates",
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "The device's certificates", body = CertificateList),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn list_certificates(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<CertificateList>, ApiError> {
    let certificates = state
        .registry
        .list_certificates(&id)
        .await
        .map_err(for_path(&id))?;
    Ok(Json(CertificateList {
        certificates: certificates.into_iter().map(Into::into).collect(),
    }))
}

/// Revokes a device's certificate: the gateway refuses it from now on and
/// closes sessions that use it. No body.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/certificates/{thumbprint}/revoke",
    tag = "certificates",
    params(
        ("id" = String, Path, description = "The device id"),
        ("thumbprint" = String, Path, description = "SHA-256 of the certificate's DER, hex (any case, `:` separators allowed)"),
    ),
    responses(
        (status = 200, description = "The revoked certificate", body = CertificateView),
        (status = 404, description = "`not_found`: no such device, or it has no such certificate", body = ErrorBody),
    )
)]
pub(super) async fn revoke_certificate(
    State(state): State<ApiState>,
    Path((id, print)): Path<(String, String)>,
) -> Result<Json<CertificateView>, ApiError> {
    // Thumbprints are copied from other tools as `AB:CD:...` as often as not.
    let normal: String = print
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if validate_thumbprint(&normal).is_err() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "device '{id}' has no certificate '{print}' (a thumbprint is 64 hex digits, \
                 the SHA-256 of the certificate's DER)"
            ),
        ));
    }
    let certificate = state
        .registry
        .revoke_certificate(&id, &normal, now_millis())
        .await
        .map_err(for_path(&id))?;
    Ok(Json(certificate.into()))
}

/// Just enough DER to read a certificate's `notAfter`, so that registering
/// one needs no X.509 library.
mod der {
    /// One TLV: its tag, its contents, and what follows it.
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, input) = input.split_first()?;
        let (&first, mut input) = input.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return None;
            }
            let (bytes, rest) = input.split_at_checked(n)?;
            input = rest;
            bytes
                .iter()
                .fold(0usize, |len, b| (len << 8) | usize::from(*b))
        };
        let (contents, rest) = input.split_at_checked(len)?;
        Some((tag, contents, rest))
    }

    /// The contents of a SEQUENCE.
    fn sequence(input: &[u8]) -> Option<&[u8]> {
        match element(input)? {
            (0x30, contents, _) => Some(contents),
            _ => None,
        }
    }

    /// The `notAfter` of a DER certificate, milliseconds since the Unix
    /// epoch (RFC 5280 4.1: Certificate, TBSCertificate, Validity).
    pub fn not_after_ms(der: &[u8]) -> Option<i64> {
        let tbs = sequence(sequence(der)?)?;
        let mut rest = tbs;
        // version [0] EXPLICIT, absent for v1.
        if rest.first() == Some(&0xa0) {
            rest = element(rest)?.2;
        }
        // serialNumber, signature, issuer.
        for _ in 0..3 {
            rest = element(rest)?.2;
        }
        let validity = sequence(rest)?;
        let after_not_before = element(validity)?.2;
        let (tag, time, _) = element(after_not_before)?;
        let time = std::str::from_utf8(time).ok()?;
        let (year, rest) = match tag {
            // UTCTime YYMMDDHHMMSSZ: 50-99 are 19xx (RFC 5280 4.1.2.5.1).
            0x17 => {
                let yy: i32 = time.get(..2)?.parse().ok()?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &time[2..])
            }
            // GeneralizedTime YYYYMMDDHHMMSSZ.
            0x18 => (time.get(..4)?.parse().ok()?, &time[4..]),
            _ => return None,
        };
        if rest.len() != 11 || !rest.ends_with('Z') {
            return None;
        }
        let field = |i: usize| -> Option<u32> { rest.get(i..i + 2)?.parse().ok() };
        chrono::NaiveDate::from_ymd_opt(year, field(0)?, field(2)?)?
            .and_hms_opt(field(4)?, field(6)?, field(8)?)
            .map(|t| t.and_utc().timestamp_millis())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn certificate(not_after: (i32, u8, u8)) -> Vec<u8> {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["d1".to_string()]).unwrap();
            params.not_before = rcgen::date_time_ymd(2024, 1, 1);
            params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
            params.self_signed(&key).unwrap().der().to_vec()
        }

        fn ms(y: i32, m: u32, d: u32) -> i64 {
            chrono::NaiveDate::from_ymd_opt(y, m, d)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
                .timestamp_millis()
        }

        #[test]
        fn reads_not_after_in_both_time_forms() {
            // Before 2050 certificates carry UTCTime, from 2050 on GeneralizedTime.
            assert_eq!(
                not_after_ms(&certificate((2031, 5, 17))),
                Some(ms(2031, 5, 17))
            );
            assert_eq!(
                not_after_ms(&certificate((2061, 2, 3))),
                Some(ms(2061, 2, 3))
            );
        }

        #[test]
        fn refuses_what_is_not_a_certificate() {
            let der = certificate((2031, 5, 17));
            for cut in [0, 1, 10, der.len() / 2] {
                assert_eq!(not_after_ms(&der[..cut]), None, "cut at {cut}");
            }
            assert_eq!(not_after_ms(b"\x30\x84\xff\xff\xff\xff"), None);
            assert_eq!(not_after_ms(b"not DER at all"), None);
        }
    }
}
