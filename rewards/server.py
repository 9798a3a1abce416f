"""The reward server: configured rewards behind HTTP, with batching of concurrent requests.

``create_app(entries)`` builds the rewards of a config's ``rewards:`` mapping (same syntax as
training) and returns a FastAPI app with two endpoints (wire format in :mod:`rewards.wire`):

* ``GET /health``: ``{"ok": true, "version", "wire", "rewards": {name: {type, weight}},
  "max_request_bytes", "batch_window_ms", "max_batch", "stats": {...}}``;
* ``POST /score``: a batch of ``(B, F, H, W, 3)`` uint8 videos with ``B`` prompts (optionally
  a subset of the served rewards), answered with per-reward ``(B,)`` float32 scores and extras.

Requests that arrive within ``batch_window_s`` of each other (and while the worker is busy) are
grouped by video size, frame rate and reward subset, scored with one :func:`rewards.score_videos`
call of at most ``max_batch`` videos (one request larger than that is scored alone), and the
results split back. Rewards run in one worker thread, one batch at a time (a GPU model is rarely thread-safe),
so the event loop keeps accepting, checking and answering requests while a batch is scored. When
a batched call fails, each request of that batch is scored again alone, so one request whose
prompts a reward rejects fails only itself.

Status codes: 400 a malformed request (the reason names the field; JSON nested deeper than
:data:`rewards.wire.MAX_JSON_DEPTH` too), 401 a missing or wrong bearer token, 413 a body over
``max_request_bytes`` (400 too: a client that disconnects mid-body), 422 a reward that refused
the request's input (a prompt it cannot parse, a video too small or too short: its
:class:`~rewards.registry.RewardInputError`), 500 a reward that failed otherwise (its one-line
error) or any unexpected error (a JSON ``{"error"}`` counted in ``/health``'s
``requests_failed``), 503 the server shutting down. 4xx answers count as rejected, not failed. The
server keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from typing import Any, AsyncIterator, Mapping

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .registry import Audio, Reward, RewardError, RewardInputError, build_rewards, parse_reward_specs, score_videos
from .wire import WIRE_VERSION, ScoreRequest, WireError, decode_request, encode_response

log = logging.getLogger("rewards.server")

DECODE_IN_THREAD_BYTES = 1 << 20   # bodies larger than this are decoded off the event loop


def _version() -> str:
    try:
        return version("flowdppo-video")
    except Exception:  # an uninstalled checkout
        return "unknown"


@dataclass
class ServerStats:
    """Counters shown by ``/health``; ``reward_calls`` counts :func:`score_videos` calls, so
    ``reward_calls < requests_ok`` shows that requests were batched."""

    requests_ok: int = 0
    requests_rejected: int = 0      # 4xx
    requests_failed: int = 0        # 5xx
    videos_scored: int = 0
    reward_calls: int = 0
    largest_batch_requests: int = 0
    largest_batch_videos: int = 0
    busy_s: float = 0.0             # time the worker spent in score_videos


class _Failed(Exception):
    """A request the server could not score: ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class _Pending:
    request: ScoreRequest
    names: tuple[str, ...]
    future: asyncio.Future
    key: tuple = field(init=False)

    def __post_init__(self) -> None:
        # one score_videos call sees one frame rate (and one length and rate of sound, or none)
        a = self.request.audio
        sound = None if a is None else (tuple(a.waveforms.shape[1:]), a.sample_rate)
        self.key = (tuple(self.request.videos.shape[1:]), self.request.fps, self.names, sound)


