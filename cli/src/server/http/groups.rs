//! `/enrollment-groups`: zero-touch provisioning. A device of a group
//! derives its key from the group's (see docs/security.md) and is created
//! the first time it connects.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tributary_engine::event::now_millis;
use tributary_registry::{
    DeviceKeys, EnrollmentGroup, GroupPatch, NewGroup, validate_group_name, validate_tags,
};
use utoipa::ToSchema;

use super::devices::{Status, parse_slot, parse_status};
use super::{ApiError, ApiState, Body, ErrorBody, parse_body};

/// An enrollment group.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct GroupView {
    /// Unique; the same rules as a device id.
    #[schema(example = "factory-7")]
    name: String,
    /// Tags every device enrolled through the group is created with.
    #[schema(example = json!({"site": "north"}))]
    tags: BTreeMap<String, String>,
    /// A disabled group enrolls no new devices (its devices keep working).
    status: Status,
    /// Milliseconds since the Unix epoch.
    created_at: i64,
    /// Milliseconds since the Unix epoch.
    updated_at: i64,
}

impl From<EnrollmentGroup> for GroupView {
    fn from(g: EnrollmentGroup) -> Self {
        GroupView {
            name: g.name,
            tags: g.tags,
            status: g.status.into(),
            created_at: g.created_at,
            updated_at: g.updated_at,
        }
    }
}

/// A new group with its two keys, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CreatedGroup {
    #[serde(flatten)]
    group: GroupView,
    /// Base64; shown only now. Devices derive their keys from it.
    primary_key: String,
    /// Base64; shown only now.
    secondary_key: String,
}

/// The body of `POST /enrollment-groups`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateGroup {
    #[schema(example = "factory-7")]
    name: String,
    tags: Option<BTreeMap<String, String>>,
    /// `enabled` (the default) or `disabled`.
    #[schema(value_type = Option<Status>)]
    status: Option<String>,
}

/// The body of `PATCH /enrollment-groups/{name}`; a field left out stays.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchGroup {
    /// Replaces every tag; devices enrolled before keep theirs.
    tags: Option<BTreeMap<String, String>>,
    #[schema(value_type = Option<Status>)]
    status: Option<String>,
}

/// Every group.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct GroupList {
    /// Ordered by name.
    groups: Vec<GroupView>,
}

/// A freshly rotated group key, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RotatedGroupKey {
    name: String,
    #[schema(example = "primary")]
    slot: String,
    /// Base64; shown only now.
    key: String,
}

fn invalid_group(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_group", message)
}

fn group_not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("enrollment group '{name}' does not exist"),
    )
}

/// A registry error for a request about group `name`, in a group's words:
/// the rules it breaks are `invalid_group`, not `invalid_device`.
fn for_group(name: &str) -> impl FnOnce(tributary_registry::Error) -> ApiError + '_ {
    use tributary_registry::Error as R;
    move |e| match e {
        R::InvalidId(m) | R::InvalidTag(m) => invalid_group(m),
        R::NotFound(_) | R::Missing(_) => group_not_found(name),
        // The one conflict a group meets: its name is taken. Devices say
        // `already_exists` for that; so do groups.
        R::Conflict(_) | R::AlreadyExists(_) => ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("enrollment group '{name}' already exists"),
        ),
        e => e.into(),
    }
}

/// Checks a group name (the device id rules).
fn check_name(name: &str) -> Result<(), ApiError> {
    validate_group_name(name).map_err(|e| match e {
        tributary_registry::Error::InvalidRequest(m) | tributary_registry::Error::InvalidId(m) => {
            invalid_group(format!("invalid group name: {m}"))
        }
        e => e.into(),
    })
}

/// A name from the path: one that could never exist names no group.
fn path_name(name: &str) -> Result<(), ApiError> {
    check_name(name).map_err(|_| group_not_found(name))
}

