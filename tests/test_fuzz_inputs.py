"""Property-based fuzz (hypothesis, bounded) of the config loader and the reward server's wire
format: any input gives a result or the module's own one-line error, never another exception."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import typing

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flowdppo_video.runs.config import (
    INF_ALLOWED, Config, ConfigError, config_to_dict, load_config, parse_overrides)
from rewards.wire import BINARY_TYPE, MAGIC, WireError, decode_request  # noqa: E402

from .conftest import TINY_CONFIG  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
                database=None)


def _dotted_keys(cls: type = Config, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _dotted_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


KEYS = _dotted_keys()
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + "x"), st.text(max_size=10))


def _yaml_value(v: object) -> str:
    """``v`` as a YAML flow value (JSON is YAML, except for its spelling of NaN and the infinities)."""
    def fix(x):
        if isinstance(x, float) and not math.isfinite(x):
            return "__nan__" if math.isnan(x) else ("__inf__" if x > 0 else "__ninf__")
        if isinstance(x, list):
            return [fix(y) for y in x]
        if isinstance(x, dict):
            return {k: fix(y) for k, y in x.items()}
        return x
    return (json.dumps(fix(v)).replace('"__nan__"', ".nan").replace('"__inf__"', ".inf")
            .replace('"__ninf__"', "-.inf"))


def _all_finite(x: object, key: str = "") -> bool:
    """No NaN or infinity anywhere, but +inf where it means "off" (``INF_ALLOWED``)."""
    if isinstance(x, float):
        return math.isfinite(x) or (x == math.inf and key in INF_ALLOWED)
    if isinstance(x, dict):
        return all(_all_finite(v, f"{key}.{k}" if key else str(k)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(_all_finite(v, f"{key}[{i}]") for i, v in enumerate(x))
    return True


@FUZZ
@given(st.lists(st.tuples(keys, values), max_size=4))
def test_config_overrides_give_a_config_or_one_config_error(pairs):
    overrides = [f"{k}={_yaml_value(v)}" for k, v in pairs]
    try:
        cfg = load_config(TINY_CONFIG, overrides)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert _all_finite(config_to_dict(cfg))      # whatever loads holds no NaN or infinity
    o = cfg.optim
    assert o.lr > 0 and o.eps > 0 and o.weight_decay >= 0 and all(0 <= b < 1 for b in o.betas)
    assert cfg.video.height >= 1 and cfg.video.width >= 1 and cfg.video.num_frames >= 1


@FUZZ
@given(st.lists(st.text(max_size=30), max_size=4))
def test_raw_override_text_never_escapes_as_another_exception(items):
    try:
        parse_overrides(items)
    except ConfigError as e:
        assert "\n" not in str(e)


@FUZZ
@given(st.text(max_size=200))
def test_any_yaml_file_is_a_config_or_one_config_error(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    f.write_text(text)
    try:
        load_config(f)
    except ConfigError as e:
        assert "\n" not in str(e)


json_docs = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                         lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                 st.dictionaries(st.sampled_from(
                                                     ["videos", "shape", "dtype", "data", "prompts", "rewards", "x"]),
                                                     inner, max_size=4)),
                         max_leaves=12)


@FUZZ
@given(st.one_of(st.binary(max_size=300), json_docs.map(lambda d: json.dumps(d).encode())),
       st.sampled_from(["application/json", BINARY_TYPE, "", "text/plain"]))
def test_any_body_decodes_or_is_one_wire_error(body, content_type):
    for b in (body, MAGIC + struct.pack("<I", len(body)) + body):
        try:
            decode_request(b, content_type)
        except WireError as e:
            assert "\n" not in str(e)


@pytest.fixture(scope="module")
def served():
    from rewards.server import BackgroundServer, create_app

    with BackgroundServer(create_app({"frame_change": 1.0}, max_request_bytes=1 << 16)) as url:
        yield url


def _small_request(shape, prompts, subset) -> bytes:
    """A binary body by hand (so the fuzz does not depend on the encoder's signature); prompts and
    the reward subset as drawn, so many do not match the videos."""
    import math as m
    header = json.dumps({"shape": list(shape), "dtype": "uint8", "prompts": prompts, "rewards": subset,
                         "fps": 8.0}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + bytes(m.prod(shape))


http_bodies = st.one_of(
    st.binary(max_size=400),
    json_docs.map(lambda d: json.dumps(d).encode()),
    st.builds(_small_request, st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4),
                                        st.just(3)),
              st.lists(st.text(max_size=5), min_size=1, max_size=2),
              st.one_of(st.none(), st.lists(st.sampled_from(["frame_change", "nope"]), max_size=2))),
    st.integers(17, 3000).map(lambda n: b"[" * n + b"]" * n),
)


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(http_bodies, st.sampled_from(["application/json", BINARY_TYPE, "text/plain", "", "application/json; x=1"]),
       st.sampled_from(["/score", "/health", "/nope"]), st.sampled_from(["POST", "GET", "PUT"]))
def test_the_http_api_never_answers_5xx_to_any_request(served, body, content_type, path, method):
    """Random bodies, types, paths and methods over real HTTP: a 2xx or a JSON 4xx with a reason,
    never a 5xx, and the server keeps serving (the counters say none failed)."""
    import httpx

    r = httpx.request(method, served + path, content=body, headers={"content-type": content_type}, timeout=30)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert isinstance(r.json().get("error"), str) and "\n" not in r.json()["error"]
    assert httpx.get(served + "/health").json()["stats"]["requests_failed"] == 0


@pytest.mark.parametrize("key", INF_ALLOWED)
def test_inf_means_off_only_where_allowed(key):
    assert math.isinf(getattr(load_config(TINY_CONFIG, [f"{key}=.inf"]).objective, key.split(".")[1]))
    with pytest.raises(ConfigError, match=rf"{key} must be a finite number, got nan"):
        load_config(TINY_CONFIG, [f"{key}=.nan"])
    with pytest.raises(ConfigError, match=r"objective.beta must be a finite number, got inf"):
        load_config(TINY_CONFIG, ["objective.beta=.inf"])
