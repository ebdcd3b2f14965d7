//! Round-trips every message type through its wire encoding.

use prost::Message;

use crate::v1::*;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(message: M) {
    let bytes = message.encode_to_vec();
    let decoded = M::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(decoded, message);
}

fn adapter_ref() -> AdapterRef {
    AdapterRef {
        tenant: "team-a".into(),
        name: "sql-expert".into(),
    }
}

fn adapter_info() -> AdapterInfo {
    AdapterInfo {
        adapter: Some(adapter_ref()),
        digest: "sha256:00ff".into(),
        rank: 16,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        size_bytes: 1 << 20,
        residency: Residency::DevicePool as i32,
        pinned: true,
        source_uri: "hf://acme/sql-lora@main".into(),
        active_requests: 3,
    }
}

fn generate_request() -> GenerateRequest {
    GenerateRequest {
        request_id: "req-1".into(),
        adapter: "sql-expert".into(),
        prompt: Some(generate_request::Prompt::Chat(ChatPrompt {
            messages: vec![
                ChatMessage {
                    role: "system".into(),
                    content: "be brief".into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: "héllo ✓".into(),
                },
            ],
            add_generation_prompt: true,
        })),
        sampling: Some(SamplingParams {
            temperature: Some(0.7),
            top_k: Some(40),
            top_p: Some(0.9),
            seed: Some(u64::MAX),
            max_tokens: Some(128),
            stop: vec!["\n\n".into()],
            stop_token_ids: vec![2, 128_009],
            ignore_eos: true,
        }),
        logprobs: true,
        skip_special_tokens: true,
        cache_salt: Some("conversation-7".into()),
        response_format: Some(ResponseFormat {
            format: Some(response_format::Format::JsonSchema(JsonSchema {
                name: "person".into(),
                schema: r#"{"type":"object","properties":{"n":{"type":"integer"}}}"#.into(),
                strict: true,
            })),
        }),
        adapters: vec![
            ScaledAdapter {
                name: "sql-expert".into(),
                scale: Some(0.7),
            },
            ScaledAdapter {
                name: "tone".into(),
                scale: None,
            },
        ],
    }
}

#[test]
fn inference_messages_round_trip() {
    round_trip(generate_request());
    round_trip(GenerateRequest {
        prompt: Some(generate_request::Prompt::Text("once upon".into())),
        ..Default::default()
    });
    round_trip(GenerateRequest {
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds {
            ids: vec![0, 1, 511],
        })),
        ..Default::default()
    });
    round_trip(GenerateResponse {
        request_id: "req-1".into(),
        token_ids: vec![17, 4],
        text: "ab".into(),
        logprobs: vec![-0.25, -1.5],
        finish_reason: FinishReason::Length as i32,
        usage: Some(Usage {
            prompt_tokens: 12,
            completion_tokens: 2,
            cached_prompt_tokens: 8,
        }),
        timings: Some(Timings {
            queue_us: 10,
            time_to_first_token_us: 2_000,
            total_us: 9_000,
            remote_prefill: true,
        }),
        error: String::new(),
    });
    round_trip(TokenIds {
        ids: vec![u32::MAX],
    });
    round_trip(ChatMessage {
        role: "tool".into(),
        content: String::new(),
    });
}

