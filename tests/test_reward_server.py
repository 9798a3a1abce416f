"""The reward server on a real loopback socket (uvicorn in a thread) and its ``remote`` client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

import rewards
from flowdppo_video.world import all_scenes, render_batch
from rewards.registry import REWARDS, RewardError, register
from rewards.server import BackgroundServer, create_app
from rewards.wire import BINARY_TYPE, decode_response, encode_json_request, encode_request
from flowdppo_video.parallel.groups import free_port

from .conftest import ROOT

ENTRIES = {"world_direction": 1.0, "frame_change": {"weight": 0.5}}
SCENES = all_scenes()
TOKEN = "s3cret-token"
SMALL_LIMIT = 20_000          # bytes: one 8x16x16 video (6,144 bytes) fits, four (24,576) do not
FPS = 8.0                     # the videos' frame rate on the wire (any real rate: the server passes it on)


def batch(k: int, b: int = 4) -> tuple[torch.Tensor, list[str]]:
    """Request ``k``: ``b`` ground-truth world videos ``(b, 8, 16, 16, 3)`` uint8 and their prompts."""
    scenes = [SCENES[(k * b + i) * 7 % len(SCENES)] for i in range(b)]
    return torch.from_numpy(render_batch(scenes, seed=k)), [s.prompt for s in scenes]


@pytest.fixture(scope="module")
def local() -> dict:
    return rewards.build_rewards(ENTRIES)


@pytest.fixture(scope="module")
def url():
    with BackgroundServer(create_app(ENTRIES, batch_window_s=0.01, max_batch=32)) as u:
        yield u


@pytest.fixture(scope="module")
def locked_url():
    """A server with a token and a small request limit."""
    with BackgroundServer(create_app({"frame_change": 1.0}, token=TOKEN, max_request_bytes=SMALL_LIMIT)) as u:
        yield u


def post(url: str, body: bytes, content_type: str = BINARY_TYPE, **kw) -> httpx.Response:
    return httpx.post(f"{url}/score", content=body, headers={"Content-Type": content_type, **kw.pop("headers", {})},
                      timeout=30, **kw)


def assert_equal_scores(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), (k, got[k], want[k])


def test_health(url):
    doc = httpx.get(f"{url}/health").json()
    assert doc["ok"] is True and doc["version"] and doc["wire"] == 3                 # 2: requests carry fps; 3: and audio
    assert doc["rewards"] == {"world_direction": {"type": "world_direction", "weight": 1.0},
                              "frame_change": {"type": "frame_change", "weight": 0.5}}
    assert doc["max_batch"] == 32 and doc["batch_window_ms"] == pytest.approx(10.0)
    # Keep-alive round trips take about a millisecond only with TCP_NODELAY on the accepted sockets
    # (without it each took ~44 ms: the answer's body waited for a delayed ACK). asyncio sets it on
    # sockets created with proto=IPPROTO_TCP: the property is checked here, the time is the
    # benchmarks' (a loaded CI machine must not fail a correct change).
    import socket

    from rewards.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
    with httpx.Client() as client:
        assert all(client.get(f"{url}/health").status_code == 200 for _ in range(3))


class _Blocked:
    """Blocks each call until the test releases it (a slow judge), then scores 1."""

    started = threading.Event()
    release = threading.Event()

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> torch.Tensor:
        type(self).started.set()
        assert type(self).release.wait(60), "the test never released the reward"
        return torch.ones(videos.shape[0])


def test_the_server_answers_while_a_reward_is_busy():
    """Shown by the order of events, not by timing: /health answers while the reward call is
    still blocked in the worker thread, and the blocked request completes once released."""
    _Blocked.started.clear()
    _Blocked.release.clear()
    register("test_blocked_reward")(_Blocked)
    try:
        with BackgroundServer(create_app({"slow": {"type": "test_blocked_reward"}})) as u:
            videos, prompts = batch(7, b=1)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pending = pool.submit(post, u, encode_request(videos, prompts, FPS))
                assert _Blocked.started.wait(60), "the reward was never called"
                health = httpx.get(f"{u}/health", timeout=30)
                assert health.status_code == 200
                assert not _Blocked.release.is_set() and not pending.done()   # the reward is still blocked
                _Blocked.release.set()
                assert pending.result(timeout=60).status_code == 200
    finally:
        _Blocked.release.set()
        REWARDS.pop("test_blocked_reward")


@pytest.mark.parametrize("fmt", ["binary", "json"])
def test_scores_equal_in_process_scores_exactly(url, local, fmt):
    videos, prompts = batch(0)
    want_scores, want_extras = rewards.score_videos(local, videos, prompts, fps=FPS)
    if fmt == "binary":
        resp = post(url, encode_request(videos, prompts, FPS))
    else:
        resp = httpx.post(f"{url}/score", json=encode_json_request(videos, prompts, FPS), timeout=30)
    assert resp.status_code == 200, resp.text
    scores, extras, weights = decode_response(resp.json())
    assert_equal_scores(scores, want_scores)
    assert_equal_scores(extras, want_extras)
    assert weights == {"world_direction": 1.0, "frame_change": 0.5}
    assert (scores["world_direction"] > 0.9).all()   # ground truth moves as its prompt says
    sub = decode_response(post(url, encode_request(videos, prompts, FPS, ["frame_change"])).json())[0]
    assert list(sub) == ["frame_change"] and torch.equal(sub["frame_change"], want_scores["frame_change"])


def test_concurrent_requests_are_batched_and_none_lost(url, local):
    n = 50
    reqs = [batch(k) for k in range(n)]
    want = [rewards.score_videos(local, v, p, fps=FPS)[0] for v, p in reqs]
    before = httpx.get(f"{url}/health").json()["stats"]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
            return await asyncio.gather(*[
                client.post(f"{url}/score", content=encode_request(v, p, FPS), headers={"Content-Type": BINARY_TYPE})
                for v, p in reqs])

    resps = asyncio.run(send_all())
    assert [r.status_code for r in resps] == [200] * n
    for r, w in zip(resps, want):   # each answer is its own request's scores, not a neighbour's
        assert_equal_scores(decode_response(r.json())[0], w)
    after = httpx.get(f"{url}/health").json()["stats"]
    calls = after["reward_calls"] - before["reward_calls"]
    assert after["requests_ok"] - before["requests_ok"] == n
    assert after["videos_scored"] - before["videos_scored"] == 4 * n
    grouped = [r.json()["batch"]["requests"] for r in resps]
    assert max(grouped) > 1 and calls < n, (calls, grouped)
    assert max(r.json()["batch"]["videos"] for r in resps) <= 32
    print(f"50 requests scored in {calls} reward calls; largest batch {max(grouped)} requests")


def test_a_failing_reward_fails_only_its_own_request(url, local):
    """A prompt world_direction cannot parse, sent among good requests: 422 (the client's error)
    naming the reward for that request only; the good ones batched with it still get their exact
    scores."""
    good = [batch(k) for k in range(100, 106)]
    bad_videos, bad_prompts = batch(106)
    bad_prompts = ["a purple hexagon dances"] + bad_prompts[1:]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [encode_request(v, p, FPS) for v, p in good[:3]] + [encode_request(bad_videos, bad_prompts, FPS)] + \
                     [encode_request(v, p, FPS) for v, p in good[3:]]
            return await asyncio.gather(*[client.post(f"{url}/score", content=b,
                                                      headers={"Content-Type": BINARY_TYPE}) for b in bodies])

    resps = asyncio.run(send_all())
    assert resps[3].status_code == 422
    assert re.match(r"reward 'world_direction' failed: ValueError: prompt 'a purple hexagon dances'",
                    resps[3].json()["error"]), resps[3].json()
    for r, (v, p) in zip(resps[:3] + resps[4:], good):
        assert r.status_code == 200
        assert_equal_scores(decode_response(r.json())[0], rewards.score_videos(local, v, p, fps=FPS)[0])
    assert httpx.get(f"{url}/health").json()["ok"]


def _json_body(**change) -> bytes:
    import json

    videos, prompts = batch(0, b=2)
    doc = encode_json_request(videos, prompts, FPS)
    for k, v in change.items():
        if k.startswith("videos_"):
            doc["videos"][k[7:]] = v
        else:
            doc[k] = v
    return json.dumps(doc).encode()


def _binary_body(cut: int = 0, magic: bytes = b"FDV1") -> bytes:
    videos, prompts = batch(0, b=2)
    body = encode_request(videos, prompts, FPS)
    return magic + body[4:len(body) - cut]


@pytest.mark.parametrize("body, content_type, reason", [
    (_json_body(videos_shape=[2, 8, 16, 16]), "application/json", r"videos\.shape must be \[B, F, H, W, 3\]"),
    (_json_body(videos_shape=[2, 8, 16, 16, 4]), "application/json", r"videos\.shape must be \[B, F, H, W, 3\]"),
    (_json_body(videos_shape=[2, 8, 16, 8, 3]), "application/json", r"videos\.data holds 12288 bytes, but shape"),
    (_json_body(videos_dtype="float32"), "application/json", r"videos\.dtype must be 'uint8'.*got 'float32'"),
    (_json_body(prompts=["only one"]), "application/json", r"body\.prompts has 1 prompts for 2 videos"),
    (_json_body(videos_data="not base64!"), "application/json", r"videos\.data is not valid base64"),
    (_json_body(rewards=["world_directon"]), "application/json",
     r"unknown reward\(s\) \['world_directon'\] requested: this server serves \['frame_change', 'world_direction'\]"),
    (_json_body(rewards=[]), "application/json", r"body\.rewards must be null or a non-empty list"),
    (b"{not json", "application/json", r"body is not valid JSON"),
    (_binary_body(cut=5), BINARY_TYPE, r"the body after the header holds 12283 bytes, but shape \[2, 8, 16, 16, 3\]"),
    (_binary_body(magic=b"PK\x03\x04"), BINARY_TYPE, r"does not start with the FDV1 magic"),
    (b"x" * 10, "application/x-npy", r"unsupported Content-Type 'application/x-npy'"),
])
def test_malformed_requests_get_400_with_a_reason_and_the_server_keeps_serving(url, body, content_type, reason):
    resp = post(url, body, content_type)
    assert resp.status_code == 400, resp.text
    assert re.search(reason, resp.json()["error"]), resp.json()["error"]
    assert httpx.get(f"{url}/health").json()["ok"] is True


def test_unknown_path_is_a_json_error(url):
    resp = httpx.get(f"{url}/nope")
    assert resp.status_code == 404 and "error" in resp.json()


def test_token_required_when_set(locked_url, monkeypatch):
    videos, prompts = batch(1, b=1)
    body = encode_request(videos, prompts, FPS)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for resp in (httpx.get(f"{locked_url}/health", headers=headers), post(locked_url, body, headers=headers)):
            assert resp.status_code == 401 and "bearer token" in resp.json()["error"]
    ok = post(locked_url, body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    want = rewards.score_videos(rewards.build_rewards({"frame_change": 1.0}), videos, prompts, fps=FPS)[0]["frame_change"]
    assert torch.equal(decode_response(ok.json())[0]["frame_change"], want)
    # the remote reward: without a token it fails when built (naming the URL), with one it scores
    monkeypatch.delenv("FLOWDPPO_REWARD_TOKEN", raising=False)
    with pytest.raises(RewardError, match=rf"reward server {locked_url}/health answered 401: missing or wrong"):
        rewards.build_rewards({"r": {"type": "remote", "url": locked_url}})
    monkeypatch.setenv("FLOWDPPO_REWARD_TOKEN", TOKEN)
    scores, _ = rewards.score_videos(rewards.build_rewards({"r": {"type": "remote", "url": locked_url}}),
                                     videos, prompts, fps=FPS)
    assert torch.equal(scores["r"], want)


def test_oversize_request_is_413_and_the_client_splits_to_fit(locked_url, monkeypatch):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    videos, prompts = batch(2, b=4)
    body = encode_request(videos, prompts, FPS)
    assert len(body) > SMALL_LIMIT
    resp = post(locked_url, body, headers=auth)
    assert resp.status_code == 413 and f"exceeds the server's limit of {SMALL_LIMIT} bytes" in resp.json()["error"]
    # a chunked body (no Content-Length) is cut off while streaming
    chunked = httpx.post(f"{locked_url}/score", content=iter([body[:10_000], body[10_000:]]),
                         headers={"Content-Type": BINARY_TYPE, **auth})
    assert chunked.status_code == 413
    assert httpx.get(f"{locked_url}/health", headers=auth).json()["ok"] is True
    # the remote reward learns the limit from /health and sends the 4 videos in requests that fit
    before = httpx.get(f"{locked_url}/health", headers=auth).json()["stats"]["requests_ok"]
    remote = rewards.build_rewards({"r": {"type": "remote", "url": locked_url, "token": TOKEN}})
    scores, _ = rewards.score_videos(remote, videos, prompts, fps=FPS)
    want = rewards.score_videos(rewards.build_rewards({"frame_change": 1.0}), videos, prompts, fps=FPS)[0]["frame_change"]
    assert torch.equal(scores["r"], want)
    assert httpx.get(f"{locked_url}/health", headers=auth).json()["stats"]["requests_ok"] - before >= 2


def test_remote_reward_through_build_rewards(url, local):
    videos, prompts = batch(3)
    want, want_extras = rewards.score_videos(local, videos, prompts, fps=FPS)
    built = rewards.build_rewards({
        "all": {"type": "remote", "url": url, "weight": 1.0},
        "change": {"type": "remote", "url": url, "rewards": ["frame_change"]},
        # one entry per served reward, as GDPO wants them
        "direction": {"type": "remote", "url": url, "reward": "world_direction", "weight": 2.0},
    })
    scores, extras = rewards.score_videos(built, videos, prompts, fps=FPS)
    # several served rewards: the server's weighted sum; each is logged as an extra
    assert torch.allclose(scores["all"], want["world_direction"] + 0.5 * want["frame_change"], atol=0, rtol=1e-6)
    assert torch.equal(extras["all/world_direction"], want["world_direction"])
    assert torch.equal(extras["all/frame_change"], want["frame_change"])
    assert torch.equal(scores["change"], want["frame_change"])      # one reward: its own score
    assert torch.equal(scores["direction"], want["world_direction"])
    assert not want_extras and set(extras) == {"all/world_direction", "all/frame_change", "change/frame_change"}
    from flowdppo_video.advantages import compute_advantages

    adv, _ = compute_advantages({k: scores[k] for k in ("change", "direction")}, {"change": 1.0, "direction": 2.0},
                                2, "gdpo", "group", 5.0)
    assert adv.shape == (4,) and torch.isfinite(adv).all()


def test_remote_reward_keeps_the_served_rewards_extras():
    with BackgroundServer(create_app({"adherence": {"type": "world_adherence"}})) as u:
        videos, prompts = batch(4)
        want, want_extras = rewards.score_videos(rewards.build_rewards({"adherence": {"type": "world_adherence"}}),
                                                 videos, prompts, fps=FPS)
        scores, extras = rewards.score_videos(
            rewards.build_rewards({"adh": {"type": "remote", "url": u, "reward": "adherence"}}), videos, prompts, fps=FPS)
    assert torch.equal(scores["adh"], want["adherence"])
    assert {f"adh/{k.split('/', 1)[1]}" for k in want_extras} == set(extras)
    assert torch.equal(extras["adh/direction"], want_extras["adherence/direction"])


def test_remote_reward_bad_options(url):
    serves = r"it serves \['frame_change', 'world_direction'\]"
    with pytest.raises(RewardError, match=rf"does not serve \['world_colour'\]: {serves}"):
        rewards.build_rewards({"r": {"type": "remote", "url": url, "reward": "world_colour"}})
    with pytest.raises(RewardError, match=r"give 'reward' \(one served reward\) or 'rewards' \(a subset\), not both"):
        rewards.build_rewards({"r": {"type": "remote", "url": url, "reward": "frame_change",
                                     "rewards": ["frame_change"]}})
    with pytest.raises(RewardError, match=r"url must be http://host:port"):
        rewards.build_rewards({"r": {"type": "remote", "url": "127.0.0.1:8765"}})
    with pytest.raises(RewardError, match=r"reward 'remote' takes options"):
        rewards.build_rewards({"r": {"type": "remote", "url": url, "urls": 1}})





def test_a_down_server_is_a_reward_error_after_retries():
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RewardError, match=rf"reward server {down}/health unreachable: ConnectError"):
        rewards.build_rewards({"r": {"type": "remote", "url": down}})
    built = rewards.build_rewards({"r": {"type": "remote", "url": down, "check": False, "timeout": 5}})
    videos, prompts = batch(5, b=2)
    t0 = time.perf_counter()
    with pytest.raises(RewardError) as e:
        rewards.score_videos(built, videos, prompts, fps=FPS)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"reward 'r' failed after 3 attempts: reward server {down}/health unreachable: "
                          f"ConnectError"), msg
    assert time.perf_counter() - t0 < 5


@pytest.mark.slow
def test_cli_serve_rewards_unknown_reward_exits_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("rewards:\n  world_directon: 1.0\n")
    proc = subprocess.run([sys.executable, "-m", "flowdppo_video", "serve-rewards", "--config", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("flowdppo-video: error: unknown reward 'world_directon' in rewards.world_directon: "
                               "did you mean world_direction?")


@pytest.mark.slow
def test_cli_serve_rewards_serves_until_interrupted(tmp_path):
    """The real command on a free port: health, one scored batch through the remote reward, Ctrl-C."""
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("rewards:\n  frame_change: 1.0\nserver:\n  port: 0\n  batch_window_ms: 5\n")
    env = {**os.environ, "FLOWDPPO_REWARD_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flowdppo_video", "serve-rewards", "--config", str(cfg)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        served = None
        for line in proc.stderr:   # the first line names the URL it listens on
            served = re.search(r"serving frame_change on (http://127\.0\.0\.1:\d+) \(token required", line)
            if served:
                break
        assert served, "the server did not announce its URL"
        u = served.group(1)
        for _ in range(200):
            try:
                if httpx.get(f"{u}/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200:
                    break
            except httpx.ConnectError:
                time.sleep(0.05)
        videos, prompts = batch(6)
        remote = rewards.build_rewards({"r": {"type": "remote", "url": u, "token": TOKEN}})
        want = rewards.score_videos(rewards.build_rewards({"frame_change": 1.0}), videos, prompts, fps=FPS)[0]["frame_change"]
        assert torch.equal(rewards.score_videos(remote, videos, prompts, fps=FPS)[0]["r"], want)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
        assert proc.returncode == 0, rest
        assert "scored 4 videos (1 requests, 8x16x16) with frame_change" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_training_iteration_with_remote_rewards(tmp_path, url):
    """One Flow-DPPO iteration of the tiny Wan model scored by the server: two remote entries
    (all served rewards, and one of them on its own) aggregated with GDPO, each logged."""
    from flowdppo_video.trainer import Trainer

    from .conftest import tiny_config

    cfg = tiny_config(tmp_path, "run.iterations=1", "advantages.aggregation=gdpo",
                      f"rewards={{judge: {{type: remote, url: '{url}', rewards: [frame_change]}}, "
                      f"change: {{type: remote, url: '{url}', reward: frame_change, weight: 0.5}}}}")
    row = Trainer(cfg).run()[-1]
    assert row["reward/judge/mean"] == row["reward/change/mean"] == row["reward/judge/frame_change/mean"] > 0
    assert row["reward/mean"] == pytest.approx(1.5 * row["reward/judge/mean"], rel=1e-5)
    assert abs(row["advantage/abs_mean"]) > 0
