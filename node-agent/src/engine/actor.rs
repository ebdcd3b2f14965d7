//! Runs the engine on its own thread and gives callers a cheap, cloneable handle: commands go
//! over an `mpsc` channel with a `oneshot` reply, tokens stream back over a per-request channel.
//! The thread blocks when there is nothing to do and steps continuously while there is.
//!
//! Adapter files are read and validated on separate loader threads, so loading an adapter for a
//! queued request never stalls the steps of running requests.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::engine::adapters::{LoadChange, LoadWait, Loaded};
use crate::engine::core::{Engine, EngineConfig, EngineError, EngineStats};
use crate::engine::request::{Event, KvImport, KvLayer, Request, SamplingParams};
use crate::lora::host::{self, AdapterError, AdapterLimits, HostAdapter};
use crate::lora::ids::{AdapterKey, Digest};
use crate::lora::registry::AdapterSummary;
use crate::model::config::ModelConfig;
use crate::model::tokenizer::TokenizerBundle;
use crate::structured::{
    Constraint, Encoder, GrammarError, Grammars, ResponseFormat, SharedGrammars,
};

/// The grammar compiler of a model's tokenizer (the engine's), built on first use.
pub fn grammars_for(tokenizer: Arc<TokenizerBundle>, vocab_size: usize) -> SharedGrammars {
    SharedGrammars::new(move || {
        let json = tokenizer
            .tokenizer
            .to_string(false)
            .map_err(|e| GrammarError::Unavailable(format!("serialising the tokenizer: {e}")))
            .and_then(|text| {
                serde_json::from_str(&text)
                    .map_err(|e| GrammarError::Unavailable(format!("reading the tokenizer: {e}")))
            })?;
        let bundle = tokenizer.clone();
        let encode: Encoder =
            Arc::new(move |text: &str| bundle.encode(text, false).unwrap_or_default());
        Grammars::new(&json, vocab_size, &tokenizer.eos_ids, encode)
    })
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Command {
    SubmitPrefill {
        request: Request,
        events: UnboundedSender<Event>,
        kv: UnboundedSender<KvLayer>,
        reply: Reply<()>,
    },
    SubmitPrefilled {
        request: Request,
        events: UnboundedSender<Event>,
        import: Box<KvImport>,
        reply: Reply<()>,
    },
    Submit {
        request: Request,
        events: UnboundedSender<Event>,
        reply: Reply<()>,
    },
    Cancel {
        request_id: String,
    },
    PinPrefix {
        request: Box<Request>,
        reply: oneshot::Sender<usize>,
    },
    Unpin {
        request_id: String,
    },
    LoadAdapter {
        key: AdapterKey,
        source: PathBuf,
        expected: Option<Digest>,
        pin: bool,
        reply: Reply<Loaded>,
    },
    AdapterLoaded {
        key: AdapterKey,
        result: Box<Result<HostAdapter, AdapterError>>,
        elapsed: Duration,
    },
    /// A re-read of the source of an adapter already loaded from it.
    AdapterVerified {
        key: AdapterKey,
        source: PathBuf,
        result: Box<Result<HostAdapter, AdapterError>>,
        elapsed: Duration,
    },
    UnloadAdapter {
        key: AdapterKey,
        reply: oneshot::Sender<bool>,
    },
    ListAdapters {
        reply: oneshot::Sender<Vec<AdapterSummary>>,
    },
    Stats {
        reply: oneshot::Sender<EngineStats>,
    },
    Trim {
        reply: oneshot::Sender<()>,
    },
}

/// A handle to a running engine. Cloning is cheap; the engine stops when every handle is gone.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: UnboundedSender<Command>,
    tokenizer: Arc<TokenizerBundle>,
    model: Arc<ModelConfig>,
    num_pages: usize,
    /// Compiles requests' response formats against this model's tokenizer.
    grammars: Arc<SharedGrammars>,
}

/// The events of one request, in order; the last is [`Event::Finished`]. Dropping it cancels
/// the request (the engine notices the closed channel and frees its pages).
pub type RequestStream = UnboundedReceiver<Event>;

impl EngineHandle {
    /// Loads the model and starts the engine thread.
    pub fn spawn<B: Backend>(
        backend: B,
        model_dir: &std::path::Path,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        Self::start(Engine::new(backend, model_dir, config)?)
    }

