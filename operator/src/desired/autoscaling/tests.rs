#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::collections::BTreeSet;
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
use kube::ResourceExt;
use serde_json::json;

use super::*;
use crate::controller::base_model::children;
use crate::crd::Autoscaling;
use crate::desired::secret::Credentials;
use crate::desired::{AgentParams, labels};

fn creds() -> Credentials {
    Credentials {
        admin: "admin-tok".into(),
        cluster: "cluster-tok".into(),
    }
}

fn keda() -> AgentParams {
    AgentParams {
        autoscaler: Autoscaler::Keda {
            prometheus: "http://prometheus.monitoring.svc:9090".into(),
        },
        ..AgentParams::default()
    }
}

/// Disaggregated: prefill 1..4 on queued prompt tokens; decode 2..8 on running sequences and
/// KV usage, scaling down after two minutes.
fn disaggregated() -> BaseModel {
    BaseModel::test()
        .disaggregated(1, 1)
        .autoscaled(
            Role::Prefill,
            Autoscaling::test(1, 4).queued_prompt_tokens(2048),
        )
        .autoscaled(
            Role::Decode,
            Autoscaling::test(2, 8)
                .running_sequences(32)
                .kv_percent(80)
                .scale_down_after(120),
        )
}

fn metric(hpa: &HorizontalPodAutoscaler, i: usize) -> (String, String, String, String) {
    let m = &hpa.spec.as_ref().unwrap().metrics.as_ref().unwrap()[i];
    let pods = m.pods.as_ref().unwrap();
    (
        m.type_.clone(),
        pods.metric.name.clone(),
        pods.target.type_.clone(),
        pods.target.average_value.as_ref().unwrap().0.clone(),
    )
}

fn owned(obj: &impl kube::Resource, role: &str) {
    let owners = obj.meta().owner_references.as_ref().unwrap();
    assert_eq!(
        (owners[0].kind.as_str(), owners[0].controller),
        ("BaseModel", Some(true))
    );
    let l = obj.meta().labels.as_ref().unwrap();
    assert_eq!(l[labels::MANAGED_BY], MANAGER);
    assert_eq!(l[labels::BASE_MODEL], "llama3-8b");
    assert_eq!(l[labels::ROLE], role);
}

#[test]
fn each_autoscaled_role_gets_an_hpa_on_its_agents_metrics() {
    let m = disaggregated();
    let c = children(&m, &AgentParams::default(), &creds(), &BTreeSet::new()).unwrap();
    assert!(c.scaled_objects.is_empty());
    let names: Vec<String> = c.hpas.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["llama3-8b-prefill", "llama3-8b-decode"]);

    let prefill = &c.hpas[0];
    owned(prefill, "prefill");
    let spec = prefill.spec.as_ref().unwrap();
    assert_eq!(
        (
            spec.scale_target_ref.api_version.as_deref(),
            spec.scale_target_ref.kind.as_str(),
            spec.scale_target_ref.name.as_str()
        ),
        (Some("apps/v1"), "StatefulSet", "llama3-8b-prefill")
    );
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(1), 4));
    assert_eq!(
        metric(prefill, 0),
        (
            "Pods".into(),
            "loraplane_queued_prefill_tokens".into(),
            "AverageValue".into(),
            "2048".into()
        )
    );
    let window = |h: &HorizontalPodAutoscaler| {
        h.spec
            .as_ref()
            .unwrap()
            .behavior
            .as_ref()
            .unwrap()
            .scale_down
            .as_ref()
            .unwrap()
            .stabilization_window_seconds
    };
    assert_eq!(window(prefill), Some(DEFAULT_SCALE_DOWN_STABILIZATION_S));

    let decode = &c.hpas[1];
    owned(decode, "decode");
    let spec = decode.spec.as_ref().unwrap();
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 8));
    assert_eq!(
        spec.metrics.as_ref().unwrap().len(),
        2,
        "the larger count wins"
    );
    assert_eq!(metric(decode, 0).1, "loraplane_requests_running");
    assert_eq!(metric(decode, 0).3, "32");
    assert_eq!(metric(decode, 1).1, "loraplane_kv_cache_utilization");
    assert_eq!(metric(decode, 1).3, "800m", "80 % as a 0..1 quantity");
    assert_eq!(window(decode), Some(120));
    assert!(
        spec.behavior.as_ref().unwrap().scale_up.is_none(),
        "scale-up keeps the HPA's defaults"
    );

    // The autoscaler owns the counts; the PDBs stay.
    for sts in &c.statefulsets {
        assert_eq!(
            sts.spec.as_ref().unwrap().replicas,
            None,
            "{}",
            sts.name_any()
        );
    }
    assert_eq!(c.pdbs.len(), 2);
}

