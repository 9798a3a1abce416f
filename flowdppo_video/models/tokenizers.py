"""Small tokenizers built locally (no download), saved and loaded as ``PreTrainedTokenizerFast``.

Both follow UMT5's conventions: ``<pad>`` 0, ``</s>`` 1 (appended to every text), ``<unk>`` 2.
"""

from __future__ import annotations

from typing import Any

_SPECIALS = ["<pad>", "</s>", "<unk>"]


def _wrap(tok: Any) -> Any:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def byte_level(specials: list[str]) -> Any:
    """A ``tokenizers.Tokenizer``: ``specials`` first (ids 0, 1, ...), then one token per UTF-8 byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() order varies by process
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> Any:
    """One token per UTF-8 byte: any text, 259 symbols (tests and random demo models)."""
    return _wrap(byte_level(_SPECIALS))


def word_tokenizer(words: list[str]) -> Any:
    """One token per known word (lower-cased, split on whitespace); others are ``<unk>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(_SPECIALS)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap(tok)
