"""Vision-language judges: a VLM asked a yes/no or 1-5 question about each video.

Two rewards share the questions and the scoring:

* ``vlm_judge``: a local transformers checkpoint (Qwen2-VL, Qwen2.5-VL, Qwen3-VL or any
  image-text-to-text model whose processor takes videos), loaded from a directory with
  ``local_files_only``.
* ``vlm_judge_remote``: a judge served by vLLM or SGLang behind the OpenAI-compatible
  ``/v1/chat/completions`` API, the frames sent as base64 ``image_url`` parts.

The score is read from the next-token distribution after the chat-templated question, never
from generated text:

* ``scoring: yes_prob``: ``P(Yes) / (P(Yes) + P(No))`` in ``[0, 1]``;
* ``scoring: rating``: the expected rating ``sum_k k P(k) / sum_k P(k)`` over the tokens
  ``"1" .. "5"``, mapped to ``[0, 1]`` as ``(E - 1) / 4``.

``P(answer)`` sums every single token that spells the answer (``"Yes"`` and ``" Yes"``, as
byte-level BPE vocabularies hold both). Both rewards also return ``answer_mass``, the total
probability of the answer tokens: near 0 means the judge is not answering in the asked format,
and its score means little.

Questions: one template per ``criterion`` (``text_alignment``, ``visual_quality``,
``motion_quality``) and scoring mode, with ``{prompt}`` replaced by the video's prompt, or a
custom ``question`` template.

Frames. ``fps`` is the real frame rate of the videos, given with every call (training's
``video.fps``, the file's own in ``score``, the one on the wire at the reward server); the
judge sees ``sample_fps`` frames per second of video (Qwen-VL's training rate, 2), at most ``max_frames`` and a multiple of the vision tower's temporal patch, chosen
uniformly; the processor is told both (``VideoMetadata`` with the frame indices), so temporal
positions (Qwen2.5-VL's ``second_per_grid_ts``, Qwen3-VL's timestamps) are right.

Preprocessing of the local judge (``processing``):

* ``builtin`` (the default for ``qwen2_vl`` and ``qwen2_5_vl``): this module packs the frames
  itself from the checkpoint's ``video_preprocessor_config.json`` (else
  ``preprocessor_config.json``): the Qwen-VL ``smart_resize``, a bicubic antialiased resize
  rounded to uint8 as torchvision does, rescale and normalise, temporal padding and the Qwen
  patch layout; and expands ``<|video_pad|>`` in the chat-templated text. transformers' video
  processors need torchvision, which a CPU-only install of this project lacks; this path needs
  only the tokenizer, and gives the same scores with or without torchvision.
* ``processor`` (the default for every other family): ``AutoProcessor`` from the directory,
  called with ``videos=`` and ``video_metadata=`` (needs torchvision).
"""

from __future__ import annotations

import base64
import io
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .common import check_videos, checkpoint_dir, positive, read_json, resolve_device, resolve_dtype
from .qwen_video import VIDEO_TOKEN, QwenVideoPacker, find_chat_template, sample_frame_indices
from .registry import RewardError, register

CRITERIA = ("text_alignment", "visual_quality", "motion_quality")
SCORINGS = ("yes_prob", "rating")

QUESTIONS: dict[str, dict[str, str]] = {
    "yes_prob": {
        "text_alignment": 'Does this video match the description "{prompt}"? Answer Yes or No.',
        "visual_quality": "Is this video of high visual quality: sharp, clean, free of artifacts and distortions? "
                          "Answer Yes or No.",
        "motion_quality": "Is the motion in this video smooth, natural and physically plausible? Answer Yes or No.",
    },
    "rating": {
        "text_alignment": 'How well does this video match the description "{prompt}"? Rate from 1 (not at all) '
                          "to 5 (perfectly). Answer with one number.",
        "visual_quality": "Rate the visual quality of this video (sharpness, cleanliness, absence of artifacts) "
                          "from 1 (very poor) to 5 (excellent). Answer with one number.",
        "motion_quality": "Rate the motion in this video (smoothness, naturalness, physical plausibility) from 1 "
                          "(very poor) to 5 (excellent). Answer with one number.",
    },
}
ANSWERS: dict[str, tuple[str, ...]] = {"yes_prob": ("Yes", "No"), "rating": ("1", "2", "3", "4", "5")}
BUILTIN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


# ----------------------------------------------------------------------------------- shared parts

def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise RewardError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _question(criterion: str, scoring: str, question: str | None) -> str:
    _check_choice("scoring", scoring, SCORINGS)
    if question is not None:
        if not isinstance(question, str) or not question.strip():
            raise RewardError(f"question must be a non-empty template string, got {question!r}")
        return question
    return QUESTIONS[scoring][_check_choice("criterion", criterion, CRITERIA)]


