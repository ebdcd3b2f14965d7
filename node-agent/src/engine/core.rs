//! The engine's state and its non-step operations: submitting, cancelling and statistics.
//! Adapter admin is in `adapters.rs`; the step in `step.rs` (the model pass) and `apply.rs`
//! (carrying out the scheduler's plan).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::backend::{Backend, BackendError};
use crate::engine::prefix::{PrefixCaching, PrefixStats};
use crate::engine::request::{Event, FinishReason, KvImport, KvLayer, Request, check_adapters};
use crate::engine::sampler::Sampler;
use crate::engine::sequence::Sequence;
use crate::lora::host::{AdapterError, AdapterLimits};
use crate::lora::ids::AdapterKey;
use crate::lora::registry::{Entry, Registry};
use crate::memory::kv::KvGeometry;
use crate::memory::pool::{PageAllocator, PoolStats};
use crate::memory::prefix::{CachedBlock, PrefixCache};
use crate::model::ModelError;
use crate::model::llama::Model;
use crate::model::tokenizer::{Detokenizer, TokenizerBundle};
use crate::scheduler::{Limits, Scheduler, SeqId};

/// Engine sizing and limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV page.
    pub block_size: usize,
    /// Pages in the unified pool.
    pub num_pages: usize,
    /// Tokens computed per step, over all sequences (prefill chunks plus decodes).
    pub max_batch_tokens: usize,
    /// Largest prefill chunk of one sequence in one step.
    pub max_prefill_chunk: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Host-memory adapter cache bound, bytes.
    pub host_cache_bytes: usize,
    pub adapter_limits: AdapterLimits,
    /// Whether KV blocks of shared prompt prefixes are reused, and within what.
    pub prefix_caching: PrefixCaching,
    /// Told about every step (the serving layer feeds its metrics from it); the engine never
    /// imports a metrics library.
    pub observer: Option<Arc<dyn StepObserver>>,
}

/// Receives per-step facts from the engine thread. Must be cheap and never block.
pub trait StepObserver: Send + Sync + std::fmt::Debug {
    /// A step computed `batch_tokens` tokens (prefill chunks plus decodes) in `elapsed`.
    fn on_step(&self, batch_tokens: usize, elapsed: std::time::Duration);

    /// An adapter moved one level closer to the kernels, taking `elapsed`.
    fn on_adapter_load(&self, _transition: AdapterTransition, _elapsed: std::time::Duration) {}
}

/// The moves of an adapter's weights that [`StepObserver::on_adapter_load`] times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterTransition {
    /// Files read, validated and digested into the host cache (on a loader thread).
    SourceToHost,
    /// Rows copied from the host cache into pool pages.
    HostToDevice,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            num_pages: 4096,
            max_batch_tokens: 512,
            max_prefill_chunk: 512,
            max_running: 128,
            host_cache_bytes: 1 << 30,
            adapter_limits: AdapterLimits::default(),
            prefix_caching: PrefixCaching::default(),
            observer: None,
        }
    }
}

/// Why the engine refused or failed something. Maps one-to-one onto API statuses.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("adapter {0:?} not found")]
    AdapterNotFound(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("request too large: {0}")]
    TooLarge(String),
    /// Shared (`Arc`) because every caller waiting on the same load gets this same answer.
    #[error("adapter {name:?} could not be loaded: {source}")]
    AdapterLoad {
        name: String,
        source: Arc<AdapterError>,
    },
    #[error("adapter {0:?} is in use; unload it before replacing it")]
    AdapterBusy(String),
    #[error("adapter {name:?} digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("model: {0}")]
    Model(#[from] ModelError),
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    #[error("the engine has stopped")]
    Stopped,
    /// The engine thread (or one it needs) could not be started.
    #[error("cannot start the engine thread: {0}")]
    ThreadSpawn(#[source] std::io::Error),
    /// The engine's own state broke one of its invariants: a bug, not the caller's fault, and
    /// the engine keeps running.
    #[error("internal engine error: {0}")]
    Invariant(String),
    /// A dependency (a prefill peer) cannot serve the request now; retrying may succeed.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl EngineError {
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::AdapterNotFound(_) => "adapter_not_found",
            EngineError::InvalidRequest(_) => "invalid_request",
            EngineError::TooLarge(_) => "too_large",
            EngineError::AdapterLoad { .. } => "adapter_load",
            EngineError::AdapterBusy(_) => "adapter_busy",
            EngineError::DigestMismatch { .. } => "digest_mismatch",
            EngineError::Model(_) => "model",
            EngineError::Backend(_) => "backend",
            EngineError::Stopped => "stopped",
            EngineError::ThreadSpawn(_) => "thread_spawn",
            EngineError::Invariant(_) => "invariant",
            EngineError::Unavailable(_) => "unavailable",
        }
    }
}

