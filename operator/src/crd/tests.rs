#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

use super::*;

fn schema(crd: &CustomResourceDefinition) -> Value {
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

fn rules(v: &Value) -> Vec<String> {
    v["x-kubernetes-validations"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["rule"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn names_group_version_scope_and_short_names() {
    let [bm, lora] = <[CustomResourceDefinition; 2]>::try_from(crds()).unwrap();
    assert_eq!(
        bm.metadata.name.as_deref(),
        Some("basemodels.loraplane.dev")
    );
    assert_eq!(
        lora.metadata.name.as_deref(),
        Some("loraadapters.loraplane.dev")
    );
    for (crd, short) in [(&bm, "bm"), (&lora, "lora")] {
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.versions.len(), 1);
        assert_eq!(crd.spec.versions[0].name, VERSION);
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&[short.to_owned()][..])
        );
        assert!(
            crd.spec.versions[0]
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "status subresource"
        );
    }
}

#[test]
fn kubectl_get_lora_shows_base_model_phase_rank_ready_and_age() {
    let lora = LoraAdapter::crd();
    let cols: Vec<(String, String)> = lora.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .filter(|c| c.priority.unwrap_or(0) == 0)
        .map(|c| (c.name.clone(), c.json_path.clone()))
        .collect();
    let want = [
        ("Base Model", ".spec.baseModel.name"),
        ("Phase", ".status.phase"),
        ("Rank", ".status.rank"),
        ("Ready", ".status.readyReplicas"),
        ("Age", ".metadata.creationTimestamp"),
    ];
    assert_eq!(
        cols,
        want.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect::<Vec<_>>()
    );
}

#[test]
fn kubectl_get_bm_shows_mode_phase_and_ready_agents_per_role() {
    let bm = BaseModel::crd();
    let paths: Vec<String> = bm.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.json_path.clone())
        .collect();
    for p in [
        ".spec.serving.mode",
        ".status.phase",
        ".status.prefill.ready",
        ".status.decode.ready",
        ".status.unified.ready",
        ".metadata.creationTimestamp",
    ] {
        assert!(paths.iter().any(|x| x == p), "{p} in {paths:?}");
    }
}

#[test]
fn cel_rules_say_what_the_schema_cannot() {
    let [bm, lora] = <[CustomResourceDefinition; 2]>::try_from(crds()).unwrap();
    let bm = schema(&bm);
    let spec = &bm["properties"]["spec"]["properties"];
    let source = rules(&spec["source"]);
    assert!(
        source.contains(&"has(self.huggingFace) != has(self.uri)".to_owned()),
        "{source:?}"
    );
    let serving = rules(&spec["serving"]);
    assert!(
        serving.iter().any(|r| r.contains("'Disaggregated'")
            && r.contains("has(self.prefill) && has(self.decode)")),
        "{serving:?}"
    );
    assert_eq!(
        rules(&spec["memory"]["properties"]["devicePoolFraction"]),
        vec!["self > 0.0 && self <= 1.0".to_owned()]
    );
    assert_eq!(
        rules(&spec["tenancy"]),
        vec!["!(has(self.allowedNamespaces) && has(self.namespaceSelector))".to_owned()]
    );
    assert_eq!(
        rules(&bm),
        vec!["self.metadata.name.size() <= 40".to_owned()]
    );
    let lora = schema(&lora);
    assert_eq!(
        rules(&lora["properties"]["spec"]["properties"]["source"]),
        vec!["has(self.huggingFace) != has(self.uri)".to_owned()]
    );
    assert_eq!(
        rules(&lora),
        vec!["self.metadata.name.size() <= 63".to_owned()]
    );
    // What the schema itself can say stays in the schema.
    assert_eq!(
        spec["serving"]["properties"]["mode"]["enum"],
        serde_json::json!(["Unified", "Disaggregated"])
    );
    assert_eq!(
        lora["properties"]["spec"]["properties"]["source"]["properties"]["sha256"]["pattern"],
        "^(sha256:)?[0-9a-f]{64}$"
    );
}

