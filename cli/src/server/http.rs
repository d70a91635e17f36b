//! The HTTP API: health, SQL and device management, under `/api/v1`.
//!
//! Every `/api/v1` route needs `Authorization: Bearer <admin token>`.
//! Errors are JSON: `{"error": {"code": "...", "message": "...", "line": L, "column": C}}`
//! with a stable `code`. `docs/api.md` describes every endpoint.
//!
//! Device requests follow one rule for user errors: a body that is not JSON
//! of the documented shape (not JSON, unknown field, missing `id`, a field of
//! the wrong JSON type) is `400 invalid_request`; a well-formed body whose
//! values break the registry's rules (id alphabet, tag rules, metadata size,
//! an unknown status) is `422 invalid_device`; a bad query parameter or
//! option (`limit`, `tag`, `expires_in_s`) is `422 invalid_parameter`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::ipc::writer::StreamWriter;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tributary_engine::commands::CommandQueue;
use tributary_engine::event::now_millis;
use tributary_ingest::gateway::GatewayHandle;
use tributary_registry::{
    Device, DeviceFilter, DeviceKeys, DevicePatch, DeviceStatus, KeySlot, MAX_PAGE, NewDevice,
    SharedRegistry, validate_device_id, validate_tags,
};
use tributary_sql::query::QueryResult;

use super::sql::SqlService;

/// The media type of Arrow IPC stream responses.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// The largest request body, but for an import.
pub const BODY_MAX_BYTES: usize = 2 << 20;
/// How much of a too-large body is read and dropped before the 413.
const DRAIN_MAX_BYTES: usize = 64 << 20;
/// The largest `POST /devices/import` body.
pub const IMPORT_MAX_BYTES: usize = 16 << 20;
/// The most devices one import creates.
pub const IMPORT_MAX_ROWS: usize = 100_000;

const YEAR_S: i64 = 31_557_600;
/// How long a device token lasts unless asked otherwise: long enough that
/// `device add` hands out a token that works like a lasting credential.
pub const TOKEN_DEFAULT_S: i64 = 10 * YEAR_S;
/// The longest a token may last.
pub const TOKEN_MAX_S: i64 = 100 * YEAR_S;

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
    // `import` is also a valid device id: the static route would shadow
    // `/devices/{id}` for it, so it answers those methods itself.
    let import = post(import_devices)
        .get(|State(s): State<ApiState>| async move { get_device(&s, "import").await })
        .patch(|State(s): State<ApiState>, Body(body): Body| async move {
            update_device(&s, "import", &body).await
        })
        .delete(|State(s): State<ApiState>| async move { delete_device(&s, "import").await });
    let api = Router::new()
        .route("/sql", post(sql))
        .route("/devices", get(list_devices).post(create_device))
        .route("/devices/import", import)
        .route(
            "/devices/{id}",
            get(
                |State(s): State<ApiState>, Path(id): Path<String>| async move {
                    get_device(&s, &id).await
                },
            )
            .patch(
                |State(s): State<ApiState>, Path(id): Path<String>, Body(body): Body| async move {
                    update_device(&s, &id, &body).await
                },
            )
            .delete(
                |State(s): State<ApiState>, Path(id): Path<String>| async move {
                    delete_device(&s, &id).await
                },
            ),
        )
        .route(
            "/devices/{id}/disable",
            post(
                |State(s): State<ApiState>, Path(id): Path<String>| async move {
                    set_status(&s, &id, DeviceStatus::Disabled).await
                },
            ),
        )
        .route(
            "/devices/{id}/enable",
            post(
                |State(s): State<ApiState>, Path(id): Path<String>| async move {
                    set_status(&s, &id, DeviceStatus::Enabled).await
                },
            ),
        )
        .route("/devices/{id}/keys/{slot}/rotate", post(rotate_key))
        .route("/devices/{id}/token", post(issue_token))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin))
        .with_state(state);
    Router::new()
        .route("/health", get(health))
        .nest("/api/v1", api)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
}

