"""Property-based fuzzing of the HTTP API from its own OpenAPI schema, against a real
gateway with the real llama-server: no request, valid or not, gets a 5xx, and every 4xx
says in JSON what was wrong. Run alone with `make fuzz`.

Left out: what would stop or reconfigure the server under test (/shutdown, /command,
/model/switch). Answers are capped at a few tokens and tools are off, so that generation
time stays small; everything else goes through as generated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from conftest import GatewayProcess
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES_PER_OPERATION = 12
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def fuzzed_gateway(
    llama_server_binary: Path, real_models: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    server = GatewayProcess(llama_server_binary, tmp_path_factory.mktemp("fuzzed")).start()
    try:
        off = requests.post(
            f"{server.url}/command", json={"command": "tools", "value": "off"}, timeout=10
        )
        assert off.status_code == 200
        yield server
    finally:
        server.stop()


def check(case: schemathesis.Case, base_url: str) -> None:
    if isinstance(case.body, dict) and case.method.upper() == "POST":
        case.body["max_tokens"] = MAX_TOKENS
    response = case.call(base_url=base_url, timeout=120)
    shown = f"{case.as_curl_command()} -> {response.status_code} {response.text[:300]}"
    assert response.status_code < 500, shown
    if 400 <= response.status_code < 500:
        assert refusal_message(response.json()), shown


def refusal_message(body: dict) -> str | None:
    """The gateway's `detail`, or the OpenAI-style `error.message` of the /v1 front."""
    error = body.get("error")
    return body.get("detail") or (error.get("message") if isinstance(error, dict) else None)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_server_error_and_every_refusal_says_why(
    fuzzed_gateway: GatewayProcess, mode: GenerationMode
) -> None:
    url = fuzzed_gateway.url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json").exclude(
        path_regex="^/(shutdown|command|model/switch)$"
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 10
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case) -> None:
            check(case, url)

        try:
            fuzz()
        except Unsatisfiable:
            # An operation without inputs has no invalid request to send.
            assert mode is GenerationMode.NEGATIVE
