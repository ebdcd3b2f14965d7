//! Tenants: a namespace is a tenant. A BaseModel admits namespaces (`spec.tenancy`: a list, a
//! label selector, or by default only its own namespace); API keys are Secrets labelled
//! `loraplane.dev/api-key: "true"` in an admitted namespace, whose `api-key` entry is the key.
//! Agents receive only SHA-256 hashes, through `Admin/SetTenants`. Limits come from annotations
//! on the tenant Namespace (`loraplane.dev/max-adapters`, `…/max-concurrent-requests`,
//! `…/max-tokens-per-minute`, and `…/max-adapter-replicas` which only the operator applies, to
//! demand-following adapters); the adapter quota is also enforced by the operator, which
//! places only the oldest `max-adapters` adapters of a namespace.
//!
//! Pure functions of Kubernetes objects: no I/O.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use crate::crd::{BaseModel, LoraAdapter};
use crate::desired::{annotations, labels};

/// The Secret data key holding an API key.
pub const API_KEY_ENTRY: &str = "api-key";

/// Per-tenant limits the agents enforce; 0 = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Limits {
    pub max_concurrent_requests: u32,
    pub max_tokens_per_minute: u64,
    pub max_adapters: u32,
    /// Pinned replicas per role of the namespace's adapters on one model (operator-enforced,
    /// not sent to the agents).
    pub max_adapter_replicas: u32,
}

/// One row of an agent's tenant table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant {
    /// The namespace.
    pub id: String,
    /// Hex SHA-256 of each API key, sorted.
    pub api_key_sha256: Vec<String>,
    pub limits: Limits,
}

/// Whether `selector` matches `labels` (matchLabels and matchExpressions; an empty selector
/// matches everything, as in Kubernetes).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // An unknown operator matches nothing (the API server refuses them anyway).
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// Whether `model` admits adapters and keys from `namespace` (`ns` is the Namespace object,
/// needed only for a selector; a missing Namespace is not admitted by a selector).
pub fn admits(model: &BaseModel, namespace: &str, ns: Option<&Namespace>) -> bool {
    let tenancy = model.spec.tenancy.as_ref();
    if let Some(allowed) = tenancy.and_then(|t| t.allowed_namespaces.as_ref()) {
        return allowed.iter().any(|a| a == namespace);
    }
    if let Some(selector) = tenancy.and_then(|t| t.namespace_selector.as_ref()) {
        return ns.is_some_and(|ns| selector_matches(selector, ns.labels()));
    }
    model.namespace().as_deref() == Some(namespace)
}

/// The namespaces `model` admits, among `namespaces` (plus listed ones that do not exist yet).
pub fn admitted_namespaces(model: &BaseModel, namespaces: &[Namespace]) -> BTreeSet<String> {
    let tenancy = model.spec.tenancy.as_ref();
    if let Some(allowed) = tenancy.and_then(|t| t.allowed_namespaces.as_ref()) {
        return allowed.iter().cloned().collect();
    }
    if tenancy
        .and_then(|t| t.namespace_selector.as_ref())
        .is_some()
    {
        return namespaces
            .iter()
            .filter(|ns| admits(model, &ns.name_any(), Some(ns)))
            .map(|ns| ns.name_any())
            .collect();
    }
    model.namespace().into_iter().collect()
}

fn annotation_number<T: std::str::FromStr + Default>(ns: Option<&Namespace>, key: &str) -> T {
    ns.and_then(|ns| ns.annotations().get(key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_default()
}

/// A namespace's limits, from its annotations (absent or malformed: unlimited).
pub fn limits(ns: Option<&Namespace>) -> Limits {
    Limits {
        max_concurrent_requests: annotation_number(ns, annotations::MAX_CONCURRENT_REQUESTS),
        max_tokens_per_minute: annotation_number(ns, annotations::MAX_TOKENS_PER_MINUTE),
        max_adapters: annotation_number(ns, annotations::MAX_ADAPTERS),
        max_adapter_replicas: annotation_number(ns, annotations::MAX_ADAPTER_REPLICAS),
    }
}

/// Hex SHA-256 of an API key (surrounding whitespace, e.g. a trailing newline, is not part of
/// the key).
pub fn key_hash(key: &[u8]) -> String {
    let trimmed = std::str::from_utf8(key).map(str::trim).unwrap_or_default();
    hex::encode(Sha256::digest(trimmed.as_bytes()))
}

/// Whether a Secret is a tenant API key.
pub fn is_api_key(secret: &Secret) -> bool {
    secret.labels().get(labels::API_KEY).map(String::as_str) == Some("true")
}

/// The tenant table of `model`'s agents: one row per admitted namespace, with the hashes of the
/// keys in its labelled Secrets (Secrets being deleted are left out) and its limits. Sorted by
/// id, hashes sorted and de-duplicated, so equal worlds give equal tables.
pub fn tenant_table(
    model: &BaseModel,
    namespaces: &[Namespace],
    secrets: &[Secret],
) -> Vec<Tenant> {
    let by_name: BTreeMap<String, &Namespace> =
        namespaces.iter().map(|ns| (ns.name_any(), ns)).collect();
    admitted_namespaces(model, namespaces)
        .into_iter()
        .map(|id| {
            let hashes: BTreeSet<String> = secrets
                .iter()
                .filter(|s| {
                    s.namespace().as_deref() == Some(id.as_str())
                        && is_api_key(s)
                        && s.metadata.deletion_timestamp.is_none()
                })
                .filter_map(|s| s.data.as_ref()?.get(API_KEY_ENTRY))
                .filter(|k| !k.0.iter().all(u8::is_ascii_whitespace))
                .map(|k| key_hash(&k.0))
                .collect();
            Tenant {
                limits: limits(by_name.get(&id).copied()),
                id,
                api_key_sha256: hashes.into_iter().collect(),
            }
        })
        .collect()
}

/// Whether `adapter` is within its namespace's quota: the namespace's adapters (any base
/// model, not being deleted) ordered by creation time then name, and only the first
/// `max_adapters` count. `max_adapters == 0` is unlimited.
pub fn within_quota(
    adapter: &LoraAdapter,
    namespace_adapters: &[&LoraAdapter],
    max_adapters: u32,
) -> bool {
    if max_adapters == 0 {
        return true;
    }
    let key = |a: &LoraAdapter| {
        (
            a.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second()),
            a.name_any(),
        )
    };
    let mine = key(adapter);
    let older = namespace_adapters
        .iter()
        .filter(|a| a.metadata.deletion_timestamp.is_none() && a.name_any() != adapter.name_any())
        .filter(|a| key(a) < mine)
        .count();
    older < max_adapters as usize
}

#[cfg(test)]
mod tests;
