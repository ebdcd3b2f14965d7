//! The model's tokenizer (`tokenizer.json`), chat template (`tokenizer_config.json`, rendered
//! with minijinja) and end-of-sequence ids (`generation_config.json`, `config.json`), plus the
//! incremental detokenizer that turns a growing token list into clean text deltas.
//!
//! The template sees what Hugging Face's `apply_chat_template` gives it: `messages` (with
//! `tool_calls` on assistant turns and `tool_call_id` on tool results when a request has them),
//! `tools` (the OpenAI function list, or none), `add_generation_prompt`, `bos_token` and
//! `eos_token`.

use std::path::Path;

use serde::Serialize;
use tokenizers::Tokenizer;

use crate::model::ModelError;

/// One chat message.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, OpenAI's shape with each `function.arguments` parsed to JSON
    /// (what tool-aware templates print with `tojson`, as vLLM passes them). Left out of the
    /// template's message when absent, so `message.tool_calls is defined` means something.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool result's call id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A plain text message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            ..ChatMessage::default()
        }
    }
}

/// Tokenizer plus the metadata needed to build prompts and stop generation.
#[derive(Debug)]
pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every id that ends generation (unless a request ignores EOS).
    pub eos_ids: Vec<u32>,
    /// The chat template reads `tools` ([`TokenizerBundle::supports_tools`]): found once at
    /// load, not per request.
    tools: bool,
}

