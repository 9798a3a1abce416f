"""Tiny randomly initialised vision-language checkpoints, built offline for tests.

:func:`build_tiny_qwen2_vl` writes a directory that loads exactly as a real Qwen2-VL /
Qwen2.5-VL checkpoint does (``AutoProcessor`` + ``AutoModelForImageTextToText``, local files
only): a two-layer ``Qwen2VLForConditionalGeneration`` (or ``Qwen2_5_VLForConditionalGeneration``)
with a one-block vision tower, a word-level tokenizer with the Qwen special tokens and the
Qwen chat template, the Qwen2-VL image processor and a ``video_preprocessor_config.json``.
Nothing is downloaded. :func:`build_tiny_clip` does the same for a CLIP model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
