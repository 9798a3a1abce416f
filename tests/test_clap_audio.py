"""Sound for the rewards: the optional ``audio`` of :func:`rewards.score_videos` (rewards that
ignore sound are called as before), the ``clap_audio`` reward on a tiny random ``ClapModel``, the
sound through the reward server's wire (binary and JSON bodies, and the ``remote`` client), and
``score`` reading a file's audio stream."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

import rewards
from rewards.registry import Audio, RewardError, RewardInputError
from rewards.server import BackgroundServer, create_app
from rewards.wire import BINARY_TYPE, JSON_TYPE, decode_request, decode_response, encode_json_request, encode_request

FPS = 8.0
RATE = 8000


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    """A tiny random CLAP (HTSAT audio tower, RoBERTa text tower) and its processor, saved locally:
    a byte-level tokenizer built here, a feature extractor at 8 kHz with 16 mel bins."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = RobertaTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                               unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    fe = ClapFeatureExtractor(feature_size=16, sampling_rate=RATE, hop_length=80, max_length_s=2,
                              fft_window_size=256, frequency_max=4000, truncation="rand_trunc")
    cfg = ClapConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=80, pad_token_id=1, bos_token_id=0,
                                      eos_token_id=2),
                     audio_config=dict(spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=(4, 4),
                                       patch_embeds_hidden_size=8, hidden_size=16, depths=[1, 1],
                                       num_attention_heads=[2, 2], window_size=4, enable_fusion=False,
                                       projection_dim=8),
                     projection_dim=8)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clap")
    ClapModel(cfg).eval().save_pretrained(path)
    ClapProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(path)
    return path


def sounds(b: int = 3, t: int = 9000, seed: int = 0) -> Audio:
    g = torch.Generator().manual_seed(seed)
    return Audio((0.3 * torch.randn(b, 2, t, generator=g)).clamp(-1, 1), 16000)


VIDEOS = torch.randint(0, 255, (3, 9, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
PROMPTS = ["a dog barks", "rain on a roof", "a violin"]


def test_clap_reward_scores_the_sound_and_rewards_without_sound_are_unchanged(clap_dir):
    built = rewards.build_rewards({"clap": {"type": "clap_audio", "model": str(clap_dir)}, "frame_change": 1.0})
    assert rewards.takes_audio(built["clap"]) and not rewards.takes_audio(built["frame_change"])
    scores, extras = rewards.score_videos(built, VIDEOS, PROMPTS, fps=FPS, audio=sounds())
    assert scores["clap"].shape == (3,) and bool(((scores["clap"] >= 0) & (scores["clap"] <= 1)).all())
    assert torch.allclose(scores["clap"], (extras["clap/cosine"] + 1) / 2)
    silent, _ = rewards.score_videos({"frame_change": built["frame_change"]}, VIDEOS, PROMPTS, fps=FPS)
    assert torch.equal(silent["frame_change"], scores["frame_change"])        # sound changes nothing there
    other, _ = rewards.score_videos({"clap": built["clap"]}, VIDEOS, PROMPTS, fps=FPS, audio=sounds(seed=5))
    assert not torch.allclose(other["clap"], scores["clap"])                    # the sound matters
    with pytest.raises(RewardInputError, match="these videos have none"):
        rewards.score_videos({"clap": built["clap"]}, VIDEOS, PROMPTS, fps=FPS)
    with pytest.raises(RewardError, match="2 waveforms for 3 videos"):
        rewards.score_videos(built, VIDEOS, PROMPTS, fps=FPS, audio=Audio(sounds().waveforms[:2], 16000))


def test_audio_through_the_wire_and_the_server(clap_dir):
    entries = {"clap": {"type": "clap_audio", "model": str(clap_dir)}, "frame_change": 1.0}
    local = rewards.build_rewards(entries)
    audio = sounds()
    want, want_extras = rewards.score_videos(local, VIDEOS, PROMPTS, fps=FPS, audio=audio)
    # Both bodies carry the waveforms exactly.
    req = decode_request(encode_request(VIDEOS, PROMPTS, FPS, None, audio), BINARY_TYPE)
    assert req.audio.sample_rate == 16000 and torch.equal(req.audio.waveforms, audio.waveforms)
    body = json.dumps(encode_json_request(VIDEOS, PROMPTS, FPS, None, audio)).encode()
    assert torch.equal(decode_request(body, JSON_TYPE).audio.waveforms, audio.waveforms)
    assert decode_request(encode_request(VIDEOS, PROMPTS, FPS), BINARY_TYPE).audio is None
    with BackgroundServer(create_app(entries, batch_window_s=0.01)) as url:
        got = rewards.score_videos(rewards.build_rewards({"r": {"type": "remote", "url": url}}), VIDEOS, PROMPTS,
                                   fps=FPS, audio=audio)[1]
        assert torch.equal(got["r/clap"], want["clap"]) and torch.equal(got["r/frame_change"], want["frame_change"])
        resp = httpx.post(f"{url}/score", content=body, headers={"Content-Type": JSON_TYPE}, timeout=30)
        scores, extras, _ = decode_response(resp.json())
        assert torch.equal(scores["clap"], want["clap"]) and torch.equal(extras["clap/cosine"],
                                                                          want_extras["clap/cosine"])
        # Without sound the sound reward refuses (422); a malformed audio header is a 400 naming it.
        resp = httpx.post(f"{url}/score", content=encode_request(VIDEOS, PROMPTS, FPS), timeout=30,
                          headers={"Content-Type": BINARY_TYPE})
        assert resp.status_code == 422 and "none" in resp.json()["error"]
        bad = json.loads(body)
        bad["audio"]["shape"] = [3, 5, 9000]
        resp = httpx.post(f"{url}/score", content=json.dumps(bad).encode(), timeout=30,
                          headers={"Content-Type": JSON_TYPE})
        assert resp.status_code == 400 and "audio.shape" in resp.json()["error"]


def test_score_reads_a_files_audio_for_a_reward_that_asks(clap_dir, tmp_path):
    from flowdppo_video.commands.scoring import score_files
    from flowdppo_video.runs.video import write_video

    audio = sounds(2, 9000)
    files = [write_video(tmp_path / f"{i}.mp4", VIDEOS[i], FPS, audio.waveforms[i], RATE) for i in range(2)]
    rows, names, skipped = score_files(files, PROMPTS[:2], {"clap": {"type": "clap_audio", "model": str(clap_dir)},
                                                           "frame_change": 1.0})
    assert not skipped and names == ["clap", "frame_change"]
    assert all(0 <= r["clap"] <= 1 for r in rows) and rows[0]["clap"] != rows[1]["clap"]
    silent = write_video(tmp_path / "silent.mp4", VIDEOS[0], FPS)
    rows, _, skipped = score_files([silent], PROMPTS[:1], {"frame_change": 1.0})
    assert not skipped and np.isfinite(rows[0]["frame_change"])
