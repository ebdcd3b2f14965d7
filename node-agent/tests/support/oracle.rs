//! The numerical oracle for loraplane's engine tests: candle-transformers' reference Llama,
//! Mistral and Qwen2 run on CPU in f32 over a checkpoint whose LoRA adapter has been merged into
//! the base weights (`W' = W + s·B·A`). It shares no code with the engine: the PEFT rules
//! (target modules, `rank_pattern` / `alpha_pattern`, rsLoRA) are implemented here again from
//! PEFT's semantics, and the model math is candle's.
//!
//! Use it from an integration test with
//! ```ignore
//! #[path = "support/oracle.rs"]
//! mod oracle;
//! ```
//! (Cargo does not build `tests/support/` as a test target of its own.)
//!
//! Quirks of candle-transformers 0.11.1 that this module works around, by fixing up the
//! `config.json` it hands to candle or the weights it loads (see [`candle_config`]):
//! - Llama: `Llama3RopeConfig` requires `rope_type` (HF also accepts the older key `type`) and
//!   every llama3 field; `{"rope_type": "default"}` alone fails to parse, so it is dropped.
//!   `head_dim`, `attention_bias`, `mlp_bias` and `hidden_act` are ignored by candle (it always
//!   uses `hidden/heads`, no biases, silu), so configs that need them are refused.
//! - Qwen2: `sliding_window`, `max_window_layers`, `use_sliding_window`, `tie_word_embeddings`,
//!   `num_key_value_heads` are required, and the sliding-window mask is applied to the prompt
//!   whatever `use_sliding_window` says (and never during decode); the oracle sets the window
//!   to cover the whole sequence and refuses a real window shorter than the sequence. Qwen2
//!   ties `lm_head` to the embedding whenever `lm_head.weight` is absent, whatever the config.
//! - Mistral: always loads `lm_head.weight` (it ignores `tie_word_embeddings`), needs
//!   `num_key_value_heads` and `rope_theta`, and applies `sliding_window` to the prompt only.
//! - Tied embeddings are handled the Hugging Face way for every architecture: with
//!   `tie_word_embeddings` the oracle sets `lm_head.weight` to the embedding matrix; without
//!   it a missing `lm_head.weight` is an error (candle's Qwen2 would silently tie).
//! - `rope_scaling` other than llama3 (and any at all on Mistral/Qwen2) is refused: candle
//!   would ignore it.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use anyhow::{Context, bail, ensure};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, mistral, qwen2};
use serde::Deserialize;
use serde_json::{Value, json};

/// The seven LoRA-targetable linear modules of a decoder layer: (parent, name).
pub const MODULES: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

/// The result of [`greedy`].
#[derive(Debug, Clone, PartialEq)]
pub struct OracleRun {
    pub tokens: Vec<u32>,
    /// Logits (full vocabulary, f32) that produced each generated token: `logits[i]` is the
    /// distribution whose argmax is `tokens[i]`.
    pub logits: Vec<Vec<f32>>,
}

/// Rank, alpha and scale PEFT gives one module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraParams {
    pub rank: usize,
    pub alpha: f64,
    /// `alpha / rank`, or `alpha / sqrt(rank)` with `use_rslora`.
    pub scale: f64,
}

// ---------------------------------------------------------------------------------------------
// PEFT adapter configuration, re-implemented from PEFT's semantics.
// ---------------------------------------------------------------------------------------------

/// A JSON object read in file order (PEFT tries pattern keys in dict order, which is the order
/// of the file; `serde_json::Map` would sort them).
struct Ordered<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = m.next_entry()? {
                    out.push(entry);
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(Visit(PhantomData))
    }
}

/// `target_modules` / `exclude_modules`: a list of names, or one regular expression.
#[derive(Deserialize)]
#[serde(untagged)]
enum ModuleSelector {
    List(Vec<String>),
    Regex(String),
}

