"""The official `openai` package against the agent: completions and chat, streaming and not.
Greedy text must equal the engine's direct output."""

import openai
import pytest


@pytest.fixture(scope="module")
def client(http_addr):
    # No API keys are configured on this agent: any key is accepted as tenant `default`.
    return openai.OpenAI(base_url=f"http://{http_addr}/v1", api_key="unused", max_retries=0)


def cases(expected, kind):
    return [c for c in expected["cases"] if (c["prompt"] is not None) == (kind == "completion")]


def test_models_lists_base_and_adapter(client, expected):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == expected["base_model"]
    assert "sql" in ids


def test_completions(client, expected):
    for c in cases(expected, "completion"):
        r = client.completions.create(
            model=c["model"], prompt=c["prompt"], max_tokens=c["max_tokens"], temperature=0
        )
        assert r.choices[0].text == c["text"], c["name"]
        assert r.usage.completion_tokens == len(c["token_ids"]), c["name"]
        assert r.usage.prompt_tokens == c["prompt_tokens"], c["name"]


def test_completions_streaming(client, expected):
    for c in cases(expected, "completion"):
        stream = client.completions.create(
            model=c["model"],
            prompt=c["prompt"],
            max_tokens=c["max_tokens"],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, finish = "", None, []
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.text
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
            if chunk.usage is not None:
                usage = chunk.usage
        assert text == c["text"], c["name"]
        assert len(finish) == 1, c["name"]
        assert usage is not None and usage.completion_tokens == len(c["token_ids"]), c["name"]


def test_chat(client, expected):
    for c in cases(expected, "chat"):
        r = client.chat.completions.create(
            model=c["model"], messages=c["messages"], max_tokens=c["max_tokens"], temperature=0
        )
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == c["text"], c["name"]
        assert r.usage.completion_tokens == len(c["token_ids"]), c["name"]


def test_chat_streaming(client, expected):
    for c in cases(expected, "chat"):
        stream = client.chat.completions.create(
            model=c["model"],
            messages=c["messages"],
            max_tokens=c["max_tokens"],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        assert text == c["text"], c["name"]
        assert usage is not None and usage.prompt_tokens == c["prompt_tokens"], c["name"]


def test_errors_are_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, n=2)
    assert e.value.status_code == 400