class Batcher:
    """Collects requests for ``window_s``, groups them by video size, fps and reward subset, and scores
    each group with one ``score_videos`` call of at most ``max_batch`` videos in a worker thread."""

    def __init__(self, rewards: dict[str, Reward], window_s: float, max_batch: int, stats: ServerStats) -> None:
        self.rewards, self.window_s, self.max_batch, self.stats = rewards, window_s, max_batch, stats
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start on the running loop (the app's lifespan; an app can be served again after a stop)."""
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reward-worker")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            p = self._queue.get_nowait()
            if not p.future.done():
                p.future.set_exception(_Failed(503, "the reward server is shutting down"))
        self._worker.shutdown(wait=True)

    async def submit(self, request: ScoreRequest, names: tuple[str, ...]) -> dict[str, Any]:
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(request, names, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            n = items[0].request.videos.shape[0]
            deadline = loop.time() + self.window_s
            while n < self.max_batch:
                try:
                    # anything queued while the worker was busy is taken at once
                    p = self._queue.get_nowait() if not self._queue.empty() else \
                        await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time()))
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                items.append(p)
                n += p.request.videos.shape[0]
            for chunk in self._chunks(items):
                try:
                    results = await loop.run_in_executor(self._worker, self._score_chunk, chunk)
                except Exception as e:  # a bug here must not leave clients waiting forever
                    log.exception("batch failed")
                    results = [_Failed(500, f"internal error: {type(e).__name__}: {e}")] * len(chunk)
                for p, r in zip(chunk, results):
                    if p.future.done():      # the client went away
                        continue
                    if isinstance(r, Exception):
                        p.future.set_exception(r)
                    else:
                        p.future.set_result(r)

    def _chunks(self, items: list[_Pending]) -> list[list[_Pending]]:
        """Group by (frames, height, width, fps, rewards) in arrival order, then cut each group into
        chunks of at most ``max_batch`` videos (a larger request alone)."""
        groups: dict[tuple, list[_Pending]] = {}
        for p in items:
            groups.setdefault(p.key, []).append(p)
        out = []
        for group in groups.values():
            chunk, n = [], 0
            for p in group:
                b = p.request.videos.shape[0]
                if chunk and n + b > self.max_batch:
                    out.append(chunk)
                    chunk, n = [], 0
                chunk.append(p)
                n += b
            out.append(chunk)
        return out

    def _score_chunk(self, chunk: list[_Pending]) -> list[dict[str, Any] | _Failed]:
        """Runs in the worker thread: one ``score_videos`` call for the chunk, split back; if it
        fails and holds several requests, each is scored alone so only the culprit fails."""
        try:
            return self._score(chunk)
        except RewardError as e:
            if len(chunk) == 1:
                return [_failed(e)]
        out: list[dict[str, Any] | _Failed] = []
        for p in chunk:
            try:
                out.extend(self._score([p]))
            except RewardError as e:
                out.append(_failed(e))
        return out

    def _score(self, chunk: list[_Pending]) -> list[dict[str, Any]]:
        names = chunk[0].names
        sizes = [p.request.videos.shape[0] for p in chunk]
        videos = chunk[0].request.videos if len(chunk) == 1 else torch.cat([p.request.videos for p in chunk])
        prompts = [s for p in chunk for s in p.request.prompts]
        first = chunk[0].request.audio
        audio = None if first is None else (first if len(chunk) == 1 else Audio(
            torch.cat([p.request.audio.waveforms for p in chunk]), first.sample_rate))
        t0 = time.perf_counter()
        self.stats.reward_calls += 1
        try:
            scores, extras = score_videos({n: self.rewards[n] for n in names}, videos, prompts,
                                          fps=chunk[0].request.fps, audio=audio)
        finally:
            dt = time.perf_counter() - t0
            self.stats.busy_s += dt
        b = videos.shape[0]
        for k, v in extras.items():
            if v.ndim == 0 or v.shape[0] != b:
                raise RewardError(f"reward extra {k!r} has shape {tuple(v.shape)}, not ({b}, ...): "
                                  f"cannot split a batch")
        s = self.stats
        s.videos_scored += b
        s.largest_batch_requests = max(s.largest_batch_requests, len(chunk))
        s.largest_batch_videos = max(s.largest_batch_videos, b)
        f, h, w = videos.shape[1:4]
        log.info("scored %d videos (%d requests, %dx%dx%d) with %s in %.1f ms; %d videos so far",
                 b, len(chunk), f, h, w, "+".join(names), dt * 1e3, s.videos_scored)
        out, start = [], 0
        for n in sizes:
            sl = slice(start, start + n)
            out.append({"scores": {k: v[sl] for k, v in scores.items()},
                        "extras": {k: v[sl] for k, v in extras.items()},
                        "requests": len(chunk), "videos": b})
            start += n
        return out