impl ModuleSelector {
    /// PEFT's `check_target_module_exists`: a string is a full-match regex (or `all-linear`);
    /// a list entry matches the path exactly or as a dotted suffix.
    fn selects(&self, path: &str, all_linear: bool) -> anyhow::Result<bool> {
        Ok(match self {
            ModuleSelector::Regex(re) if all_linear && re == "all-linear" => true,
            ModuleSelector::Regex(re) => regex::Regex::new(&format!("^(?:{re})$"))
                .with_context(|| format!("bad module regex {re:?}"))?
                .is_match(path),
            ModuleSelector::List(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
        })
    }
}

#[derive(Deserialize)]
struct PeftConfig {
    peft_type: String,
    r: usize,
    lora_alpha: f64,
    target_modules: ModuleSelector,
    #[serde(default)]
    exclude_modules: Option<ModuleSelector>,
    #[serde(default)]
    rank_pattern: Option<Ordered<usize>>,
    #[serde(default)]
    alpha_pattern: Option<Ordered<f64>>,
    #[serde(default)]
    use_rslora: Option<bool>,
    #[serde(default)]
    use_dora: Option<bool>,
    #[serde(default)]
    fan_in_fan_out: Option<bool>,
    #[serde(default)]
    lora_bias: Option<bool>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    layers_to_transform: Option<Value>,
    #[serde(default)]
    layer_replication: Option<Value>,
}

/// PEFT's `get_pattern_key`: the first key, in file order, that the path equals, ends with
/// after a dot, or matches as `^(.*\.)?(key)$` (the key read as a regular expression). An exact
/// key does not beat an earlier key that also matches: PEFT returns the first match.
fn pattern_value<V: Copy>(patterns: &[(String, V)], path: &str) -> anyhow::Result<Option<V>> {
    for (key, v) in patterns {
        if path == key || path.ends_with(&format!(".{key}")) {
            return Ok(Some(*v));
        }
        let re = regex::Regex::new(&format!(r"^(.*\.)?({key})$"))
            .with_context(|| format!("bad pattern key {key:?}"))?;
        if re.is_match(path) {
            return Ok(Some(*v));
        }
    }
    Ok(None)
}

impl PeftConfig {
    fn read(adapter_dir: &Path) -> anyhow::Result<Self> {
        let path = adapter_dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let c: PeftConfig =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(
            c.peft_type == "LORA",
            "peft_type {:?} is not LORA",
            c.peft_type
        );
        ensure!(c.r > 0, "r must be positive");
        ensure!(
            c.use_dora != Some(true),
            "DoRA is not supported by the oracle"
        );
        ensure!(
            c.fan_in_fan_out != Some(true),
            "fan_in_fan_out is not supported"
        );
        ensure!(c.lora_bias != Some(true), "lora_bias is not supported");
        ensure!(
            matches!(c.bias.as_deref(), None | Some("none")),
            "bias {:?} is not supported",
            c.bias
        );
        ensure!(
            c.modules_to_save.as_ref().is_none_or(Vec::is_empty),
            "modules_to_save is not supported"
        );
        ensure!(
            c.layers_to_transform.as_ref().is_none_or(Value::is_null),
            "layers_to_transform is not supported"
        );
        ensure!(
            c.layer_replication.as_ref().is_none_or(Value::is_null),
            "layer_replication is not supported"
        );
        Ok(c)
    }

