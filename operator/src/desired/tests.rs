#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::{Resource, ResourceExt};

use super::config::{SpecError, agent_settings, agent_toml};
use super::*;
use crate::controller::base_model::children;
use crate::crd::BaseModel;
use crate::role::Role;

fn params() -> AgentParams {
    AgentParams {
        image: "registry.example/loraplane-agent:1.2.3".into(),
        image_pull_policy: Some("IfNotPresent".into()),
        drain_timeout: Duration::from_secs(45),
        ..AgentParams::default()
    }
}

fn creds() -> secret::Credentials {
    secret::Credentials {
        admin: "admin-tok".into(),
        cluster: "cluster-tok".into(),
    }
}

fn container(sts: &StatefulSet) -> &k8s_openapi::api::core::v1::Container {
    &sts.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
}

fn pod_spec(sts: &StatefulSet) -> &k8s_openapi::api::core::v1::PodSpec {
    sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn assert_owned_child<K: Resource>(obj: &K, model: &BaseModel) {
    let owners = obj
        .meta()
        .owner_references
        .as_ref()
        .expect("owner references");
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].uid, model.uid().unwrap());
    assert_eq!(owners[0].kind, "BaseModel");
    assert_eq!(owners[0].controller, Some(true));
    assert_eq!(obj.meta().namespace.as_deref(), Some("loraplane-system"));
    let l = obj.meta().labels.as_ref().unwrap();
    assert_eq!(l.get(labels::MANAGED_BY).map(String::as_str), Some(MANAGER));
    assert_eq!(
        l.get(labels::BASE_MODEL).map(String::as_str),
        Some("llama3-8b")
    );
}

#[test]
fn unified_model_owns_config_one_statefulset_two_services_one_pdb() {
    let m = BaseModel::test().unified(3);
    let c = children(&m, &params(), &creds(), &BTreeSet::new()).unwrap();
    assert_owned_child(&c.config, &m);
    assert_eq!(c.config.name_any(), "llama3-8b-agent-config");
    let names = |v: Vec<String>| v;
    assert_eq!(
        names(c.statefulsets.iter().map(|s| s.name_any()).collect()),
        ["llama3-8b-unified"]
    );
    assert_eq!(
        names(c.services.iter().map(|s| s.name_any()).collect()),
        ["llama3-8b-unified", "llama3-8b"]
    );
    assert_eq!(
        names(c.pdbs.iter().map(|s| s.name_any()).collect()),
        ["llama3-8b-unified"]
    );
    for s in &c.statefulsets {
        assert_owned_child(s, &m);
        assert_eq!(s.spec.as_ref().unwrap().replicas, Some(3));
        assert_eq!(
            container(s).args.as_ref().unwrap()[3..],
            ["--role".to_owned(), "unified".to_owned()]
        );
    }
    for s in &c.services {
        assert_owned_child(s, &m);
    }
    for p in &c.pdbs {
        assert_owned_child(p, &m);
    }
    let client = c.services.last().unwrap().spec.as_ref().unwrap();
    assert_eq!(
        client
            .selector
            .as_ref()
            .unwrap()
            .get(labels::ROLE)
            .map(String::as_str),
        Some("unified")
    );
    assert_eq!(
        service::endpoint(&m),
        "llama3-8b.loraplane-system.svc:50051"
    );
}

#[test]
fn disaggregated_model_owns_prefill_and_decode_and_clients_reach_decode() {
    let m = BaseModel::test().disaggregated(2, 4);
    let c = children(&m, &params(), &creds(), &BTreeSet::new()).unwrap();
    let sts: Vec<(String, Option<i32>)> = c
        .statefulsets
        .iter()
        .map(|s| (s.name_any(), s.spec.as_ref().unwrap().replicas))
        .collect();
    assert_eq!(
        sts,
        [
            ("llama3-8b-prefill".to_owned(), Some(2)),
            ("llama3-8b-decode".to_owned(), Some(4))
        ]
    );
    let svcs: Vec<String> = c.services.iter().map(|s| s.name_any()).collect();
    assert_eq!(svcs, ["llama3-8b-prefill", "llama3-8b-decode", "llama3-8b"]);
    let pdbs: Vec<String> = c.pdbs.iter().map(|s| s.name_any()).collect();
    assert_eq!(pdbs, ["llama3-8b-prefill", "llama3-8b-decode"]);
    let client = c.services[2].spec.as_ref().unwrap();
    assert_eq!(
        client
            .selector
            .as_ref()
            .unwrap()
            .get(labels::ROLE)
            .map(String::as_str),
        Some("decode")
    );
    assert_eq!(client.cluster_ip, None);
    for headless in &c.services[..2] {
        let spec = headless.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(false));
    }
}

