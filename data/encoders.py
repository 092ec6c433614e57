"""Text encoders that turn prompts into the embeddings the diffusers pipelines would compute.

The teacher was trained (and will be sampled) with the pipelines' own prompt encoding, so the shards
must hold exactly that: these classes follow ``WanPipeline._get_t5_prompt_embeds`` and
``QwenImagePipeline._get_qwen_prompt_embeds`` / ``encode_prompt`` (diffusers 0.42) step by step, and
``tests/test_data_encoders.py`` compares them with the pipelines on tiny models. Each embedding is
returned trimmed to its true length; padding is the loader's job.

``--encoder-path`` layouts accepted by :func:`resolve_encoder_path`:

1. a diffusers pipeline folder (``model_index.json``, ``tokenizer/``, ``text_encoder/``), e.g. a local
   copy of ``Wan-AI/Wan2.2-T2V-A14B-Diffusers`` or ``Qwen/Qwen-Image``;
2. one folder holding both the tokenizer files and the encoder (``config.json`` + weights), e.g. a
   local copy of ``google/umt5-xxl`` or ``Qwen/Qwen2.5-VL-7B-Instruct``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

# Copied from QwenImagePipeline.__init__ (diffusers 0.42); a test checks they still agree.
QWEN_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_DROP_IDX = 34  # prompt_template_encode_start_idx: the template's system part, in tokens
QWEN_TOKENIZER_MAX_LENGTH = 1024  # tokenizer_max_length; encode_prompt rejects max_sequence_length above it

ENCODER_MODEL = {"umt5": "wan", "qwen2.5-vl": "qwen-image"}  # encoder name -> model kind it serves
DEFAULT_MAX_LENGTH = {"umt5": 512, "qwen2.5-vl": 1024}  # the pipelines' __call__ defaults
DEFAULT_NEGATIVE = {"umt5": "", "qwen2.5-vl": " "}  # WanPipeline's default; QwenImage's documented " "
_MODEL_TYPE = {"umt5": "umt5", "qwen2.5-vl": "qwen2_5_vl"}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    """``bf16``/``fp32`` (or the long names) to a torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported: use bf16 or fp32")
    return DTYPES[name]


class PromptEncoder(ABC):
    """A tokenizer + text encoder pair producing one trimmed ``[L, D]`` embedding per prompt (on CPU)."""

    name: str = ""

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.max_length = int(max_length or DEFAULT_MAX_LENGTH[self.name])
        if self.max_length < 1:
            raise ValueError(f"max_length must be positive, got {self.max_length}")

    @property
    def model(self) -> str:
        """The model kind (``wan`` or ``qwen-image``) whose pipeline this encoding reproduces."""
        return ENCODER_MODEL[self.name]

    @property
    def dtype(self) -> torch.dtype:
        """Embeddings come out in the encoder's dtype, as in the pipelines."""
        return self.text_encoder.dtype

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @abstractmethod
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Encode a batch; returns one contiguous CPU tensor ``[L_i, D]`` per prompt, trimmed."""

    def info(self) -> dict[str, Any]:
        """What the index records about how embeddings were made."""
        return {"encoder": self.name, "model": self.model, "max_length": self.max_length}


class UMT5PromptEncoder(PromptEncoder):
    """Wan: ``WanPipeline._get_t5_prompt_embeds`` (prompt_clean, pad to max_length, last_hidden_state)."""

    name = "umt5"

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # the pipeline's own cleaning (ftfy)

        text = [prompt_clean(p) for p in prompts]
        tok = self.tokenizer(text, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        seq_lens = tok.attention_mask.gt(0).sum(dim=1).long()
        hidden = self.text_encoder(tok.input_ids.to(self.device), tok.attention_mask.to(self.device)).last_hidden_state
        hidden = hidden.to(dtype=self.dtype, device="cpu")
        return [u[:n].clone() for u, n in zip(hidden, seq_lens.tolist())]

    def info(self) -> dict[str, Any]:
        from diffusers.utils import is_ftfy_available

        return {**super().info(), "padding": "max_length", "text_cleaning": "wan.prompt_clean",
                "ftfy": bool(is_ftfy_available())}


class QwenImagePromptEncoder(PromptEncoder):
    """Qwen-Image: ``QwenImagePipeline._get_qwen_prompt_embeds`` then ``encode_prompt``'s truncation."""

    name = "qwen2.5-vl"

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, max_length: int | None = None):
        super().__init__(tokenizer, text_encoder, max_length)
        if self.max_length > QWEN_TOKENIZER_MAX_LENGTH:
            raise ValueError(f"max_length {self.max_length} is above {QWEN_TOKENIZER_MAX_LENGTH}, the most "
                             "QwenImagePipeline accepts: pass --max-length 1024 or less")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        text = [QWEN_TEMPLATE.format(p) for p in prompts]
        tok = self.tokenizer(text, max_length=QWEN_TOKENIZER_MAX_LENGTH + QWEN_DROP_IDX, padding=True,
                             truncation=True, return_tensors="pt")
        out = self.text_encoder(input_ids=tok.input_ids.to(self.device),
                                attention_mask=tok.attention_mask.to(self.device), output_hidden_states=True)
        hidden = out.hidden_states[-1]
        mask = tok.attention_mask.to(hidden.device).bool()  # _extract_masked_hidden: split by mask
        split = torch.split(hidden[mask], mask.sum(dim=1).tolist(), dim=0)
        # drop the template prefix, then encode_prompt's prompt_embeds[:, :max_sequence_length]
        return [e[QWEN_DROP_IDX:][: self.max_length].to(dtype=self.dtype, device="cpu").clone() for e in split]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "padding": "longest", "template": QWEN_TEMPLATE, "drop_idx": QWEN_DROP_IDX,
                "tokenizer_max_length": QWEN_TOKENIZER_MAX_LENGTH, "hidden_state": -1}


