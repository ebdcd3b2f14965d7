//! The thin write layer: server-side apply with one field manager (`loraplane-operator`,
//! forced: the operator owns every field it sets), skipped when the object already carries
//! the hash of the same desired state; deletion of children that are no longer desired;
//! status patches; Events.
//!
//! Why a hash rather than comparing with the live object: the API server defaults and
//! normalises fields (quantities, ports, probes), so a field-by-field comparison reports
//! phantom differences and an apply every pass. The hash of what we asked for changes exactly
//! when the desired object does. A child edited by hand keeps its hash and is not reverted
//! until its desired state changes; deleting it makes the next reconcile re-create it.

use std::fmt::Debug;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::desired::{MANAGER, annotations, hash_json};
use crate::metrics::Metrics;

/// Server-side apply with the operator's one field manager.
pub fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Puts the hash of `obj` (as built) into its `loraplane.dev/desired-hash` annotation.
pub fn stamp<K: Resource + Serialize>(obj: &mut K) {
    let hash = hash_json(&*obj);
    obj.meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(annotations::DESIRED_HASH.to_owned(), hash);
}

fn desired_hash<K: Resource>(obj: &K) -> Option<&String> {
    obj.meta()
        .annotations
        .as_ref()?
        .get(annotations::DESIRED_HASH)
}

/// Whether `owner_uid` is the controller owner of `obj`.
pub fn owned_by<K: Resource>(obj: &K, owner_uid: &str) -> bool {
    obj.owner_references()
        .iter()
        .any(|r| r.controller == Some(true) && r.uid == owner_uid)
}

/// Applies each desired object (stamped) unless an observed object of the same name already
/// carries its hash, then deletes observed objects controlled by `owner_uid` that are not
/// desired. Returns the children as they stand afterwards (apply responses, or the observed
/// objects that needed nothing), in `desired` order.
///
/// Errors: the first failed write (the reconcile retries; writes are idempotent).
pub async fn sync_children<K>(
    api: &Api<K>,
    desired: Vec<K>,
    observed: Vec<K>,
    owner_uid: &str,
    metrics: &Metrics,
) -> Result<Vec<K>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
{
    let mut out = Vec::with_capacity(desired.len());
    for mut d in desired {
        stamp(&mut d);
        let name = d.name_any();
        let current = observed.iter().find(|o| o.name_any() == name);
        match current {
            Some(o) if desired_hash(o) == desired_hash(&d) => out.push(o.clone()),
            _ => {
                let applied = api.patch(&name, &apply_params(), &Patch::Apply(&d)).await?;
                metrics.wrote("apply");
                tracing::info!(kind = K::kind(&()).as_ref(), name, "applied");
                out.push(applied);
            }
        }
    }
    for o in &observed {
        let name = o.name_any();
        if owned_by(o, owner_uid) && !out.iter().any(|d| d.name_any() == name) {
            api.delete(&name, &DeleteParams::background()).await?;
            metrics.wrote("delete");
            tracing::info!(kind = K::kind(&()).as_ref(), name, "deleted");
        }
    }
    Ok(out)
}

/// Server-side-applies `status` to the status subresource of `name`.
///
/// Errors: the API refused the patch.
pub async fn patch_status<K, S>(
    api: &Api<K>,
    name: &str,
    status: &S,
    metrics: &Metrics,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let out = api
        .patch_status(name, &apply_params(), &Patch::Apply(&patch))
        .await?;
    metrics.wrote("status");
    Ok(out)
}

/// Publishes an Event about `regarding`; a failure is logged, never fails the reconcile.
pub async fn event(
    recorder: &Recorder,
    regarding: &ObjectReference,
    warning: bool,
    reason: &str,
    note: String,
    metrics: &Metrics,
) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(note.chars().take(1024).collect()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    match recorder.publish(&ev, regarding).await {
        Ok(()) => metrics.wrote("event"),
        Err(error) => tracing::warn!(%error, reason, "could not publish an Event"),
    }
}
