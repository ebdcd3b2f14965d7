//! The prefill role's `loraplane.v1.KvTransfer/Prefill` service: computes a decode agent's
//! prompt with the request's adapter (loading it from the given source first if this agent
//! lacks it, digest-checked) and streams the KV cache back layer by layer, as each layer
//! finishes, then the first sampled token.
//!
//! Wire safety: the caller must present the cluster credential; the requested layout must be
//! exactly this agent's; chunks stay below the caller's declared limit and carry lengths and
//! checksums; the response channel is bounded, so a slow decode agent slows the producer
//! instead of growing memory; a caller that goes away cancels the prefill and frees its pages.
//!
//! Drain: with the agent's drain attached ([`PrefillService::with_drain`]; the serving layer
//! passes its lifecycle, `api::lifecycle`), each stream counts as a request in flight, so a
//! draining prefill agent refuses new prefills (`UNAVAILABLE`; the decode agent tries another
//! peer) and waits for the streams it has; at the drain timeout each stream still open ends
//! with an explicit `UNAVAILABLE` status saying so, rather than a connection cut at exit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use loraplane_proto::v1::kv_transfer_server::KvTransfer;
use loraplane_proto::v1::{
    AdapterIdentity, PrefillDone, PrefillRequest, PrefillResponse, prefill_response,
    response_format as wire_format,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request as GrpcRequest, Response, Status};

use crate::credential::{ClusterCredential, bearer_from_metadata};
use crate::disagg::stats::DisaggStats;
use crate::disagg::transfer::{WireLayout, encode_layer};
use crate::engine::actor::EngineHandle;
use crate::engine::{AdapterUse, Event, FinishReason, Request, SamplingParams};
use crate::lora::ids::{AdapterKey, Digest, TenantId};
use crate::sources::{SourceOptions, resolve_adapter};
use crate::structured::{Constraint, ResponseFormat};

/// Responses buffered per stream before the producer waits for the decode agent.
const STREAM_BUFFER: usize = 4;

/// One stream's place in the agent's drain: held while the stream runs (it counts as in
/// flight); `ended` resolves when the stream must end now.
pub struct DrainTicket {
    _held: Box<dyn Send + Sync>,
    ended: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl DrainTicket {
    pub fn new(
        held: impl Send + Sync + 'static,
        ended: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        DrainTicket {
            _held: Box::new(held),
            ended: Box::pin(ended),
        }
    }
}

/// Issues a [`DrainTicket`] per stream, or `None` while the agent drains (refused).
type Drain = Arc<dyn Fn() -> Option<DrainTicket> + Send + Sync>;

/// The prefill agent's KV-transfer service.
#[derive(Clone)]
pub struct PrefillService {
    engine: EngineHandle,
    layout: WireLayout,
    credential: ClusterCredential,
    sources: Arc<SourceOptions>,
    stats: Arc<DisaggStats>,
    drain: Option<Drain>,
}

impl std::fmt::Debug for PrefillService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefillService")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl PrefillService {
    /// `credential` is the cluster credential decode agents present.
    pub fn new(
        engine: EngineHandle,
        layout: WireLayout,
        credential: ClusterCredential,
        sources: Arc<SourceOptions>,
        stats: Arc<DisaggStats>,
    ) -> Self {
        PrefillService {
            engine,
            layout,
            credential,
            sources,
            stats,
            drain: None,
        }
    }

    /// Takes each stream's ticket from `drain`: a stream without one (the agent drains) is
    /// refused, and a stream whose ticket ends is ended explicitly.
    pub fn with_drain(
        mut self,
        drain: impl Fn() -> Option<DrainTicket> + Send + Sync + 'static,
    ) -> Self {
        self.drain = Some(Arc::new(drain));
        self
    }

    pub fn into_server(self) -> loraplane_proto::v1::kv_transfer_server::KvTransferServer<Self> {
        loraplane_proto::v1::kv_transfer_server::KvTransferServer::new(self)
            .max_decoding_message_size(64 << 20)
    }

    fn authorize<T>(&self, req: &GrpcRequest<T>) -> Result<(), Status> {
        match bearer_from_metadata(req.metadata()) {
            None => Err(Status::unauthenticated(
                "the KV channel requires the cluster credential",
            )),
            Some(t) if self.credential.verify(t) => Ok(()),
            Some(_) => Err(Status::permission_denied("wrong cluster credential")),
        }
    }

