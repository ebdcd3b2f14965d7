//! The load generator of `bench serving`: every request a streaming `POST /v1/completions`
//! (server-sent events) sent at its arrival time, at most `concurrency` in flight, each event
//! stamped with the client's clock. Only fields of OpenAI's completions API go on the wire,
//! plus vLLM's `ignore_eos` when the workload asks for it (servers ignore fields they do not
//! know), so the same client drives loraplane, vLLM, llama.cpp's server, LoRAX or the HF PEFT
//! baseline.
//!
//! Token counting: `usage.completion_tokens` from the final chunk
//! (`stream_options.include_usage`) when the server sends it; else the number of tokens in
//! `logprobs.tokens`, else one token per non-empty text chunk. Inter-token gaps are the times
//! between chunks that carry tokens, split evenly over the tokens a chunk carries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

/// Longest a single request may take, stream included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(900);

/// One request as the client sends it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub model: String,
    /// Token ids (a JSON array) or text (a JSON string).
    pub prompt: Value,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// Seconds after the start.
    pub arrival: f64,
}

/// Sampling fields every request carries.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub temperature: f64,
    pub ignore_eos: bool,
    pub logprobs: bool,
}

/// What one request saw. Times are seconds since the run's start.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Record {
    pub index: usize,
    pub model: String,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// When the request was sent (its arrival, or later when the concurrency limit held it).
    pub sent: f64,
    pub first_token: Option<f64>,
    pub done: f64,
    pub completion_tokens: usize,
    /// The prompt's length as the server counted it (`usage.prompt_tokens`), when it said.
    pub server_prompt_tokens: Option<usize>,
    /// Gaps between successive tokens (seconds).
    #[serde(skip)]
    pub gaps: Vec<f64>,
    pub text: String,
    /// `logprobs.tokens`, when asked for.
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f64>>,
    pub finish_reason: Option<String>,
    pub error: Option<String>,
}

impl Record {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Time to first token, from sending.
    pub fn ttft(&self) -> Option<f64> {
        self.first_token.map(|t| t - self.sent)
    }

    pub fn latency(&self) -> f64 {
        self.done - self.sent
    }
}

/// `http://host:port` or `http://host:port/v1` → the completions endpoint.
pub fn completions_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base);
    format!("{base}/v1/completions")
}

fn body(o: &Outgoing, s: Sampling) -> Value {
    let mut b = json!({
        "model": o.model,
        "prompt": o.prompt,
        "max_tokens": o.max_tokens,
        "temperature": s.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if s.ignore_eos {
        b["ignore_eos"] = json!(true);
    }
    if s.logprobs {
        b["logprobs"] = json!(0);
    }
    b
}

/// Follows one response's event stream into `rec`.
struct StreamState<'a> {
    rec: &'a mut Record,
    start: Instant,
    counted: usize,
    last_token_at: Option<f64>,
    usage_tokens: Option<usize>,
    finished: bool,
}

impl<'a> StreamState<'a> {
    /// A stream that started at `start`, recorded into `rec`.
    fn new(rec: &'a mut Record, start: Instant) -> Self {
        StreamState {
            rec,
            start,
            counted: 0,
            last_token_at: None,
            usage_tokens: None,
            finished: false,
        }
    }

    /// One `data:` payload. Returns false at `[DONE]`.
    fn event(&mut self, data: &str) -> anyhow::Result<bool> {
        if data == "[DONE]" {
            self.finished = true;
            return Ok(false);
        }
        let at = self.start.elapsed().as_secs_f64();
        let v: Value = serde_json::from_str(data)
            .with_context(|| format!("an event that is not JSON: {data:.200}"))?;
        if let Some(e) = v.get("error") {
            let msg = e.get("message").and_then(Value::as_str).unwrap_or_default();
            anyhow::bail!(
                "the server reported an error: {}",
                if msg.is_empty() {
                    e.to_string()
                } else {
                    msg.to_owned()
                }
            );
        }
        let usage = |field: &str| {
            v.get("usage")
                .and_then(|u| u.get(field))
                .and_then(Value::as_u64)
                .map(|n| n as usize)
        };
        if let Some(n) = usage("completion_tokens") {
            self.usage_tokens = Some(n);
        }
        if let Some(n) = usage("prompt_tokens") {
            self.rec.server_prompt_tokens = Some(n);
        }
        let Some(choice) = v.get("choices").and_then(|c| c.get(0)) else {
            return Ok(true);
        };
        let text = choice.get("text").and_then(Value::as_str).unwrap_or("");
        self.rec.text.push_str(text);
        let lp = choice.get("logprobs").filter(|l| !l.is_null());
        let n = match lp.and_then(|l| l.get("tokens")).and_then(Value::as_array) {
            Some(tokens) => {
                for t in tokens {
                    self.rec
                        .tokens
                        .push(t.as_str().unwrap_or_default().to_owned());
                }
                if let Some(l) = lp
                    .and_then(|l| l.get("token_logprobs"))
                    .and_then(Value::as_array)
                {
                    self.rec.token_logprobs.extend(l.iter().map(Value::as_f64));
                }
                tokens.len()
            }
            None => usize::from(!text.is_empty()),
        };
        if n > 0 {
            if self.rec.first_token.is_none() {
                self.rec.first_token = Some(at);
            }
            if let Some(prev) = self.last_token_at {
                let gap = (at - prev) / n as f64;
                self.rec.gaps.extend(std::iter::repeat_n(gap, n));
            } else {
                // The first chunk's extra tokens arrive with no gap.
                self.rec.gaps.extend(std::iter::repeat_n(0.0, n - 1));
            }
            self.last_token_at = Some(at);
            self.counted += n;
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.rec.finish_reason = Some(f.to_owned());
        }
        Ok(true)
    }
}

/// Sends one request and reads its stream into `rec`.
async fn exchange(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    rec: &mut Record,
    start: Instant,
) -> anyhow::Result<()> {
    let resp = client
        .post(url)
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        anyhow::bail!("HTTP {status}: {text:.300}");
    }
    let mut state = StreamState::new(rec, start);
    let mut buf: Vec<u8> = Vec::new();
    let mut stream = resp.bytes_stream();
    'read: while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.context("reading the event stream")?);
        // Events end with a blank line; `\r\n` line ends are allowed.
        while let Some((end, sep)) = find_event_end(&buf) {
            let event: Vec<u8> = buf.drain(..end + sep).collect();
            let event = String::from_utf8_lossy(&event[..end]).into_owned();
            for line in event.lines() {
                if let Some(data) = line.strip_prefix("data:")
                    && !state.event(data.trim())?
                {
                    break 'read;
                }
            }
        }
    }
    anyhow::ensure!(state.finished, "the stream ended without `data: [DONE]`");
    state.rec.completion_tokens = state.usage_tokens.unwrap_or(state.counted);
    Ok(())
}

