"""``remote``: rewards scored by a reward server (``flowdppo-video serve-rewards``, :mod:`rewards.server`).

In a training config::

    rewards:
      judge: {type: remote, url: "http://127.0.0.1:8765", weight: 1.0}            # every served reward
      # or one served reward per entry, so GDPO normalises each on its own:
      direction: {type: remote, url: "http://127.0.0.1:8765", reward: world_direction, weight: 1.0}
      change: {type: remote, url: "http://127.0.0.1:8765", reward: frame_change, weight: 0.5}

Options: ``url``; ``rewards`` (a subset of the served rewards) or ``reward`` (exactly one);
``token`` (default: the ``FLOWDPPO_REWARD_TOKEN`` environment variable, so no secret needs to sit
in a recipe); ``timeout`` (seconds per HTTP call); ``check`` (ask ``/health`` when built, so an
unreachable server or an unknown reward name fails before the first rollout, not after it;
``false``: at the first call).

The reward returns ``{"score": ..., <served reward>: (B,), "<served reward>/<extra>": (B,)}``:
``score`` is the single reward's score, or with several the weighted sum with the server's
weights; every served score and extra is logged (``reward/<entry>/<served>/mean``). A batch larger
than the server's request limit is sent in several requests. Every failure (connection refused,
timeout, a 4xx or 5xx answer) is a one-line :class:`RewardError` naming the URL and the server's
reason, retried ``default_retries`` times by :func:`rewards.score_videos`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .registry import Audio, RewardError, register
from .wire import BINARY_TYPE, WIRE_VERSION, WireError, decode_response, encode_request

TOKEN_ENV = "FLOWDPPO_REWARD_TOKEN"


@register("remote")
class RemoteReward:
    """Scores ``(B, F, H, W, 3)`` uint8 videos on a reward server; see the module docstring."""

    default_retries = 2   # a server restarting or a dropped connection should not end a run

    def __init__(self, url: str, rewards: list[str] | None = None, reward: str | None = None,
                 token: str | None = None, timeout: float = 60.0, check: bool = True) -> None:
        import httpx   # imported here: training without a remote reward never needs it

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise RewardError(f"remote reward: url must be http://host:port or https://..., got {url!r}")
        if reward is not None and rewards is not None:
            raise RewardError("remote reward: give 'reward' (one served reward) or 'rewards' (a subset), not both")
        if reward is not None and not isinstance(reward, str):
            raise RewardError(f"remote reward: 'reward' must be one served reward's name, got {reward!r}")
        if rewards is not None and (not isinstance(rewards, list) or not rewards
                                    or not all(isinstance(r, str) for r in rewards)):
            raise RewardError(f"remote reward: 'rewards' must be a non-empty list of served reward names, "
                              f"got {rewards!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise RewardError(f"remote reward: timeout must be a number of seconds > 0, got {timeout!r}")
        if not isinstance(check, bool):
            raise RewardError(f"remote reward: check must be true or false, got {check!r}")
        self.url = url.rstrip("/")
        self.subset = [reward] if reward is not None else rewards
        self.single = reward is not None
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(headers=headers, timeout=float(timeout))
        self._httpx = httpx
        self.max_request_bytes: int | None = None
        self._checked = False
        if check:
            self.health()

    def health(self) -> dict[str, Any]:
        """The server's ``/health``; checks that it speaks this wire version and serves the
        requested rewards, and learns its request size limit."""
        doc = self._json(self._request("GET", "/health"), "/health")
        if doc.get("wire") != WIRE_VERSION:   # an older server would score every video at its own default fps
            raise RewardError(f"reward server {self.url} speaks wire version {doc.get('wire')!r}; this client "
                              f"needs {WIRE_VERSION} (requests carry the videos' fps): run the same version on both")
        served = doc.get("rewards") or {}
        missing = [r for r in self.subset or [] if r not in served]
        if missing:
            raise RewardError(f"reward server {self.url} does not serve {missing}: it serves {sorted(served)}")
        if isinstance(doc.get("max_request_bytes"), int):
            self.max_request_bytes = doc["max_request_bytes"]
        self._checked = True
        return doc

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float,
                 audio: Audio | None = None) -> dict[str, torch.Tensor]:
        """``videos`` ``(B, F, H, W, 3)`` uint8 at ``fps`` -> ``{"score": (B,), <reward>: (B,), ...}``
        float32; the frame rate and the sound (when the videos have one) travel with the pixels, so
        the served rewards see the real ones."""
        if len(prompts) != videos.shape[0]:
            raise RewardError(f"remote reward: {len(prompts)} prompts for {videos.shape[0]} videos")
        if not self._checked:   # built with check=False: check and learn the limit now
            self.health()
        parts = [self._score(videos[a:b], prompts[a:b], fps, None if audio is None else audio.rows(slice(a, b)))
                 for a, b in self._spans(videos, prompts, fps, audio)]
        scores = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        extras = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        weights = parts[0][2]
        if not scores:
            raise RewardError(f"reward server {self.url} returned no scores")
        if len(scores) == 1:
            total = next(iter(scores.values()))
        else:
            total = sum(weights.get(k, 1.0) * v for k, v in scores.items())
        if self.single:   # the one reward's own extras, without a redundant copy of its score
            return {"score": total, **{k.split("/", 1)[1]: v for k, v in extras.items()}}
        return {"score": total, **scores, **extras}

    def _spans(self, videos: torch.Tensor, prompts: list[str], fps: float, audio: Audio | None = None
               ) -> list[tuple[int, int]]:
        """Cut the batch so that each request fits the server's limit (learnt from /health)."""
        b = videos.shape[0]
        if self.max_request_bytes is None or b == 0:
            return [(0, b)]
        # bytes of the framing and header without prompts, and of one video with the longest prompt
        fixed = 8 + len(json.dumps({"shape": list(videos.shape), "dtype": "uint8", "prompts": [],
                                    "fps": float(fps), "rewards": self.subset})) + 16 + (0 if audio is None else 128)
        per_video = (videos[0].numel() + max(len(json.dumps(p)) for p in prompts) + 2
                     + (0 if audio is None else 4 * audio.waveforms[0].numel()))
        if fixed + per_video > self.max_request_bytes:
            raise RewardError(f"one video of {tuple(videos.shape[1:])} ({videos[0].numel()} bytes) exceeds the "
                              f"request limit of reward server {self.url} ({self.max_request_bytes} bytes): "
                              f"raise its --max-request-mb")
        step = (self.max_request_bytes - fixed) // per_video
        return [(a, min(a + step, b)) for a in range(0, b, step)]

    def _score(self, videos: torch.Tensor, prompts: list[str], fps: float, audio: Audio | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
        try:
            body = encode_request(videos, prompts, fps, self.subset, audio)
        except WireError as e:
            raise RewardError(f"remote reward: {e}") from None
        resp = self._request("POST", "/score", content=body, headers={"Content-Type": BINARY_TYPE})
        try:
            scores, extras, weights = decode_response(self._json(resp, "/score"))
        except WireError as e:
            raise RewardError(f"reward server {self.url}/score: bad response: {e}") from None
        b = videos.shape[0]
        for k, v in {**scores, **extras}.items():
            if v.shape[:1] != (b,):
                raise RewardError(f"reward server {self.url}/score: {k} has shape {tuple(v.shape)} for {b} videos")
        return scores, extras, weights

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self._client.request(method, self.url + path, **kw)
        except self._httpx.TimeoutException:
            raise RewardError(f"reward server {self.url}{path}: no answer within {self._client.timeout.read}s "
                              f"(timeout option)") from None
        except self._httpx.HTTPError as e:
            raise RewardError(f"reward server {self.url}{path} unreachable: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'connection failed'}") from None
        if resp.status_code >= 400:
            try:
                reason = resp.json().get("error") or resp.json().get("detail")
            except (ValueError, AttributeError):
                reason = resp.text[:200].replace("\n", " ")
            raise RewardError(f"reward server {self.url}{path} answered {resp.status_code}: {reason}")
        return resp

    def _json(self, resp: Any, path: str) -> dict[str, Any]:
        try:
            doc = resp.json()
        except (ValueError, json.JSONDecodeError):
            raise RewardError(f"reward server {self.url}{path}: the answer is not JSON") from None
        if not isinstance(doc, dict):
            raise RewardError(f"reward server {self.url}{path}: the answer is not a JSON object")
        return doc

    def close(self) -> None:
        self._client.close()