/// A point-in-time view of the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStats {
    /// The pool's pages; `cached` are the idle prefix-cache blocks' (not counted in `kv`).
    pub pool: PoolStats,
    pub prefix: PrefixStats,
    pub page_bytes: usize,
    pub waiting: usize,
    pub running: usize,
    /// Prompt tokens admitted or waiting but not yet computed.
    pub queued_prefill_tokens: usize,
    pub steps: u64,
    pub preemptions: u64,
    /// Pool utilisation when the first preemption happened (docs/performance-targets.md §2.6:
    /// ≥ 95 %); `None` before one.
    pub utilisation_at_first_preemption: Option<f64>,
    pub tokens_generated: u64,
    pub last_batch_tokens: usize,
    pub host_cache_used: usize,
    pub host_cache_capacity: usize,
    pub adapter_host_hits: u64,
    pub adapter_host_misses: u64,
    pub adapter_device_loads: u64,
    pub adapter_device_evictions: u64,
    pub adapters: usize,
    pub device_resident: Vec<AdapterKey>,
    /// Adapters of running / waiting requests.
    pub running_adapters: Vec<AdapterKey>,
    pub waiting_adapters: Vec<AdapterKey>,
    /// Requests admitted per registered adapter since its registration, sorted by key.
    pub adapter_requests: Vec<(AdapterKey, u64)>,
}

/// The pool geometry for a model and page size: a page holds one KV block of one layer, or
/// one adapter row of the widest module (whichever is larger). The serving layer sizes the pool
/// in bytes with it (`page_elems * 4` bytes per page).
pub fn kv_geometry(c: &crate::model::config::ModelConfig, block_size: usize) -> KvGeometry {
    let kv_elems = 2 * block_size * c.kv_dim();
    let widest_row = c.hidden_size.max(c.intermediate_size).max(c.q_dim());
    KvGeometry {
        num_layers: c.num_layers,
        block_size,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        page_elems: kv_elems.max(widest_row),
    }
}

/// Bytes of one pool page (f32 elements, [`kv_geometry`]) for a model: what `--pool-bytes`
/// and `--device-pool-fraction` budgets are divided by.
pub fn page_bytes(model: &crate::model::config::ModelConfig, block_size: usize) -> usize {
    kv_geometry(model, block_size).page_elems * size_of::<f32>()
}

