"""VLM judges: a tiny random Qwen2-VL / Qwen2.5-VL run end to end from a saved directory, and the
remote judge against a real HTTP server on loopback speaking the chat completions shape."""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import rewards
from rewards.registry import RewardError
from rewards.vlm import QwenVideoPacker, VLMJudge, answer_token_ids

from .tiny_vlm import QWEN_SPECIAL, WORDS, build_tiny_qwen2_vl, build_word_tokenizer

PROMPTS = ["a red circle moves left", "a cat", "the black dog runs quickly in the park"]   # unequal lengths: padding


def _videos(b: int = 3, f: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, f, 32, 32, 3), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"))


@pytest.fixture(scope="module")
def judge(qwen2_dir):
    return VLMJudge(str(qwen2_dir), device="cpu", batch_size=3)


def test_scores_shape_range_deterministic_and_batch_invariant(qwen2_dir, judge) -> None:
    videos = _videos()
    out = judge(videos, PROMPTS, fps=8.0)
    assert out["score"].shape == (3,) and out["answer_mass"].shape == (3,)
    assert ((out["score"] > 0) & (out["score"] < 1)).all() and ((out["answer_mass"] > 0) & (out["answer_mass"] <= 1)).all()
    assert torch.equal(judge(videos, PROMPTS, fps=8.0)["score"], out["score"])          # deterministic
    one_by_one = VLMJudge(str(qwen2_dir), device="cpu", batch_size=1)(videos, PROMPTS, fps=8.0)["score"]
    assert torch.allclose(one_by_one, out["score"], atol=1e-5, rtol=0)
    assert len(set(out["score"].tolist())) == 3                                        # the videos are told apart


@pytest.mark.parametrize("scoring", ["yes_prob", "rating"])
def test_score_equals_manual_computation_from_logits(qwen2_dir, scoring) -> None:
    j = VLMJudge(str(qwen2_dir), device="cpu", scoring=scoring, criterion="motion_quality")
    videos = _videos(2, seed=1)
    got = j(videos, PROMPTS[:2], fps=8.0)["score"]
    vocab = j.tokenizer.get_vocab()
    for i in range(2):
        inputs = j.build_inputs(videos[i:i + 1], PROMPTS[i:i + 1], 8.0)
        with torch.no_grad():
            logits = j.model(**inputs).logits[0, -1].double()                          # full forward, last position
        p = torch.softmax(logits, -1)
        if scoring == "yes_prob":
            want = p[vocab["Yes"]] / (p[vocab["Yes"]] + p[vocab["No"]])
        else:
            pk = torch.stack([p[vocab[str(k)]] for k in range(1, 6)])
            want = ((pk * torch.arange(1, 6)).sum() / pk.sum() - 1) / 4
        assert abs(float(want) - float(got[i])) < 1e-5


