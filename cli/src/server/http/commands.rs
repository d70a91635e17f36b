//! `POST /devices/{id}/commands`: queue a command for a device, as a rule's
//! `INSERT INTO commands` does. It goes out over the device's connection
//! now, or when it next connects within the time-to-live.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tributary_engine::commands::{Command, CommandQueue, DEFAULT_TTL_MS, NewCommand, random_id};
use tributary_engine::event::now_millis;
use utoipa::ToSchema;

use super::{ApiError, ApiState, Body, ErrorBody, for_path, parse_body};

/// The body of `POST /devices/{id}/commands`. Unknown fields are refused,
/// so that fields added later (a time-to-live, waiting for the answer)
/// are never silently ignored by an older server.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SendCommand {
    /// What the device should do: 1 to 128 bytes.
    #[schema(example = "reboot")]
    name: String,
    /// Any JSON, at most 64 KiB; null if left out.
    #[serde(default)]
    #[schema(value_type = Object, example = json!({"delay_s": 5}))]
    payload: Value,
}

/// A queued command.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CommandView {
    /// Unique; the device acknowledges it by this id.
    #[schema(example = "cmd_5b1f0c2a9e4d7f3b8a6c1e0d")]
    id: String,
    device_id: String,
    name: String,
    #[schema(value_type = Object)]
    payload: Value,
    /// `queued`, `delivered`, `acknowledged` or `expired`.
    #[schema(example = "queued")]
    status: String,
    /// Milliseconds since the Unix epoch.
    created_at: i64,
    /// When it expires if the device has not taken it, milliseconds since
    /// the Unix epoch (an hour after `created_at`).
    expires_at: i64,
}

impl From<Command> for CommandView {
    fn from(c: Command) -> Self {
        CommandView {
            id: c.id,
            device_id: c.device_id,
            name: c.name,
            payload: c.payload,
            status: c.status.as_str().to_string(),
            created_at: c.created_at,
            expires_at: c.expires_at,
        }
    }
}

/// Queues a command for a device.
///
/// It is delivered over the device's connection, now if it is connected or
/// when it next connects, until it expires an hour later.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/commands",
    tag = "commands",
    params(("id" = String, Path, description = "The device id")),
    request_body = SendCommand,
    responses(
        (status = 201, description = "The queued command", body = CommandView),
        (status = 400, description = "`invalid_request`: not JSON of this shape", body = ErrorBody),
        (status = 404, description = "`not_found`: no such device", body = ErrorBody),
        (status = 422, description = "`invalid_command`: an empty or long name, a payload over 64 KiB", body = ErrorBody),
    )
)]
pub(super) async fn send_command(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let request: SendCommand = parse_body(&body, "{\"name\": \"...\", \"payload\"?: any JSON}")?;
    state
        .registry
        .get_device(&id)
        .await
        .map_err(for_path(&id))?
        .ok_or_else(|| ApiError::not_found(&id))?;
    let command = NewCommand {
        id: random_id(),
        device_id: id,
        name: request.name,
        payload: request.payload,
        source: "api".to_string(),
        ttl_ms: DEFAULT_TTL_MS,
    };
    CommandQueue::validate(&command).map_err(|e| match e {
        tributary_engine::Error::User(m) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_command", m)
        }
        e => ApiError::internal(e.to_string()),
    })?;
    let command_id = command.id.clone();
    let queued = state
        .commands
        .blocking(move |queue| {
            queue.enqueue(std::slice::from_ref(&command), now_millis())?;
            queue.get(&command.id)
        })
        .await
        .map_err(|e| {
            tracing::error!(command = %command_id, error = %e, "could not queue a command");
            ApiError::internal(format!("could not queue command {command_id}: {e}"))
        })?
        .ok_or_else(|| ApiError::internal(format!("command {command_id} was not stored")))?;
    Ok((StatusCode::CREATED, Json(CommandView::from(queued))).into_response())
}
