//! The serving core both transports share: authenticate a caller, check a validated request
//! against the agent's bounds and the tenant's limits, tokenize it, submit it to the engine,
//! and hand back an instrumented stream of engine events.
//!
//! The transports (`grpc.rs`, `http.rs`) are generic over the small [`Inference`] trait, so
//! they translate wire formats only and can be exercised against a fake.
//!
//! Order of checks (each refusal is cheap and leaks nothing): drain → authentication →
//! request bounds → model name → tokenization and context length → tenant limits → engine
//! (which resolves the adapter inside the caller's tenant: another tenant's adapter and a
//! missing one give the same [`ApiError::ModelNotFound`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;

use crate::api::auth::{Admission, Caller, Tenants};
use crate::api::error::ApiError;
use crate::api::lifecycle::{InFlight, Lifecycle};
use crate::engine::actor::{EngineHandle, RequestStream};
use crate::engine::{AdapterUse, Event, FinishReason, Request, SamplingParams, Timings, Usage};
use crate::metrics::{Metrics, Surface};
use crate::model::tokenizer::ChatMessage;
use crate::structured::{Constraint, ResponseFormat};

/// Bounds on what one request may ask for (from the `serve` flags).
#[derive(Debug, Clone)]
pub struct RequestBounds {
    /// `max_tokens` when a request gives none (capped by the context left after the prompt).
    pub default_max_tokens: usize,
    pub max_stop_strings: usize,
    pub max_stop_string_bytes: usize,
    pub max_stop_token_ids: usize,
    /// Largest request body / message, bytes.
    pub max_request_bytes: usize,
    /// Longest adapter (model) name, bytes.
    pub max_model_name_bytes: usize,
}

impl Default for RequestBounds {
    fn default() -> Self {
        RequestBounds {
            default_max_tokens: 256,
            max_stop_strings: 16,
            max_stop_string_bytes: 256,
            max_stop_token_ids: 64,
            max_request_bytes: 4 << 20,
            max_model_name_bytes: 256,
        }
    }
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Raw text; `add_special_tokens` adds the tokenizer's specials (e.g. BOS).
    Text {
        text: String,
        add_special_tokens: bool,
    },
    Tokens(Vec<u32>),
    /// Rendered with the model's chat template, then encoded without extra specials (the
    /// template writes them).
    Chat {
        messages: Vec<ChatMessage>,
        add_generation_prompt: bool,
        /// OpenAI function tools for the template's `tools`; refused unless the template reads
        /// them.
        tools: Option<Vec<serde_json::Value>>,
    },
}

/// Sampling as the surfaces give it; `None` fields take the defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub max_tokens: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub logprobs: bool,
}

/// A request after the transport decoded it.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateSpec {
    /// The `model` field: an adapter of the caller's tenant, or the base model (its served
    /// name, `base`, or empty).
    pub model: String,
    pub prompt: Prompt,
    pub sampling: Sampling,
    /// Partitions the prefix cache further than the tenant (vLLM's `cache_salt`).
    pub cache_salt: Option<String>,
    /// Structured outputs: the output must be JSON of this shape; `None` is free text.
    pub response_format: Option<ResponseFormat>,
    /// Adapters composed over the base model, each with its scale (the `adapters` extension
    /// field); `model` must then name the base model. `None`: `model` alone says.
    pub adapters: Option<Vec<AdapterUse>>,
}

/// Checks a request's `cache_salt` (`engine::check_cache_salt`).
///
/// Errors: a 400 / `INVALID_ARGUMENT` naming `cache_salt`.
pub fn cache_salt(salt: Option<String>) -> Result<Option<String>, ApiError> {
    crate::engine::check_cache_salt(salt.as_deref())
        .map_err(|message| ApiError::invalid("cache_salt", message))?;
    Ok(salt)
}

/// Where an accepted request streams from.
pub struct Generation {
    /// The agent's id for the request (unique while it runs).
    pub id: String,
    /// The model name to echo back.
    pub model: String,
    pub prompt_tokens: usize,
    /// Seconds since the epoch at acceptance (OpenAI's `created`).
    pub created: u64,
    /// The engine's events, ending with [`Event::Finished`]. Dropping it cancels the request.
    pub events: Pin<Box<dyn Stream<Item = Event> + Send>>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("id", &self.id)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// A model a caller can name: the base model or one of its tenant's adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCard {
    pub id: String,
    pub owned_by: String,
    /// The base model for an adapter.
    pub parent: Option<String>,
}