#[test]
fn statefulsets_carry_each_roles_resources_placement_and_selector() {
    let m = BaseModel::test().disaggregated(2, 4);
    let fp = secret::fingerprint(&creds());
    let prefill = statefulset::statefulset(&m, Role::Prefill, &params(), &fp).unwrap();
    let decode = statefulset::statefulset(&m, Role::Decode, &params(), &fp).unwrap();
    let limits = container(&prefill)
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert_eq!(
        pod_spec(&prefill).node_selector.as_ref().unwrap()["gpu"],
        "h100"
    );
    assert_eq!(
        pod_spec(&prefill).tolerations.as_ref().unwrap()[0]
            .key
            .as_deref(),
        Some("nvidia.com/gpu")
    );
    assert_eq!(pod_spec(&decode).node_selector, None);
    assert_eq!(pod_spec(&decode).tolerations, None);
    let spec = prefill.spec.as_ref().unwrap();
    assert_eq!(spec.service_name.as_deref(), Some("llama3-8b-prefill"));
    let sel = spec.selector.match_labels.as_ref().unwrap();
    assert_eq!(
        sel.len(),
        2,
        "the selector is immutable: only the stable labels"
    );
    let tpl = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert!(
        sel.iter().all(|(k, v)| tpl.get(k) == Some(v)),
        "the template matches its selector"
    );
    assert_eq!(
        container(&prefill).image.as_deref(),
        Some("registry.example/loraplane-agent:1.2.3")
    );
    assert_eq!(
        container(&prefill).image_pull_policy.as_deref(),
        Some("IfNotPresent")
    );
}

#[test]
fn pods_outlive_the_drain_and_probe_the_agent() {
    let m = BaseModel::test();
    let sts = statefulset::statefulset(&m, Role::Unified, &params(), "fp").unwrap();
    let p = pod_spec(&sts);
    assert!(
        p.termination_grace_period_seconds.unwrap() > 45,
        "grace > --drain-timeout 45s"
    );
    let c = container(&sts);
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .clone()
            .unwrap()
    };
    assert_eq!(path(&c.readiness_probe), "/readyz");
    assert_eq!(path(&c.liveness_probe), "/healthz");
    assert_eq!(path(&c.startup_probe), "/healthz");
    let startup = c.startup_probe.as_ref().unwrap();
    assert!(
        startup.period_seconds.unwrap() * startup.failure_threshold.unwrap() >= 1800,
        "30 min to load a model"
    );
    let ports: Vec<(String, i32)> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [
            ("grpc".to_owned(), GRPC_PORT),
            ("http".to_owned(), HTTP_PORT),
            ("metrics".to_owned(), METRICS_PORT)
        ]
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        p.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    let mounts: Vec<String> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.clone())
        .collect();
    assert!(mounts.contains(&config::CONFIG_DIR.to_owned()));
    assert!(mounts.contains(&config::CREDENTIALS_DIR.to_owned()));
}

