//! Scenario tests of `pvc://` adapters against the mock API server: the claims of the model's
//! namespace's adapters are mounted into its agents (one read-only volume per claim, however
//! many adapters share it) with `--pvc-mount-dir`; a tenant's `pvc://` adapter is refused with
//! a reason and mounts nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;

use super::tests::{APPS, NS, assert_rbac, lines, reads, reconcile_model};
use super::*;
use crate::crd::Phase;
use crate::desired::claims::volume_name;
use crate::fixtures::world::World;
use crate::role::Role;

const MODEL_NS: &str = "loraplane-system";

fn stored_sts(w: &World) -> StatefulSet {
    w.api
        .get(&format!("{APPS}/statefulsets/llama3-8b-unified"))
        .unwrap()
}

fn agent_toml(w: &World) -> String {
    let cm: ConfigMap = w
        .api
        .get(&format!("{NS}/configmaps/llama3-8b-agent-config"))
        .unwrap();
    cm.data.unwrap()["agent.toml"].clone()
}

fn claim_volumes(sts: &StatefulSet) -> Vec<(String, String, Option<bool>)> {
    let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.volumes
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|v| {
            let pvc = v.persistent_volume_claim.as_ref()?;
            Some((v.name.clone(), pvc.claim_name.clone(), pvc.read_only))
        })
        .collect()
}

fn claim_mounts(sts: &StatefulSet) -> Vec<(String, Option<bool>)> {
    let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .filter(|m| m.name.starts_with("claim-"))
        .map(|m| (m.mount_path.clone(), m.read_only))
        .collect()
}

#[tokio::test]
async fn pvc_adapters_mount_each_claim_once_read_only() {
    let mut w = World::new();
    let m = BaseModel::test().unified(2);
    w.model_only(&m);
    reconcile_model(&w, &m).await;
    w.api.take_lines();
    assert!(claim_volumes(&stored_sts(&w)).is_empty());
    assert!(!agent_toml(&w).contains("pvc-mount-dir"));

    // Two adapters on one claim and one on another, in the model's namespace.
    for (name, uri) in [
        ("sql", "pvc://adapters/team/sql"),
        ("tone", "pvc://adapters/team/tone"),
        ("legal", "pvc://legal-weights/v3"),
    ] {
        w.adapter(
            &LoraAdapter::test()
                .named(name)
                .in_namespace(MODEL_NS)
                .uri(uri),
        );
    }
    // A tenant's pvc:// adapter: its claim is not the model namespace's to mount.
    w.adapter(
        &LoraAdapter::test()
            .named("tenant")
            .uri("pvc://tenant-claim/x"),
    );
    let stored = w.stored_model().unwrap();
    reconcile_model(&w, &stored).await;
    let mut want = reads();
    want.extend(lines(&[
        &format!("PATCH {NS}/configmaps/llama3-8b-agent-config"),
        &format!("PATCH {APPS}/statefulsets/llama3-8b-unified"),
    ]));
    assert_eq!(w.api.take_lines(), want);
    let sts = stored_sts(&w);
    assert_eq!(
        claim_volumes(&sts),
        [
            (volume_name("adapters"), "adapters".to_owned(), Some(true)),
            (
                volume_name("legal-weights"),
                "legal-weights".to_owned(),
                Some(true)
            ),
        ]
    );
    assert_eq!(
        claim_mounts(&sts),
        [
            ("/models/adapters".to_owned(), Some(true)),
            ("/models/legal-weights".to_owned(), Some(true)),
        ]
    );
    assert!(
        agent_toml(&w).contains("pvc-mount-dir = \"/models\""),
        "{}",
        agent_toml(&w)
    );

    // Unchanged world: reads only.
    reconcile_model(&w, &stored).await;
    assert_eq!(w.api.take_lines(), reads());
    assert_rbac(&w);
}

#[tokio::test]
async fn a_tenant_pvc_adapter_is_refused_with_a_reason() {
    let mut w = World::new();
    let m = BaseModel::test().unified(1).allow(&["team-a"]);
    w.model(&m);
    let agent = w.agent(&m, Role::Unified, 0, 1 << 30);
    let a = LoraAdapter::test()
        .uri("pvc://loraplane-models/team-a/sql")
        .finalized();
    w.adapter(&a);
    lora_adapter::reconcile(Arc::new(a.clone()), w.ctx.clone())
        .await
        .unwrap();
    let st = w
        .stored_adapter("team-a", "sql-expert")
        .unwrap()
        .status
        .unwrap();
    assert_eq!(st.phase, Some(Phase::Pending));
    assert_eq!(st.conditions[0].reason, "ClaimOutsideModelNamespace");
    assert!(
        st.conditions[0].message.contains(MODEL_NS),
        "{}",
        st.conditions[0].message
    );
    assert!(w.agent_writes(&[agent]).is_empty());
}
