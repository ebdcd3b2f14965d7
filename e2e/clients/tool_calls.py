"""Tool calling through the official `openai` package. `e2e/tests/tools.rs` runs this file
against an agent serving the tiny fixture model with a tools chat template; `plain_http` in the
expected file is a second agent serving the default template, which has no tools.

A forced call (a named function, or `tool_choice="required"`) comes back as `tool_calls` whose
arguments parse as JSON and validate against the function's schema (checked by the independent
`jsonschema` package), whole or streamed; a follow-up turn carrying the call and its `tool`
result renders exactly as the template does in-process and gives the engine's own output."""

import json

import jsonschema
import openai
import pytest

USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(http_addr):
    return openai.OpenAI(base_url=f"http://{http_addr}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tools(expected):
    return expected["tools"]


def schemas(tools):
    return {t["function"]["name"]: t["function"]["parameters"] for t in tools}


def check_calls(message, tools):
    """The message is only calls, each to an offered function with valid arguments."""
    assert message.content is None, message
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function"
        assert call.id.startswith("call_"), call.id
        jsonschema.validate(json.loads(call.function.arguments), schemas(tools)[call.function.name])
    ids = [c.id for c in message.tool_calls]
    assert len(set(ids)) == len(ids)


def named(name):
    return {"type": "function", "function": {"name": name}}


def test_a_named_function_is_called_with_valid_arguments(client, tools):
    for name in ["get_weather", "get_time"]:
        r = client.chat.completions.create(
            model="base",
            messages=USER,
            tools=tools,
            tool_choice=named(name),
            max_tokens=96,
            temperature=0,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        check_calls(choice.message, tools)
        assert [c.function.name for c in choice.message.tool_calls] == [name]


def test_required_calls_one_of_the_tools(client, tools):
    for temperature, seed in [(0, None), (1.0, 5)]:
        r = client.chat.completions.create(
            model="base",
            messages=USER,
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=128,
            temperature=temperature,
            seed=seed,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        check_calls(choice.message, tools)
        assert len(choice.message.tool_calls) == 1


def test_streamed_calls_arrive_whole_in_the_last_chunk(client, tools):
    stream = client.chat.completions.create(
        model="base",
        messages=USER,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=128,
        temperature=0,
        stream=True,
    )
    content, calls, finish = "", [], []
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls.extend(choice.delta.tool_calls or [])
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert finish == ["tool_calls"]
    assert content == ""
    assert len(calls) == 1
    call = calls[0]
    assert call.index == 0 and call.id.startswith("call_") and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), schemas(tools)[call.function.name])


def test_a_follow_up_turn_with_the_tool_result(client, tools, expected):
    f = expected["follow_up"]
    r = client.chat.completions.create(
        model="base",
        messages=f["messages"],
        tools=tools,
        max_tokens=f["max_tokens"],
        temperature=0,
    )
    assert r.usage.prompt_tokens == f["prompt_tokens"], "rendered as the template does"
    choice = r.choices[0]
    assert choice.message.content == f["text"]
    assert choice.message.tool_calls is None
    assert r.usage.completion_tokens == f["completion_tokens"]
    assert choice.finish_reason in ("stop", "length")


def test_bad_tool_requests_are_400s(client, tools):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="base", messages=USER, tools=tools, tool_choice=named("get_stock"), max_tokens=4
        )
    assert e.value.param == "tool_choice"
    assert "get_stock" in e.value.message
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="base", messages=USER, tools=bad, tool_choice="required", max_tokens=4
        )
    assert e.value.param == "tools"
    assert "objekt" in e.value.message


def test_a_template_without_tools_refuses_them(expected, tools):
    plain = openai.OpenAI(
        base_url=f"http://{expected['plain_http']}/v1", api_key="unused", max_retries=0
    )
    with pytest.raises(openai.BadRequestError) as e:
        plain.chat.completions.create(model="base", messages=USER, tools=tools, max_tokens=4)
    assert e.value.status_code == 400
    assert e.value.param == "tools"
    assert "chat template does not support tools" in e.value.message
    # Without tools the same agent answers.
    r = plain.chat.completions.create(model="base", messages=USER, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
