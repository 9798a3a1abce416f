"""HPSv3 (MizzenAI/HPSv3, MIT; ICCV 2025) as a video reward: the human-preference score of frames
sampled from each video, averaged -- how video RL recipes use it (verl-omni's Wan 2.2 recipe,
Flash-GRPO).

Why a loader here and not the ``hpsv3`` package: ``hpsv3`` 1.0.0 pins ``transformers==4.45.2``, and
``pip install --dry-run hpsv3`` beside this project would replace transformers 5.x, tokenizers,
diffusers and the CPU torch build (with a CUDA one) -- it cannot install beside our pins. Its model is
transformers' Qwen2-VL plus a small head, so this module reads its published checkpoint with the
transformers installed here and reproduces its ``HPSv3RewardInferencer.reward`` arithmetic:

* checkpoint: ``HPSv3.safetensors``, the whole state dict of ``Qwen2VLRewardModelBT`` (Qwen2-VL-7B-
  Instruct with its embeddings resized to the tokenizer plus ``<|Reward|>``, and ``rm_head``), keys as
  transformers 4.45 named them (``model.layers...``, ``visual...``: renamed here). The base model's
  directory (``base``: Qwen2-VL-7B-Instruct) gives the architecture, tokenizer, chat template and
  ``preprocessor_config.json``; its weights are not read.
* head (``rm_head_type: ranknet``, no kwargs): ``Linear(hidden, 1024) -> ReLU -> Dropout -> Linear(1024,
  16) -> ReLU -> Linear(16, 2)`` in float32 on the last hidden state at the ``<|Reward|>`` token; the
  two outputs are ``(mu, sigma)`` and the score is ``mu``, as the reference's example reads it.
* image: each sampled frame resized with PIL bicubic to Qwen-VL's ``smart_resize`` with
  ``min_pixels = max_pixels = pixels`` (256*28*28 in the reference: every frame becomes ~200k pixels,
  e.g. 336x588 for 480x832), then the Qwen2-VL image processor (rescale, CLIP normalisation, 14-px
  patches, the image repeated over the temporal patch).
* text: the reference's ``INSTRUCTION`` with the prompt, then its ``prompt_with_special_token`` (kept
  verbatim below: the model was trained on exactly this text), as one user message holding the image
  and the text, in the base model's chat template with the generation prompt; right padding.
* forward: the 4.45 reference calls the language model with ``position_ids=None``, which there means
  plain 1-D positions (not the multimodal RoPE index); the same positions are passed here.

Frames: ``frames`` of them (default 4) at ``linspace(0, F - 1, frames).round()``; the score is the mean
of their ``mu``. Returns ``{"score", "sigma", "frame_min"}`` (``(B,)`` float32): the mean ``mu``, the mean
``sigma`` and the lowest frame's ``mu``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from .common import check_videos, positive, resolve_device, resolve_dtype
from .qwen_video import QwenVideoPacker, chat_inputs, find_chat_template
from .registry import RewardError, register
from .videoalign import to_current_layout

REWARD_TOKEN = "<|Reward|>"
IMAGE_TOKEN = "<|image_pad|>"
PIXELS = 256 * 28 * 28                   # the reference's min_pixels = max_pixels for every image

# hpsv3/dataset/data_collator_qwen.py (MizzenAI/HPSv3, MIT License): INSTRUCTION and
# prompt_with_special_token, verbatim (model inputs; "{text_prompt}" is the prompt).
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: W291  (trailing spaces are part of the trained text)
PROMPT_WITH_SPECIAL_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def render_prompt(prompt: str) -> str:
    """The reward model's question for one image (``{text_prompt}`` replaced, as ``str.format`` does)."""
    return INSTRUCTION.replace("{text_prompt}", prompt) + PROMPT_WITH_SPECIAL_TOKEN


def frame_indices(num_frames: int, frames: int) -> list[int]:
    """``frames`` indices spread over ``num_frames`` (first and last included; all when fewer)."""
    n = min(frames, num_frames)
    return torch.linspace(0, num_frames - 1, n).round().long().tolist()


