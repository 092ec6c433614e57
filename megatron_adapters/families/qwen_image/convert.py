"""diffusers QwenImageTransformer2DModel <-> our QwenImageModel: the key table, and loading a teacher
from a local diffusers folder."""

from __future__ import annotations

from pathlib import Path

from megatron_adapters.conversion import (
    Rule,
    SafetensorsReader,
    TensorReader,
    fused_linear_rules,
    linear_rules,
    load_stage_from_diffusers,
    same_rules,
)
from megatron_adapters.families.qwen_image.config import QwenImageConfig


def qwen_image_rules(cfg: QwenImageConfig) -> list[Rule]:
    """The whole table. Megatron keys on the left, diffusers on the right."""
    hd = cfg.attention_head_dim
    b, t, a = "blocks.{i}", "transformer_blocks.{i}", "transformer_blocks.{i}.attn"
    m = f"{b}.attention"
    return [
        # adaLN modulation, D -> 6D: output rows split over TP, gathered in the layer.
        *linear_rules(f"{b}.img_mod", f"{t}.img_mod.1", "column"),
        *linear_rules(f"{b}.txt_mod", f"{t}.txt_mod.1", "column"),
        *fused_linear_rules(f"{m}.linear_qkv", tuple(f"{a}.to_{x}" for x in "qkv"), hd),
        *fused_linear_rules(f"{m}.linear_added_qkv", tuple(f"{a}.add_{x}_proj" for x in "qkv"), hd),
        *linear_rules(f"{m}.linear_proj", f"{a}.to_out.0", "row"),
        *linear_rules(f"{m}.linear_added_proj", f"{a}.to_add_out", "row"),
        # Per-head RMSNorm weights [head_dim]: the same on every TP rank.
        Rule(f"{m}.q_layernorm.weight", (f"{a}.norm_q.weight",), "replicated"),
        Rule(f"{m}.k_layernorm.weight", (f"{a}.norm_k.weight",), "replicated"),
        Rule(f"{m}.added_q_layernorm.weight", (f"{a}.norm_added_q.weight",), "replicated"),
        Rule(f"{m}.added_k_layernorm.weight", (f"{a}.norm_added_k.weight",), "replicated"),
        *linear_rules(f"{b}.img_mlp.linear_fc1", f"{t}.img_mlp.net.0.proj", "column"),
        *linear_rules(f"{b}.img_mlp.linear_fc2", f"{t}.img_mlp.net.2", "row"),
        *linear_rules(f"{b}.txt_mlp.linear_fc1", f"{t}.txt_mlp.net.0.proj", "column"),
        *linear_rules(f"{b}.txt_mlp.linear_fc2", f"{t}.txt_mlp.net.2", "row"),
        # Outside the blocks every name is diffusers' own and every tensor replicated.
        *linear_rules("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_1",
                      "replicated"),
        *linear_rules("time_text_embed.timestep_embedder.linear_2", "time_text_embed.timestep_embedder.linear_2",
                      "replicated"),
        *same_rules("txt_norm.weight"),
        *linear_rules("img_in", "img_in", "replicated"),
        *linear_rules("txt_in", "txt_in", "replicated"),
        *linear_rules("norm_out.linear", "norm_out.linear", "replicated"),
        *linear_rules("proj_out", "proj_out", "replicated"),
    ]


def load_from_diffusers(model, source: str | Path | TensorReader, cfg: QwenImageConfig | None = None) -> None:
    """Fill this rank's QwenImageModel stage from a diffusers transformer folder (or a reader).

    Only this rank's slices are read. A checkpoint with missing, unknown or mis-shaped keys is
    rejected, naming the key, before anything is loaded.
    """
    cfg = cfg or model.qwen
    reader = source if isinstance(source, TensorReader) else SafetensorsReader(source)
    load_stage_from_diffusers(model, reader, qwen_image_rules(cfg), model.conversion_layout(), cfg.num_layers,
                              what="Qwen-Image")