/// The domain operations the transports need (docs/style.md rule 16).
pub trait Inference: Clone + Send + Sync + 'static {
    /// Resolves the presented API key.
    fn authenticate(&self, token: Option<&str>) -> Result<Caller, ApiError>;

    /// Validates, admits and starts a request.
    fn generate(
        &self,
        caller: &Caller,
        spec: GenerateSpec,
        surface: Surface,
    ) -> impl Future<Output = Result<Generation, ApiError>> + Send;

    /// The base model and the caller's adapters.
    fn models(
        &self,
        caller: &Caller,
    ) -> impl Future<Output = Result<Vec<ModelCard>, ApiError>> + Send;

    fn bounds(&self) -> &RequestBounds;

    /// Counts a refusal the transport produced itself (bad JSON, oversized body).
    fn refused(&self, surface: Surface, error: &ApiError);

    /// The text of one token (for log-probability listings).
    fn token_text(&self, id: u32) -> String;

    /// Whether to receive traffic (`/readyz`).
    fn ready(&self) -> bool;

    /// The Prometheus exposition, refreshed from the engine.
    fn metrics_text(&self) -> impl Future<Output = String> + Send;
}

/// The real implementation over an [`EngineHandle`].
#[derive(Debug, Clone)]
pub struct AgentService {
    inner: Arc<ServiceInner>,
}

#[derive(Debug)]
struct ServiceInner {
    engine: EngineHandle,
    tenants: Tenants,
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    bounds: RequestBounds,
    served_name: String,
    context: usize,
    vocab: usize,
    next_id: AtomicU64,
    id_prefix: u64,
    /// Distinct adapters one batch may hold (the `max_lora` label).
    max_lora: usize,
    /// Decode role: remote prefill.
    router: Option<crate::disagg::decode::DecodeRouter>,
    /// Prefill role: generation requests are refused ([`ApiError::PrefillRole`]).
    prefill_only: bool,
}

