//! The decode role's side of disaggregation: pick a prefill peer, stream the prompt's KV from
//! it, validate it, and hand it to the engine; on any failure try the next peer, then (if
//! allowed) prefill locally.
//!
//! Peers come from `--prefill-peers`: addresses or DNS names (a Kubernetes headless Service
//! resolves to every prefill pod), re-resolved periodically. Choice: the peer that last
//! prefilled the longest prefix of the prompt (bounded, hash-based prefix affinity,
//! `affinity.rs`: its prefix cache probably still holds the blocks), then peers already known
//! to hold the request's adapter, then the fewest prompt tokens this agent has in flight to
//! them.
//!
//! Blocks of the prompt this agent's own prefix cache holds are not fetched again: they are
//! pinned for the request, the prefill agent is asked to leave them out of its stream
//! (`PrefillRequest.skip_blocks`), and at admission the engine reuses them under the received
//! rest. When what is left to compute is shorter than `--local-prefill-threshold`, the prompt
//! is prefilled here instead.
//!
//! A failing peer is backed off (a circuit breaker per peer): after a failed attempt it is not
//! tried again for [`BREAKER_BASE`], doubling with each further consecutive failure up to
//! [`BREAKER_MAX`]; once that time has passed, ONE request probes it (half-open) while the
//! others keep skipping it, and a success closes the breaker. So a dead peer costs one failed
//! attempt per back-off period, not one per request.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loraplane_proto::v1::kv_transfer_client::KvTransferClient;
use loraplane_proto::v1::{
    AdapterIdentity, ComposedAdapter, GenerateRequest, JsonObject, JsonSchema, PrefillRequest,
    ResponseFormat as WireFormat, SamplingParams as WireSampling, ScaledAdapter, prefill_response,
    response_format as wire_format,
};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::credential::ClusterCredential;
use crate::disagg::affinity::{self, Affinity};
use crate::disagg::channel;
use crate::disagg::stats::DisaggStats;
use crate::disagg::transfer::{Assembler, TransferError, WireLayout};
use crate::engine::actor::{EngineHandle, RequestStream};
use crate::engine::{EngineError, KvImport, Request};
use crate::lora::ids::AdapterId;
use crate::structured::ResponseFormat;

/// How a decode agent reaches its prefill peers.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// `host:port` entries; names are re-resolved every `refresh`.
    pub peers: Vec<String>,
    pub refresh: Duration,
    /// Prompts shorter than this many tokens are prefilled locally.
    pub local_prefill_threshold: usize,
    /// When every peer fails, prefill locally (with a warning) instead of failing the request.
    pub local_fallback: bool,
    pub connect_timeout: Duration,
    /// Whole-transfer deadline.
    pub timeout: Duration,
    pub max_chunk_bytes: usize,
    /// The cluster credential presented to prefill agents.
    pub credential: Option<ClusterCredential>,
    pub tls: Option<ClientTlsConfig>,
}

/// The first back-off after a peer fails.
pub const BREAKER_BASE: Duration = Duration::from_secs(1);
/// The longest back-off.
pub const BREAKER_MAX: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    channel: Channel,
    in_flight_tokens: AtomicUsize,
    /// What this peer has prefilled for this agent: adapters by identity, `None` for the base
    /// model.
    adapters: Mutex<HashSet<Option<AdapterId>>>,
    breaker: Mutex<Breaker>,
}

/// A peer's circuit breaker: closed (no failures), open until a time, or half-open with one
/// probe in flight.
#[derive(Debug, Default)]
struct Breaker {
    consecutive_failures: u32,
    /// While set and in the future, the peer is skipped.
    open_until: Option<Instant>,
    /// A request is probing the peer after its back-off (half-open).
    probing: bool,
}

impl Breaker {
    /// Whether a request may try the peer now; claims the probe when the back-off has passed.
    fn admit(&mut self, now: Instant) -> bool {
        match self.open_until {
            None => true,
            Some(until) if now < until => false,
            Some(_) if self.probing => false,
            Some(_) => {
                self.probing = true;
                true
            }
        }
    }

    fn success(&mut self) {
        *self = Breaker::default();
    }

