"""Policy objectives over token log-probabilities (SPEC section 3).

Pure functions. Inputs are per-token tensors ``(B, N)`` for one SDE step (or several steps
stacked along the first axis, with their advantages repeated) and advantages ``(B,)``.
"""

from __future__ import annotations

import torch

GRANULARITIES = ("token", "sample")
NORMALIZATIONS = ("all", "kept")


def _check(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor) -> None:
    if logp_new.ndim != 2 or logp_new.shape != logp_old.shape:
        raise ValueError(f"logp_new {tuple(logp_new.shape)} and logp_old {tuple(logp_old.shape)} "
                         "must both be (B, N)")
    if advantages.shape != (logp_new.shape[0],):
        raise ValueError(f"advantages must be ({logp_new.shape[0]},), got {tuple(advantages.shape)}")


def _sample_means(logp_new: torch.Tensor, logp_old: torch.Tensor, kl: torch.Tensor,
                  elements_per_token: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample log-ratio and KL, each the mean over all latent elements: ``(B, 1)``."""
    if not elements_per_token or elements_per_token < 1:
        raise ValueError("granularity='sample' needs elements_per_token (D = C*pt*ph*pw)")
    n_el = logp_new.shape[1] * elements_per_token
    log_ratio = (logp_new - logp_old).sum(dim=1, keepdim=True) / n_el
    return log_ratio, kl.sum(dim=1, keepdim=True) / n_el


def dppo_drop_mask(log_ratio: torch.Tensor, kl: torch.Tensor, advantages: torch.Tensor,
                   delta: float) -> torch.Tensor:
    """The asymmetric divergence mask: True where a term is dropped.

    ``drop = (KL > delta) and ((rho > 1 and A > 0) or (rho < 1 and A < 0))``: a term far from
    ``pi_old`` is frozen only while the update pushes it further the way its advantage wants.

    Args:
        log_ratio, kl: ``(B, N)``; advantages: ``(B,)``.
    Returns:
        bool ``(B, N)``.
    """
    a = advantages[:, None]
    pushing = ((log_ratio > 0) & (a > 0)) | ((log_ratio < 0) & (a < 0))
    return (kl > delta) & pushing


def flow_dppo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, kl: torch.Tensor,
                   advantages: torch.Tensor, delta: float, granularity: str = "token",
                   normalize: str = "all", elements_per_token: int | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-DPPO: ``L = -(1/Z) sum A * rho * 1[not drop]``.

    Args:
        logp_new: ``(B, N)`` token log-probs under ``pi_theta`` (carries the gradient).
        logp_old: ``(B, N)`` token log-probs under ``pi_old``.
        kl: ``(B, N)`` token ``KL(pi_old || pi_theta)``; only compared with ``delta``.
        advantages: ``(B,)``.
        delta: threshold in nats per token (``"token"``) or per latent element (``"sample"``).
        granularity: ``"token"`` (one decision per token) or ``"sample"`` (the image-model
            reference: one ratio and KL per row, each the mean over all latent elements).
        normalize: ``"all"`` divides by the number of terms, ``"kept"`` by the kept count.
        elements_per_token: ``D``; required for ``granularity="sample"``.

    Returns:
        ``loss`` (scalar) and ``stats`` (detached scalars): ``drop_frac``, ``drop_frac_pos``,
        ``drop_frac_neg``, ``kl_mean``, ``kl_max``, ``log_ratio_max_abs``.
    """
    _check(logp_new, logp_old, advantages)
    if granularity not in GRANULARITIES:
        raise ValueError(f"objective.granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"objective.normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if granularity == "token":
        log_ratio, div = logp_new - logp_old, kl
    else:
        log_ratio, div = _sample_means(logp_new, logp_old, kl, elements_per_token)
    adv = advantages.to(log_ratio.dtype)
    drop = dppo_drop_mask(log_ratio.detach(), div.detach(), adv, delta)
    # Mask the log-ratio before exp, and the product after: a dropped, overflowing rho then
    # contributes neither inf to the loss nor 0*inf=NaN to the gradient.
    safe_log_ratio = torch.where(drop, torch.zeros_like(log_ratio), log_ratio)
    terms = torch.where(drop, torch.zeros_like(log_ratio), adv[:, None] * torch.exp(safe_log_ratio))
    kept = (~drop).sum()
    z = terms.numel() if normalize == "all" else kept.clamp_min(1)
    loss = -terms.sum() / z
    return loss, _mask_stats(drop, adv, log_ratio, kl)


def _mask_stats(drop: torch.Tensor, adv: torch.Tensor, log_ratio: torch.Tensor, kl: torch.Tensor
                ) -> dict[str, torch.Tensor]:
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
    _check(logp_new, logp_old, advantages)
    n_el = logp_new.shape[1] * elements_per_token
    log_ratio = (logp_new - logp_old).sum(dim=1) / n_el
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        # A clipped row carries no gradient when the clip binds the way its advantage pushes.
        frozen = ((ratio > 1.0 + clip_range) & (adv > 0)) | ((ratio < 1.0 - clip_range) & (adv < 0))
        stats = _mask_stats(frozen[:, None], adv, log_ratio[:, None],
                            kl if kl is not None else torch.zeros_like(logp_new))
        stats["clip_frac"] = ((ratio - 1.0).abs() > clip_range).float().mean()
        if kl is None:
            del stats["kl_mean"], stats["kl_max"]
    return loss, stats


def reference_kl_loss(kl_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * mean_{b,n} KL_n(pi_ref || pi_theta)`` from a ``(B, N)`` token KL."""
    return beta * kl_ref.mean()