    /// Makes sure the adapter with exactly this digest is loaded, fetching it if needed.
    async fn ensure_adapter(&self, id: &AdapterIdentity) -> Result<(), Status> {
        let digest = parse_digest(&id.digest)
            .ok_or_else(|| Status::invalid_argument("adapter digest must be sha256:<64 hex>"))?;
        let key = AdapterKey::new(&id.tenant, &id.name);
        let loaded = self
            .engine
            .adapters()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if loaded
            .iter()
            .any(|a| a.key == key && a.digest == Some(digest))
        {
            return Ok(());
        }
        let dir = resolve_adapter(&id.source_uri, Some(&digest), &self.sources)
            .await
            .map_err(|e| Status::failed_precondition(format!("fetching the adapter: {e}")))?;
        self.engine
            .load_adapter(key, dir, Some(digest), false)
            .await
            .map(|_| ())
            .map_err(|e| Status::failed_precondition(format!("loading the adapter: {e}")))
    }
}

impl PrefillService {
    /// The decode agent's response format, compiled here, so the first token is sampled under
    /// the same grammar the decode agent continues.
    ///
    /// Errors: a format that does not compile (`INVALID_ARGUMENT`; the decode agent compiled
    /// it already, so this means the agents disagree).
    async fn constraint(&self, req: &PrefillRequest) -> Result<Option<Constraint>, Status> {
        let Some(format) = req
            .request
            .as_ref()
            .and_then(|r| r.response_format.clone())
            .and_then(|f| f.format)
        else {
            return Ok(None);
        };
        let format = match format {
            wire_format::Format::JsonObject(_) => ResponseFormat::JsonObject,
            wire_format::Format::JsonSchema(js) => {
                ResponseFormat::json_schema_text(js.name, &js.schema, js.strict)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?
            }
        };
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.compile_format(&format))
            .await
            .map_err(|_| Status::invalid_argument("the response format could not be compiled"))?
            .map(Some)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

fn parse_digest(s: &str) -> Option<Digest> {
    let hex_str = s.strip_prefix("sha256:")?;
    let bytes: [u8; 32] = hex::decode(hex_str).ok()?.try_into().ok()?;
    Some(Digest(bytes))
}

/// Sampling parameters of the first token (the decode agent samples the rest).
fn sampling(req: &PrefillRequest) -> SamplingParams {
    let s = req
        .request
        .as_ref()
        .and_then(|r| r.sampling.clone())
        .unwrap_or_default();
    SamplingParams {
        temperature: s.temperature.unwrap_or(0.0),
        top_k: s.top_k.map(|k| k as usize).filter(|k| *k > 0),
        top_p: s.top_p.filter(|p| *p > 0.0 && *p < 1.0),
        seed: s.seed,
        max_tokens: 1,
        ignore_eos: true,
        logprobs: true,
        ..SamplingParams::default()
    }
}

type PrefillStream = Pin<Box<dyn Stream<Item = Result<PrefillResponse, Status>> + Send>>;

#[tonic::async_trait]
impl KvTransfer for PrefillService {
    type PrefillStream = PrefillStream;

