//! The benchmarks' fixtures and engines: a deterministic fixture model and PEFT adapters in the
//! real on-disk formats (generated once per cache directory), and engines sized for a
//! workload, with adapters registered through the same load path the actor uses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use loraplane_agent::backend::Backend;
use loraplane_agent::engine::core::kv_geometry;
use loraplane_agent::engine::{Engine, EngineConfig};
use loraplane_agent::fixtures::adapter::{self, AdapterSpec};
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::Module;
use loraplane_agent::lora::host::{self, AdapterLimits, HostAdapter};
use loraplane_agent::lora::ids::AdapterKey;
use loraplane_agent::lora::registry::plan_placement;
use loraplane_agent::model::config::{Arch, ModelConfig};

/// The tenant every benchmark adapter belongs to.
pub const TENANT: &str = "default";

/// Fixture files, generated on first use and reused (a `.complete` marker is written last, so
/// an interrupted generation is redone).
pub(crate) struct Fixtures {
    root: PathBuf,
    _temp: Option<tempfile::TempDir>,
    preset: Preset,
    /// Decoder layers instead of the preset's (`--layers`).
    layers: Option<usize>,
    seed: u64,
    /// Adapters loaded into host memory once per directory; engines get clones.
    hosts: HashMap<PathBuf, Arc<HostAdapter>>,
}

fn preset_name(p: Preset) -> &'static str {
    match p {
        Preset::Tiny => "tiny",
        Preset::Small => "small",
        Preset::Bench => "bench",
        Preset::Slora => "slora",
    }
}

fn complete(dir: &Path) -> bool {
    dir.join(".complete").exists()
}

fn mark_complete(dir: &Path) -> anyhow::Result<()> {
    std::fs::write(dir.join(".complete"), b"")
        .with_context(|| format!("marking {} complete", dir.display()))
}

impl Fixtures {
    pub fn new(
        cache_dir: Option<PathBuf>,
        preset: Preset,
        layers: Option<usize>,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let (root, temp) = match cache_dir {
            Some(dir) => (dir, None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("loraplane-bench-")
                    .tempdir()
                    .context("creating a temporary fixture directory")?;
                (t.path().to_owned(), Some(t))
            }
        };
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Fixtures {
            root,
            _temp: temp,
            preset,
            layers,
            seed,
            hosts: HashMap::new(),
        })
    }

    /// The preset's name in directory names, with the layer count when `--layers` changes it
    /// (adapters depend on it too).
    fn model_name(&self) -> String {
        match self.layers {
            None => preset_name(self.preset).to_owned(),
            Some(l) => format!("{}-{l}layers", preset_name(self.preset)),
        }
    }

    /// The directory fixtures are written under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn preset_name(&self) -> &'static str {
        preset_name(self.preset)
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The fixture checkpoint's directory (Llama 3 architecture, f32).
    pub fn model(&self) -> anyhow::Result<PathBuf> {
        let dir = self
            .root
            .join(format!("model-{}-{}", self.model_name(), self.seed));
        if !complete(&dir) {
            model::write_with_layers(
                &ModelSpec {
                    arch: Arch::Llama,
                    preset: self.preset,
                    dtype: FixtureDtype::F32,
                    seed: self.seed,
                    shards: 1,
                },
                self.layers,
                &dir,
            )?;
            mark_complete(&dir)?;
        }
        Ok(dir)
    }

    /// A fixture adapter of `rank` on `targets`; `variant` gives different weights.
    pub fn adapter(
        &self,
        rank: usize,
        targets: &[Module],
        variant: usize,
    ) -> anyhow::Result<PathBuf> {
        let model = self.model()?;
        let names: Vec<&str> = targets.iter().map(|m| m.name()).collect();
        let dir = self.root.join(format!(
            "adapters-{}-{}/r{rank}-{}-v{variant}",
            self.model_name(),
            self.seed,
            names.join("+")
        ));
        if !complete(&dir) {
            let spec = AdapterSpec {
                rank,
                alpha: 2.0 * rank as f64,
                targets: targets.to_vec(),
                rank_pattern: Default::default(),
                alpha_pattern: Default::default(),
                rslora: false,
                dtype: FixtureDtype::F32,
                seed: self.seed.wrapping_mul(7919) + 1000 + variant as u64,
            };
            adapter::write(&spec, &model, &dir)?;
            mark_complete(&dir)?;
        }
        Ok(dir)
    }

    /// The adapter in `dir`, read and validated once.
    pub fn host_adapter(
        &mut self,
        dir: &Path,
        config: &ModelConfig,
    ) -> anyhow::Result<Arc<HostAdapter>> {
        if let Some(a) = self.hosts.get(dir) {
            return Ok(a.clone());
        }
        let a = Arc::new(
            host::load(dir, config, &AdapterLimits::default())
                .with_context(|| format!("loading {}", dir.display()))?,
        );
        self.hosts.insert(dir.to_owned(), a.clone());
        Ok(a)
    }
}

