"""A tiny, randomly initialised BLIP captioner and a WordPiece tokenizer, built offline.

Used by the tests (exactness of our decoder against HF ``generate``), by ``bench/generate.py`` on CPU, and by the
trainer's CPU demo. Nothing here touches the network: the vocabulary is written in code.

The tokenizer follows BLIP's conventions: a lower-casing BERT WordPiece tokenizer whose ``[CLS]`` starts and
``[SEP]`` ends every encoded text, ``[PAD]`` is id 0, and an extra ``[DEC]`` token (the last id) is the decoder's
BOS. The vocabulary holds the special tokens, every lower-case letter and digit (plain and as a ``##`` suffix piece),
punctuation and common caption words, so any lower-case English text tokenizes without ``[UNK]``.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BOS_TOKEN = "[DEC]"

# Words frequent in action captions ("a video of a man playing guitar"); whole words keep sequences short.
CAPTION_WORDS = """
a an the of in on at to with and or is are was be being his her their its it this that there
video person people man woman men women boy girl child children kid kids someone somebody group player players
playing plays play doing does riding rides ride running runs run walking walks walk jumping jumps jump
dancing dances dance swimming swims swim throwing throws throw catching catches catch kicking kicks kick
cooking cooks cook eating eats eat drinking drinks drink cutting cuts cut climbing climbs climb singing sings
talking talks talk holding holds hold using uses use making makes make lifting lifts lift pushing pulls pull
sitting sits sit standing stands stand skiing surfing skating skateboarding biking cycling driving shooting
guitar piano drums violin ball basketball football soccer tennis golf baseball bike bicycle horse car board
water pool field room kitchen street table floor wall tree snow ice grass road stage gym park beach
up down into out over from front back side top near next while two three one some
hair face hand hands arm arms leg legs head shoes shirt dog cat food bowl knife cake bread
""".split()


def build_vocab(extra_words: Iterable[str] = ()) -> list[str]:
    """The tiny WordPiece vocabulary as a list of tokens (index = id); ``[PAD]`` is 0.

    Covers any lower-case ASCII text: each letter/digit exists both as a word start and as a ``##`` piece.
    """
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    punct = list(".,!?'\"-:;()/&")
    words = list(dict.fromkeys([*CAPTION_WORDS, *(w.lower() for w in extra_words)]))
    vocab = [*SPECIAL_TOKENS, *punct, *chars, *(f"##{c}" for c in chars)]
    seen = set(vocab)
    for w in words:
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    for suffix in ("##s", "##ing", "##ed", "##er", "##ly"):
        if suffix not in seen:
            vocab.append(suffix)
            seen.add(suffix)
    return vocab


def tiny_tokenizer(save_dir: str | os.PathLike | None = None, extra_words: Iterable[str] = ()):
    """A BLIP-style ``BertTokenizerFast`` over :func:`build_vocab`, with ``[DEC]`` as its BOS token.

    ``save_dir``: where ``vocab.txt`` and the tokenizer files go (a temporary directory when ``None``).
    """
    from transformers import BertTokenizerFast

    tmp = None
    if save_dir is None:
        tmp = tempfile.TemporaryDirectory()
        save_dir = tmp.name
    path = Path(save_dir)
    path.mkdir(parents=True, exist_ok=True)
    vocab_file = path / "vocab.txt"
    tokens = build_vocab(extra_words)
    vocab_file.write_text("\n".join(tokens) + "\n")
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    else:
        tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    tok.add_special_tokens({"bos_token": BOS_TOKEN})
    if tmp is not None:
        tmp.cleanup()
    return tok


def tiny_blip(save_dir: str | os.PathLike | None = None, seed: int = 0, vocab: Iterable[str] = (), *,
              image_size: int = 32, patch_size: int = 8, vision_hidden: int = 32, vision_layers: int = 2,
              text_hidden: int = 32, text_layers: int = 2, num_heads: int = 2, init_std: float = 0.2):
    """Build a tiny random-init ``BlipForConditionalGeneration`` and its tokenizer, offline.

    Args:
        save_dir: if given, the model (``config.json`` + safetensors) and the tokenizer are saved there with HF
            ``save_pretrained``, so ``GARModel.from_pretrained(save_dir)`` / ``BlipForConditionalGeneration
            .from_pretrained(save_dir)`` load them.
        seed: seeds the weight initialisation (same seed → same weights).
        vocab: extra whole words added to the WordPiece vocabulary.
        init_std: std of the random weights. Larger than BLIP's 0.02 so a random model's logits are well separated
            (argmax/top-k do not hinge on rounding noise; exactness tests rely on it).

    Returns:
        ``(model, tokenizer)``: the model in eval mode, fp32, on CPU.
    """
    from transformers import BlipConfig, BlipForConditionalGeneration

    tok = tiny_tokenizer(save_dir, extra_words=vocab)
    vocab_size = len(tok)
    text_cfg = dict(
        vocab_size=vocab_size, hidden_size=text_hidden, encoder_hidden_size=vision_hidden,
        intermediate_size=2 * text_hidden, num_hidden_layers=text_layers, num_attention_heads=num_heads,
        max_position_embeddings=64, initializer_range=init_std,
        bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
    )
    vision_cfg = dict(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size, initializer_range=init_std,
    )
    config = BlipConfig(text_config=text_cfg, vision_config=vision_cfg, initializer_range=init_std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    model.eval()
    if save_dir is not None:
        from rest_fast.atomic_io import new_files_follow_umask

        Path(save_dir).mkdir(parents=True, exist_ok=True)
        with new_files_follow_umask(save_dir):  # safetensors writes model.safetensors 0600
            model.save_pretrained(save_dir)
            tok.save_pretrained(save_dir)
    return model, tok
