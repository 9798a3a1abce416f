"""Pictures of a run: reward and divergence curves from ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from flowdppo_video.training.metrics import read_metrics

# Legends go under their panel (saved with bbox_inches="tight"): inside, they covered the lines.
_BELOW = {"fontsize": 7, "loc": "upper center", "bbox_to_anchor": (0.5, -0.2), "ncol": 2, "frameon": False}


def reward_parts(rows: Sequence[Mapping[str, Any]], prefix: str = "reward/") -> dict[str, list[str]]:
    """The rewards that log parts beside their score, and those parts, in logged order:
    ``{"va": ["vq", "mq", "ta"]}`` from ``reward/va/mean`` and ``reward/va/vq/mean``, ... (``prefix``
    ``eval/`` for held-out rows). A reward's parts get a panel of their own, so one part that climbs
    while the others stall (VideoAlign's VQ, the usual hack) is not hidden in the total."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k.startswith(prefix) and k.endswith("/mean") and k not in keys]
    names = [k[len(prefix):-len("/mean")] for k in keys]
    rewards = {n for n in names if n and "/" not in n}
    out: dict[str, list[str]] = {}
    for n in names:
        head, _, part = n.partition("/")
        if part and head in rewards:
            out.setdefault(head, []).append(part)
    return out


def draw_parts(ax: Any, x: Sequence[float], rows: Sequence[Mapping[str, Any]], prefix: str, reward: str,
               parts: Sequence[str], marker: str | None = None) -> None:
    """One reward's parts on ``ax``, each its own curve, the reward's score dashed for reference."""
    def series(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]

    for p in parts:
        ax.plot(x, series(f"{prefix}{reward}/{p}/mean"), marker=marker, ms=4, lw=1.4, label=p)
    ax.plot(x, series(f"{prefix}{reward}/mean"), color="black", ls="--", lw=1, marker=marker, ms=3,
            label=f"{reward} (score)")
    ax.set_title(f"{reward}: logged parts")
    ax.legend(**_BELOW)


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Reward, KL and mask-drop fraction per iteration as one PNG (``RUN_DIR/curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        return None
    it = [r["iteration"] for r in rows]

    def series(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else r[key] for r in rows]

    evals = read_metrics(run_dir, "eval")
    parts = reward_parts(rows)
    panels = (4 if evals else 3) + len(parts)
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels - 0.1, 3.4), squeeze=False)
    axes = list(axes[0])
    mean, std = series("reward/mean"), series("reward/std")
    axes[0].plot(it, mean, color="tab:blue", label="reward (mean of batch)")
    axes[0].fill_between(it, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                         color="tab:blue", alpha=0.15, label="± std")
    axes[0].set_title("reward")
    axes[0].legend(**_BELOW)
    axes[1].plot(it, series("kl/mean"), label="token KL mean", color="tab:orange")
    axes[1].plot(it, series("kl/max"), label="token KL max", color="tab:red", alpha=0.6)
    axes[1].set_yscale("symlog", linthresh=1e-6)
    axes[1].set_title("KL(π_old ‖ π_θ), nats per token")
    axes[1].legend(**_BELOW)
    axes[2].plot(it, series("mask/drop_frac"), label="all", color="tab:green")
    axes[2].plot(it, series("mask/drop_frac_pos"), label="A > 0", color="tab:olive", alpha=0.7)
    axes[2].plot(it, series("mask/drop_frac_neg"), label="A < 0", color="tab:cyan", alpha=0.7)
    # Where a trust region can act: the minibatches after the iteration's first optimizer step.
    axes[2].plot(it, series("mask/offpolicy_drop_frac"), label="off-policy", color="black", linestyle="--")
    axes[2].set_title("frozen share (trust region)")
    axes[2].legend(**_BELOW)
    if evals:
        ax = axes[3]
        x = [r["after_iterations"] for r in evals]
        keys = sorted({k for r in evals for k in r if k.startswith("eval/") and k.endswith("/mean")
                       and "kl_base" not in k and k.count("/") == 2})
        for k in keys:
            ax.plot(x, [r.get(k) for r in evals], marker="o", ms=3, label=k[len("eval/"):-len("/mean")])
        ax.set_title("held-out evaluation")
        handles, labels = ax.get_legend_handles_labels()
        if any("eval/kl_base/mean" in r for r in evals):
            ax2 = ax.twinx()
            ax2.plot(x, [r.get("eval/kl_base/mean") for r in evals], color="black", ls="--", label="KL to base")
            ax2.set_ylabel("KL(π_θ ‖ π_base), nats/token", fontsize=8)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, **_BELOW)
    for i, (name, ps) in enumerate(parts.items()):      # each multi-part reward (VQ/MQ/TA) on its own panel
        draw_parts(axes[panels - len(parts) + i], it, rows, "reward/", name, ps)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "curves.png"
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    return path


def save_figure(fig: Any, path: Path, **kwargs: Any) -> None:
    """Save ``fig`` as ``path`` through a temporary file renamed over it, and close it: a full disk
    leaves the previous picture (or none), never a 0-byte or truncated PNG."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.part{path.suffix}")
    try:
        fig.savefig(tmp, **kwargs)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