# The JSON body of POST /score (rewards.wire) and its answers, for the OpenAPI schema that
# `app.openapi()` builds (not served: tests fuzz the API from it). The binary body is described
# as bytes.
_ARRAY = {"type": "object", "required": ["dtype", "shape", "data"],
          "properties": {"dtype": {"type": "string", "enum": ["float32"]},
                         "shape": {"type": "array", "items": {"type": "integer"}},
                         "data": {"type": "string", "format": "byte"}}}
_ERROR = {"description": "one line naming the problem",
          "content": {"application/json": {"schema": {"type": "object", "required": ["error"],
                                                      "properties": {"error": {"type": "string"}}}}}}
SCORE_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {
            "type": "object", "required": ["videos", "prompts", "fps"],
            "properties": {
                "videos": {"type": "object", "required": ["shape", "dtype", "data"],
                           "properties": {"shape": {"type": "array", "items": {"type": "integer", "minimum": 1},
                                                    "minItems": 5, "maxItems": 5},
                                          "dtype": {"type": "string", "enum": ["uint8"]},
                                          "data": {"type": "string", "format": "byte"}}},
                "prompts": {"type": "array", "items": {"type": "string"}},
                "fps": {"type": "number", "exclusiveMinimum": 0},
                "rewards": {"anyOf": [{"type": "null"},
                                      {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
                "audio": {"anyOf": [{"type": "null"}, {
                    "type": "object", "required": ["shape", "dtype", "sample_rate", "data"],
                    "properties": {"shape": {"type": "array", "items": {"type": "integer", "minimum": 1},
                                             "minItems": 3, "maxItems": 3},
                                   "dtype": {"type": "string", "enum": ["float32"]},
                                   "sample_rate": {"type": "integer", "minimum": 1},
                                   "data": {"type": "string", "format": "byte"}}}]}}}},
        "application/x-flowdppo-videos": {"schema": {"type": "string", "format": "binary"}}}},
    "responses": {
        "200": {"description": "per-reward scores and extras",
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["scores", "extras", "weights", "batch", "elapsed_s"],
                    "properties": {"scores": {"type": "object", "additionalProperties": _ARRAY},
                                   "extras": {"type": "object", "additionalProperties": _ARRAY},
                                   "weights": {"type": "object", "additionalProperties": {"type": "number"}},
                                   "batch": {"type": "object"}, "elapsed_s": {"type": "number"}}}}}},
        **{code: _ERROR for code in ("400", "401", "413", "422", "500", "503")}},
}


