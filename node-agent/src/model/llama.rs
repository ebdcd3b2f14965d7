//! The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2), written once against the
//! [`Backend`] contract. Qwen2 differs only by q/k/v biases and tied embeddings, Mistral by its
//! optional sliding window; both are flags of the same layers. Every linear layer is the base
//! GEMM plus the heterogeneous LoRA path `y = xW + s·(xA)B`, computed beside it from pool pages
//! — adapters are never merged into the base weights.

use std::path::Path;

use loraplane_kernels::cpu::{AttnSeq, KvLayout, Llama3RopeScaling, RopeTable, rope_inv_freq};

use crate::backend::{Backend, BackendError};
use crate::lora::Module;
use crate::lora::batch::LoraBatch;
use crate::model::ModelError;
use crate::model::config::ModelConfig;
use crate::model::loader::Checkpoint;

struct Linear<B: Backend> {
    weight: B::Param,
    bias: Option<B::Param>,
}

struct Layer<B: Backend> {
    input_norm: B::Param,
    post_attention_norm: B::Param,
    /// Indexed by [`Module::index`].
    proj: Vec<Linear<B>>,
}

/// A loaded base model on backend `B`.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    embed: B::Param,
    layers: Vec<Layer<B>>,
    norm: B::Param,
    /// `None` when the LM head is tied to the embedding.
    lm_head: Option<B::Param>,
    rope: RopeTable,
}

impl<B: Backend> std::fmt::Debug for Model<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Called once per layer of a step, as soon as that layer's K/V of every row are written to
/// the pool (before its attention and MLP).
pub type LayerHook<'a, P> = dyn FnMut(usize, &P) -> Result<(), BackendError> + 'a;

/// One sequence's rows in a step.
#[derive(Debug, Clone)]
pub struct SeqRows {
    /// First row of this sequence in the step's tokens.
    pub start: usize,
    pub len: usize,
    /// Position of its first row.
    pub pos_start: usize,
    /// Its KV page ids, per layer.
    pub block_tables: Vec<Vec<u32>>,
}

/// Everything one forward step needs, built by the scheduler.
#[derive(Debug, Default)]
pub struct StepInput<'a> {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub seqs: Vec<SeqRows>,
    /// KV slot of every row, per layer: `slots[layer][row]`.
    pub slots: Vec<Vec<usize>>,
    pub lora: LoraBatch<'a>,
    /// Rows whose logits are wanted (the last row of sequences that sample).
    pub logits_rows: Vec<usize>,
}

