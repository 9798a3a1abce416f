"""VideoAlign's VideoReward as a reward: a tiny random Qwen2-VL reward model saved in the release's
layout (model_config.json + checkpoint-<step>/model.pth of a LoRA-wrapped model, keys as the
reference's transformers 4.45 named them), scored by ``rewards.videoalign`` and by an independent
re-implementation of the reference's arithmetic written here (frame sampling, resize arithmetic,
patch layout, unmerged PEFT LoRA, the 4.45 forward with 1-D positions, the special-token head,
mean/std normalisation)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import httpx
import numpy as np
import pytest
import torch

import rewards
from rewards.registry import RewardError
from rewards.videoalign import (PROMPT_TEMPLATE, REWARD_TOKENS, VideoAlignReward, frame_indices, frame_size,
                                render_prompt)

from .tiny_vlm import MAX_PIXELS, MIN_PIXELS, STATS, build_tiny_videoreward, to_445_layout

FPS = 8.0
PROMPTS = ["a red circle moves left", "the black dog runs quickly in the park", "a cat"]   # unequal: padding
# sha256 of prompt_template.DETAILED_PROMPT_WITH_SPECIAL_TOKEN in KwaiVGI/VideoAlign (commit 219ab9d)
PROMPT_SHA256 = "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"


# ------------------------------------------------------------ the reference, re-implemented here

def ref_nframes(total: int, video_fps: float, fps: float = 2.0) -> int:
    """vision_process.smart_nframes with ``fps`` (min_frames 4, max_frames min(768, total), factor 2)."""
    min_frames = math.ceil(4 / 2) * 2
    max_frames = math.floor(min(768, total) / 2) * 2
    n = total / video_fps * fps
    n = min(max(n, min_frames), max_frames)
    n = round(n / 2) * 2
    return min(n, total)


def ref_indices(total: int, video_fps: float, fps: float = 2.0) -> list[int]:
    n = ref_nframes(total, video_fps, fps)
    return [round(float(x)) for x in np.linspace(0, total - 1, n)]          # Python's round: half to even


def ref_smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def ref_pixel_values(frames: np.ndarray, patch: int, merge: int, tps: int, mean, std) -> tuple[np.ndarray, tuple]:
    """The 4.45 Qwen2VLImageProcessor's video path on already-resized uint8 frames ``(T, H, W, C)``."""
    x = (frames.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)       # rescale, normalise
    x = x.transpose(0, 3, 1, 2)                                                         # (T, C, H, W)
    t, c, h, w = x.shape
    gt, gh, gw = t // tps, h // patch, w // patch
    x = x.reshape(gt, tps, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tps * patch * patch), (gt, gh, gw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(root, base, peft_model, tokenizer)``: a VideoReward directory, its base and the reference model."""
    return build_tiny_videoreward(tmp_path_factory.mktemp("videoalign"))


@pytest.fixture(scope="module")
def reward(tiny):
    return VideoAlignReward(str(tiny[0]), device="cpu", min_pixels=MIN_PIXELS, batch_size=3)


def _videos(b: int = 3, f: int = 16, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, f, h, w, 3), generator=g, dtype=torch.uint8)


def reference_rewards(pm, tok, videos: torch.Tensor, prompts: list[str], input_ids, attention_mask) -> dict:
    """The reference's scoring: its preprocessing (re-implemented above), the unmerged PEFT model,
    the 4.45 forward (embeddings, video features scattered in, the decoder with default positions),
    the rm_head at the reward tokens, mean/std, Overall = VQ + MQ + TA."""
    inner = pm.base_model.model
    patches, grids = [], []
    for v in videos:
        idx = ref_indices(v.shape[0], FPS)
        h, w = ref_smart_resize(v.shape[1], v.shape[2], 8, MIN_PIXELS, MAX_PIXELS)
        x = v[idx].permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        frames = x.clamp(0, 255).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
        pv, grid = ref_pixel_values(frames, 4, 2, 2, [0.48145466, 0.4578275, 0.40821073],
                                    [0.26862954, 0.26130258, 0.27577711])
        patches.append(torch.from_numpy(pv).float())
        grids.append(grid)
    pv, grid = torch.cat(patches), torch.tensor(grids)
    with torch.no_grad():
        lm, visual = inner.model.language_model, inner.model.visual
        emb = lm.embed_tokens(input_ids)
        video_embeds = visual(pv, grid_thw=grid).pooler_output
        mask = (input_ids == tok.convert_tokens_to_ids("<|video_pad|>"))[..., None].expand_as(emb)
        emb = emb.masked_scatter(mask, video_embeds.to(emb.dtype))
        hidden = lm(inputs_embeds=emb, attention_mask=attention_mask).last_hidden_state
        logits = inner.rm_head(hidden)
        special = torch.zeros_like(input_ids, dtype=torch.bool)
        for t in REWARD_TOKENS:
            special |= input_ids == tok.convert_tokens_to_ids(t)
        pooled = logits[special].view(len(prompts), 3, -1).reshape(len(prompts), -1)
    out = {}
    for i, c in enumerate(("VQ", "MQ", "TA")):
        out[c.lower()] = (pooled[:, i].double() - STATS[f"{c}_mean"]) / STATS[f"{c}_std"]
    out["score"] = out["vq"] + out["mq"] + out["ta"]
    out["pixel_values_videos"], out["video_grid_thw"] = pv, grid
    return out


# ------------------------------------------------------------------------------------ the tests

def test_prompt_is_the_references_detailed_special_template() -> None:
    assert hashlib.sha256(PROMPT_TEMPLATE.encode()).hexdigest() == PROMPT_SHA256
    text = render_prompt("a {curly} cat")
    assert "Textual prompt - a {curly} cat\n" in text
    assert [text.index(t) for t in REWARD_TOKENS] == sorted(text.index(t) for t in REWARD_TOKENS)


@pytest.mark.parametrize("total,fps", [(81, 16.0), (49, 8.0), (16, 8.0), (5, 24.0), (3, 16.0), (33, 16.0),
                                       (121, 24.0), (2000, 1.0), (17, 4.0), (9, 2.0)])
def test_frame_sampling_matches_the_reference(total, fps) -> None:
    assert frame_indices(total, fps) == ref_indices(total, fps)
    assert frame_indices(81, 16.0) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]        # Wan 2.1: 10 frames of 81


def test_frame_sampling_needs_two_frames_and_honours_a_fixed_count() -> None:
    with pytest.raises(RewardError, match="at least 2 frames"):
        frame_indices(1, 16.0)
    assert frame_indices(81, 16.0, fixed_frames=9) == torch.linspace(0, 80, 8).round().long().tolist()
    assert len(frame_indices(5, 16.0, fixed_frames=16)) == 5


@pytest.mark.parametrize("h,w,mx", [(480, 832, 200704), (720, 1280, 200704), (240, 320, 76800), (64, 64, 200704),
                                    (480, 832, 76800), (1080, 1920, 200704), (100, 300, 200704)])
def test_frame_size_matches_the_reference(h, w, mx) -> None:
    assert frame_size(h, w, 28, 128 * 28 * 28, mx) == ref_smart_resize(h, w, 28, 128 * 28 * 28, mx)
    assert frame_size(480, 832, 28, 128 * 28 * 28, 200704) == (336, 588)


def test_inputs_and_scores_equal_the_reference(tiny, reward) -> None:
    root, base, pm, tok = tiny
    videos = _videos()
    inputs = reward.build_inputs(videos, PROMPTS, FPS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert (mask[:, 0] == 1).all() and (mask[:, -1] == 0).any()                      # right padding
    want = reference_rewards(pm, tok, videos, PROMPTS, ids, mask)
    assert torch.equal(inputs["video_grid_thw"], want["video_grid_thw"])
    assert torch.allclose(inputs["pixel_values_videos"], want["pixel_values_videos"], atol=1e-5, rtol=0)
    text = tok.decode(ids[0])
    assert "Textual prompt - a red circle moves left" in text or "[UNK]" in text
    got = reward(videos, PROMPTS, fps=FPS)
    assert set(got) == {"score", "vq", "mq", "ta"}
    for k in ("score", "vq", "mq", "ta"):
        assert got[k].shape == (3,) and got[k].dtype == torch.float32
        assert torch.allclose(got[k].double(), want[k], atol=1e-4, rtol=1e-4), (k, got[k], want[k])
    assert len(set(got["vq"].tolist())) == 3                                         # videos told apart
    one = VideoAlignReward(str(root), device="cpu", min_pixels=MIN_PIXELS, batch_size=1)(videos, PROMPTS, fps=FPS)
    assert torch.allclose(one["score"], got["score"], atol=1e-5, rtol=0)               # padding changes nothing


def test_weights_and_normalisation(tiny, reward) -> None:
    videos = _videos(2, seed=3)
    base = reward(videos, PROMPTS[:2], fps=FPS)
    vq_only = VideoAlignReward(str(tiny[0]), device="cpu", min_pixels=MIN_PIXELS, weights={"vq": 1.0, "mq": 0.5})
    out = vq_only(videos, PROMPTS[:2], fps=FPS)
    assert torch.allclose(out["score"], base["vq"] + 0.5 * base["mq"], atol=1e-6)
    raw = VideoAlignReward(str(tiny[0]), device="cpu", min_pixels=MIN_PIXELS, normalize=False)(videos, PROMPTS[:2], fps=FPS)
    assert torch.allclose(raw["vq"], base["vq"] * STATS["VQ_std"] + STATS["VQ_mean"], atol=1e-5)
    with pytest.raises(RewardError, match="unknown component"):
        VideoAlignReward(str(tiny[0]), device="cpu", weights={"overall": 1.0})


def test_score_videos_and_the_reward_server(tiny, reward) -> None:
    from rewards.server import BackgroundServer, create_app
    from rewards.wire import BINARY_TYPE, decode_response, encode_request

    entries = {"va": {"type": "videoalign", "weight": 1.0, "model": str(tiny[0]), "device": "cpu",
                      "min_pixels": MIN_PIXELS, "batch_size": 3}}
    videos = _videos(seed=5)
    scores, extras = rewards.score_videos(rewards.build_rewards(entries), videos, PROMPTS, fps=FPS)
    direct = reward(videos, PROMPTS, fps=FPS)
    assert torch.allclose(scores["va"], direct["score"], atol=1e-6)
    assert set(extras) == {"va/vq", "va/mq", "va/ta"}
    with BackgroundServer(create_app(entries, batch_window_s=0.0)) as url:
        resp = httpx.post(f"{url}/score", content=encode_request(videos, PROMPTS, FPS),
                          headers={"Content-Type": BINARY_TYPE}, timeout=60)
    assert resp.status_code == 200, resp.text
    got_scores, got_extras, _ = decode_response(resp.json())
    assert torch.allclose(got_scores["va"], scores["va"], atol=1e-5)
    assert torch.allclose(got_extras["va/ta"], extras["va/ta"], atol=1e-5)


def _broken(tiny, tmp_path, change) -> str:
    root = tmp_path / "VideoReward"
    shutil.copytree(tiny[0], root)
    change(root, tiny[1], tmp_path)
    return str(root)


def _drop_head(root, base, tmp):
    sd = torch.load(root / "checkpoint-7" / "model.pth")
    del sd["base_model.model.rm_head.weight"]
    torch.save(sd, root / "checkpoint-7" / "model.pth")


def _hub_base(root, base, tmp):
    cfg = json.loads((root / "model_config.json").read_text())
    cfg["model_config"]["model_name_or_path"] = "Qwen/Qwen2-VL-2B-Instruct"
    (root / "model_config.json").write_text(json.dumps(cfg))


def _base_without_preprocessor(root, base, tmp):
    b = tmp / "base"
    shutil.copytree(base, b)
    (b / "preprocessor_config.json").unlink()
    cfg = json.loads((root / "model_config.json").read_text())
    cfg["model_config"]["model_name_or_path"] = str(b)
    (root / "model_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change,message", [
    (lambda r, b, t: (r / "model_config.json").unlink(), "missing model_config.json"),
    (lambda r, b, t: [shutil.rmtree(r / d) for d in ("checkpoint-7", "checkpoint-3")], "no checkpoint-<step>/"),
    (lambda r, b, t: (r / "checkpoint-7" / "model.pth").unlink(), "checkpoint-7 has no model.pth"),
    (_drop_head, "no rm_head.weight"),
    (_hub_base, "pass base: /path/to/Qwen2-VL-2B-Instruct"),
    (_base_without_preprocessor, "missing preprocessor_config.json"),
    (lambda r, b, t: (r / "model_config.json").write_text("{"), "cannot read VideoReward config"),
])
def test_a_wrong_or_partial_directory_fails_in_one_line(tiny, tmp_path, change, message) -> None:
    path = _broken(tiny, tmp_path, change)
    with pytest.raises(RewardError) as err:
        rewards.build_rewards({"va": {"type": "videoalign", "model": path, "device": "cpu"}})
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_an_explicit_base_and_step(tiny, tmp_path) -> None:
    path = _broken(tiny, tmp_path, _hub_base)
    r = VideoAlignReward(path, base=str(tiny[1]), device="cpu", min_pixels=MIN_PIXELS)
    assert r(_videos(1), PROMPTS[:1], fps=FPS)["score"].shape == (1,)
    with pytest.raises(RewardError, match="no checkpoint-5/"):
        VideoAlignReward(path, base=str(tiny[1]), step=5, device="cpu")


def test_the_adapter_layout_of_the_references_training_scores_the_same(tiny, reward, tmp_path) -> None:
    """``save_full_model: false`` (train.sh's setting): adapter_model.safetensors (LoRA, adapter name
    dropped as PEFT saves it) + non_lora_state_dict.pth (the trainable rest); base weights from ``base``."""
    from safetensors.torch import save_file

    root, base, pm, tok = tiny
    path = tmp_path / "VideoReward"
    ckpt = path / "checkpoint-9"
    (ckpt / "tokenizer").mkdir(parents=True)
    shutil.copy(root / "model_config.json", path / "model_config.json")
    tok.save_pretrained(ckpt / "tokenizer")
    state = {to_445_layout(k): v for k, v in pm.state_dict().items()}
    save_file({k.replace(".default", ""): v.contiguous() for k, v in state.items() if "lora_" in k},
              str(ckpt / "adapter_model.safetensors"))
    trained = ("base_model.model.visual.", "base_model.model.rm_head.", "base_model.model.model.embed_tokens.")
    torch.save({k: v for k, v in state.items() if k.startswith(trained)}, ckpt / "non_lora_state_dict.pth")
    videos = _videos(seed=7)
    got = VideoAlignReward(str(path), device="cpu", min_pixels=MIN_PIXELS, batch_size=3)(videos, PROMPTS, fps=FPS)
    want = reward(videos, PROMPTS, fps=FPS)
    for k in ("vq", "mq", "ta", "score"):
        assert torch.allclose(got[k], want[k], atol=1e-5, rtol=0), (k, got[k], want[k])
    (ckpt / "non_lora_state_dict.pth").unlink()
    with pytest.raises(RewardError, match="nor adapter_model.safetensors \\+ non_lora_state_dict.pth"):
        VideoAlignReward(str(path), device="cpu")
