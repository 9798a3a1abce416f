"""Policy objectives over token log-probabilities (SPEC section 3).

Pure functions. Inputs are per-token tensors ``(B, N)`` for one SDE step (or several steps
stacked along the first axis, with their advantages repeated) and advantages ``(B,)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

GRANULARITIES = ("token", "sample", "row_gated", "row")
NORMALIZATIONS = ("all", "kept")


def _check(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor) -> None:
    if logp_new.ndim != 2 or logp_new.shape != logp_old.shape:
        raise ValueError(f"logp_new {tuple(logp_new.shape)} and logp_old {tuple(logp_old.shape)} "
                         "must both be (B, N)")
    if advantages.shape != (logp_new.shape[0],):
        raise ValueError(f"advantages must be ({logp_new.shape[0]},), got {tuple(advantages.shape)}")


def _row_elements(tokens: int, elements_per_token: "int | torch.Tensor") -> "float | torch.Tensor":
    """Latent elements of a row of ``tokens`` tokens (``D`` one int, or ``(N,)`` per token)."""
    if isinstance(elements_per_token, torch.Tensor):
        return elements_per_token.sum()
    return tokens * elements_per_token


def _row_means(log_ratio: torch.Tensor, kl: torch.Tensor, elements_per_token: "int | torch.Tensor"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-ratio and KL, each the mean over all latent elements of the row: ``(B, 1)``."""
    n_el = _row_elements(log_ratio.shape[1], elements_per_token)
    return log_ratio.sum(dim=1, keepdim=True) / n_el, kl.sum(dim=1, keepdim=True) / n_el


def _check_elements(elements_per_token: "int | torch.Tensor | None") -> "int | torch.Tensor":
    """``D``: a positive int, or a ``(N,)`` tensor of each token's ``D`` (a latent of several token
    streams, :class:`flowdppo_video.sde.TokenStreams`), float32."""
    if isinstance(elements_per_token, torch.Tensor):
        if elements_per_token.ndim != 1 or not bool((elements_per_token >= 1).all()):
            raise ValueError("elements_per_token as a tensor must be (N,) with every token's D >= 1")
        return elements_per_token.float()
    if elements_per_token is None or isinstance(elements_per_token, bool) or elements_per_token < 1:
        raise ValueError(f"elements_per_token (D = C*pt*ph*pw) must be a positive integer, got {elements_per_token!r}: "
                         "delta is in nats per latent element for every granularity")
    return int(elements_per_token)


def dppo_drop_mask(log_ratio: torch.Tensor, kl: torch.Tensor, advantages: torch.Tensor,
                   delta: float) -> torch.Tensor:
    """The asymmetric divergence mask: True where a term is dropped.

    ``drop = (KL > delta) and ((rho > 1 and A > 0) or (rho < 1 and A < 0))``: a term far from
    ``pi_old`` is frozen only while the update pushes it further the way its advantage wants.
    ``kl`` and ``delta`` must be in the same unit (callers pass a per-element KL).

    Args:
        log_ratio, kl: ``(B, N)``; advantages: ``(B,)``.
    Returns:
        bool ``(B, N)``.
    """
    a = advantages[:, None]
    pushing = ((log_ratio > 0) & (a > 0)) | ((log_ratio < 0) & (a < 0))
    return (kl > delta) & pushing