    /// Rank, alpha and scale of the module at `path`, or `None` when it is not targeted.
    fn params(&self, path: &str) -> anyhow::Result<Option<LoraParams>> {
        let excluded = match &self.exclude_modules {
            Some(sel) => sel.selects(path, false)?,
            None => false,
        };
        if excluded || !self.target_modules.selects(path, true)? {
            return Ok(None);
        }
        let ranks = self
            .rank_pattern
            .as_ref()
            .map_or(&[][..], |o| o.0.as_slice());
        let alphas = self
            .alpha_pattern
            .as_ref()
            .map_or(&[][..], |o| o.0.as_slice());
        let rank = pattern_value(ranks, path)?.unwrap_or(self.r);
        let alpha = pattern_value(alphas, path)?.unwrap_or(self.lora_alpha);
        ensure!(rank > 0, "rank of {path} must be positive");
        let scale = if self.use_rslora == Some(true) {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        Ok(Some(LoraParams { rank, alpha, scale }))
    }
}

/// PEFT's rank, alpha and scale for the module at `module_path` (for example
/// `model.layers.1.self_attn.q_proj`), or `None` when the adapter does not target it.
pub fn lora_params(adapter_dir: &Path, module_path: &str) -> anyhow::Result<Option<LoraParams>> {
    PeftConfig::read(adapter_dir)?.params(module_path)
}

// ---------------------------------------------------------------------------------------------
// Checkpoint files.
// ---------------------------------------------------------------------------------------------

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn load_f32(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?)))
        .collect()
}

/// Every tensor of the checkpoint, as f32: `model.safetensors`, or every shard named by
/// `model.safetensors.index.json` (each name checked against the file the index assigns it).
pub fn load_checkpoint(model_dir: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let index_path = model_dir.join("model.safetensors.index.json");
    if !index_path.exists() {
        return load_f32(&model_dir.join("model.safetensors"));
    }
    let index = read_json(&index_path)?;
    let weight_map = index["weight_map"]
        .as_object()
        .context("index without weight_map")?;
    let mut by_file: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (name, file) in weight_map {
        let file = file.as_str().context("weight_map entry is not a string")?;
        by_file.entry(file).or_default().insert(name.as_str());
    }
    let mut all = HashMap::new();
    for (file, names) in by_file {
        let tensors = load_f32(&model_dir.join(file))?;
        let found: BTreeSet<&str> = tensors.keys().map(String::as_str).collect();
        ensure!(found == names, "{file} does not hold what the index says");
        for (name, t) in tensors {
            ensure!(
                all.insert(name.clone(), t).is_none(),
                "{name} is in two shards"
            );
        }
    }
    Ok(all)
}

/// Writes f32 tensors as one safetensors file with `{"format": "pt"}` metadata.
fn save_f32(tensors: &HashMap<String, Tensor>, path: &Path) -> anyhow::Result<()> {
    let mut data = BTreeMap::new();
    for (name, t) in tensors {
        let bytes: Vec<u8> = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        data.insert(name.clone(), (t.dims().to_vec(), bytes));
    }
    let views = data
        .iter()
        .map(|(name, (shape, bytes))| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytes,
            )?;
            Ok((name.clone(), view))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(views, Some(metadata), path)
        .with_context(|| format!("writing {}", path.display()))
}

/// [`merge_adapters`] of one adapter at scale 1, or none.
pub fn merge_adapter(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    out: &Path,
) -> anyhow::Result<()> {
    let adapters: Vec<(&Path, f32)> = adapter_dir.map(|d| (d, 1.0)).into_iter().collect();
    merge_adapters(model_dir, &adapters, out)
}