#[test]
fn decode_agents_find_prefill_peers_through_the_headless_service() {
    let m = BaseModel::test().disaggregated(1, 1);
    let p = params();
    let args = statefulset::agent_args(&m, Role::Decode, &p);
    let i = args.iter().position(|a| a == "--prefill-peers").unwrap();
    assert_eq!(
        args[i + 1],
        "llama3-8b-prefill.loraplane-system.svc.cluster.local:50052"
    );
    assert!(
        !statefulset::agent_args(&m, Role::Prefill, &p).contains(&"--prefill-peers".to_owned())
    );
    // The KV port is open on prefill agents and published by their headless Service only.
    let port_names = |role| {
        let sts = statefulset::statefulset(&m, role, &p, "fp").unwrap();
        container(&sts)
            .ports
            .iter()
            .flatten()
            .map(|p| p.name.clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(port_names(Role::Prefill), ["grpc", "http", "metrics", "kv"]);
    assert_eq!(port_names(Role::Decode), ["grpc", "http", "metrics"]);
    let svc_ports = |s: k8s_openapi::api::core::v1::Service| {
        s.spec
            .unwrap()
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.port))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        svc_ports(service::headless(&m, Role::Prefill)),
        [
            ("grpc".to_owned(), GRPC_PORT),
            ("http".to_owned(), HTTP_PORT),
            ("kv".to_owned(), KV_PORT)
        ]
    );
    assert_eq!(svc_ports(service::client(&m)).len(), 2);
    // Every role shares the cluster credential (prefill requires it, decode presents it).
    let s = agent_settings(&m, &p, &BTreeSet::new()).unwrap();
    assert_eq!(
        s["cluster-token-file"].to_string(),
        "\"/var/run/secrets/loraplane/agent/cluster-token\""
    );
    assert_eq!(s["kv-addr"].to_string(), "\"0.0.0.0:50052\"");
}

#[test]
fn agent_configuration_mirrors_the_spec() {
    let m = BaseModel::test().memory(0.9, "64Gi", 64);
    let s = agent_settings(&m, &params(), &BTreeSet::new()).unwrap();
    let get = |k: &str| s.get(k).unwrap().to_string();
    assert_eq!(
        get("model"),
        "\"hf://meta-llama/Meta-Llama-3-8B-Instruct@main\""
    );
    assert_eq!(get("host-cache-bytes"), "\"68719476736\"");
    assert_eq!(get("max-adapter-rank"), "64");
    assert_eq!(get("device-pool-fraction"), "0.9");
    assert_eq!(get("dtype"), "\"bf16\"");
    assert_eq!(get("drain-timeout"), "\"45000ms\"");
    assert_eq!(get("grpc-addr"), "\"0.0.0.0:50051\"");
    assert_eq!(
        get("admin-token-file"),
        "\"/var/run/secrets/loraplane/agent/admin-token\""
    );
    assert!(!s.contains_key("hf-token-file"));
    let toml_text = agent_toml(&m, &params()).unwrap();
    let parsed: toml::Table = toml::from_str(&toml_text).unwrap();
    assert_eq!(
        parsed.len(),
        s.len(),
        "the file parses back to the same keys"
    );
}

#[test]
fn hub_tokens_and_pvc_models_are_mounted() {
    let m = BaseModel::test().hf_token("hf-token");
    assert!(
        agent_settings(&m, &params(), &BTreeSet::new())
            .unwrap()
            .contains_key("hf-token-file")
    );
    let sts = statefulset::statefulset(&m, Role::Unified, &params(), "fp").unwrap();
    let vols = pod_spec(&sts).volumes.as_ref().unwrap();
    let hf = vols.iter().find(|v| v.name == "hf-token").unwrap();
    assert_eq!(
        hf.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("hf-token")
    );

    let m = BaseModel::test().uri("pvc://models/llama/8b");
    assert_eq!(config::model_arg(&m).unwrap(), "/models/models/llama/8b");
    let sts = statefulset::statefulset(&m, Role::Unified, &params(), "fp").unwrap();
    let pvc = pod_spec(&sts)
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "model")
        .unwrap();
    let claim = pvc.persistent_volume_claim.as_ref().unwrap();
    assert_eq!(
        (claim.claim_name.as_str(), claim.read_only),
        ("models", Some(true))
    );

    assert_eq!(
        config::model_arg(&BaseModel::test().uri("file:///models/x")).unwrap(),
        "/models/x"
    );
    assert_eq!(
        config::model_arg(&BaseModel::test().uri("https://h/x")).unwrap(),
        "https://h/x"
    );
    assert!(matches!(
        config::model_arg(&BaseModel::test().uri("pvc://claim-only")),
        Err(SpecError::PvcUri(_))
    ));
}