/// The engine state machine.
pub struct Engine<B: Backend> {
    pub(super) backend: B,
    pub(super) model: Model<B>,
    pub(super) tokenizer: Arc<TokenizerBundle>,
    pub(super) pool: B::Pool,
    pub(super) pages: PageAllocator,
    pub(super) geometry: KvGeometry,
    pub(super) config: EngineConfig,
    pub(super) registry: Registry,
    /// The policy and the tenants' fairness counters; the queues below are its input.
    pub(super) scheduler: Scheduler,
    pub(super) seqs: HashMap<SeqId, Sequence>,
    /// Cached KV blocks, in the same pool (`memory/prefix.rs`, `engine/prefix.rs`).
    pub(super) prefix: PrefixCache,
    pub(super) prefix_stats: PrefixStats,
    /// Decode role: cached blocks held for requests being prefilled remotely, by request id,
    /// until the request is submitted (its sequence takes them) or unpinned.
    pub(super) pins: HashMap<String, Vec<Arc<CachedBlock>>>,
    pub(super) by_request: HashMap<String, SeqId>,
    pub(super) waiting: VecDeque<SeqId>,
    /// In admission order (admissions append, removals keep the order).
    pub(super) running: Vec<SeqId>,
    pub(super) next_seq: u64,
    pub(super) next_admit: u64,
    /// Adapter loads the actor should start (the core has no threads).
    pub(super) pending_loads: Vec<(AdapterKey, PathBuf)>,
    pub(super) steps: u64,
    pub(super) preemptions: u64,
    pub(super) utilisation_at_first_preemption: Option<f64>,
    pub(super) tokens_generated: u64,
    pub(super) last_batch_tokens: usize,
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.backend.name())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Engine<B> {
    /// Loads the model in `dir` and sizes the pool.
    pub fn new(backend: B, dir: &Path, config: EngineConfig) -> Result<Self, EngineError> {
        Self::with_model(
            backend,
            dir,
            crate::model::config::ModelConfig::read(dir)?,
            config,
        )
    }

    /// As [`Engine::new`], for a caller that has read the checkpoint's `config.json` already
    /// (`serve` sizes the pool from it first).
    pub fn with_model(
        backend: B,
        dir: &Path,
        model: crate::model::config::ModelConfig,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let model = Model::load(&backend, dir, model)?;
        let c = &model.config;
        let tokenizer = Arc::new(TokenizerBundle::load(dir, &c.eos_token_ids)?);
        if config.block_size == 0 || config.num_pages == 0 || config.max_batch_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "block_size, num_pages and max_batch_tokens must be positive".into(),
            ));
        }
        let geometry = kv_geometry(c, config.block_size);
        let pool = backend.pool(config.num_pages, geometry.page_elems)?;
        let scheduler = Scheduler::new(Limits {
            max_batch_tokens: config.max_batch_tokens,
            max_prefill_chunk: config.max_prefill_chunk,
            max_running: config.max_running,
            pool_pages: config.num_pages,
            block_size: geometry.block_size,
            num_layers: geometry.num_layers,
        });
        Ok(Engine {
            backend,
            model,
            tokenizer,
            pool,
            pages: PageAllocator::new(config.num_pages as u32),
            geometry,
            registry: Registry::new(config.host_cache_bytes, geometry.page_elems),
            config,
            scheduler,
            seqs: HashMap::new(),
            prefix: PrefixCache::new(geometry.num_layers),
            prefix_stats: PrefixStats::default(),
            pins: HashMap::new(),
            by_request: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_seq: 0,
            next_admit: 0,
            pending_loads: Vec::new(),
            steps: 0,
            preemptions: 0,
            utilisation_at_first_preemption: None,
            tokens_generated: 0,
            last_batch_tokens: 0,
        })
    }

    pub fn tokenizer(&self) -> &Arc<TokenizerBundle> {
        &self.tokenizer
    }

    pub fn model_config(&self) -> &crate::model::config::ModelConfig {
        &self.model.config
    }

    pub fn geometry(&self) -> KvGeometry {
        self.geometry
    }

    /// Whether a step would do anything.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || self.waiting.iter().any(|id| self.is_ready(*id))
    }

    /// Whether a waiting sequence could be admitted: base model, or every adapter's weights
    /// are in host memory or the pool.
    fn is_ready(&self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.get(&id) else {
            return false;
        };
        seq.adapter_keys
            .iter()
            .all(|key| self.registry.get(key).is_some_and(Entry::usable))
    }

    /// Admits a request; its events stream to `events`.
    ///
    /// Errors: an unknown adapter (or another tenant's), an empty or out-of-vocabulary prompt, a
    /// prompt plus `max_tokens` beyond the context or the pool.
    pub fn submit(
        &mut self,
        req: Request,
        events: UnboundedSender<Event>,
    ) -> Result<(), EngineError> {
        self.enqueue(req, events, None, None)
    }

    /// Prefill role: computes the prompt only, streams each layer's KV to `kv` as the prompt's
    /// last chunk computes that layer, then samples the first token (sent on `events` with its
    /// log-probability) and frees everything.
    pub fn submit_prefill(
        &mut self,
        mut req: Request,
        events: UnboundedSender<Event>,
        kv: UnboundedSender<KvLayer>,
    ) -> Result<(), EngineError> {
        req.params.max_tokens = 1;
        req.params.logprobs = true;
        self.enqueue(req, events, Some(kv), None)
    }

    /// Decode role: admits a request whose prompt KV was computed by a prefill agent. At
    /// admission the KV is written into this pool and generation continues from the first
    /// token; should the request later be preempted, it is recomputed locally. An import that
    /// leaves out the prompt's first blocks (`KvImport::first_block`) takes them from this
    /// engine's prefix cache, where [`Engine::pin_prefix`] holds them for the request.
    ///
    /// Errors: KV whose layout disagrees with this model and block size, an import that leaves
    /// out blocks not pinned for the request, plus everything [`Engine::submit`] refuses.
    pub fn submit_prefilled(
        &mut self,
        req: Request,
        events: UnboundedSender<Event>,
        import: KvImport,
    ) -> Result<(), EngineError> {
        let blocks = req.prompt.len().div_ceil(self.geometry.block_size);
        let pinned = self.pins.get(&req.id).map_or(0, Vec::len);
        if import.first_block > pinned || (import.first_block > 0 && import.first_block >= blocks) {
            return Err(EngineError::InvalidRequest(format!(
                "received KV leaves out the prompt's first {} blocks, but only {pinned} are \
                 held in this agent's prefix cache for the request",
                import.first_block
            )));
        }
        let expected = (blocks - import.first_block) * self.geometry.kv_elems_per_page();
        if import.layers.len() != self.geometry.num_layers
            || import.layers.iter().any(|l| l.len() != expected)
        {
            return Err(EngineError::InvalidRequest(format!(
                "received KV does not match this model: expected {} layers of {expected} values",
                self.geometry.num_layers
            )));
        }
        if import.first_token as usize >= self.model.config.vocab_size {
            return Err(EngineError::InvalidRequest(
                "first token outside the vocabulary".into(),
            ));
        }
        self.enqueue(req, events, None, Some(import))
    }

    fn enqueue(
        &mut self,
        mut req: Request,
        events: UnboundedSender<Event>,
        export: Option<UnboundedSender<KvLayer>>,
        import: Option<KvImport>,
    ) -> Result<(), EngineError> {
        let c = &self.model.config;
        if req.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(bad) = req.prompt.iter().find(|t| **t as usize >= c.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        if req.params.max_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        let total = req.prompt.len().saturating_add(req.params.max_tokens);
        if total > c.max_position_embeddings {
            return Err(EngineError::TooLarge(format!(
                "prompt ({} tokens) plus max_tokens ({}) exceeds the context length of {}",
                req.prompt.len(),
                req.params.max_tokens,
                c.max_position_embeddings
            )));
        }
        if self.geometry.pages_for(total) > self.config.num_pages {
            return Err(EngineError::TooLarge(format!(
                "prompt plus max_tokens ({total} tokens) needs more KV pages than the pool holds"
            )));
        }
        if self.by_request.contains_key(&req.id) {
            return Err(EngineError::InvalidRequest(format!(
                "request id {:?} is already in flight",
                req.id
            )));
        }
        check_adapters(&req.adapters).map_err(EngineError::InvalidRequest)?;
        let keys = req.adapter_keys();
        // Refused up front, as the scheduler would refuse it once queued: alone in the pool,
        // its KV and its adapters' rows still could not fit. (Only the caller's own adapters
        // have entries under its keys, so this reveals nothing of others'.)
        let adapter_pages: usize = keys
            .iter()
            .filter_map(|key| self.registry.get(key).and_then(|e| e.placement_pages()))
            .sum();
        let kv_pages = self.geometry.pages_for(total);
        if !keys.is_empty() && kv_pages + adapter_pages > self.config.num_pages {
            let names: Vec<&str> = req.adapters.iter().map(|a| a.name.as_str()).collect();
            return Err(EngineError::TooLarge(format!(
                "prompt plus max_tokens ({total} tokens) needs {kv_pages} KV pages plus \
                 {adapter_pages} pages for adapter {}; the pool holds {}",
                names.join(" + "),
                self.config.num_pages
            )));
        }
        // Every name is looked up before any is leased: a lease counts a request for its
        // adapter (the operator scales replicas on that count), and a refused one is none.
        // (An adapter being unloaded takes no new request, as `Registry::lease` says.)
        if let Some(missing) = keys
            .iter()
            .find(|key| self.registry.get(key).is_none_or(Entry::is_unloading))
        {
            return Err(EngineError::AdapterNotFound(missing.name.clone()));
        }
        let mut adapters = Vec::with_capacity(keys.len());
        for key in &keys {
            let Some(lease) = self.registry.lease(key) else {
                for lease in adapters {
                    self.registry.release(lease);
                }
                return Err(EngineError::AdapterNotFound(key.name.clone()));
            };
            adapters.push(lease);
        }
        for key in &keys {
            if let Some(source) = self.registry.reload_if_evicted(key) {
                self.pending_loads.push((key.clone(), source));
            }
        }
        let scales = req.adapter_scales();
        self.scheduler
            .on_arrival(&req.tenant, self.seqs.values().map(|s| &s.tenant));
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        let prompt_len = req.prompt.len();
        // Blocks pinned for it before a remote prefill: held by the sequence until admission.
        let pinned = self.pins.remove(&req.id).unwrap_or_default();
        // The grammar's state lives in the sampler; the parameters keep the rest.
        let constraint = req.params.constraint.take();
        let seq = Sequence {
            request_id: req.id.clone(),
            tenant: req.tenant,
            adapters,
            adapter_keys: keys,
            scales,
            resident: Vec::new(),
            tokens: req.prompt,
            prompt_len,
            computed: 0,
            charged: 0,
            kv: None,
            sampler: Sampler::new(&req.params, constraint, id.0 ^ 0x5eed),
            params: req.params,
            detok: Detokenizer::default(),
            text: String::new(),
            sent: 0,
            stopped_on: None,
            events,
            export,
            remote_prefill: import.is_some(),
            import,
            arrival: Instant::now(),
            scheduled: None,
            first_token: None,
            preemptions: 0,
            admitted: 0,
            cache_salt: req.cache_salt,
            prefix_identity: None,
            prefix_root: None,
            block_keys: Vec::new(),
            queried: false,
            cached_prompt_tokens: 0,
            pinned,
        };
        self.by_request.insert(req.id, id);
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
        Ok(())
    }

    /// Ends every request whose client stopped listening, freeing its pages.
    pub fn drop_disconnected(&mut self) {
        let gone: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| {
                s.events.is_closed() || s.export.as_ref().is_some_and(|k| k.is_closed())
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.finish(id, FinishReason::Cancelled, None);
        }
    }

    /// Cancels a request by id; its pages are freed at once. Unknown ids are ignored.
    pub fn cancel(&mut self, request_id: &str) {
        if let Some(id) = self.by_request.get(request_id).copied() {
            self.finish(id, FinishReason::Cancelled, None);
        }
    }

    /// Ends a sequence: frees its pages, releases its adapter and sends the last event.
    pub(super) fn finish(&mut self, id: SeqId, reason: FinishReason, error: Option<String>) {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return;
        };
        self.by_request.remove(&seq.request_id);
        self.running.retain(|x| *x != id);
        self.waiting.retain(|x| *x != id);
        self.release_kv(seq.kv.take());
        self.release_blocks(std::mem::take(&mut seq.pinned));
        seq.resident.clear();
        for lease in std::mem::take(&mut seq.adapters) {
            self.registry.release(lease);
        }
        seq.finish(reason, error, &self.tokenizer);
    }

    pub fn stats(&self) -> EngineStats {
        let adapters_of = |ids: &mut dyn Iterator<Item = &SeqId>| {
            let mut v: Vec<AdapterKey> = ids
                .filter_map(|id| self.seqs.get(id))
                .flat_map(|s| s.adapter_keys.iter().cloned())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let mut device_resident: Vec<AdapterKey> = self
            .registry
            .iter()
            .filter(|e| e.resident().is_some())
            .map(|e| e.key().clone())
            .collect();
        device_resident.sort();
        let registry = self.registry.stats();
        let mut pool = self.pages.stats();
        // Idle cached blocks' pages are reported apart from the KV that sequences hold.
        let cached = (self.prefix.idle_blocks() * self.geometry.num_layers) as u32;
        pool.cached = cached.min(pool.kv);
        pool.kv -= pool.cached;
        EngineStats {
            pool,
            prefix: PrefixStats {
                blocks: self.prefix.blocks(),
                ..self.prefix_stats
            },
            page_bytes: self.geometry.page_elems * size_of::<f32>(),
            waiting: self.waiting.len(),
            running: self.running.len(),
            queued_prefill_tokens: self
                .seqs
                .values()
                .map(|s| s.prompt_len.saturating_sub(s.computed))
                .sum(),
            steps: self.steps,
            preemptions: self.preemptions,
            utilisation_at_first_preemption: self.utilisation_at_first_preemption,
            tokens_generated: self.tokens_generated,
            last_batch_tokens: self.last_batch_tokens,
            host_cache_used: self.registry.host_used(),
            host_cache_capacity: self.registry.host_capacity(),
            adapter_host_hits: registry.host_hits,
            adapter_host_misses: registry.host_misses,
            adapter_device_loads: registry.device_loads,
            adapter_device_evictions: registry.device_evictions,
            adapters: self.registry.len(),
            device_resident,
            running_adapters: adapters_of(&mut self.running.iter()),
            waiting_adapters: adapters_of(&mut self.waiting.iter()),
            adapter_requests: {
                let mut v: Vec<(AdapterKey, u64)> = self
                    .registry
                    .iter()
                    .map(|e| (e.key().clone(), e.requests_total()))
                    .collect();
                v.sort();
                v
            },
        }
    }
}
