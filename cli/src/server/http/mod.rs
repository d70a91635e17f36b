//! The HTTP API: health, SQL, devices with their twins, certificates and
//! commands, enrollment groups and the admin token, under `/api/v1`.
//!
//! [`ROUTES`] lists every route once: [`router`] serves exactly those, and
//! the OpenAPI document ([`ApiDoc`], served at `GET /api/v1/openapi.json`)
//! is made from their handlers' `#[utoipa::path]` attributes; a test checks
//! that the two name the same methods and paths. Every route but `/health`
//! and the OpenAPI document needs `Authorization: Bearer <admin token>`.
//!
//! Beside them, outside `/api/v1` and the OpenAPI document, `GET /metrics`
//! serves Prometheus text without a token, as scrapers expect.
//!
//! Errors are JSON: `{"error": {"code": "...", "message": "...", "line": L,
//! "column": C}}` with a stable `code`. `docs/api.md` describes every
//! endpoint.
//!
//! Requests follow one rule for user errors: a body that is not JSON of the
//! documented shape (not JSON, unknown field, missing `id`, a field of the
//! wrong JSON type) is `400 invalid_request`; a well-formed body whose
//! values break the registry's rules (id alphabet, tag rules, metadata size,
//! an unknown status) is `422 invalid_device` (`invalid_group`,
//! `invalid_properties`, `invalid_certificate`, `invalid_command` for those
//! resources); a bad query parameter or option (`limit`, `tag`,
//! `expires_in_s`) is `422 invalid_parameter`.

mod admin;
mod certificates;
mod commands;
mod devices;
mod groups;
mod import;
mod metrics;
mod openapi;
mod twins;

use std::sync::Arc;

use arrow::ipc::writer::StreamWriter;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tributary_engine::commands::CommandQueue;
use tributary_ingest::gateway::GatewayHandle;
use tributary_ingest::tls::TlsFiles;
use tributary_registry::SharedRegistry;
use tributary_sql::query::QueryResult;
use utoipa::ToSchema;

pub use admin::AdminToken;
use openapi::Security;
pub use openapi::{ErrorBody, ErrorDetail};

use super::sql::SqlService;

/// The media type of Arrow IPC stream responses.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// The largest request body, but for an import. Twin documents (at most
/// 1 MiB of properties) fit with room for whitespace.
pub const BODY_MAX_BYTES: usize = 2 << 20;
/// How much of a too-large body is read and dropped before the 413.
const DRAIN_MAX_BYTES: usize = 64 << 20;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub sql: Arc<SqlService>,
    pub registry: SharedRegistry,
    pub commands: Arc<CommandQueue>,
    pub gateway: GatewayHandle,
    /// The admin token, which `POST /admin/token/rotate` replaces.
    pub admin_token: Arc<AdminToken>,
    /// The development CA, which issues device certificates.
    pub tls: TlsFiles,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: `/health` and the OpenAPI document.
    Public,
    /// Only with the admin token.
    Admin,
}

/// One route of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub access: Access,
    /// Lowercase, as in an OpenAPI path item: `get`, `post`, ...
    pub method: &'static str,
    /// As in the OpenAPI document, `{name}` for a path parameter.
    pub path: &'static str,
}

