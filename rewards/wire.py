"""The reward server's wire format, shared by :mod:`rewards.server` and :mod:`rewards.remote`.

No pickle anywhere: a request carries raw uint8 pixels plus a JSON header, a response is JSON.

Request (``POST /score``), either of two bodies:

* ``Content-Type: application/x-flowdppo-videos`` (what :class:`rewards.remote.RemoteReward`
  sends; no base64, no copy of the pixels into a JSON string)::

      b"FDV1" | uint32 little-endian n | n bytes of UTF-8 JSON header | raw video bytes

  header ``{"shape": [B, F, H, W, 3], "dtype": "uint8", "prompts": [B strings], "fps": F,
  "rewards": [names] or null}``; the raw bytes are the C-order array, exactly
  ``B*F*H*W*3`` of them.
* ``Content-Type: application/json`` (easy from any language)::

      {"videos": {"shape": [B, F, H, W, 3], "dtype": "uint8", "data": "<base64 of the raw bytes>"},
       "prompts": [...], "fps": F, "rewards": [...] or null}

``fps`` (required since wire version 2) is the videos' real frame rate, a number > 0: the served
rewards are called with it (motion speed is per second, judges sample frames per second).

``audio`` (optional, since wire version 3): the videos' sound, handed to the served rewards that
take it (:class:`rewards.registry.Audio`). In the binary body the header holds
``"audio": {"shape": [B, C, T], "dtype": "float32", "sample_rate": R}`` and the little-endian
float32 waveforms follow the pixels (``B*C*T*4`` bytes); in the JSON body ``"audio"`` holds the same
keys and ``"data"``, base64 of those bytes. Without it the rewards that take sound get None.

Response (JSON): ``{"scores": {name: ARRAY}, "extras": {"name/key": ARRAY}, "weights": {name: w},
"batch": {"requests": r, "videos": n}, "elapsed_s": t}`` where ``ARRAY`` is
``{"dtype": "float32", "shape": [B], "data": "<base64 of little-endian float32>"}``: exact to the
bit and safe for non-finite extras, which plain JSON numbers are not. Errors are
``{"error": "one line"}`` with a 4xx (the request) or 5xx (a reward) status.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .registry import Audio, RewardError

MAGIC = b"FDV1"
BINARY_TYPE = "application/x-flowdppo-videos"
JSON_TYPE = "application/json"
MAX_HEADER_BYTES = 16 << 20   # prompts of a large batch fit many times over
WIRE_VERSION = 3              # 2: requests carry fps (a version 1 server would ignore it); 3: and may carry audio
MAX_JSON_DEPTH = 16           # a request nests 3 deep; deeper is refused (a clean 400)


class WireError(ValueError):
    """A malformed request or response; the message is one line naming the field."""


@dataclass
class ScoreRequest:
    """A decoded request: ``videos`` ``(B, F, H, W, 3)`` uint8, ``B`` prompts, their frame rate, an
    optional reward subset."""

    videos: torch.Tensor
    prompts: list[str]
    fps: float
    rewards: list[str] | None
    audio: Audio | None = None


def _audio_array(audio: Audio, b: int) -> np.ndarray:
    if audio.waveforms.shape[0] != b:
        raise WireError(f"audio has {audio.waveforms.shape[0]} waveforms for {b} videos")
    return np.ascontiguousarray(audio.waveforms.detach().cpu().float().numpy(), dtype="<f4")


def encode_request(videos: torch.Tensor, prompts: list[str], fps: float,
                   rewards: list[str] | None = None, audio: Audio | None = None) -> bytes:
    """The binary body for ``(B, F, H, W, 3)`` uint8 ``videos`` shown at ``fps``, with their sound
    when given (module docstring)."""
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise WireError(f"videos must be (B, F, H, W, 3) uint8, got {tuple(videos.shape)} {videos.dtype}")
    doc = {"shape": list(videos.shape), "dtype": "uint8", "prompts": list(prompts), "fps": _check_fps(fps, "fps"),
           "rewards": None if rewards is None else list(rewards)}
    wave = None
    if audio is not None:
        wave = _audio_array(audio, videos.shape[0])
        doc["audio"] = {"shape": list(wave.shape), "dtype": "float32", "sample_rate": int(audio.sample_rate)}
    header = json.dumps(doc).encode()
    pixels = videos.detach().cpu().contiguous().numpy()
    # join copies the pixels once (tobytes() first would copy them twice)
    parts = [MAGIC, struct.pack("<I", len(header)), header, memoryview(pixels).cast("B")]
    if wave is not None:
        parts.append(memoryview(wave).cast("B"))
    return b"".join(parts)


def encode_json_request(videos: torch.Tensor, prompts: list[str], fps: float,
                        rewards: list[str] | None = None, audio: Audio | None = None) -> dict[str, Any]:
    """The JSON body for ``(B, F, H, W, 3)`` uint8 ``videos`` shown at ``fps`` (base64 of the raw bytes)."""
    v = videos.detach().cpu().contiguous()
    doc = {"videos": {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                      "data": base64.b64encode(v.numpy().tobytes()).decode()},
           "prompts": list(prompts), "fps": _check_fps(fps, "fps"),
           "rewards": None if rewards is None else list(rewards)}
    if audio is not None:
        wave = _audio_array(audio, v.shape[0])
        doc["audio"] = {"shape": list(wave.shape), "dtype": "float32", "sample_rate": int(audio.sample_rate),
                        "data": base64.b64encode(wave.tobytes()).decode()}
    return doc


def decode_request(body: bytes | bytearray, content_type: str) -> ScoreRequest:
    """Parse and check a ``/score`` body; every problem is a :class:`WireError` naming the field."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == BINARY_TYPE:
        return _decode_binary(body)
    if kind in (JSON_TYPE, ""):
        return _decode_json(body)
    raise WireError(f"unsupported Content-Type {content_type!r}: send {BINARY_TYPE} or {JSON_TYPE}")


