//! Request traces for the planner: a `bench serving` workload file (expanded exactly as the
//! serving benchmark sends it), or a recorded trace as CSV or JSON lines with one request per
//! line — `arrival_s`, `prompt_tokens`, `output_tokens` and an optional `adapter` (a name; empty
//! or absent: the base model). Adapters of a recorded trace get the rank of `--ranks` (cycled
//! in order of first appearance, default 16).

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use loraplane_agent::rng::SplitMix64;

use crate::suites::serving::workload::Workload;
use crate::suites::sim::Job;

/// A trace: the requests, and the rank of each adapter index they use.
#[derive(Debug, Clone)]
pub struct Trace {
    pub name: String,
    pub jobs: Vec<Job>,
    pub ranks: Vec<usize>,
}

/// One line of a recorded trace.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    arrival_s: f64,
    prompt_tokens: usize,
    output_tokens: usize,
    #[serde(default)]
    adapter: Option<String>,
}

/// Bounds a trace line must respect (a typo should not become a million-token prompt).
const MAX_TOKENS: usize = 1 << 20;
const MAX_REQUESTS: usize = 1_000_000;

impl Trace {
    /// Reads a trace: `.toml` / `.json` workload files, `.csv` or `.jsonl` recorded traces.
    pub fn read(path: &Path, vocab: usize, ranks: &[usize], seed: u64) -> anyhow::Result<Trace> {
        let name = path
            .file_stem()
            .map_or_else(|| "trace".to_owned(), |s| s.to_string_lossy().into_owned());
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "toml" | "json" => {
                let w = Workload::read(path)?;
                let jobs = w
                    .expand(vocab)
                    .into_iter()
                    .map(|p| Job {
                        arrival: p.arrival,
                        adapter: p.adapter,
                        prompt: p.prompt,
                        max_tokens: p.max_tokens,
                        long: false,
                    })
                    .collect();
                let ranks = (0..w.adapters.count).map(|i| w.rank(i)).collect();
                Ok(Trace {
                    name: w.name,
                    jobs,
                    ranks,
                })
            }
            "csv" | "jsonl" => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the trace {}", path.display()))?;
                let lines = if ext == "csv" {
                    parse_csv(&text)
                } else {
                    parse_jsonl(&text)
                }
                .with_context(|| format!("{}: invalid trace", path.display()))?;
                Ok(Self::from_lines(name, lines, vocab, ranks, seed))
            }
            _ => anyhow::bail!(
                "{}: a trace is a workload file (.toml, .json) or a recorded trace (.csv, .jsonl)",
                path.display()
            ),
        }
    }

    fn from_lines(
        name: String,
        lines: Vec<Line>,
        vocab: usize,
        ranks: &[usize],
        seed: u64,
    ) -> Trace {
        let mut rng = SplitMix64::new(seed ^ 0x706c_616e);
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut adapter_ranks = Vec::new();
        let default_ranks = [16];
        let ranks = if ranks.is_empty() {
            &default_ranks[..]
        } else {
            ranks
        };
        let mut jobs: Vec<Job> = lines
            .into_iter()
            .map(|l| {
                let adapter = l.adapter.filter(|a| !a.is_empty()).map(|a| {
                    let n = index.len();
                    *index.entry(a).or_insert_with(|| {
                        adapter_ranks.push(ranks[n % ranks.len()]);
                        n
                    })
                });
                Job {
                    arrival: l.arrival_s,
                    adapter,
                    // Ordinary (non-special) token ids, as the workload generator draws them.
                    prompt: (0..l.prompt_tokens)
                        .map(|_| rng.below(vocab.saturating_sub(16).max(1)) as u32)
                        .collect(),
                    max_tokens: l.output_tokens,
                    long: false,
                }
            })
            .collect();
        let start = jobs.iter().map(|j| j.arrival).fold(f64::INFINITY, f64::min);
        if start.is_finite() {
            for j in &mut jobs {
                j.arrival -= start;
            }
        }
        jobs.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
        Trace {
            name,
            jobs,
            ranks: adapter_ranks,
        }
    }

    /// The adapter index and rank of job `j`.
    pub fn adapter_of(&self, j: usize) -> Option<(usize, usize)> {
        let a = self.jobs[j].adapter?;
        Some((a, self.ranks.get(a).copied().unwrap_or(16)))
    }
}

fn check(line: &Line, n: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        line.arrival_s.is_finite() && line.arrival_s >= 0.0,
        "line {n}: arrival_s must be a non-negative number of seconds"
    );
    anyhow::ensure!(
        (1..=MAX_TOKENS).contains(&line.prompt_tokens),
        "line {n}: prompt_tokens must be 1 to {MAX_TOKENS}"
    );
    anyhow::ensure!(
        (1..=MAX_TOKENS).contains(&line.output_tokens),
        "line {n}: output_tokens must be 1 to {MAX_TOKENS}"
    );
    anyhow::ensure!(n <= MAX_REQUESTS, "more than {MAX_REQUESTS} requests");
    Ok(())
}

