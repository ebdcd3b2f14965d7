//! Splitwise over real gRPC on loopback (in-process servers): a decode agent's router streams
//! each prompt's KV from prefill agents and must produce exactly a unified agent's greedy
//! tokens. Faults are injected deterministically by a wrapping KvTransfer service that cuts or
//! corrupts the stream at a chosen message — never by luck of timing — and every case checks
//! that both sides' pools return to their starting free pages.

// Test helpers outside #[test] functions fail loudly by design.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{Stream, StreamExt};
use loraplane_agent::api::lifecycle::Lifecycle;
use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::credential::ClusterCredential;
use loraplane_agent::disagg::decode::{DecodeOptions, DecodeRouter};
use loraplane_agent::disagg::prefill::PrefillService;
use loraplane_agent::disagg::stats::DisaggStats;
use loraplane_agent::disagg::transfer::WireLayout;
use loraplane_agent::engine::actor::EngineHandle;
use loraplane_agent::engine::{
    AdapterUse, EngineConfig, EngineError, Event, PrefixCaching, Request, SamplingParams,
};
use loraplane_agent::fixtures::adapter::{self, AdapterSpec};
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::Module;
use loraplane_agent::lora::ids::{AdapterKey, TenantId};
use loraplane_agent::model::config::Arch;
use loraplane_agent::sources::SourceOptions;
use loraplane_proto::v1::kv_transfer_server::{KvTransfer, KvTransferServer};
use loraplane_proto::v1::{PrefillRequest, PrefillResponse, prefill_response};
use tonic::{Response, Status};

const TOKEN: &str = "cluster-secret";

struct World {
    dir: tempfile::TempDir,
    model: PathBuf,
    adapters: Vec<PathBuf>,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    model::write(
        &ModelSpec {
            arch: Arch::Llama,
            preset: Preset::Tiny,
            dtype: FixtureDtype::F32,
            seed: 5,
            shards: 1,
        },
        &model,
    )
    .unwrap();
    let adapters = (0..8)
        .map(|i| {
            let out = dir.path().join(format!("lora-{i}"));
            let spec = AdapterSpec {
                rank: [4, 8, 16, 32][i % 4],
                alpha: 16.0,
                targets: if i % 2 == 0 {
                    Module::ALL.to_vec()
                } else {
                    vec![Module::Q, Module::V, Module::Down]
                },
                rank_pattern: BTreeMap::new(),
                alpha_pattern: BTreeMap::new(),
                rslora: i == 3,
                dtype: FixtureDtype::F32,
                seed: 70 + i as u64,
            };
            adapter::write(&spec, &model, &out).unwrap();
            out
        })
        .collect();
    World {
        dir,
        model,
        adapters,
    }
}

async fn engine(w: &World, load_adapters: bool) -> EngineHandle {
    engine_with(w, load_adapters, PrefixCaching::default()).await
}

