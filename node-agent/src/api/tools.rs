//! OpenAI tool calling on `/v1/chat/completions`: a request's `tools` and `tool_choice` checked
//! into a [`ToolPlan`], the JSON schema that forces a call, and the calls read back out of the
//! generated text.
//!
//! - **Prompt.** `tools` go into the chat template's context as Hugging Face's
//!   `apply_chat_template(tools=…)` passes them. A model whose template never reads `tools` is
//!   refused with a 400 by the serving core (`TokenizerBundle::supports_tools` holds the rule).
//! - **`auto`** (the default when tools are given): free generation, then Hermes-style blocks
//!   `<tool_call>{"name": …, "arguments": {…}}</tool_call>` (Qwen2.5, Hermes 2 and 3) become
//!   `tool_calls` ([`parse_hermes`]). All or nothing, as vLLM's hermes parser: a block that is
//!   not closed, not JSON, names a function the request did not offer, or lacks object
//!   arguments leaves the whole output as content.
//! - **`required` and a named function**: as vLLM's guided decoding for `tool_choice`, llguidance
//!   constrains the output to JSON rather than to the model's own tool syntax: a list of
//!   `{"name", "arguments"}` objects whose arguments are valid against that function's
//!   `parameters` (`required`), or just the named function's arguments. The schema is an
//!   ordinary [`ResponseFormat::JsonSchema`], so prefill peers enforce it unchanged.
//! - **`none`**: the tools are still rendered (vLLM's default) and nothing is parsed.
//!
//! Calls are returned only when generation stopped by itself (a `length` cut leaves the text as
//! content), with `finish_reason` `tool_calls`, `content` null unless the model also wrote text
//! around its `<tool_call>` blocks, and ids `call_<request id>_<n>`. Streaming sends content as
//! it comes until a `<tool_call>` may be starting, holds the rest, and sends the calls whole in
//! the last chunk ([`ToolStream`]).

mod output;

pub use output::{Outcome, Parsed, ToolCall, ToolStream, message, outcome, parse_hermes};

use serde_json::{Value, json};

use crate::api::error::ApiError;
use crate::api::openai;
use crate::api::service::GenerateSpec;
use crate::structured::ResponseFormat;

/// What a chat request's output becomes.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ToolMode {
    /// Content only: no tools, or `tool_choice` "none".
    #[default]
    Off,
    /// `<tool_call>` blocks naming one of these functions become calls.
    Auto { names: Vec<String> },
    /// The output is a JSON list of calls (constrained).
    Required,
    /// The output is this function's arguments (constrained).
    Named(String),
}

/// A request's tools, checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolPlan {
    /// The chat template's `tools`: the request's list as given, `None` without tools.
    pub tools: Option<Vec<Value>>,
    pub mode: ToolMode,
    /// The constraint that forces a call (`required`, a named function).
    pub format: Option<ResponseFormat>,
}

impl ToolPlan {
    /// Puts the forced call's constraint and the way to read the output onto a chat request.
    ///
    /// Errors: a 400 when the request also has a `response_format` and a forced call, which
    /// decides the output's shape alone.
    pub fn apply(self, spec: &mut GenerateSpec, shape: &mut openai::Shape) -> Result<(), ApiError> {
        if let Some(format) = self.format {
            if spec.response_format.is_some() {
                return Err(ApiError::invalid(
                    "response_format",
                    "response_format cannot be combined with tool_choice \"required\" or a \
                     named function: the tool call decides the output",
                ));
            }
            spec.response_format = Some(format);
        }
        shape.tools = self.mode;
        Ok(())
    }
}

/// One offered function.
struct Function {
    name: String,
    parameters: Value,
}

enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls` (`false` allows one call under
/// `required`; `auto` output is not constrained, so it cannot be held to it).
///
/// Errors: a 400 naming the field: a tool that is not a function, a function without a name or
/// with a name used twice, `parameters` that are not a JSON object, a `tool_choice` that is
/// malformed, asks for a call without tools, or names a function that is not offered.
pub fn plan(
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
) -> Result<ToolPlan, ApiError> {
    let tools = tools.filter(|t| !t.is_empty());
    let functions = match &tools {
        Some(t) => functions(t)?,
        None => Vec::new(),
    };
    let choice = match choice(tool_choice)? {
        Some(c) => c,
        None if tools.is_some() => Choice::Auto,
        None => Choice::None,
    };
    let (mode, format) = match choice {
        Choice::None => (ToolMode::Off, None),
        Choice::Auto if functions.is_empty() => (ToolMode::Off, None),
        Choice::Auto => (
            ToolMode::Auto {
                names: functions.iter().map(|f| f.name.clone()).collect(),
            },
            None,
        ),
        Choice::Required if functions.is_empty() => {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice \"required\" needs tools",
            ));
        }
        Choice::Required => (
            ToolMode::Required,
            Some(required_format(
                &functions,
                parallel_tool_calls.unwrap_or(true),
            )),
        ),
        Choice::Named(name) => {
            let Some(f) = functions.iter().find(|f| f.name == name) else {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!(
                        "tool_choice names the function {name:?}, which is not among the tools"
                    ),
                ));
            };
            let format = ResponseFormat::JsonSchema {
                name: f.name.clone(),
                schema: f.parameters.clone(),
                strict: true,
            };
            (ToolMode::Named(name), Some(format))
        }
    };
    Ok(ToolPlan {
        tools,
        mode,
        format,
    })
}

fn functions(tools: &[Value]) -> Result<Vec<Function>, ApiError> {
    let bad = |m: String| ApiError::invalid("tools", m);
    let mut out: Vec<Function> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                return Err(bad(format!(
                    "tools[{i}]: only function tools are supported, not {other:?}"
                )));
            }
            None => return Err(bad(format!("tools[{i}].type must be \"function\""))),
        }
        let Some(f) = t.get("function").and_then(Value::as_object) else {
            return Err(bad(format!(
                "tools[{i}].function must be an object with a name"
            )));
        };
        let name = match f.get("name") {
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            _ => {
                return Err(bad(format!(
                    "tools[{i}].function.name must be a non-empty string"
                )));
            }
        };
        if out.iter().any(|o| o.name == name) {
            return Err(bad(format!(
                "tools[{i}]: the function name {name:?} is used twice"
            )));
        }
        if !matches!(
            f.get("description"),
            None | Some(Value::Null | Value::String(_))
        ) {
            return Err(bad(format!(
                "tools[{i}].function.description must be a string"
            )));
        }
        let parameters = match f.get("parameters") {
            // OpenAI: omitted parameters mean a function without parameters.
            None | Some(Value::Null) => {
                json!({"type": "object", "properties": {}, "additionalProperties": false})
            }
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(bad(format!(
                    "tools[{i}].function.parameters must be a JSON schema object"
                )));
            }
        };
        out.push(Function { name, parameters });
    }
    Ok(out)
}

fn choice(v: Option<Value>) -> Result<Option<Choice>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "tool_choice",
            "tool_choice must be \"none\", \"auto\", \"required\" or \
             {\"type\": \"function\", \"function\": {\"name\": …}}",
        )
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(Some(Choice::None)),
            "auto" => Ok(Some(Choice::Auto)),
            "required" => Ok(Some(Choice::Required)),
            _ => Err(bad()),
        },
        Some(Value::Object(o)) => {
            if o.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad());
            }
            match o.get("function").and_then(|f| f.get("name")) {
                Some(Value::String(name)) => Ok(Some(Choice::Named(name.clone()))),
                _ => Err(bad()),
            }
        }
        Some(_) => Err(bad()),
    }
}

/// `required`: a non-empty list of calls, each one of the functions with valid arguments.
fn required_format(functions: &[Function], parallel: bool) -> ResponseFormat {
    let calls: Vec<Value> = functions
        .iter()
        .map(|f| {
            json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
    if !parallel {
        schema["maxItems"] = 1.into();
    }
    ResponseFormat::JsonSchema {
        name: "tool_calls".into(),
        schema,
        strict: true,
    }
}

/// An assistant turn's `tool_calls` as templates expect them: OpenAI's shape with each
/// `function.arguments` (JSON text on the wire) parsed, as vLLM passes them, since templates
/// print arguments with `tojson`. Arguments that are not JSON stay text.
///
/// Errors: a 400 on `messages` for calls on another role than `assistant`, or a call without
/// a function name.
pub fn template_calls(
    role: &str,
    calls: Option<Vec<Value>>,
) -> Result<Option<Vec<Value>>, ApiError> {
    let Some(calls) = calls else { return Ok(None) };
    if role != "assistant" {
        return Err(ApiError::invalid(
            "messages",
            "only assistant messages carry tool_calls",
        ));
    }
    calls
        .into_iter()
        .map(|mut call| {
            let f = call
                .get_mut("function")
                .and_then(Value::as_object_mut)
                .filter(|f| f.get("name").is_some_and(Value::is_string))
                .ok_or_else(|| {
                    ApiError::invalid("messages", "each tool call needs a function with a name")
                })?;
            let parsed = match f.get("arguments") {
                Some(Value::String(text)) => serde_json::from_str::<Value>(text).ok(),
                _ => None,
            };
            if let Some(arguments) = parsed {
                f.insert("arguments".into(), arguments);
            }
            Ok(call)
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// A schema that fails to compile is reported by the serving core against `response_format`;
/// in a request whose constraint came from its tools (which cannot also carry a
/// `response_format`) the fault is in the functions' `parameters`.
pub fn blame_tools(mode: &ToolMode, e: ApiError) -> ApiError {
    match (mode, e) {
        (
            ToolMode::Required | ToolMode::Named(_),
            ApiError::InvalidArgument {
                param: Some("response_format"),
                message,
            },
        ) => ApiError::invalid(
            "tools",
            format!("the function parameters cannot constrain a tool call: {message}"),
        ),
        (_, e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]},
        }})
    }

    fn clock() -> Value {
        json!({"type": "function", "function": {"name": "now"}})
    }

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "now".into()]
    }

    fn param(e: ApiError) -> (Option<&'static str>, String) {
        match e {
            ApiError::InvalidArgument { param, message } => (param, message),
            other => panic!("not a 400: {other:?}"),
        }
    }

    #[test]
    fn tool_choice_defaults_and_modes() {
        let p = plan(Some(vec![weather(), clock()]), None, None).unwrap();
        assert_eq!(p.mode, ToolMode::Auto { names: names() }, "auto with tools");
        assert_eq!(p.tools.as_ref().map(Vec::len), Some(2));
        assert_eq!(p.format, None);
        assert_eq!(plan(None, None, None).unwrap(), ToolPlan::default());
        assert_eq!(
            plan(Some(vec![]), Some(json!("auto")), None).unwrap(),
            ToolPlan::default(),
            "an empty list is no tools"
        );
        // "none" still renders the tools, parses nothing.
        let p = plan(Some(vec![weather()]), Some(json!("none")), None).unwrap();
        assert_eq!((p.mode, p.tools.is_some()), (ToolMode::Off, true));

        let p = plan(
            Some(vec![weather(), clock()]),
            Some(json!({"type": "function", "function": {"name": "get_weather"}})),
            None,
        )
        .unwrap();
        assert_eq!(p.mode, ToolMode::Named("get_weather".into()));
        match p.format {
            Some(ResponseFormat::JsonSchema { schema, .. }) => {
                assert_eq!(schema, weather()["function"]["parameters"]);
            }
            other => panic!("{other:?}"),
        }
        // A function without parameters takes an empty object.
        let p = plan(
            Some(vec![clock()]),
            Some(json!({"type": "function", "function": {"name": "now"}})),
            None,
        )
        .unwrap();
        assert_eq!(
            p.format.map(|f| f.schema()),
            Some(json!({"type": "object", "properties": {}, "additionalProperties": false}))
        );
    }

    #[test]
    fn required_allows_any_offered_function_and_honours_parallel_tool_calls() {
        let p = plan(
            Some(vec![weather(), clock()]),
            Some(json!("required")),
            None,
        )
        .unwrap();
        assert_eq!(p.mode, ToolMode::Required);
        let schema = p.format.unwrap().schema();
        assert_eq!(schema["type"], "array");
        assert_eq!(schema["minItems"], 1);
        assert!(schema.get("maxItems").is_none());
        let calls = schema["items"]["anyOf"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["properties"]["name"]["const"], "get_weather");
        assert_eq!(
            calls[0]["properties"]["arguments"],
            weather()["function"]["parameters"]
        );
        assert_eq!(calls[1]["properties"]["name"]["const"], "now");
        let one = plan(Some(vec![weather()]), Some(json!("required")), Some(false)).unwrap();
        assert_eq!(one.format.unwrap().schema()["maxItems"], 1);
    }

    #[test]
    fn bad_tools_and_choices_are_400s_naming_the_problem() {
        let bad = |tools: Option<Vec<Value>>, choice: Option<Value>| {
            param(plan(tools, choice, None).unwrap_err())
        };
        let (p, m) = bad(Some(vec![json!({"type": "code_interpreter"})]), None);
        assert_eq!(p, Some("tools"));
        assert!(m.contains("only function tools"), "{m}");
        let (p, m) = bad(
            Some(vec![weather()]),
            Some(json!({"type": "function", "function": {"name": "get_time"}})),
        );
        assert_eq!(p, Some("tool_choice"));
        assert!(
            m.contains("\"get_time\"") && m.contains("not among the tools"),
            "{m}"
        );
        let (p, m) = bad(None, Some(json!("required")));
        assert_eq!(p, Some("tool_choice"));
        assert!(m.contains("needs tools"), "{m}");
        let (_, m) = bad(
            Some(vec![
                json!({"type": "function", "function": {"name": "f", "parameters": "x"}}),
            ]),
            None,
        );
        assert!(m.contains("tools[0].function.parameters"), "{m}");
        let (_, m) = bad(Some(vec![weather(), weather()]), None);
        assert!(m.contains("used twice"), "{m}");
        let (_, m) = bad(
            Some(vec![json!({"type": "function", "function": {}})]),
            None,
        );
        assert!(m.contains("tools[0].function.name"), "{m}");
        for choice in [json!("sometimes"), json!(3), json!({"type": "function"})] {
            let (p, _) = bad(Some(vec![weather()]), Some(choice));
            assert_eq!(p, Some("tool_choice"));
        }
    }

    #[test]
    fn schema_errors_of_forced_calls_name_tools() {
        let e = || ApiError::invalid("response_format", "invalid JSON schema: objekt");
        let (p, m) = param(blame_tools(&ToolMode::Named("f".into()), e()));
        assert_eq!(p, Some("tools"));
        assert!(m.contains("objekt"), "{m}");
        assert_eq!(
            param(blame_tools(&ToolMode::Required, e())).0,
            Some("tools")
        );
        // A response_format of an auto request is its own.
        let (p, _) = param(blame_tools(&ToolMode::Auto { names: names() }, e()));
        assert_eq!(p, Some("response_format"));
        let (p, _) = param(blame_tools(
            &ToolMode::Required,
            ApiError::invalid("ignore_eos", "x"),
        ));
        assert_eq!(p, Some("ignore_eos"));
    }

    fn chat(body: Value) -> Result<(GenerateSpec, openai::Shape), ApiError> {
        openai::chat_spec(openai::parse(body.to_string().as_bytes())?)
    }

    #[test]
    fn chat_requests_carry_tools_calls_and_results_to_the_template() {
        let args = r#"{"city": "Paris"}"#;
        let (spec, shape) = chat(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                    "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            ],
            "tools": [weather()],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }))
        .unwrap();
        assert_eq!(shape.tools, ToolMode::Named("get_weather".into()));
        assert_eq!(
            spec.response_format.map(|f| f.schema()),
            Some(weather()["function"]["parameters"].clone())
        );
        let crate::api::service::Prompt::Chat {
            messages, tools, ..
        } = spec.prompt
        else {
            panic!("a chat prompt");
        };
        assert_eq!(tools, Some(vec![weather()]));
        assert_eq!(messages[1].content, "");
        // Arguments arrive as JSON text and reach the template as JSON.
        assert_eq!(
            messages[1].tool_calls.as_ref().unwrap()[0]["function"]["arguments"],
            json!({"city": "Paris"})
        );
        assert_eq!(
            (
                messages[2].role.as_str(),
                messages[2].tool_call_id.as_deref()
            ),
            ("tool", Some("call_1"))
        );

        // A forced call decides the output's shape alone.
        let (p, m) = param(
            chat(
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                        "tools": [weather()], "tool_choice": "required",
                        "response_format": {"type": "json_object"}}),
            )
            .unwrap_err(),
        );
        assert_eq!(p, Some("response_format"));
        assert!(m.contains("tool_choice"), "{m}");
        // Auto leaves a response_format alone.
        let (spec, shape) = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                    "tools": [weather()], "response_format": {"type": "json_object"}}),
        )
        .unwrap();
        assert_eq!(spec.response_format, Some(ResponseFormat::JsonObject));
        assert_eq!(
            shape.tools,
            ToolMode::Auto {
                names: vec!["get_weather".into()]
            }
        );
        for bad in [
            json!({"role": "user", "content": "x", "tool_calls": []}),
            json!({"role": "assistant", "tool_calls": [{"function": {}}]}),
        ] {
            let (p, _) = param(chat(json!({"model": "m", "messages": [bad]})).unwrap_err());
            assert_eq!(p, Some("messages"));
        }
    }
}
