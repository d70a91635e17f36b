//! What the backends share: sealing and checking keys, the reasons
//! authentication gives, and decoding rows read as text.
//!
//! Each backend reads its rows into the `Raw*` structs here (their
//! `from_row` lives with the backend) and leaves every decision that does
//! not touch storage to this module, so that SQLite and PostgreSQL answer
//! alike.

use std::collections::BTreeMap;

use ring::rand::SystemRandom;

use crate::credentials::{TOKEN_PREFIX, verify_token};
use crate::master_key::MasterKey;
use crate::{
    Certificate, CertificateStatus, Device, DevicePage, DeviceStatus, EnrollmentGroup, Error,
    KeySlot, MAX_PAGE, Properties, PropertiesUpdate, Result, Side, Twin, derive_device_key, token,
    validate_device_id,
};

/// The master key and what is sealed with it, with the dummy key that
/// stands in for a missing one.
pub(crate) struct KeyVault {
    rng: SystemRandom,
    master: MasterKey,
    /// A key sealed for no device (the empty id is invalid), opened in place
    /// of a device's missing key, so that authentication does the same work
    /// whether or not the device and its keys exist.
    dummy_sealed: Vec<u8>,
}

impl KeyVault {
    pub(crate) fn new(master: MasterKey, rng: SystemRandom) -> Result<Self> {
        let dummy_key = token::generate_key(&rng)?;
        let dummy_sealed = master.seal(&rng, "", KeySlot::Primary, &dummy_key)?;
        Ok(Self {
            rng,
            master,
            dummy_sealed,
        })
    }

    #[cfg(test)]
    pub(crate) fn master(&self) -> &MasterKey {
        &self.master
    }

    /// Seals `plain` as `id`'s key in `slot`.
    pub(crate) fn seal(&self, id: &str, slot: KeySlot, plain: &[u8]) -> Result<Vec<u8>> {
        self.master.seal(&self.rng, id, slot, plain)
    }

    /// Makes a key and seals it for `id`'s `slot`: (plain, sealed).
    pub(crate) fn new_key(
        &self,
        id: &str,
        slot: KeySlot,
    ) -> Result<([u8; token::KEY_LEN], Vec<u8>)> {
        let key = token::generate_key(&self.rng)?;
        let sealed = self.seal(id, slot, &key)?;
        Ok((key, sealed))
    }

    /// The key in a slot, opened. A sealed key that does not open is a
    /// broken setup (another master key file, a row copied from elsewhere),
    /// not a wrong token, so it is an error of its own.
    pub(crate) fn open_key(&self, id: &str, slot: KeySlot, sealed: &[u8]) -> Result<Vec<u8>> {
        self.master.open(id, slot, sealed).ok_or_else(|| {
            Error::Internal(format!(
                "device '{id}': its stored {} key does not open with this registry's master \
                 key (was the key file replaced, or the row copied from another registry?)",
                slot_name(slot)
            ))
        })
    }

    /// The key to check a signature against, and whether it is real: the
    /// slot's key, or the dummy key (with the same work) when there is none.
    fn key_or_dummy(
        &self,
        id: &str,
        slot: KeySlot,
        sealed: Option<&[u8]>,
    ) -> Result<(Vec<u8>, bool)> {
        match sealed {
            Some(sealed) => Ok((self.open_key(id, slot, sealed)?, true)),
            None => Ok((self.dummy_key(), false)),
        }
    }

    fn dummy_key(&self) -> Vec<u8> {
        self.master
            .open("", KeySlot::Primary, &self.dummy_sealed)
            .unwrap_or_default()
    }

    /// Makes a key and seals it for group `name`'s `slot`: (plain, sealed).
    pub(crate) fn new_group_key(
        &self,
        name: &str,
        slot: KeySlot,
    ) -> Result<([u8; token::KEY_LEN], Vec<u8>)> {
        let key = token::generate_key(&self.rng)?;
        let sealed = self.seal(&group_sealing_id(name), slot, &key)?;
        Ok((key, sealed))
    }

