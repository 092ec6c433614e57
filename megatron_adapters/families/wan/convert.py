"""diffusers WanTransformer3DModel <-> our WanModel: the key table, and loading a teacher from a folder."""

from __future__ import annotations

from pathlib import Path

from megatron_adapters.conversion import (
    Rule,
    SafetensorsReader,
    TensorReader,
    linear_rules,
    load_stage_from_diffusers,
    same_rules,
)
from megatron_adapters.families.wan.config import WanConfig

# diffusers itself ignores these when loading Wan checkpoints.
IGNORED_DIFFUSERS_KEYS = ("norm_added_q",)


def wan_rules(cfg: WanConfig) -> list[Rule]:
    """The whole table. Megatron keys on the left, diffusers on the right."""
    hd = cfg.attention_head_dim
    b, a1, a2 = "blocks.{i}", "blocks.{i}.attn1", "blocks.{i}.attn2"
    rules = [
        Rule(f"{b}.self_attention.linear_qkv.weight", tuple(f"{a1}.to_{x}.weight" for x in "qkv"), "fused", hd),
        Rule(f"{b}.self_attention.linear_qkv.bias", tuple(f"{a1}.to_{x}.bias" for x in "qkv"), "fused", hd),
        *linear_rules(f"{b}.self_attention.linear_proj", f"{a1}.to_out.0", "row"),
        Rule(f"{b}.self_attention.q_norm.weight", (f"{a1}.norm_q.weight",), "column"),
        Rule(f"{b}.self_attention.k_norm.weight", (f"{a1}.norm_k.weight",), "column"),
        *linear_rules(f"{b}.cross_attention.linear_q", f"{a2}.to_q", "column"),
        Rule(f"{b}.cross_attention.linear_kv.weight", (f"{a2}.to_k.weight", f"{a2}.to_v.weight"), "fused", hd),
        Rule(f"{b}.cross_attention.linear_kv.bias", (f"{a2}.to_k.bias", f"{a2}.to_v.bias"), "fused", hd),
        *linear_rules(f"{b}.cross_attention.linear_proj", f"{a2}.to_out.0", "row"),
        Rule(f"{b}.cross_attention.q_norm.weight", (f"{a2}.norm_q.weight",), "column"),
        Rule(f"{b}.cross_attention.k_norm.weight", (f"{a2}.norm_k.weight",), "column"),
        *linear_rules(f"{b}.mlp.linear_fc1", f"{b}.ffn.net.0.proj", "column"),
        *linear_rules(f"{b}.mlp.linear_fc2", f"{b}.ffn.net.2", "row"),
        *same_rules(f"{b}.scale_shift_table"),
        *linear_rules("patch_embedding", "patch_embedding", "replicated"),
        *linear_rules("condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_1", "replicated"),
        *linear_rules("condition_embedder.time_embedder.linear_2", "condition_embedder.time_embedder.linear_2", "replicated"),
        *linear_rules("condition_embedder.time_proj", "condition_embedder.time_proj", "replicated"),
        *linear_rules("condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_1", "replicated"),
        *linear_rules("condition_embedder.text_embedder.linear_2", "condition_embedder.text_embedder.linear_2", "replicated"),
        *linear_rules("proj_out", "proj_out", "replicated"),
        *same_rules("scale_shift_table"),
    ]
    if cfg.cross_attn_norm:
        rules += same_rules(f"{b}.norm2.weight", f"{b}.norm2.bias")
    if cfg.added_kv_proj_dim is not None:
        rules += [
            Rule(f"{b}.cross_attention.linear_added_kv.weight",
                 (f"{a2}.add_k_proj.weight", f"{a2}.add_v_proj.weight"), "fused", hd),
            Rule(f"{b}.cross_attention.linear_added_kv.bias", (f"{a2}.add_k_proj.bias", f"{a2}.add_v_proj.bias"),
                 "fused", hd),
            Rule(f"{b}.cross_attention.added_k_norm.weight", (f"{a2}.norm_added_k.weight",), "column"),
        ]
    if cfg.image_dim is not None:
        ie = "condition_embedder.image_embedder"
        rules += same_rules(f"{ie}.norm1.weight", f"{ie}.norm1.bias", f"{ie}.norm2.weight", f"{ie}.norm2.bias")
        rules += linear_rules(f"{ie}.ff.net.0.proj", f"{ie}.ff.net.0.proj", "replicated")
        rules += linear_rules(f"{ie}.ff.net.2", f"{ie}.ff.net.2", "replicated")
        if cfg.pos_embed_seq_len:
            rules += same_rules(f"{ie}.pos_embed")
    return rules


def load_from_diffusers(model, source: str | Path | TensorReader, cfg: WanConfig | None = None) -> None:
    """Fill this rank's WanModel stage from a diffusers transformer folder (or a reader).

    Only this rank's slices are read. A checkpoint with missing, unknown or mis-shaped keys is
    rejected before anything is loaded.
    """
    cfg = cfg or model.wan
    reader = source if isinstance(source, TensorReader) else SafetensorsReader(source)
    load_stage_from_diffusers(model, reader, wan_rules(cfg), model.conversion_layout(), cfg.num_layers,
                              what="Wan", ignore=IGNORED_DIFFUSERS_KEYS)
