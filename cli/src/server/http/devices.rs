//! `/devices`: create, list, get, update, disable and enable, delete, rotate
//! a key, issue a token.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tributary_engine::event::now_millis;
use tributary_registry::{
    ConnectionState, Device, DeviceFilter, DeviceKeys, DevicePatch, DeviceStatus, KeySlot,
    MAX_PAGE, NewDevice, validate_device_id, validate_tags,
};
use utoipa::ToSchema;

use super::{ApiError, ApiState, Body, ErrorBody, for_path, parse_body, refresh_devices};

const YEAR_S: i64 = 31_557_600;
/// How long a device token lasts unless asked otherwise: long enough that
/// `device add` hands out a token that works like a lasting credential.
pub const TOKEN_DEFAULT_S: i64 = 10 * YEAR_S;
/// The longest a token may last.
pub const TOKEN_MAX_S: i64 = 100 * YEAR_S;

/// Whether a device (or an enrollment group) may connect (enroll).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum Status {
    Enabled,
    Disabled,
}

impl From<DeviceStatus> for Status {
    fn from(s: DeviceStatus) -> Self {
        match s {
            DeviceStatus::Enabled => Status::Enabled,
            DeviceStatus::Disabled => Status::Disabled,
        }
    }
}

/// Where a device's connection stands.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(super) struct ConnectionView {
    /// Whether the device has an authenticated session now.
    connected: bool,
    /// When it connected or disconnected, milliseconds since the Unix epoch.
    since: i64,
    /// Why it disconnected; null while connected.
    #[schema(example = "closed by the device")]
    reason: Option<String>,
    /// The last frame of any kind from the device, milliseconds since the
    /// Unix epoch.
    last_seen: Option<i64>,
    /// The event time of the last event it sent, milliseconds since the
    /// Unix epoch.
    last_event_at: Option<i64>,
}

impl From<ConnectionState> for ConnectionView {
    fn from(c: ConnectionState) -> Self {
        ConnectionView {
            connected: c.connected,
            since: c.since,
            reason: c.reason,
            last_seen: c.last_seen,
            last_event_at: c.last_event_at,
        }
    }
}

/// A device as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(super) struct DeviceView {
    /// 1 to 128 ASCII letters, digits, '.', '_', '-', ':', starting with a
    /// letter or digit.
    #[schema(example = "sensor-1")]
    id: String,
    /// Labels to select devices by.
    #[schema(example = json!({"site": "north"}))]
    tags: BTreeMap<String, String>,
    /// Any JSON object up to 64 KiB.
    #[schema(value_type = Object, example = json!({"model": "TX-2"}))]
    metadata: Map<String, Value>,
    status: Status,
    /// Milliseconds since the Unix epoch.
    created_at: i64,
    /// Milliseconds since the Unix epoch.
    updated_at: i64,
    /// Whether the device has a live connection now.
    connected: bool,
    /// Its connection state, live while it is connected; null if it never
    /// connected.
    connection: Option<ConnectionView>,
}

impl DeviceView {
    fn new(device: Device, connected: bool, connection: Option<ConnectionState>) -> Self {
        DeviceView {
            id: device.id,
            tags: device.tags,
            metadata: device.metadata,
            status: device.status.into(),
            created_at: device.created_at,
            updated_at: device.updated_at,
            connected,
            connection: connection.map(Into::into),
        }
    }
}

/// A device with its connection: the gateway's live state while it is
/// connected (exact to the last frame), else the one the registry stored
/// when it disconnected.
pub(super) async fn view(state: &ApiState, device: Device) -> Result<DeviceView, ApiError> {
    let (connected, connection) = match state.gateway.live_state(&device.id) {
        Some(live) => (true, Some(live)),
        None => (
            state.gateway.is_connected(&device.id),
            state.registry.connection_state(&device.id).await?,
        ),
    };
    Ok(DeviceView::new(device, connected, connection))
}

pub(super) fn parse_status(text: &str) -> Result<DeviceStatus, ApiError> {
    DeviceStatus::parse(text).ok_or_else(|| {
        ApiError::invalid_device(format!(
            "status must be 'enabled' or 'disabled', got '{text}'"
        ))
    })
}

/// The body of `POST /devices`, and one row of an import.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateDevice {
    #[schema(example = "sensor-1")]
    id: String,
    #[schema(example = json!({"site": "north"}))]
    tags: Option<BTreeMap<String, String>>,
    #[schema(value_type = Option<Object>, example = json!({"model": "TX-2"}))]
    metadata: Option<Map<String, Value>>,
    /// `enabled` (the default) or `disabled`.
    #[schema(value_type = Option<Status>)]
    status: Option<String>,
}