    /// [`Self::key_or_dummy`] for a group's key.
    fn group_key_or_dummy(
        &self,
        name: &str,
        slot: KeySlot,
        sealed: Option<&[u8]>,
    ) -> Result<(Vec<u8>, bool)> {
        let Some(sealed) = sealed else {
            return Ok((self.dummy_key(), false));
        };
        let key = self
            .master
            .open(&group_sealing_id(name), slot, sealed)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "enrollment group '{name}': its stored {} key does not open with this \
                     registry's master key (was the key file replaced, or the row copied from \
                     another registry?)",
                    slot_name(slot)
                ))
            })?;
        Ok((key, true))
    }

    /// Whether `signature` is one of the device's keys' over `id` and
    /// `expires_at`, with the same work whether or not the device, or a
    /// key, exists.
    pub(crate) fn signed_by_device(
        &self,
        id: &str,
        row: Option<&Credentials>,
        expires_at: i64,
        signature: &[u8],
    ) -> Result<bool> {
        let primary = row.and_then(|r| r.primary.as_deref());
        let secondary = row.and_then(|r| r.secondary.as_deref());
        let (primary, has_primary) = self.key_or_dummy(id, KeySlot::Primary, primary)?;
        let (secondary, has_secondary) = self.key_or_dummy(id, KeySlot::Secondary, secondary)?;
        let by_primary = token::verify(id, &primary, expires_at, signature);
        let by_secondary = token::verify(id, &secondary, expires_at, signature);
        Ok((by_primary & has_primary) | (by_secondary & has_secondary))
    }

    /// The device keys group `name` derives for `id`, and whether the token
    /// is signed by one of them; the same work for an unknown group.
    pub(crate) fn signed_by_group(
        &self,
        name: &str,
        id: &str,
        row: Option<&GroupCredentials>,
        expires_at: i64,
        signature: &[u8],
    ) -> Result<(DerivedKeys, bool)> {
        let primary = row.map(|r| &r.primary[..]);
        let secondary = row.map(|r| &r.secondary[..]);
        let (primary, has_primary) = self.group_key_or_dummy(name, KeySlot::Primary, primary)?;
        let (secondary, has_secondary) =
            self.group_key_or_dummy(name, KeySlot::Secondary, secondary)?;
        let keys = DerivedKeys {
            primary: derive_device_key(&primary, id),
            secondary: derive_device_key(&secondary, id),
        };
        let by_primary = token::verify(id, &keys.primary, expires_at, signature);
        let by_secondary = token::verify(id, &keys.secondary, expires_at, signature);
        Ok((
            keys,
            (by_primary & has_primary) | (by_secondary & has_secondary),
        ))
    }
}

/// A token presented to [`crate::Registry::authenticate`], checked for form
/// only.
pub(crate) enum Presented<'a> {
    /// A legacy `trb_` token (see [`crate::credentials`]).
    Legacy(&'a str),
    /// A signed token (see [`token`]), taken apart.
    Signed { expires_at: i64, signature: Vec<u8> },
}

impl<'a> Presented<'a> {
    /// Takes `token` apart, or refuses it with the generic reason. Ids and
    /// tokens of the wrong form are refused straight away: that they are
    /// malformed is no secret, it says nothing about which devices exist.
    pub(crate) fn parse(id: &str, token: &'a str) -> Result<Self> {
        if validate_device_id(id).is_err() || token.len() > token::MAX_TOKEN_LEN {
            return Err(refused_token(id));
        }
        if token.starts_with(TOKEN_PREFIX) {
            return Ok(Presented::Legacy(token));
        }
        let (expires_at, signature) = token::parse(token).map_err(|_| refused_token(id))?;
        Ok(Presented::Signed {
            expires_at,
            signature,
        })
    }
}

