"""HPSv3 as a reward: a tiny random Qwen2-VL reward model saved as HPSv3 publishes its checkpoint
(one ``HPSv3.safetensors`` holding the whole ``Qwen2VLRewardModelBT`` state dict, embeddings resized
for ``<|Reward|>``, the ranknet head, keys as transformers 4.45 named them), scored by
``rewards.hpsv3`` and by an independent path written here (PIL resize, transformers' own Qwen2-VL
image processor, the whole model's forward, the head on the reward token), frames averaged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import rewards
from rewards.hpsv3 import INSTRUCTION, PROMPT_WITH_SPECIAL_TOKEN, REWARD_TOKEN, frame_indices, image_size, render_prompt
from rewards.registry import RewardError

from .tiny_vlm import build_tiny_qwen2_vl

PIXELS = 16 * 32            # the tiny model's stand-in for the reference's 256*28*28 (factor 8, not 28)
# sha256 of INSTRUCTION + prompt_with_special_token in hpsv3 1.0.0's dataset/data_collator_qwen.py
PROMPT_SHA256 = "f6ee57479d4e9eee76b49c00dc962e1e696a5a2b3cc32cebd9b1fa76fe27502c"
PROMPTS = ["a red circle moves left", "the black dog runs quickly in the park"]


def to_445_layout(key: str) -> str:
    """This transformers' Qwen2-VL key as transformers 4.45 (the reference's) named it."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def head_module(hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """``(HPSv3.safetensors, base dir)`` of a tiny random HPSv3."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("hpsv3")
    base = build_tiny_qwen2_vl(root / "qwen2vl")
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})        # as the reference does
    model = Qwen2VLForConditionalGeneration.from_pretrained(base, local_files_only=True)
    model.resize_token_embeddings(len(tok))
    torch.manual_seed(1)
    head = head_module(model.config.text_config.hidden_size)
    with torch.no_grad():
        head[5].weight.mul_(300.0)             # a random head barely tells images apart: spread its scores
    state = {to_445_layout(k): v.contiguous() for k, v in model.state_dict().items()}
    state.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    save_file(state, root / "HPSv3.safetensors")
    return root / "HPSv3.safetensors", base


def videos(b: int = 2, f: int = 5, h: int = 24, w: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (torch.rand(b, f, h, w, 3, generator=g) * 255).to(torch.uint8)


def reference_scores(ckpt: Path, base: Path, vids: torch.Tensor, prompts: list[str], frames: int) -> torch.Tensor:
    """Mean ``mu`` over frames, computed as the reference does, with transformers' own pieces."""
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    proc = Qwen2VLImageProcessorPil.from_pretrained(base)
    model = Qwen2VLForConditionalGeneration.from_pretrained(base, local_files_only=True)
    model.resize_token_embeddings(len(tok))
    raw = load_file(ckpt)
    back = {k: v for k, v in raw.items() if not k.startswith("rm_head.")}
    cur = {("model.language_model." + k[6:] if k.startswith("model.") else "model." + k if k.startswith("visual.")
            else k): v for k, v in back.items()}
    model.load_state_dict(cur)
    model.eval()
    head = head_module(model.config.text_config.hidden_size)
    head.load_state_dict({k[len("rm_head."):]: v for k, v in raw.items() if k.startswith("rm_head.")})
    head.eval()
    reward_id = tok.convert_tokens_to_ids(REWARD_TOKEN)
    out = []
    for video, prompt in zip(vids, prompts):
        idx = [round(x) for x in np.linspace(0, video.shape[0] - 1, frames)]
        mus = []
        for t in idx:
            h, w = image_size(video.shape[1], video.shape[2], 8, PIXELS)
            img = Image.fromarray(video[t].numpy()).resize((w, h), Image.BICUBIC)
            px = proc(images=[img], return_tensors="pt")
            n = int(px["image_grid_thw"].prod()) // 4
            text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
                                            INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN}]}],
                                           tokenize=False, add_generation_prompt=True)
            ids = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt",
                      add_special_tokens=False)["input_ids"]
            pos = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
            with torch.no_grad():
                hidden = model(input_ids=ids, position_ids=pos, pixel_values=px["pixel_values"],
                               image_grid_thw=px["image_grid_thw"], output_hidden_states=True).hidden_states[-1]
                mus.append(float(head(hidden[ids == reward_id])[0, 0]))
        out.append(sum(mus) / len(mus))
    return torch.tensor(out)


