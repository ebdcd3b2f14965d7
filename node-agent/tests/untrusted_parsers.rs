//! Randomized property tests of every parser of untrusted bytes (issue 16 point 11): the
//! safetensors header and offsets and `adapter_config.json` of an adapter, the KV chunk stream
//! and its assembler, the OpenAI request bodies, the tenants / API-keys file, and the JSON schemas
//! of structured outputs (compiled into grammars).
//!
//! The property is the same for each: any input — mutations of a valid one, or generated
//! structure — gives `Ok` or a clear `Err`, never a panic, and a length field never makes the
//! parser allocate beyond the bytes it was given. Cases are deterministic (SplitMix64 from a
//! fixed seed, so a failure reproduces) and bounded so the suite stays fast: `CASES` per
//! parser by default. A longer run for humans: `LORAPLANE_FUZZ_CASES=100000 cargo test
//! --release -p loraplane-agent --test untrusted_parsers` (and `LORAPLANE_FUZZ_SEED` to move
//! to other inputs).

// Test setup fails loudly by design.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use loraplane_agent::api::auth::{self, Tenants};
use loraplane_agent::api::openai::{self, ChatRequest, CompletionRequest};
use loraplane_agent::disagg::transfer::{Assembler, WireLayout};
use loraplane_agent::engine::actor::grammars_for;
use loraplane_agent::fixtures::adapter::{self, AdapterSpec};
use loraplane_agent::fixtures::model::{self, ModelSpec, Preset};
use loraplane_agent::fixtures::tensor::FixtureDtype;
use loraplane_agent::lora::Module;
use loraplane_agent::lora::host::{self as lora_host, AdapterLimits};
use loraplane_agent::model::config::{Arch, ModelConfig};
use loraplane_agent::model::tokenizer::TokenizerBundle;
use loraplane_agent::rng::SplitMix64;
use loraplane_agent::structured::ResponseFormat;
use loraplane_proto::v1::{KvChunk, PrefillDone};
use serde_json::{Map, Value, json};

/// Cases per parser in the normal test run.
const CASES: usize = 200;

