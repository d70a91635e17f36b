//! The OpenAPI document: `GET /api/v1/openapi.json`, the error schema every
//! endpoint shares, and the bearer security scheme.
//!
//! The document is served without the admin token: it holds no data, only
//! the shape of the API, and tools (client generators, API explorers) read
//! it before they have a token.

use std::sync::LazyLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{OpenApi as _, ToSchema};

use super::{Access, ApiDoc, ROUTES};

/// The name of the admin token's security scheme in the document.
pub const SCHEME: &str = "admin_token";

/// Every error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `not_found`, `invalid_device`, ...
    #[schema(example = "not_found")]
    pub code: String,
    /// For people: what was wrong and where.
    #[schema(example = "device 'sensor-9' does not exist")]
    pub message: String,
    /// SQL errors: the line of the statement, 1-based.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// SQL errors: the column, 1-based.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<u64>,
}

/// Adds the bearer scheme and marks each operation with the access its
/// route has in [`ROUTES`]: the admin token, or none (`security: []`).
pub struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The admin token, from <data-dir>/admin.token (or \
                         POST /api/v1/admin/token/rotate)",
                    ))
                    .build(),
            ),
        );
        let admin = || vec![SecurityRequirement::new(SCHEME, Vec::<String>::new())];
        doc.security = Some(admin());
        for (path, item) in doc.paths.paths.iter_mut() {
            for (method, operation) in operations_mut(item) {
                let Some(operation) = operation else { continue };
                let access = ROUTES
                    .iter()
                    .find(|r| r.method == method && r.path == path)
                    .map(|r| r.access);
                // A documented operation with no route is caught by the
                // tests; it is left marked as needing the token.
                if access == Some(Access::Public) {
                    operation.security = Some(Vec::new());
                    continue;
                }
                operation.security = Some(admin());
                operation
                    .responses
                    .responses
                    .entry("401".to_string())
                    .or_insert_with(unauthorized);
            }
        }
    }
}

/// The answer every admin route gives without the token.
fn unauthorized() -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(
                "`unauthorized`: no `Authorization: Bearer` header, or not the admin token",
            )
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

/// The operations of a path item, by lowercase method.
pub fn operations_mut(item: &mut PathItem) -> [(&'static str, &mut Option<Operation>); 8] {
    [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("options", &mut item.options),
        ("head", &mut item.head),
        ("patch", &mut item.patch),
        ("trace", &mut item.trace),
    ]
}

/// The document as JSON, made once.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_json()
        // Serializing a document made of strings and maps cannot fail; if
        // it ever did, say so in the document rather than crash the server.
        .unwrap_or_else(|e| format!("{{\"error\": \"the OpenAPI document failed: {e}\"}}"))
});

/// This API's OpenAPI 3.1 document. Needs no token.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "admin",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"))
)]
pub(super) async fn openapi_json() -> Response {
    let mut response = DOCUMENT.as_str().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The methods `router` adds to `/api/v1/devices/import` for the device
    /// called `import`, and the documented routes they stand for.
    const IMPORT_ALIASES: &[(&str, &str)] = &[
        ("get", "/api/v1/devices/{id}"),
        ("patch", "/api/v1/devices/{id}"),
        ("delete", "/api/v1/devices/{id}"),
    ];

    /// (method, path) of every operation in the document.
    fn documented() -> BTreeSet<(String, String)> {
        let mut doc = ApiDoc::openapi();
        let mut out = BTreeSet::new();
        for (path, item) in doc.paths.paths.iter_mut() {
            for (method, operation) in operations_mut(item) {
                if operation.is_some() {
                    out.insert((method.to_string(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn the_document_lists_every_route_and_nothing_else() {
        let routes: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        assert_eq!(routes.len(), ROUTES.len(), "a route is declared twice");
        let documented = documented();
        let undocumented: Vec<_> = routes.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routes).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "routes whose handler documents another method or path: {undocumented:?}; \
             documented operations no route serves: {unrouted:?}"
        );
        for (method, stands_for) in IMPORT_ALIASES {
            assert!(
                documented.contains(&(method.to_string(), stands_for.to_string())),
                "{method} /api/v1/devices/import stands for an undocumented route"
            );
        }
    }

    #[test]
    fn security_follows_each_route_access() {
        let doc: serde_json::Value = serde_json::from_str(&DOCUMENT).unwrap();
        assert_eq!(
            doc["components"]["securitySchemes"][SCHEME]["scheme"],
            "bearer"
        );
        for route in ROUTES {
            let security = &doc["paths"][route.path][route.method]["security"];
            let expected = match route.access {
                Access::Public => serde_json::json!([]),
                Access::Admin => serde_json::json!([{ SCHEME: [] }]),
            };
            assert_eq!(security, &expected, "{} {}", route.method, route.path);
        }
    }

    #[test]
    fn every_operation_documents_its_answers() {
        let doc: serde_json::Value = serde_json::from_str(&DOCUMENT).unwrap();
        for route in ROUTES {
            let operation = &doc["paths"][route.path][route.method];
            let responses = operation["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{} {} documents no success",
                route.method,
                route.path
            );
            if route.access == Access::Admin {
                assert!(
                    responses.contains_key("401"),
                    "{} {} does not document 401",
                    route.method,
                    route.path
                );
            }
            // Path parameters are described.
            for name in route
                .path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            {
                let params = operation["parameters"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                assert!(
                    params
                        .iter()
                        .any(|p| p["name"] == name && p["in"] == "path"),
                    "{} {} does not describe path parameter {name}",
                    route.method,
                    route.path
                );
            }
        }
    }
}
