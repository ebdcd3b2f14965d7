//! The vLLM-compatible admin routes: `POST /v1/load_lora_adapter` and
//! `POST /v1/unload_lora_adapter`, with vLLM's success texts and OpenAI error JSON.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;

use super::{AdminEngine, AdminError, AdminState};
use crate::api::auth;
use crate::api::error::ApiError;
use crate::engine::LoadChange;
use crate::lora::ids::{TenantId, digest_or_none};

/// The vLLM-compatible admin routes, admin-authenticated like the gRPC service:
/// - `POST /v1/load_lora_adapter` `{"lora_name", "lora_path", "tenant"?, "expected_sha256"?,
///   "pin"?}` → 200 `Success: LoRA adapter '<name>' added successfully.`; loaded again from
///   the same path, `… unchanged (sha256:…).` or `… replaced: its files changed (sha256:…
///   replaces sha256:…).`
/// - `POST /v1/unload_lora_adapter` `{"lora_name", "tenant"?}` → 200
///   `Success: LoRA adapter '<name>' removed successfully.`, 404 for an unknown adapter.
///
/// The tenant is `default` unless the body names one. Errors are OpenAI error JSON.
///
/// The body limit is [`AdminState::max_request_bytes`]; the credential is checked before the
/// body is read, so a caller without it learns nothing else (401 whatever the body).
pub fn admin_routes<E: AdminEngine>(state: Arc<AdminState<E>>) -> axum::Router {
    axum::Router::new()
        .route("/v1/load_lora_adapter", post(load_lora::<E>))
        .route("/v1/unload_lora_adapter", post(unload_lora::<E>))
        .with_state(state)
}

/// Reads the body after the credential was checked, under the admin routes' limit.
async fn read_body<E: AdminEngine>(state: &AdminState<E>, body: Body) -> Result<Bytes, AdminError> {
    let limit = state.max_request_bytes();
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        AdminError::Api(if too_large {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::InvalidArgument {
                param: None,
                message: format!("could not read the request body: {e}"),
            }
        })
    })
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
    body: Body,
) -> Result<Response, AdminError> {
    state.authorize(auth::bearer_from_headers(&headers))?;
    let b: LoadLoraBody = parse_body(&read_body(&state, body).await?)?;
    let tenant = b.tenant.unwrap_or_else(|| TenantId::default_tenant().0);
    let loaded = state
        .load(
            &tenant,
            &b.lora_name,
            &b.lora_path,
            b.expected_sha256.as_deref().unwrap_or(""),
            b.pin,
        )
        .await?;
    let name = &b.lora_name;
    let digest = digest_or_none(loaded.summary.digest);
    Ok(success(match loaded.change {
        LoadChange::Added => format!("Success: LoRA adapter '{name}' added successfully."),
        LoadChange::Unchanged => {
            format!("Success: LoRA adapter '{name}' unchanged ({digest}).")
        }
        LoadChange::Replaced { previous } => format!(
            "Success: LoRA adapter '{name}' replaced: its files changed ({digest} replaces {previous})."
        ),
    }))
}

async fn unload_lora<E: AdminEngine>(
    State(state): State<Arc<AdminState<E>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AdminError> {
    state.authorize(auth::bearer_from_headers(&headers))?;
    let b: UnloadLoraBody = parse_body(&read_body(&state, body).await?)?;
    let tenant = b.tenant.unwrap_or_else(|| TenantId::default_tenant().0);
    if !state.unload(&tenant, &b.lora_name).await? {
        return Err(AdminError::AdapterNotFound(b.lora_name));
    }
    Ok(success(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        b.lora_name
    )))
}
