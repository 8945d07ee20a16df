//! The admin API: policies at run time. Off unless an admin token is configured; every call
//! needs `Authorization: Bearer <token>`. Uploading a plugin runs code in this process, so an
//! upload is checked (no imports, one supported world, smoke test) before it can be activated.
//!
//! - `POST /admin/policies?name=N` (body: the component's bytes): register a plugin.
//! - `GET /admin/policies`: registered plugins, the active policy per kind, their counters.
//! - `POST /admin/policies/activate` `{"kind": "eviction", "name": "lfu"}`: hot swap (between
//!   forward passes); `name` is an uploaded plugin or a bundled one. `"arm": "b"` swaps that
//!   A/B arm's policy (default: the default arm).
//! - `POST /admin/policies/rollback` `{"kind": "eviction"}` (optionally `"arm"`): back to the
//!   previous policy.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use super::arms::{Arms, DEFAULT_ARM};
use super::openai::ApiError;
use super::AppState;
use crate::policy::check::{check, CheckReport};
use crate::policy::{PolicyKind, PolicySource};

pub struct Admin {
    token: String,
    dir: tempfile::TempDir,
    registry: Mutex<HashMap<String, (PolicySource, CheckReport)>>,
    /// Per (arm, kind): the policies activated so far, the current one last.
    active: Mutex<HashMap<(usize, PolicyKind), Vec<PolicySource>>>,
}