    async fn prefill(
        &self,
        request: GrpcRequest<PrefillRequest>,
    ) -> Result<Response<PrefillStream>, Status> {
        self.authorize(&request)?;
        let ticket = match &self.drain {
            Some(drain) => Some(drain().ok_or_else(|| {
                Status::unavailable("the prefill agent is draining and accepts no new prefills")
            })?),
            None => None,
        };
        let req = request.into_inner();
        if req.prompt_token_ids.is_empty() {
            return Err(Status::invalid_argument("the prompt is empty"));
        }
        let tokens = req.prompt_token_ids.len();
        let layout = req
            .layout
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("missing KV layout"))?;
        self.layout
            .check(layout, tokens)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        // Blocks the decode agent holds already: computed here, not sent.
        let skip = req.skip_blocks as usize;
        let most = (tokens - 1) / self.layout.block_size;
        if skip > most {
            return Err(Status::invalid_argument(format!(
                "skip_blocks {skip}: at most {most} of this {tokens}-token prompt's blocks can be \
                 left out (the last token's block is always sent)"
            )));
        }
        let max_chunk = req.max_chunk_bytes as usize;
        let page_bytes = self.layout.block_elems() * 4;
        if max_chunk < page_bytes {
            return Err(Status::invalid_argument(format!(
                "max_chunk_bytes {max_chunk} is below one KV page ({page_bytes} bytes)"
            )));
        }
        // One adapter at scale 1 (`adapter`), or a composition (`adapters`), or neither.
        let single = req.adapter.as_ref().filter(|id| !id.name.is_empty());
        let wanted: Vec<(&AdapterIdentity, f32)> = match (single, req.adapters.as_slice()) {
            (Some(_), [_, ..]) => {
                return Err(Status::invalid_argument(
                    "adapter and adapters are exclusive: a composition lists every adapter",
                ));
            }
            (Some(id), []) => vec![(id, 1.0)],
            (None, composed) => composed
                .iter()
                .map(|c| {
                    c.adapter
                        .as_ref()
                        .filter(|id| !id.name.is_empty())
                        .map(|id| (id, c.scale))
                        .ok_or_else(|| {
                            Status::invalid_argument("a composed adapter has no identity")
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        // The prefix cache here is partitioned like the decode agent's: by the caller's
        // tenant (the adapters', which is the same) and salt.
        let tenant = match wanted.first() {
            Some((id, _)) => TenantId(id.tenant.clone()),
            None if req.tenant.is_empty() => TenantId::default_tenant(),
            None => TenantId(req.tenant.clone()),
        };
        if wanted.iter().any(|(id, _)| id.tenant != tenant.0) {
            return Err(Status::invalid_argument(
                "the composed adapters belong to different tenants",
            ));
        }
        let adapters: Vec<AdapterUse> = wanted
            .iter()
            .map(|(id, scale)| AdapterUse {
                name: id.name.clone(),
                scale: *scale,
            })
            .collect();
        crate::engine::check_adapters(&adapters).map_err(Status::invalid_argument)?;
        for (id, _) in &wanted {
            self.ensure_adapter(id).await?;
        }
        let cache_salt = req.request.as_ref().and_then(|r| r.cache_salt.clone());
        crate::engine::check_cache_salt(cache_salt.as_deref()).map_err(Status::invalid_argument)?;
        let mut params = sampling(&req);
        params.constraint = self.constraint(&req).await?;
        let engine_req = Request {
            id: format!("prefill-{}", req.request_id),
            tenant,
            adapters,
            prompt: req.prompt_token_ids.clone(),
            params,
            cache_salt,
        };
        // Confirms to the decode agent that its composition was applied (`PrefillDone`).
        let composed = req.adapters.len() as u32;
        let started = Instant::now();
        let (mut events, mut kv) =
            self.engine
                .submit_prefill(engine_req)
                .await
                .map_err(|e| match e {
                    crate::engine::EngineError::AdapterNotFound(_) => {
                        Status::not_found(e.to_string())
                    }
                    other => Status::invalid_argument(other.to_string()),
                })?;
        self.stats.prefill_started();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (layout, stats) = (self.layout, self.stats.clone());
        let tx_end = tx.clone();
        let stream = async move {
            let mut chunks = 0u32;
            // Layers arrive as the engine computes them; forward each at once.
            while let Some(layer) = kv.recv().await {
                let encoded = match encode_layer(&layout, &layer, max_chunk, skip) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                for chunk in encoded {
                    stats.sent(chunk.data.len());
                    chunks += 1;
                    let msg = PrefillResponse {
                        msg: Some(prefill_response::Msg::Chunk(chunk)),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return; // the decode agent left: dropping `events` and `kv` cancels
                    }
                }
            }
            let mut first = None;
            while let Some(ev) = events.recv().await {
                match ev {
                    Event::Token { id, logprob, .. } => first = Some((id, logprob.unwrap_or(0.0))),
                    Event::Finished { reason, error, .. } => {
                        let msg = match (first, reason) {
                            (Some((token, logprob)), FinishReason::Length | FinishReason::Stop) => {
                                Ok(PrefillResponse {
                                    msg: Some(prefill_response::Msg::Done(PrefillDone {
                                        first_token: token,
                                        first_token_logprob: logprob,
                                        prompt_tokens: tokens as u32,
                                        prefill_us: started.elapsed().as_micros() as u64,
                                        chunks,
                                        composed_adapters: composed,
                                    })),
                                })
                            }
                            _ => Err(Status::internal(error.unwrap_or_else(|| {
                                format!("prefill ended: {}", reason.as_str())
                            }))),
                        };
                        let _ = tx.send(msg).await;
                        return;
                    }
                }
            }
        };
        tokio::spawn(async move {
            // Counted in flight until the stream's last message is queued.
            match ticket {
                None => stream.await,
                Some(DrainTicket { _held, ended }) => tokio::select! {
                    biased;
                    () = ended => {
                        // Dropping the stream drops `events` and `kv`: the engine cancels it.
                        let _ = tx_end
                            .send(Err(Status::unavailable(
                                "the prefill agent is stopping: its drain timeout passed \
                                 before this prefill finished",
                            )))
                            .await;
                    }
                    () = stream => {}
                },
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