def test_question_and_chat_template_reach_the_model(qwen2_dir, judge) -> None:
    inputs = judge.build_inputs(_videos(1), ["a cat"], 8.0)
    text = judge.tokenizer.decode(inputs["input_ids"][0])
    assert text.startswith("<|im_start|>") and text.rstrip().endswith("assistant")
    assert "cat" in text and "description" in text                                     # the text_alignment template
    n_video = int((inputs["input_ids"] == judge.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum())
    assert n_video == int(inputs["video_grid_thw"].prod()) // 4 == int(inputs["mm_token_type_ids"].sum()) // 2
    custom = VLMJudge(str(qwen2_dir), device="cpu", question="Is the {prompt} red? Answer Yes or No.")
    text = custom.tokenizer.decode(custom.build_inputs(_videos(1), ["circle"], 8.0)["input_ids"][0])
    assert "Is the circle red ? Answer Yes or No ." in text


def test_builtin_video_packing_matches_transformers_patch_layout(qwen2_dir) -> None:
    """A video of two identical frames is one temporal patch: it must equal transformers' Qwen2-VL
    image processor on that frame (which repeats an image over the temporal patch)."""
    from transformers import AutoImageProcessor

    frame = _videos(1, 1, seed=3)[0, 0]
    patches, grid = QwenVideoPacker(qwen2_dir).pack(torch.stack([frame, frame]))
    ref = AutoImageProcessor.from_pretrained(qwen2_dir, local_files_only=True)(images=[frame.numpy()],
                                                                              return_tensors="pt")
    assert list(grid) == ref["image_grid_thw"][0].tolist() == [1, 8, 8]
    assert torch.allclose(patches, ref["pixel_values"].float(), atol=1e-5)


def test_fps_reaches_the_frame_sampling_and_temporal_positions(qwen2_dir, tmp_path) -> None:
    videos = _videos(1)                                                                # 16 frames
    sixteen = VLMJudge(str(qwen2_dir), device="cpu", max_frames=16)
    grids = {fps: sixteen.build_inputs(videos, ["a cat"], fps)["video_grid_thw"][0].tolist() for fps in (8.0, 2.0)}
    # at 8 fps 16 frames last 2 s: 4 frames at the judge's 2 fps (2 temporal patches); at 2 fps, 8 s: all 16.
    assert grids == {8.0: [2, 8, 8], 2.0: [8, 8, 8]}
    # Qwen2.5-VL: the same 4 frames mean 2 s or 8 s of video; its temporal positions must say which.
    d25 = build_tiny_qwen2_vl(tmp_path / "qwen2_5_vl", family="qwen2_5_vl")
    pos = {}
    for fps in (8.0, 2.0):
        j = VLMJudge(str(d25), device="cpu", max_frames=4)
        inputs = j.build_inputs(videos, ["a cat"], fps)
        assert inputs["video_grid_thw"][0].tolist() == [2, 8, 8]
        assert inputs["second_per_grid_ts"].tolist() == [2 / (4 / 16 * fps)]          # temporal patch / sampled fps
        keys = ("input_ids", "mm_token_type_ids", "video_grid_thw", "attention_mask", "second_per_grid_ts")
        pos[fps] = j.model.model.get_rope_index(**{k: inputs[k] for k in keys})[0]
        s = j(videos, ["a cat"], fps=fps)["score"]
        assert s.shape == (1,) and 0 < float(s) < 1
    assert pos[8.0].shape == pos[2.0].shape and not torch.equal(pos[8.0][0], pos[2.0][0])  # temporal axis differs
    assert torch.equal(pos[8.0][1:], pos[2.0][1:])                                          # height, width do not


def test_answer_tokens_found_with_or_without_leading_space() -> None:
    tok = build_word_tokenizer([*WORDS, "ĠYes", "ĠNo"], QWEN_SPECIAL, pad="<|endoftext|>")
    vocab = tok.get_vocab()
    assert answer_token_ids(tok, ["Yes", "No"], "m") == [sorted([vocab["Yes"], vocab["ĠYes"]]),
                                                          sorted([vocab["No"], vocab["ĠNo"]])]
    spaced_only = build_word_tokenizer([w for w in WORDS if w not in ("Yes", "No")] + ["ĠYes", "ĠNo"], QWEN_SPECIAL,
                                       pad="<|endoftext|>")
    assert answer_token_ids(spaced_only, ["Yes", "No"], "m") == [[spaced_only.get_vocab()["ĠYes"]],
                                                                  [spaced_only.get_vocab()["ĠNo"]]]
    no_no = build_word_tokenizer([w for w in WORDS if w != "No"], QWEN_SPECIAL, pad="<|endoftext|>")
    with pytest.raises(RewardError, match=r"tokenizer of m has no single token for the answer 'No'"):
        answer_token_ids(no_no, ["Yes", "No"], "m")


def test_built_from_a_config_entry_and_bad_options_named(qwen2_dir, tmp_path) -> None:
    built = rewards.build_rewards({"align": {"type": "vlm_judge", "weight": 0.5, "model": str(qwen2_dir),
                                             "device": "cpu", "scoring": "rating"}})
    scores, extras = rewards.score_videos(built, _videos(2), PROMPTS[:2], fps=8.0)
    assert scores["align"].shape == (2,) and extras["align/answer_mass"].shape == (2,)
    with pytest.raises(RewardError, match=r"model must be a local checkpoint directory with config.json, got '.*nowhere'"):
        rewards.build_rewards({"j": {"type": "vlm_judge", "model": str(tmp_path / "nowhere")}})
    with pytest.raises(RewardError, match=r"criterion must be one of text_alignment, visual_quality, motion_quality"):
        VLMJudge(str(qwen2_dir), criterion="beauty")
    with pytest.raises(RewardError, match=r"scoring must be one of yes_prob, rating"):
        VLMJudge(str(qwen2_dir), scoring="logit")
    with pytest.raises(RewardError, match=r"videos must be a \(B, F, H, W, 3\) uint8 tensor, got \(2, 16, 32, 32\)"):
        VLMJudge(str(qwen2_dir), device="cpu")(torch.zeros(2, 16, 32, 32, dtype=torch.uint8), ["a", "b"], fps=8.0)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("torchvision"), reason="transformers' video processors need torchvision")
def test_builtin_packing_equals_the_transformers_video_processor(qwen2_dir) -> None:
    builtin = VLMJudge(str(qwen2_dir), device="cpu", processing="builtin")
    official = VLMJudge(str(qwen2_dir), device="cpu", processing="processor")
    videos = _videos()
    a, b = builtin.build_inputs(videos, PROMPTS, 8.0), official.build_inputs(videos, PROMPTS, 8.0)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["video_grid_thw"], b["video_grid_thw"])
    assert torch.allclose(a["pixel_values_videos"], b["pixel_values_videos"].float(), atol=1e-4)
    assert torch.allclose(builtin(videos, PROMPTS)["score"], official(videos, PROMPTS)["score"], atol=1e-5)


# ------------------------------------------------------------------------------------------ remote