/// Declares every route once, for both the router and the OpenAPI
/// document: `Access method "path" handler;`.
macro_rules! routes {
    ($($access:ident $method:ident $path:literal $($handler:ident)::+;)*) => {
        /// Every route of the API. [`router`] serves these (and nothing
        /// else but the `import` aliases and `GET /metrics`); the OpenAPI
        /// document lists their handlers.
        pub const ROUTES: &[Route] = &[
            $(Route { access: Access::$access, method: stringify!($method), path: $path },)*
        ];

        /// The routes of [`ROUTES`]: those anyone may call, and those that
        /// need the admin token.
        fn table_routers() -> (Router<ApiState>, Router<ApiState>) {
            let (mut public, mut admin) = (Router::new(), Router::new());
            $(
                let handler = axum::routing::$method($($handler)::+);
                match Access::$access {
                    Access::Public => public = public.route($path, handler),
                    Access::Admin => admin = admin.route($path, handler),
                }
            )*
            (public, admin)
        }

        /// The OpenAPI 3.1 document of the API.
        #[derive(utoipa::OpenApi)]
        #[openapi(
            info(
                title = "Tributary API",
                description = "Manage a Tributary server: devices, their twins, certificates \
                               and commands, enrollment groups, SQL. See docs/api.md."
            ),
            paths($($($handler)::+),*),
            modifiers(&Security),
            tags(
                (name = "devices", description = "The device registry"),
                (name = "twins", description = "Desired and reported properties"),
                (name = "certificates", description = "X.509 client certificates of devices"),
                (name = "commands", description = "Commands to devices"),
                (name = "enrollment-groups", description = "Zero-touch provisioning"),
                (name = "sql", description = "Streams, rules and queries"),
                (name = "admin", description = "The server itself")
            )
        )]
        pub struct ApiDoc;
    };
}

routes! {
    Public get "/health" health;
    Public get "/api/v1/openapi.json" openapi::openapi_json;
    Admin post "/api/v1/sql" sql;
    Admin get "/api/v1/devices" devices::list_devices;
    Admin post "/api/v1/devices" devices::create_device;
    Admin post "/api/v1/devices/import" import::import_devices;
    Admin get "/api/v1/devices/{id}" devices::get_device;
    Admin patch "/api/v1/devices/{id}" devices::update_device;
    Admin delete "/api/v1/devices/{id}" devices::delete_device;
    Admin post "/api/v1/devices/{id}/disable" devices::disable_device;
    Admin post "/api/v1/devices/{id}/enable" devices::enable_device;
    Admin post "/api/v1/devices/{id}/keys/{slot}/rotate" devices::rotate_key;
    Admin post "/api/v1/devices/{id}/token" devices::issue_token;
    Admin get "/api/v1/devices/{id}/twin" twins::get_twin;
    Admin patch "/api/v1/devices/{id}/twin/desired" twins::patch_desired;
    Admin put "/api/v1/devices/{id}/twin/desired" twins::replace_desired;
    Admin get "/api/v1/devices/{id}/certificates" certificates::list_certificates;
    Admin post "/api/v1/devices/{id}/certificates" certificates::add_certificate;
    Admin post "/api/v1/devices/{id}/certificates/{thumbprint}/revoke" certificates::revoke_certificate;
    Admin post "/api/v1/devices/{id}/commands" commands::send_command;
    Admin post "/api/v1/devices/{id}/calls" commands::call_command;
    Admin get "/api/v1/commands" commands::list_commands;
    Admin get "/api/v1/commands/{id}" commands::get_command;
    Admin get "/api/v1/enrollment-groups" groups::list_groups;
    Admin post "/api/v1/enrollment-groups" groups::create_group;
    Admin get "/api/v1/enrollment-groups/{name}" groups::get_group;
    Admin patch "/api/v1/enrollment-groups/{name}" groups::update_group;
    Admin delete "/api/v1/enrollment-groups/{name}" groups::delete_group;
    Admin post "/api/v1/enrollment-groups/{name}/keys/{slot}/rotate" groups::rotate_group_key;
    Admin post "/api/v1/admin/token/rotate" admin::rotate_admin_token;
}