#[test]
fn an_unusable_quantity_is_a_spec_error_not_a_panic() {
    let m = BaseModel::test().memory(0.5, "500m", 8);
    let err = children(&m, &params(), &creds(), &BTreeSet::new()).unwrap_err();
    assert_eq!(err.kind(), "invalid_quantity");
    assert!(err.to_string().contains("memory.hostAdapterCacheBytes"));
}

#[test]
fn configuration_and_token_changes_roll_the_pods_replica_changes_do_not() {
    let template = |m: &BaseModel, token: &str| {
        let fp = secret::fingerprint(&secret::Credentials {
            admin: token.into(),
            cluster: "c".into(),
        });
        let sts = statefulset::statefulset(m, Role::Unified, &params(), &fp).unwrap();
        sts.spec.unwrap().template
    };
    let base = template(&BaseModel::test(), "a");
    assert_eq!(base, template(&BaseModel::test().unified(5), "a"));
    assert_ne!(
        base,
        template(&BaseModel::test().memory(0.8, "1Gi", 8), "a")
    );
    assert_ne!(base, template(&BaseModel::test(), "b"));
    let fp = secret::fingerprint(&creds());
    assert!(!fp.contains("tok") && fp.len() == 12);
}

#[test]
fn pdbs_allow_one_agent_per_role_down() {
    let m = BaseModel::test().disaggregated(2, 2);
    for role in [Role::Prefill, Role::Decode] {
        let p = pdb::pdb(&m, role);
        let spec = p.spec.unwrap();
        assert_eq!(
            spec.max_unavailable,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
        );
        assert_eq!(
            spec.selector.unwrap().match_labels.unwrap(),
            role_selector(&m, role)
        );
    }
}

#[test]
fn the_credentials_secret_holds_both_tokens_and_tokens_are_random() {
    let m = BaseModel::test();
    let s = secret::credentials(&m, &creds());
    assert_owned_child(&s, &m);
    assert_eq!(
        s.metadata.name.as_deref(),
        Some("llama3-8b-agent-credentials")
    );
    assert_eq!(secret::credentials_of(&s), Some(creds()));
    let (a, b) = (secret::generate().unwrap(), secret::generate().unwrap());
    assert_ne!(a, b);
    assert_ne!(a.admin, a.cluster);
    assert_eq!(a.admin.len(), 64);
    assert_eq!(format!("{a:?}"), "Credentials { .. }", "never printed");
}

#[test]
fn builders_are_pure() {
    let m = BaseModel::test()
        .disaggregated(2, 4)
        .memory(0.9, "64Gi", 64);
    assert_eq!(
        children(&m, &params(), &creds(), &BTreeSet::new()).unwrap(),
        children(&m, &params(), &creds(), &BTreeSet::new()).unwrap()
    );
    assert_eq!(
        hash_json(
            &children(&m, &params(), &creds(), &BTreeSet::new())
                .unwrap()
                .statefulsets
        ),
        hash_json(
            &children(&m, &params(), &creds(), &BTreeSet::new())
                .unwrap()
                .statefulsets
        )
    );
}

#[test]
fn an_object_without_uid_has_no_owner() {
    let mut m = BaseModel::test();
    m.metadata.uid = None;
    assert_eq!(service::client(&m).metadata.owner_references, None);
}

#[test]
fn the_cluster_role_is_listed_in_one_place() {
    let role = rbac::cluster_role();
    assert_eq!(role.metadata.name.as_deref(), Some(MANAGER));
    assert!(rbac::allows("apps", "statefulsets", "patch"));
    assert!(rbac::allows(
        "loraplane.dev",
        "loraadapters/status",
        "patch"
    ));
    assert!(rbac::allows("coordination.k8s.io", "leases", "update"));
    assert!(!rbac::allows("", "secrets", "update"));
}
