//! Structured outputs: a request's `response_format` (any JSON object, or a JSON schema) compiled
//! by llguidance into a grammar whose token masks constrain sampling.
//!
//! - [`Grammars`] is built once per tokenizer (lazily, on the first constrained request, through
//!   [`SharedGrammars`]): every token's bytes (llguidance's own `tokenizer.json` reader) in a
//!   token trie padded to the model's vocabulary, and the model's end-of-sequence ids, which the
//!   grammar allows exactly when the output so far is complete.
//! - [`Grammars::compile`] turns a [`ResponseFormat`] into a per-request [`Constraint`], or a
//!   [`GrammarError::InvalidSchema`] naming the problem (the caller's 400). Schemas are enforced
//!   exactly: a keyword llguidance cannot enforce is refused, never ignored, whatever `strict`
//!   says. JSON is generated compact (no free whitespace), so a small model cannot spend its
//!   `max_tokens` on blanks.
//! - A [`Constraint`] yields the mask of the tokens allowed next ([`Constraint::mask`], the
//!   expensive part, which the engine computes while the model runs) and advances by the token
//!   sampled ([`Constraint::advance`]), saying when the grammar is complete.
//!
//! Nothing here knows the engine or the transports: the engine applies masks in its sampler,
//! the serving layer compiles formats and turns errors into 400 / `INVALID_ARGUMENT`.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

/// What the output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object (OpenAI's "JSON mode").
    JsonObject,
    /// A JSON value valid against `schema`.
    JsonSchema {
        name: String,
        schema: Value,
        /// Accepted for OpenAI compatibility; every schema is enforced exactly.
        strict: bool,
    },
}

impl ResponseFormat {
    /// A JSON-schema format whose schema arrives as JSON text (the gRPC surfaces).
    ///
    /// Errors: text that is not a JSON object ([`GrammarError::InvalidSchema`]).
    pub fn json_schema_text(
        name: String,
        schema: &str,
        strict: bool,
    ) -> Result<Self, GrammarError> {
        match serde_json::from_str::<Value>(schema) {
            Ok(schema @ Value::Object(_)) => Ok(ResponseFormat::JsonSchema {
                name,
                schema,
                strict,
            }),
            Ok(_) => Err(GrammarError::InvalidSchema(
                "the schema must be a JSON object".into(),
            )),
            Err(e) => Err(GrammarError::InvalidSchema(format!(
                "the schema is not JSON: {e}"
            ))),
        }
    }

    /// The JSON schema the output must satisfy.
    pub fn schema(&self) -> Value {
        match self {
            ResponseFormat::JsonObject => serde_json::json!({"type": "object"}),
            ResponseFormat::JsonSchema { schema, .. } => schema.clone(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum GrammarError {
    /// The model's tokenizer cannot be described to the grammar engine (a decoder that is
    /// neither byte-level nor byte-fallback), so no request can be constrained.
    #[error("structured outputs are not available for this model: {0}")]
    Unavailable(String),
    /// The schema does not compile: malformed, unsatisfiable, or using a keyword that cannot
    /// be enforced.
    #[error("invalid JSON schema: {0}")]
    InvalidSchema(String),
}

/// Encodes text with the model's own tokenizer (for the grammar engine's canonical
/// tokenization of literal strings).
pub type Encoder = Arc<dyn Fn(&str) -> Vec<u32> + Send + Sync>;

/// The token environment llguidance works over: the trie of token bytes plus the model's
/// tokenizer for text.
struct Vocabulary {
    trie: TokTrie,
    encode: Encoder,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie
            .tokenize_with_greedy_fallback(s, |text| (self.encode)(text))
    }
}

/// The grammar compiler of one tokenizer.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field(
                "vocab_size",
                &self.factory.tok_env().tok_trie().vocab_size(),
            )
            .finish_non_exhaustive()
    }
}