pub(super) const CREATE_SHAPE: &str = "{\"id\": \"...\", \"tags\"?: {\"k\": \"v\"}, \
                                       \"metadata\"?: {...}, \"status\"?: \"enabled\"|\"disabled\"}";

impl CreateDevice {
    pub(super) fn into_new_device(self) -> Result<NewDevice, ApiError> {
        Ok(NewDevice {
            status: self.status.as_deref().map(parse_status).transpose()?,
            id: self.id,
            tags: self.tags.unwrap_or_default(),
            metadata: self.metadata.unwrap_or_default(),
        })
    }
}

/// A new device with its keys and a token, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CreatedDevice {
    #[serde(flatten)]
    device: DeviceView,
    /// Base64; shown only now.
    primary_key: String,
    /// Base64; shown only now.
    secondary_key: String,
    /// Signed with the primary key; the device connects with it.
    #[schema(example = "trb1.2111416060.XsQwxRifTO30oEPr3K9Rq0weGTVKSD2EuK9l_Yl4iGU")]
    token: String,
    /// Seconds since the Unix epoch.
    token_expires_at: i64,
}

impl CreatedDevice {
    pub(super) fn id(&self) -> &str {
        &self.device.id
    }
}

/// Creates a device and a long-lived token for it: the device with its keys
/// and token, shown this once.
pub(super) async fn create_one(
    state: &ApiState,
    new: NewDevice,
) -> Result<CreatedDevice, ApiError> {
    let (device, keys) = state.registry.create_device(new, now_millis()).await?;
    let DeviceKeys { primary, secondary } = keys;
    let expires_at = now_millis() / 1000 + TOKEN_DEFAULT_S;
    let token = state.registry.issue_token(&device.id, expires_at).await?;
    Ok(CreatedDevice {
        device: DeviceView::new(device, false, None),
        primary_key: primary,
        secondary_key: secondary,
        token,
        token_expires_at: expires_at,
    })
}

/// Registers a device.
///
/// The answer holds its two keys and a token valid for ten years, shown
/// this once.
#[utoipa::path(
    post,
    path = "/api/v1/devices",
    tag = "devices",
    request_body = CreateDevice,
    responses(
        (status = 201, description = "The device, its keys and a token", body = CreatedDevice),
        (status = 400, description = "`invalid_request`: not JSON of this shape", body = ErrorBody),
        (status = 409, description = "`already_exists`", body = ErrorBody),
        (status = 413, description = "`too_large`: over 2 MiB", body = ErrorBody),
        (status = 422, description = "`invalid_device`: the id, a tag, the metadata or the status breaks the rules", body = ErrorBody),
    )
)]
pub(super) async fn create_device(
    State(state): State<ApiState>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let request: CreateDevice = parse_body(&body, CREATE_SHAPE)?;
    let created = create_one(&state, request.into_new_device()?).await;
    // A failure after the device was stored (its token) still changed the registry.
    if created
        .as_ref()
        .map_or_else(|e| e.status.is_server_error(), |_| true)
    {
        refresh_devices(&state).await;
    }
    Ok((StatusCode::CREATED, Json(created?)).into_response())
}

/// `GET /devices?tag=k=v&status=...&limit=N&after=ID` as a registry filter.
fn parse_filter(uri: &Uri) -> Result<DeviceFilter, ApiError> {
    let Query(params) = Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map_err(|e| ApiError::invalid_parameter(e.body_text()))?;
    let mut filter = DeviceFilter::default();
    let mut seen = Vec::new();
    for (name, value) in params {
        if name != "tag" {
            if seen.contains(&name) {
                return Err(ApiError::invalid_parameter(format!(
                    "query parameter '{name}' is given twice"
                )));
            }
            seen.push(name.clone());
        }
        match name.as_str() {
            "tag" => {
                let Some((k, v)) = value.split_once('=') else {
                    return Err(ApiError::invalid_parameter(format!(
                        "tag filter '{value}' is not key=value"
                    )));
                };
                if let Some(old) = filter.tags.insert(k.to_string(), v.to_string())
                    && old != v
                {
                    return Err(ApiError::invalid_parameter(format!(
                        "tag filter '{k}' asks for both '{old}' and '{v}'; no device has both"
                    )));
                }
            }
            "status" => {
                filter.status = Some(DeviceStatus::parse(&value).ok_or_else(|| {
                    ApiError::invalid_parameter(format!(
                        "status must be 'enabled' or 'disabled', got '{value}'"
                    ))
                })?);
            }
            "limit" => {
                filter.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid_parameter(format!(
                            "limit must be a whole number from 1 to {MAX_PAGE}, got '{value}'"
                        ))
                    })?;
            }
            "after" => {
                validate_device_id(&value).map_err(|e| {
                    ApiError::invalid_parameter(format!("after must be a device id: {e}"))
                })?;
                filter.after = Some(value);
            }
            _ => {
                return Err(ApiError::invalid_parameter(format!(
                    "unknown query parameter '{name}'; known are tag, status, limit and after"
                )));
            }
        }
    }
    validate_tags(&filter.tags)
        .map_err(|e| ApiError::invalid_parameter(format!("tag filter: {e}")))?;
    Ok(filter)
}