    /// Starts the engine thread for a loaded engine.
    pub fn start<B: Backend>(engine: Engine<B>) -> Result<Self, EngineError> {
        let limits = engine.config.adapter_limits;
        let num_pages = engine.config.num_pages;
        let tokenizer = engine.tokenizer().clone();
        let model = Arc::new(engine.model_config().clone());
        let (tx, rx) = unbounded_channel();
        let actor = Actor {
            engine,
            rx,
            tx: tx.clone(),
            model: model.clone(),
            limits,
            waiters: Vec::new(),
        };
        std::thread::Builder::new()
            .name("loraplane-engine".into())
            .spawn(move || actor.run())
            .map_err(EngineError::ThreadSpawn)?;
        let grammars = Arc::new(grammars_for(tokenizer.clone(), model.vocab_size));
        Ok(EngineHandle {
            tx,
            tokenizer,
            model,
            num_pages,
            grammars,
        })
    }

    /// Compiles a response format into a request's grammar (structured outputs). Blocks: the
    /// first call builds the vocabulary's token trie, and a schema can take milliseconds to
    /// compile, so call it from a blocking task.
    ///
    /// Errors: an invalid schema, or a tokenizer the grammar engine cannot describe.
    pub fn compile_format(&self, format: &ResponseFormat) -> Result<Constraint, GrammarError> {
        self.grammars.compile(format)
    }

    pub fn tokenizer(&self) -> &Arc<TokenizerBundle> {
        &self.tokenizer
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.model
    }

    /// Pages in the engine's unified pool.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Submits a request and returns its event stream.
    pub async fn submit(&self, request: Request) -> Result<RequestStream, EngineError> {
        let (events, stream) = unbounded_channel();
        self.call(|reply| Command::Submit {
            request,
            events,
            reply,
        })
        .await??;
        Ok(stream)
    }

    /// Prefill role: computes the prompt and returns the request's events (the first token,
    /// then `Finished`) and its KV, one message per layer as each layer is computed.
    pub async fn submit_prefill(
        &self,
        request: Request,
    ) -> Result<(RequestStream, UnboundedReceiver<KvLayer>), EngineError> {
        let (events, stream) = unbounded_channel();
        let (kv, kv_stream) = unbounded_channel();
        self.call(|reply| Command::SubmitPrefill {
            request,
            events,
            kv,
            reply,
        })
        .await??;
        Ok((stream, kv_stream))
    }

    /// Decode role: continues a request whose prompt KV was computed by a prefill agent.
    pub async fn submit_prefilled(
        &self,
        request: Request,
        import: KvImport,
    ) -> Result<RequestStream, EngineError> {
        let (events, stream) = unbounded_channel();
        let import = Box::new(import);
        self.call(|reply| Command::SubmitPrefilled {
            request,
            events,
            import,
            reply,
        })
        .await??;
        Ok(stream)
    }

    pub fn cancel(&self, request_id: &str) {
        let _ = self.tx.send(Command::Cancel {
            request_id: request_id.to_owned(),
        });
    }

    /// Loads (or re-points) an adapter and waits until its weights are validated and cached.
    pub async fn load_adapter(
        &self,
        key: AdapterKey,
        source: PathBuf,
        expected: Option<Digest>,
        pin: bool,
    ) -> Result<AdapterSummary, EngineError> {
        Ok(self.load(key, source, expected, pin).await?.summary)
    }

    /// [`EngineHandle::load_adapter`], saying what the load changed: loading an adapter again
    /// from the same source re-reads and re-digests its files, and replaces the weights when
    /// they changed ([`LoadChange`]).
    pub async fn load(
        &self,
        key: AdapterKey,
        source: PathBuf,
        expected: Option<Digest>,
        pin: bool,
    ) -> Result<Loaded, EngineError> {
        self.call(|reply| Command::LoadAdapter {
            key,
            source,
            expected,
            pin,
            reply,
        })
        .await?
    }

    pub async fn unload_adapter(&self, key: AdapterKey) -> Result<bool, EngineError> {
        self.call(|reply| Command::UnloadAdapter { key, reply })
            .await
    }

    pub async fn adapters(&self) -> Result<Vec<AdapterSummary>, EngineError> {
        self.call(|reply| Command::ListAdapters { reply }).await
    }

