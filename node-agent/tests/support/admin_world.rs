//! Shared setup of the admin API tests: a tiny fixture model on a real engine, fixture
//! adapters under a local root, and an `AdminState` with a known admin token.

// Each test binary that includes this uses a different part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use loraplane_agent::api::admin::AdminState;
use loraplane_agent::api::auth::{AdminAuth, TenantLimits, TenantSpec, Tenants};
use loraplane_agent::api::lifecycle::Lifecycle;
use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::disagg::config::Role;
use loraplane_agent::engine::EngineConfig;
use loraplane_agent::engine::actor::EngineHandle;
use loraplane_agent::fixtures::adapter::{self, AdapterSpec};
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::Module;
use loraplane_agent::lora::ids::Digest;
use loraplane_agent::model::config::Arch;
use loraplane_agent::sources::SourceOptions;
use sha2::Digest as _;

pub const ADMIN_TOKEN: &str = "admin-secret-token";
pub const TENANT_KEY: &str = "tenant-a-key";

pub struct World {
    pub dir: tempfile::TempDir,
    /// The local root adapters may be loaded from.
    pub root: PathBuf,
    pub state: Arc<AdminState<EngineHandle>>,
    /// The engine behind `state`, to run requests on.
    pub engine: EngineHandle,
    pub tenants: Tenants,
    pub lifecycle: Lifecycle,
}

impl World {
    /// An adapter directory under the root (`a`, `b`, `c` exist).
    pub fn adapter(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }

    /// The sha256 of an adapter's weights.
    pub fn digest(&self, name: &str) -> Digest {
        let bytes = std::fs::read(self.root.join(name).join("adapter_model.safetensors")).unwrap();
        Digest::of(&bytes)
    }

    /// Configures tenant `team-a` with [`TENANT_KEY`] and the given adapter limit.
    pub fn add_tenant(&self, max_adapters: u32) {
        self.tenants
            .replace(vec![TenantSpec {
                id: "team-a".into(),
                api_key_sha256: vec![hex::encode(sha2::Sha256::digest(TENANT_KEY))],
                limits: TenantLimits {
                    max_adapters,
                    ..TenantLimits::default()
                },
            }])
            .unwrap();
    }
}

pub fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    model::write(
        &ModelSpec {
            arch: Arch::Llama,
            preset: Preset::Tiny,
            dtype: FixtureDtype::F32,
            seed: 5,
            shards: 1,
        },
        &model_dir,
    )
    .unwrap();
    let root = dir.path().join("adapters");
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let spec = AdapterSpec {
            rank: 4 + 4 * i,
            alpha: 8.0,
            targets: vec![Module::Q, Module::V],
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            rslora: false,
            dtype: FixtureDtype::F32,
            seed: 40 + i as u64,
        };
        adapter::write(&spec, &model_dir, &root.join(name)).unwrap();
    }
    let engine = EngineHandle::spawn(CpuBackend, &model_dir, EngineConfig::default()).unwrap();
    let mut sources = SourceOptions::new(dir.path().join("cache"));
    sources.local_roots = vec![root.clone()];
    let tenants = Tenants::new(vec![]).unwrap();
    let lifecycle = Lifecycle::new(Duration::from_secs(2));
    let state = Arc::new(AdminState::new(
        engine.clone(),
        tenants.clone(),
        AdminAuth::from_token(ADMIN_TOKEN).unwrap(),
        lifecycle.clone(),
        sources,
        Role::Unified,
        "tiny-llama",
    ));
    World {
        dir,
        root,
        state,
        engine,
        tenants,
        lifecycle,
    }
}