def clip_frozen_rows(row_log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Rows whose clipped ratio binds the way their advantage pushes (no gradient): bool, the
    shape of ``row_log_ratio`` (``(B,)`` or ``(B, 1)``)."""
    ratio = torch.exp(row_log_ratio)
    a = advantages.reshape(advantages.shape[0], *([1] * (row_log_ratio.ndim - 1)))
    return ((ratio > 1.0 + clip_range) & (a > 0)) | ((ratio < 1.0 - clip_range) & (a < 0))


def trust_region_mask(kind: str, log_ratio: torch.Tensor, kl: torch.Tensor, advantages: torch.Tensor, *,
                      elements_per_token: int, delta: float = math.inf, granularity: str = "token",
                      clip_range: float = 1e-3) -> torch.Tensor:
    """Which token terms an objective freezes (no gradient), bool ``(B, N)``: the one place the
    rules are written (the losses and the KL maps both use it).

    - ``flow_dppo`` / ``token``: per token, ``KL_n / D > delta`` and pushing (SPEC section 3).
    - ``flow_dppo`` / ``sample``: one decision per row on its per-element mean KL and log-ratio,
      spread over the row's tokens.
    - ``flow_dppo`` / ``row_gated``: the token rule, but only inside rows whose own per-element
      mean KL is past ``delta``: a row that drifts as a whole has its far tokens frozen, a row
      whose change is concentrated in a few tokens (an object moving) keeps them.
    - ``flow_dppo`` / ``row``: the sample rule's decision (the row's per-element mean KL past
      ``delta``) with the token rule's direction test: inside such a row every token that pushes the
      way its advantage wants is frozen, a corrective one passes; token ratios throughout.
    - ``grpo_clip``: rows whose clipped ratio binds the way their advantage pushes.

    Args:
        log_ratio, kl: ``(B, N)`` token log-ratio ``log pi_theta - log pi_old`` and exact token KL.
        advantages: ``(B,)``. elements_per_token: ``D``. delta: nats per latent element.
    """
    d = _check_elements(elements_per_token)
    adv = advantages.to(log_ratio.dtype)
    row_log_ratio, row_kl = _row_means(log_ratio, kl, d)
    if kind == "grpo_clip":
        return clip_frozen_rows(row_log_ratio, adv, clip_range).expand_as(log_ratio)
    if kind != "flow_dppo":
        raise ValueError(f"unknown objective kind {kind!r}")
    if granularity == "sample":
        return dppo_drop_mask(row_log_ratio, row_kl, adv, delta).expand_as(log_ratio)
    token = dppo_drop_mask(log_ratio, kl / (d.to(kl.device) if isinstance(d, torch.Tensor) else d), adv, delta)
    if granularity == "token":
        return token
    if granularity == "row_gated":
        return token & (row_kl > delta)
    if granularity == "row":
        return dppo_drop_mask(log_ratio, row_kl.expand_as(kl), adv, delta)
    raise ValueError(f"objective.granularity must be one of {GRANULARITIES}, got {granularity!r}")


def flow_dppo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, kl: torch.Tensor,
                   advantages: torch.Tensor, delta: float, *, elements_per_token: int,
                   granularity: str = "token", normalize: str = "all"
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-DPPO: ``L = -(1/Z) sum A * rho * 1[not drop]``.

    Args:
        logp_new: ``(B, N)`` token log-probs under ``pi_theta`` (carries the gradient).
        logp_old: ``(B, N)`` token log-probs under ``pi_old``.
        kl: ``(B, N)`` exact token ``KL(pi_old || pi_theta)`` (summed over the token's ``D``
            elements); only compared with ``delta``.
        advantages: ``(B,)``.
        delta: threshold in nats **per latent element**, for every granularity: a token is
            dropped when ``KL_n / D > delta`` (and it pushes the way its advantage wants).
        elements_per_token: ``D = C*pt*ph*pw``.
        granularity: ``"token"`` (one decision and one ratio per token), ``"sample"`` (the
            image-model reference: one ratio and KL per row, each the mean over all latent
            elements) or ``"row_gated"`` (token terms, frozen only inside rows whose mean KL
            per element is past ``delta``) or ``"row"`` (token terms, the decision per row on
            its mean KL per element, the direction test per token); see :func:`trust_region_mask`.
        normalize: ``"all"`` divides by the number of terms, ``"kept"`` by the kept count.

    Returns:
        ``loss`` (scalar) and ``stats`` (detached scalars): ``drop_frac``, ``drop_frac_pos``,
        ``drop_frac_neg``, the counts ``dropped``, ``terms``, ``dropped_pos``, ``terms_pos``,
        ``dropped_neg``, ``terms_neg`` (rows with a zero advantage count on neither side),
        ``kl_mean``, ``kl_max``, ``log_ratio_max_abs``.
    """
    loss, stats, _ = _flow_dppo(logp_new, logp_old, kl, advantages, delta, elements_per_token, granularity,
                                normalize)
    return loss, stats


