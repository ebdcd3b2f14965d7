//! The contract between the CRDs and the agent: every URI scheme a CRD's schema accepts, the
//! agent can load. The schemes are read from the generated CRDs' `uri` patterns, so adding one
//! to a CRD without teaching the agent (and this test) to load it fails here.
//!
//! Adapters: one agent, configured the way the operator and the chart configure it (CA bundle,
//! object-store credentials, `--pvc-mount-dir`, adapter roots, Hub endpoint), loads the same
//! adapter through every scheme of `LoraAdapter.spec.source.uri` as the operator sends it
//! (`AdapterSource::to_uri`), from real servers (HTTPS with a private CA, moto,
//! fake-gcs-server, Azurite, a Hub stand-in) and directories, and serves what the local files
//! serve. Models: for every scheme of `BaseModel.spec.source.uri`, an agent starts from the
//! operator's `--model` (`desired::config::model_arg`) and serves.

// Test setup fails loudly by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use loraplane_e2e::object_stores::{Azurite, FakeGcs};
use loraplane_e2e::s3::MotoS3;
use loraplane_e2e::servers::{self, Files};
use loraplane_e2e::{Agent, World, complete, key_hash, load_lora, post_json};
use loraplane_operator::crd::{AdapterSource, BaseModel, LoraAdapter};
use loraplane_operator::desired::config::{PVC_DIR, model_arg};

const ADMIN: &str = "contract-admin";
const URI_PATTERN: &str = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/source/properties/uri/pattern";

/// The schemes of a CRD's `^(a|b|…)://.+$` source pattern.
fn schemes<K: CustomResourceExt>() -> Vec<String> {
    let crd = serde_json::to_value(K::crd()).unwrap();
    let pattern = crd
        .pointer(URI_PATTERN)
        .and_then(|p| p.as_str())
        .unwrap_or_else(|| panic!("{} has no spec.source.uri pattern", K::crd_name()));
    let inner = pattern
        .strip_prefix("^(")
        .and_then(|p| p.strip_suffix(")://.+$"))
        .unwrap_or_else(|| panic!("unexpected pattern shape {pattern:?}"));
    inner.split('|').map(str::to_owned).collect()
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for (name, bytes) in files_of(from) {
        std::fs::write(to.join(name), bytes).unwrap();
    }
}

/// The object-store servers of `s3://`, `gs://` and `az://`, each holding the same objects.
struct Stores {
    s3: MotoS3,
    gcs: FakeGcs,
    azure: Azurite,
}

impl Stores {
    fn start(puts: &[(String, &Path)]) -> Stores {
        Stores {
            s3: MotoS3::start(&[], puts),
            gcs: FakeGcs::start(&[], puts),
            azure: Azurite::start(&[], puts),
        }
    }