def test_the_prompt_is_the_references_verbatim() -> None:
    assert hashlib.sha256((INSTRUCTION + PROMPT_WITH_SPECIAL_TOKEN).encode()).hexdigest() == PROMPT_SHA256
    text = render_prompt("a {cat} on a mat")
    assert "Textual prompt - a {cat} on a mat\n" in text and text.count(REWARD_TOKEN) == 1


def test_frames_and_sizes() -> None:
    assert frame_indices(81, 4) == [0, 27, 53, 80] and frame_indices(3, 4) == [0, 1, 2]
    h, w = image_size(480, 832, 28, 256 * 28 * 28)      # Wan 2.1 480p: ~200k pixels, multiples of 28
    assert (h % 28, w % 28) == (0, 0) and abs(h * w - 256 * 28 * 28) < 28 * 28 * 28 and abs(w / h - 832 / 480) < 0.1


def test_scores_match_the_reference_arithmetic(tiny) -> None:
    ckpt, base = tiny
    reward = rewards.build_rewards({"hps": {"type": "hpsv3", "model": str(ckpt.parent), "base": str(base), "frames": 3,
                                            "pixels": PIXELS, "device": "cpu", "dtype": "float32"}})["hps"]
    vids = videos()
    got = reward(vids, PROMPTS, fps=8.0)
    want = reference_scores(ckpt, base, vids, PROMPTS, 3)
    assert torch.allclose(got["score"], want.float(), rtol=1e-4, atol=1e-4), (got["score"], want)
    assert abs(float(got["score"][0] - got["score"][1])) > 0.01          # the two videos are told apart
    assert (got["frame_min"] <= got["score"] + 1e-6).all() and torch.isfinite(got["sigma"]).all()
    # frames are averaged: one video's score is the mean of its frames scored as one-frame videos
    single = torch.stack([reward(vids[:1, t:t + 1], PROMPTS[:1], fps=8.0)["score"][0] for t in frame_indices(5, 3)])
    assert got["score"][0] == pytest.approx(float(single.mean()), abs=1e-5)
    # batching and right padding change nothing
    one = rewards.build_rewards({"hps": {"type": "hpsv3", "model": str(ckpt), "base": str(base), "frames": 3,
                                         "pixels": PIXELS, "batch_size": 1, "device": "cpu", "dtype": "float32"}})["hps"]
    assert torch.allclose(one(vids, PROMPTS, fps=8.0)["score"], got["score"], atol=1e-5)


def test_bad_inputs_are_one_line(tiny, tmp_path) -> None:
    ckpt, base = tiny
    with pytest.raises(RewardError, match="model must be HPSv3's checkpoint file"):
        rewards.build_rewards({"hps": {"type": "hpsv3", "model": str(tmp_path), "base": str(base)}})
    with pytest.raises(RewardError, match="base must be the local Qwen2-VL-7B-Instruct directory"):
        rewards.build_rewards({"hps": {"type": "hpsv3", "model": str(ckpt), "base": str(tmp_path)}})
    with pytest.raises(RewardError, match="frames must be a positive integer"):
        rewards.build_rewards({"hps": {"type": "hpsv3", "model": str(ckpt), "base": str(base), "frames": 0}})
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt)
    state["rm_head.5.weight"] = torch.zeros(3, 16)                  # not HPSv3's (mu, sigma) head
    save_file(state, tmp_path / "HPSv3.safetensors")
    with pytest.raises(RewardError, match="rm_head is not HPSv3's ranknet head") as e:
        rewards.build_rewards({"hps": {"type": "hpsv3", "model": str(tmp_path), "base": str(base)}})
    assert "\n" not in str(e.value)


def test_the_wan21_hpsv3_recipe_loads() -> None:
    import inspect

    from flowdppo_video.runs.config import load_config
    from rewards.hpsv3 import HPSv3Reward
    from rewards.registry import parse_reward_specs

    from .conftest import ROOT

    cfg = load_config(ROOT / "configs" / "wan2.1_t2v_1.3b_hpsv3.yaml")
    spec = parse_reward_specs(cfg.rewards)["hps"]
    assert spec.type == "hpsv3" and spec.options["frames"] == 4
    inspect.signature(HPSv3Reward).bind(**spec.options)                  # every option is one it takes
    assert cfg.eval.monitors is None                                     # the monitors: all, by default