def _flow_dppo(logp_new: torch.Tensor, logp_old: torch.Tensor, kl: torch.Tensor, advantages: torch.Tensor,
               delta: float, elements_per_token: int, granularity: str, normalize: str
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """:func:`flow_dppo_loss` and its drop mask (``(B, N)``, or ``(B, 1)`` for ``sample``)."""
    _check(logp_new, logp_old, advantages)
    if granularity not in GRANULARITIES:
        raise ValueError(f"objective.granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"objective.normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    d = _check_elements(elements_per_token)
    token_log_ratio = logp_new - logp_old
    drop = trust_region_mask("flow_dppo", token_log_ratio.detach(), kl.detach(), advantages,
                             elements_per_token=d, delta=delta, granularity=granularity)
    if granularity == "sample":
        log_ratio, _ = _row_means(token_log_ratio, kl, d)
        drop = drop[:, :1]
    else:
        log_ratio = token_log_ratio
    adv = advantages.to(log_ratio.dtype)
    # Mask the log-ratio before exp, and the product after: a dropped, overflowing rho then
    # contributes neither inf to the loss nor 0*inf=NaN to the gradient.
    safe_log_ratio = torch.where(drop, torch.zeros_like(log_ratio), log_ratio)
    terms = torch.where(drop, torch.zeros_like(log_ratio), adv[:, None] * torch.exp(safe_log_ratio))
    kept = (~drop).sum()
    z = terms.numel() if normalize == "all" else kept.clamp_min(1)
    loss = -terms.sum() / z
    return loss, mask_stats(drop, adv, log_ratio, kl), drop


def mask_stats(drop: torch.Tensor, adv: torch.Tensor, log_ratio: torch.Tensor, kl: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """Detached stats of a frozen-term mask ``drop (B, N)`` (or ``(B, 1)``): the drop fractions
    overall and per advantage sign, their counts (:data:`COUNT_KEYS`), and the KL and log-ratio
    extremes. ``adv (B,)``, ``log_ratio`` and ``kl`` the terms' own."""
    with torch.no_grad():
        pos = (adv > 0)[:, None].expand_as(drop)
        neg = (adv < 0)[:, None].expand_as(drop)
        f = drop.float()
        zero = f.new_zeros(())
        return {
            "drop_frac": f.mean(),
            "drop_frac_pos": f[pos].mean() if pos.any() else zero,
            "drop_frac_neg": f[neg].mean() if neg.any() else zero,
            # Counts, so callers can pool fractions over minibatches without bias.
            "dropped": f.sum(), "terms": f.new_tensor(float(f.numel())),
            "dropped_pos": f[pos].sum(), "terms_pos": pos.sum().float(),
            "dropped_neg": f[neg].sum(), "terms_neg": neg.sum().float(),
            "kl_mean": kl.detach().float().mean(),
            "kl_max": kl.detach().float().max(),
            "log_ratio_max_abs": log_ratio.detach().abs().max(),
        }


def grpo_clip_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                   clip_range: float, elements_per_token: int, kl: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-GRPO ratio clipping, the baseline.

    ``rho_b = exp(mean_e [log N(x'; mu_theta) - log N(x'; mu_old)])`` (mean over all latent
    elements of the row), ``L = mean_b max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``.

    Args:
        logp_new, logp_old: ``(B, N)`` token log-probs; advantages ``(B,)``.
        clip_range: ``eps``. elements_per_token: ``D``.
        kl: optional ``(B, N)`` token KL, only for the stats.
    Returns:
        ``loss`` and ``stats`` (``clip_frac``, ``log_ratio_max_abs``, KL stats when given).
    """
    loss, stats, _ = _grpo_clip(logp_new, logp_old, advantages, clip_range, elements_per_token, kl)
    return loss, stats


def _grpo_clip(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_range: float,
               elements_per_token: int, kl: torch.Tensor | None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """:func:`grpo_clip_loss` and its frozen rows ``(B, 1)``."""
    _check(logp_new, logp_old, advantages)
    n_el = _row_elements(logp_new.shape[1], _check_elements(elements_per_token))
    log_ratio = (logp_new - logp_old).sum(dim=1) / n_el
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        # A clipped row carries no gradient when the clip binds the way its advantage pushes.
        frozen = clip_frozen_rows(log_ratio, adv, clip_range)
        stats = mask_stats(frozen[:, None], adv, log_ratio[:, None],
                            kl if kl is not None else torch.zeros_like(logp_new))
        stats["clip_frac"] = ((ratio - 1.0).abs() > clip_range).float().mean()
        if kl is None:
            del stats["kl_mean"], stats["kl_max"]
    return loss, stats, frozen[:, None]


def reference_kl_loss(kl_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * mean_{b,n} KL_n(pi_ref || pi_theta)`` from a ``(B, N)`` token KL."""
    return beta * kl_ref.mean()


COUNT_KEYS = ("dropped", "terms", "dropped_pos", "terms_pos", "dropped_neg", "terms_neg")


@dataclass(frozen=True)
class ObjectiveOutput:
    """What one objective evaluation gives the update.

    ``loss``: scalar with the gradient. ``frozen``: bool ``(B, N)``, the token terms the trust
    region froze (a row decision spread over its tokens). ``stats``: detached scalar means
    (``kl_mean``, ``drop_frac``, ...). ``counts``: detached sums (``dropped``, ``terms`` and their
    ``_pos`` / ``_neg`` sides), so fractions can be pooled over minibatches without bias.
    """

    loss: torch.Tensor
    frozen: torch.Tensor
    stats: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]


# ---------------------------------------------------------------------- the objective registry
OBJECTIVES: dict[str, type["PolicyObjective"]] = {}


def register_objective(kind: str) -> Callable[[type["PolicyObjective"]], type["PolicyObjective"]]:
    """Class decorator: make a :class:`PolicyObjective` subclass available as ``objective.kind: kind``
    (config validation, the trainer and the frontier tools read this registry)."""
    def deco(cls: type["PolicyObjective"]) -> type["PolicyObjective"]:
        if not (isinstance(cls, type) and issubclass(cls, PolicyObjective)):
            raise TypeError(f"objective {kind!r}: {cls!r} is not a PolicyObjective subclass")
        if kind in OBJECTIVES and OBJECTIVES[kind] is not cls:
            raise ValueError(f"objective kind {kind!r} is already registered by {OBJECTIVES[kind].__qualname__}")
        cls.kind = kind
        OBJECTIVES[kind] = cls
        return cls
    return deco


class PolicyObjective:
    """A policy objective, one class per ``objective.kind`` (SPEC section 3), registered with
    :func:`register_objective`.

    Built once per run from the ``objective`` config section and ``D`` (latent elements per
    token); called on one SDE step's token tensors:
    ``objective(logp_new, logp_old, kl, advantages) -> ObjectiveOutput``. A subclass implements
    :meth:`evaluate` and may declare:

    - ``knob``: the section key that sets its trust region's strength (the frontier sweeps it);
    - ``variants``: named settings of the section worth comparing (``{"token": {"granularity":
      "token"}, ...}``), the arms of the frontier and calibration tools;
    - :meth:`check`: validation of the section's keys it reads (a ``ValueError`` naming the key).

    Keys of its own beyond the built-in ones go under ``objective.options`` (a dict).
    """

    kind: ClassVar[str] = ""
    knob: ClassVar[str | None] = None
    variants: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, section: Any, elements_per_token: int) -> None:
        self.section = section
        self.elements_per_token = _check_elements(elements_per_token)

    @classmethod
    def check(cls, section: Any) -> None:
        """Raise ``ValueError`` naming the ``objective.<key>`` that this objective cannot use."""

    @classmethod
    def from_config(cls, section: Any, elements_per_token: int) -> "PolicyObjective":
        """The registered objective of ``section.kind``, built from the section."""
        return objective_class(section.kind)(section, elements_per_token)

    def evaluate(self, logp_new: torch.Tensor, logp_old: torch.Tensor, kl: torch.Tensor, advantages: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """``(loss, stats, frozen)``: the scalar loss with its gradient, detached scalar stats (the
        counts of :data:`COUNT_KEYS` among them, or they are computed from ``frozen``) and the
        frozen terms, bool broadcastable to ``(B, N)``."""
        raise NotImplementedError

    def __call__(self, logp_new: torch.Tensor, logp_old: torch.Tensor, kl: torch.Tensor,
                 advantages: torch.Tensor) -> ObjectiveOutput:
        """Args: ``(B, N)`` token log-probs under ``pi_theta`` (with grad) and ``pi_old``, the exact
        token KL ``(B, N)``, advantages ``(B,)``."""
        _check(logp_new, logp_old, advantages)
        loss, stats, frozen = self.evaluate(logp_new, logp_old, kl, advantages)
        frozen = frozen.expand(logp_new.shape)
        if any(k not in stats for k in COUNT_KEYS):
            stats = {**mask_stats(frozen, advantages.to(logp_new.dtype), (logp_new - logp_old).detach(), kl), **stats}
        counts = {k: stats.pop(k) for k in COUNT_KEYS}
        return ObjectiveOutput(loss, frozen, stats, counts)


def objective_class(kind: str) -> type[PolicyObjective]:
    """The registered class of ``objective.kind``; ValueError naming the choices otherwise."""
    if kind not in OBJECTIVES:
        raise ValueError(f"objective.kind={kind!r} is not one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind]


def check_section(section: Any) -> None:
    """Validate an ``objective`` section against the registry (its kind, then the kind's own keys)."""
    if section.normalize not in NORMALIZATIONS:
        raise ValueError(f"objective.normalize={section.normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
    objective_class(section.kind).check(section)


@register_objective("flow_dppo")
class FlowDPPO(PolicyObjective):
    """Flow-DPPO: the asymmetric divergence mask at ``delta`` nats per latent element, decided per
    ``granularity`` (:func:`flow_dppo_loss`)."""

    knob = "delta"
    variants = {g: {"granularity": g} for g in GRANULARITIES}

    @classmethod
    def check(cls, section: Any) -> None:
        if section.granularity not in GRANULARITIES:
            raise ValueError(f"objective.granularity={section.granularity!r} is not one of {', '.join(GRANULARITIES)}")

    def evaluate(self, logp_new: torch.Tensor, logp_old: torch.Tensor, kl: torch.Tensor, advantages: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        o = self.section
        return _flow_dppo(logp_new, logp_old, kl, advantages, o.delta, self.elements_per_token, o.granularity,
                          o.normalize)


@register_objective("grpo_clip")
class GRPOClip(PolicyObjective):
    """Flow-GRPO ratio clipping at ``clip_range``, the baseline (:func:`grpo_clip_loss`)."""

    knob = "clip_range"
    variants = {"clip": {}}

    def evaluate(self, logp_new: torch.Tensor, logp_old: torch.Tensor, kl: torch.Tensor, advantages: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        return _grpo_clip(logp_new, logp_old, advantages, self.section.clip_range, self.elements_per_token, kl)


# The name this class had before the registry (``Objective.from_config(section, D)`` still builds one).
Objective = PolicyObjective
