//! Workload files of `bench serving` (TOML, or JSON for `.json`; the format is documented in
//! `bench/workloads/README.md`) and their expansion into concrete requests.
//!
//! A workload says how many requests, which adapters (names, and the ranks and target modules
//! of the fixtures `--serve` creates for them), prompt and output lengths, the arrival process
//! (all at once, or Poisson at a rate), adapter popularity (uniform: adapter `i mod n`; or a
//! power law), the client's concurrency limit and a seed. Expansion reuses the `adapters` and
//! `pd` suites' generator ([`sim::generate`]), so a workload file and `--zipf-alpha` draw the
//! same way.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use loraplane_agent::lora::Module;

use crate::suites::sim::{self, WorkloadSpec};

/// A length: one value, or `[min, max]` drawn uniformly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Length {
    Fixed(usize),
    Range([usize; 2]),
}

impl Length {
    fn range(self) -> (usize, usize) {
        match self {
            Length::Fixed(n) => (n, n),
            Length::Range([lo, hi]) => (lo, hi),
        }
    }
}

/// When requests are sent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Arrival {
    /// Every request at time 0 (a closed batch).
    AllAtOnce,
    /// Exponential gaps at `rate` requests per second.
    Poisson { rate: f64 },
}

/// How often each adapter is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Popularity {
    /// Request `i` uses adapter `i mod count`: every adapter gets the same share.
    Uniform,
    /// Seeded draws where the k-th adapter (from 1) has weight 1/k^alpha (Zipf).
    PowerLaw { alpha: f64 },
}

/// How prompts are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptFormat {
    /// `prompt` as a list of token ids (OpenAI's completions API, vLLM, llama.cpp's server and
    /// loraplane accept it): exact lengths, no tokenizer on the client.
    TokenIds,
    /// `prompt` as text built so the model's tokenizer maps it to exactly the prompt length
    /// (special tokens the server adds included), for servers that only take strings.
    Text,
}

/// The workload's adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adapters {
    /// How many (0: every request goes to the base model).
    pub count: usize,
    /// Names on the server; default `lora-0` … `lora-{count-1}`.
    #[serde(default)]
    pub names: Vec<String>,
    /// Ranks of the fixtures `--serve` creates, cycled over the adapters (also the roofline's
    /// LoRA arithmetic).
    #[serde(default = "default_ranks")]
    pub ranks: Vec<usize>,
    /// Target modules of those fixtures.
    #[serde(default = "default_targets")]
    pub targets: Vec<Module>,
    #[serde(default = "default_popularity")]
    pub popularity: Popularity,
}

fn default_ranks() -> Vec<usize> {
    vec![8, 16, 32, 64]
}

fn default_targets() -> Vec<Module> {
    Module::ALL.to_vec()
}

fn default_popularity() -> Popularity {
    Popularity::Uniform
}

fn default_base_model() -> String {
    "model".to_owned()
}

fn default_true() -> bool {
    true
}

/// A workload file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub requests: usize,
    /// Most requests in flight at once on the client.
    pub concurrency: usize,
    pub prompt_tokens: Length,
    pub output_tokens: Length,
    pub arrival: Arrival,
    pub adapters: Adapters,
    /// Seed of prompts, lengths, popularity draws and arrival gaps.
    #[serde(default)]
    pub seed: u64,
    /// Sampling temperature (0: greedy).
    #[serde(default)]
    pub temperature: f64,
    /// Send vLLM's `ignore_eos` so every request produces exactly its output length
    /// (servers that do not know the field ignore it, as OpenAI's API does).
    #[serde(default = "default_true")]
    pub ignore_eos: bool,
    /// Ask for the sampled tokens' log-probabilities (`logprobs: 0`), saved with the outputs.
    #[serde(default)]
    pub logprobs: bool,
    #[serde(default = "default_prompt_format")]
    pub prompt_format: PromptFormat,
    /// The `model` of requests when there are no adapters (the base model's served name).
    #[serde(default = "default_base_model")]
    pub base_model: String,
    /// Prompt token ids are drawn from `[0, vocab_size - 16)`; default: the fixture model's
    /// vocabulary (set it when driving a server that runs another model).
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// Tokens of a system prompt every request of one adapter (or of the base model) starts
    /// with, before its own `prompt_tokens` (0: none). What a prefix cache reuses.
    #[serde(default)]
    pub shared_prefix_tokens: usize,
}

fn default_prompt_format() -> PromptFormat {
    PromptFormat::TokenIds
}

/// One request of an expanded workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// Seconds after the start at which it is sent.
    pub arrival: f64,
    /// Index into [`Workload::adapter_names`]; `None`: the base model.
    pub adapter: Option<usize>,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
}