impl KeyVault {
    /// The rest of [`crate::Registry::authenticate`] once the device's row
    /// (if any) was read. Up to a verified signature every failure looks
    /// the same, and every check runs (against dummies where something is
    /// missing), so that the work done does not tell whether the device, or
    /// a key, exists.
    pub(crate) fn authenticate(
        &self,
        id: &str,
        presented: &Presented<'_>,
        row: Option<Credentials>,
        now_ms: i64,
    ) -> Result<Device> {
        let (verified, expires_at) = match presented {
            Presented::Legacy(token) => (
                verify_token(token, row.as_ref().map(|r| &r.legacy_digest[..])),
                None,
            ),
            Presented::Signed {
                expires_at,
                signature,
            } => (
                self.signed_by_device(id, row.as_ref(), *expires_at, signature)?,
                Some(*expires_at),
            ),
        };
        let row = match row {
            Some(row) if verified => row,
            _ => return Err(refused_token(id)),
        };
        admit(row.device.decode()?, expires_at, now_ms)
    }
}

/// The keys an enrollment group derives for a device.
pub(crate) struct DerivedKeys {
    pub(crate) primary: [u8; token::KEY_LEN],
    pub(crate) secondary: [u8; token::KEY_LEN],
}

/// The rest of [`crate::Registry::enroll`] for a device the registry knows,
/// `verified` if the token is signed by its own keys: enrolled by `group`,
/// it is checked as [`crate::Registry::authenticate`] checks it.
pub(crate) fn enroll_known(
    group: &str,
    id: &str,
    row: Option<Credentials>,
    verified: bool,
    expires_at: i64,
    now_ms: i64,
) -> Result<Device> {
    let row = match row {
        Some(row) if verified && row.enrollment_group.as_deref() == Some(group) => row,
        _ => return Err(refused_token(id)),
    };
    admit(row.device.decode()?, Some(expires_at), now_ms)
}

/// The id a group's keys are sealed for. Group names follow the device id
/// rules, which leave out '/', so this never names a device.
pub(crate) fn group_sealing_id(name: &str) -> String {
    format!("group/{name}")
}

/// The one reason authentication by token gives for everything that fails
/// before a signature verifies.
pub(crate) fn refused_token(id: &str) -> Error {
    Error::Unauthorized(format!(
        "device '{}': unknown device, or a token not signed by its keys",
        shown_id(id)
    ))
}

/// The same for a certificate.
pub(crate) fn refused_certificate(id: &str) -> Error {
    Error::Unauthorized(format!(
        "device '{}': unknown device, or a certificate not registered to it",
        shown_id(id)
    ))
}

/// What is left to check once a device proved who it is: that it is
/// enabled, and that its token (if it used one) has not expired.
pub(crate) fn admit(device: Device, token_expires_at: Option<i64>, now_ms: i64) -> Result<Device> {
    if device.status == DeviceStatus::Disabled {
        return Err(Error::Unauthorized(format!(
            "device '{}' is disabled",
            device.id
        )));
    }
    if let Some(expires_at) = token_expires_at {
        check_token_expiry(&device.id, expires_at, now_ms)?;
    }
    Ok(device)
}

pub(crate) fn check_token_expiry(id: &str, expires_at: i64, now_ms: i64) -> Result<()> {
    if now_ms >= expires_at.saturating_mul(1000) {
        return Err(Error::Unauthorized(format!(
            "the token of device '{id}' expired at {}",
            rfc3339(expires_at)
        )));
    }
    Ok(())
}

/// The rest of [`crate::Registry::authenticate_certificate`] once the
/// certificate registered to `id` under `thumbprint` (already validated)
/// was found, with its stored status and `not_after`.
pub(crate) fn admit_certificate(
    id: &str,
    thumbprint: &str,
    device: RawDevice,
    status: &str,
    not_after: i64,
    now_ms: i64,
) -> Result<Device> {
    // The thumbprint was validated by the caller: 64 ASCII hex digits.
    let short = thumbprint.get(..16).unwrap_or(thumbprint);
    match CertificateStatus::parse(status) {
        Some(CertificateStatus::Active) => {}
        Some(CertificateStatus::Revoked) => {
            return Err(Error::Unauthorized(format!(
                "certificate {short}… of device '{id}' is revoked"
            )));
        }
        None => {
            return Err(Error::Internal(format!(
                "certificate {thumbprint}: unknown stored status '{status}'"
            )));
        }
    }
    if now_ms >= not_after {
        return Err(Error::Unauthorized(format!(
            "certificate {short}… of device '{id}' expired at {}",
            rfc3339(not_after.div_euclid(1000))
        )));
    }
    admit(device.decode()?, None, now_ms)
}