class _Judge(BaseHTTPRequestHandler):
    """A chat completions endpoint whose first-token log-probabilities are a function of the
    request (so each video gets its own): ``log P(Yes) = -n_chars / 100`` split over "Yes" and
    " Yes", ``log P(No) = -1.5``, ratings ``log P(k) = -k * n_images / 4``."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.requests.append((self.path, dict(self.headers), body))
        if srv.fail_next > 0:
            srv.fail_next -= 1
            self._send(503, {"error": "overloaded"})
            return
        top = srv.top_for(body)
        self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [{
            "index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": top[0]["token"]},
            "logprobs": {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]}}]})

    def _send(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _served_top(body: dict) -> list[dict]:
    content = body["messages"][0]["content"]
    text = next(p["text"] for p in content if p["type"] == "text")
    n_img = sum(p["type"] == "image_url" for p in content)
    lp_yes = -len(text) / 100
    if "number" in text:                                                                # rating question
        return [{"token": str(k), "logprob": -k * n_img / 4} for k in (3, 1, 2, 5, 4)] + [{"token": "I", "logprob": -9.0}]
    return [{"token": "Yes", "logprob": lp_yes + math.log(0.75)}, {"token": " No", "logprob": -1.5},
            {"token": " Yes", "logprob": lp_yes + math.log(0.25)}, {"token": "Maybe", "logprob": -4.0}]


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    srv.requests, srv.fail_next, srv.top_for = [], 0, _served_top
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _remote(srv, **kw) -> dict:
    return {"judge": {"type": "vlm_judge_remote", "base_url": f"http://127.0.0.1:{srv.server_address[1]}/v1",
                      "model": "tiny-judge", "api_key": "k3y", "timeout": 5, **kw}}


def test_remote_yes_prob_equals_the_served_logprobs(server) -> None:
    built = rewards.build_rewards(_remote(server))
    videos = _videos(2)
    scores, extras = rewards.score_videos(built, videos, PROMPTS[:2], fps=8.0)
    assert len(server.requests) == 2
    for path, headers, body in server.requests:
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k3y"
        assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
        images = [p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url"]
        assert len(images) == 4                                                          # 16 frames at 8 fps, judged at 2 fps
        from PIL import Image
        img = Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[1])))
        assert img.size == (32, 32)
    by_prompt = {next(p["text"] for p in b["messages"][0]["content"] if p["type"] == "text"): b
                 for _, _, b in server.requests}
    for i, prompt in enumerate(PROMPTS[:2]):
        text = next(t for t in by_prompt if prompt in t)
        p_yes, p_no = math.exp(-len(text) / 100), math.exp(-1.5)                        # "Yes" + " Yes" = P(Yes)
        assert abs(float(scores["judge"][i]) - p_yes / (p_yes + p_no)) < 1e-6
        assert abs(float(extras["judge/answer_mass"][i]) - (p_yes + p_no)) < 1e-6


def test_remote_rating_equals_the_served_logprobs(server) -> None:
    built = rewards.build_rewards(_remote(server, scoring="rating", criterion="visual_quality", max_frames=2,
                                          image_format="png"))
    scores, _ = rewards.score_videos(built, _videos(1), PROMPTS[:1], fps=8.0)
    pk = np.exp([-k * 2 / 4 for k in range(1, 6)])                                      # 2 images sent
    assert abs(float(scores["judge"][0]) - ((pk * np.arange(1, 6)).sum() / pk.sum() - 1) / 4) < 1e-6
    assert server.requests[0][2]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_remote_retries_after_a_failed_request_and_errors_clearly(server) -> None:
    server.fail_next = 1
    built = rewards.build_rewards(_remote(server))
    scores, _ = rewards.score_videos(built, _videos(1), PROMPTS[:1], fps=8.0)                     # default_retries = 2
    assert len(server.requests) == 2 and 0 < float(scores["judge"][0]) < 1
    server.top_for = lambda body: [{"token": "Maybe", "logprob": -0.1}]
    with pytest.raises(RewardError, match=r"top 1 tokens for video 0 hold none of Yes, No \(first token 'Maybe'\)"):
        rewards.score_videos(rewards.build_rewards(_remote(server, retries=0)), _videos(1), PROMPTS[:1], fps=8.0)


def test_remote_judge_down_is_a_clear_error() -> None:
    with socket.socket() as s:                                                           # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    built = rewards.build_rewards({"judge": {"type": "vlm_judge_remote", "base_url": f"http://127.0.0.1:{port}/v1",
                                             "model": "m", "retries": 1, "timeout": 2}})
    with pytest.raises(RewardError, match=rf"reward 'judge' failed after 2 attempts: cannot reach the judge at "
                                          rf"http://127.0.0.1:{port}/v1/chat/completions: ConnectError"):
        rewards.score_videos(built, _videos(1), PROMPTS[:1], fps=8.0)
    with pytest.raises(RewardError, match=r"base_url must be an http\(s\) URL"):
        rewards.build_rewards({"judge": {"type": "vlm_judge_remote", "base_url": "127.0.0.1:8000", "model": "m"}})
