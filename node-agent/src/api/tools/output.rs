//! The output side of tool calling: calls read out of a finished chat generation (Hermes
//! blocks under `auto`, the forced JSON under `required` or a named function), the response
//! message, and the streaming hold-back that makes a streamed response add up to the same.

use serde_json::{Map, Value, json};

use super::ToolMode;
use crate::api::openai;
use crate::engine::FinishReason;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One call read from the output; `arguments` is JSON text, as OpenAI sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// A chat output split into content and calls.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The text outside the blocks; `None` when it is blank.
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

/// Reads Hermes-style `<tool_call>` blocks naming one of `names` out of `text`. `None` when
/// there is none, or when any block is malformed: then the text is content as it stands.
pub fn parse_hermes(text: &str, names: &[String]) -> Option<Parsed> {
    let (mut rest, mut content, mut calls) = (text, String::new(), Vec::new());
    while let Some(start) = rest.find(OPEN) {
        content.push_str(&rest[..start]);
        let inside = &rest[start + OPEN.len()..];
        let end = inside.find(CLOSE)?;
        let v: Value = serde_json::from_str(inside[..end].trim()).ok()?;
        let name = v.get("name")?.as_str()?;
        let arguments = v.get("arguments").filter(|a| a.is_object())?;
        if !names.iter().any(|n| n == name) {
            return None;
        }
        calls.push(ToolCall {
            name: name.to_owned(),
            arguments: arguments.to_string(),
        });
        rest = &inside[end + CLOSE.len()..];
    }
    content.push_str(rest);
    if calls.is_empty() {
        return None;
    }
    Some(Parsed {
        content: (!content.trim().is_empty()).then_some(content),
        calls,
    })
}

/// The calls of a constrained output: a `required` list, or a named function's arguments.
fn parse_constrained(mode: &ToolMode, text: &str) -> Option<Vec<ToolCall>> {
    let v: Value = serde_json::from_str(text).ok()?;
    match mode {
        ToolMode::Required => v
            .as_array()?
            .iter()
            .map(|c| {
                Some(ToolCall {
                    name: c.get("name")?.as_str()?.to_owned(),
                    arguments: c.get("arguments").filter(|a| a.is_object())?.to_string(),
                })
            })
            .collect::<Option<Vec<_>>>()
            .filter(|calls| !calls.is_empty()),
        ToolMode::Named(name) => v.is_object().then(|| {
            vec![ToolCall {
                name: name.clone(),
                arguments: v.to_string(),
            }]
        }),
        ToolMode::Off | ToolMode::Auto { .. } => None,
    }
}

/// How a finished chat generation reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
    /// OpenAI's `finish_reason`.
    pub finish: &'static str,
}

/// Reads the calls out of a finished generation's `text` under `mode`.
pub fn outcome(mode: &ToolMode, text: String, reason: FinishReason) -> Outcome {
    let parsed = match (reason, mode) {
        // A cut output is not a call, whatever it starts like.
        (FinishReason::Stop, ToolMode::Auto { names }) => parse_hermes(&text, names),
        (FinishReason::Stop, ToolMode::Required | ToolMode::Named(_)) => {
            parse_constrained(mode, &text).map(|calls| Parsed {
                content: None,
                calls,
            })
        }
        _ => None,
    };
    match parsed {
        Some(p) => Outcome {
            content: p.content,
            calls: p.calls,
            finish: "tool_calls",
        },
        None => Outcome {
            content: Some(text),
            calls: Vec::new(),
            finish: openai::finish_reason(reason),
        },
    }
}

/// The `tool_calls` list; stream deltas also carry each call's `index`.
fn calls_json(calls: &[ToolCall], request_id: &str, indexed: bool) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({
                "id": format!("call_{request_id}_{i}"),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            });
            if indexed {
                v["index"] = i.into();
            }
            v
        })
        .collect()
}

/// The assistant message of a non-streamed response.
pub fn message(o: &Outcome, request_id: &str) -> Value {
    let mut m = json!({"role": "assistant", "content": o.content});
    if !o.calls.is_empty() {
        m["tool_calls"] = calls_json(&o.calls, request_id, false);
    }
    m
}

