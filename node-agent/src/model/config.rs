//! The model's `config.json`, mirroring Hugging Face's `LlamaConfig` / `MistralConfig` /
//! `Qwen2Config` for the fields the engine uses, validated once into [`ModelConfig`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::lora::{BaseShapes, Module};
use crate::model::ModelError;

/// Architectures the engine implements. All three are one decoder (`model/llama.rs`) whose
/// layers differ only by flags ([`Arch::qkv_bias`], the sliding window); a genuinely different
/// architecture would get its own file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    /// The `architectures` entry Hugging Face writes for this model family.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// Whether q/k/v projections carry biases (Qwen2 does).
    pub fn qkv_bias(self) -> bool {
        matches!(self, Arch::Qwen2)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        })
    }
}

/// `rope_scaling` as written in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// Newer configs say `rope_type`, older ones `type`.
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

/// Token ids that may be one id or a list (Llama 3 lists several EOS ids).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIdOrList {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIdOrList {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIdOrList::One(id) => vec![*id],
            TokenIdOrList::Many(ids) => ids.clone(),
        }
    }
}

/// `config.json` of a Llama-family checkpoint, as Hugging Face writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HfConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIdOrList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_hidden_act() -> String {
    "silu".to_owned()
}

/// Llama 3's frequency-dependent rope scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// Validated model configuration: every field the engine relies on, checked once.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_llama3: Option<Llama3Scaling>,
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// The dtype the checkpoint stores its weights in (`torch_dtype`: `bfloat16`, …), which
    /// `--dtype auto` follows and device memory estimates start from.
    pub torch_dtype: Option<String>,
}

impl HfConfig {
    /// Reads and parses `config.json`.
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Checks every field the engine relies on and names the one it cannot support.
    pub fn validate(&self, path: &Path) -> Result<ModelConfig, ModelError> {
        let bad = |reason: String| ModelError::Config {
            path: path.to_owned(),
            reason,
        };
        let arch = match self.model_type.as_str() {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(bad(format!(
                    "unsupported model_type {other:?} (supported: llama, mistral, qwen2)"
                )));
            }
        };
        if self.hidden_act != "silu" {
            return Err(bad(format!(
                "unsupported hidden_act {:?} (only silu)",
                self.hidden_act
            )));
        }
        if self.mlp_bias == Some(true) {
            return Err(bad("unsupported mlp_bias: true".to_owned()));
        }
        if self.attention_bias == Some(true) && arch != Arch::Qwen2 {
            return Err(bad("unsupported attention_bias: true".to_owned()));
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", num_kv_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(bad(format!("{name} must be positive")));
            }
        }
        if !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}",
                self.num_attention_heads
            )));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if self.hidden_size.is_multiple_of(self.num_attention_heads) => {
                self.hidden_size / self.num_attention_heads
            }
            None => {
                return Err(bad(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                )));
            }
        };
        if head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            )));
        }
        let rope_llama3 = match &self.rope_scaling {
            None => None,
            Some(s) if s.rope_type == "default" => None,
            Some(s) if s.rope_type == "llama3" => {
                let need = |name: &str, v: Option<f32>| {
                    v.ok_or_else(|| bad(format!("rope_scaling of type llama3 lacks {name}")))
                };
                Some(Llama3Scaling {
                    factor: need("factor", s.factor)?,
                    low_freq_factor: need("low_freq_factor", s.low_freq_factor)?,
                    high_freq_factor: need("high_freq_factor", s.high_freq_factor)?,
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .ok_or_else(|| {
                            bad("rope_scaling of type llama3 lacks original_max_position_embeddings"
                                .to_owned())
                        })?,
                })
            }
            Some(s) => {
                return Err(bad(format!(
                    "unsupported rope_scaling type {:?} (supported: default, llama3)",
                    s.rope_type
                )));
            }
        };
        let sliding_window = match arch {
            Arch::Qwen2 if self.use_sliding_window != Some(true) => None,
            _ => self
                .sliding_window
                .filter(|w| *w < self.max_position_embeddings),
        };
        Ok(ModelConfig {
            arch,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps as f32,
            rope_theta: self.rope_theta as f32,
            rope_llama3,
            tie_word_embeddings: self.tie_word_embeddings,
            sliding_window,
            eos_token_ids: self
                .eos_token_id
                .as_ref()
                .map(TokenIdOrList::to_vec)
                .unwrap_or_default(),
            bos_token_id: self.bos_token_id,
            torch_dtype: self.torch_dtype.clone(),
        })
    }
}

impl ModelConfig {
    /// Reads, parses and validates the `config.json` of the checkpoint in `dir`: the one place
    /// the agent reads that file; everything else is handed the result.
    ///
    /// # Errors
    /// [`ModelError::Io`] when it cannot be read, [`ModelError::Config`] when it is not valid
    /// JSON or not a model the engine computes exactly.
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        HfConfig::read(&path)?.validate(&path)
    }

    /// Width of the key (and value) projection: `num_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Width of the query projection: `num_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// `(in_features, out_features)` of a linear module, as PEFT sees it.
    pub fn module_shape(&self, module: Module) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        match module {
            Module::Q => (h, self.q_dim()),
            Module::K | Module::V => (h, self.kv_dim()),
            Module::O => (self.q_dim(), h),
            Module::Gate | Module::Up => (h, i),
            Module::Down => (i, h),
        }
    }
}

impl BaseShapes for ModelConfig {
    fn num_layers(&self) -> usize {
        self.num_layers
    }

    fn module_shape(&self, module: Module) -> (usize, usize) {
        ModelConfig::module_shape(self, module)
    }
}