    /// Decode role, before a remote prefill: holds the longest run of `request`'s prompt
    /// blocks this engine has cached, for the request (`Engine::pin_prefix`); returns how
    /// many, which the prefill agent then leaves out of its KV stream. Submitting the request
    /// (locally or with the import) hands them to it; [`EngineHandle::unpin`] lets go of them
    /// otherwise, and is harmless after a submission.
    pub async fn pin_prefix(&self, request: &Request) -> Result<usize, EngineError> {
        // Only what the keys are made of travels (not the request's compiled grammar).
        let request = Box::new(Request {
            id: request.id.clone(),
            tenant: request.tenant.clone(),
            adapters: request.adapters.clone(),
            prompt: request.prompt.clone(),
            params: SamplingParams::default(),
            cache_salt: request.cache_salt.clone(),
        });
        self.call(|reply| Command::PinPrefix { request, reply })
            .await
    }

    /// Lets go of what [`EngineHandle::pin_prefix`] holds for `request_id` and no submitted
    /// request took.
    pub fn unpin(&self, request_id: &str) {
        let _ = self.tx.send(Command::Unpin {
            request_id: request_id.to_owned(),
        });
    }

    pub async fn stats(&self) -> Result<EngineStats, EngineError> {
        self.call(|reply| Command::Stats { reply }).await
    }

    /// Evicts idle resident adapters (their pool pages return to the free list).
    pub async fn trim(&self) -> Result<(), EngineError> {
        self.call(|reply| Command::Trim { reply }).await
    }
}

struct Actor<B: Backend> {
    engine: Engine<B>,
    rx: UnboundedReceiver<Command>,
    tx: UnboundedSender<Command>,
    model: Arc<ModelConfig>,
    limits: AdapterLimits,
    /// Callers waiting for a load or a verify of an adapter.
    waiters: Vec<(AdapterKey, LoadWait, Reply<Loaded>)>,
}

