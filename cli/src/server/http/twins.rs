//! `/devices/{id}/twin`: a device's desired and reported properties.
//!
//! The desired side is changed here, by a JSON merge patch (`PATCH`) or
//! whole (`PUT`); the reported side only by the device. Conditional updates
//! use HTTP's own precondition: `If-Match` with the desired version, which
//! `GET .../twin` gives as its `ETag`; a mismatch is `412 version_mismatch`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use tributary_engine::event::now_millis;
use tributary_registry::{PropertiesUpdate, Side, Twin};
use utoipa::ToSchema;

use super::{ApiError, ApiState, BODY_MAX_BYTES, Body, ErrorBody, for_path, parse_body};

/// The largest desired-properties body: the registry keeps at most 1 MiB
/// of properties (compact JSON), so a body between that and this is a 422
/// that says how big the properties were, and a bigger one a 413.
pub const TWIN_BODY_MAX_BYTES: usize = BODY_MAX_BYTES;

/// A device's twin.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TwinView {
    #[schema(example = "sensor-1")]
    device_id: String,
    /// What the operator wants the device to have.
    #[schema(value_type = Object, example = json!({"interval_s": 30}))]
    desired: Map<String, Value>,
    /// Up by one on every change of `desired`; 0 before the first. Also the
    /// answer's `ETag`, for `If-Match`.
    desired_version: i64,
    /// Milliseconds since the Unix epoch; null before the first change.
    desired_updated_at: Option<i64>,
    /// What the device says it has.
    #[schema(value_type = Object, example = json!({"interval_s": 60, "firmware": "1.4.2"}))]
    reported: Map<String, Value>,
    /// Up by one on every change of `reported`.
    reported_version: i64,
    /// Milliseconds since the Unix epoch; null before the first report.
    reported_updated_at: Option<i64>,
}

/// The twin with its desired version as the `ETag`.
fn twin_response(id: String, twin: Twin) -> Response {
    let etag = format!("\"{}\"", twin.desired_version);
    let view = TwinView {
        device_id: id,
        desired: twin.desired,
        desired_version: twin.desired_version,
        desired_updated_at: twin.desired_updated_at,
        reported: twin.reported,
        reported_version: twin.reported_version,
        reported_updated_at: twin.reported_updated_at,
    };
    let mut response = Json(view).into_response();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

/// Shows a device's twin: both sides with their versions.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/twin",
    tag = "twins",
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "The twin; `ETag` is the desired version", body = TwinView),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn get_twin(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let twin = state.registry.get_twin(&id).await.map_err(for_path(&id))?;
    Ok(twin_response(id, twin))
}

/// Changes a device's desired properties by a JSON merge patch (RFC 7386).
///
/// A key set to `null` is removed, an object is merged key by key, anything
/// else replaces. The device gets the new properties over its connection.
#[utoipa::path(
    patch,
    path = "/api/v1/devices/{id}/twin/desired",
    tag = "twins",
    params(
        ("id" = String, Path, description = "The device id"),
        ("If-Match" = Option<String>, Header, description = "Apply only if the desired version is this one: `\"3\"` (the twin's `ETag`) or `3`"),
    ),
    request_body(content = Object, description = "A merge patch: a JSON object",
                 content_type = "application/merge-patch+json",
                 example = json!({"interval_s": 30, "mode": null})),
    responses(
        (status = 200, description = "The twin", body = TwinView),
        (status = 400, description = "`invalid_request`: not a JSON object, or a malformed `If-Match`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 412, description = "`version_mismatch`: `If-Match` names another version", body = ErrorBody),
        (status = 413, description = "`too_large`: the body is over 2 MiB", body = ErrorBody),
        (status = 422, description = "`invalid_properties`: over 1 MiB or 32 levels deep", body = ErrorBody),
    )
)]
pub(super) async fn patch_desired(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body<TWIN_BODY_MAX_BYTES>,
) -> Result<Response, ApiError> {
    update_desired(&state, id, &headers, &body, false).await
}

/// Replaces a device's desired properties.
#[utoipa::path(
    put,
    path = "/api/v1/devices/{id}/twin/desired",
    tag = "twins",
    params(
        ("id" = String, Path, description = "The device id"),
        ("If-Match" = Option<String>, Header, description = "Apply only if the desired version is this one"),
    ),
    request_body(content = Object, description = "The whole desired object",
                 example = json!({"interval_s": 30})),
    responses(
        (status = 200, description = "The twin", body = TwinView),
        (status = 400, description = "`invalid_request`: not a JSON object, or a malformed `If-Match`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 412, description = "`version_mismatch`", body = ErrorBody),
        (status = 413, description = "`too_large`: the body is over 2 MiB", body = ErrorBody),
        (status = 422, description = "`invalid_properties`: over 1 MiB or 32 levels deep", body = ErrorBody),
    )
)]
pub(super) async fn replace_desired(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body<TWIN_BODY_MAX_BYTES>,
) -> Result<Response, ApiError> {
    update_desired(&state, id, &headers, &body, true).await
}

async fn update_desired(
    state: &ApiState,
    id: String,
    headers: &HeaderMap,
    body: &[u8],
    replace: bool,
) -> Result<Response, ApiError> {
    let if_version = if_match(headers)?;
    let patch: Map<String, Value> = parse_body(
        body,
        if replace {
            "object of desired properties"
        } else {
            "object (a merge patch of the desired properties)"
        },
    )?;
    let update = PropertiesUpdate {
        patch,
        replace,
        if_version,
    };
    let twin = state
        .registry
        .update_properties(&id, Side::Desired, update, now_millis())
        .await
        .map_err(for_path(&id))?;
    Ok(twin_response(id, twin))
}

/// The version an `If-Match` header asks for: `"3"`, `W/"3"` or `3`; `*`
/// (any) and no header ask for none.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text == "*" {
        return Ok(None);
    }
    let bare = text.strip_prefix("W/").unwrap_or(text);
    let bare = bare
        .strip_prefix('"')
        .and_then(|b| b.strip_suffix('"'))
        .unwrap_or(bare);
    bare.parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid_request(format!(
                "If-Match must be one desired-properties version, like \"3\" (the twin's ETag), \
                 got '{text}'"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::IF_MATCH, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn if_match_reads_versions() {
        assert_eq!(if_match(&HeaderMap::new()).unwrap(), None);
        assert_eq!(if_match(&with("*")).unwrap(), None);
        assert_eq!(if_match(&with("\"3\"")).unwrap(), Some(3));
        assert_eq!(if_match(&with("W/\"0\"")).unwrap(), Some(0));
        assert_eq!(if_match(&with(" 12 ")).unwrap(), Some(12));
        for bad in ["abc", "\"1\", \"2\"", "-1", "\"\""] {
            assert_eq!(if_match(&with(bad)).unwrap_err().code, "invalid_request");
        }
    }
}