def render_question(template: str, prompt: str) -> str:
    """The question for one video: ``{prompt}`` in ``template`` replaced by ``prompt`` (no other
    braces are interpreted, so a template may contain JSON or literal braces)."""
    return template.replace("{prompt}", prompt)


def score_from_logprobs(logp: torch.Tensor, scoring: str) -> dict[str, torch.Tensor]:
    """Scores from the log-probabilities of each answer.

    ``logp``: ``(B, A)`` float, ``log P(answer)`` in the order of ``ANSWERS[scoring]``
    (``-inf`` where the answer has no probability). Returns ``{"score": (B,), "answer_mass": (B,)}``:
    yes_prob ``P(Yes) / (P(Yes) + P(No))``, rating ``(E[k] - 1) / 4`` over ``k = 1..5``;
    ``answer_mass`` is ``sum_a P(a)``. A row where every answer has probability 0 is an error.
    """
    logp = logp.double()
    total = torch.logsumexp(logp, dim=-1)                                  # (B,)
    if not torch.isfinite(total).all():
        bad = int((~torch.isfinite(total)).nonzero()[0])
        raise RewardError(f"the judge gave none of the answers {', '.join(ANSWERS[scoring])} any probability "
                          f"(video {bad})")
    post = torch.exp(logp - total[:, None])                                 # (B, A), normalised over answers
    if scoring == "yes_prob":
        score = post[:, 0]
    else:
        ks = torch.arange(1, logp.shape[1] + 1, dtype=post.dtype)
        score = ((post * ks).sum(-1) - 1.0) / (logp.shape[1] - 1)
    return {"score": score.float(), "answer_mass": torch.exp(total).clamp(max=1.0).float()}


# --------------------------------------------------------------------------------- local backend