#[test]
fn a_fixed_role_keeps_its_replicas_and_gets_no_autoscaler() {
    let m = BaseModel::test().unified(3);
    let c = children(&m, &AgentParams::default(), &creds(), &BTreeSet::new()).unwrap();
    assert!(c.hpas.is_empty() && c.scaled_objects.is_empty());
    assert_eq!(c.statefulsets[0].spec.as_ref().unwrap().replicas, Some(3));

    // Switching autoscaling on does not roll the pods.
    let auto =
        BaseModel::test().autoscaled(Role::Unified, Autoscaling::test(1, 3).running_sequences(16));
    let a = children(&auto, &AgentParams::default(), &creds(), &BTreeSet::new()).unwrap();
    assert_eq!(
        a.statefulsets[0].spec.as_ref().unwrap().template,
        c.statefulsets[0].spec.as_ref().unwrap().template
    );

    // Only the autoscaled role of a disaggregated model gets one.
    let m = BaseModel::test()
        .disaggregated(2, 1)
        .autoscaled(Role::Decode, Autoscaling::test(1, 3).running_sequences(16));
    let c = children(&m, &AgentParams::default(), &creds(), &BTreeSet::new()).unwrap();
    assert_eq!(c.hpas.len(), 1);
    assert_eq!(c.hpas[0].name_any(), "llama3-8b-decode");
    let replicas: Vec<Option<i32>> = c
        .statefulsets
        .iter()
        .map(|s| s.spec.as_ref().unwrap().replicas)
        .collect();
    assert_eq!(replicas, [Some(2), None]);
}

#[test]
fn keda_mode_renders_scaled_objects_with_prometheus_triggers() {
    let m = disaggregated();
    let c = children(&m, &keda(), &creds(), &BTreeSet::new()).unwrap();
    assert!(c.hpas.is_empty(), "KEDA makes its own HPA");
    assert_eq!(c.scaled_objects.len(), 2);
    let decode = &c.scaled_objects[1];
    owned(decode, "decode");
    assert_eq!(decode.name_any(), "llama3-8b-decode");
    let v = serde_json::to_value(decode).unwrap();
    assert_eq!(v["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(v["kind"], "ScaledObject");
    let spec = &v["spec"];
    assert_eq!(
        spec["scaleTargetRef"],
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "llama3-8b-decode"})
    );
    assert_eq!(
        (
            spec["minReplicaCount"].as_i64(),
            spec["maxReplicaCount"].as_i64()
        ),
        (Some(2), Some(8))
    );
    assert_eq!(
        spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"],
        120
    );
    let sel = r#"namespace="loraplane-system",pod=~"llama3-8b-decode-[0-9]+""#;
    assert_eq!(
        spec["triggers"],
        json!([
            {"type": "prometheus", "metricType": "AverageValue", "metadata": {
                "serverAddress": "http://prometheus.monitoring.svc:9090",
                "query": format!("sum(loraplane_requests_running{{{sel}}})"),
                "threshold": "32"}},
            {"type": "prometheus", "metricType": "AverageValue", "metadata": {
                "serverAddress": "http://prometheus.monitoring.svc:9090",
                "query": format!(r#"sum(loraplane_pool_used_pages{{kind="kv",{sel}}} / ignoring(kind) loraplane_pool_capacity_pages{{{sel}}})"#),
                "threshold": "0.8"}},
        ])
    );
    let prefill = serde_json::to_value(&c.scaled_objects[0]).unwrap();
    assert_eq!(
        prefill["spec"]["triggers"][0]["metadata"]["query"],
        r#"sum(loraplane_queued_prefill_tokens{namespace="loraplane-system",pod=~"llama3-8b-prefill-[0-9]+"})"#
    );
    assert_eq!(
        prefill["spec"]["triggers"][0]["metadata"]["threshold"],
        "2048"
    );
}

#[test]
fn invalid_autoscaling_is_a_spec_error_naming_the_role() {
    let cases = [
        (
            Role::Decode,
            Autoscaling::test(4, 2).running_sequences(8),
            "minReplicas 4 exceeds maxReplicas 2",
        ),
        (
            Role::Decode,
            Autoscaling::test(0, 2).running_sequences(8),
            "within 1..=1024",
        ),
        (
            Role::Decode,
            Autoscaling::test(1, 2),
            "set at least one target",
        ),
        (
            Role::Prefill,
            Autoscaling::test(1, 2).running_sequences(8),
            "prefill autoscaling targets queuedPromptTokens only",
        ),
        (
            Role::Decode,
            Autoscaling::test(1, 2).queued_prompt_tokens(100),
            "not queuedPromptTokens",
        ),
        (
            Role::Decode,
            Autoscaling::test(1, 2).kv_percent(101),
            "target.kvCacheUtilizationPercent 101 must be within 1..=100",
        ),
        (
            Role::Decode,
            Autoscaling::test(1, 2)
                .running_sequences(4)
                .scale_down_after(-1),
            "scaleDownStabilizationSeconds",
        ),
    ];
    for (role, a, why) in cases {
        let m = BaseModel::test().disaggregated(1, 1).autoscaled(role, a);
        for params in [AgentParams::default(), keda()] {
            let err = children(&m, &params, &creds(), &BTreeSet::new()).unwrap_err();
            assert_eq!(err.kind(), "invalid_autoscaling");
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("spec.serving.{role}.autoscaling: ")) && msg.contains(why),
                "{msg} should say {why}"
            );
        }
    }
    // A fixed count beside autoscaling would pin what the autoscaler owns.
    let mut m = BaseModel::test()
        .unified(1)
        .autoscaled(Role::Unified, Autoscaling::test(1, 2).running_sequences(10));
    m.spec.serving.unified.as_mut().unwrap().replicas = Some(2);
    let err = children(&m, &AgentParams::default(), &creds(), &BTreeSet::new()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.serving.unified.autoscaling: set replicas or autoscaling, not both"
    );
    // Unified agents scale like decode agents.
    let m = BaseModel::test().unified(1).autoscaled(
        Role::Unified,
        Autoscaling::test(1, 2).queued_prompt_tokens(10),
    );
    assert!(children(&m, &AgentParams::default(), &creds(), &BTreeSet::new()).is_err());
}