/// The router of the whole API.
pub fn router(state: ApiState) -> Router {
    let (public, admin) = table_routers();
    // `import` is also a valid device id, but the static `/devices/import`
    // route shadows `/devices/{id}` for it: these answer the `{id}` route's
    // methods for the device called `import`.
    let admin = admin
        .route(
            "/api/v1/devices/import",
            get(|State(s): State<ApiState>| async move { devices::get_one(&s, "import").await })
                .patch(|State(s): State<ApiState>, Body(body): Body| async move {
                    devices::update_one(&s, "import", &body).await
                })
                .delete(|State(s): State<ApiState>| async move {
                    devices::delete_one(&s, "import").await
                }),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    // Prometheus text, not JSON, and not part of the versioned API: served
    // beside the route table, so the OpenAPI document leaves it out.
    let public = public.route("/metrics", get(metrics::metrics));
    public
        .merge(admin)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .with_state(state)
}

/// The answer of `GET /health`.
#[derive(Serialize, ToSchema)]
struct Health {
    #[schema(example = "ok")]
    status: &'static str,
}

/// Whether the server is up.
#[utoipa::path(
    get,
    path = "/health",
    tag = "admin",
    responses((status = 200, description = "The server is up", body = Health))
)]
async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
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

    fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The `{"code", "message"}` object, as an import row reports it.
    fn body(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code.to_string(),
            message: self.message.clone(),
            line: self.location.map(|l| l.line),
            column: self.location.map(|l| l.column),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.body() };
        (self.status, Json(body)).into_response()
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
            R::NotFound(_) | R::Missing(_) => (StatusCode::NOT_FOUND, "not_found"),
            R::AlreadyExists(_) => (StatusCode::CONFLICT, "already_exists"),
            R::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            R::InvalidId(_) | R::InvalidTag(_) | R::InvalidMetadata(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_device")
            }
            R::InvalidProperties(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_properties"),
            // Only `If-Match` makes an update conditional, so a mismatch
            // is the precondition failing (RFC 9110, 13.1.1).
            R::VersionMismatch(_) => (StatusCode::PRECONDITION_FAILED, "version_mismatch"),
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
        Some(token) if state.admin_token.matches(token) => next.run(request).await,
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

/// The body of `POST /sql`.
#[derive(Deserialize, ToSchema)]
struct SqlRequest {
    /// One statement.
    #[schema(example = "SELECT id, status FROM devices")]
    sql: String,
}

/// Rows as JSON (without `Accept: application/vnd.apache.arrow.stream`).
#[derive(Serialize, ToSchema)]
struct SqlAnswer {
    columns: Vec<SqlColumn>,
    /// One object per row, column name to value.
    #[schema(value_type = Vec<Object>)]
    rows: Vec<Value>,
    row_count: usize,
}

#[derive(Serialize, ToSchema)]
struct SqlColumn {
    name: String,
    /// The Arrow type, e.g. `Utf8`, `Float64`, `Timestamp(Millisecond, Some("UTC"))`.
    #[serde(rename = "type")]
    data_type: String,
}

/// Runs one SQL statement.
///
/// With `Accept: application/vnd.apache.arrow.stream` the rows come back as
/// an Arrow IPC stream.
#[utoipa::path(
    post,
    path = "/api/v1/sql",
    tag = "sql",
    request_body = SqlRequest,
    responses(
        (status = 200, description = "The statement's rows (none for DDL)", body = SqlAnswer,
         content_type = "application/json"),
        (status = 400, description = "`invalid_request`, `sql_syntax`, `sql_plan` (with `line` and `column`)", body = ErrorBody),
        (status = 404, description = "`not_found`: no such stream or rule", body = ErrorBody),
        (status = 409, description = "`already_exists`", body = ErrorBody),
        (status = 422, description = "`query_failed`", body = ErrorBody),
        (status = 503, description = "`unavailable`: the event log is full", body = ErrorBody),
    )
)]
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
        let bytes = to_ipc(&result).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut response = bytes.into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ARROW_STREAM));
        return Ok(response);
    }
    let rows = to_json_rows(&result).map_err(|e| ApiError::internal(e.to_string()))?;
    let columns = result
        .schema
        .fields()
        .iter()
        .map(|f| SqlColumn {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
        })
        .collect();
    Ok(Json(SqlAnswer {
        columns,
        rows,
        row_count: result.num_rows(),
    })
    .into_response())
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

/// Rules and queries see registry changes at once.
async fn refresh_devices(state: &ApiState) {
    if let Err(e) = state.sql.refresh_devices().await {
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