async fn health() -> Json<Value> {
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

    fn invalid_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    fn invalid_device(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_device", message)
    }

    fn invalid_parameter(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_parameter",
            message,
        )
    }

    fn not_found(id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("device '{id}' does not exist"),
        )
    }

    /// The `{"code", "message"}` object, as an import row reports it.
    fn body(&self) -> Value {
        json!({"code": self.code, "message": self.message})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = self.body();
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
            R::InvalidId(_) | R::InvalidTag(_) | R::InvalidMetadata(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_device")
            }
            R::InvalidRequest(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter"),
            R::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            _ if e.is_user_error() => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "registry request failed");
        }
        ApiError::new(status, code, e.to_string())
    }
}

/// A registry error for a request whose device id came from the path: an id
/// that could never exist names no device, so it is a 404 like any other.
fn for_path(id: &str) -> impl FnOnce(tributary_registry::Error) -> ApiError + '_ {
    move |e| match e {
        tributary_registry::Error::InvalidId(reason) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("device '{id}' does not exist ({reason})"),
        ),
        e => e.into(),
    }
}

/// The request body, at most `MAX` bytes; a larger one is a JSON `413`.
///
/// Past the limit the rest of the body is still read (up to
/// [`DRAIN_MAX_BYTES`]) and dropped, so that a client still sending reads
/// the 413 instead of a reset connection: `tributary device import` of a
/// file that is too big then says so.
struct Body<const MAX: usize = BODY_MAX_BYTES>(Bytes);

impl<S: Send + Sync, const MAX: usize> FromRequest<S> for Body<MAX> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let mut stream = request.into_body().into_data_stream();
        let mut body = bytes::BytesMut::new();
        let mut drained = 0usize;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::invalid_request(format!("the request body could not be read: {e}"))
            })?;
            if drained > 0 || body.len() + chunk.len() > MAX {
                drained += chunk.len();
                if drained > DRAIN_MAX_BYTES {
                    break;
                }
                continue;
            }
            body.extend_from_slice(&chunk);
        }
        if drained > 0 {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the request body is over {} MiB, the most this endpoint takes",
                    MAX >> 20
                ),
            ));
        }
        Ok(Body(body.freeze()))
    }
}