impl<B: Backend> Model<B> {
    /// Loads the weights of the checkpoint in `dir`, whose `config.json` is `config`
    /// ([`ModelConfig::read`]), onto `backend`.
    pub fn load(backend: &B, dir: &Path, config: ModelConfig) -> Result<Self, ModelError> {
        let ckpt = Checkpoint::open(dir)?;
        let (h, v) = (config.hidden_size, config.vocab_size);

        let vector = |name: &str, n: usize| -> Result<B::Param, ModelError> {
            Ok(backend.vector(ckpt.tensor(name, &[n])?)?)
        };
        let embed = backend.table(ckpt.tensor("model.embed_tokens.weight", &[v, h])?, v, h)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let mut proj = Vec::with_capacity(7);
            for module in Module::ALL {
                let (fan_in, fan_out) = config.module_shape(module);
                let path = module.path(l);
                let weight = backend.matrix(
                    ckpt.tensor(&format!("{path}.weight"), &[fan_out, fan_in])?,
                    fan_out,
                    fan_in,
                )?;
                let bias_name = format!("{path}.bias");
                let bias = match module {
                    Module::Q | Module::K | Module::V if config.arch.qkv_bias() => {
                        Some(vector(&bias_name, fan_out)?)
                    }
                    _ if ckpt.contains(&bias_name) => {
                        return Err(ModelError::Weights {
                            path: dir.to_owned(),
                            reason: format!("unexpected bias {bias_name} for {}", config.arch),
                        });
                    }
                    _ => None,
                };
                proj.push(Linear { weight, bias });
            }
            layers.push(Layer {
                input_norm: vector(&format!("model.layers.{l}.input_layernorm.weight"), h)?,
                post_attention_norm: vector(
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    h,
                )?,
                proj,
            });
        }
        let norm = vector("model.norm.weight", h)?;
        let lm_head = if config.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            None
        } else {
            Some(backend.matrix(ckpt.tensor("lm_head.weight", &[v, h])?, v, h)?)
        };
        let scaling = config.rope_llama3.map(|s| Llama3RopeScaling {
            factor: s.factor,
            low_freq_factor: s.low_freq_factor,
            high_freq_factor: s.high_freq_factor,
            original_max_position_embeddings: s.original_max_position_embeddings,
        });
        let inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, scaling.as_ref());
        let rope = RopeTable::new(&inv_freq, config.max_position_embeddings);
        Ok(Model {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// Runs one step over `input` and returns the logits of `input.logits_rows`, row-major
    /// `[logits_rows.len(), vocab]`. Writes every row's K and V into the pool first, so the
    /// rows' sequences may continue from them in later steps.
    pub fn forward(
        &self,
        backend: &B,
        pool: &mut B::Pool,
        kv: &KvLayout,
        input: &StepInput<'_>,
        after_layer: &mut LayerHook<'_, B::Pool>,
    ) -> Result<Vec<f32>, BackendError> {
        let c = &self.config;
        let mut h = backend.embedding(&input.tokens, &self.embed)?;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let tables = input.seqs.iter().map(|s| &s.block_tables[l]);
            let attn_seqs: Vec<AttnSeq<'_>> = input
                .seqs
                .iter()
                .zip(tables)
                .map(|(s, t)| AttnSeq {
                    q_start: s.start,
                    q_len: s.len,
                    pos_start: s.pos_start,
                    block_table: t,
                })
                .collect();

            let x = backend.rms_norm(&h, &layer.input_norm, c.rms_norm_eps)?;
            let mut q = self.linear(backend, pool, &x, layer, l, Module::Q, &input.lora)?;
            let mut k = self.linear(backend, pool, &x, layer, l, Module::K, &input.lora)?;
            let v = self.linear(backend, pool, &x, layer, l, Module::V, &input.lora)?;
            backend.rope(
                &mut q,
                c.num_heads,
                c.head_dim,
                &input.positions,
                &self.rope,
            )?;
            backend.rope(
                &mut k,
                c.num_kv_heads,
                c.head_dim,
                &input.positions,
                &self.rope,
            )?;
            backend.write_kv(kv, &k, &v, &input.slots[l], pool)?;
            // This layer's K/V of every row are final in the pool now (attention and the MLP
            // only read them): disaggregated prefill streams them from here, so even the last
            // layer's transfer overlaps that layer's attention, MLP and the LM head.
            after_layer(l, pool)?;
            let attn = backend.attention(
                kv,
                &q,
                c.num_heads,
                pool,
                &attn_seqs,
                scale,
                c.sliding_window,
            )?;
            let o = self.linear(backend, pool, &attn, layer, l, Module::O, &input.lora)?;
            backend.add(&mut h, &o)?;

            let x = backend.rms_norm(&h, &layer.post_attention_norm, c.rms_norm_eps)?;
            let gate = self.linear(backend, pool, &x, layer, l, Module::Gate, &input.lora)?;
            let up = self.linear(backend, pool, &x, layer, l, Module::Up, &input.lora)?;
            let act = backend.silu_mul(&gate, &up)?;
            let down = self.linear(backend, pool, &act, layer, l, Module::Down, &input.lora)?;
            backend.add(&mut h, &down)?;
        }
        if input.logits_rows.is_empty() {
            return Ok(Vec::new());
        }
        let last = backend.select_rows(&h, &input.logits_rows)?;
        let x = backend.rms_norm(&last, &self.norm, c.rms_norm_eps)?;
        let logits = match &self.lm_head {
            Some(head) => backend.linear(&x, head, None)?,
            None => backend.linear_tied(&x, &self.embed)?,
        };
        backend.to_host(&logits)
    }

    fn linear(
        &self,
        backend: &B,
        pool: &B::Pool,
        x: &B::Tensor,
        layer: &Layer<B>,
        l: usize,
        module: Module,
        lora: &LoraBatch<'_>,
    ) -> Result<B::Tensor, BackendError> {
        let p = &layer.proj[module.index()];
        let mut y = backend.linear(x, &p.weight, p.bias.as_ref())?;
        // Each pass adds its adapters' updates into `y` (composed adapters share rows).
        for pass in 0..lora.passes() {
            let (segments, max_rank) = lora.segments(l, module, pass);
            if !segments.is_empty() {
                backend.lora(x, &mut y, pool, &segments, max_rank)?;
            }
        }
        Ok(y)
    }
}