ENCODER_CLASSES: dict[str, type[PromptEncoder]] = {c.name: c for c in (UMT5PromptEncoder, QwenImagePromptEncoder)}


def resolve_encoder_path(path: str | Path) -> tuple[Path, Path]:
    """Find (tokenizer dir, text encoder dir) in a pipeline folder or a single model folder."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--encoder-path {p} is not a directory: pass a local diffusers pipeline folder "
                                "(with tokenizer/ and text_encoder/) or a folder holding both tokenizer and model")
    if (p / "tokenizer").is_dir() and (p / "text_encoder").is_dir():
        return p / "tokenizer", p / "text_encoder"
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")
    if (p / "config.json").is_file() and any((p / f).is_file() for f in tokenizer_files):
        return p, p
    raise FileNotFoundError(
        f"--encoder-path {p} has neither tokenizer/ + text_encoder/ subfolders (a diffusers pipeline folder) nor "
        "config.json + tokenizer files (a transformers model folder); see docs/data.md for the layouts")


def load_prompt_encoder(encoder: str, path: str | Path, *, dtype: str = "bf16", device: str | None = None,
                        max_length: int | None = None) -> PromptEncoder:
    """Load the tokenizer and text encoder named by ``encoder`` (umt5 | qwen2.5-vl) from a LOCAL path."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration, UMT5EncoderModel

    if encoder not in ENCODER_CLASSES:
        raise ValueError(f"unknown encoder {encoder!r}: use one of {sorted(ENCODER_CLASSES)}")
    tok_dir, te_dir = resolve_encoder_path(path)
    model_type = getattr(AutoConfig.from_pretrained(te_dir), "model_type", None)
    if model_type != _MODEL_TYPE[encoder]:
        raise ValueError(f"the text encoder in {te_dir} is a {model_type!r} model, but --encoder {encoder} needs "
                         f"a {_MODEL_TYPE[encoder]!r} one: check --encoder and --encoder-path")
    model_cls = UMT5EncoderModel if encoder == "umt5" else Qwen2_5_VLForConditionalGeneration
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    text_encoder = model_cls.from_pretrained(te_dir, dtype=parse_dtype(dtype)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return ENCODER_CLASSES[encoder](tokenizer, text_encoder, max_length)
