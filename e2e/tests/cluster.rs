//! The operator against a real Kubernetes cluster (kind or k3d), run only when
//! `LORAPLANE_E2E_KUBECONFIG` names the cluster's kubeconfig; otherwise it prints a loud
//! SKIPPED line and passes. Nothing here is faked: the CRDs are installed into the cluster,
//! the real `loraplane-operator` binary runs against it (out of cluster, with leader
//! election on a Lease in the test namespace), and the suite checks what the API server
//! holds: CEL validation, children and their owner references, status and conditions,
//! Events, the finalizer, spec changes, autoscaling (the HPA, the hand-over of
//! `spec.replicas`, the HPA's count left alone) and garbage collection.
//!
//! Setup (see the README): `kind create cluster --name loraplane-e2e`,
//! `kind get kubeconfig --name loraplane-e2e > /tmp/kind.yaml`,
//! `cargo build -p loraplane-operator --bins`,
//! `LORAPLANE_E2E_KUBECONFIG=/tmp/kind.yaml cargo test -p loraplane-e2e --test cluster`.
//! `LORAPLANE_E2E_AGENT_IMAGE` picks the agent image of the StatefulSets (default: the
//! operator's); agent pods need not become ready for these checks, and the operator, running
//! outside the cluster, does not reach them. Do not run another loraplane operator in the
//! cluster meanwhile.

// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Resource, ResourceExt};
use loraplane_operator::crd::{self, BaseModel, LoraAdapter, Phase};
use serde_json::json;

const KUBECONFIG: &str = "LORAPLANE_E2E_KUBECONFIG";
const WAIT: Duration = Duration::from_secs(90);

fn operator_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join(format!(
        "loraplane-operator{}",
        std::env::consts::EXE_SUFFIX
    ));
    assert!(
        bin.is_file(),
        "{} is missing: `cargo build -p loraplane-operator --bins` first",
        bin.display()
    );
    bin
}

/// Polls `f` until it returns `Some`, or fails after `timeout` naming `what`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{:x}{:x}", std::process::id(), nanos % 0xffff)
}

async fn apply<K>(api: &Api<K>, obj: serde_json::Value) -> Result<K, kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
    api.patch(
        &name,
        &PatchParams::apply("loraplane-e2e").force(),
        &Patch::Apply(&obj),
    )
    .await
}

fn model_json(name: &str, ns: &str, tenants: &[&str], replicas: i32) -> serde_json::Value {
    json!({
        "apiVersion": "loraplane.dev/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "source": {"uri": "file:///models/tiny"},
            "serving": {"mode": "Unified", "unified": {"replicas": replicas}},
            "memory": {"devicePoolFraction": 0.5, "hostAdapterCacheBytes": "1Gi", "maxAdapterRank": 16},
            "tenancy": {"allowedNamespaces": tenants},
        }
    })
}

fn adapter_json(name: &str, ns: &str, model: &str, model_ns: &str) -> serde_json::Value {
    json!({
        "apiVersion": "loraplane.dev/v1alpha1",
        "kind": "LoraAdapter",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "baseModel": {"name": model, "namespace": model_ns},
            "source": {"huggingFace": {"repo": "acme/sql-lora"}},
            "replicas": 1,
        }
    })
}

fn is_invalid(r: Result<impl std::fmt::Debug, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(s)) if s.is_invalid())
}

