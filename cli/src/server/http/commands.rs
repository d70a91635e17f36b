//! Commands to devices: `POST /devices/{id}/commands` queues one, as a
//! rule's `INSERT INTO commands` does (it goes out over the device's
//! connection now, or when it next connects within its time-to-live);
//! `POST /devices/{id}/calls` sends one and waits for the device's answer;
//! `GET /commands` and `GET /commands/{id}` show where commands are.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tributary_engine::commands::{
    Command, CommandQueue, CommandStatus, DEFAULT_TTL_MS, NewCommand, random_id,
};
use tributary_engine::event::now_millis;
use utoipa::ToSchema;

use super::{ApiError, ApiState, Body, ErrorBody, for_path, parse_body};

/// The longest time-to-live a command may ask for: 30 days.
const MAX_TTL_MS: i64 = 30 * 24 * 60 * 60 * 1000;
/// How long a call waits unless told otherwise.
const DEFAULT_CALL_TIMEOUT_MS: i64 = 30 * 1000;
/// The longest a call may wait: 5 minutes.
const MAX_CALL_TIMEOUT_MS: i64 = 5 * 60 * 1000;
/// Commands per page of `GET /commands`, by default and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// The body of `POST /devices/{id}/commands`. Unknown fields are refused,
/// so that fields added later are never silently ignored by an older server.
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
    /// How long the command waits for its device, as duration text (`30s`,
    /// `5m`, `2h`, `1d`; at most 30 days). One hour if left out.
    #[schema(example = "5m")]
    ttl: Option<String>,
    /// 1 to 128 bytes. A second command for the same device with the same
    /// key is not queued: the first one is returned, with status 200.
    #[schema(example = "setpoint-2025-01-02T03:04")]
    idempotency_key: Option<String>,
    /// Queuing this command supersedes the device's commands of the same
    /// name that are still queued (not yet delivered).
    #[serde(default)]
    latest_wins: bool,
}

/// The body of `POST /devices/{id}/calls`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CallCommand {
    /// The method: 1 to 128 bytes.
    #[schema(example = "get_uptime")]
    name: String,
    /// Any JSON, at most 64 KiB; null if left out.
    #[serde(default)]
    #[schema(value_type = Object)]
    payload: Value,
    /// How long to wait for the device's answer, as duration text (`10s`);
    /// 30 seconds if left out, at most 5 minutes.
    #[schema(example = "10s")]
    timeout: Option<String>,
}

/// A command and where it is in its life.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CommandView {
    /// Unique; the device answers it by this id.
    #[schema(example = "cmd_5b1f0c2a9e4d7f3b8a6c1e0d")]
    id: String,
    device_id: String,
    name: String,
    #[schema(value_type = Object)]
    payload: Value,
    /// Who sent it: `api`, or `rule:<name>`.
    #[schema(example = "api")]
    source: String,
    /// `queued`, `delivered`, `acknowledged`, `rejected`, `failed`,
    /// `expired` or `superseded` (see docs/protocol.md, section 8).
    #[schema(example = "queued")]
    status: String,
    /// Why it was rejected, failed or superseded; null otherwise.
    reason: Option<String>,
    /// A call's answer from the device; null otherwise.
    #[schema(value_type = Option<Object>)]
    response: Option<Value>,
    idempotency_key: Option<String>,
    latest_wins: bool,
    /// Whether it was sent by a call, whose caller waited for the answer.
    call: bool,
    /// Milliseconds since the Unix epoch.
    created_at: i64,
    /// When it expires if the device has not answered it, milliseconds
    /// since the Unix epoch.
    expires_at: i64,
    /// When it was last handed to the device.
    delivered_at: Option<i64>,
    /// When the device answered.
    answered_at: Option<i64>,
}

impl From<Command> for CommandView {
    fn from(c: Command) -> Self {
        CommandView {
            id: c.id,
            device_id: c.device_id,
            name: c.name,
            payload: c.payload,
            source: c.source,
            status: c.status.as_str().to_string(),
            reason: c.reason,
            response: c.response,
            idempotency_key: c.idempotency_key,
            latest_wins: c.latest_wins,
            call: c.call,
            created_at: c.created_at,
            expires_at: c.expires_at,
            delivered_at: c.delivered_at,
            answered_at: c.answered_at,
        }
    }
}

/// A page of commands, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CommandList {
    commands: Vec<CommandView>,
}

fn invalid_command(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_command", message)
}

fn queue_error(e: tributary_engine::Error) -> ApiError {
    match e {
        tributary_engine::Error::User(m) => invalid_command(m),
        e => {
            tracing::error!(error = %e, "command queue failed");
            ApiError::internal(format!("command queue: {e}"))
        }
    }
}