/// One benchmark adapter: its name and the directory of its weights.
#[derive(Debug, Clone)]
pub(crate) struct AdapterDef {
    pub name: String,
    pub dir: PathBuf,
}

/// `count` adapters named `lora-0…`, ranks cycled from `ranks`, over `targets`. Adapters share
/// at most `distinct` weight files (adapter `i` uses variant `i / ranks.len() % per_rank`):
/// the engine still treats every name as a separate adapter (its own host-cache entry, pool
/// pages and loads), which is what the benchmarks measure; the files only bound disk use.
pub(crate) fn adapter_defs(
    fixtures: &Fixtures,
    count: usize,
    ranks: &[usize],
    targets: &[Module],
    distinct: usize,
) -> anyhow::Result<Vec<AdapterDef>> {
    anyhow::ensure!(!ranks.is_empty(), "at least one rank is needed");
    let per_rank = distinct.div_ceil(ranks.len()).max(1);
    (0..count)
        .map(|i| {
            let rank = ranks[i % ranks.len()];
            let variant = (i / ranks.len()) % per_rank;
            Ok(AdapterDef {
                name: format!("lora-{i}"),
                dir: fixtures.adapter(rank, targets, variant)?,
            })
        })
        .collect()
}

/// The model's configuration, read from its checkpoint.
pub(crate) fn model_config(dir: &Path) -> anyhow::Result<ModelConfig> {
    Ok(ModelConfig::read(dir)?)
}

/// Pool pages for the adapters (each fully resident) plus `kv_tokens` tokens of KV, plus 10 %.
pub(crate) fn pool_pages(
    config: &ModelConfig,
    block_size: usize,
    adapters: &[Arc<HostAdapter>],
    kv_tokens: usize,
) -> anyhow::Result<usize> {
    let geometry = kv_geometry(config, block_size);
    let mut pages = geometry.pages_for(kv_tokens);
    for a in adapters {
        pages += plan_placement(a, geometry.page_elems)
            .map_err(|e| anyhow::anyhow!("adapter placement: {e}"))?
            .pages;
    }
    Ok(pages + pages / 10 + 2 * config.num_layers)
}

/// An engine on `backend` for the model in `dir`, with `adapters` registered and loaded into
/// host memory (the host cache is sized to hold all of them, as S-LoRA keeps every adapter in
/// main memory).
pub(crate) fn engine<B: Backend>(
    backend: B,
    fixtures: &mut Fixtures,
    dir: &Path,
    mut config: EngineConfig,
    adapters: &[AdapterDef],
) -> anyhow::Result<Engine<B>> {
    let model_config = model_config(dir)?;
    let mut hosts = Vec::with_capacity(adapters.len());
    for a in adapters {
        hosts.push(fixtures.host_adapter(&a.dir, &model_config)?);
    }
    config.host_cache_bytes = hosts.iter().map(|h| h.bytes).sum::<usize>() + (1 << 20);
    let mut engine = Engine::new(backend, dir, config)?;
    for (a, host) in adapters.iter().zip(hosts) {
        let key = AdapterKey::new(TENANT, &a.name);
        engine.begin_adapter_load(key.clone(), a.dir.clone(), None, true)?;
        engine.take_pending_loads();
        engine.finish_adapter_load(&key, Ok(HostAdapter::clone(&host)))?;
    }
    Ok(engine)
}

/// The host adapters of `defs`, for sizing pools.
pub(crate) fn hosts_of(
    fixtures: &mut Fixtures,
    config: &ModelConfig,
    defs: &[AdapterDef],
) -> anyhow::Result<Vec<Arc<HostAdapter>>> {
    defs.iter()
        .map(|d| fixtures.host_adapter(&d.dir, config))
        .collect()
}