def create_app(entries: Mapping[str, Any], *, token: str | None = None, max_request_bytes: int = 256 << 20,
               batch_window_s: float = 0.01, max_batch: int = 32, key: str = "rewards") -> FastAPI:
    """Build the rewards of ``entries`` (a config's ``rewards:`` mapping; errors are
    :class:`RewardError` naming ``key.<name>``) and the app that serves them.

    ``token``: when set, every request needs ``Authorization: Bearer <token>`` (else 401).
    """
    if max_request_bytes <= 0 or batch_window_s < 0 or max_batch < 1:
        raise RewardError(f"server limits must be positive: max_request_bytes={max_request_bytes}, "
                          f"batch_window_s={batch_window_s}, max_batch={max_batch}")
    specs = parse_reward_specs(entries, key)
    if not specs:
        raise RewardError(f"{key} is empty: name at least one reward to serve")
    rewards = build_rewards(entries, key)
    weights = {n: s.weight for n, s in specs.items()}
    stats = ServerStats()
    batcher = Batcher(rewards, batch_window_s, max_batch, stats)
    expected_auth = f"Bearer {token}".encode() if token else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    # No /docs or /openapi.json: nothing served without the token but the token's own 401.
    app = FastAPI(title="flowdppo-video reward server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.stats, app.state.rewards = stats, rewards

    def error(status: int, reason: str) -> JSONResponse:
        if status >= 500:
            stats.requests_failed += 1
            log.warning("POST /score -> %d: %s", status, reason)
        else:
            stats.requests_rejected += 1
            log.info("request rejected (%d): %s", status, reason)
        return JSONResponse({"error": reason}, status_code=status)

    def authorised(request: Request) -> bool:
        if expected_auth is None:
            return True
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected_auth)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"},
                            status_code=exc.status_code)

    def unexpected(what: str, e: Exception) -> JSONResponse:
        # A bug, not the request's fault: a JSON 500 like any other failure, counted in /health,
        # with the traceback in the log; the server keeps serving.
        log.error("%s failed unexpectedly", what, exc_info=e)
        return error(500, f"internal error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        try:
            return _health(request)
        except Exception as e:
            return unexpected("GET /health", e)

    def _health(request: Request) -> JSONResponse:
        if not authorised(request):
            return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        return JSONResponse({"ok": True, "version": _version(), "wire": WIRE_VERSION,
                             "rewards": {n: {"type": s.type, "weight": s.weight} for n, s in specs.items()},
                             "max_request_bytes": max_request_bytes, "batch_window_ms": batch_window_s * 1e3,
                             "max_batch": max_batch, "stats": asdict(stats)})

    @app.post("/score", openapi_extra=SCORE_OPENAPI)
    async def score(request: Request) -> JSONResponse:
        try:
            return await _score(request)
        except Exception as e:
            return unexpected("POST /score", e)

    async def _score(request: Request) -> JSONResponse:
        if not authorised(request):
            return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        try:
            body = await _read_body(request, max_request_bytes)
        except _Failed as e:
            return error(e.status, e.reason)
        content_type = request.headers.get("content-type", "")
        try:
            if len(body) > DECODE_IN_THREAD_BYTES:
                req = await anyio.to_thread.run_sync(decode_request, body, content_type)
            else:
                req = decode_request(body, content_type)
        except WireError as e:
            return error(400, str(e))
        names = tuple(req.rewards) if req.rewards is not None else tuple(rewards)
        unknown = [n for n in names if n not in rewards]
        if unknown:
            return error(400, f"unknown reward(s) {unknown} requested: this server serves {sorted(rewards)}")
        t0 = time.perf_counter()
        try:
            result = await batcher.submit(req, names)
        except _Failed as e:
            return error(e.status, e.reason)
        stats.requests_ok += 1
        return JSONResponse(encode_response(result["scores"], result["extras"], {n: weights[n] for n in names},
                                            result["requests"], result["videos"], time.perf_counter() - t0))

    return app


async def _read_body(request: Request, limit: int) -> bytearray:
    """The body, or 413 as soon as it is known to exceed ``limit`` bytes (from Content-Length,
    before reading anything, or while streaming a chunked body)."""
    declared = request.headers.get("content-length")
    mb = limit / (1 << 20)
    if declared is not None:
        if not declared.isdigit():
            raise _Failed(400, f"bad Content-Length {declared!r}")
        if int(declared) > limit:
            raise _Failed(413, f"request body of {int(declared)} bytes exceeds the server's limit of "
                               f"{limit} bytes ({mb:g} MB, --max-request-mb): send fewer videos per request")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _Failed(413, f"request body exceeds the server's limit of {limit} bytes ({mb:g} MB, "
                                   f"--max-request-mb): send fewer videos per request")
    except ClientDisconnect:           # the client's doing, not the server's: no traceback, not a failure
        raise _Failed(400, f"the client disconnected after {len(body)} bytes of the body") from None
    return body


def _failed(e: RewardError) -> "_Failed":
    """A reward's error as an answer: 422 when the reward refused the request's input, else 500."""
    return _Failed(422, str(e)) if isinstance(e, RewardInputError) else _Failed(500, str(e))


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); ``OSError`` if it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # a keep-alive answer (headers, then body) waits ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def http_url(host: str, port: int) -> str:
    """``http://host:port``, with an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_server(app: FastAPI, log_level: str = "info", access_log: bool = False) -> Any:
    """A ``uvicorn.Server`` for ``app``. h11 is pinned: its handling of an early 413 answer (the
    rest of the body is read and dropped, the connection kept) is the tested one. Logging is left
    to the caller (``log_config=None``): uvicorn's loggers propagate to the root logger."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, http="h11", lifespan="on", log_level=log_level,
                                         access_log=access_log, log_config=None))


class BackgroundServer:
    """Serve ``app`` with uvicorn in a daemon thread (tests, notebooks)::

        with BackgroundServer(create_app({"frame_change": 1.0})) as url:
            ...   # url is "http://127.0.0.1:<free port>"
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> str:
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        self.url = http_url(self.host, self.port)
        self.server = uvicorn_server(self.app, self.log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="reward-server")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"reward server on {self.url} did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
