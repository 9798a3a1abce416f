"""A staged start (training/run_builder.py, models/common.py ``building``): the text encoder is built
alone, encodes what the run's text cache lacks and is gone before any transformer is built; a run
whose cache covers its prompts (resume, sample, eval) never builds one; an export of a ``model.path``
model copies the encoder's folder instead of building it; the rollouts of the cached and the
uncached paths are bit-identical; the planner's start is the larger of its stages, not their sum."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from diffusers import WanTransformer3DModel
from transformers import UMT5EncoderModel

from flowdppo_video.commands.cli import main
from flowdppo_video.commands.planner import plan_memory
from flowdppo_video.models.common import is_skeleton
from flowdppo_video.models.text_cache import CACHE_FILE
from flowdppo_video.runs.config import load_config
from flowdppo_video.training.rollout import rollout
from flowdppo_video.trainer import Trainer
from flowdppo_video.training.run_builder import build_model

from .conftest import ROOT, tiny_config

PROMPTS = ["a red ball rolls to the left", "a blue square slides up"]
OVER = ("sampler.guidance_scale=3.0", "data.negative_prompt=blurry", f"data.prompts={PROMPTS}")


class Residency:
    """Every UMT5 and Wan transformer built, by weak reference; at the end of each construction the
    other kind must have no live, materialised (non-meta) instance."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live: dict[str, list[weakref.ref]] = {"encoder": [], "transformer": []}
        self.events: list[str] = []
        self.active = True
        for kind, cls in (("encoder", UMT5EncoderModel), ("transformer", WanTransformer3DModel)):
            monkeypatch.setattr(cls, "__init__", self._wrap(kind, cls.__init__))

    def _wrap(self, kind: str, init):
        other = "transformer" if kind == "encoder" else "encoder"

        def wrapped(module, *args, **kwargs):
            init(module, *args, **kwargs)
            if is_skeleton(module) or not self.active:
                return                                # a skeleton: no weights, nothing resident
            gc.collect()
            beside = [r() for r in self.live[other] if r() is not None and not is_skeleton(r())]
            assert not beside, f"a {kind} was built while a {other} was resident"
            self.live[kind].append(weakref.ref(module))
            self.events.append(kind)
        return wrapped

    def resident(self, kind: str) -> int:
        gc.collect()
        return sum(1 for r in self.live[kind] if r() is not None and not is_skeleton(r()))


def _rollout(built, cfg) -> object:
    with torch.no_grad():
        return rollout(built.adapter, PROMPTS, 2, built.latent_shape, cfg.sampler, torch.Generator().manual_seed(3),
                       negative_prompt=cfg.data.negative_prompt, progress=False)


def test_the_encoder_is_gone_before_the_transformer_is_built_and_a_covered_cache_builds_none(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, *OVER)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    seen = Residency(monkeypatch)
    first = build_model(cfg, prompts=PROMPTS, run_dir=run_dir)
    # The order: a transformer drawn and dropped (the generator reaches the encoder as in a whole
    # build), the encoder, then the transformer that trains; never two resident together.
    assert seen.events[-2:] == ["encoder", "transformer"]
    assert seen.resident("encoder") == 0 and first.adapter.text_encoder is None
    assert first.text_stats["text/encoded_prompts"] == 2 * len(PROMPTS)       # prompts and CFG negatives
    assert first.text_stats["text/encoder_released_bytes"] > 0
    first.adapter.text_cache.save(run_dir / CACHE_FILE)                        # as the trainer does
    uncached = _rollout(first, cfg)
    del first
    # Resume, sample, eval: the cache covers the prompts, so no encoder is built at all.
    n = len(seen.events)
    again = build_model(cfg, prompts=PROMPTS, run_dir=run_dir)
    assert seen.events[n:] == ["transformer"]
    assert again.text_stats == {"text/cached_prompts": 2.0 * len(PROMPTS), "text/encoded_prompts": 0.0,
                                "text/encoder_released_bytes": 0.0}
    cached = _rollout(again, cfg)
    # Today's path: every part at once, the encoder kept, every prompt encoded inside the rollout.
    seen.active = False
    whole = build_model(cfg)                   # no prompts named: every part, no cache
    assert whole.adapter.text_encoders_resident() and whole.adapter.text_cache is None
    plain = _rollout(whole, cfg)
    for a, b in ((uncached, cached), (uncached, plain)):
        assert torch.equal(a.videos, b.videos) and torch.equal(a.final, b.final) and torch.equal(a.means, b.means)