/// The end of the first complete event in `buf` and the length of its separator.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Drives `requests` against `base_url`; `progress(done, total, output tokens so far,
/// seconds)` after each completion. Returns one record per request, in request order.
pub async fn drive(
    base_url: &str,
    requests: Vec<Outgoing>,
    sampling: Sampling,
    concurrency: usize,
    progress: &mut dyn FnMut(usize, usize, usize, f64),
) -> anyhow::Result<Vec<Record>> {
    let url = completions_url(base_url);
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .pool_max_idle_per_host(concurrency)
        .build()
        .context("building the HTTP client")?;
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let total = requests.len();
    let start = Instant::now();
    for (index, o) in requests.into_iter().enumerate() {
        let (client, url, limit, tx) = (client.clone(), url.clone(), limit.clone(), tx.clone());
        tokio::spawn(async move {
            let at = start + Duration::from_secs_f64(o.arrival);
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            let _permit = limit.acquire_owned().await;
            let mut rec = Record {
                index,
                model: o.model.clone(),
                prompt_tokens: o.prompt_tokens,
                max_tokens: o.max_tokens,
                sent: start.elapsed().as_secs_f64(),
                ..Record::default()
            };
            let result = exchange(&client, &url, &body(&o, sampling), &mut rec, start).await;
            rec.done = start.elapsed().as_secs_f64();
            if let Err(e) = result {
                rec.error = Some(format!("{e:#}"));
            }
            let _ = tx.send(rec);
        });
    }
    drop(tx);
    let mut records: Vec<Option<Record>> = vec![None; total];
    let (mut done, mut tokens) = (0, 0);
    while let Some(rec) = rx.recv().await {
        done += 1;
        tokens += rec.completion_tokens;
        progress(done, total, tokens, start.elapsed().as_secs_f64());
        let i = rec.index;
        records[i] = Some(rec);
    }
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.with_context(|| format!("request {i} was lost (its task panicked)")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_accept_a_base_or_a_v1_prefix() {
        assert_eq!(completions_url("http://h:1"), "http://h:1/v1/completions");
        assert_eq!(
            completions_url("http://h:1/v1/"),
            "http://h:1/v1/completions"
        );
    }

    #[test]
    fn events_count_tokens_gaps_and_usage() {
        let mut rec = Record::default();
        let mut s = StreamState::new(&mut rec, Instant::now());
        let chunk = |text: &str, tokens: &[&str]| {
            json!({"choices": [{"index": 0, "text": text, "finish_reason": null,
                "logprobs": {"tokens": tokens, "token_logprobs": vec![-0.5; tokens.len()]}}]})
            .to_string()
        };
        assert!(s.event(&chunk("a", &["a"])).unwrap());
        assert!(s.event(&chunk("", &["\u{fffd}", "é"])).unwrap());
        assert!(
            s.event(r#"{"choices":[{"index":0,"text":"","finish_reason":"length"}]}"#)
                .unwrap()
        );
        assert!(
            s.event(r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#)
                .unwrap()
        );
        assert!(!s.event("[DONE]").unwrap());
        assert_eq!((s.counted, s.usage_tokens), (3, Some(3)));
        assert_eq!(rec.tokens.len(), 3);
        assert_eq!(rec.server_prompt_tokens, Some(7));
        assert_eq!(rec.gaps.len(), 2);
        assert_eq!(rec.text, "a");
        assert_eq!(rec.finish_reason.as_deref(), Some("length"));
        assert_eq!(rec.token_logprobs, vec![Some(-0.5); 3]);
    }

    #[test]
    fn server_errors_and_garbage_are_errors() {
        let mut rec = Record::default();
        let mut s = StreamState::new(&mut rec, Instant::now());
        let e = s
            .event(r#"{"error":{"message":"adapter unknown","type":"x"}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("adapter unknown"));
        assert!(s.event("not json").is_err());
    }

    #[test]
    fn event_boundaries_accept_lf_and_crlf() {
        assert_eq!(find_event_end(b"data: x\n\ndata: y"), Some((7, 2)));
        assert_eq!(find_event_end(b"data: x\r\n\r\n"), Some((7, 4)));
        assert_eq!(find_event_end(b"data: x\n"), None);
    }
}
