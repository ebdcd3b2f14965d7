//! `bench kv-transfer`: Splitwise's KV-cache transfer. The real `PrefillService` serves on a
//! loopback tonic server; a client asks it to prefill a long prompt and reassembles the KV
//! stream with [`Assembler`], as a decode agent does. Measured in the same run:
//!
//! - raw loopback TCP bandwidth (one stream, 1 MiB writes);
//! - the gRPC transfer's own throughput: the client holds off reading until the prefill has
//!   finished, so every layer is waiting and the stream runs at transfer speed (the first 20 %
//!   of bytes, which may sit in flow-control windows, are excluded);
//! - layer-wise streaming: the client reads as layers finish; the time to the last KV byte
//!   minus the in-process compute time of the same prompt is the transfer time left exposed.
//!
//! Target (docs/performance-targets.md §2.5): gRPC KV transfer ≥ 60 % of loopback TCP
//! bandwidth; layer-wise streaming hides most of the transfer behind prefill compute.

use std::sync::Arc;
use std::time::{Duration, Instant};

use loraplane_proto::v1::kv_transfer_client::KvTransferClient;
use loraplane_proto::v1::{PrefillRequest, prefill_response};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

use loraplane_agent::backend::cpu::CpuBackend;
use loraplane_agent::credential::ClusterCredential;
use loraplane_agent::disagg::prefill::PrefillService;
use loraplane_agent::disagg::stats::DisaggStats;
use loraplane_agent::disagg::transfer::{Assembler, WireLayout, encode_layer};
use loraplane_agent::engine::actor::EngineHandle;
use loraplane_agent::engine::{EngineConfig, KvLayer, Request, SamplingParams};
use loraplane_agent::lora::ids::TenantId;
use loraplane_agent::rng::SplitMix64;
use loraplane_agent::sources::SourceOptions;

use crate::suites::report::{Bar, Plot, PlotKind, Report, Table, Target, format_num};
use crate::suites::stats::Summary;
use crate::suites::{Ctx, setup};

const TOKEN: &str = "bench-cluster-credential";
const CHUNK: usize = 1 << 20;

pub(crate) fn run(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run_async(ctx))
}

/// Loopback TCP: bytes per second of one stream of `total` bytes in 1 MiB writes.
async fn tcp_bandwidth(total: usize) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0usize;
        loop {
            let n = sock.read(&mut buf).await?;
            if n == 0 {
                return Ok::<usize, std::io::Error>(got);
            }
            got += n;
        }
    });
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let buf = vec![7u8; CHUNK];
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        sock.write_all(&buf).await?;
        sent += buf.len();
    }
    sock.shutdown().await?;
    let got = server.await??;
    let dt = t.elapsed().as_secs_f64();
    anyhow::ensure!(got == sent, "loopback received {got} of {sent} bytes");
    Ok(got as f64 / dt)
}

/// One gRPC prefill: when each KV chunk arrived (seconds from the call) and its bytes.
struct Streamed {
    arrivals: Vec<(f64, usize)>,
    done_s: f64,
    bytes: usize,
    /// When the prefill engine was seen idle again (its compute done), seconds from the call.
    engine_done_s: Option<f64>,
}

