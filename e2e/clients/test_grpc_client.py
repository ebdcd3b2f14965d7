"""A `grpcio` client generated from our protos at test time: greedy token ids and text must
equal the engine's direct output."""

import grpc
import pytest


@pytest.fixture(scope="module")
def stub(pb, grpc_addr):
    _, services = pb
    channel = grpc.insecure_channel(grpc_addr)
    yield services.InferenceStub(channel)
    channel.close()


def request(messages, c):
    sampling = messages.SamplingParams(max_tokens=c["max_tokens"])
    if c["prompt"] is not None:
        return messages.GenerateRequest(
            request_id="py-" + c["name"], adapter=c["adapter"], text=c["prompt"], sampling=sampling
        )
    chat = messages.ChatPrompt(
        messages=[messages.ChatMessage(role=m["role"], content=m["content"]) for m in c["messages"]],
        add_generation_prompt=True,
    )
    return messages.GenerateRequest(
        request_id="py-" + c["name"], adapter=c["adapter"], chat=chat, sampling=sampling
    )


def test_generate_matches_the_engine(pb, stub, expected):
    messages, _ = pb
    for c in expected["cases"]:
        ids, text, last = [], "", None
        for response in stub.Generate(request(messages, c), timeout=60):
            ids.extend(response.token_ids)
            text += response.text
            last = response
        assert ids == c["token_ids"], c["name"]
        assert text == c["text"], c["name"]
        assert last.request_id == "py-" + c["name"]
        assert last.finish_reason in (messages.FINISH_REASON_STOP, messages.FINISH_REASON_LENGTH)
        assert last.usage.completion_tokens == len(c["token_ids"])


def test_invalid_requests_are_invalid_argument(pb, stub):
    messages, _ = pb
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(messages.GenerateRequest(adapter=""), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(messages.GenerateRequest(adapter="missing", text="hi"), timeout=10))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