/// A streamed chat generation whose output may hold tool calls: content goes out as it comes
/// until a `<tool_call>` may be starting (a partial tag at the end is held back too), the rest
/// waits for the end. Under a constrained mode the whole output is the call, so all of it
/// waits. What the client accumulates equals the non-streamed [`message`].
#[derive(Debug)]
pub struct ToolStream {
    mode: ToolMode,
    text: String,
    /// Bytes of `text` sent as content.
    sent: usize,
    /// A `<tool_call>` appeared: nothing more is sent before the end.
    held: bool,
}

impl ToolStream {
    /// `None` when nothing is parsed (`ToolMode::Off`): the text streams as it is.
    pub fn new(mode: &ToolMode) -> Option<ToolStream> {
        (*mode != ToolMode::Off).then(|| ToolStream {
            mode: mode.clone(),
            text: String::new(),
            sent: 0,
            held: false,
        })
    }

    /// Takes generated text; returns the content that can be sent now.
    pub fn push(&mut self, delta: &str) -> String {
        self.text.push_str(delta);
        if self.held || !matches!(self.mode, ToolMode::Auto { .. }) {
            return String::new();
        }
        let pending = &self.text[self.sent..];
        let ready = match pending.find(OPEN) {
            Some(at) => {
                self.held = true;
                at
            }
            None => pending.len() - partial_tag(pending),
        };
        // Content that is blank before a call is null, not whitespace: send none until there
        // is more.
        if self.sent == 0 && pending[..ready].trim().is_empty() {
            return String::new();
        }
        let out = pending[..ready].to_owned();
        self.sent += ready;
        out
    }

    /// The last chunk's `delta` and `finish_reason`, once generation ended with `last`.
    pub fn finish(
        mut self,
        last: &str,
        reason: FinishReason,
        request_id: &str,
    ) -> (Value, &'static str) {
        self.text.push_str(last);
        let o = outcome(&self.mode, self.text, reason);
        let mut delta = Map::new();
        // The content always begins with what was sent: the text before any block.
        if let Some(rest) = o.content.as_deref().and_then(|c| c.get(self.sent..))
            && !rest.is_empty()
        {
            delta.insert("content".into(), rest.into());
        }
        if !o.calls.is_empty() {
            delta.insert("tool_calls".into(), calls_json(&o.calls, request_id, true));
        }
        (Value::Object(delta), o.finish)
    }
}