impl Grammars {
    /// Builds the token environment from a `tokenizer.json` document for a model whose logits
    /// have `vocab_size` entries (ids the tokenizer does not define are never allowed).
    ///
    /// Errors: a tokenizer whose token bytes cannot be derived, or more tokens than the model
    /// has logits ([`GrammarError::Unavailable`]).
    pub fn new(
        tokenizer_json: &Value,
        vocab_size: usize,
        eos_ids: &[u32],
        encode: Encoder,
    ) -> Result<Self, GrammarError> {
        let unavailable = |e: String| GrammarError::Unavailable(e);
        let mut words = llguidance::token_bytes_from_tokenizer_json(tokenizer_json)
            .map_err(|e| unavailable(e.to_string()))?;
        if words.len() > vocab_size {
            return Err(unavailable(format!(
                "the tokenizer defines {} tokens but the model has {vocab_size} logits",
                words.len()
            )));
        }
        // Ids without bytes (gaps, the model's padding beyond the tokenizer) become special
        // tokens no grammar can produce.
        words.resize(vocab_size, Vec::new());
        for (id, w) in words.iter_mut().enumerate() {
            if w.is_empty() {
                w.push(TokTrie::SPECIAL_TOKEN_MARKER);
                w.extend_from_slice(format!("<[pad {id}]>").as_bytes());
            }
        }
        let eos: Vec<u32> = eos_ids
            .iter()
            .copied()
            .filter(|&t| (t as usize) < vocab_size)
            .collect();
        // Without an end-of-sequence token only a complete grammar (or max_tokens) ends
        // generation; the trie still needs one, so give it an id no logit maps to.
        let tok_eos = match eos.first() {
            Some(&t) => t,
            None => {
                words.push(vec![TokTrie::SPECIAL_TOKEN_MARKER, b'<', b'>']);
                vocab_size as u32
            }
        };
        let info = TokRxInfo::new(words.len() as u32, tok_eos);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        let env: TokEnv = Arc::new(Vocabulary { trie, encode });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| unavailable(e.to_string()))?;
        // Errors reach the caller as 400s; nothing to print on the agent's stderr.
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// Compiles a response format into a fresh per-request constraint.
    ///
    /// Errors: [`GrammarError::InvalidSchema`] naming the problem.
    pub fn compile(&self, format: &ResponseFormat) -> Result<Constraint, GrammarError> {
        let mut schema = format.schema();
        if !schema.is_object() {
            return Err(GrammarError::InvalidSchema(
                "the schema must be a JSON object".into(),
            ));
        }
        with_options(&mut schema)?;
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| GrammarError::InvalidSchema(first_line(&e.to_string())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::InvalidSchema(first_line(&e)));
        }
        Ok(Constraint {
            format: Arc::new(format.clone()),
            matcher,
            vocab_size: self.factory.tok_env().tok_trie().vocab_size(),
        })
    }
}

/// Our compile options (compact JSON, nothing ignored), under whatever `x-guidance` options the
/// schema itself carries.
fn with_options(schema: &mut Value) -> Result<(), GrammarError> {
    let ours = JsonCompileOptions {
        whitespace_flexible: false,
        lenient: false,
        ..JsonCompileOptions::default()
    };
    let mut options = serde_json::to_value(&ours)
        .map_err(|e| GrammarError::InvalidSchema(format!("compile options: {e}")))?;
    if let Some(theirs) = schema.get("x-guidance") {
        if !theirs.is_object() {
            return Err(GrammarError::InvalidSchema(
                "x-guidance must be an object".into(),
            ));
        }
        llguidance::json_merge(&mut options, theirs);
    }
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("x-guidance".into(), options);
    }
    Ok(())
}

/// llguidance appends the grammar and parser state to some errors; the first line is the
/// message a caller can act on.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_owned()
}

/// One request's grammar state.
#[derive(Clone)]
pub struct Constraint {
    format: Arc<ResponseFormat>,
    matcher: Matcher,
    vocab_size: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("format", &self.format)
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

/// The tokens a constrained sequence may sample next.
#[derive(Debug, Clone)]
pub struct TokenMask(SimpleVob);

impl TokenMask {
    /// Sets every disallowed logit to `-inf`.
    pub fn apply(&self, logits: &mut [f32]) {
        for (id, x) in logits.iter_mut().enumerate() {
            if !self.0.is_allowed(id as TokenId) {
                *x = f32::NEG_INFINITY;
            }
        }
    }

    pub fn is_allowed(&self, token: u32) -> bool {
        self.0.is_allowed(token)
    }

    /// Number of allowed tokens.
    pub fn allowed(&self) -> usize {
        self.0.num_set()
    }
}

impl Constraint {
    /// The format it enforces (what a prefill peer is told).
    pub fn format(&self) -> &ResponseFormat {
        &self.format
    }

    /// The tokens allowed next. Takes from microseconds to about a millisecond per token for
    /// large vocabularies, so the engine computes it beside the model's forward pass.
    ///
    /// Errors: the grammar is in an error state (a broken invariant, reported with the
    /// request).
    pub fn mask(&mut self) -> Result<TokenMask, String> {
        let mask = self
            .matcher
            .compute_mask()
            .map_err(|e| first_line(&e.to_string()))?;
        if mask.num_set() == 0 {
            return Err("the grammar allows no token here".into());
        }
        Ok(TokenMask(mask))
    }

    /// Advances by a sampled (or received) token. Returns `true` when the output is complete:
    /// the grammar can take nothing more, or `token` was an end-of-sequence token it allowed.
    ///
    /// Errors: a token the grammar does not allow here.
    pub fn advance(&mut self, token: u32) -> Result<bool, String> {
        if token as usize >= self.vocab_size {
            return Err(format!("token {token} is outside the vocabulary"));
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| first_line(&e.to_string()))?;
        Ok(self.matcher.is_stopped())
    }
}

/// A [`Grammars`] built on first use: building one walks the whole vocabulary, which an agent
/// that never receives a constrained request should not pay for at start-up.
pub struct SharedGrammars {
    cell: OnceLock<Result<Grammars, GrammarError>>,
    build: Box<dyn Fn() -> Result<Grammars, GrammarError> + Send + Sync>,
}

impl std::fmt::Debug for SharedGrammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedGrammars")
            .field("built", &self.cell.get().is_some())
            .finish_non_exhaustive()
    }
}