def image_size(height: int, width: int, factor: int, pixels: int) -> tuple[int, int]:
    """Qwen-VL's ``smart_resize`` with ``min_pixels = max_pixels = pixels`` (the reference's call)."""
    if max(height, width) / min(height, width) > 200:
        raise RewardError(f"videos of {height}x{width} are too elongated for HPSv3 (ratio > 200)")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def resize_frame(frame: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(h, w, 3)`` uint8 with PIL's bicubic resize, as the reference's
    ``fetch_image`` resizes a PIL image."""
    img = Image.fromarray(frame.cpu().numpy())
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy())


def build_head(hidden: int, state: Mapping[str, torch.Tensor], where: Path) -> torch.nn.Sequential:
    """The ``ranknet`` head from ``rm_head.{0,3,5}.{weight,bias}`` (float32, eval mode)."""
    shapes = {k: tuple(v.shape) for k, v in state.items() if k.startswith("rm_head.")}
    want = {"rm_head.0.weight": (1024, hidden), "rm_head.0.bias": (1024,), "rm_head.3.weight": (16, 1024),
            "rm_head.3.bias": (16,), "rm_head.5.weight": (2, 16), "rm_head.5.bias": (2,)}
    if shapes != want:
        raise RewardError(f"{where}: rm_head is not HPSv3's ranknet head (hidden {hidden} -> 1024 -> 16 -> 2); "
                          f"has {sorted(shapes.items()) or 'no rm_head'}")
    head = torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    head.load_state_dict({k[len("rm_head."):]: v.float() for k, v in state.items() if k.startswith("rm_head.")})
    return head.float().eval()


@register("hpsv3")
class HPSv3Reward:
    """HPSv3 over sampled frames, averaged (see the module docstring).

    Options: ``model`` (``HPSv3.safetensors``, or a directory holding it), ``base`` (the local
    Qwen2-VL-7B-Instruct directory), ``frames`` (sampled per video, default 4), ``pixels`` (each
    frame's pixel count, default 256*28*28 as the reference), ``batch_size`` (frames per forward),
    ``device``, ``dtype`` (``auto``: bfloat16 on CUDA as the reference runs, float32 on CPU).
    """

    default_retries = 0

    def __init__(self, model: str, base: str, frames: int = 4, pixels: int = PIXELS, batch_size: int = 8,
                 device: str = "auto", dtype: str = "auto") -> None:
        path = Path(str(model)).expanduser()
        if path.is_dir():
            path = path / "HPSv3.safetensors"
        if not path.is_file():
            raise RewardError(f"model must be HPSv3's checkpoint file HPSv3.safetensors (or its directory), "
                              f"got {str(model)!r}")
        base_dir = Path(str(base)).expanduser()
        for name in ("config.json", "preprocessor_config.json"):
            if not (base_dir / name).is_file():
                raise RewardError(f"base must be the local Qwen2-VL-7B-Instruct directory; {base_dir} has no {name}")
        self.frames = positive("frames", frames, int)
        self.pixels = positive("pixels", pixels, int)
        self.batch_size = positive("batch_size", batch_size, int)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.path, self.base = path, base_dir
        self.packer = QwenVideoPacker(base_dir, config_names=("preprocessor_config.json",))
        self.factor = self.packer.patch_size * self.packer.merge_size          # 28 for Qwen2-VL
        self.chat_template = find_chat_template(base_dir)
        self.tokenizer = self._tokenizer(base_dir)
        self.model, self.head = self._load(path, base_dir)

    def _tokenizer(self, base_dir: Path) -> Any:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
        except Exception as e:
            raise RewardError(f"cannot load the tokenizer from {base_dir}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
        if REWARD_TOKEN not in tok.get_vocab():       # the reference adds it to the base tokenizer
            tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_id = int(tok.convert_tokens_to_ids(REWARD_TOKEN))
        self.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tok.unk_token_id:
            raise RewardError(f"the tokenizer of {base_dir} has no {IMAGE_TOKEN} token")
        if tok.pad_token_id is None:
            raise RewardError(f"the tokenizer of {base_dir} has no pad token")
        return tok

    def _load(self, path: Path, base_dir: Path) -> tuple[Any, torch.nn.Sequential]:
        from transformers import AutoConfig, Qwen2VLForConditionalGeneration

        try:
            raw = load_file(path)
        except Exception as e:
            raise RewardError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        state = {to_current_layout(k): v for k, v in raw.items()}
        config = AutoConfig.from_pretrained(base_dir, local_files_only=True)
        if config.model_type != "qwen2_vl":
            raise RewardError(f"the base model {base_dir} is {config.model_type!r}; HPSv3 is built on qwen2_vl")
        head = build_head(int(config.text_config.hidden_size), state, path)
        state = {k: v for k, v in state.items() if not k.startswith("rm_head.")}
        embed = state.get("model.language_model.embed_tokens.weight")
        if embed is None:
            raise RewardError(f"{path} has no language-model embeddings (model.embed_tokens.weight)")
        if self.reward_id >= embed.shape[0]:
            raise RewardError(f"the tokenizer's {REWARD_TOKEN} (id {self.reward_id}) is outside the checkpoint's "
                              f"{embed.shape[0]} embeddings: a base model other than HPSv3's?")
        config.text_config.vocab_size = int(embed.shape[0])
        config.pad_token_id = self.tokenizer.pad_token_id
        try:                                   # every weight comes from the checkpoint: skip the random init
            from transformers.initialization import no_init_weights
        except ImportError:
            from contextlib import nullcontext as no_init_weights
        with no_init_weights():
            model = Qwen2VLForConditionalGeneration._from_config(config, dtype=self.dtype)
        if getattr(config, "tie_word_embeddings", False) or getattr(config.text_config, "tie_word_embeddings", False):
            state["lm_head.weight"] = embed
        result = model.load_state_dict({k: v.to(self.dtype) for k, v in state.items()}, strict=False)
        missing = [k for k in result.missing_keys if k != "lm_head.weight"]
        if missing or result.unexpected_keys:
            bad = (missing or result.unexpected_keys)[0]
            raise RewardError(f"{path} does not fit the base model {base_dir}: {'missing' if missing else 'unexpected'} "
                              f"{bad} ({len(missing)} missing, {len(result.unexpected_keys)} unexpected)")
        return model.to(self.device).eval(), head.to(self.device)

    def build_inputs(self, images: Sequence[torch.Tensor], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw`` of
        ``(h, w, 3)`` uint8 images already at their final size, one prompt each."""
        patches, grids = [], []
        for image in images:
            pv, grid = self.packer.pack(image[None])               # one frame, repeated over the temporal patch
            patches.append(pv)
            grids.append(grid)
        enc = chat_inputs(self.tokenizer, self.chat_template, self.base,
                          [(render_prompt(p), g) for p, g in zip(prompts, grids)], IMAGE_TOKEN, "image",
                          self.packer.merge_size)
        return {**enc, "pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}

    @torch.inference_mode()
    def frame_logits(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(n, 2)`` float32 ``(mu, sigma)`` of ``n`` packed images."""
        ids = inputs["input_ids"].to(self.device)
        b, length = ids.shape
        where = ids == self.reward_id
        if not bool((where.sum(-1) == 1).all()):
            raise RewardError(f"each text must hold {REWARD_TOKEN} exactly once, got counts {where.sum(-1).tolist()} "
                              f"(does a prompt contain it?)")
        positions = torch.arange(length, device=self.device).view(1, 1, -1).expand(3, b, -1)   # 1-D, as the reference
        hidden = self.model.model(input_ids=ids, attention_mask=inputs["attention_mask"].to(self.device),
                                  position_ids=positions,
                                  pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                                  image_grid_thw=inputs["image_grid_thw"].to(self.device)).last_hidden_state
        return self.head(hidden[where].float()).float().cpu()

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        f, h, w = videos.shape[1:4]
        idx = frame_indices(f, self.frames)
        size = image_size(h, w, self.factor, self.pixels)
        images = [resize_frame(videos[i, t], size) for i in range(videos.shape[0]) for t in idx]
        texts = [prompts[i] for i in range(videos.shape[0]) for _ in idx]
        logits = torch.cat([self.frame_logits(self.build_inputs(images[s:s + self.batch_size], texts[s:s + self.batch_size]))
                            for s in range(0, len(images), self.batch_size)]).double().view(videos.shape[0], len(idx), 2)
        mu, sigma = logits[..., 0], logits[..., 1]
        return {"score": mu.mean(1).float(), "sigma": sigma.mean(1).float(), "frame_min": mu.min(1).values.float()}