/// Parses a JSON body; `shape` says what was expected.
fn parse_body<T: DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_request(format!("the body must be JSON {shape}: {e}")))
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
    Body(body): Body,
) -> Result<Response, ApiError> {
    let request: SqlRequest = parse_body(&body, "{\"sql\": \"...\"}")?;
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
pub fn to_json_rows(result: &QueryResult) -> Result<Vec<Value>, arrow::error::ArrowError> {
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

/// A device as the API shows it: the registry's record and whether it is
/// connected now.
fn device_json(device: &Device, connected: bool) -> Value {
    let mut v = json!(device);
    v["connected"] = json!(connected);
    v
}

fn parse_status(text: &str) -> Result<DeviceStatus, ApiError> {
    DeviceStatus::parse(text).ok_or_else(|| {
        ApiError::invalid_device(format!(
            "status must be 'enabled' or 'disabled', got '{text}'"
        ))
    })
}

/// The body of `POST /devices`, and one row of an import.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDevice {
    id: String,
    tags: Option<BTreeMap<String, String>>,
    metadata: Option<Map<String, Value>>,
    status: Option<String>,
}

const CREATE_SHAPE: &str = "{\"id\": \"...\", \"tags\"?: {\"k\": \"v\"}, \"metadata\"?: {...}, \
                            \"status\"?: \"enabled\"|\"disabled\"}";

impl CreateDevice {
    fn into_new_device(self) -> Result<NewDevice, ApiError> {
        Ok(NewDevice {
            status: self.status.as_deref().map(parse_status).transpose()?,
            id: self.id,
            tags: self.tags.unwrap_or_default(),
            metadata: self.metadata.unwrap_or_default(),
        })
    }
}

/// Creates a device and a long-lived token for it: the device with its keys
/// and token, shown this once.
async fn create_one(state: &ApiState, new: NewDevice) -> Result<Value, ApiError> {
    let (device, keys) = state.registry.create_device(new, now_millis()).await?;
    let DeviceKeys { primary, secondary } = keys;
    let expires_at = now_millis() / 1000 + TOKEN_DEFAULT_S;
    let token = state.registry.issue_token(&device.id, expires_at).await?;
    let mut v = json!(device);
    v["primary_key"] = json!(primary);
    v["secondary_key"] = json!(secondary);
    v["token"] = json!(token);
    v["token_expires_at"] = json!(expires_at);
    Ok(v)
}

async fn create_device(
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

async fn list_devices(State(state): State<ApiState>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let filter = parse_filter(&uri)?;
    let page = state.registry.list_devices(&filter).await?;
    let connected = state.gateway.connected_devices();
    let devices: Vec<_> = page
        .devices
        .iter()
        .map(|d| device_json(d, connected.contains(&d.id)))
        .collect();
    Ok(Json(json!({ "devices": devices, "next": page.next })))
}

async fn get_device(state: &ApiState, id: &str) -> Result<Json<Value>, ApiError> {
    let device = state
        .registry
        .get_device(id)
        .await
        .map_err(for_path(id))?
        .ok_or_else(|| ApiError::not_found(id))?;
    let connected = state.gateway.connected_devices().contains(id);
    Ok(Json(device_json(&device, connected)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchDevice {
    tags: Option<BTreeMap<String, String>>,
    metadata: Option<Map<String, Value>>,
    status: Option<String>,
}

async fn update_device(state: &ApiState, id: &str, body: &[u8]) -> Result<Json<Value>, ApiError> {
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

async fn set_status(
    state: &ApiState,
    id: &str,
    status: DeviceStatus,
) -> Result<Json<Value>, ApiError> {
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
) -> Result<Json<Value>, ApiError> {
    // Disabling needs no disconnect here: the registry announces it and the
    // gateway closes the device's sessions with the reason docs/security.md gives.
    let device = state
        .registry
        .update_device(id, patch, now_millis())
        .await
        .map_err(for_path(id))?;
    refresh_devices(state).await;
    let connected = state.gateway.connected_devices().contains(id);
    Ok(Json(device_json(&device, connected)))
}

async fn delete_device(state: &ApiState, id: &str) -> Result<StatusCode, ApiError> {
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

async fn rotate_key(
    State(state): State<ApiState>,
    Path((id, slot)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let slot = match slot.as_str() {
        "primary" => KeySlot::Primary,
        "secondary" => KeySlot::Secondary,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("a device has no key '{slot}'; its keys are 'primary' and 'secondary'"),
            ));
        }
    };
    let key = state
        .registry
        .rotate_key(&id, slot, now_millis())
        .await
        .map_err(for_path(&id))?;
    Ok(Json(json!({"id": id, "slot": slot, "key": key})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    expires_in_s: Option<i64>,
}

async fn issue_token(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(
        json!({"id": id, "token": token, "expires_at": expires_at}),
    ))
}

/// The formats `POST /devices/import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImportFormat {
    JsonLines,
    Csv,
}

impl ImportFormat {
    fn from_headers(headers: &HeaderMap) -> Result<ImportFormat, ApiError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "text/csv" => Ok(ImportFormat::Csv),
            "application/x-ndjson"
            | "application/jsonl"
            | "application/x-jsonlines"
            | "application/json-lines"
            | "application/json" => Ok(ImportFormat::JsonLines),
            _ => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "Content-Type '{content_type}' is not an import format; send JSON lines \
                     (application/x-ndjson) or CSV (text/csv)"
                ),
            )),
        }
    }
}

/// One row of an import file: the line it starts on, its id if one could be
/// read, and the device it describes or why it cannot be one.
struct ImportRow {
    line: usize,
    id: Option<String>,
    device: Result<NewDevice, ApiError>,
}

async fn import_devices(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Body(body): Body<IMPORT_MAX_BYTES>,
) -> Result<Json<Value>, ApiError> {
    let format = ImportFormat::from_headers(&headers)?;
    let text = std::str::from_utf8(&body).map_err(|e| {
        ApiError::invalid_request(format!(
            "the body is not UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    let rows = match format {
        ImportFormat::JsonLines => json_rows(text)?,
        ImportFormat::Csv => csv_rows(text)?,
    };
    if rows.len() > IMPORT_MAX_ROWS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the import has {} rows; at most {IMPORT_MAX_ROWS} are taken at once",
                rows.len()
            ),
        ));
    }
    // The import goes on if the client hangs up, so that what was created is
    // also in the devices table.
    let task = tokio::spawn(async move {
        let attempted = rows.iter().any(|r| r.device.is_ok());
        let report = import_rows(&state, rows).await;
        if attempted {
            refresh_devices(&state).await;
        }
        report
    });
    let report = task.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the import failed: {e}"),
        )
    })?;
    Ok(Json(report))
}