/// Checks [`crate::DeviceFilter::limit`].
pub(crate) fn check_page_limit(limit: usize) -> Result<()> {
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Error::InvalidRequest(format!(
            "a page holds 1 to {MAX_PAGE} devices; {limit} were asked for"
        )));
    }
    Ok(())
}

/// What a backend asks for to fill a page of `limit`: one more tells
/// whether there is a next page.
pub(crate) fn page_query_limit(limit: usize) -> Result<i64> {
    i64::try_from(limit + 1).map_err(|_| Error::Internal("page limit does not fit in i64".into()))
}

/// A page from up to `limit + 1` devices read in id order.
pub(crate) fn into_page(mut devices: Vec<Device>, limit: usize) -> DevicePage {
    let next = if devices.len() > limit {
        devices.truncate(limit);
        devices.last().map(|d| d.id.clone())
    } else {
        None
    };
    DevicePage { devices, next }
}

/// Checks [`crate::Registry::issue_token`]'s `expires_at`.
pub(crate) fn check_token_expires_at(expires_at: i64) -> Result<()> {
    if expires_at < 0 {
        return Err(Error::InvalidRequest(format!(
            "a token expires at a time in seconds since the Unix epoch, from 0 on; \
             {expires_at} is before it"
        )));
    }
    Ok(())
}

/// Applies `update` to `side` of `twin` at `now_ms`; whether it changed.
/// An update that leaves the side as it was changes nothing (the version
/// stays).
pub(crate) fn apply_update(
    twin: &mut Twin,
    id: &str,
    side: Side,
    update: &PropertiesUpdate,
    now_ms: i64,
) -> Result<bool> {
    let (properties, version, updated_at) = match side {
        Side::Desired => (
            &mut twin.desired,
            &mut twin.desired_version,
            &mut twin.desired_updated_at,
        ),
        Side::Reported => (
            &mut twin.reported,
            &mut twin.reported_version,
            &mut twin.reported_updated_at,
        ),
    };
    let next = update.apply(id, side, *version, properties)?;
    if next == *properties {
        return Ok(false);
    }
    *properties = next;
    *version = version.checked_add(1).ok_or_else(|| {
        Error::Internal(format!(
            "device '{id}': the {} properties' version cannot go higher",
            side.as_str()
        ))
    })?;
    *updated_at = Some(now_ms);
    Ok(true)
}