    fn failure(&mut self, now: Instant) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let doublings = self.consecutive_failures.saturating_sub(1).min(16);
        let backoff = BREAKER_BASE.saturating_mul(1 << doublings).min(BREAKER_MAX);
        self.open_until = Some(now + backoff);
        self.probing = false;
    }

    /// A probe that ended without an answer either way (the caller went away): let another
    /// request probe.
    fn release_probe(&mut self) {
        self.probing = false;
    }
}

/// The current prefill peers.
#[derive(Debug, Default)]
pub struct PeerSet {
    peers: Mutex<Vec<Arc<Peer>>>,
    /// Which peer last prefilled which prompt prefix.
    affinity: Mutex<Affinity>,
}

impl PeerSet {
    fn snapshot(&self) -> Vec<Arc<Peer>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.snapshot().iter().map(|p| p.addr).collect()
    }

    /// Re-resolves every entry; keeps the state of peers that are still there.
    pub async fn refresh(&self, opts: &DecodeOptions) {
        let mut found = Vec::new();
        for entry in &opts.peers {
            match tokio::net::lookup_host(entry.as_str()).await {
                Ok(addrs) => found.extend(addrs),
                Err(e) => tracing::warn!(peer = %entry, error = %e, "cannot resolve prefill peer"),
            }
        }
        // Keep the configured order (the tie-break when peers are equally loaded).
        let mut seen = HashSet::new();
        found.retain(|a| seen.insert(*a));
        let old = self.snapshot();
        let next: Vec<Arc<Peer>> = found
            .into_iter()
            .filter_map(|addr| {
                if let Some(p) = old.iter().find(|p| p.addr == addr) {
                    return Some(p.clone());
                }
                let scheme = if opts.tls.is_some() { "https" } else { "http" };
                let mut ep =
                    channel::endpoint(Endpoint::from_shared(format!("{scheme}://{addr}")).ok()?)
                        .connect_timeout(opts.connect_timeout);
                if let Some(tls) = &opts.tls {
                    ep = ep.tls_config(tls.clone()).ok()?;
                }
                Some(Arc::new(Peer {
                    addr,
                    channel: ep.connect_lazy(),
                    in_flight_tokens: AtomicUsize::new(0),
                    adapters: Mutex::new(HashSet::new()),
                    breaker: Mutex::new(Breaker::default()),
                }))
            })
            .collect();
        *self.peers.lock().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// Peers in the order to try for an adapter: the one that last prefilled the longest of
    /// `prefixes`, then those known to hold the adapter, then the fewest prompt tokens in
    /// flight, then the configured order.
    /// `wanted`: what a peer that holds the request's weights has served (see
    /// [`weights_served`]).
    fn ranked(
        &self,
        wanted: &[Option<AdapterId>],
        prefixes: &[affinity::PrefixKey],
    ) -> Vec<Arc<Peer>> {
        let preferred = self
            .affinity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lookup(prefixes);
        let mut keyed: Vec<_> = self
            .snapshot()
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let has = p
                    .adapters
                    .lock()
                    .map(|a| wanted.iter().all(|w| a.contains(w)))
                    .unwrap_or(false);
                let affine = Some(p.addr) == preferred;
                (
                    (!affine, !has, p.in_flight_tokens.load(Ordering::Relaxed), i),
                    p,
                )
            })
            .collect();
        keyed.sort_by_key(|(k, _)| *k);
        keyed.into_iter().map(|(_, p)| p).collect()
    }
}

/// Routes a decode agent's requests through remote prefill.
#[derive(Debug, Clone)]
pub struct DecodeRouter {
    engine: EngineHandle,
    layout: WireLayout,
    opts: Arc<DecodeOptions>,
    peers: Arc<PeerSet>,
    stats: Arc<DisaggStats>,
}

/// Why one remote prefill attempt failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("prefill peer: {0}")]
    Status(#[from] tonic::Status),
    #[error("prefill peer timed out")]
    Timeout,
}

impl AttemptError {
    /// A bounded metric label. A status that carries a transport error is named by its cause:
    /// `tls` (a handshake or certificate failure, e.g. a rejected mTLS certificate), `connect`
    /// (nothing listening, unreachable), rather than tonic's generic wrapping.
    fn kind(&self) -> &'static str {
        match self {
            AttemptError::Transfer(e) => e.kind(),
            AttemptError::Status(s) => match transport_cause(s) {
                Some(cause) => cause,
                None if s.code() == tonic::Code::Unavailable => "unavailable",
                None => "status",
            },
            AttemptError::Timeout => "timeout",
        }
    }

    /// The error with its whole source chain (tonic's message alone hides the cause).
    fn detail(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            out.push_str(": ");
            out.push_str(&e.to_string());
            source = e.source();
        }
        out
    }
}

