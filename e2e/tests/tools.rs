//! Tool calling end to end: `e2e/clients/tool_calls.py` (the official `openai` package and the
//! `jsonschema` validator) against an agent serving the tiny fixture model with a tools chat
//! template (`fixtures model --chat-template tools`), and against one serving the default
//! template, which must refuse tools. A follow-up turn carrying an assistant tool call and a
//! tool result must render exactly as the template does in-process and give the engine's
//! direct greedy output for that prompt.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loraplane_agent::model::tokenizer::{ChatMessage, TokenizerBundle};
use loraplane_e2e::{Agent, Oracle, World, run_pytest};
use serde_json::{Value, json};

const CLIENTS: &str = "e2e/clients/tool_calls.py";
const FOLLOW_UP_MAX_TOKENS: usize = 12;

/// The tools the client offers (the Python file reads them from here too).
fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "minLength": 1, "maxLength": 12},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": false,
            },
        }},
        {"type": "function", "function": {
            "name": "get_time",
            "description": "The time in a zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 8}},
                "required": ["zone"],
                "additionalProperties": false,
            },
        }},
    ])
}

/// A finished tool round, as the client sends it back (arguments are JSON text on the wire).
fn follow_up() -> Value {
    json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{
            "id": "call_fixed_0", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"unit\":\"celsius\"}"},
        }]},
        {"role": "tool", "tool_call_id": "call_fixed_0", "content": "18 degrees, clear"},
    ])
}

/// The follow-up's prompt as the template renders it in-process (arguments parsed to JSON, as
/// the agent passes them), and the engine's greedy output for it.
async fn expected_follow_up(model: &std::path::Path) -> Value {
    let tok = TokenizerBundle::load(model, &[]).unwrap();
    let messages = vec![
        ChatMessage::new("user", "What is the weather in Paris?"),
        ChatMessage {
            tool_calls: Some(vec![json!({
                "id": "call_fixed_0", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
            })]),
            ..ChatMessage::new("assistant", "")
        },
        ChatMessage {
            tool_call_id: Some("call_fixed_0".into()),
            ..ChatMessage::new("tool", "18 degrees, clear")
        },
    ];
    let tools = tools().as_array().unwrap().clone();
    let text = tok
        .render_chat_with_tools(&messages, Some(&tools), true)
        .unwrap();
    assert!(
        text.contains("<tool_response>\n18 degrees, clear\n</tool_response>")
            && text.contains(r#""arguments": {"city":"Paris","unit":"celsius"}}"#),
        "{text}"
    );
    let prompt = tok.encode(&text, false).unwrap();
    let oracle = Oracle::new(model);
    let e = oracle
        .greedy(None, prompt.clone(), FOLLOW_UP_MAX_TOKENS)
        .await;
    assert!(
        !e.text.contains("<tool_call>"),
        "the check below needs an output that is not a call: {:?}",
        e.text
    );
    json!({
        "messages": follow_up(),
        "prompt_tokens": prompt.len(),
        "max_tokens": FOLLOW_UP_MAX_TOKENS,
        "text": e.text,
        "completion_tokens": e.tokens.len(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_through_the_openai_client() {
    let world = World::tiny();
    let with_tools = world.tiny_model("tiny-tools", &["--chat-template", "tools"]);
    let plain = Agent::start(&world, &[]);
    let agent = Agent::start_from(&world, with_tools.as_os_str(), &[], &[]);
    let expected = json!({
        "tools": tools(),
        "follow_up": expected_follow_up(&with_tools).await,
        "plain_http": plain.http.to_string(),
    });
    let expected_path = world.path("expected-tools.json");
    std::fs::write(&expected_path, expected.to_string()).unwrap();
    run_pytest(CLIENTS, &agent, &expected_path, &world.path("py-tools"));
}