/// `arrival_s,prompt_tokens,output_tokens[,adapter]` with that header line.
fn parse_csv(text: &str) -> anyhow::Result<Vec<Line>> {
    let mut rows = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = rows.next().context("empty trace")?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let want = ["arrival_s", "prompt_tokens", "output_tokens"];
    anyhow::ensure!(
        cols.len() >= 3
            && cols[..3] == want
            && (cols.len() == 3 || (cols.len() == 4 && cols[3] == "adapter")),
        "the header must be `arrival_s,prompt_tokens,output_tokens[,adapter]`, got `{header}`"
    );
    rows.map(|(i, l)| {
        let n = i + 1;
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        anyhow::ensure!(
            f.len() == cols.len(),
            "line {n}: {} fields, expected {}",
            f.len(),
            cols.len()
        );
        let line = Line {
            arrival_s: f[0]
                .parse()
                .with_context(|| format!("line {n}: arrival_s"))?,
            prompt_tokens: f[1]
                .parse()
                .with_context(|| format!("line {n}: prompt_tokens"))?,
            output_tokens: f[2]
                .parse()
                .with_context(|| format!("line {n}: output_tokens"))?,
            adapter: f.get(3).map(|s| (*s).to_owned()),
        };
        check(&line, n)?;
        Ok(line)
    })
    .collect()
}

/// One JSON object per line with the CSV's fields.
fn parse_jsonl(text: &str) -> anyhow::Result<Vec<Line>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let line: Line = serde_json::from_str(l).with_context(|| format!("line {}", i + 1))?;
            check(&line, i + 1)?;
            Ok(line)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(ext: &str, text: &str) -> anyhow::Result<Trace> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(format!("t.{ext}"));
        std::fs::write(&path, text)?;
        Trace::read(&path, 512, &[8, 64], 7)
    }

    #[test]
    fn csv_and_jsonl_traces_give_the_same_jobs() {
        let csv = read(
            "csv",
            "arrival_s,prompt_tokens,output_tokens,adapter\n10.5,4,2,sql\n10,3,5,\n11,2,1,tone\n12,2,1,sql\n",
        )
        .unwrap();
        let jsonl = read(
            "jsonl",
            r#"{"arrival_s": 10.5, "prompt_tokens": 4, "output_tokens": 2, "adapter": "sql"}
{"arrival_s": 10, "prompt_tokens": 3, "output_tokens": 5}
{"arrival_s": 11, "prompt_tokens": 2, "output_tokens": 1, "adapter": "tone"}
{"arrival_s": 12, "prompt_tokens": 2, "output_tokens": 1, "adapter": "sql"}
"#,
        )
        .unwrap();
        for t in [&csv, &jsonl] {
            let arrivals: Vec<f64> = t.jobs.iter().map(|j| j.arrival).collect();
            assert_eq!(
                arrivals,
                [0.0, 0.5, 1.0, 2.0],
                "shifted to start at 0, sorted"
            );
            let lens: Vec<(usize, usize)> = t
                .jobs
                .iter()
                .map(|j| (j.prompt.len(), j.max_tokens))
                .collect();
            assert_eq!(lens, [(3, 5), (4, 2), (2, 1), (2, 1)]);
            assert_eq!(t.adapter_of(0), None);
            assert_eq!(t.adapter_of(1), Some((0, 8)));
            assert_eq!(t.adapter_of(2), Some((1, 64)));
            assert_eq!(t.adapter_of(3), Some((0, 8)));
        }
    }

    #[test]
    fn bad_traces_name_the_line_and_field() {
        let e = format!(
            "{:#}",
            read("csv", "arrival_s,prompt_tokens,output_tokens\n0,x,1\n").unwrap_err()
        );
        assert!(e.contains("line 2: prompt_tokens"), "{e}");
        let e = format!("{:#}", read("csv", "when,prompt,output\n").unwrap_err());
        assert!(e.contains("header"), "{e}");
        let e = format!(
            "{:#}",
            read("csv", "arrival_s,prompt_tokens,output_tokens\n0,0,1\n").unwrap_err()
        );
        assert!(e.contains("prompt_tokens must be"), "{e}");
        let e = format!(
            "{:#}",
            read(
                "jsonl",
                "{\"arrival_s\": -1, \"prompt_tokens\": 1, \"output_tokens\": 1}\n"
            )
            .unwrap_err()
        );
        assert!(e.contains("line 1: arrival_s"), "{e}");
        let e = format!("{:#}", read("jsonl", "{\"arrival\": 0}\n").unwrap_err());
        assert!(e.contains("line 1"), "{e}");
        let e = format!("{:#}", read("txt", "").unwrap_err());
        assert!(e.contains(".csv, .jsonl"), "{e}");
    }
}