def _decode_binary(body: bytes | bytearray) -> ScoreRequest:
    if len(body) < 8 or body[:4] != MAGIC:
        raise WireError(f"body does not start with the {MAGIC.decode()} magic (not an {BINARY_TYPE} body)")
    (n,) = struct.unpack("<I", body[4:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(body):
        raise WireError(f"header length {n} exceeds the body ({len(body)} bytes)")
    header = _loads(bytes(body[8:8 + n]), "header")
    if not isinstance(header, dict):
        raise WireError("header must be a JSON object with shape, dtype, prompts")
    shape = _check_shape(header.get("shape"), header.get("dtype"), "header")
    audio_shape = _check_audio(header.get("audio"), shape[0], "header.audio")
    tail = 4 * math.prod(audio_shape) if audio_shape else 0
    start = 8 + n + math.prod(shape)
    if len(body) - 8 - n != math.prod(shape) + tail:
        what = f" and audio {list(audio_shape)} float32 {tail}" if audio_shape else ""
        raise WireError(f"the body after the header holds {len(body) - 8 - n} bytes, but shape {list(shape)} uint8 "
                        f"needs {math.prod(shape)}{what}")
    audio = None if not audio_shape else _audio(bytes(body[start:]), audio_shape, header["audio"], "header.audio")
    return _finish(_pixels(body[:start], 8 + n, shape, "the body after the header"), header, "header", audio)


def _decode_json(body: bytes | bytearray) -> ScoreRequest:
    doc = _loads(body, "body")
    if not isinstance(doc, dict) or not isinstance(doc.get("videos"), dict):
        raise WireError("body must be a JSON object with videos {shape, dtype, data}, prompts")
    v = doc["videos"]
    shape = _check_shape(v.get("shape"), v.get("dtype"), "videos")
    if not isinstance(v.get("data"), str):
        raise WireError("videos.data must be a base64 string of the raw uint8 bytes")
    try:
        raw = bytearray(base64.b64decode(v["data"], validate=True))
    except (binascii.Error, ValueError) as e:
        raise WireError(f"videos.data is not valid base64: {e}") from None
    audio = None
    a = doc.get("audio")
    audio_shape = _check_audio(a, shape[0], "audio")
    if audio_shape:
        if not isinstance(a.get("data"), str):
            raise WireError("audio.data must be a base64 string of the little-endian float32 waveforms")
        try:
            wave = base64.b64decode(a["data"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise WireError(f"audio.data is not valid base64: {e}") from None
        if len(wave) != 4 * math.prod(audio_shape):
            raise WireError(f"audio.data holds {len(wave)} bytes, but shape {list(audio_shape)} float32 needs "
                            f"{4 * math.prod(audio_shape)}")
        audio = _audio(wave, audio_shape, a, "audio")
    return _finish(_pixels(raw, 0, shape, "videos.data"), doc, "body", audio)


def _check_audio(a: Any, b: int, where: str) -> tuple[int, ...] | None:
    """The ``(B, C, T)`` of an audio header (None: no audio); a :class:`WireError` naming the field."""
    if a is None:
        return None
    if not isinstance(a, dict):
        raise WireError(f"{where} must be an object with shape, dtype, sample_rate")
    shape = a.get("shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
            or shape[0] != b or shape[1] not in (1, 2)):
        raise WireError(f"{where}.shape must be [B, C, T] with B = {b} videos and 1 or 2 channels, got {shape!r}")
    if a.get("dtype") != "float32":
        raise WireError(f"{where}.dtype must be 'float32', got {a.get('dtype')!r}")
    rate = a.get("sample_rate")
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise WireError(f"{where}.sample_rate must be an integer > 0, got {rate!r}")
    return tuple(shape)


def _audio(raw: bytes, shape: tuple[int, ...], a: dict[str, Any], where: str) -> Audio:
    wave = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape))
    if not bool(torch.isfinite(wave).all()):
        raise WireError(f"{where}: the waveforms hold non-finite samples")
    try:
        return Audio(wave, int(a["sample_rate"]))
    except RewardError as e:
        raise WireError(f"{where}: {e}") from None


def _depth(doc: Any) -> int:
    """How deeply lists and objects nest in a parsed document (iterative: it cannot recurse)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _loads(text: bytes | bytearray, where: str) -> Any:
    """``json.loads`` with a nesting limit: a deeply nested document is a :class:`WireError`, never
    a ``RecursionError`` from inside the parser."""
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"{where} is not valid JSON: {e}") from None
    except RecursionError:   # the parser's own guard (about 1,000 levels) tripped
        raise WireError(f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth(doc) > MAX_JSON_DEPTH:
        raise WireError(f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels")
    return doc


def _check_shape(shape: Any, dtype: Any, where: str) -> tuple[int, ...]:
    if dtype != "uint8":
        raise WireError(f"{where}.dtype must be 'uint8' (videos are (B, F, H, W, 3) uint8), got {dtype!r}")
    if (not isinstance(shape, list) or len(shape) != 5
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape) or shape[-1] != 3):
        raise WireError(f"{where}.shape must be [B, F, H, W, 3] of positive integers, got {shape!r}")
    return tuple(shape)


def _pixels(buf: bytearray | bytes, offset: int, shape: tuple[int, ...], where: str) -> torch.Tensor:
    need = math.prod(shape)
    if len(buf) - offset != need:
        raise WireError(f"{where} holds {len(buf) - offset} bytes, but shape {list(shape)} uint8 needs {need}")
    if isinstance(buf, bytes):
        buf = bytearray(buf)   # torch wants a writable buffer
    return torch.frombuffer(buf, dtype=torch.uint8, count=need, offset=offset).view(shape)


def _finish(videos: torch.Tensor, doc: dict[str, Any], where: str, audio: Audio | None = None) -> ScoreRequest:
    prompts = doc.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise WireError(f"{where}.prompts must be a list of strings")
    if len(prompts) != videos.shape[0]:
        raise WireError(f"{where}.prompts has {len(prompts)} prompts for {videos.shape[0]} videos")
    subset = doc.get("rewards")
    if subset is not None and (not isinstance(subset, list) or not subset
                               or not all(isinstance(r, str) for r in subset) or len(set(subset)) != len(subset)):
        raise WireError(f"{where}.rewards must be null or a non-empty list of distinct reward names, got {subset!r}")
    return ScoreRequest(videos, prompts, _check_fps(doc.get("fps"), f"{where}.fps"), subset, audio)


def _check_fps(fps: Any, where: str) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise WireError(f"{where} must be the videos' frame rate, a number > 0 (required since wire version "
                        f"{WIRE_VERSION}), got {fps!r}")
    return float(fps)


def encode_array(x: torch.Tensor) -> dict[str, Any]:
    a = np.ascontiguousarray(x.detach().cpu().float().numpy(), dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def decode_array(d: Any, where: str) -> torch.Tensor:
    """A float32 tensor from :func:`encode_array`'s mapping."""
    try:
        if d["dtype"] != "float32":
            raise ValueError(f"dtype {d['dtype']!r}")
        a = np.frombuffer(base64.b64decode(d["data"], validate=True), dtype="<f4")
        return torch.from_numpy(a.reshape([int(s) for s in d["shape"]]).astype(np.float32))
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise WireError(f"{where} is not a float32 array: {type(e).__name__}: {e}") from None


def encode_response(scores: dict[str, torch.Tensor], extras: dict[str, torch.Tensor], weights: dict[str, float],
                    requests: int, videos: int, elapsed_s: float) -> dict[str, Any]:
    return {"scores": {k: encode_array(v) for k, v in scores.items()},
            "extras": {k: encode_array(v) for k, v in extras.items()},
            "weights": weights, "batch": {"requests": requests, "videos": videos}, "elapsed_s": elapsed_s}


def decode_response(doc: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """``(scores, extras, weights)`` of a ``/score`` response."""
    if not isinstance(doc, dict) or not isinstance(doc.get("scores"), dict):
        raise WireError("response has no 'scores' mapping")
    scores = {k: decode_array(v, f"scores.{k}") for k, v in doc["scores"].items()}
    extras = {k: decode_array(v, f"extras.{k}") for k, v in (doc.get("extras") or {}).items()}
    weights = {k: float(v) for k, v in (doc.get("weights") or {}).items()}
    return scores, extras, weights