fn cases() -> usize {
    std::env::var("LORAPLANE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES)
}

fn rng(name: &str) -> SplitMix64 {
    let seed = std::env::var("LORAPLANE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    SplitMix64::for_name(seed, name)
}

/// A byte mutation of `valid`: flipped bytes, a truncation, inserted garbage, a rewritten
/// little-endian length at a random offset, or a duplicated slice.
fn mutate(r: &mut SplitMix64, valid: &[u8]) -> Vec<u8> {
    let mut b = valid.to_vec();
    let len = b.len().max(1);
    match r.below(6) {
        0 => {
            for _ in 0..=r.below(8) {
                let i = r.below(len);
                if let Some(x) = b.get_mut(i) {
                    *x ^= 1 << r.below(8);
                }
            }
        }
        1 => b.truncate(r.below(len)),
        2 => {
            let at = r.below(len);
            let junk: Vec<u8> = (0..r.below(64)).map(|_| r.next_u64() as u8).collect();
            b.splice(at.min(b.len())..at.min(b.len()), junk);
        }
        3 => {
            // A length field: huge, zero, just past the end, or random.
            let at = if r.below(2) == 0 { 0 } else { r.below(len) };
            let v = match r.below(4) {
                0 => u64::MAX,
                1 => 0,
                2 => valid.len() as u64,
                _ => r.next_u64(),
            };
            for (k, byte) in v.to_le_bytes().into_iter().enumerate() {
                if let Some(x) = b.get_mut(at + k) {
                    *x = byte;
                }
            }
        }
        4 => {
            let (a, c) = (r.below(len), r.below(len));
            let (lo, hi) = (a.min(c).min(b.len()), a.max(c).min(b.len()));
            let copy = b[lo..hi].to_vec();
            b.extend_from_slice(&copy);
        }
        _ => {
            // Replace a run of digits (offsets and shapes in a JSON header) with another number.
            if let Some(start) = b.iter().position(|c| c.is_ascii_digit()) {
                let skip = r.below(b.len() - start);
                let start = b[start + skip..]
                    .iter()
                    .position(u8::is_ascii_digit)
                    .map_or(start, |p| start + skip + p);
                let end = b[start..]
                    .iter()
                    .position(|c| !c.is_ascii_digit())
                    .map_or(b.len(), |p| start + p);
                let n = match r.below(3) {
                    0 => u64::MAX.to_string(),
                    1 => "18446744073709551616".to_owned(),
                    _ => (r.next_u64() % 100_000).to_string(),
                };
                b.splice(start..end, n.into_bytes());
            }
        }
    }
    b
}

/// A random JSON value, at most `depth` deep, whose object keys come mostly from `keys`.
fn value(r: &mut SplitMix64, keys: &[&str], depth: usize) -> Value {
    let pick = if depth == 0 { r.below(5) } else { r.below(7) };
    match pick {
        0 => Value::Null,
        1 => Value::Bool(r.below(2) == 0),
        2 => match r.below(6) {
            0 => json!(u64::MAX),
            1 => json!(-1),
            2 => json!(1e300),
            3 => json!(-0.0),
            4 => json!(r.next_u64() % 5000),
            _ => json!(r.next_signed() * 10.0),
        },
        3 => Value::String(string(r)),
        4 => json!(keys.get(r.below(keys.len().max(1))).copied().unwrap_or("")),
        5 => Value::Array((0..r.below(5)).map(|_| value(r, keys, depth - 1)).collect()),
        _ => Value::Object(object(r, keys, depth - 1)),
    }
}

fn object(r: &mut SplitMix64, keys: &[&str], depth: usize) -> Map<String, Value> {
    (0..r.below(keys.len() + 2))
        .map(|_| {
            let k = if r.below(6) == 0 || keys.is_empty() {
                string(r)
            } else {
                keys[r.below(keys.len())].to_owned()
            };
            (k, value(r, keys, depth))
        })
        .collect()
}

fn string(r: &mut SplitMix64) -> String {
    const PARTS: [&str; 10] = [
        "a", "é", "\u{0}", "\n", "../", "q_proj", ".*", "(a+)+$", "\u{202e}", "0",
    ];
    (0..r.below(8))
        .map(|_| PARTS[r.below(PARTS.len())])
        .collect()
}

struct AdapterWorld {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    model: ModelConfig,
    config: Vec<u8>,
    weights: Vec<u8>,
}

fn adapter_world() -> AdapterWorld {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    model::write(
        &ModelSpec {
            arch: Arch::Llama,
            preset: Preset::Tiny,
            dtype: FixtureDtype::F32,
            seed: 3,
            shards: 1,
        },
        &model_dir,
    )
    .unwrap();
    let valid = dir.path().join("valid");
    adapter::write(
        &AdapterSpec {
            rank: 4,
            alpha: 8.0,
            targets: vec![Module::Q, Module::V],
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            rslora: false,
            dtype: FixtureDtype::F32,
            seed: 9,
        },
        &model_dir,
        &valid,
    )
    .unwrap();
    AdapterWorld {
        root: dir.path().to_owned(),
        model: ModelConfig::read(&model_dir).unwrap(),
        config: std::fs::read(valid.join("adapter_config.json")).unwrap(),
        weights: std::fs::read(valid.join("adapter_model.safetensors")).unwrap(),
        _dir: dir,
    }
}

fn load(w: &AdapterWorld, case: usize, config: &[u8], weights: &[u8]) -> bool {
    let dir = w.root.join(format!("case-{case}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
    let limits = AdapterLimits {
        max_rank: 64,
        max_bytes: 1 << 20,
    };
    let ok = lora_host::load(&dir, &w.model, &limits).is_ok();
    std::fs::remove_dir_all(&dir).unwrap();
    ok
}

#[test]
fn adapter_files_never_panic() {
    let w = adapter_world();
    assert!(
        load(&w, 0, &w.config, &w.weights),
        "the valid adapter loads"
    );
    let mut r = rng("adapter");
    let config_keys = [
        "r",
        "lora_alpha",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "peft_type",
        "bias",
        "use_dora",
        "modules_to_save",
        "fan_in_fan_out",
        "layers_to_transform",
        "q_proj",
        "model.layers.0.self_attn.q_proj",
    ];
    let valid_config: Map<String, Value> = serde_json::from_slice(&w.config).unwrap();
    for case in 1..=cases() {
        match r.below(3) {
            // Mutated weights: the safetensors header length, its JSON, offsets and data.
            0 => {
                load(&w, case, &w.config, &mutate(&mut r, &w.weights));
            }
            // Mutated config bytes.
            1 => {
                load(&w, case, &mutate(&mut r, &w.config), &w.weights);
            }
            // Structured config: the valid one with fields replaced by random values.
            _ => {
                let mut c = valid_config.clone();
                c.extend(object(&mut r, &config_keys, 2));
                load(&w, case, &serde_json::to_vec(&c).unwrap(), &w.weights);
            }
        }
    }
}

#[test]
fn kv_chunk_streams_never_panic() {
    let layout = WireLayout {
        num_layers: 2,
        block_size: 4,
        num_kv_heads: 2,
        head_dim: 4,
    };
    let tokens = 10;
    let blocks = layout.blocks_for(tokens);
    let mut r = rng("kv");
    let pick_u32 = |r: &mut SplitMix64, sane: u32| match r.below(4) {
        0 => u32::MAX,
        1 => 0,
        2 => r.next_u64() as u32,
        _ => sane,
    };
    for _ in 0..cases() {
        let mut a = Assembler::new(layout, tokens, 0);
        let mut pushed = 0;
        for _ in 0..r.below(8) {
            let first = r.below(blocks + 1) as u32;
            let n = 1 + r.below(blocks) as u32;
            let sane_len = n as usize * layout.block_elems() * 4;
            let len = match r.below(3) {
                0 => sane_len,
                1 => r.below(2 * sane_len + 8),
                _ => sane_len.saturating_sub(4),
            };
            let data: Vec<u8> = (0..len).map(|_| r.next_u64() as u8).collect();
            let checksum = if r.below(4) == 0 {
                r.next_u64() as u32
            } else {
                crc32fast::hash(&data)
            };
            let layer = r.below(2) as u32;
            let chunk = KvChunk {
                layer: pick_u32(&mut r, layer),
                first_block: pick_u32(&mut r, first),
                num_blocks: pick_u32(&mut r, n),
                num_tokens: pick_u32(&mut r, tokens as u32),
                dtype: if r.below(5) == 0 {
                    r.next_u64() as i32
                } else {
                    0
                },
                byte_length: if r.below(5) == 0 {
                    r.next_u64()
                } else {
                    len as u64
                },
                checksum,
                data,
            };
            pushed += u32::from(a.push(&chunk).is_ok());
        }
        let done = PrefillDone {
            first_token: pick_u32(&mut r, 1),
            first_token_logprob: r.next_signed(),
            prompt_tokens: pick_u32(&mut r, tokens as u32),
            prefill_us: r.next_u64(),
            chunks: pick_u32(&mut r, pushed),
            composed_adapters: pick_u32(&mut r, 8),
        };
        let _ = a.finish(&done, 512);
    }
}

#[test]
fn openai_bodies_never_panic() {
    let keys = [
        "model",
        "prompt",
        "messages",
        "role",
        "content",
        "type",
        "text",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "stream",
        "stream_options",
        "include_usage",
        "stop",
        "stop_token_ids",
        "seed",
        "logprobs",
        "top_logprobs",
        "echo",
        "suffix",
        "best_of",
        "logit_bias",
        "ignore_eos",
        "tools",
        "tool_choice",
        "tool_calls",
        "tool_call_id",
        "parallel_tool_calls",
        "function",
        "arguments",
        "parameters",
        "response_format",
        "json_schema",
        "json_object",
        "schema",
        "name",
        "strict",
        "add_generation_prompt",
        "user",
    ];
    let valid: [&[u8]; 4] = [
        br#"{"model":"m","prompt":"hi","max_tokens":4,"stop":["x"],"stream":true,"stream_options":{"include_usage":true}}"#,
        br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"logprobs":true}"#,
        br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_schema","json_schema":{"name":"p","schema":{"type":"object"},"strict":true}}}"#,
        br#"{"model":"m","messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{"a":1}"}}]},{"role":"tool","tool_call_id":"c","content":"1"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"tool_choice":"required","parallel_tool_calls":false}"#,
    ];
    let mut r = rng("openai");
    for _ in 0..cases() {
        let body = if r.below(2) == 0 {
            let which = r.below(valid.len());
            mutate(&mut r, valid[which])
        } else {
            serde_json::to_vec(&Value::Object(object(&mut r, &keys, 3))).unwrap()
        };
        if let Ok(req) = openai::parse::<CompletionRequest>(&body) {
            let _ = openai::completion_spec(req);
        }
        if let Ok(req) = openai::parse::<ChatRequest>(&body) {
            let _ = openai::chat_spec(req);
        }
    }
}

/// JSON schemas are compiled into grammars (structured outputs): random and mutated schemas
/// compile or are refused with an error, and a compiled one gives a mask and takes a token.
#[test]
fn json_schemas_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    let spec = ModelSpec {
        arch: Arch::Llama,
        preset: Preset::Tiny,
        dtype: FixtureDtype::F32,
        seed: 3,
        shards: 1,
    };
    model::write(&spec, &out).unwrap();
    let config = ModelConfig::read(&out).unwrap();
    let tokenizer = Arc::new(TokenizerBundle::load(&out, &config.eos_token_ids).unwrap());
    let grammars = grammars_for(tokenizer, config.vocab_size);
    let keys = [
        "type",
        "object",
        "string",
        "integer",
        "number",
        "boolean",
        "array",
        "null",
        "properties",
        "required",
        "items",
        "enum",
        "const",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "#/$defs/a",
        "additionalProperties",
        "minItems",
        "maxItems",
        "prefixItems",
        "x-guidance",
        "whitespace_flexible",
        "lenient",
    ];
    let valid: &[u8] = br##"{"type":"object","properties":{"a":{"type":"string","pattern":"[a-z]+","maxLength":4},"b":{"$ref":"#/$defs/n"}},"required":["a"],"$defs":{"n":{"type":"integer","minimum":0,"maximum":9}}}"##;
    let mut r = rng("json-schema");
    for _ in 0..cases() {
        let schema = if r.below(2) == 0 {
            match serde_json::from_slice::<Value>(&mutate(&mut r, valid)) {
                Ok(v) => v,
                Err(_) => continue,
            }
        } else {
            Value::Object(object(&mut r, &keys, 3))
        };
        let format = ResponseFormat::JsonSchema {
            name: "fuzz".into(),
            schema,
            strict: r.below(2) == 0,
        };
        if let Ok(mut c) = grammars.compile(&format)
            && let Ok(mask) = c.mask()
        {
            let allowed = (0..config.vocab_size as u32).find(|t| mask.is_allowed(*t));
            if let Some(t) = allowed {
                assert!(c.advance(t).is_ok(), "an allowed token is taken");
            }
        }
    }
}

fn write_and_load(dir: &Path, name: &str, text: &[u8]) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    if let Ok(specs) = auth::load_tenants_file(&path) {
        let _ = Tenants::new(specs);
    }
}

#[test]
fn tenants_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let keys = [
        "tenants",
        "id",
        "api_key_sha256",
        "limits",
        "max_concurrent_requests",
        "max_tokens_per_minute",
        "max_adapters",
    ];
    let hash = "ab".repeat(32);
    let valid_json = format!(
        r#"{{"tenants":[{{"id":"team-a","api_key_sha256":["{hash}"],"limits":{{"max_concurrent_requests":2,"max_tokens_per_minute":100}}}}]}}"#
    );
    let valid_toml = format!(
        "[[tenants]]\nid = \"team-a\"\napi_key_sha256 = [\"{hash}\"]\n[tenants.limits]\nmax_adapters = 3\n"
    );
    write_and_load(dir.path(), "valid.json", valid_json.as_bytes());
    let mut r = rng("tenants");
    for _ in 0..cases() {
        match r.below(3) {
            0 => write_and_load(
                dir.path(),
                "keys.json",
                &mutate(&mut r, valid_json.as_bytes()),
            ),
            1 => write_and_load(
                dir.path(),
                "keys.toml",
                &mutate(&mut r, valid_toml.as_bytes()),
            ),
            _ => {
                let mut v = object(&mut r, &keys, 3);
                if r.below(2) == 0 {
                    let tenants = (0..r.below(4))
                        .map(|_| Value::Object(object(&mut r, &keys, 2)))
                        .collect();
                    v.insert("tenants".into(), Value::Array(tenants));
                }
                write_and_load(
                    dir.path(),
                    "keys.json",
                    &serde_json::to_vec(&Value::Object(v)).unwrap(),
                );
            }
        }
    }
}