/// Creates each row's device in order; a bad row is reported and changes nothing.
async fn import_rows(state: &ApiState, rows: Vec<ImportRow>) -> Value {
    let mut first_line: HashMap<String, usize> = HashMap::new();
    let mut results = Vec::with_capacity(rows.len());
    let (mut created, mut failed) = (0u64, 0u64);
    for row in rows {
        let outcome = match row.device {
            Err(e) => Err(e),
            Ok(new) => match first_line.get(&new.id) {
                Some(&line) => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "duplicate_id",
                    format!("device '{}' is also on line {line} of this import", new.id),
                )),
                None => {
                    first_line.insert(new.id.clone(), row.line);
                    create_one(state, new).await
                }
            },
        };
        match outcome {
            Ok(mut device) => {
                created += 1;
                device["line"] = json!(row.line);
                device["ok"] = json!(true);
                results.push(device);
            }
            Err(e) => {
                failed += 1;
                let mut r = json!({"line": row.line, "ok": false, "error": e.body()});
                if let Some(id) = row.id {
                    r["id"] = json!(id);
                }
                results.push(r);
            }
        }
    }
    json!({"created": created, "failed": failed, "results": results})
}

/// JSON lines: one `POST /devices` body per line; blank lines are skipped.
fn json_rows(text: &str) -> Result<Vec<ImportRow>, ApiError> {
    if text.trim_start().starts_with('[') {
        return Err(ApiError::invalid_request(
            "the body is a JSON array; send one JSON object per line",
        ));
    }
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let device = serde_json::from_str::<CreateDevice>(line)
            .map_err(|e| {
                ApiError::invalid_request(format!("not a JSON object {CREATE_SHAPE}: {e}"))
            })
            .and_then(CreateDevice::into_new_device);
        let id = match &device {
            Ok(d) => Some(d.id.clone()),
            Err(_) => serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| v.get("id")?.as_str().map(str::to_string)),
        };
        rows.push(ImportRow {
            line: i + 1,
            id,
            device,
        });
    }
    Ok(rows)
}

/// The columns an import CSV may have; `id` is required.
const CSV_COLUMNS: [&str; 4] = ["id", "tags", "metadata", "status"];

/// CSV with a header naming some of `id,tags,metadata,status`; tags are
/// `k=v;k2=v2`, metadata a JSON object, empty cells mean none.
fn csv_rows(text: &str) -> Result<Vec<ImportRow>, ApiError> {
    let mut records = csv_records(text)?.into_iter();
    let Some((_, header)) = records.next() else {
        return Ok(Vec::new());
    };
    let header: Vec<String> = header
        .iter()
        .map(|h| h.trim().trim_start_matches('\u{feff}').to_ascii_lowercase())
        .collect();
    for (i, name) in header.iter().enumerate() {
        if !CSV_COLUMNS.contains(&name.as_str()) {
            return Err(ApiError::invalid_request(format!(
                "line 1: unknown CSV column '{name}'; the columns are id, tags, metadata, status"
            )));
        }
        if header[..i].contains(name) {
            return Err(ApiError::invalid_request(format!(
                "line 1: CSV column '{name}' appears twice"
            )));
        }
    }
    let column = |name: &str| header.iter().position(|h| h == name);
    let Some(id_col) = column("id") else {
        return Err(ApiError::invalid_request(
            "line 1: the CSV header has no 'id' column (expected id,tags,metadata,status)",
        ));
    };
    let (tags_col, metadata_col, status_col) =
        (column("tags"), column("metadata"), column("status"));
    Ok(records
        .map(|(line, fields)| {
            let id = fields.get(id_col).cloned();
            let device = if fields.len() != header.len() {
                Err(ApiError::invalid_request(format!(
                    "{} fields where the header has {} ({})",
                    fields.len(),
                    header.len(),
                    header.join(",")
                )))
            } else {
                let cell = |col: Option<usize>| col.map(|c| fields[c].as_str()).unwrap_or("");
                csv_device(
                    &fields[id_col],
                    cell(tags_col),
                    cell(metadata_col),
                    cell(status_col),
                )
            };
            ImportRow { line, id, device }
        })
        .collect())
}

