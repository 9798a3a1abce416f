"""Flow denoising as an MDP: schedules, sampler steps, token log-probabilities and KL.

Pure tensor functions (SPEC sections 1-2). No models, no I/O, no processes.

Conventions (diffusers): ``x_sigma = (1 - sigma) * x0 + sigma * eps``, the model predicts
``v ~ eps - x0``, time runs from sigma=1 (noise) to sigma=0 (data). A latent is
``(B, C, F, H, W)``. A *token* is one ``(pt, ph, pw)`` patch, tokens in ``(f, h, w)``
row-major order (the transformer's own patch-embedding order), ``D = C*pt*ph*pw``
elements each. Everything here is computed in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Union

import torch
from einops import reduce

SAMPLERS = ("flow_sde", "cps")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def flow_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """Shifted flow-matching schedule ``1 = sigma_0 > ... > sigma_K = 0``.

    ``sigma -> shift * sigma / (1 + (shift - 1) * sigma)`` applied to ``linspace(1, 0, K+1)``
    (Wan: shift 3 at 480p, 5 at 720p). Returns ``(K+1,)`` float64 for exact bookkeeping.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


def _per_sample(value: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A float or ``(B,)`` tensor as a float32 ``(B,)`` tensor."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.ndim == 0:
        return t.expand(batch).clone()
    if t.shape != (batch,):
        raise ValueError(f"expected a float or a ({batch},) tensor, got shape {tuple(t.shape)}")
    return t


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, 1, ...)`` matching ``like``'s rank."""
    return t.view(-1, *([1] * (like.ndim - 1)))


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor,
             sigma_next: float | torch.Tensor) -> torch.Tensor:
    """Deterministic Euler step ``x + v * (sigma_next - sigma)``; ``(B, C, F, H, W)`` float32."""
    x32, v32 = x.float(), v.float()
    s = _bcast(_per_sample(sigma, x.shape[0], x.device), x32)
    sn = _bcast(_per_sample(sigma_next, x.shape[0], x.device), x32)
    return x32 + v32 * (sn - s)


