//! PersistentVolumeClaims of `pvc://<claim>/<path>` adapters: which claims a model's agents
//! mount, and the volumes that mount them.
//!
//! A pod can only mount claims of its own namespace, so only adapters in the BaseModel's
//! namespace count (the LoraAdapter reconciler refuses a `pvc://` adapter elsewhere, with a
//! reason, rather than let it name a claim of the platform's namespace). Each claim is mounted
//! once, read-only, at `<PVC_DIR>/<claim>` — the directory the agents' `--pvc-mount-dir` names —
//! however many adapters use it, and not again when the model itself comes from the same claim
//! (its volume is already there). A new claim changes the pod template, so the agents roll:
//! a claim is mounted when its first adapter appears.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{PersistentVolumeClaimVolumeSource, Volume, VolumeMount};
use kube::ResourceExt;

use super::config::{PVC_DIR, SpecError, pvc_source};
use super::hash_json;
use crate::crd::{BaseModel, LoraAdapter};

/// The claims the `pvc://` adapters of `model` name, sorted and deduplicated: adapters in the
/// model's namespace that reference it, with a well-formed claim name.
pub fn adapter_claims<'a>(
    model: &BaseModel,
    adapters: impl IntoIterator<Item = &'a LoraAdapter>,
) -> BTreeSet<String> {
    let ns = super::namespace(model);
    let name = model.name_any();
    adapters
        .into_iter()
        .filter(|a| a.namespace().as_deref() == Some(ns.as_str()))
        .filter(|a| {
            a.spec.base_model.name == name
                && a.spec.base_model.namespace.as_deref().unwrap_or(&ns) == ns
        })
        .filter_map(|a| a.spec.source.pvc_claim())
        .filter(|c| is_object_name(c))
        .map(str::to_owned)
        .collect()
}

/// A DNS-1123 subdomain: what a claim's name must be (it also becomes a directory name).
fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// The volume name of an adapter claim: claims may be 253 characters, volume names 63.
pub fn volume_name(claim: &str) -> String {
    format!("claim-{}", hash_json(&claim))
}

/// Read-only volumes and mounts for `claims`, except the model's own claim (mounted already).
///
/// Errors: a malformed `pvc://` model source.
pub fn volumes(
    model: &BaseModel,
    claims: &BTreeSet<String>,
) -> Result<(Vec<Volume>, Vec<VolumeMount>), SpecError> {
    let model_claim = pvc_source(model)?.map(|(claim, _)| claim);
    let mut vols = Vec::new();
    let mut mounts = Vec::new();
    for claim in claims {
        if model_claim.as_deref() == Some(claim.as_str()) {
            continue;
        }
        let name = volume_name(claim);
        vols.push(Volume {
            name: name.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: format!("{PVC_DIR}/{claim}"),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    Ok((vols, mounts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_come_from_pvc_adapters_of_this_model_in_its_namespace() {
        let m = BaseModel::test();
        let ns = super::super::namespace(&m);
        let here =
            |name: &str, uri: &str| LoraAdapter::test().named(name).in_namespace(&ns).uri(uri);
        let mut other_model = here("g", "pvc://other-model/x");
        other_model.spec.base_model.name = "other".into();
        let adapters = [
            here("a", "pvc://adapters/team/sql"),
            here("b", "pvc://adapters/team/tone"),
            here("c", "pvc://shared-weights/x"),
            here("d", "s3://bucket/x"),
            here("e", "pvc://Bad_Claim/x"),
            here("f", "pvc://claim-without-path"),
            // Another namespace: claims there cannot be mounted (and are refused upstream).
            LoraAdapter::test().uri("pvc://tenant-claim/x"),
            other_model,
        ];
        let claims = adapter_claims(&m, adapters.iter());
        assert_eq!(
            claims.into_iter().collect::<Vec<_>>(),
            ["adapters", "shared-weights"]
        );
    }

    #[test]
    fn each_claim_is_mounted_once_read_only_and_not_twice_for_the_model() {
        let claims: BTreeSet<String> = ["adapters", "models"].map(String::from).into();
        let m = BaseModel::test().uri("pvc://models/llama/8b");
        let (vols, mounts) = volumes(&m, &claims).unwrap();
        assert_eq!(vols.len(), 1, "the model's claim is mounted already");
        let pvc = vols[0].persistent_volume_claim.as_ref().unwrap();
        assert_eq!(
            (pvc.claim_name.as_str(), pvc.read_only),
            ("adapters", Some(true))
        );
        assert_eq!(mounts[0].mount_path, "/models/adapters");
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(mounts[0].name, vols[0].name);
        assert!(vols[0].name.len() <= 63);
        let long = "c".repeat(253);
        assert!(volume_name(&long).len() <= 63);
        assert_ne!(volume_name("a"), volume_name("b"));
    }
}
