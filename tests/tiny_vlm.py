"""Tiny randomly initialised vision-language checkpoints, built offline for tests.

:func:`build_tiny_qwen2_vl` writes a directory that loads exactly as a real Qwen2-VL /
Qwen2.5-VL checkpoint does (``AutoProcessor`` + ``AutoModelForImageTextToText``, local files
only): a two-layer ``Qwen2VLForConditionalGeneration`` (or ``Qwen2_5_VLForConditionalGeneration``)
with a one-block vision tower, a word-level tokenizer with the Qwen special tokens and the
Qwen chat template, the Qwen2-VL image processor and a ``video_preprocessor_config.json``.
Nothing is downloaded. :func:`build_tiny_clip` does the same for a CLIP model, and
:func:`build_tiny_videoreward` writes VideoAlign's VideoReward in its release's layout on top of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rewards.videoalign import REWARD_TOKENS

# The Qwen-VL chat template, reduced to what a judge needs (system-less, text + image/video parts).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]

# Enough words for the judge questions and the test prompts; anything else maps to [UNK].
WORDS = ("Yes No 1 2 3 4 5 Does Is Answer Rate How user assistant system or yes no a an the of is are does do this video show shows match matches "
         "description prompt answer rate rating from to with only one word number quality visual "
         "motion smooth natural text alignment well how good on scale where and frames clear "
         "red blue green yellow circle square triangle moves left right up down slowly quickly "
         "black white cat dog runs park ? . , : ' \" - ( ) = [UNK]").split()


def build_word_tokenizer(words: list[str], special: list[str], pad: str, unk: str = "[UNK]",
                         chat_template: str | None = None, **special_map: str):
    """A ``PreTrainedTokenizerFast`` over a word vocabulary (whitespace and punctuation split),
    with ``special`` as added special tokens. Returns the tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([unk, *words]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, pad_token=pad,
                                   additional_special_tokens=[s for s in special if s != pad], **special_map)
    fast.add_special_tokens({"pad_token": pad})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_tiny_qwen2_vl(path: str | Path, family: str = "qwen2_vl", seed: int = 0, patch_size: int = 4,
                        min_pixels: int = 8 * 8, max_pixels: int = 32 * 32) -> Path:
    """Write a tiny random Qwen2-VL (``family="qwen2_vl"``) or Qwen2.5-VL (``"qwen2_5_vl"``)
    checkpoint with its processor to ``path``; returns ``path``.

    Vision: patch ``patch_size``, merge 2, temporal patch 2, one block. Text: hidden 64, two
    layers. Videos of 32x32 frames become 8x8 patches per temporal step (16 LM tokens).
    """
    from transformers import Qwen2VLImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_word_tokenizer(WORDS, QWEN_SPECIAL, pad="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE,
                               eos_token="<|im_end|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIAL}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=patch_size,
                      spatial_merge_size=2, temporal_patch_size=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **common))
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                      patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[0], tokens_per_second=2)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                     **common))
    else:
        raise ValueError(f"unknown tiny VLM family {family!r}")
    model.save_pretrained(path)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessorPil(size=size, patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    # The processor's parts as a real checkpoint ships them (Qwen2VLProcessor itself cannot be
    # built without torchvision, which its video processor needs).
    image_processor.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}))
    video_cfg = {"video_processor_type": "Qwen2VLVideoProcessor", "size": size, "patch_size": patch_size,
                 "temporal_patch_size": 2, "merge_size": 2, "image_mean": list(image_processor.image_mean),
                 "image_std": list(image_processor.image_std), "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "processor_class": "Qwen2VLProcessor"}
    (path / "video_preprocessor_config.json").write_text(json.dumps(video_cfg, indent=2))
    return path


def build_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny random CLIP (``CLIPModel``, hidden 32, one layer per tower, projection 16) with
    a word-level tokenizer (``<|startoftext|> ... <|endoftext|>`` added to every text) and the
    CLIP image processor (resize and crop to ``image_size``) to ``path``; returns ``path``."""
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = build_word_tokenizer(WORDS, [bos, eos], pad=eos, bos_token=bos, eos_token=eos)
    bos_id, eos_id = tok.convert_tokens_to_ids(bos), tok.convert_tokens_to_ids(eos)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, bos_id), (eos, eos_id)])
    tok.model_max_length = 16
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return path


# ------------------------------------------------ VideoAlign's VideoReward, in its release's layout

STATS = {"VQ_mean": 0.3, "VQ_std": 2.0, "MQ_mean": -0.2, "MQ_std": 0.5, "TA_mean": 0.1, "TA_std": 4.0}
MAX_PIXELS = 16 * 32          # data_config.max_frame_pixels of the tiny checkpoint (stage-1 cap)
MIN_PIXELS = 64               # the tiny model's stand-in for the reference's 128*28*28 floor


def to_445_layout(key: str) -> str:
    """This transformers' Qwen2-VL key as transformers 4.45 (the reference's) named it."""
    return (key.replace("base_model.model.model.language_model.", "base_model.model.model.")
               .replace("base_model.model.model.visual.", "base_model.model.visual."))


def build_tiny_videoreward(tmp: Path) -> tuple[Path, Path, Any, Any]:
    """``tmp/VideoReward`` (the release's layout, base model in ``tmp/base``): ``(root, base,
    peft_model, tokenizer)``. Score it with ``min_pixels=MIN_PIXELS`` (its frames are tiny)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    base = build_tiny_qwen2_vl(tmp / "base", min_pixels=8 * 8, max_pixels=64 * 64)
    (base / "video_preprocessor_config.json").unlink()     # 2024's Qwen2-VL ships preprocessor_config.json only
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(list(REWARD_TOKENS), special_tokens=True)
    torch.manual_seed(1)
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    model.resize_token_embeddings(len(tok))
    model.rm_head = torch.nn.Linear(64, 1, bias=False)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not any(x in n for x in ("lm_head", "rm_head", "embed_tokens", "visual"))]
    pm = get_peft_model(model, LoraConfig(target_modules=targets, r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
                                          task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)                          # a trained adapter: not the zero init
    pm.eval()
    root = tmp / "VideoReward"
    ckpt = root / "checkpoint-7"
    (ckpt / "tokenizer").mkdir(parents=True)
    (root / "checkpoint-3").mkdir()                        # an older step: the latest is used
    torch.save({to_445_layout(k): v.clone() for k, v in pm.state_dict().items()}, ckpt / "model.pth")
    tok.save_pretrained(ckpt / "tokenizer")
    cfg = {"data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": MAX_PIXELS, "sample_type": "uniform",
                           "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special"},
           "training_args": {}, "model_config": {"model_name_or_path": str(base), "output_dim": 1,
                                                 "use_special_tokens": True, "reward_token": "special"},
           "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
           "inference_config": STATS}
    (root / "model_config.json").write_text(json.dumps(cfg))
    return root, base, pm, tok