async fn engine_with(
    w: &World,
    load_adapters: bool,
    prefix_caching: PrefixCaching,
) -> EngineHandle {
    let h = EngineHandle::spawn(
        CpuBackend,
        &w.model,
        EngineConfig {
            num_pages: 1024,
            prefix_caching,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    if load_adapters {
        for (i, dir) in w.adapters.iter().enumerate() {
            h.load_adapter(
                AdapterKey::new("default", &format!("lora-{i}")),
                dir.clone(),
                None,
                false,
            )
            .await
            .unwrap();
        }
    }
    h
}

fn layout(h: &EngineHandle) -> WireLayout {
    let c = h.model_config();
    WireLayout {
        num_layers: c.num_layers,
        block_size: 16,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    }
}

fn sources(w: &World) -> Arc<SourceOptions> {
    let mut s = SourceOptions::new(w.dir.path().join("cache"));
    s.local_roots = vec![w.dir.path().to_owned()];
    Arc::new(s)
}

/// What a wrapped prefill service does to its stream.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    /// Ends the stream with an error after this many messages (the prefill agent "dies").
    DieAfter(usize),
    /// Flips one byte of the KV data of this message.
    Corrupt(usize),
    /// Drops this message (a truncated stream).
    Drop(usize),
    /// Behaves as an agent built before adapter composition: it never sees
    /// `PrefillRequest.adapters` (an unknown field to it), so it computes the base model.
    Predates,
}

#[derive(Clone)]
struct Faulty {
    inner: PrefillService,
    fault: Fault,
}

type Out = Pin<Box<dyn Stream<Item = Result<PrefillResponse, Status>> + Send>>;

#[tonic::async_trait]
impl KvTransfer for Faulty {
    type PrefillStream = Out;

    async fn prefill(
        &self,
        mut request: tonic::Request<PrefillRequest>,
    ) -> Result<Response<Out>, Status> {
        if self.fault == Fault::Predates {
            request.get_mut().adapters.clear();
        }
        let inner = self.inner.prefill(request).await?.into_inner();
        let fault = self.fault;
        let stream = inner.enumerate().filter_map(move |(i, msg)| async move {
            match (fault, msg) {
                (Fault::DieAfter(n), _) if i == n => {
                    Some(Err(Status::unavailable("prefill agent died")))
                }
                (Fault::DieAfter(n), _) if i > n => None,
                (Fault::Drop(n), _) if i == n => None,
                (
                    Fault::Corrupt(n),
                    Ok(PrefillResponse {
                        msg: Some(prefill_response::Msg::Chunk(mut c)),
                    }),
                ) if i == n => {
                    c.data[5] ^= 0x40;
                    Some(Ok(PrefillResponse {
                        msg: Some(prefill_response::Msg::Chunk(c)),
                    }))
                }
                (_, m) => Some(m),
            }
        });
        // Once the faulty stream ends early the inner stream is dropped: the real service sees
        // its client gone, exactly as when a decode agent disconnects.
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves a (possibly faulty) prefill agent on 127.0.0.1:0.
async fn serve_prefill(w: &World, fault: Fault) -> (String, EngineHandle, Arc<DisaggStats>) {
    serve_prefill_in(w, fault, None).await
}

/// [`serve_prefill`], its streams counted in `lifecycle` when given (drain).
async fn serve_prefill_in(
    w: &World,
    fault: Fault,
    lifecycle: Option<Lifecycle>,
) -> (String, EngineHandle, Arc<DisaggStats>) {
    let h = engine(w, false).await;
    let stats = Arc::new(DisaggStats::default());
    let mut service = PrefillService::new(
        h.clone(),
        layout(&h),
        ClusterCredential::new(TOKEN).unwrap(),
        sources(w),
        stats.clone(),
    );
    if let Some(lifecycle) = lifecycle {
        service = service.with_drain(move || lifecycle.drain_ticket());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KvTransferServer::new(Faulty {
                inner: service,
                fault,
            }))
            .serve_with_incoming(incoming),
    );
    (addr.to_string(), h, stats)
}

fn options(peers: Vec<String>, local_fallback: bool) -> DecodeOptions {
    DecodeOptions {
        peers,
        refresh: Duration::from_secs(3600),
        local_prefill_threshold: 4,
        local_fallback,
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(20),
        max_chunk_bytes: 3 * 4096, // three pages of the tiny model per chunk
        credential: Some(ClusterCredential::new(TOKEN).unwrap()),
        tls: None,
    }
}

/// A decode router over `decode` with `opts`, and its counters.
async fn router_with(
    decode: &EngineHandle,
    opts: DecodeOptions,
) -> (DecodeRouter, Arc<DisaggStats>) {
    let stats = Arc::new(DisaggStats::default());
    let router = DecodeRouter::start(decode.clone(), layout(decode), opts, stats.clone()).await;
    (router, stats)
}

fn request(i: usize) -> Request {
    Request {
        id: format!("r{i}"),
        tenant: TenantId::default_tenant(),
        // Every ninth on the base model, every ninth (from the eighth) composing two adapters.
        adapters: match i % 9 {
            8 => Vec::new(),
            7 => vec![
                AdapterUse {
                    name: format!("lora-{}", i % 8),
                    scale: 0.6,
                },
                AdapterUse {
                    name: format!("lora-{}", (i + 3) % 8),
                    scale: -0.4,
                },
            ],
            _ => vec![AdapterUse::plain(format!("lora-{}", i % 8))],
        },
        prompt: (0..(6 + (i * 13) % 45))
            .map(|j| ((i * 31 + j * 17) % 500) as u32)
            .collect(),
        params: SamplingParams {
            max_tokens: 6,
            ignore_eos: true,
            ..SamplingParams::default()
        },
        cache_salt: None,
    }
}

async fn tokens(
    stream: Result<loraplane_agent::engine::actor::RequestStream, EngineError>,
) -> Vec<u32> {
    tokens_and_cached(stream).await.0
}

async fn settle(h: &EngineHandle) {
    for _ in 0..400 {
        let s = h.stats().await.unwrap();
        if s.running == 0 && s.waiting == 0 && s.pool.kv == 0 {
            h.trim().await.unwrap();
            let s = h.stats().await.unwrap();
            assert_eq!(s.pool.free, s.pool.total, "every page is back");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the engine did not settle: {:?}", h.stats().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_matches_unified_token_for_token() {
    let w = world();
    let unified = engine(&w, true).await;
    let (addr, prefill, prefill_stats) = serve_prefill(&w, Fault::None).await;
    let decode = engine(&w, true).await;
    let (router, stats) = router_with(&decode, options(vec![addr], false)).await;

    let requests: Vec<Request> = (0..18).map(request).collect();
    let expected = futures::future::join_all(
        requests
            .iter()
            .map(|r| async { tokens(unified.submit(r.clone()).await).await }),
    )
    .await;
    let got = futures::future::join_all(
        requests
            .iter()
            .map(|r| async { tokens(router.submit(r.clone()).await).await }),
    )
    .await;
    assert_eq!(got, expected);
    assert!(
        stats.remote_prefills.load(Ordering::Relaxed) >= 17,
        "long prompts went remote"
    );
    assert!(stats.bytes_received.load(Ordering::Relaxed) > 0);
    assert_eq!(
        stats.bytes_received.load(Ordering::Relaxed),
        prefill_stats.bytes_sent.load(Ordering::Relaxed)
    );
    // The prefill agent fetched the adapters it lacked from their source, digest-checked.
    assert_eq!(prefill.adapters().await.unwrap().len(), 8);
    settle(&prefill).await;
    settle(&decode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_fail_over_to_the_next_peer_and_free_everything() {
    let w = world();
    let unified = engine(&w, true).await;
    for fault in [Fault::DieAfter(1), Fault::Corrupt(1), Fault::Drop(2)] {
        let (bad, bad_engine, _) = serve_prefill(&w, fault).await;
        let (good, good_engine, _) = serve_prefill(&w, Fault::None).await;
        let decode = engine(&w, true).await;
        // Idle peers tie on load, so the configured order decides: the faulty one goes first.
        let (router, stats) =
            router_with(&decode, options(vec![bad.clone(), good.clone()], false)).await;
        let r = request(3);
        let expected = tokens(unified.submit(r.clone()).await).await;
        assert_eq!(
            tokens(router.submit(r.clone()).await).await,
            expected,
            "{fault:?}"
        );
        assert_eq!(
            stats.failures().values().sum::<u64>(),
            1,
            "{fault:?}: one failed attempt"
        );
        assert_eq!(
            stats.remote_prefills.load(Ordering::Relaxed),
            1,
            "then the healthy peer"
        );
        let kinds: Vec<_> = stats.failures().keys().copied().collect();
        match fault {
            Fault::Corrupt(_) => assert_eq!(kinds, ["corrupt"]),
            Fault::Drop(_) => assert_eq!(kinds, ["truncated"]),
            Fault::DieAfter(_) => assert_eq!(kinds, ["unavailable"]),
            Fault::None | Fault::Predates => unreachable!(),
        }
        settle(&bad_engine).await;
        settle(&good_engine).await;
        settle(&decode).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_agent_that_leaves_mid_stream_frees_the_prefill_side() {
    let w = world();
    let (addr, prefill, _) = serve_prefill(&w, Fault::None).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = loraplane_proto::v1::kv_transfer_client::KvTransferClient::new(channel);
    let l = layout(&prefill);
    let prompt: Vec<u32> = (0..120).map(|i| (i * 7 % 500) as u32).collect();
    let mut req = tonic::Request::new(PrefillRequest {
        request_id: "leaver".into(),
        prompt_token_ids: prompt.clone(),
        layout: Some(l.to_proto(prompt.len())),
        max_chunk_bytes: 4096,
        ..PrefillRequest::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let mut stream = client.prefill(req).await.unwrap().into_inner();
    assert!(matches!(
        stream.message().await.unwrap().unwrap().msg,
        Some(prefill_response::Msg::Chunk(_))
    ));
    drop(stream);
    drop(client);
    settle(&prefill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_agent_that_predates_composition_is_not_trusted_with_one() {
    let w = world();
    let unified = engine(&w, true).await;
    let (old, old_engine, _) = serve_prefill(&w, Fault::Predates).await;
    let decode = engine(&w, true).await;
    let (router, stats) = router_with(&decode, options(vec![old], true)).await;
    // One adapter at scale 1 travels as before, so the old agent serves it.
    let plain = request(3);
    assert_eq!(
        tokens(router.submit(plain.clone()).await).await,
        tokens(unified.submit(plain).await).await
    );
    assert_eq!(stats.remote_prefills.load(Ordering::Relaxed), 1);
    // A composition: the old agent computes the base model and says it applied none of the
    // adapters, so its KV is refused and the prompt is prefilled here.
    let composed = request(7);
    assert_eq!(composed.adapters.len(), 2);
    assert_eq!(
        tokens(router.submit(composed.clone()).await).await,
        tokens(unified.submit(composed).await).await
    );
    assert_eq!(stats.remote_prefills.load(Ordering::Relaxed), 1);
    assert_eq!(stats.local_prefills.load(Ordering::Relaxed), 1);
    assert_eq!(
        stats.failures().get("status"),
        Some(&1),
        "{:?}",
        stats.failures()
    );
    settle(&old_engine).await;
    settle(&decode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_peer_prefills_locally_or_fails_clearly() {
    let w = world();
    let unified = engine(&w, true).await;
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let decode = engine(&w, true).await;
    let (router, stats) = router_with(&decode, options(vec![closed.clone()], true)).await;
    let r = request(5);
    assert_eq!(
        tokens(router.submit(r.clone()).await).await,
        tokens(unified.submit(r.clone()).await).await
    );
    assert_eq!(stats.local_prefills.load(Ordering::Relaxed), 1);
    // Named by its cause: nothing listens there.
    assert_eq!(
        stats.failures().get("connect"),
        Some(&1),
        "{:?}",
        stats.failures()
    );

    let strict = DecodeRouter::start(
        decode.clone(),
        layout(&decode),
        options(vec![closed], false),
        stats.clone(),
    )
    .await;
    let err = strict.submit(r).await.unwrap_err();
    assert!(matches!(err, EngineError::Unavailable(_)), "{err}");
    settle(&decode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_channel_requires_the_cluster_credential() {
    let w = world();
    let (addr, prefill, _) = serve_prefill(&w, Fault::None).await;
    let decode = engine(&w, true).await;
    let mut opts = options(vec![addr], false);
    opts.credential = Some(ClusterCredential::new("wrong").unwrap());
    let (router, stats) = router_with(&decode, opts).await;
    assert!(router.submit(request(2)).await.is_err());
    assert_eq!(stats.failures().get("status"), Some(&1));
    assert_eq!(
        prefill.stats().await.unwrap().steps,
        0,
        "nothing was computed for an intruder"
    );
}

/// The tokens of a request and its usage's cached prompt tokens.
async fn tokens_and_cached(
    stream: Result<loraplane_agent::engine::actor::RequestStream, EngineError>,
) -> (Vec<u32>, usize) {
    let mut stream = stream.unwrap();
    let mut out = Vec::new();
    while let Some(ev) = stream.recv().await {
        match ev {
            Event::Token { id, .. } => out.push(id),
            Event::Finished { error, usage, .. } => {
                assert!(error.is_none(), "{error:?}");
                return (out, usage.cached_prompt_tokens);
            }
        }
    }
    panic!("no Finished event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_agent_fetches_only_the_blocks_its_own_cache_lacks() {
    let w = world();
    // The reference computes every prompt in full.
    let reference = engine_with(&w, true, PrefixCaching::Off).await;
    let (addr, prefill, prefill_stats) = serve_prefill(&w, Fault::None).await;
    let decode = engine(&w, true).await;
    let (router, stats) = router_with(&decode, options(vec![addr], false)).await;
    let l = layout(&decode);
    let block_bytes = (l.block_elems() * 4 * l.num_layers) as u64;
    // A 64-token system prompt (four blocks of 16), then each request's own tokens.
    let system: Vec<u32> = (0..64).map(|j| ((j * 29 + 3) % 500) as u32).collect();
    let ask = |id: &str, own: &[u32]| Request {
        id: id.into(),
        tenant: TenantId::default_tenant(),
        adapters: vec![AdapterUse::plain("lora-0")],
        prompt: system.iter().chain(own).copied().collect(),
        params: SamplingParams {
            max_tokens: 6,
            ignore_eos: true,
            ..SamplingParams::default()
        },
        cache_salt: None,
    };
    let own_a: Vec<u32> = (0..20).map(|j| 400 + j).collect();
    let own_b: Vec<u32> = (0..20).map(|j| 300 + 2 * j).collect();
    // (request, blocks on the wire, cached prompt tokens, prefilled remotely)
    let cases = [
        // Nothing cached here yet: all six blocks of 84 tokens travel.
        (ask("first", &own_a), 6, 0, true),
        // The system prompt's four blocks are cached here now: blocks 4 and 5 travel.
        (ask("second", &own_b), 2, 64, true),
        // Two tokens beyond the cached blocks: below the local-prefill threshold (4), computed
        // here, nothing travels.
        (ask("third", &own_a[..2]), 0, 64, false),
    ];
    for (req, blocks, cached, remote) in cases {
        let remote_before = stats.remote_prefills.load(Ordering::Relaxed);
        let bytes_before = stats.bytes_received.load(Ordering::Relaxed);
        let expected = tokens(reference.submit(req.clone()).await).await;
        let (got, got_cached) = tokens_and_cached(router.submit(req.clone()).await).await;
        assert_eq!(got, expected, "{}", req.id);
        assert_eq!(got_cached, cached, "{}: cached prompt tokens", req.id);
        let remote_now = stats.remote_prefills.load(Ordering::Relaxed) - remote_before;
        assert_eq!(
            remote_now,
            u64::from(remote),
            "{}: prefilled remotely",
            req.id
        );
        assert_eq!(
            stats.bytes_received.load(Ordering::Relaxed) - bytes_before,
            blocks * block_bytes,
            "{}: KV bytes received",
            req.id
        );
    }
    assert_eq!(
        stats.bytes_received.load(Ordering::Relaxed),
        prefill_stats.bytes_sent.load(Ordering::Relaxed)
    );

    // A remote prefill that fails (no peer listens, no local fallback) lets go of the blocks
    // pinned for it: the pool settles back to empty below.
    let (dead, _) = router_with(&decode, options(vec!["127.0.0.1:1".into()], false)).await;
    let err = dead.submit(ask("fourth", &own_b)).await.unwrap_err();
    assert!(matches!(err, EngineError::Unavailable(_)), "{err:?}");
    settle(&prefill).await;
    settle(&decode).await;
}

/// A prefill agent's drain: once its drain timeout has passed, an open KV stream ends with an
/// explicit `UNAVAILABLE` saying so (not a connection cut at exit) and its pages are freed; a
/// draining prefill agent refuses new prefills as retryable (`UNAVAILABLE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_prefill_agent_refuses_prefills_and_ends_open_streams_explicitly() {
    let w = world();
    let lifecycle = Lifecycle::new(Duration::from_secs(1));
    let (addr, h, _) = serve_prefill_in(&w, Fault::None, Some(lifecycle.clone())).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = loraplane_proto::v1::kv_transfer_client::KvTransferClient::new(channel);
    let l = layout(&h);
    let prompt: Vec<u32> = (0..40).map(|i| (i * 11 % 500) as u32).collect();
    let ask = |id: &str| {
        let mut req = tonic::Request::new(PrefillRequest {
            request_id: id.into(),
            prompt_token_ids: prompt.clone(),
            layout: Some(l.to_proto(prompt.len())),
            max_chunk_bytes: 1 << 20,
            ..PrefillRequest::default()
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        req
    };
    // Last message of a stream: the final `PrefillDone` or the status it ended with.
    async fn last(
        mut stream: tonic::Streaming<PrefillResponse>,
    ) -> Result<Option<prefill_response::Msg>, Status> {
        let mut last = None;
        while let Some(msg) = stream.message().await? {
            last = msg.msg;
        }
        Ok(last)
    }

    // In service: a stream counts in flight while it runs and ends with its `PrefillDone`.
    let ok = client.prefill(ask("before")).await.unwrap().into_inner();
    assert!(matches!(
        last(ok).await,
        Ok(Some(prefill_response::Msg::Done(_)))
    ));
    // The drain timeout passed: a stream still open (here, accepted just then) ends with an
    // explicit status, and the engine cancels its prefill.
    lifecycle.end_in_flight();
    let cut = client.prefill(ask("cut")).await.unwrap().into_inner();
    let status = last(cut).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("drain timeout"), "{status:?}");
    // Draining: new prefills are refused, retryable.
    lifecycle.start_drain();
    let refused = client.prefill(ask("after")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("draining"), "{refused:?}");
    assert_eq!(lifecycle.wait_idle(Duration::from_secs(5)).await, 0);
    settle(&h).await;
}
