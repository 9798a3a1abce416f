"""VideoAlign's VideoReward (KwaiVGI/VideoAlign, MIT) as a reward: visual quality (VQ), motion
quality (MQ) and text alignment (TA) of each video, read from one forward of the reward model.

The checkpoint, in the layout the release publishes (``git clone`` of the VideoReward model repo)::

    VideoReward/
      model_config.json          data_config (fps, max_frame_pixels, num_frames, prompt template),
                                 model_config (base model, output_dim, reward_token: special),
                                 peft_lora_config (lora_r, lora_alpha, use_rslora),
                                 inference_config (VQ/MQ/TA mean and std)
      checkpoint-<step>/
        model.pth                the whole state dict of the LoRA-wrapped reward model
        tokenizer/               (optional) the base tokenizer with the three reward tokens

or, as the reference's training writes it with ``save_full_model: false``, ``checkpoint-<step>/``
holding ``adapter_model.safetensors`` (the LoRA adapters) and ``non_lora_state_dict.pth`` (the
other trained weights), the rest then read from the base model's weights.

The base model (``model_config.model_name_or_path``, Qwen2-VL-2B-Instruct) gives the architecture,
the tokenizer, the chat template and ``preprocessor_config.json``; pass its local directory as
``base`` when ``model_config.json`` names a Hub id. Its weights are not read: ``model.pth`` holds
every weight (LoRA adapters merged here as ``W + alpha/r * B @ A``).

How a video is scored (as the reference's ``inference.py`` and ``vision_process.py`` do it):

* frames: ``F / fps * sample_fps`` of them (``sample_fps`` = ``data_config.fps``, 2), clamped to
  ``[4, F]`` and rounded to an even count, at ``linspace(0, F-1, n).round()``; or exactly
  ``num_frames`` (rounded to even) when the config fixes it. So an 81-frame 16 fps Wan 2.1 clip is
  judged on 10 frames, and the same motion at another fps or length is judged on other frames:
  pass the videos' real fps (every reward call carries it) and compare scores at one length.
* size: Qwen-VL ``smart_resize`` to multiples of 28 with at most ``max_frame_pixels`` (200704
  in the release, 336x588 for 480x832) and at least ``128*28*28`` pixels (when both bind, the
  cap wins), bicubic with antialiasing, rounded to uint8; then the Qwen2-VL image processor
  (its own ``smart_resize``, usually a no-op, rescale, CLIP normalisation, 14-pixel patches).
* text: the ``detailed_special`` prompt below with the video's prompt in it, in the base model's
  chat template; it holds the three reward tokens ``<|VQ_reward|>``, ``<|MQ_reward|>``,
  ``<|TA_reward|>``. Right padding; plain 1-D positions (the reference's forward bypasses
  Qwen2-VL's multimodal RoPE index, and the model was trained that way).
* head: ``rm_head`` (a bias-free linear layer on the last hidden state) at each reward token's
  position: VQ at ``<|VQ_reward|>`` and so on (``output_dim`` 1; with ``output_dim`` 3 the
  diagonal). ``normalize`` (default on, the reference's ``use_norm``) standardises each with
  ``inference_config``'s mean and std. ``score`` is ``weights``' combination (default 1, 1, 1:
  the reference's ``Overall``).

Returns ``{"score", "vq", "mq", "ta"}``, each ``(B,)`` float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file

from .common import check_videos, positive, resolve_device, resolve_dtype
from .qwen_video import VIDEO_TOKEN, QwenVideoPacker, chat_inputs, find_chat_template
from .registry import RewardError, register

COMPONENTS = ("vq", "mq", "ta")
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_MIN_PIXELS = 128 * 28 * 28        # the reference's floor on a frame's pixels
MIN_FRAMES, MAX_FRAMES, FRAME_FACTOR, MAX_RATIO = 4, 768, 2, 200

# The reference's ``detailed_special`` prompt (prompt_template.py of KwaiVGI/VideoAlign, MIT License,
# Copyright (c) 2025 Kling Team, Kuaishou Technology): the model was trained on exactly this text,
# so it is a model input kept verbatim (trailing spaces included); ``{text_prompt}`` is the video's prompt.
PROMPT_TEMPLATE = (
    '\n'
    'You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, '
    'Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three '
    'categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of '
    'the others.\n'
    '\n'
    '**Visual Quality:**  \n'
    'Evaluate the overall visual quality of the video, with a focus on static factors. The following '
    'sub-dimensions should be considered:\n'
    '- **Reasonableness:** The video should not contain any significant biological or logical errors, '
    'such as abnormal body structures or nonsensical environmental setups.\n'
    '- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and '
    'easy to interpret, with no blurring or indistinct areas.\n'
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other '
    'visual elements (e.g., hair, clothing, shadows).\n'
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color '
    'scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should '
    'convey a sense of harmony and balance.\n'
    '- **Safety:** The video should not contain harmful or inappropriate content, such as political, '
    'violent, or adult material. If such content is present, the image quality and satisfaction score '
    'should be the lowest possible. \n'
    '\n'
    'Please provide the ratings of Visual Quality: <|VQ_reward|>\n'
    'END\n'
    '\n'
    '**Motion Quality:**  \n'
    'Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following '
    'sub-dimensions:\n'
    '- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, '
    'unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, '
    'textures, or missing body parts).\n'
    '- **Naturalness:** The movement should align with physical laws and be realistic. For example, '
    'clothing should flow naturally with motion, and facial expressions should change appropriately '
    '(e.g., blinking, mouth movements).\n'
    '- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different '
    'motions or camera angles should be seamless, and the overall dynamic feel should be visually '
    'pleasing.\n'
    '- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend '
    'naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.\n'
    '- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas '
    'where the video might have blurry or unsteady sections that hinder visual continuity.\n'
    '- **Amplitude:** If the video is largely static or has little movement, assign a low score for '
    'motion quality.\n'
    '\n'
    'Please provide the ratings of Motion Quality: <|MQ_reward|>\n'
    'END\n'
    '\n'
    '**Text Alignment:**  \n'
    'Assess how well the video matches the textual prompt across the following sub-dimensions:\n'
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, '
    'object) align with the textual description. The subject should match the description in terms of '
    'number, appearance, and behavior.\n'
    '- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial '
    'expressions like talking or blinking) align with the described prompt. The motion should match the '
    'prompt in terms of type, scale, and direction.\n'
    '- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes '
    'checking if real-world locations or scenes are accurately represented, though some stylistic '
    'adaptation is acceptable.  \n'
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate '
    'how well the video adheres to this style.\n'
    '- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus '
    'shifts) are consistent with the expected behavior from the prompt.\n'
    '\n'
    'Textual prompt - {text_prompt}\n'
    'Please provide the ratings of Text Alignment: <|TA_reward|>\n'
    'END\n'
)


def render_prompt(prompt: str) -> str:
    """The reward model's question for one video (``{text_prompt}`` replaced, nothing else read)."""
    return PROMPT_TEMPLATE.replace("{text_prompt}", prompt)


