//! The vLLM-compatible admin routes: `POST /v1/load_lora_adapter` and
//! `POST /v1/unload_lora_adapter`, with vLLM's success texts and OpenAI error JSON.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;

use super::{AdminEngine, AdminError, AdminState};
use crate::api::auth;
use crate::api::error::ApiError;
use crate::lora::ids::TenantId;

/// The vLLM-compatible admin routes, admin-authenticated like the gRPC service:
/// - `POST /v1/load_lora_adapter` `{"lora_name", "lora_path", "tenant"?, "expected_sha256"?,
///   "pin"?}` → 200 `Success: LoRA adapter '<name>' added successfully.`
/// - `POST /v1/unload_lora_adapter` `{"lora_name", "tenant"?}` → 200
///   `Success: LoRA adapter '<name>' removed successfully.`, 404 for an unknown adapter.
///
/// The tenant is `default` unless the body names one. Errors are OpenAI error JSON.
pub fn admin_routes<E: AdminEngine>(state: Arc<AdminState<E>>) -> axum::Router {
    axum::Router::new()
        .route("/v1/load_lora_adapter", post(load_lora::<E>))
        .route("/v1/unload_lora_adapter", post(unload_lora::<E>))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct LoadLoraBody {
    lora_name: String,
    lora_path: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    expected_sha256: Option<String>,
    #[serde(default)]
    pin: bool,
    /// vLLM's flag to replace an adapter of the same name; loading here always replaces an
    /// idle adapter, so it is accepted and has no effect.
    #[serde(default)]
    #[allow(dead_code)]
    load_inplace: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct UnloadLoraBody {
    lora_name: String,
    #[serde(default)]
    tenant: Option<String>,
    /// vLLM accepts (and ignores) an id; so do we.
    #[serde(default)]
    #[allow(dead_code)]
    lora_int_id: Option<i64>,
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|e| {
        AdminError::Api(ApiError::InvalidArgument {
            param: None,
            message: format!("invalid request body: {e}"),
        })
    })
}

fn success(message: String) -> Response {
    (
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        message,
    )
        .into_response()
}

async fn load_lora<E: AdminEngine>(
    State(state): State<Arc<AdminState<E>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AdminError> {
    state.authorize(auth::bearer_from_headers(&headers))?;
    let b: LoadLoraBody = parse_body(&body)?;
    let tenant = b.tenant.unwrap_or_else(|| TenantId::default_tenant().0);
    state
        .load(
            &tenant,
            &b.lora_name,
            &b.lora_path,
            b.expected_sha256.as_deref().unwrap_or(""),
            b.pin,
        )
        .await?;
    Ok(success(format!(
        "Success: LoRA adapter '{}' added successfully.",
        b.lora_name
    )))
}

async fn unload_lora<E: AdminEngine>(
    State(state): State<Arc<AdminState<E>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AdminError> {
    state.authorize(auth::bearer_from_headers(&headers))?;
    let b: UnloadLoraBody = parse_body(&body)?;
    let tenant = b.tenant.unwrap_or_else(|| TenantId::default_tenant().0);
    if !state.unload(&tenant, &b.lora_name).await? {
        return Err(AdminError::AdapterNotFound(b.lora_name));
    }
    Ok(success(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        b.lora_name
    )))
}