fn prefill_request(
    id: &str,
    prompt: &[u32],
    layout: &WireLayout,
) -> tonic::Request<PrefillRequest> {
    let mut req = tonic::Request::new(PrefillRequest {
        request_id: id.to_owned(),
        request: None,
        prompt_token_ids: prompt.to_vec(),
        adapter: None,
        layout: Some(layout.to_proto(prompt.len())),
        max_chunk_bytes: CHUNK as u32,
        tenant: String::new(),
        skip_blocks: 0,
        adapters: Vec::new(),
    });
    if let Ok(v) = format!("Bearer {TOKEN}").parse() {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

/// Calls `Prefill`; when `hold` is given, waits for it (the prefill to finish) before reading.
async fn grpc_prefill(
    client: &mut KvTransferClient<Channel>,
    engine: &EngineHandle,
    id: &str,
    prompt: &[u32],
    layout: &WireLayout,
    hold: bool,
) -> anyhow::Result<Streamed> {
    let t = Instant::now();
    let mut stream = client
        .prefill(prefill_request(id, prompt, layout))
        .await?
        .into_inner();
    // Watch for the engine going idle: the actor answers between steps, so the first idle
    // answer comes right after the prefill's step.
    let watcher = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                match engine.stats().await {
                    Ok(s) if s.running == 0 && s.waiting == 0 => {
                        return Some(t.elapsed().as_secs_f64());
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    Err(_) => return None,
                }
            }
            None
        })
    };
    if hold {
        loop {
            let s = engine.stats().await?;
            if s.running == 0 && s.waiting == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Let the service's forwarding task fill its buffers.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut assembler = Assembler::new(*layout, prompt.len(), 0);
    let mut arrivals = Vec::new();
    let vocab = engine.model_config().vocab_size;
    while let Some(msg) = stream.message().await? {
        match msg.msg {
            Some(prefill_response::Msg::Chunk(c)) => {
                assembler.push(&c)?;
                arrivals.push((t.elapsed().as_secs_f64(), c.data.len()));
            }
            Some(prefill_response::Msg::Done(done)) => {
                let bytes = assembler.bytes as usize;
                let done_s = t.elapsed().as_secs_f64();
                assembler.finish(&done, vocab)?;
                return Ok(Streamed {
                    arrivals,
                    done_s,
                    bytes,
                    engine_done_s: watcher.await.ok().flatten(),
                });
            }
            None => anyhow::bail!("an empty message"),
        }
    }
    anyhow::bail!("the KV stream ended early")
}

/// Throughput over the bytes after the first 20 %, which may have waited in buffers.
fn steady_throughput(arrivals: &[(f64, usize)]) -> f64 {
    let total: usize = arrivals.iter().map(|a| a.1).sum();
    let mut seen = 0;
    let mut start = None;
    for &(t, b) in arrivals {
        seen += b;
        if start.is_none() && seen * 5 >= total {
            start = Some((t, seen));
        }
    }
    match (start, arrivals.last()) {
        (Some((t0, b0)), Some(&(t1, _))) if t1 > t0 => (total - b0) as f64 / (t1 - t0),
        _ => f64::NAN,
    }
}

/// The wire codec alone on one prompt's KV: seconds to encode every layer (f32 → bytes, CRC)
/// and to validate and reassemble every chunk (CRC, bytes → f32), best of `repeats`.
fn codec_time(layout: &WireLayout, tokens: usize, repeats: usize) -> anyhow::Result<(f64, f64)> {
    let n = layout.blocks_for(tokens) * layout.block_elems();
    let layers: Vec<KvLayer> = (0..layout.num_layers)
        .map(|l| KvLayer {
            layer: l,
            num_tokens: tokens,
            data: (0..n).map(|i| (i % 251) as f32 * 0.01).collect(),
        })
        .collect();
    let (mut enc, mut dec) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let chunks = layers
            .iter()
            .map(|l| encode_layer(layout, l, CHUNK, 0))
            .collect::<Result<Vec<_>, _>>()?;
        enc = enc.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut a = Assembler::new(*layout, tokens, 0);
        for c in chunks.iter().flatten() {
            a.push(c)?;
        }
        dec = dec.min(t.elapsed().as_secs_f64());
    }
    Ok((enc, dec))
}

/// Serves `service` on a loopback port; `nodelay` sets TCP_NODELAY on every accepted socket,
/// as `serve --role prefill` does.
async fn serve_kv(
    service: PrefillService,
    nodelay: bool,
) -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = loraplane_agent::disagg::channel::server().add_service(service.into_server());
    let server = tokio::spawn(async move {
        let _ = if nodelay {
            router
                .serve_with_incoming(loraplane_agent::serve::nodelay_incoming(listener))
                .await
        } else {
            router
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        };
    });
    Ok((addr, server))
}

async fn kv_client(addr: std::net::SocketAddr) -> anyhow::Result<KvTransferClient<Channel>> {
    let channel = loraplane_agent::disagg::channel::endpoint(Endpoint::from_shared(format!(
        "http://{addr}"
    ))?)
    .connect()
    .await?;
    Ok(KvTransferClient::new(channel).max_decoding_message_size(CHUNK + (1 << 16)))
}