#[test]
fn admin_messages_round_trip() {
    round_trip(LoadAdapterRequest {
        adapter: Some(adapter_ref()),
        source_uri: "file:///adapters/sql".into(),
        expected_sha256: "ab".repeat(32),
        pin: true,
    });
    round_trip(LoadAdapterResponse {
        adapter: Some(adapter_info()),
        outcome: LoadOutcome::Replaced as i32,
    });
    round_trip(UnloadAdapterRequest {
        adapter: Some(adapter_ref()),
    });
    round_trip(UnloadAdapterResponse { unloaded: true });
    round_trip(ListAdaptersRequest {
        tenant: "team-a".into(),
    });
    round_trip(ListAdaptersResponse {
        adapters: vec![adapter_info(), AdapterInfo::default()],
    });
    round_trip(SetTenantsRequest {
        tenants: vec![TenantSpec {
            id: "team-a".into(),
            api_key_sha256: vec!["cd".repeat(32)],
            limits: Some(TenantLimits {
                max_concurrent_requests: 8,
                max_tokens_per_minute: 100_000,
                max_adapters: 50,
            }),
        }],
    });
    round_trip(SetTenantsResponse { tenants: 1 });
    round_trip(GetStatsRequest {});
    round_trip(GetStatsResponse {
        role: "decode".into(),
        pool: Some(PoolStats {
            page_bytes: 65_536,
            total_pages: 1_000,
            free_pages: 400,
            kv_pages: 500,
            adapter_pages: 100,
        }),
        queue: Some(QueueStats {
            waiting_requests: 2,
            running_requests: 30,
            queued_prefill_tokens: 4_096,
            preemptions_total: 1,
        }),
        host_cache: Some(HostCacheStats {
            capacity_bytes: 1 << 30,
            used_bytes: 1 << 20,
            adapters: 4,
        }),
        device_resident_adapters: vec![adapter_ref()],
        draining: true,
        model: "llama".into(),
        adapter_requests: vec![AdapterRequests {
            adapter: Some(adapter_ref()),
            requests_total: 42,
        }],
    });
    round_trip(DrainRequest {
        timeout_seconds: 30,
    });
    round_trip(DrainResponse { in_flight: 2 });
}

#[test]
fn kv_messages_round_trip() {
    round_trip(PrefillRequest {
        request_id: "req-1".into(),
        request: Some(generate_request()),
        prompt_token_ids: vec![1, 2, 3],
        adapter: Some(AdapterIdentity {
            tenant: "team-a".into(),
            name: "sql-expert".into(),
            digest: "sha256:00ff".into(),
            source_uri: "hf://acme/sql-lora".into(),
        }),
        layout: Some(KvLayout {
            num_layers: 32,
            block_size: 16,
            num_kv_heads: 8,
            head_dim: 128,
            dtype: Dtype::Bf16 as i32,
            num_blocks: 3,
        }),
        max_chunk_bytes: 1 << 20,
        tenant: "team-a".into(),
        skip_blocks: 2,
        adapters: vec![ComposedAdapter {
            adapter: Some(AdapterIdentity {
                tenant: "team-a".into(),
                name: "tone".into(),
                digest: "sha256:0a0b".into(),
                source_uri: "s3://bucket/tone".into(),
            }),
            scale: 0.3,
        }],
    });
    let data: Vec<u8> = (0..=255).collect();
    round_trip(PrefillResponse {
        msg: Some(prefill_response::Msg::Chunk(KvChunk {
            layer: 31,
            first_block: 2,
            num_blocks: 1,
            num_tokens: 7,
            dtype: Dtype::F32 as i32,
            byte_length: data.len() as u64,
            checksum: 0xdead_beef,
            data,
        })),
    });
    round_trip(PrefillResponse {
        msg: Some(prefill_response::Msg::Done(PrefillDone {
            first_token: 42,
            first_token_logprob: -0.125,
            prompt_tokens: 3,
            prefill_us: 1_500,
            chunks: 64,
            composed_adapters: 2,
        })),
    });
}

#[test]
fn descriptor_set_describes_every_service() {
    let set = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).expect("decodes");
    let services: Vec<String> = set
        .file
        .iter()
        .flat_map(|file| {
            file.service
                .iter()
                .map(|s| format!("{}.{}", file.package(), s.name()))
        })
        .collect();
    for service in [
        "loraplane.v1.Inference",
        "loraplane.v1.Admin",
        "loraplane.v1.KvTransfer",
    ] {
        assert!(
            services.iter().any(|s| s == service),
            "{service} missing from {services:?}"
        );
    }
}
