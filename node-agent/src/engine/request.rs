//! What a caller submits to the engine and what it streams back.

use std::time::Duration;

use crate::lora::ids::{AdapterKey, TenantId};
use crate::structured::Constraint;

/// Sampling and stopping parameters of one request.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub logprobs: bool,
    /// Attach the full logits row to every token event (for numerical checks and debugging;
    /// not exposed through the public APIs).
    pub return_logits: bool,
    /// Structured outputs: every sampled token must keep the output inside this grammar, and
    /// generation stops when the grammar is complete.
    pub constraint: Option<Constraint>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: None,
            max_tokens: 16,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: false,
            return_logits: false,
            constraint: None,
        }
    }
}

/// One adapter a request applies, and the factor its update is scaled by: the layer computes
/// `x·W + Σ scale · (lora_alpha / r) · (x·Aᵀ)·Bᵀ` over every adapter of the request.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterUse {
    /// Adapter name inside the request's tenant.
    pub name: String,
    pub scale: f32,
}

impl AdapterUse {
    /// The adapter at full strength: what naming it as the `model` asks for.
    pub fn plain(name: impl Into<String>) -> Self {
        AdapterUse {
            name: name.into(),
            scale: 1.0,
        }
    }
}

/// Most adapters one request may compose.
pub const MAX_ADAPTERS_PER_REQUEST: usize = 8;

/// Largest |scale| a request may give an adapter: the bound adapter loads put on each
/// module's own scale, for the same reason (a huge finite factor overflows the forward pass
/// into NaN).
pub const MAX_ADAPTER_SCALE: f32 = 1000.0;

/// Checks a request's adapters: at most [`MAX_ADAPTERS_PER_REQUEST`], each named once, each
/// scale finite with |scale| ≤ [`MAX_ADAPTER_SCALE`].
///
/// Errors: why they are refused (the surfaces answer 400 / `INVALID_ARGUMENT`).
pub fn check_adapters(adapters: &[AdapterUse]) -> Result<(), String> {
    if adapters.len() > MAX_ADAPTERS_PER_REQUEST {
        return Err(format!(
            "a request composes at most {MAX_ADAPTERS_PER_REQUEST} adapters, not {}",
            adapters.len()
        ));
    }
    for (i, a) in adapters.iter().enumerate() {
        if a.name.is_empty() {
            return Err("an adapter name must not be empty".to_owned());
        }
        if !a.scale.is_finite() || a.scale.abs() > MAX_ADAPTER_SCALE {
            return Err(format!(
                "adapter {:?} has scale {}: a scale is finite and at most {MAX_ADAPTER_SCALE} \
                 in magnitude",
                a.name, a.scale
            ));
        }
        if adapters[..i].iter().any(|b| b.name == a.name) {
            return Err(format!("adapter {:?} is listed twice", a.name));
        }
    }
    Ok(())
}

/// A generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: String,
    pub tenant: TenantId,
    /// The adapters it applies, each with its scale, over the base model; empty is the base
    /// model alone, one at scale 1 is that adapter as it was trained. Every adapter is looked
    /// up inside the tenant.
    pub adapters: Vec<AdapterUse>,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Partitions the prefix cache further than the tenant (vLLM's `cache_salt`): only
    /// requests with the same salt share cached blocks.
    pub cache_salt: Option<String>,
}

impl Request {
    /// Each adapter's key (its name inside the request's tenant), in the request's order.
    pub fn adapter_keys(&self) -> Vec<AdapterKey> {
        self.adapters
            .iter()
            .map(|a| AdapterKey {
                tenant: self.tenant.clone(),
                name: a.name.clone(),
            })
            .collect()
    }

    /// Each adapter's scale, in the request's order.
    pub fn adapter_scales(&self) -> Vec<f32> {
        self.adapters.iter().map(|a| a.scale).collect()
    }
}

/// Longest `cache_salt` accepted, bytes.
pub const MAX_CACHE_SALT_BYTES: usize = 1024;

/// Checks a request's `cache_salt`: absent, or a non-empty string of at most
/// [`MAX_CACHE_SALT_BYTES`].
///
/// Errors: why it is refused (the surfaces answer 400 / `INVALID_ARGUMENT`).
pub fn check_cache_salt(salt: Option<&str>) -> Result<(), String> {
    match salt {
        Some("") => Err("cache_salt must not be empty when given".to_owned()),
        Some(s) if s.len() > MAX_CACHE_SALT_BYTES => Err(format!(
            "cache_salt is longer than {MAX_CACHE_SALT_BYTES} bytes"
        )),
        _ => Ok(()),
    }
}

/// One layer's KV cache of a prefilled prompt, streamed by a prefill agent as soon as the
/// layer is computed: the keys then values of each page, page after page, for `num_tokens`
/// tokens (the last page may be partly filled).
#[derive(Debug, Clone, PartialEq)]
pub struct KvLayer {
    pub layer: usize,
    pub num_tokens: usize,
    pub data: Vec<f32>,
}

/// A prompt's KV cache computed elsewhere, and the first token sampled from it.
#[derive(Debug, Clone, PartialEq)]
pub struct KvImport {
    /// The prompt's first blocks, which this import leaves out: the receiving engine holds
    /// them in its prefix cache (pinned, see `Engine::pin_prefix`). 0: every block is here.
    pub first_block: usize,
    /// One entry per layer, as [`KvLayer::data`], from block `first_block` on.
    pub layers: Vec<Vec<f32>>,
    pub first_token: u32,
    pub first_logprob: Option<f32>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Arrival to first scheduled step.
    pub queue: Duration,
    /// Arrival to first generated token.
    pub time_to_first_token: Duration,
    pub total: Duration,
    /// Times the request was preempted and recomputed.
    pub preemptions: u32,
    /// The prompt's KV was computed by a prefill agent and imported (decode role).
    pub remote_prefill: bool,
}

/// One streamed event of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (possibly empty while held back for a
    /// multi-byte character or a possible stop string).
    Token {
        id: u32,
        text: String,
        logprob: Option<f32>,
        logits: Option<Vec<f32>>,
    },
    /// The last event.
    Finished {
        reason: FinishReason,
        text: String,
        usage: Usage,
        timings: Timings,
        error: Option<String>,
    },
}
