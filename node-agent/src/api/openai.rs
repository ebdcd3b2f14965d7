//! OpenAI-compatible request and response shapes for `/v1/completions` and
//! `/v1/chat/completions`, decoded strictly (wrong types are 400s naming the field) and
//! translated to the serving core's [`GenerateSpec`].
//!
//! Supported: one prompt (a string, a one-element list, or token ids), `max_tokens` /
//! `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `n` up to the configured
//! maximum (1), `stream` with `stream_options.include_usage`, the sampled token's log-probability
//! (`logprobs: 0` for completions, `logprobs: true` for chat), and vLLM's extras `top_k`,
//! `ignore_eos`, `stop_token_ids`, `add_generation_prompt`, structured outputs
//! (`response_format`: `json_object` or `json_schema`, on both endpoints), and tool calling
//! (`tools`, `tool_choice`, `parallel_tool_calls`; `api/tools.rs`). Anything that would change
//! the output and is not implemented (`echo`, `suffix`, `best_of > 1`, penalties, `logit_bias`,
//! `top_logprobs`) is refused with a 400 rather than silently ignored.
//! Unknown fields are ignored, as OpenAI does.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::error::ApiError;
use crate::api::service::{GenerateSpec, Prompt, Sampling};
use crate::engine::{AdapterUse, FinishReason, Usage};
use crate::model::tokenizer::ChatMessage;
use crate::structured::ResponseFormat;

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// vLLM extras.
    pub top_k: Option<i64>,
    pub ignore_eos: Option<bool>,
    pub stop_token_ids: Option<Vec<u32>>,
    /// Partitions the prefix cache within the tenant (vLLM's field).
    pub cache_salt: Option<String>,
    /// Structured outputs (chat in OpenAI's API; completions too, as vLLM accepts it).
    pub response_format: Option<Value>,
    /// loraplane's extension: adapters composed over the base model `model` names, each with
    /// its scale.
    pub adapters: Option<Vec<AdapterField>>,
}

/// One entry of the `adapters` extension field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterField {
    pub name: String,
    /// Defaults to 1 (the adapter as trained).
    #[serde(default = "full_scale")]
    pub scale: f32,
}

fn full_scale() -> f32 {
    1.0
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: Common,
    pub prompt: Value,
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<u64>,
}

/// Chat message content: a string or a list of text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant turn's calls (OpenAI's shape).
    pub tool_calls: Option<Vec<Value>>,
    /// A tool result's call.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    pub messages: Vec<Message>,
    pub max_completion_tokens: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub add_generation_prompt: Option<bool>,
}

/// How the response should be shaped, beside what to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    /// Whether and how tool calls are read out of a chat output.
    pub tools: crate::api::tools::ToolMode,
}

/// Parses a JSON body, turning serde's message (which names the field and position) into a
/// 400.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidArgument {
        param: None,
        message: format!("invalid JSON body: {e}"),
    })
}

fn unsupported(param: &'static str, what: &str) -> ApiError {
    ApiError::invalid(param, format!("{what} is not supported"))
}

