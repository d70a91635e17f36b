//! The HTTP API: health, SQL and device management, under `/api/v1`.
//!
//! Every `/api/v1` route needs `Authorization: Bearer <admin token>`.
//! Errors are JSON: `{"error": {"code": "...", "message": "...", "line": L, "column": C}}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::ipc::writer::StreamWriter;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tributary_engine::commands::CommandQueue;
use tributary_engine::event::now_millis;
use tributary_ingest::gateway::GatewayHandle;
use tributary_registry::SharedRegistry;
use tributary_sql::query::QueryResult;

use super::sql::SqlService;

/// The media type of Arrow IPC stream responses.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub sql: Arc<SqlService>,
    pub registry: SharedRegistry,
    pub commands: Arc<CommandQueue>,
    pub gateway: GatewayHandle,
    pub admin_token: Arc<String>,
}

/// The router of the whole API.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/sql", post(sql))
        .route("/devices", get(list_devices).post(create_device))
        .route("/devices/{id}", get(get_device).delete(delete_device))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin))
        .with_state(state);
    Router::new()
        .route("/health", get(health))
        .nest("/api/v1", api)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// An API error: HTTP status, a stable code, and a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    location: Option<tributary_sql::Location>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            location: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(l) = self.location {
            error["line"] = json!(l.line);
            error["column"] = json!(l.column);
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}

impl From<tributary_sql::Error> for ApiError {
    fn from(e: tributary_sql::Error) -> Self {
        use tributary_engine::Error as E;
        use tributary_sql::Error as S;
        let (status, code) = match &e {
            S::Syntax { .. } => (StatusCode::BAD_REQUEST, "sql_syntax"),
            S::Plan { .. } => (StatusCode::BAD_REQUEST, "sql_plan"),
            S::Engine(E::NotFound { .. }) => (StatusCode::NOT_FOUND, "not_found"),
            S::Engine(E::AlreadyExists { .. }) => (StatusCode::CONFLICT, "already_exists"),
            S::Engine(E::User(_)) => (StatusCode::BAD_REQUEST, "invalid_request"),
            S::Engine(E::Unavailable(_)) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            S::Execution(_) => (StatusCode::UNPROCESSABLE_ENTITY, "query_failed"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "SQL statement failed");
        }
        ApiError {
            status,
            code,
            location: e.location(),
            message: e.to_string(),
        }
    }
}

impl From<tributary_registry::Error> for ApiError {
    fn from(e: tributary_registry::Error) -> Self {
        use tributary_registry::Error as R;
        let (status, code) = match &e {
            R::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            R::AlreadyExists(_) => (StatusCode::CONFLICT, "already_exists"),
            R::InvalidId(_) | R::InvalidTag(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            R::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "registry request failed");
        }
        ApiError::new(status, code, e.to_string())
    }
}

async fn require_admin(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if constant_time_eq(token.as_bytes(), state.admin_token.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin token is not valid",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <admin token>`; the token is in <data-dir>/admin.token",
        )
        .into_response(),
    }
}

#[derive(Deserialize)]
struct SqlRequest {
    sql: String,
}

async fn sql(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: SqlRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the body must be JSON {{\"sql\": \"...\"}}: {e}"),
        )
    })?;
    let result = state.sql.execute(&request.sql).await?;
    let wants_arrow = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(ARROW_STREAM));
    if wants_arrow {
        let bytes = to_ipc(&result).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        let mut response = bytes.into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ARROW_STREAM));
        return Ok(response);
    }
    let rows = to_json_rows(&result)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let columns: Vec<_> = result
        .schema
        .fields()
        .iter()
        .map(|f| json!({"name": f.name(), "type": f.data_type().to_string()}))
        .collect();
    Ok(
        Json(json!({"columns": columns, "rows": rows, "row_count": result.num_rows()}))
            .into_response(),
    )
}

/// A result as an Arrow IPC stream.
pub fn to_ipc(result: &QueryResult) -> Result<Vec<u8>, arrow::error::ArrowError> {
    let mut writer = StreamWriter::try_new(Vec::new(), &result.schema)?;
    for b in &result.batches {
        writer.write(b)?;
    }
    writer.finish()?;
    writer.into_inner()
}

/// A result as JSON objects, one per row.
pub fn to_json_rows(
    result: &QueryResult,
) -> Result<Vec<serde_json::Value>, arrow::error::ArrowError> {
    let mut writer = arrow::json::writer::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow::json::writer::JsonArray>(Vec::new());
    for b in &result.batches {
        writer.write(b)?;
    }
    writer.finish()?;
    let bytes = writer.into_inner();
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&bytes).map_err(|e| arrow::error::ArrowError::JsonError(e.to_string()))
}

#[derive(Deserialize)]
struct CreateDevice {
    id: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// The answer to creating a device: the device and its secret token, shown once.
#[derive(Serialize, Deserialize)]
pub struct CreatedDevice {
    pub id: String,
    pub token: String,
    pub device: tributary_registry::Device,
}

async fn create_device(State(state): State<ApiState>, body: Bytes) -> Result<Response, ApiError> {
    let request: CreateDevice = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the body must be JSON {{\"id\": \"...\", \"tags\": {{...}}}}: {e}"),
        )
    })?;
    let (device, token) = state
        .registry
        .create_device(&request.id, request.tags, now_millis())
        .await?;
    refresh_devices(&state).await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedDevice {
            id: device.id.clone(),
            token,
            device,
        }),
    )
        .into_response())
}

async fn list_devices(State(state): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let devices = state.registry.list_devices().await?;
    let connected = state.gateway.connected_devices();
    let devices: Vec<_> = devices
        .into_iter()
        .map(|d| {
            let online = connected.contains(&d.id);
            let mut v = json!(d);
            v["connected"] = json!(online);
            v
        })
        .collect();
    Ok(Json(json!({ "devices": devices })))
}

async fn get_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let device = state.registry.get_device(&id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("device '{id}' does not exist"),
        )
    })?;
    let mut v = json!(device);
    v["connected"] = json!(state.gateway.connected_devices().contains(&id));
    Ok(Json(v))
}

async fn delete_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.registry.remove_device(&id).await?;
    refresh_devices(&state).await;
    // Deprovisioning: the credentials are gone; close the live connection and
    // let nothing more be delivered.
    state
        .gateway
        .disconnect(&id, "the device was removed from the registry");
    if let Err(e) = state.commands.expire_device(&id, now_millis()) {
        tracing::error!(device = %id, error = %e, "could not expire the removed device's commands");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Rules and queries see registry changes at once.
async fn refresh_devices(state: &ApiState) {
    if let Err(e) = state.sql.refresh_devices(&state.registry).await {
        tracing::error!(error = %e, "could not reload the devices table");
    }
}

/// Compares secrets without an early exit, so timing does not reveal how
/// much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