    /// The agent's environment for all three, as the chart would set it.
    fn env(&self) -> Vec<(&'static str, String)> {
        [self.s3.env(), self.gcs.env(), self.azure.env()].concat()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_adapter_scheme_the_crd_accepts_loads_on_the_agent() {
    let w = World::tiny();
    let sql = w.adapter("local/sql", 5);
    let adapter_files = files_of(&sql);

    // The servers and directories behind each scheme, all holding the same adapter.
    let https: Files = adapter_files
        .iter()
        .map(|(n, b)| (format!("a/sql/{n}"), b.clone()))
        .collect();
    let (https_addr, ca) = servers::https_files(https).await;
    let ca_file = w.path("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let puts: Vec<(String, PathBuf)> = adapter_files
        .iter()
        .map(|(n, _)| (format!("adapters/acme/sql/{n}"), sql.join(n)))
        .collect();
    let puts: Vec<(String, &Path)> = puts.iter().map(|(k, p)| (k.clone(), p.as_path())).collect();
    let stores = Stores::start(&puts);
    let hub: Files = adapter_files
        .iter()
        .map(|(n, b)| (format!("acme/sql-lora/{n}"), b.clone()))
        .collect();
    let hub = servers::hub(hub).await;
    let pvc_mounts = w.path("pvc");
    copy_dir(&sql, &pvc_mounts.join("team-adapters/acme/sql"));

    let mut uris: HashMap<&str, String> = HashMap::from([
        (
            "https",
            format!("https://localhost:{}/a/sql", https_addr.port()),
        ),
        ("s3", "s3://adapters/acme/sql".to_owned()),
        ("gs", "gs://adapters/acme/sql".to_owned()),
        ("az", "az://adapters/acme/sql".to_owned()),
        ("pvc", "pvc://team-adapters/acme/sql".to_owned()),
        ("file", format!("file://{}", sql.display())),
        ("hf", "hf://acme/sql-lora".to_owned()),
    ]);
    let env = stores.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let admin = key_hash(ADMIN);
    let agent = Agent::start_with_env(
        &w,
        &[
            "--admin-token-sha256",
            admin.as_str(),
            "--adapter-roots",
            w.path("local").to_str().unwrap(),
            "--source-ca-file",
            ca_file.to_str().unwrap(),
            "--allowed-private-hosts",
            "localhost",
            "--pvc-mount-dir",
            pvc_mounts.to_str().unwrap(),
            "--hf-endpoint",
            hub.as_str(),
        ],
        &env,
    );
    let r = load_lora(&agent, ADMIN, "reference", sql.to_str().unwrap()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let reference = complete(&agent, "reference").await;

    let accepted = schemes::<LoraAdapter>();
    assert!(accepted.len() >= 5, "{accepted:?}");
    for scheme in &accepted {
        let uri = uris.remove(scheme.as_str()).unwrap_or_else(|| {
            panic!(
                "the LoraAdapter CRD accepts {scheme}:// but nothing here loads it: teach the \
                 agent (node-agent/src/sources) and add a case to this test"
            )
        });
        // What the operator sends the agent for this spec.
        let source = AdapterSource {
            hugging_face: None,
            uri: Some(uri),
            sha256: None,
        };
        let name = format!("via-{scheme}");
        let r = load_lora(&agent, ADMIN, &name, &source.to_uri()).await;
        assert_eq!(r.status, 200, "{scheme}: {}", r.text());
        assert_eq!(complete(&agent, &name).await, reference, "{scheme}");
    }
    assert!(
        uris.is_empty(),
        "schemes the CRD no longer accepts: {:?}",
        uris.keys()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_model_scheme_the_crd_accepts_starts_an_agent() {
    let w = World::tiny();
    let model_files = files_of(&w.model);
    let https: Files = model_files
        .iter()
        .map(|(n, b)| (format!("m/tiny/{n}"), b.clone()))
        .collect();
    let (https_addr, ca) = servers::https_files(https).await;
    let ca_file = w.path("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let puts: Vec<(String, PathBuf)> = model_files
        .iter()
        .map(|(n, _)| (format!("models/tiny/{n}"), w.model.join(n)))
        .collect();
    let puts: Vec<(String, &Path)> = puts.iter().map(|(k, p)| (k.clone(), p.as_path())).collect();
    let stores = Stores::start(&puts);
    // The operator mounts a model's claim at PVC_DIR/<claim>; here that directory is a temp one.
    let pvc_mounts = w.path("pvc");
    copy_dir(&w.model, &pvc_mounts.join("models-claim/tiny"));

    let mut uris: HashMap<&str, String> = HashMap::from([
        (
            "https",
            format!("https://localhost:{}/m/tiny", https_addr.port()),
        ),
        ("s3", "s3://models/tiny".to_owned()),
        ("gs", "gs://models/tiny".to_owned()),
        ("az", "az://models/tiny".to_owned()),
        ("pvc", "pvc://models-claim/tiny".to_owned()),
        ("file", format!("file://{}", w.model.display())),
    ]);
    for scheme in schemes::<BaseModel>() {
        let uri = uris.remove(scheme.as_str()).unwrap_or_else(|| {
            panic!(
                "the BaseModel CRD accepts {scheme}:// but nothing here loads it: teach the \
                 agent and the operator's model_arg, and add a case to this test"
            )
        });
        let model: BaseModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "loraplane.dev/v1alpha1",
            "kind": "BaseModel",
            "metadata": {"name": "tiny", "namespace": "models"},
            "spec": {"source": {"uri": uri}, "serving": {"mode": "Unified"}},
        }))
        .unwrap();
        let mut arg = model_arg(&model).unwrap();
        if let Some(rest) = arg.strip_prefix(PVC_DIR) {
            arg = format!("{}{rest}", pvc_mounts.display());
        }
        let cache = w.path(&format!("cache-{scheme}"));
        let env: Vec<(&str, String)> = stores.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let agent = Agent::start_from(
            &w,
            arg.as_ref(),
            &[
                "--served-model-name",
                "tiny",
                "--source-ca-file",
                ca_file.to_str().unwrap(),
                "--allowed-private-hosts",
                "localhost",
                "--source-cache-dir",
                cache.to_str().unwrap(),
            ],
            &env,
        );
        let r = post_json(
            agent.http,
            "/v1/completions",
            None,
            &serde_json::json!({"model": "tiny", "prompt": "hi", "max_tokens": 2}),
        )
        .await;
        assert_eq!(r.status, 200, "{scheme} ({arg}): {}", r.text());
    }
    assert!(
        uris.is_empty(),
        "schemes the CRD no longer accepts: {:?}",
        uris.keys()
    );
}
