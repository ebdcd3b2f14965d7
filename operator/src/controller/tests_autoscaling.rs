//! Scenario tests of autoscaling per role against the mock API server: which calls a reconcile
//! makes when a role is autoscaled, when autoscaling is switched on and off, and with KEDA; and
//! that the operator never writes the count the autoscaler owns.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use serde_json::{Value, json};

use super::Settings;
use super::tests::{APPS, BM, HPA, NS, POLICY, assert_rbac, lines, reads, reconcile_model};
use crate::crd::{Autoscaling, BaseModel};
use crate::desired::autoscaling::{Autoscaler, HANDOVER_MANAGER};
use crate::desired::{AgentParams, MANAGER};
use crate::fixtures::world::World;
use crate::role::Role;

const KEDA: &str = "/apis/keda.sh/v1alpha1/namespaces/loraplane-system";

fn sts_path(role: &str) -> String {
    format!("{APPS}/statefulsets/llama3-8b-{role}")
}

fn stored_sts(w: &World, role: &str) -> StatefulSet {
    w.api.get(&sts_path(role)).unwrap()
}

fn replicas(w: &World, role: &str) -> Option<i32> {
    stored_sts(w, role).spec.unwrap().replicas
}

fn owners_of_replicas(w: &World, role: &str) -> Vec<String> {
    stored_sts(w, role)
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0["f:spec"].get("f:replicas").is_some())
        })
        .map(|m| m.manager.unwrap_or_default())
        .collect()
}

/// What the HPA controller does: an update of `spec.replicas` (through the scale subresource),
/// which takes the field's ownership.
fn hpa_scales(w: &World, role: &str, to: i32) {
    let mut v: Value = serde_json::to_value(stored_sts(w, role)).unwrap();
    v["spec"]["replicas"] = json!(to);
    let mut managers = v["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for m in &mut managers {
        if let Some(spec) = m["fieldsV1"]["f:spec"].as_object_mut() {
            spec.remove("f:replicas");
        }
    }
    managers.push(
        json!({"manager": "kube-controller-manager", "operation": "Update",
        "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:replicas": {}}}}),
    );
    v["metadata"]["managedFields"] = Value::Array(managers);
    w.api.insert(&sts_path(role), &v);
}

/// `m` with the status the API server now holds (the scenarios pass specs directly; only the
/// status is written back).
fn with_stored_status(w: &World, m: &BaseModel) -> BaseModel {
    m.clone().with_status(w.stored_model().unwrap().status)
}

fn decode_autoscaled() -> BaseModel {
    BaseModel::test()
        .disaggregated(1, 1)
        .autoscaled(Role::Decode, Autoscaling::test(2, 6).running_sequences(32))
}

#[tokio::test]
async fn an_autoscaled_role_gets_an_hpa_and_keeps_the_count_it_chooses() {
    let mut w = World::new();
    let m = decode_autoscaled();
    w.model(&m);
    reconcile_model(&w, &m).await;
    let mut want = reads();
    want.extend(lines(&[
        &format!("PATCH {NS}/configmaps/llama3-8b-agent-config"),
        &format!("PATCH {}", sts_path("prefill")),
        &format!("PATCH {}", sts_path("decode")),
        &format!("PATCH {NS}/services/llama3-8b-prefill"),
        &format!("PATCH {NS}/services/llama3-8b-decode"),
        &format!("PATCH {NS}/services/llama3-8b"),
        &format!("PATCH {POLICY}/poddisruptionbudgets/llama3-8b-prefill"),
        &format!("PATCH {POLICY}/poddisruptionbudgets/llama3-8b-decode"),
        &format!("PATCH {HPA}/horizontalpodautoscalers/llama3-8b-decode"),
        &format!("PATCH {BM}/status"),
        "POST /apis/events.k8s.io/v1/namespaces/loraplane-system/events",
    ]));
    assert_eq!(w.api.take_lines(), want);
    assert_eq!(replicas(&w, "prefill"), Some(1));
    assert_eq!(replicas(&w, "decode"), None, "the HPA's to set");
    let hpa: HorizontalPodAutoscaler = w
        .api
        .get(&format!("{HPA}/horizontalpodautoscalers/llama3-8b-decode"))
        .unwrap();
    assert_eq!(hpa.spec.unwrap().scale_target_ref.name, "llama3-8b-decode");
    let st = w.stored_model().unwrap().status.unwrap();
    assert_eq!(
        st.decode.unwrap().replicas,
        2,
        "minReplicas until the HPA acts"
    );

    // The HPA scales decode to 5: nothing is written back but the status.
    hpa_scales(&w, "decode", 5);
    reconcile_model(&w, &with_stored_status(&w, &m)).await;
    let mut want = reads();
    want.push(format!("PATCH {BM}/status"));
    assert_eq!(w.api.take_lines(), want);
    assert_eq!(
        w.stored_model()
            .unwrap()
            .status
            .unwrap()
            .decode
            .unwrap()
            .replicas,
        5
    );

    // A change that rolls the pods re-applies both StatefulSets; decode keeps the HPA's 5.
    let rolled = with_stored_status(&w, &m)
        .memory(0.8, "8Gi", 32)
        .generation(2);
    reconcile_model(&w, &rolled).await;
    let calls = w.api.take_lines();
    assert!(
        calls.contains(&format!("PATCH {}", sts_path("decode"))),
        "{calls:?}"
    );
    let decode_apply = w
        .api
        .history()
        .into_iter()
        .rfind(|c| c.method == "PATCH" && c.path == sts_path("decode"))
        .unwrap();
    assert!(
        decode_apply.body["spec"].get("replicas").is_none(),
        "the operator's apply leaves the count out"
    );
    assert_eq!(replicas(&w, "decode"), Some(5));
    assert_eq!(
        owners_of_replicas(&w, "decode"),
        ["kube-controller-manager"]
    );

    // New bounds: only the HPA moves.
    let bounds = with_stored_status(&w, &rolled)
        .generation(3)
        .autoscaled(Role::Decode, Autoscaling::test(2, 10).running_sequences(32));
    reconcile_model(&w, &bounds).await;
    let mut want = reads();
    want.push(format!(
        "PATCH {HPA}/horizontalpodautoscalers/llama3-8b-decode"
    ));
    want.push(format!("PATCH {BM}/status"));
    assert_eq!(w.api.take_lines(), want);
    assert_rbac(&w);
}

