"""The family registry (flowdppo_video/models/registry.py): every family is one registered spec, a
family added from outside the package (here, a tiny one in this test) is built, recognised and
planned like the shipped ones, and a sequence-parallel plan must place every attention module."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch

from flowdppo_video.runs.config import ModelConfig
from flowdppo_video.models import build_adapter, checkpoint_family, families, family, register, spec_for
from flowdppo_video.models import registry, wan
from flowdppo_video.models.base import ModelError
from flowdppo_video.models.memory import activation_profile, text_tokens
from flowdppo_video.parallel.sequence import install_plan

CPU = torch.device("cpu")


def test_every_family_is_one_spec_whose_tiny_model_builds():
    specs = families()
    assert {"wan", "wan_i2v", "hunyuan_video", "hunyuan_video_i2v", "hunyuan_video_1.5"} <= set(specs)
    assert len({s.pipeline for s in specs.values()}) == len(specs)          # one pipeline per family
    for name, spec in specs.items():
        # Wan 2.1 I2V's CLIP image tokens need the text encoder's 512 tokens (diffusers' split).
        length = 512 if name == "wan_i2v" else 8
        adapter = build_adapter(ModelConfig(family=name, max_sequence_length=length), CPU)
        assert isinstance(adapter, spec.adapter) and spec_for(adapter) is spec, name
        assert adapter.trained == [0] and adapter.reference_copies() == {}, name
        assert set(spec.tiny_init) >= {"transformer", "vae", "text_encoder"}, name
        assert activation_profile(adapter).heads == int(adapter.transformer.config.num_attention_heads), name
        assert text_tokens(adapter) >= length, name
        plan = adapter.sequence_parallel_plan(adapter.transformer)
        if adapter.sequence_parallel_refusal:             # no plan: one line says why (LTX-2)
            assert plan is None and len(adapter.sequence_parallel_refusal.splitlines()) == 1, name
            continue
        assert plan is not None and plan.heads == activation_profile(adapter).heads, name


def test_an_unknown_family_names_the_known_ones():
    with pytest.raises(ModelError, match=r"^model.family='ltx' is not one of .*wan_i2v"):
        family("ltx")


class TinyTestAdapter(wan.WanAdapter):
    """A family of its own that happens to be a Wan (what a new family's module would define)."""

    PIPELINE = "TinyTestPipeline"


@pytest.fixture
def tiny_family():
    """A family registered from outside the package, as a new family module registers itself; the
    registry is restored afterwards."""
    before = set(families())
    yield register(registry.FamilySpec(name="tiny_test", pipeline="TinyTestPipeline", adapter=TinyTestAdapter,
                                       build=functools.partial(wan.build, TinyTestAdapter),
                                       tiny_init=wan.TINY_INIT))
    registry.unregister("tiny_test")
    assert set(families()) == before


def test_a_family_registered_outside_is_built_and_recognised(tiny_family, tmp_path):
    adapter = build_adapter(ModelConfig(family="tiny_test", max_sequence_length=8), CPU)
    assert type(adapter) is TinyTestAdapter and spec_for(adapter) is tiny_family
    # Its spec gives no plan and no activation model: both are refused in one line, not guessed.
    assert adapter.sequence_parallel_plan(adapter.transformer) is None
    with pytest.raises(ModelError, match="no activation model for a WanTransformer3DModel"):
        activation_profile(adapter)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "TinyTestPipeline"}))
    assert checkpoint_family(tmp_path) == "tiny_test"
    with pytest.raises(ValueError, match="clashes with the registered 'tiny_test'"):
        register(dataclasses.replace(tiny_family, name="tiny_test_2"))


def test_a_plan_must_place_every_attention_module():
    adapter = build_adapter(ModelConfig(family="wan", max_sequence_length=8), CPU)
    t = adapter.transformer
    plan = adapter.sequence_parallel_plan(t)
    with pytest.raises(ModelError, match="does not place the attention module 'blocks.0.attn2'"):
        install_plan(t, dataclasses.replace(plan, replicated=()), None)
    with pytest.raises(ModelError, match="names no attention module"):
        install_plan(t, dataclasses.replace(plan, attention=("nothing.*",), replicated=("blocks.*",)), None)
    assert getattr(t, "_sequence_parallel", None) is None and not t._forward_pre_hooks   # nothing installed