/// Duration text as milliseconds, 1 ms to `max`.
fn duration_ms(field: &str, text: &str, max: i64) -> Result<i64, ApiError> {
    let ms = tributary_engine::duration::parse_duration(text)
        .map_err(|e| invalid_command(format!("{field} '{text}': {e}")))?;
    if ms <= 0 || ms > max {
        return Err(invalid_command(format!(
            "{field} '{text}' must be more than 0 and at most {}s",
            max / 1000
        )));
    }
    Ok(ms)
}

/// 404 unless the device exists.
async fn existing_device(state: &ApiState, id: &str) -> Result<(), ApiError> {
    state
        .registry
        .get_device(id)
        .await
        .map_err(for_path(id))?
        .ok_or_else(|| ApiError::not_found(id))?;
    Ok(())
}

/// Queues a command for a device.
///
/// It is delivered over the device's connection, now if it is connected or
/// when it next connects, until its time-to-live passes. With an
/// `idempotency_key` already used for this device, nothing is queued and
/// the existing command is returned with status 200.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/commands",
    tag = "commands",
    params(("id" = String, Path, description = "The device id")),
    request_body = SendCommand,
    responses(
        (status = 201, description = "The queued command", body = CommandView),
        (status = 200, description = "The command this idempotency key already queued", body = CommandView),
        (status = 400, description = "`invalid_request`: not JSON of this shape", body = ErrorBody),
        (status = 404, description = "`not_found`: no such device", body = ErrorBody),
        (status = 422, description = "`invalid_command`: an empty or long name, a payload over 64 KiB, a bad ttl or idempotency key", body = ErrorBody),
    )
)]
pub(super) async fn send_command(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let request: SendCommand = parse_body(
        &body,
        "{\"name\": \"...\", \"payload\"?: any JSON, \"ttl\"?: \"5m\", \
         \"idempotency_key\"?: \"...\", \"latest_wins\"?: bool}",
    )?;
    existing_device(&state, &id).await?;
    let ttl_ms = match &request.ttl {
        Some(text) => duration_ms("ttl", text, MAX_TTL_MS)?,
        None => DEFAULT_TTL_MS,
    };
    let command = NewCommand {
        id: random_id(),
        device_id: id,
        name: request.name,
        payload: request.payload,
        source: "api".to_string(),
        ttl_ms,
        idempotency_key: request.idempotency_key,
        latest_wins: request.latest_wins,
        call: false,
    };
    CommandQueue::validate(&command).map_err(queue_error)?;
    let submitted = state
        .commands
        .blocking(move |queue| queue.submit(&command, now_millis()))
        .await
        .map_err(queue_error)?;
    let status = if submitted.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(CommandView::from(submitted.command))).into_response())
}

/// Stops listening for a call's answer, however the call ends (the HTTP
/// client may go away mid-wait).
struct AnswerWatch {
    queue: Arc<CommandQueue>,
    id: String,
    notify: Option<Arc<tokio::sync::Notify>>,
}

impl Drop for AnswerWatch {
    fn drop(&mut self) {
        drop(self.notify.take());
        self.queue.release_answer_notifier(&self.id);
    }
}

/// Calls a method on a connected device and waits for its answer.
///
/// The command goes out with `"call": true` and a time-to-live equal to
/// the timeout. An answer (acknowledged with the device's `response`, or
/// rejected / failed with its `reason`) returns 200 with the command. A
/// device that is not connected fails the call at once (the command is
/// recorded `failed`, reason `device offline`); no answer before the
/// timeout expires the command and returns 504.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/calls",
    tag = "commands",
    params(("id" = String, Path, description = "The device id")),
    request_body = CallCommand,
    responses(
        (status = 200, description = "The device answered: `status` is `acknowledged` (with `response`), `rejected` or `failed` (with `reason`)", body = CommandView),
        (status = 400, description = "`invalid_request`: not JSON of this shape", body = ErrorBody),
        (status = 404, description = "`not_found`: no such device", body = ErrorBody),
        (status = 409, description = "`device_offline`: the device is not connected", body = ErrorBody),
        (status = 422, description = "`invalid_command`: an empty or long name, a payload over 64 KiB, a bad timeout", body = ErrorBody),
        (status = 504, description = "`timeout`: no answer in time; the command is expired", body = ErrorBody),
    )
)]
pub(super) async fn call_command(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let request: CallCommand = parse_body(
        &body,
        "{\"name\": \"...\", \"payload\"?: any JSON, \"timeout\"?: \"10s\"}",
    )?;
    existing_device(&state, &id).await?;
    let timeout_ms = match &request.timeout {
        Some(text) => duration_ms("timeout", text, MAX_CALL_TIMEOUT_MS)?,
        None => DEFAULT_CALL_TIMEOUT_MS,
    };
    let command = NewCommand {
        id: random_id(),
        device_id: id.clone(),
        name: request.name,
        payload: request.payload,
        source: "api".to_string(),
        ttl_ms: timeout_ms,
        idempotency_key: None,
        latest_wins: false,
        call: true,
    };
    CommandQueue::validate(&command).map_err(queue_error)?;
    let command_id = command.id.clone();
    if !state.gateway.is_connected(&id) {
        let failed = command.clone();
        state
            .commands
            .blocking(move |q| q.record_failed(&failed, "device offline", now_millis()))
            .await
            .map_err(queue_error)?;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "device_offline",
            format!("device '{id}' is not connected; call {command_id} failed"),
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms.unsigned_abs());
    // Listen before queuing, so that no answer can come in unheard.
    let watch = AnswerWatch {
        queue: state.commands.clone(),
        id: command_id.clone(),
        notify: Some(state.commands.answer_notifier(&command_id)),
    };
    let notify = watch.notify.clone().unwrap_or_default();
    state
        .commands
        .blocking(move |q| q.submit(&command, now_millis()))
        .await
        .map_err(queue_error)?;
    let settled = loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let current = read_command(&state.commands, &command_id).await?;
        if current.status.is_final() {
            break current;
        }
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep_until(deadline) => {
                let id = command_id.clone();
                state
                    .commands
                    .blocking(move |q| q.expire_now(&id, now_millis()))
                    .await
                    .map_err(queue_error)?;
                // An answer may have won the race; the stored status says.
                break read_command(&state.commands, &command_id).await?;
            }
        }
    };
    drop(watch);
    if settled.status == CommandStatus::Expired {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "device '{id}' did not answer call {command_id} within {}; it is expired",
                tributary_engine::duration::format_duration(timeout_ms)
            ),
        ));
    }
    Ok((StatusCode::OK, Json(CommandView::from(settled))).into_response())
}

