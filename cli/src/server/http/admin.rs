//! The admin token: checked on every `/api/v1` request, replaced by
//! `POST /api/v1/admin/token/rotate`.

use std::sync::RwLock;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, ApiState, ErrorBody, constant_time_eq};
use crate::datadir::DataDir;

/// The admin token in force, and the file that keeps it.
pub struct AdminToken {
    dir: DataDir,
    current: RwLock<String>,
    /// One rotation at a time, so that the file and memory agree.
    rotating: tokio::sync::Mutex<()>,
}

impl AdminToken {
    /// The token `token`, as read from `dir`'s `admin.token`.
    pub fn new(dir: DataDir, token: String) -> Self {
        AdminToken {
            dir,
            current: RwLock::new(token),
            rotating: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether `presented` is the token in force.
    pub fn matches(&self, presented: &str) -> bool {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        constant_time_eq(presented.as_bytes(), current.as_bytes())
    }

    /// Makes a new token, stores it durably in place of the old one, then
    /// puts it in force: the old token stops working as this returns. If
    /// storing fails, the old token stays in force.
    pub async fn rotate(&self) -> anyhow::Result<String> {
        let _one_at_a_time = self.rotating.lock().await;
        let dir = self.dir.clone();
        let token = tokio::task::spawn_blocking(move || {
            let token = crate::datadir::new_admin_token()?;
            dir.write_admin_token(&token)?;
            anyhow::Ok(token)
        })
        .await??;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = token.clone();
        Ok(token)
    }
}

/// A new admin token.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RotatedAdminToken {
    /// The admin token from now on; also written to <data-dir>/admin.token.
    #[schema(example = "trb_admin_5f0c...")]
    token: String,
}

/// Replaces the admin token.
///
/// The new token is written to `<data-dir>/admin.token` (atomically, mode
/// 0600) and is the only one that works from the moment this answers. No
/// body.
#[utoipa::path(
    post,
    path = "/api/v1/admin/token/rotate",
    tag = "admin",
    responses(
        (status = 200, description = "The new token", body = RotatedAdminToken),
        (status = 500, description = "`internal`: the token file could not be written; the old token still works", body = ErrorBody),
    )
)]
pub(super) async fn rotate_admin_token(
    State(state): State<ApiState>,
) -> Result<Json<RotatedAdminToken>, ApiError> {
    let token = state.admin_token.rotate().await.map_err(|e| {
        tracing::error!(error = format!("{e:#}"), "could not rotate the admin token");
        ApiError::internal(format!(
            "could not store a new admin token ({e:#}); the old one still works"
        ))
    })?;
    tracing::info!("the admin token was rotated");
    Ok(Json(RotatedAdminToken { token }))
}