/// Bytes at the end of `s` that could begin a `<tool_call>` tag.
fn partial_tag(s: &str) -> usize {
    (1..OPEN.len())
        .rev()
        .find(|&k| s.ends_with(&OPEN[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "now".into()]
    }

    #[test]
    fn hermes_blocks_become_calls() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>";
        let p = parse_hermes(text, &names()).unwrap();
        assert_eq!(
            p.calls,
            vec![
                ToolCall {
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into()
                },
                ToolCall {
                    name: "now".into(),
                    arguments: "{}".into()
                },
            ]
        );
        assert_eq!(p.content.as_deref(), Some("Let me check.\n\n"));
        // Blank text around the blocks is no content.
        let p = parse_hermes(
            "\n<tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>\n",
            &names(),
        )
        .unwrap();
        assert_eq!(p.content, None);
        assert_eq!(parse_hermes("just words", &names()), None);
    }

    #[test]
    fn malformed_blocks_leave_the_text_as_content() {
        let good = "<tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>";
        for bad in [
            "<tool_call>{\"name\": \"now\", \"arguments\": {}",
            "<tool_call>{\"name\": now}</tool_call>",
            "<tool_call>{\"name\":\"rm_rf\",\"arguments\":{}}</tool_call>",
            "<tool_call>{\"name\":\"now\",\"arguments\":\"{}\"}</tool_call>",
            "<tool_call>{\"name\":\"now\"}</tool_call>",
            "<tool_call>[1]</tool_call>",
            "<tool_call><tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>",
        ] {
            assert_eq!(parse_hermes(bad, &names()), None, "{bad}");
            // One bad block spoils the well-formed ones beside it: all or nothing.
            assert_eq!(
                parse_hermes(&format!("{good}{bad}"), &names()),
                None,
                "{bad}"
            );
            let o = outcome(
                &ToolMode::Auto { names: names() },
                format!("{good}\n{bad}"),
                FinishReason::Stop,
            );
            assert_eq!(o.content, Some(format!("{good}\n{bad}")));
            assert!(o.calls.is_empty());
            assert_eq!(o.finish, "stop");
        }
    }

    #[test]
    fn outcomes_of_each_mode() {
        let call = "<tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>";
        let auto = ToolMode::Auto { names: names() };
        let o = outcome(&auto, call.into(), FinishReason::Stop);
        assert_eq!(
            (o.finish, o.calls.len(), o.content),
            ("tool_calls", 1, None)
        );
        // Cut by max_tokens: never a call.
        let o = outcome(&auto, call.into(), FinishReason::Length);
        assert_eq!((o.finish, o.calls.len()), ("length", 0));
        assert_eq!(o.content.as_deref(), Some(call));
        // tool_choice none parses nothing.
        let o = outcome(&ToolMode::Off, call.into(), FinishReason::Stop);
        assert_eq!((o.finish, o.calls.len()), ("stop", 0));

        let named = ToolMode::Named("get_weather".into());
        let o = outcome(&named, r#"{"city":"Oslo"}"#.into(), FinishReason::Stop);
        assert_eq!(o.finish, "tool_calls");
        assert_eq!(
            o.calls,
            vec![ToolCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Oslo"}"#.into()
            }]
        );
        let o = outcome(&named, r#"{"city":"Os"#.into(), FinishReason::Length);
        assert_eq!((o.finish, o.calls.len()), ("length", 0));

        let text =
            r#"[{"name":"now","arguments":{}},{"name":"get_weather","arguments":{"city":"Rome"}}]"#;
        let o = outcome(&ToolMode::Required, text.into(), FinishReason::Stop);
        assert_eq!(o.calls.len(), 2);
        assert_eq!(o.calls[1].arguments, r#"{"city":"Rome"}"#);
        let m = message(&o, "abc");
        assert_eq!(m["content"], Value::Null);
        assert_eq!(m["tool_calls"][1]["id"], "call_abc_1");
        assert_eq!(m["tool_calls"][1]["type"], "function");
        assert_eq!(m["tool_calls"][1]["function"]["name"], "get_weather");
        assert!(m["tool_calls"][0].get("index").is_none());
        let m = message(
            &outcome(&ToolMode::Off, "hi".into(), FinishReason::Stop),
            "abc",
        );
        assert_eq!(m, json!({"role": "assistant", "content": "hi"}));
    }

    /// Streams `pieces` and returns (content sent before the end, the last delta, the finish).
    fn stream(
        mode: &ToolMode,
        pieces: &[&str],
        reason: FinishReason,
    ) -> (String, Value, &'static str) {
        let mut s = ToolStream::new(mode).unwrap();
        let early: String = pieces.iter().map(|p| s.push(p)).collect();
        let (delta, finish) = s.finish("", reason, "r");
        (early, delta, finish)
    }

    #[test]
    fn streaming_sends_content_early_and_calls_at_the_end() {
        let auto = ToolMode::Auto { names: names() };
        assert!(ToolStream::new(&ToolMode::Off).is_none());
        let pieces = [
            "Sure",
            ", checking.",
            "\n<tool",
            "_call>{\"name\":\"get_weather\",",
            "\"arguments\":{\"city\":\"Lima\"}}</tool_call>",
            " Done.",
        ];
        let (early, delta, finish) = stream(&auto, &pieces, FinishReason::Stop);
        assert_eq!(early, "Sure, checking.\n", "the partial tag was held back");
        assert_eq!(finish, "tool_calls");
        assert_eq!(delta["content"], " Done.");
        assert_eq!(delta["tool_calls"][0]["index"], 0);
        assert_eq!(delta["tool_calls"][0]["id"], "call_r_0");
        assert_eq!(
            delta["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Lima"}"#
        );
        // What the client accumulates is the non-streamed message's content.
        let o = outcome(&auto, pieces.concat(), FinishReason::Stop);
        assert_eq!(
            Some(format!("{early}{}", delta["content"].as_str().unwrap())),
            o.content
        );

        // A tag that never completes, or text that only looked like one, is content after all.
        let (early, delta, finish) = stream(
            &auto,
            &["a <tool", "box> b", " <tool_call>{"],
            FinishReason::Stop,
        );
        assert_eq!((early.as_str(), finish), ("a <toolbox> b ", "stop"));
        assert_eq!(delta, json!({"content": "<tool_call>{"}));

        // Blank text before a call is not sent.
        let (early, delta, _) = stream(
            &auto,
            &[
                "\n",
                "<tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>",
            ],
            FinishReason::Stop,
        );
        assert_eq!(early, "");
        assert!(delta.get("content").is_none(), "{delta}");

        // Constrained: nothing early, the call at the end; a cut output is content.
        let named = ToolMode::Named("now".into());
        let (early, delta, finish) = stream(&named, &["{", "}"], FinishReason::Stop);
        assert_eq!((early.as_str(), finish), ("", "tool_calls"));
        assert_eq!(delta["tool_calls"][0]["function"]["name"], "now");
        let (_, delta, finish) = stream(&named, &["{"], FinishReason::Length);
        assert_eq!((delta, finish), (json!({"content": "{"}), "length"));
    }

    /// Random outputs cut into random tokens: what a streaming client accumulates (content and
    /// calls) is always the non-streamed message.
    #[test]
    fn streamed_and_whole_responses_agree() {
        let pieces = [
            "<tool_call>",
            "</tool_call>",
            "<tool",
            "_call>",
            "{\"name\":\"now\",\"arguments\":{}}",
            "{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Nîmes\"}}",
            "{\"name\":",
            "words ",
            "é",
            "\n",
            " ",
            "<",
        ];
        let mut rng = crate::rng::SplitMix64::new(15);
        for case in 0..3000 {
            let mode = match case % 3 {
                0 => ToolMode::Auto { names: names() },
                1 => ToolMode::Named("now".into()),
                _ => ToolMode::Required,
            };
            let mut text = String::new();
            for _ in 0..rng.below(9) {
                // Well-formed blocks often enough for calls to come out.
                if rng.below(3) == 0 {
                    text.push_str("<tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>");
                } else {
                    text.push_str(pieces[rng.below(pieces.len())]);
                }
            }
            let mut cuts: Vec<usize> = (0..rng.below(6))
                .map(|_| rng.below(text.len() + 1))
                .filter(|&i| text.is_char_boundary(i))
                .collect();
            cuts.sort_unstable();
            cuts.push(text.len());
            let reason = if rng.below(5) == 0 {
                FinishReason::Length
            } else {
                FinishReason::Stop
            };
            let mut s = ToolStream::new(&mode).unwrap();
            let (mut sent, mut at) = (String::new(), 0);
            let last = *cuts.last().unwrap_or(&0);
            for &cut in &cuts[..cuts.len() - 1] {
                sent.push_str(&s.push(&text[at..cut]));
                at = cut;
            }
            let (delta, finish) = s.finish(&text[at..last], reason, "r");
            sent.push_str(delta["content"].as_str().unwrap_or(""));
            let whole = outcome(&mode, text.clone(), reason);
            assert_eq!(
                sent,
                whole.content.clone().unwrap_or_default(),
                "{text:?} {cuts:?}"
            );
            assert_eq!(finish, whole.finish, "{text:?}");
            let streamed_calls = delta.get("tool_calls").cloned().unwrap_or(json!([]));
            let whole_calls = message(&whole, "r")
                .get("tool_calls")
                .cloned()
                .unwrap_or(json!([]));
            assert_eq!(
                streamed_calls.as_array().map(Vec::len),
                whole_calls.as_array().map(Vec::len)
            );
            for (a, b) in streamed_calls
                .as_array()
                .unwrap()
                .iter()
                .zip(whole_calls.as_array().unwrap())
            {
                assert_eq!(
                    (&a["id"], &a["function"]),
                    (&b["id"], &b["function"]),
                    "{text:?}"
                );
            }
        }
    }
}