fn tok_err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Tokenizer {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, ModelError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| tok_err(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModelError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A token in `tokenizer_config.json` is a string or `{"content": …}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// A minijinja environment holding `template` as `chat`, with Hugging Face's
/// `raise_exception`.
fn template_env(template: &str) -> Result<minijinja::Environment<'_>, String> {
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| format!("chat template: {e}"))?;
    Ok(env)
}

fn ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl TokenizerBundle {
    /// Loads the tokenizer files of a checkpoint directory; `config_eos` are `config.json`'s ids.
    pub fn load(dir: &Path, config_eos: &[u32]) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(tok_err(&path, "missing tokenizer.json"));
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| tok_err(&path, e.to_string()))?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?;
        let gc = read_json(&dir.join("generation_config.json"))?;
        let chat_template = tc.as_ref().and_then(|tc| match tc.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: use "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => None,
        });
        let bos_token = token_string(tc.as_ref().and_then(|t| t.get("bos_token")));
        let eos_token = token_string(tc.as_ref().and_then(|t| t.get("eos_token")));
        let mut eos_ids = ids(gc.as_ref().and_then(|g| g.get("eos_token_id")));
        eos_ids.extend_from_slice(config_eos);
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(TokenizerBundle {
            tools: reads_tools(chat_template.as_deref()),
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            eos_ids,
        })
    }

    /// Encodes text; `special` adds the tokenizer's special tokens (e.g. BOS).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizing: {e}"))
    }

    /// Renders the chat template without tools. Errors name the template problem (a model
    /// without a template, a template that raises, a syntax error).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        self.render_chat_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders the chat template with `tools` in its context (none when `None`, as
    /// `apply_chat_template(tools=None)` does). Whether the template looks at them is
    /// [`TokenizerBundle::supports_tools`]'s question, not this one's.
    ///
    /// Errors: as [`TokenizerBundle::render_chat`].
    pub fn render_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or("the model has no chat template")?;
        let env = template_env(template)?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| format!("chat template: {e}"))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| format!("chat template: {e}"))
    }

    /// Whether the chat template reads a `tools` variable from its context: minijinja's
    /// static analysis of the template's undeclared variables, so `tools` in a string or a
    /// comment, or a variable the template sets itself, does not count. This is the rule for
    /// accepting an OpenAI request's `tools`: a template that never reads them would drop them
    /// from the prompt without a word.
    pub fn supports_tools(&self) -> bool {
        self.tools
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }
}

/// Whether `template` reads a `tools` variable from its context (the rule of
/// [`TokenizerBundle::supports_tools`]); a template that does not parse does not.
fn reads_tools(template: Option<&str>) -> bool {
    let Some(template) = template else {
        return false;
    };
    template_env(template)
        .and_then(|env| {
            env.get_template("chat")
                .map(|t| t.undeclared_variables(false).contains("tools"))
                .map_err(|e| e.to_string())
        })
        .unwrap_or(false)
}

/// Turns a growing list of generated ids into text deltas without splitting multi-byte
/// characters or byte-level merges (the prefix/read-offset technique of TGI and vLLM).
#[derive(Debug, Default, Clone)]
pub struct Detokenizer {
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// The new text after `ids` grew by one or more tokens (possibly empty while a character is
    /// incomplete).
    pub fn next(&mut self, tok: &TokenizerBundle, ids: &[u32]) -> String {
        let prefix = tok.decode(&ids[self.prefix_offset..self.read_offset]);
        let full = tok.decode(&ids[self.prefix_offset..]);
        if full.len() > prefix.len()
            && !full.ends_with('\u{fffd}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
            delta
        } else {
            String::new()
        }
    }

    /// Whatever is still held back at the end of generation.
    pub fn flush(&mut self, tok: &TokenizerBundle, ids: &[u32]) -> String {
        let read = self.read_offset.min(ids.len());
        let start = self.prefix_offset.min(read);
        let prefix = tok.decode(&ids[start..read]);
        let full = tok.decode(&ids[start..]);
        self.prefix_offset = ids.len();
        self.read_offset = ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            full[prefix.len()..].to_owned()
        } else {
            String::new()
        }
    }
}

/// What tests of chat templates render (here and in `fixtures`, whose tool templates they
/// check).
#[cfg(test)]
pub(crate) mod samples {
    use serde_json::json;

    use super::{ChatMessage, Tokenizer, TokenizerBundle};

    impl TokenizerBundle {
        /// A bundle for rendering `template` only: its tokenizer is never used.
        pub(crate) fn with_template(template: Option<&str>) -> Self {
            TokenizerBundle {
                tokenizer: Tokenizer::new(tokenizers::models::wordlevel::WordLevel::default()),
                chat_template: template.map(str::to_owned),
                bos_token: Some("<s>".into()),
                eos_token: None,
                eos_ids: Vec::new(),
                tools: super::reads_tools(template),
            }
        }
    }

    pub(crate) fn weather() -> serde_json::Value {
        json!({"type": "function", "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }})
    }

    /// A whole tool round: the tools in the system turn, the assistant's call, the result.
    pub(crate) fn round() -> Vec<ChatMessage> {
        let call = json!({"id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": {"city": "Paris"}}});
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Weather in Paris?"),
            ChatMessage {
                tool_calls: Some(vec![call]),
                ..ChatMessage::new("assistant", "")
            },
            ChatMessage {
                tool_call_id: Some("call_1".into()),
                ..ChatMessage::new("tool", "18C")
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::samples::round;
    use super::*;

    fn bundle(template: Option<&str>) -> TokenizerBundle {
        TokenizerBundle::with_template(template)
    }

    #[test]
    fn tool_support_is_the_template_reading_tools() {
        // The fixtures' tool templates: `fixtures::tests`.
        assert!(bundle(Some("{% if tools %}{{ tools | length }}{% endif %}")).supports_tools());
        for template in [
            None,
            Some("{{ messages[0].content }}"),
            // Mentioned, never read from the context.
            Some("{# tools #}{{ 'tools' }}{{ messages.tools }}"),
            Some("{% set tools = [] %}{{ tools }}"),
            // Does not parse: no support, and rendering names the syntax error.
            Some("{% if tools %}"),
        ] {
            assert!(!bundle(template).supports_tools(), "{template:?}");
        }
    }

    #[test]
    fn a_template_without_tools_renders_as_before() {
        // `tools` is none in the context (as with Hugging Face), so a template that tests it
        // takes its plain branch, and one that never mentions it is unaffected.
        let b = bundle(Some(
            "{% if tools is none %}plain{% endif %}{{ messages[0].content }}",
        ));
        assert_eq!(b.render_chat(&round(), false).unwrap(), "plainBe brief.");
        assert_eq!(
            bundle(None).render_chat(&round(), false).unwrap_err(),
            "the model has no chat template"
        );
    }
}
