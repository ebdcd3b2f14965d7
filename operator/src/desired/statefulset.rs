//! A role's StatefulSet of `loraplane-agent serve` pods: the role's resources, node selector
//! and tolerations; HTTP probes on the agent's `/healthz` and `/readyz` (a generous startup
//! probe covers the model download); a termination grace period longer than the agent's drain
//! timeout, so SIGTERM lets in-flight requests finish (what makes a scale-down lossless); a
//! restricted security context. An autoscaled role's StatefulSet has no `replicas`: the
//! autoscaler owns the count.
//!
//! The pod template carries the hash of the agent configuration and a fingerprint of the
//! credentials, so changing either rolls the pods (the agent reads both only at start-up).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    HTTPGetAction, KeyToPath, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config::{
    CACHE_DIR, CONFIG_DIR, CONFIG_KEY, CREDENTIALS_DIR, HF_TOKEN_DIR, PVC_DIR, SpecError,
    agent_toml_with, pvc_source,
};
use super::{
    AgentParams, GRPC_PORT, HTTP_PORT, KV_PORT, METRICS_PORT, annotations, child_meta, config_name,
    credentials_secret_name, hash_json, role_labels, role_name, role_selector,
};
use crate::crd::{BaseModel, ServingMode};
use crate::role::{self, Role};

/// The agent container's name.
pub const CONTAINER: &str = "agent";
/// Pod template annotation: fingerprint of the agent credentials (not the tokens).
pub const CREDENTIALS_FINGERPRINT: &str = "loraplane.dev/credentials-fingerprint";

/// The arguments of a role's agent: `serve --config … --role <role>`, and for decode agents of
/// a disaggregated model the prefill peers (the prefill headless Service; the agent resolves
/// every ready prefill pod behind it).
pub fn agent_args(model: &BaseModel, role: Role, params: &AgentParams) -> Vec<String> {
    let mut args = vec![
        "serve".to_owned(),
        "--config".to_owned(),
        format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        "--role".to_owned(),
        role.as_str().to_owned(),
    ];
    if role == Role::Decode && model.spec.serving.mode == ServingMode::Disaggregated {
        args.push("--prefill-peers".to_owned());
        args.push(format!(
            "{}.{}.svc.{}:{KV_PORT}",
            role_name(model, Role::Prefill),
            super::namespace(model),
            params.cluster_domain
        ));
    }
    args
}

fn container_ports(role: Role) -> Vec<ContainerPort> {
    let port = |name: &str, container_port| ContainerPort {
        name: Some(name.into()),
        container_port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let mut ports = vec![
        port("grpc", GRPC_PORT),
        port("http", HTTP_PORT),
        port("metrics", METRICS_PORT),
    ];
    if role == Role::Prefill {
        ports.push(port("kv", KV_PORT));
    }
    ports
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

fn volumes(
    model: &BaseModel,
    adapter_claims: &BTreeSet<String>,
) -> Result<(Vec<Volume>, Vec<VolumeMount>), SpecError> {
    let model_name = kube::ResourceExt::name_any(model);
    let mut vols = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_name(model),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "credentials".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(credentials_secret_name(&model_name)),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "cache".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        mount("config", CONFIG_DIR, true),
        mount("credentials", CREDENTIALS_DIR, true),
        mount("cache", CACHE_DIR, false),
        mount("tmp", "/tmp", false),
    ];
    if let Some(secret) = model
        .spec
        .source
        .hugging_face
        .as_ref()
        .and_then(|hf| hf.token_secret_ref.as_ref())
    {
        vols.push(Volume {
            name: "hf-token".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                items: Some(vec![KeyToPath {
                    key: secret.key.clone().unwrap_or_else(|| "token".into()),
                    path: "token".into(),
                    ..KeyToPath::default()
                }]),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount("hf-token", HF_TOKEN_DIR, true));
    }
    if let Some((claim, _)) = pvc_source(model)? {
        vols.push(Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        });
        mounts.push(mount("model", &format!("{PVC_DIR}/{claim}"), true));
    }
    let (claim_vols, claim_mounts) = super::claims::volumes(model, adapter_claims)?;
    vols.extend(claim_vols);
    mounts.extend(claim_mounts);
    Ok((vols, mounts))
}

/// The StatefulSet `<model>-<role>` when no `pvc://` adapter needs a claim mounted.
///
/// Errors: a spec the agent configuration cannot express ([`SpecError`]).
pub fn statefulset(
    model: &BaseModel,
    role: Role,
    params: &AgentParams,
    fingerprint: &str,
) -> Result<StatefulSet, SpecError> {
    statefulset_with(model, role, params, fingerprint, &BTreeSet::new())
}

/// The StatefulSet `<model>-<role>`, mounting `adapter_claims` ([`super::claims`]).
///
/// Errors: a spec the agent configuration cannot express ([`SpecError`]).
pub fn statefulset_with(
    model: &BaseModel,
    role: Role,
    params: &AgentParams,
    fingerprint: &str,
    adapter_claims: &BTreeSet<String>,
) -> Result<StatefulSet, SpecError> {
    let spec = role::roles(model)
        .into_iter()
        .find(|(r, _)| *r == role)
        .map(|(_, s)| s)
        .unwrap_or_default();
    let (volumes, volume_mounts) = volumes(model, adapter_claims)?;
    let config_hash = hash_json(&agent_toml_with(model, params, adapter_claims)?);
    let grace = params.drain_timeout + params.termination_margin;
    let container = Container {
        name: CONTAINER.into(),
        image: Some(params.image.clone()),
        image_pull_policy: params.image_pull_policy.clone(),
        args: Some(agent_args(model, role, params)),
        ports: Some(container_ports(role)),
        resources: spec.resources.clone(),
        // Model loading can take many minutes: 30 minutes of start-up before liveness counts.
        startup_probe: Some(http_probe("/healthz", 10, 180)),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        volume_mounts: Some(volume_mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let template_annotations = BTreeMap::from([
        (annotations::CONFIG_HASH.to_owned(), config_hash),
        (CREDENTIALS_FINGERPRINT.to_owned(), fingerprint.to_owned()),
    ]);
    Ok(StatefulSet {
        metadata: child_meta(model, role_name(model, role), role_labels(model, role)),
        spec: Some(StatefulSetSpec {
            service_name: Some(role_name(model, role)),
            // An autoscaled role's count belongs to its autoscaler: leaving it out of the apply
            // keeps the operator from resetting it (see `autoscaling`).
            replicas: spec.autoscaling.is_none().then(|| role::replicas(&spec)),
            selector: LabelSelector {
                match_labels: Some(role_selector(model, role)),
                ..LabelSelector::default()
            },
            // Agents are independent: start and replace them all at once.
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..StatefulSetUpdateStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(role_labels(model, role)),
                    annotations: Some(template_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    node_selector: spec.node_selector.clone(),
                    tolerations: spec.tolerations.clone(),
                    termination_grace_period_seconds: Some(
                        i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
                    ),
                    enable_service_links: Some(false),
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        fs_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    ..PodSpec::default()
                }),
            },
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    })
}