/// One page of devices.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DevicePage {
    devices: Vec<DeviceView>,
    /// Where the next page starts (`after`), or null on the last page.
    next: Option<String>,
}

/// Lists devices, ordered by id, a page at a time.
#[utoipa::path(
    get,
    path = "/api/v1/devices",
    tag = "devices",
    params(
        ("tag" = Option<Vec<String>>, Query, description = "`k=v`: only devices with this tag; repeat for more (all must match)"),
        ("status" = Option<Status>, Query, description = "Only devices with this status"),
        ("limit" = Option<usize>, Query, description = "At most this many, 1 to 1000 (default 100)"),
        ("after" = Option<String>, Query, description = "Only ids after this one: the previous page's `next`"),
    ),
    responses(
        (status = 200, description = "A page of devices", body = DevicePage),
        (status = 422, description = "`invalid_parameter`: a bad, repeated or unknown query parameter", body = ErrorBody),
    )
)]
pub(super) async fn list_devices(
    State(state): State<ApiState>,
    uri: Uri,
) -> Result<Json<DevicePage>, ApiError> {
    let filter = parse_filter(&uri)?;
    let page = state.registry.list_devices(&filter).await?;
    let mut devices = Vec::with_capacity(page.devices.len());
    for device in page.devices {
        devices.push(view(&state, device).await?);
    }
    Ok(Json(DevicePage {
        devices,
        next: page.next,
    }))
}

/// Shows one device.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "The device", body = DeviceView),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn get_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    get_one(&state, &id).await
}

pub(super) async fn get_one(state: &ApiState, id: &str) -> Result<Json<DeviceView>, ApiError> {
    let device = state
        .registry
        .get_device(id)
        .await
        .map_err(for_path(id))?
        .ok_or_else(|| ApiError::not_found(id))?;
    Ok(Json(view(state, device).await?))
}

/// The body of `PATCH /devices/{id}`; a field left out stays as it is.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchDevice {
    /// Replaces every tag (`{}` clears them).
    tags: Option<BTreeMap<String, String>>,
    /// Replaces the metadata (`{}` clears it).
    #[schema(value_type = Option<Object>)]
    metadata: Option<Map<String, Value>>,
    #[schema(value_type = Option<Status>)]
    status: Option<String>,
}