def sde_step(kind: str, x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor,
             sigma_next: float | torch.Tensor, eta: float,
             sigma_1: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the Gaussian policy ``pi(x_{k+1} | x_k) = N(mean, std^2 I)``.

    Args:
        kind: ``"flow_sde"`` (Flow-GRPO) or ``"cps"`` (coefficients-preserving sampling).
        x: latent at ``sigma``, ``(B, C, F, H, W)``.
        v: velocity at ``(x, sigma)``, same shape (any dtype; used in float32).
        sigma, sigma_next: float or ``(B,)``; ``sigma_next < sigma``.
        eta: noise level.
        sigma_1: the schedule's second sigma; Flow-SDE uses it in place of ``sigma`` inside
            ``sqrt(sigma / (1 - sigma))`` when ``sigma == 1``.

    Returns:
        ``mean`` ``(B, C, F, H, W)`` float32 and ``std`` ``(B,)`` float32 (any latent rank works: a
        flat ``(B, E)`` of :class:`TokenStreams` alike).
    """
    if x.shape != v.shape:
        raise ValueError(f"x {tuple(x.shape)} and v {tuple(v.shape)} must have the same shape")
    b = x.shape[0]
    x32, v32 = x.float(), v.float()
    s = _per_sample(sigma, b, x.device)
    sn = _per_sample(sigma_next, b, x.device)
    if kind == "flow_sde":
        s_tilde = s
        at_one = s >= 1.0
        if bool(at_one.any()):
            if sigma_1 is None:
                raise ValueError("flow_sde step at sigma == 1 needs sigma_1 (the schedule's second sigma)")
            s_tilde = torch.where(at_one, _per_sample(sigma_1, b, x.device), s)
        g = eta * torch.sqrt(s / (1.0 - s_tilde))
        dt = sn - s
        gb, sb, dtb = _bcast(g, x32), _bcast(s, x32), _bcast(dt, x32)
        mean = x32 + (v32 + gb.square() / (2.0 * sb) * (x32 + (1.0 - sb) * v32)) * dtb
        std = g * torch.sqrt(-dt)
    elif kind == "cps":
        std = sn * math.sin(eta * math.pi / 2.0)
        sb, snb, stdb = _bcast(s, x32), _bcast(sn, x32), _bcast(std, x32)
        x0_hat = x32 - sb * v32
        x1_hat = x32 + (1.0 - sb) * v32
        mean = (1.0 - snb) * x0_hat + torch.sqrt((snb.square() - stdb.square()).clamp_min(0.0)) * x1_hat
    else:
        raise ValueError(f"unknown sampler kind {kind!r}; expected one of {SAMPLERS}")
    return mean, std


@dataclasses.dataclass(frozen=True)
class Stream:
    """One token stream of a multi-stream latent: ``tokens`` tokens of ``elements`` (``D``) latent
    elements each, laid out as ``grid`` (its token map: ``(F', H', W')`` for video, ``(L,)`` for
    audio); ``trains``: whether its tokens enter the objective (False: sampled, not trained)."""

    name: str
    tokens: int
    elements: int
    grid: tuple[int, ...]
    trains: bool = True

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.elements < 1 or math.prod(self.grid) != self.tokens:
            raise ValueError(f"stream {self.name!r}: {self.tokens} tokens of {self.elements} elements "
                             f"do not fit its grid {self.grid}")


@dataclasses.dataclass(frozen=True)
class TokenStreams:
    """The token map of a latent carried flat, ``(B, E)``: consecutive streams (LTX-2: the video
    tokens, then the audio tokens), each ``(N_s, D_s)`` row-major (token-major: a token's ``D_s``
    elements are contiguous), ``E = sum_s N_s D_s``. Used wherever a ``(pt, ph, pw)`` patch is:
    token ``n`` of the whole latent is token ``n - offset_s`` of its stream ``s``, with that stream's ``D``."""

    streams: tuple[Stream, ...]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def elements(self) -> int:
        return sum(s.tokens * s.elements for s in self.streams)

    def token_elements(self) -> torch.Tensor:
        """``(N,)`` float32: ``D`` of every token (its stream's)."""
        return torch.cat([torch.full((s.tokens,), float(s.elements)) for s in self.streams])

    def spans(self) -> dict[str, slice]:
        """Each stream's tokens as a slice of the ``N`` tokens."""
        out, start = {}, 0
        for s in self.streams:
            out[s.name] = slice(start, start + s.tokens)
            start += s.tokens
        return out

    def trained(self) -> torch.Tensor:
        """``(N,)`` bool: the tokens of streams that train."""
        return torch.cat([torch.full((s.tokens,), s.trains) for s in self.streams])

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """``(B, E)`` -> one ``(B, N_s, D_s)`` view per stream."""
        if values.ndim != 2 or values.shape[1] != self.elements:
            raise ValueError(f"expected a flat latent (B, {self.elements}), got shape {tuple(values.shape)}")
        parts = values.split([s.tokens * s.elements for s in self.streams], dim=1)
        return [p.reshape(p.shape[0], s.tokens, s.elements) for p, s in zip(parts, self.streams)]


# What the token functions take as ``patch``: a ``(pt, ph, pw)`` patch of a ``(B, C, F, H, W)``
# latent, or the :class:`TokenStreams` of a flat ``(B, E)`` latent.
Tokens = Union[tuple[int, int, int], TokenStreams]


def element_counts(shape: tuple[int, ...] | torch.Size, patch: Tokens) -> int | torch.Tensor:
    """``D`` of the tokens: one int for a patch (every token alike), ``(N,)`` for :class:`TokenStreams`."""
    if isinstance(patch, TokenStreams):
        if tuple(shape)[1:] != (patch.elements,):
            raise ValueError(f"latent {tuple(shape)} is not the flat (B, {patch.elements}) of its token streams")
        return patch.token_elements()
    return patch_count(shape, patch)[1]


def patch_count(shape: tuple[int, ...] | torch.Size, patch: tuple[int, int, int]) -> tuple[int, int]:
    """``(N, D)`` for a latent ``(B, C, F, H, W)`` cut into ``patch = (pt, ph, pw)`` tokens."""
    if isinstance(patch, TokenStreams):
        raise ValueError("a latent of several token streams has no single D: use element_counts")
    if len(shape) != 5:
        raise ValueError(f"expected a latent (B, C, F, H, W), got shape {tuple(shape)}")
    _, c, f, h, w = shape
    pt, ph, pw = patch
    if f % pt or h % ph or w % pw:
        raise ValueError(
            f"latent (F, H, W) = ({f}, {h}, {w}) is not divisible by patch (pt, ph, pw) = {tuple(patch)}")
    return (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw


def token_sum(values: torch.Tensor, patch: Tokens) -> torch.Tensor:
    """Sum ``(B, C, F, H, W)`` element values over each token's patch: ``(B, N)``.

    Tokens are in ``(f, h, w)`` row-major order, as the transformer's patch embedding. With
    :class:`TokenStreams`, ``values`` is the flat ``(B, E)`` and each stream's tokens follow the last's.
    """
    if isinstance(patch, TokenStreams):
        return torch.cat([v.sum(dim=-1) for v in patch.split(values)], dim=1)
    patch_count(values.shape, patch)
    pt, ph, pw = patch
    # Channels and the positions inside a patch are summed; the token axis is (f', h', w') row-major.
    return reduce(values, "b c (f pt) (h ph) (w pw) -> b (f h w)", "sum", pt=pt, ph=ph, pw=pw)


def token_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, patch: Tokens) -> torch.Tensor:
    """Per-token Gaussian log-density of ``x_next`` under ``N(mean, std^2 I)``.

    ``l_n = -sum_{e in n} (x'_e - mu_e)^2 / (2 s^2) - D (log s + 0.5 log 2 pi)``.

    Args:
        x_next, mean: ``(B, C, F, H, W)``.
        std: ``(B,)``, positive.
        patch: ``(pt, ph, pw)``, or the :class:`TokenStreams` of a flat ``(B, E)`` latent (each
            token's ``D`` is its stream's).
    Returns:
        ``(B, N)`` float32.
    """
    if x_next.shape != mean.shape:
        raise ValueError(f"x_next {tuple(x_next.shape)} and mean {tuple(mean.shape)} differ in shape")
    d = element_counts(mean.shape, patch)
    if isinstance(d, torch.Tensor):
        d = d.to(mean.device)[None, :]
    s = std.float()
    sq = token_sum((x_next.float() - mean.float()).square(), patch)
    return -sq / (2.0 * s.square()[:, None]) - d * (torch.log(s)[:, None] + _LOG_SQRT_2PI)


def token_kl(mean_new: torch.Tensor, mean_old: torch.Tensor, std: torch.Tensor, patch: Tokens) -> torch.Tensor:
    """Exact per-token ``KL(N(mean_old, s^2) || N(mean_new, s^2))``, ``(B, N)`` float32.

    Both policies share ``s`` (it depends only on the schedule), so the KL is
    ``sum_{e in n} (mu_new - mu_old)^2 / (2 s^2)``.
    """
    if mean_new.shape != mean_old.shape:
        raise ValueError(f"mean_new {tuple(mean_new.shape)} and mean_old {tuple(mean_old.shape)} differ")
    sq = token_sum((mean_new.float() - mean_old.float()).square(), patch)
    return sq / (2.0 * std.float().square()[:, None])


def sde_candidates(num_steps: int, window: tuple[float, float], kind: str,
                   schedule: torch.Tensor | None = None) -> list[int]:
    """Steps ``k`` with ``window[0] * K <= k < window[1] * K`` that can be SDE steps.

    CPS steps into ``sigma' = 0`` have zero std and are never candidates.
    """
    lo, hi = window
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"sampler.window must satisfy 0 <= start < end <= 1, got {list(window)}")
    # Integer bounds with a tolerance: 0.14 * 50 is 7.000000000000001 in binary floating point.
    start, end = math.ceil(lo * num_steps - 1e-9), math.ceil(hi * num_steps - 1e-9)
    cands = list(range(start, min(end, num_steps)))
    if kind == "cps":
        sig = schedule if schedule is not None else flow_schedule(num_steps)
        cands = [k for k in cands if float(sig[k + 1]) > 0.0]
    return cands


def choose_sde_steps(num_steps: int, count: int, window: tuple[float, float], kind: str,
                     generator: torch.Generator, schedule: torch.Tensor | None = None,
                     allowed: Callable[[int], bool] | None = None, label: str = "candidate steps") -> list[int]:
    """Pick which steps of a ``num_steps`` schedule are SDE (policy) steps.

    ``count`` of the :func:`sde_candidates` (those ``allowed`` keeps, if given; ``label`` names them
    in the error) are drawn without replacement with ``generator``.
    Returns sorted step indices.
    """
    cands = sde_candidates(num_steps, window, kind, schedule)
    if allowed is not None:
        cands = [k for k in cands if allowed(k)]
    if count > len(cands):
        raise ValueError(
            f"sampler.sde_steps={count} exceeds the {len(cands)} {label} in window {list(window)} "
            f"of {num_steps} steps")
    perm = torch.randperm(len(cands), generator=generator)[:count]
    return sorted(cands[i] for i in perm.tolist())


# ------------------------------------------------------------------ the deterministic tail
# After a rollout's last SDE step the rest of the schedule is a deterministic flow ODE whose only use
# is the decoded video for the reward: it may be finished with fewer steps of a higher-order solver.

TAIL_SOLVERS = ("euler", "heun", "dpm2m")


def tail_schedule(schedule: torch.Tensor, start: int, steps: int) -> torch.Tensor:
    """Sigmas of a ``steps``-step tail from ``schedule[start]`` to ``schedule[-1] = 0``.

    The tail keeps ``steps + 1`` of the schedule's own sigmas, at indices
    ``floor(linspace(start, K, steps + 1) + 1/2)``: the family's shift stays in the spacing, the ends
    are exact, and with ``steps >= K - start`` it is the schedule's own remainder.

    Args:
        schedule: ``(K+1,)`` the flow schedule (:func:`flow_schedule`).
        start: the index the tail starts at (the step after the last SDE step).
        steps: the tail's step count, ``>= 1``.
    Returns:
        ``(T+1,)`` decreasing sigmas, ``T = min(steps, K - start)`` (``(1,)`` when nothing is left).
    """
    k = schedule.numel() - 1
    if not 0 <= start <= k:
        raise ValueError(f"tail start {start} is outside the schedule's steps 0..{k}")
    if steps < 1:
        raise ValueError(f"a tail needs at least one step, got {steps}")
    t = min(steps, k - start)
    # Spaced >= 1 apart, so rounding half up keeps the indices distinct.
    idx = torch.floor(torch.linspace(start, k, t + 1, dtype=torch.float64) + 0.5).long()
    return schedule[idx]


def tail_evaluations(solver: str, steps: int) -> int:
    """Velocity evaluations a ``steps``-step tail of ``solver`` takes per row (before CFG doubling):
    Euler and DPM-Solver++(2M) one a step, Heun two."""
    if solver not in TAIL_SOLVERS:
        raise ValueError(f"unknown tail solver {solver!r}; expected one of {TAIL_SOLVERS}")
    return max(steps, 0) * (2 if solver == "heun" else 1)


def heun_step(x: torch.Tensor, v: torch.Tensor, v_pred: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Heun's corrector on the flow ODE: ``x + (v + v_pred) / 2 * (sigma_next - sigma)``.

    ``v`` is the velocity at ``(x, sigma)``, ``v_pred`` at the Euler predictor
    ``(ode_step(x, v, sigma, sigma_next), sigma_next)``. Second order, on every step: unlike EDM's
    derivative ``(x - D(x)) / sigma`` (Karras et al. 2022 take Euler into 0), the flow velocity is defined
    at ``sigma = 0`` (``-x0`` plus a term that vanishes with the score's ``sigma``), and an Euler last step
    would hold the whole tail to first order. ``(B, C, F, H, W)`` float32.
    """
    return x.float() + 0.5 * (v.float() + v_pred.float()) * (sigma_next - sigma)


def _log_snr(sigma: float) -> float:
    """``lambda = log(alpha / sigma)`` of the flow path ``x = (1 - sigma) x0 + sigma eps``."""
    return math.log((1.0 - sigma) / sigma)


def dpm2m_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float,
               prev: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep) on the flow ODE.

    With ``alpha = 1 - sigma``, ``x0 = x - sigma v`` and ``lambda = log(alpha / sigma)``,
    ``h = lambda' - lambda``:
    ``x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) D`` where ``D = x0`` at a first step (``prev`` None;
    this is exactly the Euler step) or into ``sigma' = 0`` (``x' = x0``, diffusers' ``lower_order_final``),
    else ``D = x0 + (x0 - x0_prev) / (2 r)``, ``r = h_prev / h``, ``h_prev = lambda - lambda_prev``.

    Args:
        x, v: ``(B, C, F, H, W)``, the state at ``sigma`` and its velocity.
        sigma, sigma_next: ``1 > sigma > sigma_next >= 0``.
        prev: ``(x0_prev, sigma_prev)`` of the previous step, or None.
    Returns:
        ``(x_next, x0)``: float32; pass ``(x0, sigma)`` as the next step's ``prev``.
    """
    if not 0.0 <= sigma_next < sigma < 1.0:
        raise ValueError(f"dpm2m needs 1 > sigma > sigma_next >= 0, got {sigma} -> {sigma_next}")
    x32 = x.float()
    x0 = x32 - sigma * v.float()
    if sigma_next == 0.0:
        return x0, x0
    h = _log_snr(sigma_next) - _log_snr(sigma)
    d = x0
    if prev is not None:
        x0_prev, sigma_prev = prev
        r = (_log_snr(sigma) - _log_snr(sigma_prev)) / h
        d = x0 + (x0 - x0_prev.float()) / (2.0 * r)
    return (sigma_next / sigma) * x32 + (1.0 - sigma_next) * (-math.expm1(-h)) * d, x0


# ------------------------------------------------------------------ shared-noise groups (trees)

def branch_widths(factors: list[int], width0: int) -> list[int]:
    """Distinct states per group before each SDE step and after the last: ``(S+1,)`` ints.

    A group starts as ``width0`` states (1: one shared initial noise; ``G``: independent noise) and each
    of its ``S`` SDE steps gives every state ``factors[j]`` children (distinct noise draws from the same
    mean): ``widths[j+1] = widths[j] * factors[j]``.
    """
    if width0 < 1 or any(f < 1 for f in factors):
        raise ValueError(f"branching factors and the initial width must be >= 1, got {factors}, {width0}")
    out = [width0]
    for f in factors:
        out.append(out[-1] * f)
    return out


def leaf_ancestor(leaves: torch.Tensor, group_size: int, width: int) -> torch.Tensor:
    """The state, at a depth of ``width`` states per group, that each leaf descends from.

    Leaves (rows of the batch) are grouped ``G`` to a prompt, and a state's children are contiguous, so
    leaf ``b`` descends from state ``b // (G / width)`` (states numbered over the batch, ``width`` per group).
    ``leaves``: ``(n,)`` long; returns ``(n,)`` long.
    """
    if width < 1 or group_size % width:
        raise ValueError(f"a depth of {width} states per group does not divide the group of {group_size}")
    return leaves // (group_size // width)