#[tokio::test]
async fn switching_autoscaling_on_hands_the_count_over_and_off_takes_it_back() {
    let mut w = World::new();
    let m = BaseModel::test().unified(3);
    w.model(&m);
    reconcile_model(&w, &m).await;
    w.api.take_lines();
    assert_eq!(owners_of_replicas(&w, "unified"), [MANAGER]);

    // On: the count is handed to a second manager at its value, then the operator's apply
    // leaves it out, so the StatefulSet keeps 3 agents instead of falling back to 1.
    let on = with_stored_status(&w, &m).generation(2).autoscaled(
        Role::Unified,
        Autoscaling::test(2, 8).running_sequences(16).kv_percent(85),
    );
    reconcile_model(&w, &on).await;
    let mut want = reads();
    want.extend(lines(&[
        &format!("PATCH {}", sts_path("unified")),
        &format!("PATCH {}", sts_path("unified")),
        &format!("PATCH {HPA}/horizontalpodautoscalers/llama3-8b-unified"),
        &format!("PATCH {BM}/status"),
    ]));
    assert_eq!(w.api.take_lines(), want);
    let history = w.api.history();
    let handover = history
        .iter()
        .find(|c| c.query.contains(HANDOVER_MANAGER))
        .expect("the hand-over apply");
    assert!(!handover.query.contains("force=true"), "{}", handover.query);
    assert!(handover.content_type.starts_with("application/apply-patch"));
    assert_eq!(handover.body["spec"], json!({"replicas": 3}));
    assert_eq!(replicas(&w, "unified"), Some(3));
    assert_eq!(owners_of_replicas(&w, "unified"), [HANDOVER_MANAGER]);

    // Unchanged: reads only, no second hand-over.
    reconcile_model(&w, &with_stored_status(&w, &on)).await;
    assert_eq!(w.api.take_lines(), reads());

    // Off: the operator applies its count again (forced) and prunes the HPA.
    let off = with_stored_status(&w, &on).generation(3).unified(4);
    reconcile_model(&w, &off).await;
    let mut want = reads();
    want.extend(lines(&[
        &format!("PATCH {}", sts_path("unified")),
        &format!("DELETE {HPA}/horizontalpodautoscalers/llama3-8b-unified"),
        &format!("PATCH {BM}/status"),
    ]));
    assert_eq!(w.api.take_lines(), want);
    assert_eq!(replicas(&w, "unified"), Some(4));
    assert_rbac(&w);
}

#[tokio::test]
async fn with_keda_the_operator_applies_scaled_objects_and_prunes_its_hpas() {
    let settings = Settings {
        agent: AgentParams {
            autoscaler: Autoscaler::Keda {
                prometheus: "http://prometheus:9090".into(),
            },
            ..AgentParams::default()
        },
        ..Settings::default()
    };
    let mut w = World::with_settings(settings);
    let m = decode_autoscaled();
    w.model(&m);
    // An HPA the operator made before it was switched to KEDA, and the one KEDA made (owned by
    // its ScaledObject, not by the model).
    let ours = crate::desired::autoscaling::hpa(
        &m,
        Role::Decode,
        m.spec
            .serving
            .decode
            .as_ref()
            .unwrap()
            .autoscaling
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    w.api.insert(
        &format!("{HPA}/horizontalpodautoscalers/llama3-8b-decode"),
        &ours,
    );
    let mut kedas = ours.clone();
    kedas.metadata.name = Some("keda-hpa-llama3-8b-decode".into());
    kedas.metadata.owner_references.as_mut().unwrap()[0].uid = "uid-scaledobject".into();
    w.api.insert(
        &format!("{HPA}/horizontalpodautoscalers/keda-hpa-llama3-8b-decode"),
        &kedas,
    );

    reconcile_model(&w, &m).await;
    let calls = w.api.take_lines();
    let mut want_reads = reads();
    want_reads.push(format!("GET {KEDA}/scaledobjects"));
    assert_eq!(calls[..want_reads.len()], want_reads[..]);
    let writes: Vec<&String> = calls[want_reads.len()..]
        .iter()
        .filter(|c| c.contains("horizontalpodautoscalers") || c.contains("scaledobjects"))
        .collect();
    assert_eq!(
        writes,
        [
            &format!("DELETE {HPA}/horizontalpodautoscalers/llama3-8b-decode"),
            &format!("PATCH {KEDA}/scaledobjects/llama3-8b-decode"),
        ]
    );
    let so: Value = w
        .api
        .get(&format!("{KEDA}/scaledobjects/llama3-8b-decode"))
        .unwrap();
    assert_eq!(so["spec"]["triggers"][0]["metadata"]["threshold"], "32");
    assert!(
        w.api
            .get::<Value>(&format!(
                "{HPA}/horizontalpodautoscalers/keda-hpa-llama3-8b-decode"
            ))
            .is_some(),
        "KEDA's own HPA is left alone"
    );

    // Unchanged: reads only.
    reconcile_model(&w, &with_stored_status(&w, &m)).await;
    assert_eq!(w.api.take_lines(), want_reads);
    assert_rbac(&w);
}