def test_sample_of_a_cached_run_never_builds_an_encoder(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, *OVER)
    run_dir = tmp_path / "run"
    Trainer(cfg).close()                       # the run directory, its config and its text cache
    assert (run_dir / CACHE_FILE).is_file()

    original = UMT5EncoderModel.__init__

    def refuse(module, *args, **kwargs):
        original(module, *args, **kwargs)
        if not is_skeleton(module):             # a skeleton on the meta device holds no weights
            raise AssertionError("a text encoder was built")

    monkeypatch.setattr(UMT5EncoderModel, "__init__", refuse)
    out = tmp_path / "samples"
    assert main(["sample", "--run", str(run_dir), "--out", str(out), "--checkpoint", "base"]) == 0
    assert len(json.loads((out / "index.json").read_text())["videos"]) == 2
    # A prompt the cache lacks needs the encoder: here, one that cannot be built.
    with pytest.raises(AssertionError, match="a text encoder was built"):
        main(["sample", "--run", str(run_dir), "--out", str(tmp_path / "more"), "--checkpoint", "base",
              f"--prompts={ROOT / 'configs/prompts/demo.txt'}"])


def test_export_copies_the_encoder_of_model_path_without_building_it(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, *OVER)
    source = tmp_path / "source"
    build_model(cfg, images=False).adapter.save_pretrained(source)
    cfg_path = tiny_config(tmp_path, *OVER, f"model.path={source}", "model.init=null")
    refused = []
    original = UMT5EncoderModel.__init__

    def watch(module, *args, **kwargs):
        original(module, *args, **kwargs)
        if not is_skeleton(module):
            refused.append(module)

    monkeypatch.setattr(UMT5EncoderModel, "__init__", watch)
    adapter = build_model(cfg_path, torch.device("cpu"), images=False, encoders=False).adapter
    assert adapter.text_encoder is None and not refused
    out = tmp_path / "export"
    adapter.save_pretrained(out)
    assert not refused
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == json.loads((source / "model_index.json").read_text())["text_encoder"]
    assert sorted(p.name for p in (out / "text_encoder").iterdir()) == sorted(
        p.name for p in (source / "text_encoder").iterdir())
    # Without a folder to copy: one line saying what it needs.
    adapter.source_path = None
    from flowdppo_video.models.base import ModelError
    with pytest.raises(ModelError, match="export needs the text_encoder weights to copy"):
        adapter.save_pretrained(tmp_path / "export2")


def test_export_of_a_drawn_model_stages_its_encoder_and_keeps_its_draws(tmp_path, monkeypatch):
    """A model.init model's encoder exists nowhere else: the export draws it alone, saves it, releases
    it, then draws the denoiser; what it writes equals the whole build's weights."""
    cfg = tiny_config(tmp_path, *OVER, "run.iterations=1")
    run_dir = tmp_path / "run"
    trainer = Trainer(cfg)
    trainer.run()                              # one iteration: its checkpoint
    trainer.close()
    seen = Residency(monkeypatch)
    out = tmp_path / "export"
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    assert seen.events[-2:] == ["encoder", "transformer"] and seen.resident("encoder") == 0
    assert not (out / ".encoders").exists()
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    seen.active = False
    whole = build_model(cfg, images=False).adapter       # every part at once: the same draws
    loaded = UMT5EncoderModel.from_pretrained(out / "text_encoder")
    for name, t in whole.text_encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


@pytest.mark.parametrize("shapes", ["wan2.1_t2v_1.3b", "wan2.2_ti2v_5b"])
def test_the_planned_start_is_the_larger_stage_not_the_sum(shapes):
    small = ["video.num_frames=9", "video.height=128", "video.width=128", "data.group_size=2"]
    plan = plan_memory(load_config(ROOT / "configs/wan2.1_t2v_1.3b.yaml", small), 1, ROOT / "configs/model_shapes" / shapes)
    stages = plan.stages
    assert set(stages) == {"encode", "train"}
    assert plan.row("total").device == max(stages.values()) < sum(stages.values())
    assert stages["encode"] == plan.row("start: the encoders alone").device
    kept = plan_memory(load_config(ROOT / "configs/wan2.1_t2v_1.3b.yaml", [*small, "model.keep_text_encoder=true"]), 1,
                       ROOT / "configs/model_shapes" / shapes)
    assert set(kept.stages) == {"train"}          # kept, the encoder is a part of training's memory
