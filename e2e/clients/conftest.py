"""Fixtures for the Python clients of the whole-system tests.

`e2e/tests/surfaces.rs` starts the real agent and runs pytest here with:
  LORAPLANE_E2E_HTTP      host:port of the OpenAI-compatible HTTP API
  LORAPLANE_E2E_GRPC      host:port of the gRPC API
  LORAPLANE_E2E_EXPECTED  JSON file with the engine's direct greedy output per case
  LORAPLANE_E2E_PROTO_ROOT the repository's proto/ directory
  LORAPLANE_E2E_TMP       a scratch directory (the gRPC stubs are generated into it)
"""

import importlib
import json
import os
import sys

import pytest


def _env(name):
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} is not set: run through `cargo test -p loraplane-e2e --test surfaces`")
    return value


@pytest.fixture(scope="session")
def http_addr():
    return _env("LORAPLANE_E2E_HTTP")


@pytest.fixture(scope="session")
def grpc_addr():
    return _env("LORAPLANE_E2E_GRPC")


@pytest.fixture(scope="session")
def expected():
    with open(_env("LORAPLANE_E2E_EXPECTED"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def pb():
    """Python modules generated from proto/loraplane/v1/inference.proto with grpcio-tools."""
    from grpc_tools import protoc

    proto_root = _env("LORAPLANE_E2E_PROTO_ROOT")
    out = os.path.join(_env("LORAPLANE_E2E_TMP"), "pb")
    os.makedirs(out, exist_ok=True)
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "loraplane/v1/inference.proto",
        ]
    )
    assert rc == 0, "protoc failed"
    sys.path.insert(0, out)
    messages = importlib.import_module("loraplane.v1.inference_pb2")
    services = importlib.import_module("loraplane.v1.inference_pb2_grpc")
    return messages, services