impl SharedGrammars {
    pub fn new(build: impl Fn() -> Result<Grammars, GrammarError> + Send + Sync + 'static) -> Self {
        SharedGrammars {
            cell: OnceLock::new(),
            build: Box::new(build),
        }
    }

    /// Compiles `format`, building the vocabulary first if this is the first request. Blocks
    /// (run it off the async executor).
    ///
    /// Errors: as [`Grammars::new`] and [`Grammars::compile`].
    pub fn compile(&self, format: &ResponseFormat) -> Result<Constraint, GrammarError> {
        match self.cell.get_or_init(|| (self.build)()) {
            Ok(g) => g.compile(format),
            Err(e) => Err(e.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: the 256 bytes (GPT-2's byte-to-unicode spelling), `{"`, `":`,
    /// and an EOS special token.
    fn grammars() -> Grammars {
        let mut vocab = serde_json::Map::new();
        let mut next = 0usize;
        let mut k = 0x100u32;
        for b in 0..=255u8 {
            let c = b as char;
            let self_mapped =
                matches!(c, '!'..='~' | '\u{00A1}'..='\u{00AC}' | '\u{00AE}'..='\u{00FF}');
            let ch = if self_mapped {
                c
            } else {
                let ch = char::from_u32(k).unwrap_or('?');
                k += 1;
                ch
            };
            vocab.insert(ch.to_string(), next.into());
            next += 1;
        }
        vocab.insert("{\"".into(), next.into());
        vocab.insert("\":".into(), (next + 1).into());
        let eos = next + 2;
        let json = serde_json::json!({
            "added_tokens": [{"id": eos, "content": "</s>", "special": true}],
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab},
        });
        let encode: Encoder = Arc::new(|s: &str| s.bytes().map(u32::from).collect());
        // Four padding ids beyond the tokenizer: never allowed.
        Grammars::new(&json, eos + 5, &[eos as u32], encode).unwrap()
    }

    fn greedy(c: &mut Constraint, prefer: &[u8]) -> Vec<u8> {
        // Always takes the first allowed byte of `prefer`, else the lowest allowed id: a
        // stand-in for a model that does not know JSON.
        let mut out = Vec::new();
        for step in 0..200 {
            let mask = c.mask().unwrap();
            let pick = prefer
                .iter()
                .map(|b| u32::from(*b))
                .chain(0..260)
                .find(|t| mask.is_allowed(*t))
                .unwrap();
            if c.advance(pick).unwrap() {
                if pick < 256 {
                    out.push(pick as u8);
                }
                return out;
            }
            out.push(pick as u8);
            assert!(step < 199, "the grammar never completed: {out:?}");
        }
        out
    }

    #[test]
    fn a_schema_constrains_every_token_and_completes() {
        let g = grammars();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["n"],
            "additionalProperties": false,
        });
        let format = ResponseFormat::JsonSchema {
            name: "n".into(),
            schema,
            strict: true,
        };
        let mut c = g.compile(&format).unwrap();
        let mask = c.mask().unwrap();
        assert!(mask.is_allowed(u32::from(b'{')));
        assert!(
            !mask.is_allowed(u32::from(b' ')),
            "compact JSON: no whitespace"
        );
        assert!(!mask.is_allowed(258), "EOS before the object is complete");
        assert!(!mask.is_allowed(260), "padding ids are never allowed");
        let out = greedy(&mut c, b"");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert!(v["n"].as_u64().unwrap() <= 99, "{v}");
        // The masked logits: only allowed tokens stay finite.
        let mut c = g.compile(&format).unwrap();
        let mut logits = vec![1.0f32; 261];
        let mask = c.mask().unwrap();
        mask.apply(&mut logits);
        assert!(logits[usize::from(b'{')].is_finite());
        for (id, x) in logits.iter().enumerate() {
            assert_eq!(x.is_finite(), mask.is_allowed(id as u32), "token {id}");
        }
        assert!(c.advance(u32::from(b'x')).is_err(), "a disallowed token");
    }

    #[test]
    fn json_object_mode_gives_an_object() {
        let g = grammars();
        let mut c = g.compile(&ResponseFormat::JsonObject).unwrap();
        let out = greedy(&mut c, b"{}");
        assert_eq!(out, b"{}");
    }

    #[test]
    fn invalid_schemas_name_the_problem() {
        let g = grammars();
        let bad = |schema: Value| {
            g.compile(&ResponseFormat::JsonSchema {
                name: "x".into(),
                schema,
                strict: false,
            })
            .unwrap_err()
            .to_string()
        };
        assert!(bad(serde_json::json!({"type": "objekt"})).contains("objekt"));
        assert!(bad(serde_json::json!(["not", "an", "object"])).contains("JSON object"));
        let e = bad(serde_json::json!({"type": "integer", "minimum": 5, "maximum": 1}));
        assert!(e.starts_with("invalid JSON schema"), "{e}");
    }
}