fn sts(replicas: Option<i32>, managers: &[(&str, &str, serde_json::Value)]) -> StatefulSet {
    StatefulSet {
        metadata: kube::api::ObjectMeta {
            name: Some("llama3-8b-decode".into()),
            namespace: Some("loraplane-system".into()),
            managed_fields: Some(
                managers
                    .iter()
                    .map(|(m, op, f)| ManagedFieldsEntry {
                        manager: Some((*m).into()),
                        operation: Some((*op).into()),
                        fields_type: Some("FieldsV1".into()),
                        fields_v1: Some(FieldsV1(f.clone())),
                        ..ManagedFieldsEntry::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(StatefulSetSpec {
            replicas,
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

#[test]
fn the_autoscaled_count_is_the_statefulsets_within_the_bounds() {
    let spec = RoleSpec {
        autoscaling: Some(Autoscaling::test(2, 6).running_sequences(8)),
        ..RoleSpec::default()
    };
    assert_eq!(
        wanted_replicas(&spec, None),
        2,
        "before the StatefulSet exists"
    );
    for (have, want) in [(Some(4), 4), (Some(1), 2), (Some(9), 6), (None, 2)] {
        assert_eq!(
            wanted_replicas(&spec, Some(&sts(have, &[]))),
            want,
            "{have:?}"
        );
    }
    let fixed = RoleSpec {
        replicas: Some(3),
        ..RoleSpec::default()
    };
    assert_eq!(wanted_replicas(&fixed, Some(&sts(Some(7), &[]))), 3);
    assert_eq!(wanted_replicas(&RoleSpec::default(), None), 1);
}

#[test]
fn replicas_are_handed_over_only_while_the_operator_owns_them() {
    let auto = RoleSpec {
        autoscaling: Some(Autoscaling::test(2, 6).running_sequences(8)),
        ..RoleSpec::default()
    };
    let ours =
        json!({"f:metadata": {"f:labels": {}}, "f:spec": {"f:replicas": {}, "f:template": {}}});
    let ours_without = json!({"f:spec": {"f:template": {}}});
    let hpa_wrote = json!({"f:spec": {"f:replicas": {}}});

    // Applied by the operator with a count, now autoscaled: held at the current count, even
    // outside the bounds (another value would conflict with the operator's ownership).
    let live = sts(Some(9), &[(MANAGER, "Apply", ours.clone())]);
    assert_eq!(replicas_handover(&live, &auto), Some(9));
    let patch = handover_patch(&live, 9);
    assert_eq!(
        patch,
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
               "metadata": {"name": "llama3-8b-decode", "namespace": "loraplane-system"},
               "spec": {"replicas": 9}})
    );

    // Already handed over, or the HPA took it: nothing to do.
    for managers in [
        vec![
            (MANAGER, "Apply", ours_without.clone()),
            (HANDOVER_MANAGER, "Apply", hpa_wrote.clone()),
        ],
        vec![
            (MANAGER, "Apply", ours_without),
            ("kube-controller-manager", "Update", hpa_wrote.clone()),
        ],
        // Another manager applying replicas is not the operator.
        vec![("kubectl", "Apply", hpa_wrote)],
    ] {
        assert_eq!(replicas_handover(&sts(Some(3), &managers), &auto), None);
    }

    // A fixed role has nothing to hand over.
    let fixed = RoleSpec {
        replicas: Some(3),
        ..RoleSpec::default()
    };
    assert_eq!(
        replicas_handover(&sts(Some(3), &[(MANAGER, "Apply", ours)]), &fixed),
        None
    );
}

/// The custom metrics the HPAs name are exactly those the chart's prometheus-adapter rules
/// serve (the chart test runs the rules' queries against live agents).
#[test]
fn the_chart_serves_every_metric_the_hpas_name() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/loraplane/files/prometheus-adapter-rules.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut served: Vec<String> = rules["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r["name"]["as"].as_str().unwrap().to_owned())
        .collect();
    served.sort();
    let mut named: Vec<&str> = metric_names::ALL.to_vec();
    named.sort_unstable();
    assert_eq!(served, named, "{}", path.display());
    for t in [
        LoadTarget::QueuedPromptTokens(1),
        LoadTarget::RunningSequences(1),
        LoadTarget::KvCacheUtilizationPercent(1),
    ] {
        assert!(metric_names::ALL.contains(&t.metric_name()));
    }
}