/// In-process prefill of the same prompt: seconds until the engine has emitted every layer.
async fn compute_time(engine: &EngineHandle, id: &str, prompt: &[u32]) -> anyhow::Result<f64> {
    let req = Request {
        id: id.to_owned(),
        tenant: TenantId::default_tenant(),
        adapters: Vec::new(),
        prompt: prompt.to_vec(),
        params: SamplingParams {
            max_tokens: 1,
            ..SamplingParams::default()
        },
        cache_salt: None,
    };
    let t = Instant::now();
    let (mut events, mut kv) = engine.submit_prefill(req).await?;
    let mut last = 0.0;
    while kv.recv().await.is_some() {
        last = t.elapsed().as_secs_f64();
    }
    while events.recv().await.is_some() {}
    Ok(last)
}

async fn run_async(ctx: &mut Ctx) -> anyhow::Result<Report> {
    let repeats = ctx.repeats(2, 5);
    let tcp_total = if ctx.tiny() {
        64 << 20
    } else {
        ctx.pick(128 << 20, 512 << 20)
    };
    let mut tcp = Vec::new();
    for r in 0..repeats {
        ctx.progress.update(format!(
            "loopback TCP, {} MiB ({}/{repeats})",
            tcp_total >> 20,
            r + 1
        ));
        tcp.push(tcp_bandwidth(tcp_total).await?);
    }
    let tcp = Summary::of(&tcp);

    let dir = ctx.fixtures.model()?;
    let config = setup::model_config(&dir)?;
    let prompt_len = ctx
        .workload
        .prompt_len
        .map_or_else(
            || if ctx.tiny() { 512 } else { ctx.pick(512, 1024) },
            |r| r.1,
        )
        .min(config.max_position_embeddings - 1);
    let engine_config = EngineConfig {
        num_pages: setup::pool_pages(&config, 16, &[], 2 * prompt_len + 64)?,
        max_batch_tokens: prompt_len,
        max_prefill_chunk: prompt_len,
        ..EngineConfig::default()
    };
    ctx.progress.update("starting the prefill service");
    let engine = EngineHandle::spawn(CpuBackend, &dir, engine_config)?;
    let layout = WireLayout {
        num_layers: config.num_layers,
        block_size: 16,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
    };
    let scratch = tempfile::tempdir()?;
    let service = PrefillService::new(
        engine.clone(),
        layout,
        ClusterCredential::new(TOKEN)?,
        Arc::new(SourceOptions::new(scratch.path())),
        Arc::new(DisaggStats::default()),
    );
    // Accepted sockets with Nagle's algorithm on (how `serve --role prefill` accepted them
    // before it set TCP_NODELAY; the headline figures use this, the conservative case), and
    // with TCP_NODELAY, as `serve` accepts them now.
    let (addr, server) = serve_kv(service.clone(), false).await?;
    let (addr_nodelay, server_nodelay) = serve_kv(service, true).await?;
    let mut client = kv_client(addr).await?;
    let mut client_nodelay = kv_client(addr_nodelay).await?;

    let mut rng = SplitMix64::new(ctx.seed ^ 0x6b76);
    let (mut grpc, mut compute, mut streamed_last, mut streamed_done, mut bytes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
    let (mut tails, mut slowdowns) = (Vec::new(), Vec::new());
    let (mut tails_nodelay, mut slowdowns_nodelay) = (Vec::new(), Vec::new());
    for r in 0..=repeats {
        let prompt: Vec<u32> = (0..prompt_len)
            .map(|_| rng.below(config.vocab_size - 16) as u32)
            .collect();
        ctx.progress.update(format!(
            "prefill {prompt_len} tokens: in-process ({r}/{repeats})"
        ));
        let c = compute_time(&engine, &format!("local-{r}"), &prompt).await?;
        ctx.progress.update(format!(
            "prefill {prompt_len} tokens: streamed over gRPC ({r}/{repeats})"
        ));
        let s = grpc_prefill(
            &mut client,
            &engine,
            &format!("s{r}"),
            &prompt,
            &layout,
            false,
        )
        .await?;
        ctx.progress.update(format!(
            "prefill {prompt_len} tokens: streamed, TCP_NODELAY server ({r}/{repeats})"
        ));
        let n = grpc_prefill(
            &mut client_nodelay,
            &engine,
            &format!("n{r}"),
            &prompt,
            &layout,
            false,
        )
        .await?;
        ctx.progress.update(format!(
            "prefill {prompt_len} tokens: transfer only ({r}/{repeats})"
        ));
        let h = grpc_prefill(
            &mut client,
            &engine,
            &format!("h{r}"),
            &prompt,
            &layout,
            true,
        )
        .await?;
        if r == 0 {
            continue; // warm-up: connection set-up, first allocations
        }
        compute.push(c);
        let last = s.arrivals.last().map_or(s.done_s, |a| a.0);
        if let Some(engine_done) = s.engine_done_s {
            tails.push((last - engine_done).max(0.0));
            slowdowns.push(engine_done - c);
        }
        if let Some(engine_done) = n.engine_done_s {
            let last = n.arrivals.last().map_or(n.done_s, |a| a.0);
            tails_nodelay.push((last - engine_done).max(0.0));
            slowdowns_nodelay.push(engine_done - c);
        }
        streamed_last.push(last);
        streamed_done.push(s.done_s);
        grpc.push(steady_throughput(&h.arrivals));
        bytes = h.bytes;
    }
    server.abort();
    server_nodelay.abort();
    let tail_nodelay = Summary::of(&tails_nodelay);
    let slowdown_nodelay = Summary::of(&slowdowns_nodelay);
    let grpc = Summary::of(&grpc);
    let compute = Summary::of(&compute);
    let last_kv = Summary::of(&streamed_last);
    let transfer_s = bytes as f64 / grpc.median;
    // Exposed: the transfer still under way after the engine finished the prompt.
    let tail = Summary::of(&tails);
    let slowdown = Summary::of(&slowdowns);
    let exposed = tail.median;
    let hidden = if transfer_s > 0.0 {
        (1.0 - exposed / transfer_s).clamp(0.0, 1.0)
    } else {
        f64::NAN
    };
    let ratio = grpc.median / tcp.median;
    ctx.progress.update("the wire codec alone");
    let (encode_s, assemble_s) = codec_time(&layout, prompt_len, repeats)?;

    let mut report = Report::new("kv-transfer", "KV-cache transfer over gRPC (Splitwise)");
    report.targets.push(Target::at_least(
        "gRPC KV transfer vs loopback TCP",
        "≥ 60 % of loopback TCP bandwidth",
        ratio,
        0.60,
        format!(
            "{:.0} % ({} vs {} MB/s)",
            ratio * 100.0,
            format_num(grpc.median / 1e6),
            format_num(tcp.median / 1e6)
        ),
    ));
    report.targets.push(
        Target::at_least(
            "Transfer hidden behind prefill (layer-wise)",
            "≥ 90 % of the transfer",
            hidden,
            0.90,
            format!(
                "{:.0} % ({:.1} ms exposed of {:.1} ms transfer)",
                hidden * 100.0,
                exposed * 1e3,
                transfer_s * 1e3
            ),
        )
        .note(format!(
            "docs/performance-targets.md §2.5. While streaming, the prefill itself ran {:.1} ms \
             slower than in-process (see below)",
            slowdown.median * 1e3
        )),
    );
    let mut table = Table::new(
        "Figures (median of the repeats, range)",
        &["figure", "median", "range"],
    );
    let mut add = |name: &str, s: &Summary, scale: f64, unit: &str| {
        table.row(vec![
            name.to_owned(),
            format!("{} {unit}", format_num(s.median * scale)),
            format!(
                "{}–{} {unit}",
                format_num(s.min * scale),
                format_num(s.max * scale)
            ),
        ]);
    };
    add("loopback TCP", &tcp, 1e-6, "MB/s");
    add(
        "gRPC KV transfer (PrefillService → Assembler)",
        &grpc,
        1e-6,
        "MB/s",
    );
    add(
        "prefill compute, in-process (to the last layer)",
        &compute,
        1e3,
        "ms",
    );
    add(
        "streamed over gRPC: time to the last KV byte",
        &last_kv,
        1e3,
        "ms",
    );
    add(
        "streamed over gRPC: time to Done",
        &Summary::of(&streamed_done),
        1e3,
        "ms",
    );
    add(
        "streamed, Nagle on: last KV byte after the engine finished (exposed)",
        &tail,
        1e3,
        "ms",
    );
    add(
        "streamed, Nagle on: engine finish vs in-process compute (slowdown)",
        &slowdown,
        1e3,
        "ms",
    );
    add(
        "as above, server sockets with TCP_NODELAY (as served): exposed",
        &tail_nodelay,
        1e3,
        "ms",
    );
    add(
        "as above, server sockets with TCP_NODELAY (as served): slowdown",
        &slowdown_nodelay,
        1e3,
        "ms",
    );
    table.row(vec![
        "KV bytes per prompt".into(),
        format!(
            "{} MB ({prompt_len} tokens)",
            format_num(bytes as f64 / 1e6)
        ),
        String::new(),
    ]);
    table.row(vec![
        "transfer alone at the gRPC rate".into(),
        format!("{:.1} ms", transfer_s * 1e3),
        String::new(),
    ]);
    table.row(vec![
        "share of the transfer hidden by layer-wise streaming".into(),
        format!("{:.0} %", hidden * 100.0),
        String::new(),
    ]);
    report.tables.push(table);
    let per_byte = |secs: f64| 1e9 * secs / bytes.max(1) as f64;
    let grpc_ns = 1e9 / grpc.median;
    // Encoding (prefill side) and reassembly (decode side) run on different threads, so the
    // slower of the two bounds the pipeline.
    let codec_ns = per_byte(encode_s).max(per_byte(assemble_s));
    report.findings.push(format!(
        "Per KV byte the gRPC path costs {grpc_ns:.2} ns against {:.2} ns for the bare socket. \
         Our wire codec alone, timed in-process on the same {} MB: encoding on the prefill \
         side (f32 → little-endian bytes into a fresh buffer, CRC-32) {:.2} ns/byte; \
         validating and reassembling on the decode side (CRC-32, bytes → f32) {:.2} ns/byte. \
         The two run on different threads, so the slower one alone would cap the stream at \
         {} MB/s. {}",
        1e9 / tcp.median,
        format_num(bytes as f64 / 1e6),
        per_byte(encode_s),
        per_byte(assemble_s),
        format_num(1e3 / codec_ns),
        if codec_ns < grpc_ns {
            format!(
                "That is {:.0} % of the gRPC path's per-byte cost; the rest is protobuf \
                 framing, HTTP/2 and the buffers they allocate and copy (a profile of this \
                 suite puts most of the transfer threads' time in page faults on fresh \
                 buffers and memcpy).",
                100.0 * codec_ns / grpc_ns
            )
        } else {
            "Measured alone it is slower than the whole stream: in a debug build our crate \
             is unoptimised, and the codec is the bottleneck."
                .to_owned()
        },
    ));
    report.findings.push(format!(
        "Layer-wise streaming: the last KV byte arrived {:.1} ms after the prefill engine \
         finished, of {:.1} ms the transfer takes alone ({:.0} % hidden; each layer's K/V leave as soon \
         as they are written, so even the last layer's share of the bytes, {:.1} ms, travels \
         during that layer's attention and MLP). But the prefill itself finished {:.1} ms \
         later than the same prompt in-process (median of paired runs; range {:.1}–{:.1} ms): \
         the prefill's GEMMs keep both cores busy, so the streaming work — the engine thread's \
         per-layer KV gather, encoding ({:.1} ms), HTTP/2 on both ends, reassembly ({:.1} ms) \
         — takes its cycles from the compute instead of running beside it. Overlap hides \
         transfer time only where the transfer has its own hardware (a spare core, or a GPU's \
         copy engines and NIC DMA).",
        exposed * 1e3,
        transfer_s * 1e3,
        hidden * 100.0,
        transfer_s * 1e3 / config.num_layers as f64,
        slowdown.median * 1e3,
        slowdown.min * 1e3,
        slowdown.max * 1e3,
        encode_s * 1e3,
        assemble_s * 1e3,
    ));
    let nagle_cost = tail.max - tail_nodelay.max;
    report.findings.push(format!(
        "Nagle's algorithm: tonic sets TCP_NODELAY only on listeners it binds itself, so \
         `serve` sets it on the KvTransfer sockets it accepts. With Nagle's algorithm on the \
         last KV byte arrived {:.1} ms (median; worst {:.1} ms) after the engine finished; \
         with TCP_NODELAY, as served, {:.1} ms (worst {:.1} ms).{}",
        tail.median * 1e3,
        tail.max * 1e3,
        tail_nodelay.median * 1e3,
        tail_nodelay.max * 1e3,
        if nagle_cost > 0.02 {
            format!(
                " The {:.0} ms gap in the worst case is the stream's last small frames \
                 waiting for the peer's delayed ACK.",
                nagle_cost * 1e3
            )
        } else {
            String::new()
        }
    ));
    report.plots.push(Plot {
        file: "kv-transfer-bandwidth.png".into(),
        title: "Loopback bandwidth: raw TCP vs gRPC KV transfer".into(),
        x_label: String::new(),
        y_label: "MB/s".into(),
        kind: PlotKind::Bars {
            bars: vec![
                Bar {
                    label: "raw TCP".into(),
                    value: tcp.median / 1e6,
                    range: Some((tcp.min / 1e6, tcp.max / 1e6)),
                    color: 0,
                },
                Bar {
                    label: "gRPC KV transfer".into(),
                    value: grpc.median / 1e6,
                    range: Some((grpc.min / 1e6, grpc.max / 1e6)),
                    color: 1,
                },
            ],
        },
    });
    report.plots.push(Plot {
        file: "kv-transfer-overlap.png".into(),
        title: format!("Prefill of {prompt_len} tokens: compute and transfer"),
        x_label: String::new(),
        y_label: "ms".into(),
        kind: PlotKind::Bars {
            bars: vec![
                Bar {
                    label: "compute (in-process)".into(),
                    value: compute.median * 1e3,
                    range: Some((compute.min * 1e3, compute.max * 1e3)),
                    color: 0,
                },
                Bar {
                    label: "compute + serial transfer".into(),
                    value: (compute.median + transfer_s) * 1e3,
                    range: None,
                    color: 3,
                },
                Bar {
                    label: "layer-wise streamed".into(),
                    value: last_kv.median * 1e3,
                    range: Some((last_kv.min * 1e3, last_kv.max * 1e3)),
                    color: 1,
                },
            ],
        },
    });
    report.method = vec![
        format!(
            "Loopback TCP: one tokio stream on 127.0.0.1, {} MiB in 1 MiB writes, timed from the \
             first write to the receiver's end of stream; {repeats} runs after none discarded.",
            tcp_total >> 20
        ),
        format!(
            "gRPC: the real `PrefillService` (the prefill role's KvTransfer service) on a loopback \
             tonic server with an engine on the `{}` fixture; a KvTransfer client (1 MiB chunks, \
             as a decode agent asks) reassembles and validates every chunk with `Assembler`. \
             Prompt: {prompt_len} random tokens (a different prompt each repeat), {repeats} \
             repeats after one discarded warm-up. Transfer throughput: the client waits until \
             the engine has finished the prefill before it reads, then the bytes after the first \
             20 % over their arrival time. Overlap: the same prompt computed in-process \
             (`submit_prefill`, time to the last layer); when the client reads as layers \
             stream, a watcher polls the engine and notes when it goes idle (the prefill done). \
             Exposed = last KV byte − engine done; hidden = 1 − exposed ÷ (bytes ÷ gRPC rate); \
             slowdown = engine done − in-process compute, paired per repeat.",
            format!("{:?}", ctx.preset).to_lowercase()
        ),
    ];
    report.data = json!({
        "tcp_bps": tcp,
        "grpc_bps": grpc,
        "compute_s": compute,
        "streamed_last_kv_s": last_kv,
        "streamed_done_s": Summary::of(&streamed_done),
        "kv_bytes": bytes,
        "prompt_len": prompt_len,
        "chunk_bytes": CHUNK,
        "transfer_s": transfer_s,
        "exposed_s": exposed,
        "exposed_tail_s": tail,
        "compute_slowdown_s": slowdown,
        "nodelay_exposed_tail_s": tail_nodelay,
        "nodelay_compute_slowdown_s": slowdown_nodelay,
        "hidden_share": hidden,
        "codec_encode_s": encode_s,
        "codec_assemble_s": assemble_s,
    });
    Ok(report)
}