/// OpenAI's `response_format`: `{"type": "text"}` (free text), `{"type": "json_object"}`, or
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`.
///
/// Errors: a 400 naming what is malformed (the schema itself is checked when it compiles).
pub fn response_format(v: Option<Value>) -> Result<Option<ResponseFormat>, ApiError> {
    let bad = |m: &str| ApiError::invalid("response_format", m.to_owned());
    let Some(v) = v else { return Ok(None) };
    let Value::Object(mut o) = v else {
        return Err(bad("response_format must be an object with a type"));
    };
    match o.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => {
            let Some(Value::Object(mut js)) = o.remove("json_schema") else {
                return Err(bad(
                    "response_format.json_schema must be an object with a name and a schema",
                ));
            };
            let name = match js.remove("name") {
                None => String::new(),
                Some(Value::String(n)) => n,
                Some(_) => return Err(bad("response_format.json_schema.name must be a string")),
            };
            let strict = match js.remove("strict") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(_) => return Err(bad("response_format.json_schema.strict must be a boolean")),
            };
            let schema = match js.remove("schema") {
                Some(schema @ Value::Object(_)) => schema,
                Some(_) => return Err(bad("response_format.json_schema.schema must be an object")),
                None => return Err(bad("response_format.json_schema.schema is required")),
            };
            Ok(Some(ResponseFormat::JsonSchema {
                name,
                schema,
                strict,
            }))
        }
        _ => Err(bad(
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

/// The spec for `prompt` from the fields both endpoints share.
fn common(c: Common, prompt: Prompt) -> Result<(GenerateSpec, Shape), ApiError> {
    let cache_salt = crate::api::service::cache_salt(c.cache_salt)?;
    // One choice per request: n > 1 would need parallel sampling over a shared prompt,
    // which the engine does not do; send n requests (with different seeds) instead.
    match c.n.unwrap_or(1) {
        1 => {}
        0 => return Err(ApiError::invalid("n", "n must be 1")),
        _ => {
            return Err(ApiError::invalid(
                "n",
                "n > 1 is not supported: one choice per request; send n requests instead",
            ));
        }
    }
    for (param, v) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(unsupported(param, param));
        }
    }
    if c.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(unsupported("logit_bias", "logit_bias"));
    }
    let seed = match c.seed {
        Some(s) if s < 0 => return Err(ApiError::invalid("seed", "seed must not be negative")),
        s => s.map(|s| s as u64),
    };
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k < 0 => {
            return Err(ApiError::invalid(
                "top_k",
                "top_k must be -1 (off) or positive",
            ));
        }
        Some(k) => {
            Some(u32::try_from(k).map_err(|_| ApiError::invalid("top_k", "top_k is too large"))?)
        }
    };
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let stream = c.stream.unwrap_or(false);
    let include_usage = c
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let sampling = Sampling {
        temperature: c.temperature,
        top_k,
        top_p: c.top_p.filter(|p| *p != 1.0),
        seed,
        max_tokens: c.max_tokens,
        stop,
        stop_token_ids: c.stop_token_ids.unwrap_or_default(),
        ignore_eos: c.ignore_eos.unwrap_or(false),
        logprobs: false,
    };
    let shape = Shape {
        stream,
        include_usage: stream && include_usage,
        logprobs: false,
        tools: crate::api::tools::ToolMode::Off,
    };
    let spec = GenerateSpec {
        model: c.model,
        prompt,
        sampling,
        cache_salt,
        response_format: response_format(c.response_format)?,
        adapters: c.adapters.map(|list| {
            list.into_iter()
                .map(|a| AdapterUse {
                    name: a.name,
                    scale: a.scale,
                })
                .collect()
        }),
    };
    Ok((spec, shape))
}

/// `/v1/completions` → the serving core's request.
///
/// Errors: a 400 naming the field for anything malformed or unsupported.
pub fn completion_spec(req: CompletionRequest) -> Result<(GenerateSpec, Shape), ApiError> {
    if req.echo == Some(true) {
        return Err(unsupported("echo", "echo"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "suffix"));
    }
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(unsupported("best_of", "best_of above 1"));
    }
    let logprobs = match req.logprobs {
        None => false,
        Some(0) => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "logprobs",
                "only logprobs=0 (the sampled token's log-probability) is supported",
            ));
        }
    };
    let prompt = completion_prompt(req.prompt)?;
    let (mut spec, mut shape) = common(req.common, prompt)?;
    spec.sampling.logprobs = logprobs;
    shape.logprobs = logprobs;
    Ok((spec, shape))
}

fn completion_prompt(v: Value) -> Result<Prompt, ApiError> {
    let one = "exactly one prompt per request is supported";
    let text = |text: String| Prompt::Text {
        text,
        add_special_tokens: true,
    };
    let ids = |items: &[Value]| -> Option<Vec<u32>> {
        items
            .iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    match v {
        Value::String(s) => Ok(text(s)),
        Value::Array(items) => match items.as_slice() {
            [] => Err(ApiError::invalid("prompt", "the prompt is empty")),
            [Value::String(_)] => match items.into_iter().next() {
                Some(Value::String(s)) => Ok(text(s)),
                _ => Err(ApiError::invalid("prompt", one)),
            },
            [Value::Array(inner)] => ids(inner).map(Prompt::Tokens).ok_or_else(|| {
                ApiError::invalid("prompt", "token ids must be integers in 0..2^32")
            }),
            [Value::Number(_), ..] => ids(&items).map(Prompt::Tokens).ok_or_else(|| {
                ApiError::invalid("prompt", "token ids must be integers in 0..2^32")
            }),
            [Value::String(_) | Value::Array(_), ..] => Err(ApiError::invalid("prompt", one)),
            _ => Err(ApiError::invalid(
                "prompt",
                "prompt must be a string, a list of one string, or token ids",
            )),
        },
        _ => Err(ApiError::invalid(
            "prompt",
            "prompt must be a string, a list of one string, or token ids",
        )),
    }
}

/// `/v1/chat/completions` → the serving core's request.
///
/// Errors: a 400 naming the field for anything malformed or unsupported.
pub fn chat_spec(req: ChatRequest) -> Result<(GenerateSpec, Shape), ApiError> {
    let mut plan = crate::api::tools::plan(req.tools, req.tool_choice, req.parallel_tool_calls)?;
    if req.top_logprobs.is_some_and(|n| n > 0) {
        return Err(unsupported("top_logprobs", "top_logprobs above 0"));
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in req.messages {
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant" | "tool"
        ) {
            return Err(ApiError::invalid(
                "messages",
                "message roles are system, developer, user, assistant or tool",
            ));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        _ => return Err(unsupported("messages", "non-text message content")),
                    }
                }
                text
            }
        };
        let tool_calls = crate::api::tools::template_calls(&m.role, m.tool_calls)?;
        let role = if m.role == "developer" {
            "system".to_owned()
        } else {
            m.role
        };
        messages.push(ChatMessage {
            role,
            content,
            tool_calls,
            tool_call_id: m.tool_call_id,
        });
    }
    let mut common_fields = req.common;
    if common_fields.max_tokens.is_none() {
        common_fields.max_tokens = req.max_completion_tokens;
    }
    let prompt = Prompt::Chat {
        messages,
        add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
        tools: plan.tools.take(),
    };
    let (mut spec, mut shape) = common(common_fields, prompt)?;
    let logprobs = req.logprobs.unwrap_or(false);
    spec.sampling.logprobs = logprobs;
    shape.logprobs = logprobs;
    plan.apply(&mut spec, &mut shape)?;
    Ok((spec, shape))
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "abort",
        FinishReason::Error => "error",
    }
}

pub fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

/// The sampled tokens' log-probabilities: `(token text, logprob)` per token.
pub type TokenLogprobs = Vec<(String, f32)>;

/// Completions' `logprobs` object. `text_offset` counts characters (Unicode scalar values,
/// as OpenAI's Python-side offsets do), not bytes; `offset` is the characters before the first
/// item.
pub fn completion_logprobs(items: &TokenLogprobs, offset: usize) -> Value {
    let mut at = offset;
    let mut offsets = Vec::with_capacity(items.len());
    for (t, _) in items {
        offsets.push(at);
        at += t.chars().count();
    }
    json!({
        "tokens": items.iter().map(|(t, _)| t).collect::<Vec<_>>(),
        "token_logprobs": items.iter().map(|(_, l)| l).collect::<Vec<_>>(),
        "top_logprobs": null,
        "text_offset": offsets,
    })
}

/// Chat's `logprobs` object.
pub fn chat_logprobs(items: &TokenLogprobs) -> Value {
    json!({
        "content": items.iter().map(|(t, l)| json!({
            "token": t,
            "logprob": l,
            "bytes": t.as_bytes(),
            "top_logprobs": [],
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_prompts() {
        let p = |v: Value| completion_prompt(v);
        assert!(matches!(p(json!("hi")), Ok(Prompt::Text { .. })));
        assert!(matches!(p(json!(["hi"])), Ok(Prompt::Text { .. })));
        assert_eq!(p(json!([1, 2])).unwrap(), Prompt::Tokens(vec![1, 2]));
        assert_eq!(p(json!([[3]])).unwrap(), Prompt::Tokens(vec![3]));
        assert!(p(json!(["a", "b"])).is_err());
        assert!(p(json!([1, -2])).is_err());
        assert!(p(json!([5_000_000_000u64])).is_err());
        assert!(p(json!({"x": 1})).is_err());
        assert!(p(json!([])).is_err());
    }

    #[test]
    fn strict_decoding_names_the_field() {
        let e = parse::<CompletionRequest>(br#"{"model":"m","prompt":"x","max_tokens":"ten"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
        assert!(
            parse::<CompletionRequest>(br#"{"model":"m","prompt":"x","max_tokens":1e30}"#).is_err()
        );
        assert!(
            parse::<ChatRequest>(
                b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}"
            )
            .is_err()
        );
        let req = parse::<CompletionRequest>(br#"{"model":"m","prompt":"x","n":2}"#).unwrap();
        assert!(matches!(
            completion_spec(req),
            Err(ApiError::InvalidArgument {
                param: Some("n"),
                ..
            })
        ));
    }

    #[test]
    fn response_formats() {
        let f = |v: Value| response_format(Some(v));
        assert_eq!(response_format(None).unwrap(), None);
        assert_eq!(f(json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            f(json!({"type": "json_object"})).unwrap(),
            Some(ResponseFormat::JsonObject)
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            f(json!({"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": true}}))
                .unwrap(),
            Some(ResponseFormat::JsonSchema {
                name: "n".into(),
                schema,
                strict: true
            })
        );
        for bad in [
            json!("json_object"),
            json!({"type": "yaml"}),
            json!({"type": "json_schema"}),
            json!({"type": "json_schema", "json_schema": {"name": "n"}}),
            json!({"type": "json_schema", "json_schema": {"schema": [1]}}),
            json!({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}),
        ] {
            let e = f(bad.clone()).unwrap_err();
            assert!(
                matches!(
                    e,
                    ApiError::InvalidArgument {
                        param: Some("response_format"),
                        ..
                    }
                ),
                "{bad}: {e}"
            );
        }
        // Both endpoints carry it.
        let req = parse::<CompletionRequest>(
            br#"{"model":"m","prompt":"x","response_format":{"type":"json_object"}}"#,
        )
        .unwrap();
        let (spec, _) = completion_spec(req).unwrap();
        assert_eq!(spec.response_format, Some(ResponseFormat::JsonObject));
        let req = parse::<ChatRequest>(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"tool_choice":"required"}"#,
        )
        .unwrap();
        assert!(chat_spec(req).is_err());
    }

    #[test]
    fn chat_fields_map_onto_the_spec() {
        let req = parse::<ChatRequest>(
            br#"{"model":"a","messages":[{"role":"developer","content":[{"type":"text","text":"be brief"}]},{"role":"user","content":"hi"}],
                "max_completion_tokens":5,"stream":true,"stream_options":{"include_usage":true},"stop":"x","top_k":-1,"seed":3}"#,
        )
        .unwrap();
        let (spec, shape) = chat_spec(req).unwrap();
        assert_eq!(spec.model, "a");
        assert_eq!(spec.sampling.max_tokens, Some(5));
        assert_eq!(spec.sampling.stop, vec!["x".to_owned()]);
        assert_eq!((spec.sampling.top_k, spec.sampling.seed), (None, Some(3)));
        assert!(shape.stream && shape.include_usage && !shape.logprobs);
        match spec.prompt {
            Prompt::Chat {
                messages,
                add_generation_prompt,
                ..
            } => {
                assert!(add_generation_prompt);
                assert_eq!(messages[0].role, "system");
                assert_eq!(messages[0].content, "be brief");
            }
            other => panic!("{other:?}"),
        }
    }
}
