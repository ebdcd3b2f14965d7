"""Structured outputs through the official `openai` package and a `grpcio` client: outputs
parse as JSON and validate against the schema (checked by the independent `jsonschema`
package), while free requests running in the same batches still equal the engine's direct
output. `e2e/tests/structured.rs` runs this file against a unified agent and against a decode
agent whose prompts are all prefilled remotely (its prefill peer samples the first token under
the same grammar)."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}


def person_format(strict=True):
    return {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": strict},
    }


@pytest.fixture(scope="module")
def client(http_addr):
    return openai.OpenAI(base_url=f"http://{http_addr}/v1", api_key="unused", max_retries=0)


def free_cases(expected):
    return expected["free"]


def check_person(text):
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    return value


def test_the_free_outputs_are_not_json(expected):
    """What makes the constrained checks meaningful: the tiny model's own greedy output for the
    same prompts is not JSON."""
    for c in free_cases(expected):
        with pytest.raises(ValueError):
            json.loads(c["text"])


def test_chat_json_schema(client, expected):
    for c in free_cases(expected):
        r = client.chat.completions.create(
            model=c["model"],
            messages=c["messages"],
            max_tokens=96,
            temperature=0,
            response_format=person_format(),
        )
        check_person(r.choices[0].message.content)
        assert r.choices[0].finish_reason == "stop", c["name"]


def test_chat_json_schema_streaming_and_sampled(client, expected):
    c = free_cases(expected)[0]
    for temperature, seed in [(0, None), (1.0, 7), (0.8, 11)]:
        stream = client.chat.completions.create(
            model=c["model"],
            messages=c["messages"],
            max_tokens=96,
            temperature=temperature,
            seed=seed,
            stream=True,
            response_format=person_format(strict=False),
        )
        text, finish = "", []
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
        check_person(text)
        assert finish == ["stop"]


def test_completions_json_object(client, expected):
    for c in free_cases(expected):
        r = client.completions.create(
            model=c["model"],
            prompt=c["prompt"],
            max_tokens=64,
            temperature=0,
            extra_body={"response_format": {"type": "json_object"}},
        )
        choice = r.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict), choice.text
        else:
            # JSON mode allows arbitrarily long objects; what was produced is still a prefix of
            # one, so it opens like one.
            assert choice.finish_reason == "length" and choice.text.startswith("{")


def test_max_tokens_ends_an_unfinished_output_with_length(client, expected):
    c = free_cases(expected)[0]
    r = client.chat.completions.create(
        model=c["model"],
        messages=c["messages"],
        max_tokens=3,
        temperature=0,
        response_format=person_format(),
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    assert r.choices[0].message.content.startswith("{")
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)


def test_a_mixed_batch(client, expected):
    """Free requests stream while constrained ones run: the constrained outputs validate, and
    every free output is still exactly the engine's direct output."""
    cases = free_cases(expected)
    started = [threading.Event() for _ in cases]
    constrained_done = []

    def free(i):
        c = cases[i]
        stream = client.chat.completions.create(
            model=c["model"],
            messages=c["messages"],
            max_tokens=c["max_tokens"],
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text = ""
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
            started[i].set()
        started[i].set()
        return text, time.monotonic()

    def constrained(i):
        c = cases[i % len(cases)]
        r = client.chat.completions.create(
            model=c["model"],
            messages=c["messages"],
            max_tokens=96,
            temperature=0,
            response_format=person_format(),
        )
        constrained_done.append(time.monotonic())
        return r

    with ThreadPoolExecutor(max_workers=len(cases) + 4) as pool:
        frees = [pool.submit(free, i) for i in range(len(cases))]
        for e in started:
            assert e.wait(60), "a free stream produced nothing"
        shaped = [pool.submit(constrained, i) for i in range(4)]
        for f in shaped:
            r = f.result(timeout=120)
            check_person(r.choices[0].message.content)
            assert r.choices[0].finish_reason == "stop"
        for c, f in zip(cases, frees):
            text, finished = f.result(timeout=120)
            assert text == c["text"], c["name"]
            # The free request was still generating when the constrained ones were done: they
            # shared the engine's steps.
            assert finished > max(constrained_done), c["name"]


def test_an_invalid_schema_is_a_400_naming_the_problem(client, expected):
    c = free_cases(expected)[0]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=c["model"],
            messages=c["messages"],
            max_tokens=8,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "objekt"}},
            },
        )
    assert e.value.status_code == 400
    assert "objekt" in e.value.message
    assert e.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=c["model"],
            prompt="x",
            max_tokens=8,
            extra_body={"response_format": {"type": "yaml"}},
        )
    assert e.value.status_code == 400


@pytest.fixture(scope="module")
def stub(pb, grpc_addr):
    _, services = pb
    channel = grpc.insecure_channel(grpc_addr)
    yield services.InferenceStub(channel)
    channel.close()


def grpc_request(messages, c, response_format, max_tokens=96):
    chat = messages.ChatPrompt(
        messages=[messages.ChatMessage(role=m["role"], content=m["content"]) for m in c["messages"]],
        add_generation_prompt=True,
    )
    return messages.GenerateRequest(
        adapter=c["adapter"],
        chat=chat,
        sampling=messages.SamplingParams(max_tokens=max_tokens),
        response_format=response_format,
    )


def test_grpc_json_schema(pb, stub, expected):
    messages, _ = pb
    fmt = messages.ResponseFormat(
        json_schema=messages.JsonSchema(name="person", schema=json.dumps(PERSON), strict=True)
    )
    for c in free_cases(expected):
        text, last = "", None
        for response in stub.Generate(grpc_request(messages, c, fmt), timeout=60):
            text += response.text
            last = response
        check_person(text)
        assert last.finish_reason == messages.FINISH_REASON_STOP
    obj = messages.ResponseFormat(json_object=messages.JsonObject())
    text = "".join(r.text for r in stub.Generate(grpc_request(messages, c, obj, 64), timeout=60))
    assert text.startswith("{")


def test_grpc_invalid_schema_is_invalid_argument(pb, stub, expected):
    messages, _ = pb
    c = free_cases(expected)[0]
    for schema in ['{"type": "objekt"}', "not json", "[1]"]:
        fmt = messages.ResponseFormat(json_schema=messages.JsonSchema(name="bad", schema=schema))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(grpc_request(messages, c, fmt), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, schema
        assert "schema" in e.value.details()