/// Names the transport failure under a status, if any, from its source chain.
fn transport_cause(status: &tonic::Status) -> Option<&'static str> {
    let mut chain = String::new();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        chain.push_str(&e.to_string().to_ascii_lowercase());
        chain.push('\n');
        source = e.source();
    }
    if ["certificate", "tls", "handshake", "alert"]
        .iter()
        .any(|w| chain.contains(w))
    {
        Some("tls")
    } else if [
        "connection refused",
        "tcp connect",
        "(connect)",
        "unreachable",
        "dns error",
    ]
    .iter()
    .any(|w| chain.contains(w))
    {
        Some("connect")
    } else {
        None
    }
}

/// A claimed attempt on a peer: records its outcome in the breaker, or releases a half-open
/// probe if the attempt is abandoned (the request's caller went away).
struct ProbeGuard<'a> {
    peer: &'a Peer,
    done: bool,
}

impl ProbeGuard<'_> {
    fn finish(mut self, ok: bool) {
        self.done = true;
        let mut b = self.peer.breaker.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            b.success();
        } else {
            b.failure(Instant::now());
        }
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.peer
                .breaker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release_probe();
        }
    }
}

impl DecodeRouter {
    /// Resolves the peers once and keeps re-resolving them in the background.
    pub async fn start(
        engine: EngineHandle,
        layout: WireLayout,
        opts: DecodeOptions,
        stats: Arc<DisaggStats>,
    ) -> Self {
        let peers = Arc::new(PeerSet::default());
        let opts = Arc::new(opts);
        peers.refresh(&opts).await;
        if peers.addresses().is_empty() {
            tracing::warn!(peers = ?opts.peers, "no prefill peer resolved yet; prompts are prefilled locally until one does");
        }
        let (bg_peers, bg_opts) = (Arc::downgrade(&peers), opts.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(bg_opts.refresh).await;
                let Some(peers) = bg_peers.upgrade() else {
                    return;
                };
                peers.refresh(&bg_opts).await;
            }
        });
        DecodeRouter {
            engine,
            layout,
            opts,
            peers,
            stats,
        }
    }

    pub fn peers(&self) -> &PeerSet {
        &self.peers
    }

    /// Submits a request: remote prefill when the prompt is long enough and a peer answers,
    /// local otherwise (or an error when local prefill is disabled).
    pub async fn submit(&self, request: Request) -> Result<RequestStream, EngineError> {
        if request.prompt.len() < self.opts.local_prefill_threshold {
            self.stats.local_prefills.fetch_add(1, Ordering::Relaxed);
            return self.engine.submit(request).await;
        }
        let (adapter_ids, identities): (Vec<AdapterId>, Vec<AdapterIdentity>) =
            self.identity(&request).await?.into_iter().unzip();
        // What this agent's prefix cache holds of the prompt stays here; the guard lets go of
        // it when submission ends, unless a submitted request took it.
        let _pin = PinGuard {
            engine: self.engine.clone(),
            request_id: request.id.clone(),
        };
        let cached = self.engine.pin_prefix(&request).await?;
        let uncached = request.prompt.len() - cached * self.layout.block_size;
        if uncached < self.opts.local_prefill_threshold {
            self.stats.local_prefills.fetch_add(1, Ordering::Relaxed);
            return self.engine.submit(request).await;
        }
        let prefixes = affinity::prefix_keys(&request, &adapter_ids, self.layout.block_size);
        let wanted = weights_served(&adapter_ids);
        let peers = self.peers.ranked(&wanted, &prefixes);
        let mut backed_off = 0;
        for peer in &peers {
            let admitted = peer
                .breaker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(Instant::now());
            if !admitted {
                backed_off += 1;
                continue;
            }
            // Releases a claimed probe if this future is dropped mid-attempt.
            let probe = ProbeGuard { peer, done: false };
            let tokens = request.prompt.len();
            peer.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
            let started = Instant::now();
            let result = tokio::time::timeout(
                self.opts.timeout,
                self.attempt(peer, &request, &identities, cached),
            )
            .await;
            peer.in_flight_tokens.fetch_sub(tokens, Ordering::Relaxed);
            let outcome = result.unwrap_or(Err(AttemptError::Timeout));
            probe.finish(outcome.is_ok());
            match outcome {
                Ok((import, bytes)) => {
                    self.stats
                        .received(bytes, started.elapsed().as_micros() as u64);
                    self.stats.remote_prefills.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut a) = peer.adapters.lock() {
                        a.extend(wanted.iter().cloned());
                    }
                    self.peers
                        .affinity
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(&prefixes, peer.addr);
                    return self.engine.submit_prefilled(request, import).await;
                }
                Err(e) => {
                    self.stats.failure(e.kind());
                    tracing::warn!(peer = %peer.addr, kind = e.kind(), error = %e.detail(), request = %request.id, "remote prefill failed; backing off from the peer and trying the next");
                }
            }
        }
        if !self.opts.local_fallback {
            return Err(EngineError::Unavailable(if peers.is_empty() {
                "no prefill peer is reachable and local prefill is disabled".into()
            } else if backed_off == peers.len() {
                "every prefill peer is backed off after failures and local prefill is disabled"
                    .into()
            } else {
                "every prefill peer failed and local prefill is disabled".into()
            }));
        }
        if peers.is_empty() {
            tracing::warn!(request = %request.id, "no prefill peer; prefilling locally");
        }
        self.stats.local_prefills.fetch_add(1, Ordering::Relaxed);
        self.engine.submit(request).await
    }

    /// Each adapter's identity, and as the prefill agent is told it (with its source), in the
    /// request's order; empty for the base model.
    async fn identity(
        &self,
        request: &Request,
    ) -> Result<Vec<(AdapterId, AdapterIdentity)>, EngineError> {
        if request.adapters.is_empty() {
            return Ok(Vec::new());
        }
        let loaded = self.engine.adapters().await?;
        let mut out = Vec::with_capacity(request.adapters.len());
        for key in request.adapter_keys() {
            let summary = loaded
                .iter()
                .find(|s| s.key == key)
                .ok_or_else(|| EngineError::AdapterNotFound(key.name.clone()))?;
            let wire = AdapterIdentity {
                tenant: key.tenant.0.clone(),
                name: key.name.clone(),
                digest: summary.digest.map(|d| d.to_string()).unwrap_or_default(),
                source_uri: summary.source.display().to_string(),
            };
            let id = AdapterId {
                key,
                digest: summary.digest,
            };
            out.push((id, wire));
        }
        Ok(out)
    }

    /// One remote prefill on `peer`, asking it to leave out the prompt's first `skip` blocks
    /// (this agent holds them).
    async fn attempt(
        &self,
        peer: &Peer,
        request: &Request,
        identities: &[AdapterIdentity],
        skip: usize,
    ) -> Result<(KvImport, u64), AttemptError> {
        // One adapter at scale 1 travels as before (`adapter`), so prefill agents that predate
        // composition still serve it; anything else as `adapters` with the scales.
        let (adapter, single, composed) = match (request.adapters.as_slice(), identities) {
            ([a], [id]) if a.scale == 1.0 => (Some(id.clone()), a.name.clone(), Vec::new()),
            _ => (None, String::new(), identities.to_vec()),
        };
        let scaled: Vec<ScaledAdapter> = if composed.is_empty() {
            Vec::new()
        } else {
            request
                .adapters
                .iter()
                .map(|a| ScaledAdapter {
                    name: a.name.clone(),
                    scale: Some(a.scale),
                })
                .collect()
        };
        let sent = composed.len();
        let composed: Vec<ComposedAdapter> = composed
            .into_iter()
            .zip(&request.adapters)
            .map(|(id, a)| ComposedAdapter {
                adapter: Some(id),
                scale: a.scale,
            })
            .collect();
        let mut client = KvTransferClient::new(peer.channel.clone())
            .max_decoding_message_size(self.opts.max_chunk_bytes + (1 << 16));
        let p = &request.params;
        let wire = PrefillRequest {
            request_id: request.id.clone(),
            request: Some(GenerateRequest {
                request_id: request.id.clone(),
                adapter: single,
                adapters: scaled,
                sampling: Some(WireSampling {
                    temperature: Some(p.temperature),
                    top_k: p.top_k.map(|k| k as u32),
                    top_p: p.top_p,
                    seed: p.seed,
                    max_tokens: Some(p.max_tokens as u32),
                    ..WireSampling::default()
                }),
                cache_salt: request.cache_salt.clone(),
                // The prefill agent samples the first token under the same grammar.
                response_format: p.constraint.as_ref().map(|c| format_to_wire(c.format())),
                ..GenerateRequest::default()
            }),
            prompt_token_ids: request.prompt.clone(),
            adapter,
            layout: Some(self.layout.to_proto(request.prompt.len())),
            max_chunk_bytes: self.opts.max_chunk_bytes as u32,
            tenant: request.tenant.0.clone(),
            skip_blocks: skip as u32,
            adapters: composed,
        };
        let mut grpc = tonic::Request::new(wire);
        if let Some(credential) = &self.opts.credential {
            let value = credential
                .authorization()
                .parse()
                .map_err(|_| tonic::Status::internal("credential is not valid metadata"))?;
            grpc.metadata_mut().insert("authorization", value);
        }
        let mut stream = client.prefill(grpc).await?.into_inner();
        let mut assembler = Assembler::new(self.layout, request.prompt.len(), skip);
        let vocab = self.engine.model_config().vocab_size;
        while let Some(msg) = stream.message().await? {
            match msg.msg {
                Some(prefill_response::Msg::Chunk(chunk)) => assembler.push(&chunk)?,
                Some(prefill_response::Msg::Done(done)) => {
                    if done.composed_adapters as usize != sent {
                        // A peer that predates composition computed the base model instead.
                        return Err(tonic::Status::failed_precondition(format!(
                            "the prefill peer applied {} of the request's {sent} composed \
                             adapters (an agent older than adapter composition?)",
                            done.composed_adapters
                        ))
                        .into());
                    }
                    let bytes = assembler.bytes;
                    return Ok((assembler.finish(&done, vocab)?, bytes));
                }
                None => return Err(TransferError::Truncated("an empty message".into()).into()),
            }
        }
        Err(TransferError::Truncated(format!(
            "the stream ended after {} of {} layers",
            assembler.complete_layers(),
            self.layout.num_layers
        ))
        .into())
    }
}

