"""Tiny random text encoders with in-memory tokenizers: the demo's prompt encoder, and the tests' reference.

No hub access: tokenizers are built from the shipped prompt list (plus the Qwen-Image template), models
from tiny configs with seeded random weights. Both tokenizers are real tokenizer classes of the kind
the pipelines load (T5Tokenizer with a Unigram vocabulary, Qwen2Tokenizer with byte-level BPE), and the
Qwen one splits the Qwen-Image template's system part into exactly 34 tokens, as the real one does, so
the pipeline's ``drop_idx = 34`` drops what it drops in production.

``save_tiny_encoder(kind, dir, layout)`` writes a local ``--encoder-path``: ``layout="pipeline"`` is a
diffusers pipeline folder saved by the pipeline itself, ``layout="model"`` one folder with both parts.
Building takes well under a second; ``tiny_pipeline`` gives the diffusers pipeline used as the reference.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from data.encoders import QWEN_TEMPLATE
from data.prompts import demo_prompts_path

UMT5_DIM = 24
QWEN_DIM = 32


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    lines = demo_prompts_path().read_text(encoding="utf-8").splitlines()
    return (QWEN_TEMPLATE.replace("{}", ""), *lines, "a very long prompt about many things")


def tiny_t5_tokenizer():
    """A T5Tokenizer (Unigram) over the corpus words; unknown characters become <unk>, as with a real vocab."""
    from transformers import T5Tokenizer

    words = sorted({w for line in _corpus() for w in re.findall(r"\w+|[^\w\s]", line)})
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -5.0) for w in words] + [(w, -6.0) for w in words] + [(c, -10.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_qwen_tokenizer():
    """A Qwen2Tokenizer whose byte-level BPE merges are trained on the corpus (every corpus word one token)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([  # the same pre-tokenization as Qwen2Tokenizer
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=5000, min_frequency=1, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tok


def tiny_umt5_model(vocab_size: int, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=vocab_size, d_model=UMT5_DIM, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)
    torch.manual_seed(seed)
    return UMT5EncoderModel(cfg).eval()


def tiny_qwen25vl_model(vocab_size: int, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=QWEN_DIM, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=2,  # <|endoftext|>, <|im_end|> of tiny_qwen_tokenizer
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=QWEN_DIM,
                           fullatt_block_indexes=[0]),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_parts(kind: str, seed: int = 0):
    """(tokenizer, text_encoder) for ``umt5`` or ``qwen2.5-vl``."""
    if kind == "umt5":
        tok = tiny_t5_tokenizer()
        return tok, tiny_umt5_model(len(tok), seed)
    if kind == "qwen2.5-vl":
        tok = tiny_qwen_tokenizer()
        return tok, tiny_qwen25vl_model(len(tok), seed)
    raise ValueError(kind)


def tiny_pipeline(kind: str, tokenizer, text_encoder):
    """The diffusers pipeline (no transformer, no VAE) whose encode_prompt is the reference."""
    from diffusers import QwenImagePipeline, WanPipeline

    if kind == "umt5":
        return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=None)
    return QwenImagePipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=None,
                             transformer=None)


def save_tiny_encoder(kind: str, out_dir: str | Path, layout: str = "pipeline", seed: int = 0) -> Path:
    """Write a tiny encoder as a local ``--encoder-path`` and return that path."""
    out_dir = Path(out_dir)
    tokenizer, text_encoder = tiny_parts(kind, seed)
    if layout == "pipeline":
        tiny_pipeline(kind, tokenizer, text_encoder).save_pretrained(out_dir)
    elif layout == "model":
        tokenizer.save_pretrained(out_dir)
        text_encoder.save_pretrained(out_dir)
    else:
        raise ValueError(layout)
    return out_dir