impl Workload {
    /// Reads and validates a workload file (TOML, or JSON when the name ends in `.json`).
    pub fn read(path: &Path) -> anyhow::Result<Workload> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the workload {}", path.display()))?;
        let w: Workload = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid workload", path.display()))?
        } else {
            toml::from_str(&text)
                .with_context(|| format!("{}: invalid workload", path.display()))?
        };
        w.validate()
            .with_context(|| format!("{}: invalid workload", path.display()))?;
        Ok(w)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.name.is_empty()
                && self
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !self.name.starts_with('.'),
            "`name` must be letters, digits, `-`, `_` or `.` (it names a directory)"
        );
        anyhow::ensure!(self.requests > 0, "`requests` must be at least 1");
        anyhow::ensure!(self.concurrency > 0, "`concurrency` must be at least 1");
        for (field, len) in [
            ("prompt_tokens", self.prompt_tokens),
            ("output_tokens", self.output_tokens),
        ] {
            let (lo, hi) = len.range();
            anyhow::ensure!(
                lo > 0 && lo <= hi,
                "`{field}` must be a positive length or [min, max] with 0 < min <= max"
            );
        }
        if let Arrival::Poisson { rate } = self.arrival {
            anyhow::ensure!(
                rate.is_finite() && rate > 0.0,
                "a Poisson arrival needs a positive finite `rate` (requests/s)"
            );
        }
        let a = &self.adapters;
        if let Popularity::PowerLaw { alpha } = a.popularity {
            anyhow::ensure!(
                alpha.is_finite() && alpha >= 0.0,
                "`adapters.popularity.alpha` must be a finite number >= 0"
            );
        }
        anyhow::ensure!(
            a.names.is_empty() || a.names.len() == a.count,
            "`adapters.names` lists {} names for `adapters.count` = {}",
            a.names.len(),
            a.count
        );
        anyhow::ensure!(
            a.count == 0 || !a.ranks.is_empty(),
            "`adapters.ranks` must not be empty"
        );
        anyhow::ensure!(
            a.ranks.iter().all(|r| *r > 0),
            "`adapters.ranks` must be positive"
        );
        anyhow::ensure!(
            a.count == 0 || !a.targets.is_empty(),
            "`adapters.targets` must not be empty"
        );
        anyhow::ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "`temperature` must be >= 0"
        );
        anyhow::ensure!(
            self.vocab_size.is_none_or(|v| v > 16),
            "`vocab_size` must be above 16"
        );
        anyhow::ensure!(
            self.shared_prefix_tokens == 0 || self.prompt_format == PromptFormat::TokenIds,
            "`shared_prefix_tokens` needs `prompt_format = \"token-ids\"`"
        );
        anyhow::ensure!(
            self.shared_prefix_tokens <= 1 << 20,
            "`shared_prefix_tokens` must be at most 1048576"
        );
        Ok(())
    }

    /// The adapters' names on the server, in index order.
    pub fn adapter_names(&self) -> Vec<String> {
        if self.adapters.names.is_empty() {
            (0..self.adapters.count)
                .map(|i| format!("lora-{i}"))
                .collect()
        } else {
            self.adapters.names.clone()
        }
    }

    /// The rank of adapter `i`.
    pub fn rank(&self, i: usize) -> usize {
        let r = &self.adapters.ranks;
        r[i % r.len()]
    }

    /// The requests, deterministic in the seed. `vocab` is the model's vocabulary size
    /// (overridden by the workload's `vocab_size`).
    pub fn expand(&self, vocab: usize) -> Vec<Planned> {
        let a = &self.adapters;
        let spec = WorkloadSpec {
            requests: self.requests,
            rate: match self.arrival {
                Arrival::AllAtOnce => f64::INFINITY,
                Arrival::Poisson { rate } => rate,
            },
            adapters: a.count,
            zipf_alpha: match a.popularity {
                Popularity::PowerLaw { alpha } => alpha,
                Popularity::Uniform => 0.0,
            },
            prompt: self.prompt_tokens.range(),
            output: self.output_tokens.range(),
            long_fraction: 0.0,
            long_prompt: self.prompt_tokens.range(),
            vocab: self.vocab_size.unwrap_or(vocab),
            seed: self.seed,
        };
        let jobs: Vec<Planned> = sim::generate(&spec)
            .into_iter()
            .enumerate()
            .map(|(i, job)| Planned {
                arrival: job.arrival,
                adapter: match a.popularity {
                    _ if a.count == 0 => None,
                    Popularity::Uniform => Some(i % a.count),
                    Popularity::PowerLaw { .. } => job.adapter,
                },
                prompt: job.prompt,
                max_tokens: job.max_tokens,
            })
            .collect();
        self.with_shared_prefixes(jobs, spec.vocab)
    }

    /// Puts each adapter's (and the base model's) system prompt of `shared_prefix_tokens`
    /// seeded tokens before every prompt that goes to it.
    fn with_shared_prefixes(&self, mut jobs: Vec<Planned>, vocab: usize) -> Vec<Planned> {
        if self.shared_prefix_tokens == 0 {
            return jobs;
        }
        let mut prefixes: std::collections::HashMap<Option<usize>, Vec<u32>> = Default::default();
        for job in &mut jobs {
            let prefix = prefixes.entry(job.adapter).or_insert_with(|| {
                let key = job.adapter.map_or(0, |a| a as u64 + 1);
                let mut rng = loraplane_agent::rng::SplitMix64::new(
                    self.seed ^ 0x7072_6566_6978 ^ key.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                (0..self.shared_prefix_tokens)
                    .map(|_| rng.below(vocab.saturating_sub(16).max(1)) as u32)
                    .collect()
            });
            let mut prompt = prefix.clone();
            prompt.append(&mut job.prompt);
            job.prompt = prompt;
        }
        jobs
    }

    /// The `model` field of a request.
    pub fn model_of(&self, names: &[String], p: &Planned) -> String {
        match p.adapter {
            Some(i) => names[i].clone(),
            None => self.base_model.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANONICAL: &str = r#"
name = "t"
requests = 8
concurrency = 8
prompt_tokens = 5
output_tokens = [2, 4]
seed = 3
[arrival]
kind = "all-at-once"
[adapters]
count = 4
ranks = [8, 16]
targets = ["q_proj", "down_proj"]
popularity = { kind = "uniform" }
"#;

    fn parse(text: &str) -> anyhow::Result<Workload> {
        let w: Workload = toml::from_str(text)?;
        w.validate()?;
        Ok(w)
    }

    #[test]
    fn shared_prefixes_are_per_adapter_and_come_first() {
        let w = parse(&format!("shared_prefix_tokens = 6\n{CANONICAL}")).unwrap();
        let jobs = w.expand(512);
        let plain = parse(CANONICAL).unwrap().expand(512);
        for (j, p) in jobs.iter().zip(&plain) {
            assert_eq!(j.prompt.len(), 6 + p.prompt.len());
            assert_eq!(
                &j.prompt[6..],
                &p.prompt[..],
                "the request's own tokens follow"
            );
            for k in &jobs {
                let same = j.prompt[..6] == k.prompt[..6];
                assert_eq!(
                    same,
                    j.adapter == k.adapter,
                    "one system prompt per adapter"
                );
            }
        }
        let text = format!("shared_prefix_tokens = 6\nprompt_format = \"text\"\n{CANONICAL}");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("token-ids"), "{err}");
    }

    #[test]
    fn a_toml_workload_expands_deterministically() {
        let w = parse(CANONICAL).unwrap();
        assert_eq!(w.adapters.targets, vec![Module::Q, Module::Down]);
        assert_eq!(w.prompt_format, PromptFormat::TokenIds);
        assert!(w.ignore_eos && !w.logprobs);
        let plan = w.expand(100);
        assert_eq!(plan, w.expand(100));
        assert_eq!(plan.len(), 8);
        for (i, p) in plan.iter().enumerate() {
            assert_eq!(p.arrival, 0.0);
            assert_eq!(p.adapter, Some(i % 4));
            assert_eq!(p.prompt.len(), 5);
            assert!(p.prompt.iter().all(|t| *t < 84));
            assert!((2..=4).contains(&p.max_tokens));
        }
        assert_eq!(w.adapter_names()[3], "lora-3");
        assert_eq!((w.rank(0), w.rank(1), w.rank(2)), (8, 16, 8));
        assert_eq!(w.model_of(&w.adapter_names(), &plan[1]), "lora-1");
    }

    #[test]
    fn poisson_and_power_law_draw_from_the_seed() {
        let text = CANONICAL
            .replace("kind = \"all-at-once\"", "kind = \"poisson\"\nrate = 4.0")
            .replace(
                "{ kind = \"uniform\" }",
                "{ kind = \"power-law\", alpha = 1.0 }",
            );
        let w = parse(&text).unwrap();
        let plan = w.expand(100);
        assert!(plan.windows(2).all(|p| p[0].arrival < p[1].arrival));
        assert!(plan[0].arrival > 0.0);
        assert!(plan.iter().all(|p| p.adapter.is_some_and(|a| a < 4)));
        let mut other = w.clone();
        other.seed = 4;
        assert_ne!(other.expand(100), plan);
    }

    #[test]
    fn json_workloads_read_like_toml() {
        let w = parse(CANONICAL).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.json");
        std::fs::write(&path, serde_json::to_string(&w).unwrap()).unwrap();
        assert_eq!(Workload::read(&path).unwrap(), w);
    }

    #[test]
    fn bad_workloads_say_what_is_wrong() {
        let err = |text: &str| format!("{:#}", parse(text).unwrap_err());
        assert!(err(&CANONICAL.replace("requests = 8", "requests = 0")).contains("requests"));
        assert!(err(&CANONICAL.replace("[2, 4]", "[4, 2]")).contains("output_tokens"));
        assert!(err(&CANONICAL.replace("\"down_proj\"", "\"lm_head\"")).contains("lm_head"));
        assert!(
            err(&CANONICAL.replace("kind = \"all-at-once\"", "kind = \"poisson\"\nrate = 0"))
                .contains("rate")
        );
        assert!(err(&CANONICAL.replace("seed = 3", "sed = 3")).contains("sed"));
        assert!(
            err(&CANONICAL.replace("count = 4", "count = 4\nnames = [\"a\"]"))
                .contains("adapters.names")
        );
        let missing = Path::new("/nonexistent/w.toml");
        assert!(
            format!("{:#}", Workload::read(missing).unwrap_err()).contains("/nonexistent/w.toml")
        );
    }
}