/// Changes a device's tags, metadata or status.
///
/// Disabling a device closes its live sessions.
#[utoipa::path(
    patch,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "The device id")),
    request_body = PatchDevice,
    responses(
        (status = 200, description = "The updated device", body = DeviceView),
        (status = 400, description = "`invalid_request`: not JSON of this shape", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_device`", body = ErrorBody),
    )
)]
pub(super) async fn update_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<DeviceView>, ApiError> {
    update_one(&state, &id, &body).await
}

pub(super) async fn update_one(
    state: &ApiState,
    id: &str,
    body: &[u8],
) -> Result<Json<DeviceView>, ApiError> {
    let request: PatchDevice = parse_body(
        body,
        "{\"tags\"?: {\"k\": \"v\"}, \"metadata\"?: {...}, \"status\"?: \"enabled\"|\"disabled\"}",
    )?;
    let patch = DevicePatch {
        tags: request.tags,
        metadata: request.metadata,
        status: request.status.as_deref().map(parse_status).transpose()?,
    };
    patch_device(state, id, patch).await
}

/// Disables a device: its sessions close and it may not connect until
/// enabled. No body.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/disable",
    tag = "devices",
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "The device", body = DeviceView),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn disable_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    set_status(&state, &id, DeviceStatus::Disabled).await
}

/// Enables a device. No body.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/enable",
    tag = "devices",
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "The device", body = DeviceView),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn enable_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    set_status(&state, &id, DeviceStatus::Enabled).await
}

async fn set_status(
    state: &ApiState,
    id: &str,
    status: DeviceStatus,
) -> Result<Json<DeviceView>, ApiError> {
    let patch = DevicePatch {
        status: Some(status),
        ..DevicePatch::default()
    };
    patch_device(state, id, patch).await
}

async fn patch_device(
    state: &ApiState,
    id: &str,
    patch: DevicePatch,
) -> Result<Json<DeviceView>, ApiError> {
    // Disabling needs no disconnect here: the registry announces it and the
    // gateway closes the device's sessions with the reason docs/security.md gives.
    let device = state
        .registry
        .update_device(id, patch, now_millis())
        .await
        .map_err(for_path(id))?;
    refresh_devices(state).await;
    Ok(Json(view(state, device).await?))
}

/// Removes a device: its credentials stop working, its connection closes
/// and its pending commands expire.
#[utoipa::path(
    delete,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn delete_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    delete_one(&state, &id).await
}

pub(super) async fn delete_one(state: &ApiState, id: &str) -> Result<StatusCode, ApiError> {
    state
        .registry
        .remove_device(id)
        .await
        .map_err(for_path(id))?;
    refresh_devices(state).await;
    // Deprovisioning: the credentials are gone; close the live connection and
    // let nothing more be delivered. (The gateway would also close it on
    // the registry's announcement; this makes it immediate.)
    state
        .gateway
        .disconnect(id, &format!("device '{id}' was removed from the registry"));
    if let Err(e) = state.commands.expire_device(id, now_millis()) {
        tracing::error!(device = %id, error = %e, "could not expire the removed device's commands");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A key slot from a path: `primary` or `secondary`; anything else names no
/// key (`what` says whose, in the message).
pub(super) fn parse_slot(slot: &str, what: &str) -> Result<KeySlot, ApiError> {
    match slot {
        "primary" => Ok(KeySlot::Primary),
        "secondary" => Ok(KeySlot::Secondary),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} has no key '{slot}'; its keys are 'primary' and 'secondary'"),
        )),
    }
}

/// A freshly rotated device key, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RotatedKey {
    id: String,
    #[schema(example = "secondary")]
    slot: String,
    /// Base64; shown only now.
    key: String,
}

/// Replaces one of a device's keys with a fresh one.
///
/// Tokens signed with the old key stop working, and live sessions that used
/// one are closed. No body.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/keys/{slot}/rotate",
    tag = "devices",
    params(
        ("id" = String, Path, description = "The device id"),
        ("slot" = String, Path, description = "`primary` or `secondary`"),
    ),
    responses(
        (status = 200, description = "The new key", body = RotatedKey),
        (status = 404, description = "`not_found`: no such device or key slot", body = ErrorBody),
    )
)]
pub(super) async fn rotate_key(
    State(state): State<ApiState>,
    Path((id, slot)): Path<(String, String)>,
) -> Result<Json<RotatedKey>, ApiError> {
    let key_slot = parse_slot(&slot, "a device")?;
    let key = state
        .registry
        .rotate_key(&id, key_slot, now_millis())
        .await
        .map_err(for_path(&id))?;
    Ok(Json(RotatedKey { id, slot, key }))
}

/// The optional body of `POST /devices/{id}/token`.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenRequest {
    /// How long the token lasts, 1 s to 100 years (default ten years).
    #[schema(example = 86400)]
    expires_in_s: Option<i64>,
}

/// A token for a device.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct IssuedToken {
    id: String,
    token: String,
    /// Seconds since the Unix epoch.
    expires_at: i64,
}

/// Issues a token for a device, signed with its primary key.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/token",
    tag = "devices",
    params(("id" = String, Path, description = "The device id")),
    request_body(content = Option<TokenRequest>, description = "Optional"),
    responses(
        (status = 200, description = "The token", body = IssuedToken),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_parameter`: `expires_in_s` out of range", body = ErrorBody),
    )
)]
pub(super) async fn issue_token(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<IssuedToken>, ApiError> {
    let request: TokenRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TokenRequest::default()
    } else {
        parse_body(&body, "{\"expires_in_s\"?: seconds}")?
    };
    let expires_in = request.expires_in_s.unwrap_or(TOKEN_DEFAULT_S);
    if !(1..=TOKEN_MAX_S).contains(&expires_in) {
        return Err(ApiError::invalid_parameter(format!(
            "expires_in_s must be from 1 to {TOKEN_MAX_S} seconds (100 years), got {expires_in}"
        )));
    }
    let expires_at = now_millis() / 1000 + expires_in;
    let token = state
        .registry
        .issue_token(&id, expires_at)
        .await
        .map_err(for_path(&id))?;
    Ok(Json(IssuedToken {
        id,
        token,
        expires_at,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_refuse() {
        let uri: Uri = "/devices?tag=site=n&tag=a=b%3Dc&status=disabled&limit=5&after=x"
            .parse()
            .unwrap();
        let f = parse_filter(&uri).unwrap();
        assert_eq!(f.tags["a"], "b=c");
        assert_eq!(f.limit, 5);
        assert_eq!(f.after.as_deref(), Some("x"));
        for bad in [
            "limit=0",
            "limit=1001",
            "status=on",
            "tag=site",
            "tags=a=b",
            "limit=1&limit=2",
        ] {
            let uri: Uri = format!("/devices?{bad}").parse().unwrap();
            let e = parse_filter(&uri).unwrap_err();
            assert_eq!(e.code, "invalid_parameter", "{bad}");
        }
    }
}