fn csv_device(id: &str, tags: &str, metadata: &str, status: &str) -> Result<NewDevice, ApiError> {
    let mut tag_map = BTreeMap::new();
    for pair in tags.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(ApiError::invalid_device(format!(
                "tag '{pair}' is not key=value (tags are written k=v;k2=v2)"
            )));
        };
        if tag_map.insert(k.to_string(), v.to_string()).is_some() {
            return Err(ApiError::invalid_device(format!(
                "tag '{k}' is given twice"
            )));
        }
    }
    let metadata = if metadata.trim().is_empty() {
        Map::new()
    } else {
        serde_json::from_str(metadata).map_err(|e| {
            ApiError::invalid_request(format!("metadata must be a JSON object: {e}"))
        })?
    };
    let status = status.trim();
    Ok(NewDevice {
        id: id.to_string(),
        tags: tag_map,
        metadata,
        status: if status.is_empty() {
            None
        } else {
            Some(parse_status(status)?)
        },
    })
}

/// Splits CSV (RFC 4180: `,` separators, `"` quoting with `""` for a quote,
/// LF or CRLF line ends) into records, each with the line it starts on.
/// Blank lines are skipped. A quoted field may span lines, which JSON
/// metadata sometimes does.
fn csv_records(text: &str) -> Result<Vec<(usize, Vec<String>)>, ApiError> {
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let (mut line, mut start_line) = (1, 1);
    let mut in_quotes = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => in_quotes = true,
            ',' => fields.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                end_record(&mut fields, &mut field, &mut records, start_line);
                line += 1;
                start_line = line;
            }
            c => field.push(c),
        }
    }
    if in_quotes {
        return Err(ApiError::invalid_request(format!(
            "line {start_line}: a quoted CSV field is never closed"
        )));
    }
    if !field.is_empty() || !fields.is_empty() {
        end_record(&mut fields, &mut field, &mut records, start_line);
    }
    Ok(records)
}

/// Ends the record being read; a blank line is no record.
fn end_record(
    fields: &mut Vec<String>,
    field: &mut String,
    records: &mut Vec<(usize, Vec<String>)>,
    start_line: usize,
) {
    fields.push(std::mem::take(field));
    let record = std::mem::take(fields);
    if !(record.len() == 1 && record[0].trim().is_empty()) {
        records.push((start_line, record));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_records_quote_and_count_lines() {
        let text = "id,metadata\r\na,\"{\"\"k\"\": 1}\"\n\nb,\"{\n}\"\nc,\n";
        let records = csv_records(text).unwrap();
        let lines: Vec<usize> = records.iter().map(|r| r.0).collect();
        assert_eq!(lines, [1, 2, 4, 6]);
        assert_eq!(records[1].1, ["a", "{\"k\": 1}"]);
        assert_eq!(records[2].1, ["b", "{\n}"]);
        assert_eq!(records[3].1, ["c", ""]);
        assert!(
            csv_records("id\n\"open\n")
                .unwrap_err()
                .message
                .contains("line 2")
        );
    }

    #[test]
    fn csv_cells_become_devices() {
        let d = csv_device("a", "site=n; floor=3", "{\"x\": [1]}", "disabled").unwrap();
        assert_eq!(d.tags["floor"], "3");
        assert_eq!(d.metadata["x"], json!([1]));
        assert_eq!(d.status, Some(DeviceStatus::Disabled));
        assert_eq!(
            csv_device("a", "site", "", "").unwrap_err().code,
            "invalid_device"
        );
        assert_eq!(
            csv_device("a", "", "[1]", "").unwrap_err().code,
            "invalid_request"
        );
        assert_eq!(
            csv_device("a", "", "", "paused").unwrap_err().code,
            "invalid_device"
        );
    }

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