/// A device row as read, before its text columns are decoded.
pub(crate) struct RawDevice {
    pub(crate) id: String,
    pub(crate) tags: String,
    pub(crate) metadata: String,
    pub(crate) status: String,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

impl RawDevice {
    pub(crate) fn decode(self) -> Result<Device> {
        let tags: BTreeMap<String, String> = serde_json::from_str(&self.tags).map_err(|e| {
            Error::Internal(format!(
                "device '{}': stored tags are not a JSON object of strings: {e}",
                self.id
            ))
        })?;
        let metadata = serde_json::from_str(&self.metadata).map_err(|e| {
            Error::Internal(format!(
                "device '{}': stored metadata is not a JSON object: {e}",
                self.id
            ))
        })?;
        let status = DeviceStatus::parse(&self.status).ok_or_else(|| {
            Error::Internal(format!(
                "device '{}': unknown stored status '{}'",
                self.id, self.status
            ))
        })?;
        Ok(Device {
            id: self.id,
            tags,
            metadata,
            status,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// What authentication reads of a device.
pub(crate) struct Credentials {
    pub(crate) device: RawDevice,
    /// The digest of a legacy `trb_` token (see [`crate::credentials`]);
    /// empty, which no token matches, where there is none.
    pub(crate) legacy_digest: Vec<u8>,
    pub(crate) primary: Option<Vec<u8>>,
    pub(crate) secondary: Option<Vec<u8>>,
    /// The group that enrolled it, if one did.
    pub(crate) enrollment_group: Option<String>,
}

/// An enrollment group row as read, before its text columns are decoded.
pub(crate) struct RawGroup {
    pub(crate) name: String,
    pub(crate) tags: String,
    pub(crate) status: String,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

impl RawGroup {
    pub(crate) fn decode(self) -> Result<EnrollmentGroup> {
        let tags = serde_json::from_str(&self.tags).map_err(|e| {
            Error::Internal(format!(
                "enrollment group '{}': stored tags are not a JSON object of strings: {e}",
                self.name
            ))
        })?;
        let status = DeviceStatus::parse(&self.status).ok_or_else(|| {
            Error::Internal(format!(
                "enrollment group '{}': unknown stored status '{}'",
                self.name, self.status
            ))
        })?;
        Ok(EnrollmentGroup {
            name: self.name,
            tags,
            status,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// What enrollment reads of a group.
pub(crate) struct GroupCredentials {
    pub(crate) group: RawGroup,
    pub(crate) primary: Vec<u8>,
    pub(crate) secondary: Vec<u8>,
}

pub(crate) fn missing_group(name: &str) -> Error {
    Error::Missing(format!("enrollment group '{name}' does not exist"))
}

/// A certificate row as read, before its status is decoded.
pub(crate) struct RawCertificate {
    pub(crate) thumbprint: String,
    pub(crate) device_id: String,
    pub(crate) status: String,
    pub(crate) not_after: i64,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

impl RawCertificate {
    pub(crate) fn decode(self) -> Result<Certificate> {
        let status = CertificateStatus::parse(&self.status).ok_or_else(|| {
            Error::Internal(format!(
                "certificate {}: unknown stored status '{}'",
                self.thumbprint, self.status
            ))
        })?;
        Ok(Certificate {
            thumbprint: self.thumbprint,
            device_id: self.device_id,
            status,
            not_after: self.not_after,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

pub(crate) fn certificate_taken(thumbprint: &str, owner: &str) -> Error {
    Error::Conflict(format!(
        "certificate {thumbprint} is registered already, to device '{owner}'"
    ))
}

/// A twin row as read, before its JSON is decoded.
pub(crate) struct RawTwin {
    pub(crate) desired: String,
    pub(crate) desired_version: i64,
    pub(crate) desired_updated_at: Option<i64>,
    pub(crate) reported: String,
    pub(crate) reported_version: i64,
    pub(crate) reported_updated_at: Option<i64>,
}

impl RawTwin {
    pub(crate) fn decode(self, id: &str) -> Result<Twin> {
        let object = |side: Side, text: &str| -> Result<Properties> {
            serde_json::from_str(text).map_err(|e| {
                Error::Internal(format!(
                    "device '{id}': stored {} properties are not a JSON object: {e}",
                    side.as_str()
                ))
            })
        };
        Ok(Twin {
            desired: object(Side::Desired, &self.desired)?,
            desired_version: self.desired_version,
            desired_updated_at: self.desired_updated_at,
            reported: object(Side::Reported, &self.reported)?,
            reported_version: self.reported_version,
            reported_updated_at: self.reported_updated_at,
        })
    }
}

pub(crate) fn to_json(what: &str, value: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::Internal(format!("cannot encode {what} as JSON: {e}")))
}

pub(crate) fn slot_name(slot: KeySlot) -> &'static str {
    match slot {
        KeySlot::Primary => "primary",
        KeySlot::Secondary => "secondary",
    }
}

/// A device id as it may be shown back to whoever sent it: control
/// characters escaped, cut to the longest valid id.
pub(crate) fn shown_id(id: &str) -> String {
    let mut out: String = id
        .chars()
        .take(crate::MAX_DEVICE_ID_LEN)
        .flat_map(char::escape_debug)
        .collect();
    if id.chars().nth(crate::MAX_DEVICE_ID_LEN).is_some() {
        out.push_str("...");
    }
    out
}

/// Seconds since the Unix epoch as RFC 3339 (UTC), for people.
pub(crate) fn rfc3339(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0).map_or_else(
        || format!("{seconds} seconds after the Unix epoch"),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}