fn epoch_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AgentService {
    pub fn new(
        engine: EngineHandle,
        tenants: Tenants,
        lifecycle: Lifecycle,
        metrics: Arc<Metrics>,
        bounds: RequestBounds,
        served_name: String,
        max_lora: usize,
    ) -> Self {
        let c = engine.model_config();
        let (context, vocab) = (c.max_position_embeddings, c.vocab_size);
        let id_prefix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        AgentService {
            inner: Arc::new(ServiceInner {
                engine,
                tenants,
                lifecycle,
                metrics,
                bounds,
                served_name,
                context,
                vocab,
                next_id: AtomicU64::new(0),
                id_prefix,
                max_lora,
                router: None,
                prefill_only: false,
            }),
        }
    }

    /// Decode role: prompts are prefilled by remote prefill agents through `router`. Call it
    /// on a freshly built service, before it is cloned.
    pub fn with_router(mut self, router: crate::disagg::decode::DecodeRouter) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.router = Some(router),
            None => tracing::error!("with_router on a shared service: remote prefill is off"),
        }
        self
    }

    /// Prefill role: generation requests on the public surfaces are refused with a clear
    /// error (clients belong on decode or unified agents; the client Service selects only
    /// those). Call it on a freshly built service, before it is cloned.
    pub fn prefill_only(mut self) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.prefill_only = true,
            None => tracing::error!("prefill_only on a shared service: generation stays open"),
        }
        self
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.inner.engine
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.inner.lifecycle
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn served_name(&self) -> &str {
        &self.inner.served_name
    }

    /// The adapters a request applies: those of its `adapters` field, over the base model
    /// its `model` names; or the adapter `model` names, at scale 1; or none (the base model).
    ///
    /// Errors: a 400 naming `model` or `adapters` (a name too long, `adapters` beside an
    /// adapter's name, a name listed twice, a scale that is not finite, too many).
    fn resolve_adapters(
        &self,
        model: &str,
        adapters: Option<Vec<AdapterUse>>,
    ) -> Result<Vec<AdapterUse>, ApiError> {
        let longest = self.inner.bounds.max_model_name_bytes;
        let too_long = |field, name: &str| {
            (name.len() > longest).then(|| {
                ApiError::invalid(field, format!("model names are at most {longest} bytes"))
            })
        };
        if let Some(e) = too_long("model", model) {
            return Err(e);
        }
        let base = model.is_empty() || model == "base" || model == self.inner.served_name;
        let Some(adapters) = adapters else {
            return Ok(if base {
                Vec::new()
            } else {
                vec![AdapterUse::plain(model)]
            });
        };
        if !base {
            return Err(ApiError::invalid(
                "adapters",
                format!(
                    "with adapters, model must name the base model ({:?} or \"base\"), not an adapter",
                    self.inner.served_name
                ),
            ));
        }
        if let Some(e) = adapters.iter().find_map(|a| too_long("adapters", &a.name)) {
            return Err(e);
        }
        crate::engine::check_adapters(&adapters)
            .map_err(|message| ApiError::invalid("adapters", message))?;
        Ok(adapters)
    }

    fn check_sampling(&self, s: &Sampling) -> Result<(), ApiError> {
        let b = &self.inner.bounds;
        if let Some(t) = s.temperature
            && !(t.is_finite() && (0.0..=100.0).contains(&t))
        {
            return Err(ApiError::invalid(
                "temperature",
                "temperature must be a finite number between 0 and 100",
            ));
        }
        if let Some(p) = s.top_p
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return Err(ApiError::invalid("top_p", "top_p must be in (0, 1]"));
        }
        if s.max_tokens == Some(0) {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        if let Some(m) = s.max_tokens
            && m >= self.inner.context as u64
        {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "max_tokens ({m}) must be below the context length of {}",
                    self.inner.context
                ),
            ));
        }
        if s.stop.len() > b.max_stop_strings {
            return Err(ApiError::invalid(
                "stop",
                format!("at most {} stop strings are allowed", b.max_stop_strings),
            ));
        }
        if let Some(bad) = s
            .stop
            .iter()
            .find(|x| x.is_empty() || x.len() > b.max_stop_string_bytes)
        {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "stop strings must be 1 to {} bytes (got {})",
                    b.max_stop_string_bytes,
                    bad.len()
                ),
            ));
        }
        if s.stop_token_ids.len() > b.max_stop_token_ids {
            return Err(ApiError::invalid(
                "stop_token_ids",
                format!(
                    "at most {} stop token ids are allowed",
                    b.max_stop_token_ids
                ),
            ));
        }
        if let Some(bad) = s
            .stop_token_ids
            .iter()
            .find(|t| **t as usize >= self.inner.vocab)
        {
            return Err(ApiError::invalid(
                "stop_token_ids",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.inner.vocab
                ),
            ));
        }
        Ok(())
    }

    fn tokenize(&self, prompt: Prompt) -> Result<Vec<u32>, ApiError> {
        let tok = self.inner.engine.tokenizer();
        let ids = match prompt {
            Prompt::Text { text, .. } if text.is_empty() => {
                return Err(ApiError::invalid("prompt", "the prompt is empty"));
            }
            Prompt::Text {
                text,
                add_special_tokens,
            } => tok
                .encode(&text, add_special_tokens)
                .map_err(|e| ApiError::invalid("prompt", e))?,
            Prompt::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|t| **t as usize >= self.inner.vocab) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!(
                            "token id {bad} is outside the vocabulary of {}",
                            self.inner.vocab
                        ),
                    ));
                }
                ids
            }
            Prompt::Chat {
                messages,
                add_generation_prompt,
                tools,
            } => {
                if tools.is_some() && !tok.supports_tools() {
                    return Err(ApiError::invalid(
                        "tools",
                        "tool calling is not supported: the model's chat template does not \
                         support tools",
                    ));
                }
                let text = tok
                    .render_chat_with_tools(&messages, tools.as_deref(), add_generation_prompt)
                    .map_err(|e| ApiError::invalid("messages", e))?;
                tok.encode(&text, false)
                    .map_err(|e| ApiError::invalid("messages", e))?
            }
        };
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty"));
        }
        if ids.len() >= self.inner.context {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "the prompt is {} tokens; the context length is {}",
                    ids.len(),
                    self.inner.context
                ),
            ));
        }
        Ok(ids)
    }

    /// Compiles a request's response format on a blocking thread (the first one also builds
    /// the vocabulary's token trie).
    ///
    /// Errors: a 400 naming the schema's problem; `ignore_eos` (the grammar decides where a
    /// structured output ends).
    async fn compile_format(
        &self,
        format: ResponseFormat,
        ignore_eos: bool,
    ) -> Result<Constraint, ApiError> {
        if ignore_eos {
            return Err(ApiError::invalid(
                "ignore_eos",
                "ignore_eos cannot be combined with response_format: the format decides where \
                 the output ends",
            ));
        }
        let engine = self.inner.engine.clone();
        tokio::task::spawn_blocking(move || engine.compile_format(&format))
            .await
            // The compiler panicked on this schema: still the schema's problem to the caller.
            .map_err(|_| ApiError::invalid("response_format", "the schema could not be compiled"))?
            .map_err(|e| ApiError::invalid("response_format", e.to_string()))
    }

    fn next_id(&self) -> String {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{n:08x}", self.inner.id_prefix)
    }

    async fn start(
        &self,
        caller: &Caller,
        spec: GenerateSpec,
        surface: Surface,
        in_flight: InFlight,
    ) -> Result<Generation, ApiError> {
        self.check_sampling(&spec.sampling)?;
        let adapters = self.resolve_adapters(&spec.model, spec.adapters)?;
        let prompt = self.tokenize(spec.prompt)?;
        let s = spec.sampling;
        let room = self.inner.context - prompt.len();
        let max_tokens = match s.max_tokens {
            Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
            None => self.inner.bounds.default_max_tokens.min(room),
        };
        if max_tokens > room {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "the prompt ({} tokens) plus max_tokens ({max_tokens}) exceeds the context length of {}",
                    prompt.len(),
                    self.inner.context
                ),
            ));
        }
        let constraint = match spec.response_format {
            None => None,
            Some(format) => Some(self.compile_format(format, s.ignore_eos).await?),
        };
        let admission = caller
            .admit(prompt.len(), Instant::now())
            .inspect_err(|e| {
                if matches!(e, ApiError::RateLimited { .. }) {
                    self.inner.metrics.rate_limited(&caller.tenant.0);
                }
            })?;
        let id = self.next_id();
        let prompt_tokens = prompt.len();
        let request = Request {
            id: id.clone(),
            tenant: caller.tenant.clone(),
            adapters,
            prompt,
            params: SamplingParams {
                temperature: s.temperature.unwrap_or(0.0),
                top_k: s.top_k.map(|k| k as usize).filter(|k| *k > 0),
                top_p: s.top_p,
                seed: s.seed,
                max_tokens,
                stop: s.stop,
                stop_token_ids: s.stop_token_ids,
                ignore_eos: s.ignore_eos,
                logprobs: s.logprobs,
                return_logits: false,
                constraint,
            },
            cache_salt: spec.cache_salt,
        };
        let arrival = Instant::now();
        let stream = match &self.inner.router {
            Some(router) => router.submit(request).await?,
            None => self.inner.engine.submit(request).await?,
        };
        let metrics = self.inner.metrics.clone();
        metrics.request(surface, &caller.tenant.0);
        metrics.prompt_tokens(&caller.tenant.0, prompt_tokens);
        let events = Tracked {
            stream,
            metrics,
            surface,
            tenant: caller.tenant.0.clone(),
            admission,
            ended: Box::pin(in_flight.ended()),
            _in_flight: in_flight,
            arrival,
            last_token: None,
            prompt_tokens,
            generated: 0,
            done: false,
        };
        Ok(Generation {
            id,
            model: spec.model,
            prompt_tokens,
            created: epoch_secs(),
            events: Box::pin(events),
        })
    }
}

