"""Calibrate trust-region knobs: the off-policy frozen share for a grid of delta and epsilon.

    .venv/bin/python tools/bench/calibrate_trust_region.py                 # the shapes-world recipe
    .venv/bin/python tools/bench/calibrate_trust_region.py --config configs/wan2.1_t2v_1.3b.yaml

A trust region is a knob, calibrated like a clip range: by the share of objective terms it
freezes where it can act, i.e. in the minibatches after the iteration's first optimizer step
(the first one replays the rollout policy, ratio 1). This takes one rollout of the recipe
(iteration 0, its prompts, rewards and advantages), then for every knob value restores the
model and its optimizer and runs the same update (``optim.inner_epochs`` passes), and reports the
off-policy frozen share, per inner epoch and by advantage sign. Pick each arm's sweep so that it
spans roughly 5% to 50% frozen. Writes ``OUT.md`` (a markdown table) and the JSON beside it in
``data/`` (default: ``docs/trust_region_calibration.md``, ``docs/data/trust_region_calibration.json``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from flowdppo_video.commands.benchmarking import FRONTIER_TRAINING, data_file
from flowdppo_video.objectives import OBJECTIVES

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "flowdppo_video" / "recipes" / "default.yaml"
# Each registered objective's variants (flowdppo_video.objectives), named "kind (variant)" where a
# kind has several; the knob values swept per arm are this tool's choice.
VALUES: dict[str, list[float]] = {
    "flow_dppo (token)": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
    "flow_dppo (sample)": [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
    "flow_dppo (row_gated)": [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4],
    "flow_dppo (row)": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
    "grpo_clip": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
}


def registry_arms() -> tuple[dict[str, tuple[str, list[float]]], dict[str, dict[str, object]]]:
    """``(GRID, SETTINGS)``: arm -> (knob key, values) and arm -> the objective section's settings."""
    grid, settings = {}, {}
    for kind, cls in OBJECTIVES.items():
        variants = cls.variants or {kind: {}}
        for variant, sets in variants.items():
            arm = f"{kind} ({variant})" if len(variants) > 1 else kind
            if cls.knob is not None:
                grid[arm] = (cls.knob, VALUES.get(arm, []))
                settings[arm] = {"kind": kind, **sets}
    return grid, settings


GRID, SETTINGS = registry_arms()
# The frontier benchmark's training at 4 inner epochs, so the shares calibrate the runs its grid makes
# whatever the recipe's own defaults.
FRONTIER_SETTINGS = [*FRONTIER_TRAINING, "optim.inner_epochs=4"]


def calibrate(config: Path, overrides: list[str], arms: list[str], seed: int,
              values: dict[str, list[float]] | None = None) -> dict:
    from flowdppo_video.runs.config import load_config
    from flowdppo_video.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [f"run.output_dir={tmp}/run", "run.progress=false", "run.tensorboard=false",
                                   "run.report_every=0", f"run.seed={seed}", "eval.prompts=null", "run.keep_best=null",
                                   *overrides])
        trainer = Trainer(cfg)
        # Iteration 0's batch exactly as training makes it (rollout, rewards, advantages).
        t0 = time.perf_counter()
        batch = trainer.collect(0)
        traj, adv = batch.traj, batch.advantages
        rollout_s = time.perf_counter() - t0
        start = copy.deepcopy({k: v.detach().clone() for k, v in trainer.adapter.transformer.state_dict().items()})
        rows = []
        todo = [(arm, v) for arm in arms for v in (values or {}).get(arm, GRID[arm][1])]
        for arm, value in tqdm(todo, desc="calibration"):
            knob = GRID[arm][0]
            trainer.adapter.transformer.load_state_dict(start)
            # The same weights, a fresh optimizer, this arm's objective.
            trainer.set_objective(dataclasses.replace(cfg.objective, **SETTINGS[arm], **{knob: value}))
            t = time.perf_counter()
            out = trainer.update(traj, adv, 0)
            rows.append({"arm": arm, "knob": knob, "value": value,
                         "offpolicy_frozen": out["mask/offpolicy_drop_frac"],
                         "offpolicy_frozen_pos": out["mask/offpolicy_drop_frac_pos"],
                         "offpolicy_frozen_neg": out["mask/offpolicy_drop_frac_neg"],
                         "pooled_frozen": out["mask/drop_frac"], "by_epoch": out["mask/drop_frac_by_epoch"],
                         "kl_mean": out["kl/mean"], "update_s": time.perf_counter() - t})
            print(json.dumps(rows[-1]), flush=True)
    return {"config": str(config), "overrides": overrides, "seed": seed, "rollout_s": rollout_s,
            "videos": traj.batch_size, "inner_epochs": cfg.optim.inner_epochs, "lr": cfg.optim.lr,
            "elements_per_token": trainer.elements_per_token, "rows": rows}


def table(result: dict) -> str:
    lines = [f"One rollout of {result['videos']} videos (seed {result['seed']}), then per knob value the same "
             f"{result['inner_epochs']}-epoch update at lr {result['lr']:g} from the same weights; "
             f"D = {result['elements_per_token']} elements per token.", "",
             "| arm | knob | value | off-policy frozen | A > 0 | A < 0 | pooled | by inner epoch | token KL (mean) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def pct(x: float) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"

    for r in result["rows"]:
        lines.append(f"| {r['arm']} | {r['knob']} | {r['value']:g} | {pct(r['offpolicy_frozen'])} | "
                     f"{pct(r['offpolicy_frozen_pos'])} | {pct(r['offpolicy_frozen_neg'])} | {pct(r['pooled_frozen'])} | "
                     f"{' / '.join(pct(x) for x in r['by_epoch'])} | {r['kl_mean']:.2e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=RECIPE)
    ap.add_argument("--arms", nargs="+", default=list(GRID), choices=list(GRID))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--values", nargs="+", default=[], metavar="ARM=V1,V2",
                    help="knob values for an arm instead of its default grid, e.g. 'flow_dppo (token)=1e-6,3e-6'")
    ap.add_argument("--out", type=Path, default=Path("docs/trust_region_calibration"),
                    help="writes OUT.md, and the JSON beside it in data/ (OUT's folder/data/NAME.json)")
    ap.add_argument("overrides", nargs="*", default=[],
                    help="dotted overrides, on top of the frontier benchmark's settings (full fine-tuning at lr 1e-4 "
                         "on every step, 4 inner epochs, the plain rollout): optim.lr=3e-5 changes the rate alone")
    args = ap.parse_args()
    data_file(args.out).parent.mkdir(parents=True, exist_ok=True)
    values = {a: [float(x) for x in vs.split(",")] for a, vs in (v.split("=", 1) for v in args.values)}
    unknown = set(values) - set(GRID)
    if unknown:
        hint = ("; dotted overrides go before --values, which takes the rest of the line"
                if any("." in a for a in unknown) else "")
        ap.error(f"--values: unknown arm(s) {sorted(unknown)}; arms are {list(GRID)}{hint}")
    # on top, not instead: an override once silently dropped the other pins (LoRA, one epoch)
    result = calibrate(args.config, [*FRONTIER_SETTINGS, *args.overrides], args.arms, args.seed, values)
    data_file(args.out).write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