def answer_token_ids(tokenizer: Any, answers: Sequence[str], where: str) -> list[list[int]]:
    """For each answer, every vocabulary id that spells it as one token, with or without a
    leading space (``"Yes"``, ``" Yes"``, ``"ĠYes"``, ``"▁Yes"``). An answer with none is an error."""
    vocab = tokenizer.get_vocab()
    out, seen = [], {}
    for ans in answers:
        ids = set()
        for text in (ans, " " + ans):
            enc = tokenizer.encode(text, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(int(enc[0]))
        for piece in (ans, "Ġ" + ans, "▁" + ans):
            if piece in vocab:
                ids.add(int(vocab[piece]))
        ids.discard(getattr(tokenizer, "unk_token_id", None))     # an unknown word is no answer
        if not ids:
            raise RewardError(f"the tokenizer of {where} has no single token for the answer {ans!r}; "
                              f"scoring needs one ({', '.join(answers)})")
        for i in ids:
            if i in seen:
                raise RewardError(f"the tokenizer of {where} spells {seen[i]!r} and {ans!r} with the same token {i}")
            seen[i] = ans
        out.append(sorted(ids))
    return out


@register("vlm_judge")
class VLMJudge:
    """A local vision-language model judging each video (see the module docstring).

    Options: ``model`` (a local checkpoint directory), ``criterion``, ``question``, ``scoring``,
    ``sample_fps`` (frames per second the judge sees; the videos' real rate comes with each call),
    ``max_frames``, ``batch_size`` (videos per forward), ``device``, ``dtype``
    (``auto``: bfloat16 on CUDA, float32 on CPU), ``processing`` (``auto``, ``builtin``, ``processor``).
    Returns ``{"score": (B,), "answer_mass": (B,)}``.
    """

    default_retries = 0

    def __init__(self, model: str, criterion: str = "text_alignment", question: str | None = None,
                 scoring: str = "yes_prob", sample_fps: float = 2.0, max_frames: int = 16,
                 batch_size: int = 4, device: str = "auto", dtype: str = "auto", processing: str = "auto") -> None:
        self.template = _question(criterion, scoring, question)
        self.scoring = scoring
        self.sample_fps = positive("sample_fps", sample_fps)
        self.max_frames, self.batch_size = positive("max_frames", max_frames, int), positive("batch_size", batch_size, int)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.path = path = checkpoint_dir(model)
        family = read_json(path / "config.json").get("model_type", "")
        _check_choice("processing", processing, ("auto", "builtin", "processor"))
        if processing == "auto":
            processing = "builtin" if family in BUILTIN_FAMILIES else "processor"
        if processing == "builtin" and family not in BUILTIN_FAMILIES:
            raise RewardError(f"processing: builtin packs videos for {', '.join(BUILTIN_FAMILIES)} only; {path} is "
                              f"{family!r}: use processing: processor")
        self.processing, self.family = processing, family

        from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        try:
            if processing == "builtin":
                self.processor = None
                self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                self.packer = QwenVideoPacker(path)
                self.chat_template = find_chat_template(path)
            else:
                self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
                self.tokenizer = self.processor.tokenizer
                if getattr(self.processor, "video_processor", None) is None:
                    raise RewardError(f"the processor of {path} takes no videos")
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=self.dtype)
        except RewardError:
            raise
        except Exception as e:  # a broken checkpoint or a processor that needs torchvision
            raise RewardError(f"cannot load the VLM judge from {path}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
        self.model.to(self.device).eval()
        self.answer_ids = answer_token_ids(self.tokenizer, ANSWERS[scoring], str(path))
        if processing == "builtin":
            self.video_token_id = self.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
            if self.video_token_id is None or self.video_token_id == self.tokenizer.unk_token_id:
                raise RewardError(f"the tokenizer of {path} has no {VIDEO_TOKEN} token")


    def _messages(self, prompt: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "video"},
                                             {"type": "text", "text": render_question(self.template, prompt)}]}]

    def build_inputs(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> dict[str, torch.Tensor]:
        """Model inputs for ``(b, F, H, W, 3)`` uint8 videos shown at ``fps``: left-padded
        ``input_ids``, ``attention_mask``, the video patches and grids (and whatever else the
        family takes)."""
        f = videos.shape[1]
        tps = (self.packer if self.processing == "builtin" else self.processor.video_processor).temporal_patch_size
        idx = sample_frame_indices(f, fps, self.sample_fps, self.max_frames, int(tps or 1))
        sampled_fps = len(idx) / f * fps
        clips = videos[:, idx].cpu()
        if self.processing == "builtin":
            return self._pack_builtin(clips, prompts, sampled_fps)
        from transformers.video_utils import VideoMetadata

        texts = [self.processor.apply_chat_template(self._messages(p), tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        meta = [VideoMetadata(total_num_frames=f, fps=fps, frames_indices=list(idx), height=videos.shape[2],
                              width=videos.shape[3], duration=f / fps) for _ in prompts]
        self.tokenizer.padding_side = "left"
        return dict(self.processor(text=texts, videos=[c.numpy() for c in clips], video_metadata=meta,
                                   do_sample_frames=False, padding=True, return_tensors="pt"))

    def _pack_builtin(self, clips: torch.Tensor, prompts: Sequence[str], sampled_fps: float) -> dict[str, torch.Tensor]:
        patches, grids, texts = [], [], []
        merge = self.packer.merge_size ** 2
        for clip, prompt in zip(clips, prompts):
            pv, grid = self.packer.pack(clip)
            patches.append(pv)
            grids.append(grid)
            text = self.tokenizer.apply_chat_template(self._messages(prompt), chat_template=self.chat_template,
                                                      tokenize=False, add_generation_prompt=True)
            if text.count(VIDEO_TOKEN) != 1:
                raise RewardError(f"the chat template of {self.path} must render one {VIDEO_TOKEN} for a video part, "
                                  f"rendered {text.count(VIDEO_TOKEN)}")
            texts.append(text.replace(VIDEO_TOKEN, VIDEO_TOKEN * (math.prod(grid) // merge)))
        enc = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
        ids = enc["input_ids"]
        out = {"input_ids": ids, "attention_mask": enc["attention_mask"],
               "mm_token_type_ids": (ids == self.video_token_id).int() * 2,
               "pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
        if self.family == "qwen2_5_vl":
            out["second_per_grid_ts"] = torch.full((len(prompts),), self.packer.temporal_patch_size / sampled_fps)
        return out

    @torch.inference_mode()
    def next_token_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(b, V)`` float32 logits of the token after the (left-padded) inputs."""
        # only pixels take the model's dtype: second_per_grid_ts and the like stay float32
        inputs = {k: (v.to(self.device, self.dtype) if k.startswith("pixel_values") else v.to(self.device))
                  if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        out = self.model(**inputs, logits_to_keep=1, use_cache=False)
        return out.logits[:, -1].float()

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        chunks = range(0, videos.shape[0], self.batch_size)
        rows = []
        for s in tqdm(chunks, desc="vlm_judge", leave=False, disable=len(chunks) <= 1):
            logits = self.next_token_logits(self.build_inputs(videos[s:s + self.batch_size],
                                                              prompts[s:s + self.batch_size], fps))
            logp = torch.log_softmax(logits, dim=-1).cpu()
            rows.append(torch.stack([torch.logsumexp(logp[:, ids], dim=-1) for ids in self.answer_ids], dim=-1))
        return score_from_logprobs(torch.cat(rows), self.scoring)


# -------------------------------------------------------------------------------- remote backend

def _encode_frame(frame: np.ndarray, image_format: str) -> str:
    buf = io.BytesIO()
    img = Image.fromarray(frame)
    if image_format == "jpeg":
        img.save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format="PNG")
    return f"data:image/{image_format};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _normalise_token(token: str) -> str:
    """A served token as text: byte-level (``Ġ``) and sentencepiece (``▁``) space markers and
    surrounding whitespace removed."""
    return token.replace("Ġ", " ").replace("▁", " ").strip()


def answer_logprobs_from_top(top: Sequence[dict], answers: Sequence[str]) -> list[float]:
    """``log P(answer)`` for each answer from one position's ``top_logprobs`` entries
    (``{"token": str, "logprob": float}``): the log of the summed probabilities of every entry
    that spells it (``"Yes"``, ``" Yes"``); ``-inf`` for an answer that does not appear."""
    out = []
    for ans in answers:
        lps = [float(e["logprob"]) for e in top if _normalise_token(str(e.get("token", ""))) == ans]
        out.append(float(torch.logsumexp(torch.tensor(lps, dtype=torch.float64), 0)) if lps else -math.inf)
    return out


@register("vlm_judge_remote")
class RemoteVLMJudge:
    """A VLM judge served by vLLM or SGLang (OpenAI-compatible chat completions API).

    Each video is one request: its sampled frames as base64 ``image_url`` parts (start the
    server with enough images per prompt, e.g. vLLM ``--limit-mm-per-prompt '{"image": 16}'``),
    then the question; ``max_tokens: 1``, ``temperature: 0``, ``logprobs: true``,
    ``top_logprobs: 20``. Scores come from the first position's top log-probabilities (an answer
    not among them counts as probability 0; neither answer there is an error). Requests go out
    ``concurrency`` at a time. Options: ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``),
    ``model`` (the served name), ``api_key``, ``criterion``, ``question``, ``scoring``,
    ``sample_fps``, ``max_frames``, ``image_format`` (``jpeg`` or ``png``), ``timeout`` (seconds per
    request), ``concurrency``. A failed call is retried ``default_retries = 2`` times by the registry.
    """

    default_retries = 2

    def __init__(self, base_url: str, model: str, api_key: str | None = None, criterion: str = "text_alignment",
                 question: str | None = None, scoring: str = "yes_prob", sample_fps: float = 2.0,
                 max_frames: int = 16, image_format: str = "jpeg", timeout: float = 60.0, concurrency: int = 8,
                 top_logprobs: int = 20) -> None:
        import httpx

        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise RewardError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise RewardError(f"model must be the served model's name, got {model!r}")
        self.template = _question(criterion, scoring, question)
        self.scoring, self.model = scoring, model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.sample_fps = positive("sample_fps", sample_fps)
        self.max_frames = positive("max_frames", max_frames, int)
        self.image_format = _check_choice("image_format", image_format, ("jpeg", "png"))
        self.concurrency = positive("concurrency", concurrency, int)
        self.top_logprobs = positive("top_logprobs", top_logprobs, int)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=positive("timeout", timeout), headers=headers)

    def request_body(self, frames: np.ndarray, prompt: str) -> dict:
        """The chat completions request for one video's sampled ``(n, H, W, 3)`` uint8 frames."""
        content: list[dict] = [{"type": "image_url", "image_url": {"url": _encode_frame(fr, self.image_format)}}
                               for fr in frames]
        content.append({"type": "text", "text": render_question(self.template, prompt)})
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
                "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs}

    def _ask(self, body: dict, i: int) -> list[float]:
        import httpx

        try:
            r = self.client.post(self.url, json=body)
        except httpx.HTTPError as e:
            raise RewardError(f"cannot reach the judge at {self.url}: {type(e).__name__}: {e}") from e
        if r.status_code != 200:
            raise RewardError(f"the judge at {self.url} answered HTTP {r.status_code}: {r.text[:200]!r}")
        try:
            first = r.json()["choices"][0]["logprobs"]["content"][0]
            top = list(first.get("top_logprobs") or [])
            if all(e.get("token") != first.get("token") for e in top):    # the chosen token, if not listed
                top.append(first)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RewardError(f"the judge at {self.url} returned no logprobs for video {i} "
                              f"(is logprobs supported?): {r.text[:200]!r}") from e
        lps = answer_logprobs_from_top(top, ANSWERS[self.scoring])
        if all(lp == -math.inf for lp in lps):
            raise RewardError(f"the judge's top {len(top)} tokens for video {i} hold none of "
                              f"{', '.join(ANSWERS[self.scoring])} (first token {first.get('token')!r})")
        return lps

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        idx = sample_frame_indices(videos.shape[1], fps, self.sample_fps, self.max_frames)
        clips = videos[:, idx].cpu().numpy()
        bodies = [self.request_body(c, p) for c, p in zip(clips, prompts)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies))) as pool:
            rows = list(pool.map(self._ask, bodies, range(len(bodies))))
        return score_from_logprobs(torch.tensor(rows, dtype=torch.float64), self.scoring)
