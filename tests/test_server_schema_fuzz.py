"""Schema-driven fuzz of the reward server's HTTP API with schemathesis: cases generated from the
app's own OpenAPI schema (built by ``app.openapi()``; the server does not serve it), valid and
invalid, sent over real HTTP on loopback. No answer may be a 5xx, every answer must match its
declared status codes and schemas. Bounded: a few seconds."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from rewards.server import BackgroundServer, create_app  # noqa: E402
from rewards.wire import BINARY_TYPE  # noqa: E402

schemathesis.serializer.alias(BINARY_TYPE, "application/octet-stream")   # the binary body: raw bytes
APP = create_app({"frame_change": 1.0}, max_request_bytes=1 << 16)
schema = schemathesis.openapi.from_dict(APP.openapi())
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def base_url():
    with BackgroundServer(APP) as url:
        yield url


@schema.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_api_answers_every_generated_request_as_its_schema_says(case, base_url):
    case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)


def test_no_generated_request_was_counted_as_failed(base_url):
    """Runs after the fuzz in this module: the server's own count of 5xx answers is zero."""
    import httpx

    assert httpx.get(base_url + "/health").json()["stats"]["requests_failed"] == 0