async fn read_command(queue: &Arc<CommandQueue>, id: &str) -> Result<Command, ApiError> {
    let wanted = id.to_string();
    queue
        .blocking(move |q| q.get(&wanted))
        .await
        .map_err(queue_error)?
        .ok_or_else(|| ApiError::internal(format!("command {id} vanished")))
}

/// Shows one command.
#[utoipa::path(
    get,
    path = "/api/v1/commands/{id}",
    tag = "commands",
    params(("id" = String, Path, description = "The command id")),
    responses(
        (status = 200, description = "The command", body = CommandView),
        (status = 404, description = "`not_found`: no such command", body = ErrorBody),
    )
)]
pub(super) async fn get_command(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<CommandView>, ApiError> {
    let wanted = id.clone();
    state
        .commands
        .blocking(move |q| q.get(&wanted))
        .await
        .map_err(queue_error)?
        .map(|c| Json(CommandView::from(c)))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("command '{id}' does not exist"),
            )
        })
}

/// Lists commands, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/commands",
    tag = "commands",
    params(
        ("device" = Option<String>, Query, description = "Only this device's commands"),
        ("status" = Option<String>, Query, description = "Only commands with this status"),
        ("limit" = Option<usize>, Query, description = "At most this many, 1 to 1000 (default 100)"),
    ),
    responses(
        (status = 200, description = "The newest commands", body = CommandList),
        (status = 422, description = "`invalid_parameter`: a bad, repeated or unknown query parameter", body = ErrorBody),
    )
)]
pub(super) async fn list_commands(
    State(state): State<ApiState>,
    uri: Uri,
) -> Result<Json<CommandList>, ApiError> {
    let Query(params) = Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map_err(|e| ApiError::invalid_parameter(e.body_text()))?;
    let (mut device, mut status, mut limit) = (None, None, None);
    for (name, value) in params {
        let slot_taken = match name.as_str() {
            "device" => device.replace(value.clone()).is_some(),
            "status" => {
                let parsed = CommandStatus::from_name(&value).ok_or_else(|| {
                    ApiError::invalid_parameter(format!(
                        "status must be one of {}, got '{value}'",
                        CommandStatus::ALL.map(CommandStatus::as_str).join(", ")
                    ))
                })?;
                status.replace(parsed).is_some()
            }
            "limit" => {
                let n = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid_parameter(format!(
                            "limit must be a whole number from 1 to {MAX_LIMIT}, got '{value}'"
                        ))
                    })?;
                limit.replace(n).is_some()
            }
            _ => {
                return Err(ApiError::invalid_parameter(format!(
                    "unknown query parameter '{name}'; known are device, status and limit"
                )));
            }
        };
        if slot_taken {
            return Err(ApiError::invalid_parameter(format!(
                "query parameter '{name}' is given twice"
            )));
        }
    }
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    let commands = state
        .commands
        .blocking(move |q| q.list_by(device.as_deref(), status, limit))
        .await
        .map_err(queue_error)?;
    Ok(Json(CommandList {
        commands: commands.into_iter().map(CommandView::from).collect(),
    }))
}