impl<B: Backend> Actor<B> {
    fn run(mut self) {
        loop {
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            self.engine.request_reloads();
            self.start_loads();
            if self.engine.has_work() {
                self.engine.drop_disconnected();
                if let Err(e) = self.engine.step() {
                    tracing::error!(error = %e, "engine step failed");
                }
            } else {
                // Loader threads hold a sender, so this wakes for their results too.
                match self.rx.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                }
            }
        }
    }

    fn start_loads(&mut self) {
        for (key, source) in self.engine.take_pending_loads() {
            self.spawn_loader(key, source, LoadWait::Load);
        }
    }

    /// Reads and validates an adapter's files on a loader thread, which reports back with
    /// [`Command::AdapterLoaded`] (a load) or [`Command::AdapterVerified`] (a re-read).
    fn spawn_loader(&mut self, key: AdapterKey, source: PathBuf, kind: LoadWait) {
        let (tx, model, limits) = (self.tx.clone(), self.model.clone(), self.limits);
        let (job_key, job_source) = (key.clone(), source.clone());
        let done = move |key, source, result: Result<HostAdapter, AdapterError>, elapsed| match kind
        {
            LoadWait::Load => Command::AdapterLoaded {
                key,
                result: Box::new(result),
                elapsed,
            },
            LoadWait::Verify => Command::AdapterVerified {
                key,
                source,
                result: Box::new(result),
                elapsed,
            },
        };
        let spawned = std::thread::Builder::new()
            .name("loraplane-adapter-load".into())
            .spawn(move || {
                let (key, source) = (job_key, job_source);
                tracing::info!(adapter = %key, source = %source.display(), ?kind, "reading adapter");
                let started = Instant::now();
                let result = host::load(&source, &*model, &limits);
                let _ = tx.send(done(key, source, result, started.elapsed()));
            });
        if let Err(e) = spawned {
            // The load ends here, failed: its callers and queued requests get the error
            // now instead of waiting for a result no thread will send.
            tracing::error!(adapter = %key, error = %e, "cannot start an adapter loader thread");
            let failure = AdapterError::Io {
                path: source.clone(),
                source: std::io::Error::new(
                    e.kind(),
                    format!("cannot start an adapter loader thread: {e}"),
                ),
            };
            self.handle(done(key, source, Err(failure), Duration::ZERO));
        }
    }

    /// Times a successful read of an adapter's files (`source_to_cpu`).
    fn observe_read(&self, result: &Result<HostAdapter, AdapterError>, elapsed: Duration) {
        if let (Ok(_), Some(o)) = (result, &self.engine.config.observer) {
            o.on_adapter_load(crate::engine::AdapterTransition::SourceToHost, elapsed);
        }
    }

    /// Answers the callers waiting for `kind` on `key`.
    fn answer(&mut self, key: &AdapterKey, kind: LoadWait, outcome: &Result<Loaded, EngineError>) {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|(k, w, _)| k == key && *w == kind);
        self.waiters = rest;
        for (_, _, reply) in mine {
            let _ = reply.send(shared_load_outcome(outcome));
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::SubmitPrefill {
                request,
                events,
                kv,
                reply,
            } => {
                let _ = reply.send(self.engine.submit_prefill(request, events, kv));
            }
            Command::SubmitPrefilled {
                request,
                events,
                import,
                reply,
            } => {
                let _ = reply.send(self.engine.submit_prefilled(request, events, *import));
            }
            Command::Submit {
                request,
                events,
                reply,
            } => {
                let _ = reply.send(self.engine.submit(request, events));
            }
            Command::Cancel { request_id } => self.engine.cancel(&request_id),
            Command::PinPrefix { request, reply } => {
                let _ = reply.send(self.engine.pin_prefix(&request));
            }
            Command::Unpin { request_id } => self.engine.unpin(&request_id),
            Command::LoadAdapter {
                key,
                source,
                expected,
                pin,
                reply,
            } => {
                match self
                    .engine
                    .begin_adapter_load(key.clone(), source.clone(), expected, pin)
                {
                    Ok(LoadWait::Load) => self.waiters.push((key, LoadWait::Load, reply)),
                    Ok(LoadWait::Verify) => {
                        // Callers arriving while a re-read is in flight share its answer.
                        let reading = self
                            .waiters
                            .iter()
                            .any(|(k, w, _)| *k == key && *w == LoadWait::Verify);
                        self.waiters.push((key.clone(), LoadWait::Verify, reply));
                        if !reading {
                            self.spawn_loader(key, source, LoadWait::Verify);
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::AdapterLoaded {
                key,
                result,
                elapsed,
            } => {
                self.observe_read(&result, elapsed);
                let outcome = self
                    .engine
                    .finish_adapter_load(&key, *result)
                    .map(|summary| Loaded {
                        summary,
                        change: LoadChange::Added,
                    });
                if let Err(e) = &outcome {
                    tracing::warn!(adapter = %key, error = %e, "adapter load failed");
                }
                self.answer(&key, LoadWait::Load, &outcome);
            }
            Command::AdapterVerified {
                key,
                source,
                result,
                elapsed,
            } => {
                self.observe_read(&result, elapsed);
                let outcome = self.engine.finish_adapter_verify(&key, &source, *result);
                match &outcome {
                    Ok(Loaded {
                        change: LoadChange::Replaced { previous },
                        summary,
                    }) => {
                        tracing::info!(adapter = %key, previous = %previous, digest = %crate::lora::ids::digest_or_none(summary.digest), "adapter files changed: new weights replace the old");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(adapter = %key, error = %e, "re-reading an adapter failed; it keeps its weights");
                    }
                }
                self.answer(&key, LoadWait::Verify, &outcome);
            }
            Command::UnloadAdapter { key, reply } => {
                let _ = reply.send(self.engine.unload_adapter(&key));
            }
            Command::ListAdapters { reply } => {
                let _ = reply.send(self.engine.adapters());
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.engine.stats());
            }
            Command::Trim { reply } => {
                self.engine.trim();
                let _ = reply.send(());
            }
        }
    }
}

/// The answer for one of the callers waiting on a load: the same for all of them (variant,
/// hence status and metric kind, and message), whoever asked first. A load ends in a summary
/// or one of four errors; anything else is the engine's bug.
fn shared_load_outcome(outcome: &Result<Loaded, EngineError>) -> Result<Loaded, EngineError> {
    match outcome {
        Ok(loaded) => Ok(loaded.clone()),
        Err(EngineError::AdapterLoad { name, source }) => Err(EngineError::AdapterLoad {
            name: name.clone(),
            source: source.clone(),
        }),
        Err(EngineError::DigestMismatch {
            name,
            expected,
            actual,
        }) => Err(EngineError::DigestMismatch {
            name: name.clone(),
            expected: expected.clone(),
            actual: actual.clone(),
        }),
        Err(EngineError::AdapterNotFound(name)) => Err(EngineError::AdapterNotFound(name.clone())),
        Err(EngineError::AdapterBusy(name)) => Err(EngineError::AdapterBusy(name.clone())),
        Err(other) => Err(EngineError::Invariant(format!(
            "an adapter load ended with {other}"
        ))),
    }
}