/// Writes a copy of the checkpoint in `model_dir` into `out` with the adapters merged into the
/// base weights: `W' = W + Σᵢ sᵢ·scaleᵢ·(Bᵢ·Aᵢ)` for every targeted module of every layer,
/// where `sᵢ` is the request's scale of adapter `i` and `scaleᵢ` its PEFT scale, all in f32
/// in one `model.safetensors`, plus `config.json` (with `torch_dtype: float32`) and the other
/// non-weight files (tokenizer, generation config). With no adapters it writes the base
/// weights unchanged (as f32). Every tensor of each adapter must be used, and A/B must have
/// the shapes PEFT's rank resolution implies (`A: [r, in]`, `B: [out, r]`).
pub fn merge_adapters(
    model_dir: &Path,
    adapters: &[(&Path, f32)],
    out: &Path,
) -> anyhow::Result<()> {
    let mut config = read_json(&model_dir.join("config.json"))?;
    let layers = config["num_hidden_layers"]
        .as_u64()
        .context("config.json lacks num_hidden_layers")? as usize;
    let mut weights = load_checkpoint(model_dir)?;

    for &(adapter_dir, request_scale) in adapters {
        let peft = PeftConfig::read(adapter_dir)?;
        let mut lora = load_f32(&adapter_dir.join("adapter_model.safetensors"))?;
        for layer in 0..layers {
            for (parent, name) in MODULES {
                let path = format!("model.layers.{layer}.{parent}.{name}");
                let Some(p) = peft.params(&path)? else {
                    continue;
                };
                let key = |m: &str| format!("base_model.model.{path}.{m}.weight");
                let a = lora
                    .remove(&key("lora_A"))
                    .with_context(|| format!("adapter lacks {}", key("lora_A")))?;
                let b = lora
                    .remove(&key("lora_B"))
                    .with_context(|| format!("adapter lacks {}", key("lora_B")))?;
                let w_name = format!("{path}.weight");
                let w = weights
                    .get(&w_name)
                    .with_context(|| format!("checkpoint lacks {w_name}"))?;
                let (out_f, in_f) = w.dims2()?;
                ensure!(
                    a.dims() == [p.rank, in_f] && b.dims() == [out_f, p.rank],
                    "{path}: A {:?} / B {:?} do not fit rank {} and W [{out_f}, {in_f}]",
                    a.dims(),
                    b.dims(),
                    p.rank
                );
                let delta = b
                    .matmul(&a)?
                    .affine(p.scale * f64::from(request_scale), 0.0)?;
                let merged = (w + delta)?;
                weights.insert(w_name, merged);
            }
        }
        let mut left: Vec<_> = lora.into_keys().collect();
        left.sort();
        ensure!(
            left.is_empty(),
            "adapter tensors the oracle does not use: {left:?}"
        );
    }

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    save_f32(&weights, &out.join("model.safetensors"))?;
    config["torch_dtype"] = json!("float32");
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    for entry in std::fs::read_dir(model_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if entry.file_type()?.is_file() && !is_weights && name != "config.json" {
            std::fs::copy(entry.path(), out.join(&name))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The reference models.
// ---------------------------------------------------------------------------------------------

fn usize_field(c: &Value, key: &str) -> anyhow::Result<usize> {
    Ok(c[key]
        .as_u64()
        .with_context(|| format!("config.json lacks {key}"))? as usize)
}

/// The `config.json` candle's model for `model_type` can parse and honours exactly, for a run
/// of `total_len` positions; refuses what candle would silently get wrong.
pub fn candle_config(raw: &Value, total_len: usize) -> anyhow::Result<Value> {
    let mut c = raw.clone();
    let model_type = c["model_type"].as_str().unwrap_or_default().to_owned();
    let heads = usize_field(&c, "num_attention_heads")?;
    let hidden = usize_field(&c, "hidden_size")?;
    let max_pos = usize_field(&c, "max_position_embeddings")?;
    ensure!(
        total_len <= max_pos,
        "{total_len} positions exceed max_position_embeddings {max_pos}"
    );
    ensure!(
        matches!(c["hidden_act"].as_str(), None | Some("silu")),
        "hidden_act {} is not silu",
        c["hidden_act"]
    );
    ensure!(c["mlp_bias"] != json!(true), "mlp_bias is not supported");
    if c["num_key_value_heads"].is_null() {
        c["num_key_value_heads"] = json!(heads);
    }
    if c["rope_theta"].is_null() {
        c["rope_theta"] = json!(10_000.0);
    }
    if let (true, Some(d)) = (model_type != "mistral", c["head_dim"].as_u64()) {
        ensure!(
            d as usize * heads == hidden,
            "candle's {model_type} assumes head_dim = hidden_size / num_attention_heads"
        );
    }
    if model_type != "qwen2" {
        ensure!(
            c["attention_bias"] != json!(true),
            "attention_bias is not supported for {model_type}"
        );
    }
    let rope_type = c["rope_scaling"]["rope_type"]
        .as_str()
        .or(c["rope_scaling"]["type"].as_str())
        .map(str::to_owned);
    match (rope_type.as_deref(), model_type.as_str()) {
        (None | Some("default"), _) => c["rope_scaling"] = Value::Null,
        (Some("llama3"), "llama") => c["rope_scaling"]["rope_type"] = json!("llama3"),
        (Some(other), _) => bail!("rope_scaling {other:?} is not supported for {model_type}"),
    }
    let window = c["sliding_window"].as_u64().map(|w| w as usize);
    match model_type.as_str() {
        "llama" => {}
        "mistral" => {
            ensure!(
                window.is_none_or(|w| w >= total_len),
                "candle's Mistral applies sliding_window to the prompt only"
            );
            c["sliding_window"] = Value::Null;
        }
        "qwen2" => {
            let use_window = c["use_sliding_window"].as_bool().unwrap_or(false);
            ensure!(
                !use_window || window.is_none_or(|w| w >= total_len),
                "candle's Qwen2 applies sliding_window to the prompt only"
            );
            // Candle masks by the window unconditionally: make it cover every position.
            c["sliding_window"] = json!(max_pos.max(total_len));
            c["use_sliding_window"] = json!(false);
            if c["max_window_layers"].is_null() {
                c["max_window_layers"] = c["num_hidden_layers"].clone();
            }
            if c["tie_word_embeddings"].is_null() {
                c["tie_word_embeddings"] = json!(false);
            }
            if c["hidden_act"].is_null() {
                c["hidden_act"] = json!("silu");
            }
        }
        other => bail!("unsupported model_type {other:?}"),
    }
    Ok(c)
}

/// Checks that the checkpoint holds exactly the tensors the architecture reads, with the right
/// shapes (candle's Llama panics on a missing tensor, and ignores extra ones such as biases),
/// and resolves tied embeddings the Hugging Face way.
fn check_and_tie(c: &Value, weights: &mut HashMap<String, Tensor>) -> anyhow::Result<()> {
    let qwen2 = c["model_type"] == "qwen2";
    let (h, i, v) = (
        usize_field(c, "hidden_size")?,
        usize_field(c, "intermediate_size")?,
        usize_field(c, "vocab_size")?,
    );
    let heads = usize_field(c, "num_attention_heads")?;
    let kv_heads = usize_field(c, "num_key_value_heads")?;
    let hd = c["head_dim"].as_u64().map_or(h / heads, |d| d as usize);
    let (q, kv) = (heads * hd, kv_heads * hd);
    let tied = c["tie_word_embeddings"].as_bool().unwrap_or(false);
    weights.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
    if tied {
        let embed = weights
            .get("model.embed_tokens.weight")
            .context("checkpoint lacks model.embed_tokens.weight")?
            .clone();
        weights.insert("lm_head.weight".to_owned(), embed);
    }
    let mut expected: BTreeMap<String, Vec<usize>> = BTreeMap::from([
        ("model.embed_tokens.weight".to_owned(), vec![v, h]),
        ("model.norm.weight".to_owned(), vec![h]),
        ("lm_head.weight".to_owned(), vec![v, h]),
    ]);
    for l in 0..usize_field(c, "num_hidden_layers")? {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ] {
            expected.insert(format!("{p}.{name}"), shape);
        }
        if qwen2 {
            for (name, n) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                expected.insert(format!("{p}.self_attn.{name}.bias"), vec![n]);
            }
        }
    }
    for (name, shape) in &expected {
        let t = weights
            .get(name)
            .with_context(|| format!("checkpoint lacks {name}"))?;
        ensure!(
            t.dims() == shape.as_slice(),
            "{name} is {:?}, expected {shape:?}",
            t.dims()
        );
    }
    let mut extra: Vec<_> = weights
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    extra.sort();
    ensure!(
        extra.is_empty(),
        "tensors the reference model would ignore: {extra:?}"
    );
    Ok(())
}

enum Reference {
    Llama(llama::Llama, llama::Cache),
    Mistral(mistral::Model),
    Qwen2(qwen2::ModelForCausalLM),
}

impl Reference {
    fn load(model_dir: &Path, total_len: usize) -> anyhow::Result<(Self, usize)> {
        let c = candle_config(&read_json(&model_dir.join("config.json"))?, total_len)?;
        let vocab = usize_field(&c, "vocab_size")?;
        let mut weights = load_checkpoint(model_dir)?;
        check_and_tie(&c, &mut weights)?;
        let dev = Device::Cpu;
        let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
        let model = match c["model_type"].as_str() {
            Some("llama") => {
                let cfg = serde_json::from_value::<llama::LlamaConfig>(c)?.into_config(false);
                let cache = llama::Cache::new(true, DType::F32, &cfg, &dev)?;
                Reference::Llama(llama::Llama::load(vb, &cfg)?, cache)
            }
            Some("mistral") => {
                let cfg: mistral::Config = serde_json::from_value(c)?;
                Reference::Mistral(mistral::Model::new(&cfg, vb)?)
            }
            Some("qwen2") => {
                let cfg: qwen2::Config = serde_json::from_value(c)?;
                Reference::Qwen2(qwen2::ModelForCausalLM::new(&cfg, vb)?)
            }
            other => bail!("unsupported model_type {other:?}"),
        };
        Ok((model, vocab))
    }

    /// Feeds `ids` at positions `pos..`, through the KV cache; the last position's logits.
    fn step(&mut self, ids: &[u32], pos: usize) -> anyhow::Result<Vec<f32>> {
        let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        let logits = match self {
            Reference::Llama(m, cache) => m.forward(&input, pos, cache)?,
            Reference::Mistral(m) => m.forward(&input, pos)?,
            Reference::Qwen2(m) => m.forward(&input, pos)?,
        };
        Ok(logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}

/// The first index of the largest logit (`torch.argmax`'s tie rule); non-finite logits fail.
pub fn argmax(logits: &[f32]) -> anyhow::Result<u32> {
    ensure!(!logits.is_empty(), "empty logits");
    ensure!(logits.iter().all(|v| v.is_finite()), "non-finite logits");
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

/// Greedy generation of `max_new` tokens (no EOS stopping) with candle-transformers' reference
/// model for the checkpoint's `model_type`, on CPU in f32 (weights of any dtype are upcast):
/// the whole prompt in one forward pass, then one token at a time through the KV cache.
pub fn greedy(model_dir: &Path, prompt: &[u32], max_new: usize) -> anyhow::Result<OracleRun> {
    ensure!(!prompt.is_empty(), "empty prompt");
    let (mut model, vocab) = Reference::load(model_dir, prompt.len() + max_new)?;
    ensure!(
        prompt.iter().all(|t| (*t as usize) < vocab),
        "prompt token out of the vocabulary ({vocab})"
    );
    let mut run = OracleRun {
        tokens: Vec::with_capacity(max_new),
        logits: Vec::with_capacity(max_new),
    };
    if max_new == 0 {
        return Ok(run);
    }
    let mut logits = model.step(prompt, 0)?;
    loop {
        ensure!(logits.len() == vocab, "logits of {} entries", logits.len());
        let token = argmax(&logits)?;
        run.tokens.push(token);
        run.logits.push(logits);
        if run.tokens.len() == max_new {
            return Ok(run);
        }
        logits = model.step(&[token], prompt.len() + run.tokens.len() - 1)?;
    }
}