impl Admin {
    pub fn new(token: String, arms: &Arms) -> anyhow::Result<Self> {
        anyhow::ensure!(!token.is_empty(), "the admin token must not be empty");
        let mut active = HashMap::new();
        for (i, a) in arms.arms.iter().enumerate() {
            for (kind, source) in a.config.sources() {
                active.insert((i, kind), vec![source.clone()]);
            }
        }
        Ok(Self {
            token,
            dir: tempfile::Builder::new()
                .prefix("moehost-policies-")
                .tempdir()?,
            registry: Mutex::new(HashMap::new()),
            active: Mutex::new(active),
        })
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Constant-time comparison: the token is a secret.
        let ok = given.is_some_and(|g| {
            g.len() == self.token.len()
                && g.bytes()
                    .zip(self.token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        });
        if ok {
            Ok(())
        } else {
            Err(ApiError::status(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "admin calls need Authorization: Bearer <admin token>",
            ))
        }
    }
}

fn admin(app: &AppState, headers: &HeaderMap) -> Result<std::sync::Arc<Admin>, ApiError> {
    let a = app.admin.clone().ok_or_else(|| {
        ApiError::status(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "the admin API is disabled",
        )
    })?;
    a.authorize(headers)?;
    Ok(a)
}

#[derive(Deserialize)]
pub struct UploadQuery {
    #[serde(default)]
    name: Option<String>,
}

/// Longest plugin name the registry takes.
const MAX_NAME: usize = 64;

pub async fn upload(
    State(app): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    // Compiling and smoke-testing a plugin blocks: keep it off the async workers.
    blocking(move || upload_blocking(app, headers, q.map(|q| q.0), body)).await
}

fn upload_blocking(
    app: AppState,
    headers: HeaderMap,
    q: Result<UploadQuery, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    let r = (|| -> Result<Response, ApiError> {
        // Authentication first: nothing about the request is answered without the token.
        let a = admin(&app, &headers)?;
        let q = q.map_err(|e| ApiError::invalid(format!("bad query string: {e}")))?;
        let Some(name) = q.name else {
            return Err(ApiError::invalid(
                "the plugin's name is missing (?name=...)",
            ));
        };
        if name.is_empty()
            || name.len() > MAX_NAME
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ApiError::invalid(format!(
                "name must be 1 to {MAX_NAME} letters, digits, '-' or '_'"
            )));
        }
        // A fresh file per upload: a rejected upload never replaces a registered plugin, and
        // rollback history keeps pointing at the bytes that were active.
        static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path: PathBuf = a.dir.path().join(format!("{name}-{n}.wasm"));
        std::fs::write(&path, &body).map_err(|e| {
            ApiError::status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("cannot store the plugin: {e}"),
            )
        })?;
        let source = PolicySource::File(path);
        let report =
            check(&source).map_err(|e| ApiError::invalid(format!("plugin rejected: {e:#}")))?;
        let out = json!({"name": name, "check": &report});
        a.registry.lock().unwrap().insert(name, (source, report));
        Ok(Json(out).into_response())
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

pub async fn list(State(app): State<AppState>, headers: HeaderMap) -> Response {
    blocking(move || list_blocking(app, headers)).await
}

fn list_blocking(app: AppState, headers: HeaderMap) -> Response {
    let r = (|| -> Result<Response, ApiError> {
        let a = admin(&app, &headers)?;
        let registered: Vec<_> = a
            .registry
            .lock()
            .unwrap()
            .iter()
            .map(|(n, (_, r))| json!({"name": n, "kind": r.kind, "version": r.version, "policy": r.name, "description": r.description}))
            .collect();
        let active_by_arm = a.active.lock().unwrap().clone();
        let arms: Vec<_> = app
            .arms
            .arms
            .iter()
            .enumerate()
            .map(|(i, arm)| {
                let active: HashMap<String, String> = active_by_arm
                    .iter()
                    .filter(|((j, _), _)| *j == i)
                    .map(|((_, k), v)| {
                        (
                            k.to_string(),
                            v.last().map(|s| s.describe()).unwrap_or_default(),
                        )
                    })
                    .collect();
                json!({"arm": arm.name, "weight": arm.weight, "active": active,
                       "stats": arm.store.stats().policies})
            })
            .collect();
        let shadows = app.shadows.as_ref().as_ref().map(|s| {
            json!({"arm": s.arm, "device_slots": s.device_slots, "policies": s.stats(),
                   "dropped_steps": s.dropped_steps.load(std::sync::atomic::Ordering::Relaxed)})
        });
        let default = &arms[0];
        Ok(Json(json!({
            "registered": registered,
            "bundled": crate::policy::bundled::names(),
            "active": default["active"],
            "stats": default["stats"],
            "arms": arms,
            "shadows": shadows,
        }))
        .into_response())
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize)]
pub struct KindName {
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arm: Option<String>,
}

fn arm_of(app: &AppState, req: &KindName) -> Result<usize, ApiError> {
    let name = req.arm.as_deref().unwrap_or(DEFAULT_ARM);
    app.arms.by_name(name).ok_or_else(|| {
        ApiError::invalid(format!(
            "unknown arm {name:?}; arms: {}",
            app.arms.names().join(", ")
        ))
    })
}

fn kind_of(s: &str) -> Result<PolicyKind, ApiError> {
    PolicyKind::parse(s).ok_or_else(|| {
        ApiError::invalid(format!(
            "unknown policy kind {s:?}: selection, eviction, prefetch or placement"
        ))
    })
}

fn parse_body(body: &Bytes) -> Result<KindName, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid request JSON: {e}")))
}

pub async fn activate(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    blocking(move || activate_blocking(app, headers, body)).await
}

fn activate_blocking(app: AppState, headers: HeaderMap, body: Bytes) -> Response {
    let r = (|| -> Result<Response, ApiError> {
        let a = admin(&app, &headers)?;
        let req = parse_body(&body)?;
        let kind = kind_of(&req.kind)?;
        let arm = arm_of(&app, &req)?;
        let name = req
            .name
            .clone()
            .ok_or_else(|| ApiError::invalid("name is required"))?;
        let source = match a.registry.lock().unwrap().get(&name) {
            Some((s, _)) => s.clone(),
            None => PolicySource::Bundled(name.clone()),
        };
        app.arms.arms[arm]
            .store
            .swap_policy(kind, &source)
            .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
        a.active
            .lock()
            .unwrap()
            .entry((arm, kind))
            .or_default()
            .push(source);
        Ok(Json(
            json!({"kind": req.kind, "arm": app.arms.arms[arm].name, "activating": name,
                       "applies": "at the next forward pass"}),
        )
        .into_response())
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

pub async fn rollback(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    blocking(move || rollback_blocking(app, headers, body)).await
}

fn rollback_blocking(app: AppState, headers: HeaderMap, body: Bytes) -> Response {
    let r = (|| -> Result<Response, ApiError> {
        let a = admin(&app, &headers)?;
        let req = parse_body(&body)?;
        let kind = kind_of(&req.kind)?;
        let arm = arm_of(&app, &req)?;
        let mut active = a.active.lock().unwrap();
        let history = active.entry((arm, kind)).or_default();
        if history.len() < 2 {
            return Err(ApiError::invalid(format!(
                "no earlier {kind} policy to roll back to"
            )));
        }
        let previous = history[history.len() - 2].clone();
        app.arms.arms[arm]
            .store
            .swap_policy(kind, &previous)
            .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
        history.pop();
        Ok(
            Json(json!({"kind": req.kind, "arm": app.arms.arms[arm].name,
                        "activating": previous.describe()}))
            .into_response(),
        )
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Runs `f` on tokio's blocking pool (plugin compilation, locks the forward thread holds).
pub async fn blocking(f: impl FnOnce() -> Response + Send + 'static) -> Response {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        ApiError::status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("admin task failed: {e}"),
        )
        .into_response()
    })
}