def frame_indices(num_frames: int, fps: float, sample_fps: float = 2.0, fixed_frames: int | None = None) -> list[int]:
    """The frames the reward model sees of a ``num_frames``-frame video shown at ``fps``.

    ``fixed_frames`` (the config's ``num_frames``): that many, rounded to even, at most all.
    Otherwise ``num_frames / fps * sample_fps`` clamped to ``[4, even floor of min(768, F)]`` and
    rounded to even (Python's half-to-even rounding, as the reference). Spread as
    ``linspace(0, F - 1, n).round()``. Fewer than 2 frames is an error, as in the reference.
    """
    if fixed_frames is not None:
        n = round(fixed_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        lo = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(MAX_FRAMES, num_frames) / FRAME_FACTOR) * FRAME_FACTOR
        n = round(min(max(num_frames / fps * sample_fps, lo), hi) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(n, num_frames)
    if n < FRAME_FACTOR:
        raise RewardError(f"VideoAlign needs videos of at least {FRAME_FACTOR} frames, got {num_frames}")
    return torch.linspace(0, num_frames - 1, n).round().long().tolist()


def frame_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's ``smart_resize`` as the reference's video path applies it: multiples of ``factor``,
    shrunk to at most ``max_pixels`` if over it, else grown to at least ``min_pixels``."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise RewardError(f"videos of {height}x{width} are too elongated for VideoAlign (ratio > {MAX_RATIO})")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    if h < factor or w < factor:
        raise RewardError(f"videos of {height}x{width} shrink below one {factor}-pixel patch at max_pixels {max_pixels}")
    return h, w


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(F, H, W, 3)`` uint8 -> ``(F, h, w, 3)`` uint8: bicubic with antialiasing, clamped and
    rounded as torchvision's uniform-tensor resize does; unchanged when the size is the same."""
    if tuple(frames.shape[1:3]) == tuple(size):
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ------------------------------------------------------------------------------------ checkpoint

def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RewardError(f"cannot read {what} {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(data, dict):
        raise RewardError(f"{what} {path} is not a JSON object")
    return data


def find_checkpoint(model_dir: Path, step: int | None = None) -> Path:
    """``checkpoint-<step>`` of a VideoReward directory (the highest step unless ``step`` is given)."""
    steps = {}
    for d in model_dir.glob("checkpoint-*"):
        suffix = d.name.split("-", 1)[1]
        if d.is_dir() and suffix.isdigit():
            steps[int(suffix)] = d
    if not steps:
        raise RewardError(f"{model_dir} has no checkpoint-<step>/ directory (a VideoReward checkpoint holds "
                          f"checkpoint-<step>/model.pth)")
    if step is not None:
        if step not in steps:
            raise RewardError(f"{model_dir} has no checkpoint-{step}/ (has {', '.join(f'checkpoint-{s}' for s in sorted(steps))})")
        return steps[step]
    return steps[max(steps)]


def to_current_layout(key: str) -> str:
    """A state-dict key of the reference's transformers (4.45: ``model.layers...``, ``visual...``)
    in this transformers' Qwen2-VL layout (``model.language_model...``, ``model.visual...``)."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    return key


def merge_lora_state(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A PEFT LoRA model's state dict as the plain model's: ``base_model.model.`` removed, each
    ``X.base_layer.weight`` replaced by ``X.weight = base + scaling * lora_B @ lora_A`` (in float32,
    back to the stored dtype), ``X.base_layer.bias`` by ``X.bias``. A LoRA tensor without its
    partner is an error."""
    prefix = "base_model.model."
    plain = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in plain.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            module, _, leaf = key.partition(".base_layer.")
            if leaf == "weight":
                a = next((plain[n] for n in (f"{module}.lora_A.default.weight", f"{module}.lora_A.weight") if n in plain), None)
                b = next((plain[n] for n in (f"{module}.lora_B.default.weight", f"{module}.lora_B.weight") if n in plain), None)
                if a is None or b is None:
                    raise RewardError(f"the LoRA layer {module} has a base weight but no lora_A/lora_B")
                used.update(n for n in plain if n.startswith(f"{module}.lora_"))
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
            out[f"{module}.{leaf}"] = value
        else:
            out[key] = value
    stray = [k for k in plain if ".lora_" in k and k not in used]
    if stray:
        raise RewardError(f"LoRA tensors without a base layer in the checkpoint, e.g. {stray[0]}")
    return out


@register("videoalign")
class VideoAlignReward:
    """VideoAlign's VideoReward (see the module docstring).

    Options: ``model`` (a local VideoReward directory), ``base`` (the local Qwen2-VL-2B-Instruct
    directory; default ``model_config.model_name_or_path`` when that is a directory), ``weights``
    (``{vq, mq, ta}`` for ``score``, default 1 each), ``normalize`` (the release's mean/std),
    ``sample_fps`` / ``num_frames`` / ``max_pixels`` (default: the checkpoint's data_config),
    ``min_pixels`` (default 128*28*28), ``step`` (which checkpoint-<step>; default the latest),
    ``batch_size``, ``device``, ``dtype`` (``auto``: bfloat16 on CUDA as the reference runs, float32 on CPU).
    """

    default_retries = 0

    def __init__(self, model: str, base: str | None = None, weights: Mapping[str, float] | None = None,
                 normalize: bool = True, sample_fps: float | None = None, num_frames: int | None = None,
                 max_pixels: int | None = None, min_pixels: int = VIDEO_MIN_PIXELS, step: int | None = None,
                 batch_size: int = 2, device: str = "auto", dtype: str = "auto") -> None:
        root = Path(str(model)).expanduser()
        if not root.is_dir():
            raise RewardError(f"model must be a local VideoReward directory, got {str(model)!r}")
        if not (root / "model_config.json").is_file():
            raise RewardError(f"{root} is not a VideoReward checkpoint: missing model_config.json")
        cfg = read_json(root / "model_config.json", "VideoReward config")
        for section in ("data_config", "model_config"):
            if not isinstance(cfg.get(section), dict):
                raise RewardError(f"{root / 'model_config.json'} has no {section} section")
        data, mcfg = cfg["data_config"], cfg["model_config"]
        peft = cfg.get("peft_lora_config") if isinstance(cfg.get("peft_lora_config"), dict) else {}
        if mcfg.get("reward_token", "special") != "special" or not mcfg.get("use_special_tokens", True):
            raise RewardError(f"{root}: only reward_token: special checkpoints (the release) are supported, "
                              f"got reward_token {mcfg.get('reward_token')!r}")
        if data.get("sample_type", "uniform") != "uniform":
            raise RewardError(f"{root}: only data_config.sample_type: uniform (the release's) is supported, "
                              f"got {data.get('sample_type')!r}")
        self.output_dim = int(mcfg.get("output_dim", 1))
        if self.output_dim not in (1, 3):
            raise RewardError(f"{root}: model_config.output_dim must be 1 or 3, got {self.output_dim}")
        self.weights = self.component_weights(weights)
        self.normalize = bool(normalize)
        self.stats = self._stats(cfg.get("inference_config"), root) if self.normalize else None
        self.sample_fps = positive("sample_fps", sample_fps if sample_fps is not None else data.get("fps") or 2.0)
        fixed = num_frames if num_frames is not None else data.get("num_frames")
        self.num_frames = None if fixed is None else positive("num_frames", fixed, int)
        self.max_pixels = positive("max_pixels", max_pixels if max_pixels is not None
                                    else data.get("max_frame_pixels") or 240 * 320, int)
        self.min_pixels = positive("min_pixels", min_pixels, int)
        self.batch_size = positive("batch_size", batch_size, int)
        if step is not None:
            step = positive("step", step, int)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

        ckpt = find_checkpoint(root, step)
        adapter = [ckpt / "adapter_model.safetensors", ckpt / "non_lora_state_dict.pth"]
        if not (ckpt / "model.pth").is_file() and not all(f.is_file() for f in adapter):
            have = ", ".join(sorted(p.name for p in ckpt.iterdir())) or "nothing"
            raise RewardError(f"{ckpt} has no model.pth (the full reward-model state dict the release ships) nor "
                              f"adapter_model.safetensors + non_lora_state_dict.pth; has {have}")
        base_dir = self._base_dir(base, mcfg, root)
        self.path, self.base = root, base_dir
        self.packer = QwenVideoPacker(base_dir, config_names=("preprocessor_config.json",))
        self.factor = self.packer.patch_size * self.packer.merge_size           # 28 for Qwen2-VL
        self.chat_template = find_chat_template(base_dir)
        self.tokenizer = self._tokenizer(ckpt, base_dir)
        scaling = float(self._lora_scaling(peft))
        if (ckpt / "model.pth").is_file():
            state, where = self._full_state(ckpt / "model.pth", scaling), ckpt / "model.pth"
        else:
            state, where = self._adapter_state(ckpt, base_dir, scaling), ckpt
        self.model, self.rm_head = self._load_model(state, where, base_dir)

    # -------------------------------------------------------------------------------- loading

    @staticmethod
    def component_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
        """The ``weights`` option as ``{vq, mq, ta}`` -> number (default: all 1); one-line errors."""
        if weights is None:
            return {c: 1.0 for c in COMPONENTS}
        if not isinstance(weights, Mapping) or not weights:
            raise RewardError(f"weights must be a mapping of vq, mq, ta to numbers, got {weights!r}")
        out = {}
        for k, v in weights.items():
            key = str(k).lower()
            if key not in COMPONENTS:
                raise RewardError(f"weights: unknown component {k!r}; the components are vq, mq, ta")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RewardError(f"weights.{k} must be a number, got {v!r}")
            out[key] = float(v)
        return {c: out.get(c, 0.0) for c in COMPONENTS}

    @staticmethod
    def _stats(inference: Any, root: Path) -> dict[str, tuple[float, float]]:
        if not isinstance(inference, dict):
            raise RewardError(f"{root / 'model_config.json'} has no inference_config (the VQ/MQ/TA mean and std); "
                              f"use normalize: false for raw head outputs")
        out = {}
        for c in COMPONENTS:
            mean, std = inference.get(f"{c.upper()}_mean"), inference.get(f"{c.upper()}_std")
            if not isinstance(mean, (int, float)) or not isinstance(std, (int, float)) or not std > 0:
                raise RewardError(f"{root / 'model_config.json'}: inference_config lacks a usable "
                                  f"{c.upper()}_mean / {c.upper()}_std")
            out[c] = (float(mean), float(std))
        return out

    @staticmethod
    def _lora_scaling(peft: Mapping[str, Any]) -> float:
        r, alpha = peft.get("lora_r", 16), peft.get("lora_alpha", 32)
        return alpha / math.sqrt(r) if peft.get("use_rslora") else alpha / r

    @staticmethod
    def _base_dir(base: str | None, mcfg: Mapping[str, Any], root: Path) -> Path:
        named = mcfg.get("model_name_or_path")
        if base is None:
            if not named or not Path(str(named)).expanduser().is_dir():
                raise RewardError(f"{root / 'model_config.json'} names the base model {named!r}, not a local "
                                  f"directory: pass base: /path/to/Qwen2-VL-2B-Instruct")
            base = str(named)
        path = Path(str(base)).expanduser()
        for name in ("config.json", "preprocessor_config.json"):
            if not (path / name).is_file():
                raise RewardError(f"the base model directory {path} is missing {name}")
        return path

    def _tokenizer(self, ckpt: Path, base_dir: Path) -> Any:
        from transformers import AutoTokenizer

        src = ckpt / "tokenizer" if (ckpt / "tokenizer" / "tokenizer_config.json").is_file() else base_dir
        try:
            tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
        except Exception as e:
            raise RewardError(f"cannot load the tokenizer from {src}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
        missing = [t for t in REWARD_TOKENS if t not in tok.get_vocab()]
        if missing:     # the reference adds them to the base tokenizer, in this order
            tok.add_tokens(list(REWARD_TOKENS), special_tokens=True)
        self.reward_ids = [int(tok.convert_tokens_to_ids(t)) for t in REWARD_TOKENS]
        self.video_token_id = tok.convert_tokens_to_ids(VIDEO_TOKEN)
        if self.video_token_id is None or self.video_token_id == tok.unk_token_id:
            raise RewardError(f"the tokenizer of {src} has no {VIDEO_TOKEN} token")
        if tok.pad_token_id is None:
            raise RewardError(f"the tokenizer of {src} has no pad token")
        return tok

    @staticmethod
    def _load_state(path: Path) -> Mapping[str, torch.Tensor]:
        try:
            if path.suffix == ".safetensors":
                raw = load_file(path)
            else:
                raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise RewardError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        if not isinstance(raw, Mapping):
            raise RewardError(f"{path} is not a state dict")
        return raw

    def _full_state(self, path: Path, scaling: float) -> dict[str, torch.Tensor]:
        """The release's ``model.pth``: every weight of the LoRA-wrapped model, adapters merged here."""
        return {to_current_layout(k): v for k, v in merge_lora_state(self._load_state(path), scaling).items()}

    def _adapter_state(self, ckpt: Path, base_dir: Path, scaling: float) -> dict[str, torch.Tensor]:
        """The layout of the reference's training with ``save_full_model: false``: the base model's
        weights (embeddings resized to the tokenizer, as the reference does), overwritten by
        ``non_lora_state_dict.pth`` (the trained non-LoRA weights: vision tower, reward head, ...),
        plus the adapters of ``adapter_model.safetensors`` merged into their layers."""
        from transformers import Qwen2VLForConditionalGeneration

        def plain(k: str) -> str:
            return to_current_layout(k.removeprefix("base_model.model.").replace(".base_layer.", "."))

        lora = {plain(k): v for k, v in self._load_state(ckpt / "adapter_model.safetensors").items()}
        trained = {plain(k): v for k, v in self._load_state(ckpt / "non_lora_state_dict.pth").items()}
        try:
            base = Qwen2VLForConditionalGeneration.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
        except Exception as e:
            raise RewardError(f"cannot load the base model's weights from {base_dir} (an adapter checkpoint needs "
                              f"them): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        base.resize_token_embeddings(len(self.tokenizer))
        state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        del base
        state.update(trained)
        for key, a in lora.items():
            if ".lora_A." not in key:
                continue
            module, _, rest = key.partition(".lora_A.")
            b = lora.get(f"{module}.lora_B.{rest}")
            if b is None or f"{module}.weight" not in state:
                raise RewardError(f"{ckpt / 'adapter_model.safetensors'}: the LoRA layer {module} has no lora_B "
                                  f"or no base weight")
            w = state[f"{module}.weight"]
            state[f"{module}.weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
        return state

    def _load_model(self, state: dict[str, torch.Tensor], weights_file: Path, base_dir: Path
                    ) -> tuple[Any, torch.nn.Linear]:
        from transformers import AutoConfig, Qwen2VLForConditionalGeneration

        head = state.pop("rm_head.weight", None)
        if head is None:
            raise RewardError(f"{weights_file} has no rm_head.weight (the reward head)")
        if head.shape[0] != self.output_dim:
            raise RewardError(f"{weights_file}: rm_head has {head.shape[0]} outputs, model_config.output_dim is {self.output_dim}")
        embed = state.get("model.language_model.embed_tokens.weight")
        if embed is None:
            raise RewardError(f"{weights_file} has no language-model embeddings (model.embed_tokens.weight)")
        if max(self.reward_ids) >= embed.shape[0]:
            raise RewardError(f"the tokenizer's reward tokens (ids {self.reward_ids}) are outside the checkpoint's "
                              f"{embed.shape[0]} embeddings: a tokenizer from another checkpoint?")
        config = AutoConfig.from_pretrained(base_dir, local_files_only=True)
        if config.model_type != "qwen2_vl":
            raise RewardError(f"the base model {base_dir} is {config.model_type!r}; VideoReward is built on qwen2_vl")
        config.text_config.vocab_size = int(embed.shape[0])
        config.pad_token_id = self.tokenizer.pad_token_id
        try:                                   # every weight comes from model.pth: skip the random init
            from transformers.initialization import no_init_weights
        except ImportError:
            from contextlib import nullcontext as no_init_weights
        with no_init_weights():
            model = Qwen2VLForConditionalGeneration._from_config(config, dtype=self.dtype)
        if getattr(config, "tie_word_embeddings", False) or getattr(config.text_config, "tie_word_embeddings", False):
            state["lm_head.weight"] = embed                                 # tied in Qwen2-VL-2B
        else:
            state.setdefault("lm_head.weight", embed)
        result = model.load_state_dict({k: v.to(self.dtype) for k, v in state.items()}, strict=False)
        missing = [k for k in result.missing_keys if k != "lm_head.weight"]
        if missing or result.unexpected_keys:
            bad = (missing or result.unexpected_keys)[0]
            raise RewardError(f"{weights_file} does not fit the base model {base_dir}: "
                              f"{'missing' if missing else 'unexpected'} {bad} ({len(missing)} missing, "
                              f"{len(result.unexpected_keys)} unexpected)")
        rm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=self.dtype)
        with torch.no_grad():
            rm_head.weight.copy_(head.to(self.dtype))
        return model.to(self.device).eval(), rm_head.to(self.device).eval()

    # ------------------------------------------------------------------------------ inference

    def prepare_frames(self, video: torch.Tensor, fps: float) -> tuple[torch.Tensor, list[int]]:
        """One ``(F, H, W, 3)`` uint8 video -> the sampled, resized ``(n, h, w, 3)`` uint8 frames
        the image processor receives, and the frame indices."""
        idx = frame_indices(video.shape[0], fps, self.sample_fps, self.num_frames)
        size = frame_size(video.shape[1], video.shape[2], self.factor, self.min_pixels, self.max_pixels)
        return resize_frames(video[idx], size), idx

    def build_inputs(self, videos: torch.Tensor, prompts: Sequence[str], fps: float) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask``, ``pixel_values_videos``, ``video_grid_thw``."""
        patches, grids = [], []
        for video in videos.cpu():
            pv, grid = self.packer.pack(self.prepare_frames(video, fps)[0])
            patches.append(pv)
            grids.append(grid)
        enc = chat_inputs(self.tokenizer, self.chat_template, self.base,
                          [(render_prompt(p), g) for p, g in zip(prompts, grids)], VIDEO_TOKEN, "video",
                          self.packer.merge_size)
        return {**enc, "pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids, dtype=torch.long)}

    @torch.inference_mode()
    def raw_rewards(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(b, 3)`` float32 head outputs (VQ, MQ, TA) before normalisation."""
        ids = inputs["input_ids"].to(self.device)
        b, length = ids.shape
        positions = torch.arange(length, device=self.device).view(1, 1, -1).expand(3, b, -1)   # plain 1-D, as the reference
        hidden = self.model.model(input_ids=ids, attention_mask=inputs["attention_mask"].to(self.device),
                                  position_ids=positions,
                                  pixel_values_videos=inputs["pixel_values_videos"].to(self.device, self.dtype),
                                  video_grid_thw=inputs["video_grid_thw"].to(self.device)).last_hidden_state
        out = []
        for tid, token in zip(self.reward_ids, REWARD_TOKENS):
            where = ids == tid
            counts = where.sum(-1)
            if not bool((counts == 1).all()):
                raise RewardError(f"each text must hold {token} exactly once, got counts {counts.tolist()} "
                                  f"(does a prompt contain a reward token?)")
            out.append(self.rm_head(hidden[where]))                                # (b, output_dim)
        logits = torch.stack(out, dim=1)                                            # (b, 3, output_dim)
        raw = logits[..., 0] if self.output_dim == 1 else logits.diagonal(dim1=1, dim2=2)
        return raw.float().cpu()

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)
        rows = [self.raw_rewards(self.build_inputs(videos[s:s + self.batch_size], prompts[s:s + self.batch_size], fps))
                for s in range(0, videos.shape[0], self.batch_size)]
        raw = torch.cat(rows).double()
        parts = {}
        for i, c in enumerate(COMPONENTS):
            v = raw[:, i]
            if self.stats is not None:
                mean, std = self.stats[c]
                v = (v - mean) / std
            parts[c] = v
        score = sum(self.weights[c] * parts[c] for c in COMPONENTS)
        return {"score": score.float(), **{c: parts[c].float() for c in COMPONENTS}}