/// What a peer's record of served weights must hold for it to hold a request's: every adapter,
/// or the base model (`None`) for a request without one.
fn weights_served(adapters: &[AdapterId]) -> Vec<Option<AdapterId>> {
    if adapters.is_empty() {
        vec![None]
    } else {
        adapters.iter().cloned().map(Some).collect()
    }
}

/// Lets go of a request's pinned prefix blocks when its submission path ends, whichever way it
/// ends. After a submission the engine's sequence holds them and the unpin, queued behind the
/// submission, finds nothing.
struct PinGuard {
    engine: EngineHandle,
    request_id: String,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.engine.unpin(&self.request_id);
    }
}

/// A request's response format as its prefill peer is told it.
fn format_to_wire(f: &ResponseFormat) -> WireFormat {
    let format = match f {
        ResponseFormat::JsonObject => wire_format::Format::JsonObject(JsonObject {}),
        ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        } => wire_format::Format::JsonSchema(JsonSchema {
            name: name.clone(),
            schema: schema.to_string(),
            strict: *strict,
        }),
    };
    WireFormat {
        format: Some(format),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_backs_off_exponentially_and_probes_once() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert!(b.admit(t0));
        b.failure(t0);
        assert!(!b.admit(t0 + Duration::from_millis(999)));
        // Half-open: one probe, the others keep skipping.
        assert!(b.admit(t0 + BREAKER_BASE));
        assert!(!b.admit(t0 + BREAKER_BASE));
        b.failure(t0 + BREAKER_BASE);
        assert!(!b.admit(t0 + BREAKER_BASE * 2));
        assert!(b.admit(t0 + BREAKER_BASE * 3));
        b.release_probe();
        assert!(b.admit(t0 + BREAKER_BASE * 3));
        for _ in 0..40 {
            b.failure(t0);
        }
        assert!(!b.admit(t0 + BREAKER_MAX - Duration::from_millis(1)));
        assert!(b.admit(t0 + BREAKER_MAX));
        b.success();
        assert!(b.admit(t0) && b.admit(t0));
    }
}