impl Inference for AgentService {
    fn authenticate(&self, token: Option<&str>) -> Result<Caller, ApiError> {
        self.inner.tenants.authenticate(token)
    }

    async fn generate(
        &self,
        caller: &Caller,
        spec: GenerateSpec,
        surface: Surface,
    ) -> Result<Generation, ApiError> {
        let result = if self.inner.prefill_only {
            Err(ApiError::PrefillRole)
        } else {
            match self.inner.lifecycle.track() {
                Ok(in_flight) => self.start(caller, spec, surface, in_flight).await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = &result {
            self.refused(surface, e);
        }
        result
    }

    async fn models(&self, caller: &Caller) -> Result<Vec<ModelCard>, ApiError> {
        let base = self.inner.served_name.clone();
        let mut cards = vec![ModelCard {
            id: base.clone(),
            owned_by: "loraplane".into(),
            parent: None,
        }];
        let adapters = self.inner.engine.adapters().await?;
        cards.extend(
            adapters
                .into_iter()
                .filter(|a| a.key.tenant == caller.tenant)
                .map(|a| ModelCard {
                    id: a.key.name,
                    owned_by: caller.tenant.0.clone(),
                    parent: Some(base.clone()),
                }),
        );
        Ok(cards)
    }

    fn bounds(&self) -> &RequestBounds {
        &self.inner.bounds
    }

    fn refused(&self, surface: Surface, error: &ApiError) {
        self.inner.metrics.error(surface, error.kind());
    }

    fn token_text(&self, id: u32) -> String {
        self.inner.engine.tokenizer().decode(&[id])
    }

    fn ready(&self) -> bool {
        self.inner.lifecycle.is_ready()
    }

    async fn metrics_text(&self) -> String {
        let m = &self.inner.metrics;
        m.set_draining(self.inner.lifecycle.is_draining());
        m.in_flight
            .set(i64::try_from(self.inner.lifecycle.in_flight()).unwrap_or(i64::MAX));
        match self.inner.engine.stats().await {
            Ok(stats) => m.refresh(&stats, self.inner.max_lora),
            Err(e) => tracing::warn!(error = %e, "engine statistics unavailable for /metrics"),
        }
        match self.inner.engine.adapters().await {
            Ok(adapters) => m.refresh_adapters(&adapters),
            Err(e) => tracing::warn!(error = %e, "adapter list unavailable for /metrics"),
        }
        m.render()
    }
}

/// The engine's event stream plus everything a running request holds: its in-flight count,
/// its tenant admission (charged per token), and its latency timers. Dropping it drops the
/// engine stream, which cancels the request and frees its pages.
struct Tracked {
    stream: RequestStream,
    metrics: Arc<Metrics>,
    surface: Surface,
    tenant: String,
    admission: Admission,
    /// Resolves when the agent ends in-flight requests (the drain timeout passed).
    ended: Pin<Box<dyn Future<Output = ()> + Send>>,
    _in_flight: InFlight,
    arrival: Instant,
    last_token: Option<Instant>,
    prompt_tokens: usize,
    generated: usize,
    done: bool,
}

/// The error a request still running at the end of a drain finishes with.
pub const SHUTDOWN_MESSAGE: &str =
    "the agent is shutting down: the drain timeout passed before the request finished";

impl Stream for Tracked {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.ended.as_mut().poll(cx).is_ready() {
            // End it explicitly rather than have the connection cut at exit; dropping `self`
            // then cancels the request in the engine.
            self.done = true;
            self.metrics.error(self.surface, "shutdown");
            return Poll::Ready(Some(Event::Finished {
                reason: FinishReason::Error,
                text: String::new(),
                usage: Usage {
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: self.generated,
                    cached_prompt_tokens: 0,
                },
                timings: Timings {
                    total: self.arrival.elapsed(),
                    ..Timings::default()
                },
                error: Some(SHUTDOWN_MESSAGE.to_owned()),
            }));
        }
        let event = match self.stream.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(e) => e,
        };
        let now = Instant::now();
        match &event {
            Some(Event::Token { .. }) => {
                match self.last_token {
                    None => self
                        .metrics
                        .ttft
                        .observe((now - self.arrival).as_secs_f64()),
                    Some(t) => self.metrics.inter_token.observe((now - t).as_secs_f64()),
                }
                self.last_token = Some(now);
                self.generated += 1;
                self.admission.charge(1, now);
                self.metrics.generated_tokens(&self.tenant, 1);
            }
            Some(Event::Finished { reason, .. }) => {
                self.done = true;
                self.metrics
                    .duration
                    .observe((now - self.arrival).as_secs_f64());
                if *reason == FinishReason::Error {
                    self.metrics.error(self.surface, "generation_failed");
                }
            }
            None => {
                // The engine went away without a last event.
                self.done = true;
                self.metrics.error(self.surface, "engine_stopped");
            }
        }
        Poll::Ready(event)
    }
}
