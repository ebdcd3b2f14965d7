//! `bench serving`'s fixtures and its own agent: the fixture checkpoint and one PEFT adapter
//! directory per workload adapter (made by the bench's `setup` code, each adapter its own
//! weights), gathered under one directory of adapter-named links so `serve --adapters DIR` (or
//! another server) preloads them under the workload's names; `--serve` then starts
//! `loraplane-agent serve` on them and reads its `listening` line for the HTTP address. Also
//! builds text prompts of an exact token count for `prompt_format = "text"`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use anyhow::Context;
use tokenizers::Tokenizer;

use loraplane_agent::rng::SplitMix64;

use crate::suites::serving::workload::Workload;
use crate::suites::setup::Fixtures;

/// The fixture checkpoint and the adapters directory of a workload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prepared {
    pub model: PathBuf,
    pub adapters: PathBuf,
}

/// Creates (or reuses) the model and the workload's adapters. Adapter `i` has rank
/// `ranks[i % len]` and weights of its own (fixture variant `i / len`).
pub fn prepare(fixtures: &Fixtures, w: &Workload) -> anyhow::Result<Prepared> {
    let model = fixtures.model()?;
    let names = w.adapter_names();
    let adapters = fixtures.root().join(format!(
        "serving-{}-{}/{}",
        fixtures.preset_name(),
        fixtures.seed(),
        w.name
    ));
    std::fs::create_dir_all(&adapters)
        .with_context(|| format!("creating {}", adapters.display()))?;
    let per_rank = w.adapters.ranks.len().max(1);
    for (i, name) in names.iter().enumerate() {
        anyhow::ensure!(
            !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != "..",
            "adapter name {name:?} cannot be a directory name"
        );
        let dir = fixtures.adapter(w.rank(i), &w.adapters.targets, i / per_rank)?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        // A link already right is left alone: a server started from an earlier run may be
        // reading this directory.
        let link = adapters.join(name);
        if std::fs::read_link(&link).is_ok_and(|t| t == dir) {
            continue;
        }
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&dir, &link)
            .with_context(|| format!("linking adapter {name}"))?;
    }
    // Entries of an earlier version of the workload would be served as adapters too.
    for entry in std::fs::read_dir(&adapters)? {
        let entry = entry?;
        if !names.iter().any(|n| entry.file_name() == n.as_str()) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(Prepared { model, adapters })
}

/// A `loraplane-agent serve` child, killed through its own handle when dropped.
pub struct Agent {
    child: Child,
    /// Held open: the agent writes one line, and a closed pipe must not surprise it.
    _stdout: BufReader<ChildStdout>,
    pub http: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an agent (`serve` of this executable: the agent library's own) on `p`, on loopback
/// ports the OS picks, with `extra` flags appended; its log goes to `log`.
pub fn start(p: &Prepared, w: &Workload, extra: &[String], log: &Path) -> anyhow::Result<Agent> {
    let exe = std::env::current_exe()
        .context("locating loraplane-bench, which runs the agents (its `serve`)")?;
    let root = p
        .adapters
        .parent()
        .and_then(Path::parent)
        .unwrap_or(&p.adapters);
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--model")
        .arg(&p.model)
        .args(["--served-model-name", &w.base_model])
        .arg("--adapters")
        .arg(&p.adapters)
        .arg("--adapter-roots")
        .arg(root)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--log-format", "text", "--log-level", "warn"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?,
        ));
    let mut child = cmd.spawn().context("starting loraplane-agent serve")?;
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!("the agent has no stdout");
    };
    let mut agent = Agent {
        child,
        _stdout: BufReader::new(stdout),
        http: String::new(),
    };
    let mut line = String::new();
    agent._stdout.read_line(&mut line)?;
    let listening: serde_json::Value = serde_json::from_str(&line).map_err(|_| {
        anyhow::anyhow!(
            "the agent did not start; its log ({}):\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })?;
    agent.http = listening["http"]
        .as_str()
        .map(|a| format!("http://{a}"))
        .with_context(|| format!("the agent reported no HTTP address: {listening}"))?;
    Ok(agent)
}

/// Builds text prompts that `tokenizer` maps to an exact number of tokens, special tokens
/// (BOS) included as a server adds them: words that are one token on their own (a leading
/// space and letters only), drawn with a seed, each prompt checked by encoding it.
pub struct TextPrompts {
    tokenizer: Tokenizer,
    words: Vec<String>,
    specials: usize,
}

impl TextPrompts {
    pub fn new(tokenizer_json: &Path) -> anyhow::Result<Self> {
        let tokenizer = Tokenizer::from_file(tokenizer_json).map_err(|e| {
            anyhow::anyhow!("loading the tokenizer {}: {e}", tokenizer_json.display())
        })?;
        let encode = |text: &str, special: bool| -> anyhow::Result<Vec<u32>> {
            Ok(tokenizer
                .encode(text, special)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                .get_ids()
                .to_vec())
        };
        let specials = encode("", true)?.len();
        let mut words = Vec::new();
        for id in 0..tokenizer.get_vocab_size(true) as u32 {
            let Ok(word) = tokenizer.decode(&[id], true) else {
                continue;
            };
            let letters = word.strip_prefix(' ').unwrap_or("");
            if letters.len() >= 2
                && letters.chars().all(|c| c.is_ascii_alphabetic())
                && encode(&word, false)? == [id]
            {
                words.push(word);
            }
        }
        anyhow::ensure!(
            words.len() >= 16,
            "the tokenizer {} has too few single-token words ({}) to build text prompts",
            tokenizer_json.display(),
            words.len()
        );
        Ok(TextPrompts {
            tokenizer,
            words,
            specials,
        })
    }

    /// A text of exactly `tokens` tokens as the server counts them.
    pub fn build(&self, tokens: usize, seed: u64) -> anyhow::Result<String> {
        let n = tokens
            .checked_sub(self.specials)
            .filter(|n| *n > 0)
            .with_context(|| {
                format!(
                    "a {tokens}-token text prompt leaves no room next to {} special tokens",
                    self.specials
                )
            })?;
        let mut rng = SplitMix64::new(seed);
        for _ in 0..64 {
            let text: String = (0..n)
                .map(|_| self.words[rng.below(self.words.len())].as_str())
                .collect();
            let got = self
                .tokenizer
                .encode(text.as_str(), true)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                .len();
            if got == tokens {
                return Ok(text);
            }
        }
        anyhow::bail!("no text of exactly {tokens} tokens found in 64 tries")
    }
}