/// Kubernetes refuses non-structural schemas: every node needs a type (or int-or-string /
/// preserve-unknown-fields).
fn assert_structural(path: &str, v: &Value) {
    let Some(obj) = v.as_object() else { return };
    if obj.contains_key("properties")
        || obj.contains_key("items")
        || obj.contains_key("additionalProperties")
        || obj.contains_key("enum")
    {
        assert!(
            obj.contains_key("type") || obj.contains_key("x-kubernetes-int-or-string"),
            "{path} has no type"
        );
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        assert!(
            !obj.contains_key(key) || path.is_empty(),
            "{path} uses {key}"
        );
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, p) in props {
            assert_structural(&format!("{path}.{k}"), p);
        }
    }
    if let Some(items) = obj.get("items") {
        assert_structural(&format!("{path}[]"), items);
    }
    if let Some(ap) = obj.get("additionalProperties") {
        assert_structural(&format!("{path}{{}}"), ap);
    }
}

#[test]
fn schemas_are_structural() {
    for crd in crds() {
        assert_structural("", &schema(&crd));
    }
}

#[test]
fn the_architecture_examples_parse() {
    let bm: BaseModel = serde_yaml::from_str(
        r#"
apiVersion: loraplane.dev/v1alpha1
kind: BaseModel
metadata: {name: llama3-8b, namespace: loraplane-system}
spec:
  source: {huggingFace: {repo: meta-llama/Meta-Llama-3-8B-Instruct, revision: main, tokenSecretRef: {name: hf-token}}}
  dtype: bfloat16
  serving:
    mode: Disaggregated
    prefill: {replicas: 2, resources: {limits: {nvidia.com/gpu: 1}}, nodeSelector: {gpu: h100}}
    decode:  {replicas: 4, resources: {limits: {nvidia.com/gpu: 1}}}
  memory: {devicePoolFraction: 0.9, hostAdapterCacheBytes: 64Gi, maxAdapterRank: 64}
  tenancy: {allowedNamespaces: [team-a, team-b]}
"#,
    )
    .unwrap();
    assert_eq!(bm.spec.serving.mode, ServingMode::Disaggregated);
    assert_eq!(bm.spec.serving.decode.unwrap().replicas, Some(4));
    let lora: LoraAdapter = serde_yaml::from_str(
        r#"
apiVersion: loraplane.dev/v1alpha1
kind: LoraAdapter
metadata: {name: sql-expert, namespace: team-a}
spec:
  baseModel: {name: llama3-8b, namespace: loraplane-system}
  source: {huggingFace: {repo: acme/sql-lora}}
  replicas: 2
"#,
    )
    .unwrap();
    assert_eq!(lora.spec.source.to_uri(), "hf://acme/sql-lora");
    assert_eq!(lora.spec.replicas, Some(AdapterReplicas::Fixed(2)));
}

#[test]
fn adapter_sources_become_agent_uris() {
    let mut s = AdapterSource {
        hugging_face: Some(HuggingFaceAdapter {
            repo: "acme/sql".into(),
            revision: Some("v2".into()),
        }),
        uri: None,
        sha256: None,
    };
    assert_eq!(s.to_uri(), "hf://acme/sql@v2");
    s.hugging_face = None;
    s.uri = Some("https://x.example/a.tar".into());
    s.sha256 = Some("sha256:ABCDEF".into());
    assert_eq!(s.to_uri(), "https://x.example/a.tar");
    assert_eq!(s.expected_sha256().as_deref(), Some("abcdef"));
}

fn chart_crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/loraplane/crds")
}

/// CI fails when the chart's CRDs differ from the types. Regenerate with
/// `cargo run -p loraplane-operator -- crds --out-dir charts/loraplane/crds`.
#[test]
fn committed_crds_match_the_types() {
    let dir = chart_crds_dir();
    for crd in crds() {
        let path = dir.join(crd_file_name(&crd));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == crd_yaml(&crd).unwrap(),
            "{} differs from the CRD types; regenerate it with\n    cargo run -p loraplane-operator -- crds --out-dir charts/loraplane/crds",
            path.display()
        );
    }
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec![
            "basemodels.loraplane.dev.yaml",
            "loraadapters.loraplane.dev.yaml"
        ],
        "charts/loraplane/crds holds exactly the generated CRDs"
    );
}
