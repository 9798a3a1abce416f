"""One way from a config to a model: every command builds through flowdppo_video.training.run_builder, whose
reference-model rule exists once (checked over the source, function bodies included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from flowdppo_video.runs.config import ConfigError, load_config
from flowdppo_video.training.run_builder import build_model, keeps_reference, open_run

ROOT = Path(__file__).resolve().parents[1]


def _calls(name: str) -> list[str]:
    """``file:line`` of every call of ``name`` under flowdppo_video/ and tools/ (outside models/)."""
    out = []
    for path in [*ROOT.glob("flowdppo_video/**/*.py"), *ROOT.glob("tools/**/*.py")]:
        if "models" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def test_only_the_run_builder_builds_an_adapter():
    assert _calls("build_adapter") == [c for c in _calls("build_adapter") if c.startswith("flowdppo_video/training/run_builder.py")]
    assert len(_calls("build_adapter")) == 2       # the staged start: the encoders alone, then the denoiser


def test_the_reference_rule_is_written_once():
    hits = [p for p in [*ROOT.glob("flowdppo_video/**/*.py"), *ROOT.glob("tools/**/*.py")]
            if "objective.beta > 0 or" in p.read_text()]
    assert [p.relative_to(ROOT).as_posix() for p in hits] == ["flowdppo_video/training/run_builder.py"]


def test_keeps_reference_follows_beta_and_the_evaluation():
    base = ROOT / "configs/wan_tiny.yaml"
    assert not keeps_reference(load_config(base, []))
    assert keeps_reference(load_config(base, ["objective.beta=0.1"]))
    assert keeps_reference(load_config(base, ["eval.prompts=configs/prompts/demo.txt"]))
    assert not keeps_reference(load_config(base, ["eval.prompts=configs/prompts/demo.txt", "eval.kl_to_base=false"]))


def test_build_model_gives_the_adapter_and_latent_shape(tmp_path):
    cfg = load_config(ROOT / "configs/wan_tiny.yaml", ["video.fps=12.5"])
    built = build_model(cfg, reference=True)
    assert built.adapter.frame_rate == cfg.video.fps == 12.5       # a family that conditions on it reads it
    assert built.latent_shape == built.adapter.latent_shape(cfg.video.num_frames, cfg.video.height, cfg.video.width)
    with built.adapter.reference():          # the frozen base is reachable when asked for
        pass
    with pytest.raises(ConfigError, match="--run .*: no config.yaml there"):
        open_run(tmp_path, [], "--run")