/// Creates an enrollment group with two fresh keys, shown this once.
#[utoipa::path(
    post,
    path = "/api/v1/enrollment-groups",
    tag = "enrollment-groups",
    request_body = CreateGroup,
    responses(
        (status = 201, description = "The group and its keys", body = CreatedGroup),
        (status = 400, description = "`invalid_request`: not JSON of this shape", body = ErrorBody),
        (status = 409, description = "`already_exists`: a group has this name", body = ErrorBody),
        (status = 422, description = "`invalid_group`: the name, a tag or the status breaks the rules", body = ErrorBody),
    )
)]
pub(super) async fn create_group(
    State(state): State<ApiState>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let request: CreateGroup = parse_body(
        &body,
        "{\"name\": \"...\", \"tags\"?: {\"k\": \"v\"}, \"status\"?: \"enabled\"|\"disabled\"}",
    )?;
    check_name(&request.name)?;
    let tags = request.tags.unwrap_or_default();
    validate_tags(&tags).map_err(for_group(&request.name))?;
    let status = request
        .status
        .as_deref()
        .map(parse_status)
        .transpose()
        .map_err(|e| invalid_group(e.message))?;
    let name = request.name;
    let new = NewGroup {
        name: name.clone(),
        tags,
        status,
    };
    let (group, keys) = state
        .registry
        .create_group(new, now_millis())
        .await
        .map_err(for_group(&name))?;
    let DeviceKeys { primary, secondary } = keys;
    let created = CreatedGroup {
        group: group.into(),
        primary_key: primary,
        secondary_key: secondary,
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// Lists every enrollment group, ordered by name.
#[utoipa::path(
    get,
    path = "/api/v1/enrollment-groups",
    tag = "enrollment-groups",
    responses((status = 200, description = "Every group", body = GroupList))
)]
pub(super) async fn list_groups(
    State(state): State<ApiState>,
) -> Result<Json<GroupList>, ApiError> {
    let groups = state.registry.list_groups().await?;
    Ok(Json(GroupList {
        groups: groups.into_iter().map(Into::into).collect(),
    }))
}

/// Shows one enrollment group (without its keys).
#[utoipa::path(
    get,
    path = "/api/v1/enrollment-groups/{name}",
    tag = "enrollment-groups",
    params(("name" = String, Path, description = "The group's name")),
    responses(
        (status = 200, description = "The group", body = GroupView),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn get_group(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<GroupView>, ApiError> {
    path_name(&name)?;
    let group = state
        .registry
        .get_group(&name)
        .await
        .map_err(for_group(&name))?
        .ok_or_else(|| group_not_found(&name))?;
    Ok(Json(group.into()))
}

/// Changes a group's tags or status.
///
/// Devices it enrolled before keep their tags; a disabled group enrolls no
/// new devices.
#[utoipa::path(
    patch,
    path = "/api/v1/enrollment-groups/{name}",
    tag = "enrollment-groups",
    params(("name" = String, Path, description = "The group's name")),
    request_body = PatchGroup,
    responses(
        (status = 200, description = "The updated group", body = GroupView),
        (status = 400, description = "`invalid_request`: not JSON of this shape", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_group`: a tag or the status breaks the rules", body = ErrorBody),
    )
)]
pub(super) async fn update_group(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Body(body): Body,
) -> Result<Json<GroupView>, ApiError> {
    path_name(&name)?;
    let request: PatchGroup = parse_body(
        &body,
        "{\"tags\"?: {\"k\": \"v\"}, \"status\"?: \"enabled\"|\"disabled\"}",
    )?;
    if let Some(tags) = &request.tags {
        validate_tags(tags).map_err(for_group(&name))?;
    }
    let patch = GroupPatch {
        tags: request.tags,
        status: request
            .status
            .as_deref()
            .map(parse_status)
            .transpose()
            .map_err(|e| invalid_group(e.message))?,
    };
    let group = state
        .registry
        .update_group(&name, patch, now_millis())
        .await
        .map_err(for_group(&name))?;
    Ok(Json(group.into()))
}

/// Removes a group. Devices it enrolled stay, with their own keys.
#[utoipa::path(
    delete,
    path = "/api/v1/enrollment-groups/{name}",
    tag = "enrollment-groups",
    params(("name" = String, Path, description = "The group's name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn delete_group(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    path_name(&name)?;
    state
        .registry
        .remove_group(&name)
        .await
        .map_err(for_group(&name))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Replaces one of a group's keys with a fresh one.
///
/// Devices enrolled later derive from the new key; devices enrolled already
/// keep theirs. No body.
#[utoipa::path(
    post,
    path = "/api/v1/enrollment-groups/{name}/keys/{slot}/rotate",
    tag = "enrollment-groups",
    params(
        ("name" = String, Path, description = "The group's name"),
        ("slot" = String, Path, description = "`primary` or `secondary`"),
    ),
    responses(
        (status = 200, description = "The new key", body = RotatedGroupKey),
        (status = 404, description = "`not_found`: no such group or key slot", body = ErrorBody),
    )
)]
pub(super) async fn rotate_group_key(
    State(state): State<ApiState>,
    Path((name, slot)): Path<(String, String)>,
) -> Result<Json<RotatedGroupKey>, ApiError> {
    path_name(&name)?;
    let key_slot = parse_slot(&slot, "an enrollment group")?;
    let key = state
        .registry
        .rotate_group_key(&name, key_slot, now_millis())
        .await
        .map_err(for_group(&name))?;
    Ok(Json(RotatedGroupKey { name, slot, key }))
}