async fn events_for(client: &Client, ns: &str, name: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

/// Autoscaling per role on a real API server: the CRD's rules, the HPA the operator renders,
/// `spec.replicas` handed over when autoscaling is switched on (the count does not fall back to
/// one), the HPA's count left alone by later applies, and the HPA pruned when autoscaling is
/// switched off. The model runs at 2 replicas when this starts. Without a metrics pipeline
/// the HPA controller still enforces `minReplicas`, which is what moves the count here.
async fn autoscaling(
    client: &Client,
    models: &Api<BaseModel>,
    sts_api: &Api<StatefulSet>,
    ns: &str,
    team: &str,
    name: &str,
) {
    let sts_name = format!("{name}-unified");
    let autoscaled = |min: i32, max: i32, rank: i32| {
        let mut m = model_json(name, ns, &[team], 1);
        m["spec"]["serving"]["unified"] = json!({"autoscaling": {
            "minReplicas": min, "maxReplicas": max, "scaleDownStabilizationSeconds": 30,
            "target": {"runningSequences": 16, "kvCacheUtilizationPercent": 80}}});
        m["spec"]["memory"]["maxAdapterRank"] = json!(rank);
        m
    };
    // The CRD's rules.
    for (why, bad) in [
        ("minReplicas above maxReplicas", autoscaled(4, 2, 16)),
        ("minReplicas 0", autoscaled(0, 2, 16)),
    ] {
        assert!(is_invalid(apply(models, bad).await), "{why}");
    }
    let mut both = autoscaled(1, 2, 16);
    both["spec"]["serving"]["unified"]["replicas"] = json!(2);
    assert!(
        is_invalid(apply(models, both).await),
        "replicas and autoscaling"
    );
    let mut no_target = autoscaled(1, 2, 16);
    no_target["spec"]["serving"]["unified"]["autoscaling"]["target"] = json!({});
    assert!(is_invalid(apply(models, no_target).await), "no target");
    let mut wrong = autoscaled(1, 2, 16);
    wrong["spec"]["serving"]["unified"]["autoscaling"]["target"] =
        json!({"queuedPromptTokens": 100});
    assert!(
        is_invalid(apply(models, wrong).await),
        "unified on queued prompt tokens"
    );
    let mut prefill = model_json("bad", ns, &[], 1);
    prefill["spec"]["serving"] = json!({"mode": "Disaggregated", "decode": {"replicas": 1},
        "prefill": {"autoscaling": {"minReplicas": 1, "maxReplicas": 2, "target": {"runningSequences": 4}}}});
    assert!(
        is_invalid(apply(models, prefill).await),
        "prefill on running sequences"
    );

    // On: the HPA appears; the count stays 2 (handed over), then the HPA raises it to min 3.
    apply(models, autoscaled(3, 5, 16)).await.unwrap();
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
    let hpa = eventually("the HorizontalPodAutoscaler", WAIT, || async {
        hpas.get_opt(&sts_name).await.unwrap()
    })
    .await;
    let spec = hpa.spec.unwrap();
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(3), 5));
    assert_eq!(spec.scale_target_ref.name, sts_name);
    let names: Vec<String> = spec
        .metrics
        .unwrap()
        .into_iter()
        .map(|m| m.pods.unwrap().metric.name)
        .collect();
    assert_eq!(
        names,
        [
            "loraplane_requests_running",
            "loraplane_kv_cache_utilization"
        ]
    );
    let replicas_owners = |s: &StatefulSet| -> Vec<String> {
        s.managed_fields()
            .iter()
            .filter(|m| {
                m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0["f:spec"].get("f:replicas").is_some())
            })
            .filter_map(|m| m.manager.clone())
            .collect()
    };
    let handed = eventually("spec.replicas no longer the operator's", WAIT, || async {
        let s = sts_api.get(&sts_name).await.unwrap();
        (!replicas_owners(&s)
            .iter()
            .any(|m| m == "loraplane-operator"))
        .then_some(s)
    })
    .await;
    assert!(
        handed.spec.unwrap().replicas.unwrap_or(1) >= 2,
        "the count did not fall back to 1"
    );
    eventually("the HPA raising the count to minReplicas", WAIT, || async {
        let s = sts_api.get(&sts_name).await.unwrap();
        (s.spec.unwrap().replicas == Some(3)).then_some(())
    })
    .await;

    // A change that rolls the pods: the operator re-applies the StatefulSet, the count stays.
    apply(models, autoscaled(3, 5, 32)).await.unwrap();
    eventually("the rolled StatefulSet", WAIT, || async {
        let s = sts_api.get(&sts_name).await.unwrap();
        (s.metadata.generation > handed.metadata.generation).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s = sts_api.get(&sts_name).await.unwrap();
    assert_eq!(
        s.spec.as_ref().unwrap().replicas,
        Some(3),
        "the operator leaves the HPA's count"
    );
    eventually("status reporting the HPA's count", WAIT, || async {
        let st = models.get(name).await.unwrap().status?;
        (st.unified?.replicas == 3).then_some(())
    })
    .await;

    // Off: a fixed count again, and the HPA is gone.
    apply(models, model_json(name, ns, &[team], 2))
        .await
        .unwrap();
    eventually("the HPA pruned", WAIT, || async {
        hpas.get_opt(&sts_name)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    eventually("the StatefulSet back at 2", WAIT, || async {
        let s = sts_api.get(&sts_name).await.unwrap();
        (s.spec.unwrap().replicas == Some(2)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_on_a_real_cluster() {
    let Some(path) = std::env::var_os(KUBECONFIG).filter(|p| !p.is_empty()) else {
        // Straight to the process's stderr, past the test harness's capture, so that the skip
        // shows in every CI log.
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!!!!! SKIPPED the real-cluster suite: {KUBECONFIG} is not set \
             (see e2e/tests/cluster.rs and the README for kind/k3d) !!!!!!!!\n"
        );
        return;
    };
    let kubeconfig = Kubeconfig::read_from(&path).expect("reading the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a usable kubeconfig");
    let client = Client::try_from(config).expect("a client");
    let id = suffix();
    let ns = format!("loraplane-e2e-{id}");
    let team = format!("loraplane-e2e-{id}-team");
    let outsider = format!("loraplane-e2e-{id}-other");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for n in [&ns, &team, &outsider] {
        apply(
            &namespaces,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}),
        )
        .await
        .unwrap();
    }

    // The CRDs, exactly as generated.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for c in crd::crds() {
        let name = c.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("loraplane-e2e").force(),
            &Patch::Apply(&c),
        )
        .await
        .unwrap();
        tokio::time::timeout(
            WAIT,
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD established in time")
        .unwrap();
    }

    // CEL rules and the schema are enforced by the API server.
    let models: Api<BaseModel> = Api::namespaced(client.clone(), &ns);
    let mut bad = model_json("bad", &ns, &[], 1);
    bad["spec"]["serving"] = json!({"mode": "Disaggregated", "decode": {"replicas": 1}});
    assert!(
        is_invalid(apply(&models, bad).await),
        "Disaggregated without prefill"
    );
    let mut bad = model_json("bad", &ns, &[], 1);
    bad["spec"]["memory"]["devicePoolFraction"] = json!(1.5);
    assert!(
        is_invalid(apply(&models, bad).await),
        "devicePoolFraction above 1"
    );
    let mut bad = model_json("bad", &ns, &[], 1);
    bad["spec"]["source"] = json!({"uri": "file:///m", "huggingFace": {"repo": "a/b"}});
    assert!(is_invalid(apply(&models, bad).await), "two sources");
    let adapters: Api<LoraAdapter> = Api::namespaced(client.clone(), &team);
    let mut bad = adapter_json("bad", &team, "m", &ns);
    bad["spec"]["source"] = json!({});
    assert!(is_invalid(apply(&adapters, bad).await), "no source");

    // The operator.
    let image = std::env::var("LORAPLANE_E2E_AGENT_IMAGE")
        .unwrap_or_else(|_| "ghcr.io/loraplane/loraplane-agent:latest".into());
    let log = std::env::temp_dir().join(format!("loraplane-e2e-operator-{id}.log"));
    let _operator = Operator(
        Command::new(operator_binary())
            .args([
                "run",
                "--metrics-addr",
                "127.0.0.1:0",
                "--log-format",
                "text",
            ])
            .args([
                "--lease-namespace",
                &ns,
                "--lease-name",
                &format!("loraplane-e2e-{id}"),
            ])
            .args([
                "--agent-image",
                &image,
                "--progress-requeue",
                "2s",
                "--resync",
                "30s",
            ])
            .env("KUBECONFIG", &path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("starting the operator"),
    );
    eprintln!("operator log: {}", log.display());

    // A BaseModel: children, owner references, status, Events.
    let name = "tiny";
    apply(&models, model_json(name, &ns, &[&team], 1))
        .await
        .unwrap();
    let model = models.get(name).await.unwrap();
    let uid = model.uid().unwrap();
    let owned = |refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]| {
        refs.iter()
            .any(|r| r.uid == uid && r.controller == Some(true))
    };
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let sts = eventually("the StatefulSet", WAIT, || async {
        sts_api.get_opt(&format!("{name}-unified")).await.unwrap()
    })
    .await;
    assert!(owned(sts.owner_references()));
    assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(1));
    let svc_api: Api<Service> = Api::namespaced(client.clone(), &ns);
    for s in [format!("{name}-unified"), name.to_owned()] {
        let svc = eventually("a Service", WAIT, || async {
            svc_api.get_opt(&s).await.unwrap()
        })
        .await;
        assert!(owned(svc.owner_references()), "{s}");
    }
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let config = eventually("the ConfigMap", WAIT, || async {
        cm.get_opt(&format!("{name}-agent-config")).await.unwrap()
    })
    .await;
    assert!(config.data.unwrap()["agent.toml"].contains("host-cache-bytes = \"1073741824\""));
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    eventually("the PodDisruptionBudget", WAIT, || async {
        pdbs.get_opt(&format!("{name}-unified")).await.unwrap()
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let creds = secrets
        .get(&format!("{name}-agent-credentials"))
        .await
        .unwrap();
    assert!(owned(creds.owner_references()));
    let status = eventually("BaseModel status", WAIT, || async {
        models
            .get(name)
            .await
            .unwrap()
            .status
            .filter(|s| s.observed_generation == Some(1))
    })
    .await;
    assert!(status.phase.is_some());
    let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["Ready", "Progressing", "Degraded"]);
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("{name}.{ns}.svc:50051").as_str())
    );
    eventually("an Event about the BaseModel", WAIT, || async {
        let ev = events_for(&client, &ns, name).await;
        (!ev.is_empty()).then_some(ev)
    })
    .await;

    // A spec change reaches the StatefulSet.
    apply(&models, model_json(name, &ns, &[&team], 2))
        .await
        .unwrap();
    eventually("the StatefulSet scaled to 2", WAIT, || async {
        let s = sts_api.get(&format!("{name}-unified")).await.unwrap();
        (s.spec.unwrap().replicas == Some(2)).then_some(())
    })
    .await;

    autoscaling(&client, &models, &sts_api, &ns, &team, name).await;

    // An adapter in an admitted namespace gets the finalizer and a status; one elsewhere is
    // refused admission.
    apply(&adapters, adapter_json("sql", &team, name, &ns))
        .await
        .unwrap();
    let adapter = eventually("the adapter's finalizer and status", WAIT, || async {
        let a = adapters.get("sql").await.unwrap();
        (a.finalizers().iter().any(|f| f == "loraplane.dev/unload")
            && a.status.as_ref().is_some_and(|s| s.phase.is_some()))
        .then_some(a)
    })
    .await;
    let st = adapter.status.unwrap();
    assert!(!st.conditions.is_empty());
    assert_eq!(st.observed_generation, Some(1));
    eventually("an Event about the adapter", WAIT, || async {
        let ev = events_for(&client, &team, "sql").await;
        (!ev.is_empty()).then_some(())
    })
    .await;
    let outside: Api<LoraAdapter> = Api::namespaced(client.clone(), &outsider);
    apply(&outside, adapter_json("sql", &outsider, name, &ns))
        .await
        .unwrap();
    let refused = eventually("the outsider's status", WAIT, || async {
        outside
            .get("sql")
            .await
            .unwrap()
            .status
            .filter(|s| s.phase.is_some())
    })
    .await;
    assert_eq!(refused.phase, Some(Phase::Pending));
    assert_eq!(refused.conditions[0].reason, "NamespaceNotAdmitted");

    // Deleting the adapter runs the finalizer and lets it go.
    adapters
        .delete("sql", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the adapter gone", WAIT, || async {
        adapters
            .get_opt("sql")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    // Deleting the BaseModel garbage-collects its children.
    models
        .delete(name, &DeleteParams::foreground())
        .await
        .unwrap();
    eventually("the StatefulSet garbage-collected", WAIT, || async {
        sts_api
            .get_opt(&format!("{name}-unified"))
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    outside
        .delete("sql", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the outsider gone", WAIT, || async {
        outside
            .get_opt("sql")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    for n in [&ns, &team, &outsider] {
        let _ = namespaces.delete(n, &DeleteParams::default()).await;
    }
}
