"""Architecture arithmetic for ``pdmd plan``: parameter tensors, forward FLOPs and saved activations of
the Wan2.x and Qwen-Image DiTs as our Megatron modules build them, from numbers alone.

Why a separate module: the planner must run on a laptop before any GPU is rented and before the
teacher is downloaded, so nothing here imports megatron or builds a model. The formulas follow our own
layer code (megatron_adapters/families/wan/layer.py, megatron_adapters/families/qwen_image/layer.py) tensor by tensor;
tests/test_plan.py checks the parameter counts against diffusers' models (meta device), the FLOPs
against torch's FlopCounterMode and the activation bytes against what autograd saves in tiny runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pdmd.core.pipeline_split import pipeline_split

# Split of a tensor over tensor-parallel ranks: "col" (output features/heads), "row" (input features,
# Row-parallel weights), "rep" (replicated on every TP rank).
SPLITS = ("col", "row", "rep")
# Where a tensor lives under pipeline parallelism: in every block, on the first stage ("pre"), on the
# last ("post"), or on every stage ("cond": the condition embedders each stage computes itself).
PLACES = ("block", "pre", "post", "cond")


@dataclass(frozen=True)
class Arch:
    """One DiT expert's shape (a diffusers config.json's numbers, or a preset's)."""

    name: str
    kind: str  # "wan" | "qwen-image"
    layers: int
    heads: int
    head_dim: int
    ffn: int
    in_channels: int
    out_channels: int
    patch: tuple[int, int, int]  # (t, h, w); Qwen-Image (1, 2, 2): 2x2 packed latents
    text_dim: int
    freq_dim: int = 256
    image_dim: int | None = None  # Wan2.1-style CLIP image context (not Wan2.2 A14B)
    image_tokens: int = 257
    cross_attn_norm: bool = True

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch)

    def tokens(self, latent_shape: list[int] | tuple[int, ...]) -> int:
        """Image/video tokens of one sample with latents [C, F, H, W]."""
        _, f, h, w = latent_shape
        pt, ph, pw = self.patch
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent shape {list(latent_shape)} does not divide into patches {self.patch}")
        return (f // pt) * (h // ph) * (w // pw)


# Presets, checked against /work/shared/DIFFUSERS_FACTS.md and diffusers' configs (tests/test_plan.py builds
# each on the meta device and compares parameter counts: 14.29B, 4.999B, 20.43B).
PRESETS: dict[str, Arch] = {
    "wan2.2-t2v-a14b": Arch("Wan2.2-T2V-A14B expert", "wan", layers=40, heads=40, head_dim=128, ffn=13824,
                            in_channels=16, out_channels=16, patch=(1, 2, 2), text_dim=4096),
    "wan2.2-i2v-a14b": Arch("Wan2.2-I2V-A14B expert", "wan", layers=40, heads=40, head_dim=128, ffn=13824,
                            in_channels=36, out_channels=16, patch=(1, 2, 2), text_dim=4096),
    "wan2.2-ti2v-5b": Arch("Wan2.2-TI2V-5B", "wan", layers=30, heads=24, head_dim=128, ffn=14336,
                           in_channels=48, out_channels=48, patch=(1, 2, 2), text_dim=4096),
    "qwen-image": Arch("Qwen-Image", "qwen-image", layers=60, heads=24, head_dim=128, ffn=4 * 3072,
                       in_channels=64, out_channels=16, patch=(1, 2, 2), text_dim=3584),
}


def arch_from_diffusers(path: str | Path, name: str | None = None) -> Arch:
    """An Arch from a diffusers transformer folder (or its config.json), Wan or Qwen-Image."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    raw: dict[str, Any] = json.loads(path.read_text())
    cls = raw.get("_class_name", "")
    label = name or path.parent.name
    if cls == "QwenImageTransformer2DModel" or "joint_attention_dim" in raw:
        heads, hd = raw.get("num_attention_heads", 24), raw.get("attention_head_dim", 128)
        p = raw.get("patch_size", 2)
        return Arch(label, "qwen-image", layers=raw.get("num_layers", 60), heads=heads, head_dim=hd,
                    ffn=4 * heads * hd, in_channels=raw.get("in_channels", 64),
                    out_channels=raw.get("out_channels", 16), patch=(1, p, p),
                    text_dim=raw.get("joint_attention_dim", 3584))
    base = PRESETS["wan2.2-t2v-a14b"]  # diffusers' WanTransformer3DModel defaults are the A14B expert's
    return replace(
        base, name=label, layers=raw.get("num_layers", base.layers), heads=raw.get("num_attention_heads", base.heads),
        head_dim=raw.get("attention_head_dim", base.head_dim), ffn=raw.get("ffn_dim", base.ffn),
        in_channels=raw.get("in_channels", base.in_channels),
        out_channels=raw.get("out_channels") or raw.get("in_channels", base.out_channels),
        patch=tuple(raw.get("patch_size", base.patch)), text_dim=raw.get("text_dim", base.text_dim),
        freq_dim=raw.get("freq_dim", base.freq_dim), image_dim=raw.get("image_dim"),
        image_tokens=2 * 257 if raw.get("pos_embed_seq_len") else 257,
        cross_attn_norm=raw.get("cross_attn_norm", True))


# -- parameters --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamTensor:
    name: str
    numel: int
    split: str  # SPLITS
    place: str  # PLACES
    fp32: bool = False  # kept in fp32 whatever the model dtype (none today: our norms use the model dtype)


def _linear(name: str, fan_in: int, fan_out: int, split: str, place: str = "block") -> list[ParamTensor]:
    """Weight and bias of a linear; a Row-parallel bias is replicated (added after the reduce)."""
    bias_split = "rep" if split == "row" else split
    return [ParamTensor(f"{name}.weight", fan_in * fan_out, split, place),
            ParamTensor(f"{name}.bias", fan_out, bias_split, place)]


def param_tensors(arch: Arch) -> list[ParamTensor]:
    """Every parameter tensor of one expert as our Megatron model holds it (per block: one block's)."""
    d, f = arch.hidden, arch.ffn
    if arch.kind == "qwen-image":
        out: list[ParamTensor] = []
        for stream, qkv, proj in (("img", "attention.linear_qkv", "attention.linear_proj"),
                                  ("txt", "attention.linear_added_qkv", "attention.linear_added_proj")):
            out += _linear(f"{stream}_mod", d, 6 * d, "col")  # Column-parallel, output gathered
            out += _linear(qkv, d, 3 * d, "col") + _linear(proj, d, d, "row")
            out += _linear(f"{stream}_mlp.linear_fc1", d, f, "col") + _linear(f"{stream}_mlp.linear_fc2", f, d, "row")
        out += [ParamTensor(f"attention.{n}.weight", arch.head_dim, "rep", "block")
                for n in ("q_layernorm", "k_layernorm", "added_q_layernorm", "added_k_layernorm")]
        out += _linear("img_in", arch.in_channels, d, "rep", "pre")
        out += [ParamTensor("txt_norm.weight", arch.text_dim, "rep", "pre")]
        out += _linear("txt_in", arch.text_dim, d, "rep", "pre")
        out += _linear("time_text_embed.linear_1", 256, d, "rep", "cond")
        out += _linear("time_text_embed.linear_2", d, d, "rep", "cond")
        out += _linear("norm_out.linear", d, 2 * d, "rep", "post")
        out += _linear("proj_out", d, arch.patch_volume * arch.out_channels, "rep", "post")
        return out
    out = _linear("self_attention.linear_qkv", d, 3 * d, "col") + _linear("self_attention.linear_proj", d, d, "row")
    out += [ParamTensor(f"self_attention.{n}.weight", d, "col", "block") for n in ("q_norm", "k_norm")]
    out += _linear("cross_attention.linear_q", d, d, "col") + _linear("cross_attention.linear_kv", d, 2 * d, "col")
    out += _linear("cross_attention.linear_proj", d, d, "row")
    out += [ParamTensor(f"cross_attention.{n}.weight", d, "col", "block") for n in ("q_norm", "k_norm")]
    if arch.image_dim:
        out += _linear("cross_attention.linear_added_kv", d, 2 * d, "col")
        out += [ParamTensor("cross_attention.added_k_norm.weight", d, "col", "block")]
    if arch.cross_attn_norm:
        out += [ParamTensor("norm2.weight", d, "rep", "block"), ParamTensor("norm2.bias", d, "rep", "block")]
    out += _linear("mlp.linear_fc1", d, f, "col") + _linear("mlp.linear_fc2", f, d, "row")
    out += [ParamTensor("scale_shift_table", 6 * d, "rep", "block")]
    out += _linear("patch_embedding", arch.in_channels * arch.patch_volume, d, "rep", "pre")
    out += _linear("condition_embedder.time_embedder.linear_1", arch.freq_dim, d, "rep", "cond")
    out += _linear("condition_embedder.time_embedder.linear_2", d, d, "rep", "cond")
    out += _linear("condition_embedder.time_proj", d, 6 * d, "rep", "cond")
    out += _linear("condition_embedder.text_embedder.linear_1", arch.text_dim, d, "rep", "cond")
    out += _linear("condition_embedder.text_embedder.linear_2", d, d, "rep", "cond")
    if arch.image_dim:
        img = arch.image_dim
        out += [ParamTensor("condition_embedder.image_embedder.norm1", 2 * img, "rep", "cond")]
        out += _linear("condition_embedder.image_embedder.ff.0", img, img, "rep", "cond")
        out += _linear("condition_embedder.image_embedder.ff.2", img, d, "rep", "cond")
        out += [ParamTensor("condition_embedder.image_embedder.norm2", 2 * d, "rep", "cond")]
    out += _linear("proj_out", d, arch.out_channels * arch.patch_volume, "rep", "post")
    out += [ParamTensor("scale_shift_table_out", 2 * d, "rep", "post")]
    return out


def lora_tensors(arch: Arch, rank: int, targets: tuple[str, ...] | list[str]) -> list[ParamTensor]:
    """Adapters of megatron_adapters/layers/lora.py: Column base -> A [r, in] replicated, B [out, r] split;
    Row base -> A [r, in] split, B [out, r] replicated. One block's worth (place "block")."""
    d, f = arch.hidden, arch.ffn
    if arch.kind == "qwen-image":
        linears = [("attention.linear_qkv", d, 3 * d, "col"), ("attention.linear_added_qkv", d, 3 * d, "col"),
                   ("attention.linear_proj", d, d, "row"), ("attention.linear_added_proj", d, d, "row"),
                   ("img_mlp.linear_fc1", d, f, "col"), ("img_mlp.linear_fc2", f, d, "row"),
                   ("txt_mlp.linear_fc1", d, f, "col"), ("txt_mlp.linear_fc2", f, d, "row")]
    else:
        linears = [("self_attention.linear_qkv", d, 3 * d, "col"), ("self_attention.linear_proj", d, d, "row"),
                   ("cross_attention.linear_q", d, d, "col"), ("cross_attention.linear_kv", d, 2 * d, "col"),
                   ("cross_attention.linear_proj", d, d, "row"), ("mlp.linear_fc1", d, f, "col"),
                   ("mlp.linear_fc2", f, d, "row")]
    out = []
    for name, fan_in, fan_out, split in linears:
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        out.append(ParamTensor(f"{name}.lora_A", rank * fan_in, "rep" if split == "col" else "col", "block"))
        out.append(ParamTensor(f"{name}.lora_B", fan_out * rank, "col" if split == "col" else "rep", "block"))
    return out


def param_count(arch: Arch) -> int:
    """Parameters of one whole expert (as diffusers counts them)."""
    return sum(t.numel * (arch.layers if t.place == "block" else 1) for t in param_tensors(arch))


def rank_tensors(tensors: list[ParamTensor], arch: Arch, tp: int, pp: int, stage: int,
                 fp32: bool | None = None) -> list[int]:
    """Element counts of the tensors one rank (TP shard, pipeline stage) holds, one entry per tensor
    (only the fp32-kept ones, or only the others, when ``fp32`` is given)."""
    per_stage = pipeline_split(arch.layers, pp)[stage]
    out = []
    for t in tensors:
        if t.place == "pre" and stage != 0 or t.place == "post" and stage != pp - 1:
            continue
        if fp32 is not None and t.fp32 != fp32:
            continue
        numel = t.numel // tp if t.split != "rep" else t.numel
        out += [numel] * (per_stage if t.place == "block" else 1)
    return out


def ddp_buffer_numel(numels: list[int], shards: int) -> int:
    """Elements of Megatron's DDP param/grad buffer under the distributed optimizer: every parameter
    starts on a 64-element boundary and the buffer is padded to a multiple of lcm(shards, 128)
    (megatron/core/distributed/param_and_grad_buffer.py; one bucket assumed)."""
    total = 0
    for n in numels:
        total = math.ceil(total / 64) * 64 + n
    div = math.lcm(shards, 128)
    return math.ceil(total / div) * div


# -- FLOPs -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flops:
    """Forward FLOPs of one sample: matmuls against weights (``linear``) and attention score/value
    products (``attention``), counted as 2 per multiply-add (FlopCounterMode's convention)."""

    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention


def forward_flops(arch: Arch, tokens: int, text: int, *, qwen_last_text: bool = False) -> Flops:
    """One expert's forward over one sample of ``tokens`` image/video tokens and ``text`` text tokens.

    Qwen-Image: our last block skips its dead text queries/output/MLP (diffusers computes them;
    ``qwen_last_text=True`` counts them, to compare with diffusers)."""
    d, f, s, n = arch.hidden, arch.ffn, tokens, arch.layers
    pv = arch.patch_volume
    if arch.kind == "qwen-image":
        j = s + text
        per_layer_lin = 2 * j * (3 * d * d + d * d + 2 * d * f) + 2 * 2 * d * 6 * d
        per_layer_att = 4 * j * j * d
        lin = n * per_layer_lin
        att = n * per_layer_att
        if not qwen_last_text:  # last block: text K/V only; no text queries, text out-proj or text MLP
            lin -= 2 * text * (d * d + 2 * d * f)
            att -= 4 * text * j * d
        lin += 2 * s * arch.in_channels * d + 2 * text * arch.text_dim * d
        lin += 2 * (256 * d + d * d) + 2 * d * 2 * d + 2 * s * d * pv * arch.out_channels
        return Flops(float(lin), float(att))
    per_layer_lin = 2 * s * (3 * d * d + d * d + d * d + d * d + 2 * d * f) + 2 * text * 2 * d * d
    per_layer_att = 4 * s * s * d + 4 * s * text * d
    if arch.image_dim:
        per_layer_lin += 2 * arch.image_tokens * 2 * d * d
        per_layer_att += 4 * s * arch.image_tokens * d
    lin = n * per_layer_lin + 2 * s * arch.in_channels * pv * d + 2 * s * d * arch.out_channels * pv
    lin += 2 * (arch.freq_dim * d + d * d + 6 * d * d) + 2 * text * (arch.text_dim * d + d * d)
    return Flops(float(lin), float(n * per_layer_att))


def lora_flops(arch: Arch, tokens: int, text: int, rank: int, targets: tuple[str, ...] | list[str]) -> float:
    """Extra forward FLOPs of the adapters (x A^T then B): 2 r (in + out) per token per adapted linear."""
    total = 0
    for t in lora_tensors(arch, rank, targets):
        toks = text if ".linear_kv." in t.name or ".linear_added_" in t.name or "txt_mlp" in t.name else tokens
        if arch.kind == "qwen-image" and "attention.linear_added" in t.name:
            toks = text
        total += 2 * t.numel * toks
    return float(arch.layers * total)


# -- activations -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sharding:
    """How one rank's share of a sample's tokens is cut: TP (heads/features), SP (tokens, with TP),
    CP (tokens)."""

    tp: int = 1
    sp: bool = False
    cp: int = 1

    @property
    def sp_div(self) -> int:
        return self.tp if self.sp else 1


def layer_activation_bytes(arch: Arch, *, tokens: int, text: int, batch: int, act_bytes: int, lora_rank: int | None,
                           shard: Sharding = Sharding(), per_token_t: bool = False) -> float:
    """Bytes autograd keeps for backward in ONE block of one rank, for ``batch`` samples.

    ``lora_rank`` None: every parameter trains (fake scores, full students); else a frozen backbone with
    adapters of that rank (LoRA students: frozen gates/scales/norm weights save less). Terms are per
    token of our layer code (names in the comments); fp32 pieces (norm inputs, modulation, RoPE) count
    4 bytes whatever the activation dtype ``act_bytes``.
    """
    a, d, f, heads = act_bytes, arch.hidden, arch.ffn, arch.heads
    tp, cp, spd = shard.tp, shard.cp, shard.sp_div
    full = lora_rank is None
    r = 0 if full else lora_rank
    s_loc = tokens / cp
    per_sample = 32 * d  # (shift, scale, gate) x 2 and their products' small factors, [1, b, d] fp32
    if arch.kind == "qwen-image":
        return batch * (_qwen_layer_bytes(arch, s_loc, text, a, full, r, shard) + 2 * per_sample)
    # Token-wise tensors of the whole width (sharded over TP only under SP): modulated LN inputs/outputs,
    # linear inputs, the gated attention/MLP outputs, norm2's input; LN statistics (8 bytes per LN).
    # Frozen scales/gates (LoRA): their products keep only the small factor.
    rep = ((24 + 4 * a) if full else (12 + 3 * a)) * d + 24
    # Head-split tensors (/tp): q/k of self-attention (the RMS norm's fp32 input, its normalised output
    # when the norm weight trains, the attention input; RoPE multiplies by constants and keeps only its
    # shared tables), K/V (cp = 1: the fused QKV output that V views; cp > 1: the gathered K and V), the
    # attention output (the projection reads it as a view: SDPA returns it in [s, b, h, d] memory order),
    # cross-attention q and output, the FFN hidden (GELU input, fc2 input), softmax statistics.
    norm = 8 if full else 4
    kv = norm * d + ((a * d + 3 * a * d) if cp == 1 else 2 * a * cp * d)
    split = (norm + a) * d + kv + a * d + (norm + a) * d + a * d + 2 * a * f + 8 * heads
    # 12: q/k/cross-q RMS statistics; LoRA: the rank-r intermediate of each of the six adapters.
    per_token = rep / spd + split / tp + 12 + 6 * a * r
    # Text K/V (replicated over CP and SP): k's norm input (+ output), attention's k, the fused KV that V
    # views; a LoRA adapter's input copy of the (transposed, non-contiguous) context and its rank-r output.
    per_text = ((norm + 3 * a) * d) / tp + 4 + (0 if full else a * d + a * r)
    context = text + (arch.image_tokens if arch.image_dim else 0)  # Wan2.1-style image K/V alike
    if per_token_t:
        # One timestep per token (TI2V's clean first frame): the modulation is [s, b, 6, d] fp32 per block;
        # the gates are views of it (the attention/FFN outputs' products keep it alive, 24 d) and
        # (1 + scale) is a fresh [s, b, d] fp32 tensor for each of the two modulated LNs.
        per_token += 32 * d / spd
    return batch * (s_loc * per_token + context * per_text + per_sample)


def _qwen_layer_bytes(arch: Arch, s_loc: float, text: int, a: int, full: bool, r: int, shard: Sharding) -> float:
    """One Qwen-Image dual-stream block, one sample: image tokens (CP- and SP-sharded) and text tokens
    (replicated) carry the same per-token terms; joint attention saves the concatenated [text; image]
    q, k, v (the image K/V gathered over CP) and its output."""
    d, f, heads, tp, cp = arch.hidden, arch.ffn, arch.heads, shard.tp, shard.cp
    # Whole-width tensors: LN inputs (2), the QKV and FC1 inputs; when scales/gates train also the
    # modulated LN outputs (2) and the gated attention/MLP outputs (2); LN statistics (fp32 on GPU).
    rep = (8 * a * d if full else 4 * a * d + 4 * a * r) + 16
    # Per-head q/k RMSNorm: its fp32 input (in fp32 ``.float()`` is a view, so the norm keeps the fused
    # QKV output alive instead), the normalised output when the norm weight trains; statistics (4/head).
    qk = (3 * a * d if a == 4 else 8 * d) + (8 * d if full else 0) + 8 * heads
    # Joint attention's q and output (the projection reads a view of it), softmax statistics; the FFN
    # hidden (GELU input, fc2 input).
    split = qk + 2 * a * d + 4 * heads + 2 * a * f
    kv = 2 * a * d  # attention's k and v: the image ones are gathered over CP
    img = s_loc * (rep / shard.sp_div + split / tp + cp * kv / tp)
    txt = text * (rep + (split + kv) / tp)
    return img + txt


def stage_activation_bytes(arch: Arch, *, layers: int, first: bool, last: bool, tokens: int, text: int, batch: int,
                           act_bytes: int, lora_rank: int | None, shard: Sharding = Sharding(),
                           per_token_t: bool = False) -> float:
    """Saved activations of one pipeline stage (``layers`` blocks, plus the embedders on the first
    stage and the head on the last) for one micro-batch of ``batch`` samples, on one rank."""
    a, d = act_bytes, arch.hidden
    kw = dict(tokens=tokens, text=text, batch=batch, act_bytes=a, lora_rank=lora_rank, shard=shard,
              per_token_t=per_token_t)
    out = layers * layer_activation_bytes(arch, **kw) + model_extra_activation_bytes(arch, first=first, last=last, **kw)
    s_loc, tp, full = tokens / shard.cp, shard.tp, lora_rank is None
    if first and not full:
        # A frozen embedder feeds the first block an input that needs no gradient: its first LN keeps nothing.
        if arch.kind == "qwen-image":
            out -= batch * (s_loc / shard.sp_div + text) * a * d
        else:
            out -= batch * s_loc / shard.sp_div * 4 * d
    if last and arch.kind == "qwen-image":
        # Our last block drops its dead text queries, text output and text MLP (see forward_flops): its
        # text tokens keep only LN1 (+ its modulated output when scales train), the QKV input, the q/k
        # norms and k, v.
        r = 0 if full else lora_rank
        whole = _qwen_layer_bytes(arch, 0, text, a, full, r, shard)
        kept = text * ((3 * a * d if full else 2 * a * d + a * r) + 8
                       + ((3 * a * d if a == 4 else 8 * d) + (8 * d if full else 0) + 8 * arch.heads + 2 * a * d) / tp)
        out -= batch * (whole - kept)
    return out


def model_extra_activation_bytes(arch: Arch, *, tokens: int, text: int, batch: int, act_bytes: int,
                                 lora_rank: int | None, shard: Sharding = Sharding(), first: bool = True,
                                 last: bool = True, per_token_t: bool = False) -> float:
    """Outside the blocks: the text context every Wan block reads, the
    embedders' saved inputs when they train, RoPE tables (shared by every block), the output head's
    saved tensors and the loss's fp32 velocity."""
    a, d = act_bytes, arch.hidden
    s_loc = tokens / shard.cp
    full = lora_rank is None
    out = 0.0
    if arch.kind == "qwen-image":
        out += (s_loc + text) * 4 * arch.head_dim  # complex64 RoPE tables [s, 1, 1, head_dim/2]
        if full and first:  # img_in and txt_in inputs, txt_norm's fp32 input
            out += batch * (s_loc * a * arch.in_channels + text * (a + 4) * arch.text_dim)
        head = (3 * a * d) if full else a * d
    else:
        out += s_loc * 4 * arch.head_dim  # cos/sin [s, 1, 1, head_dim/2] fp32
        out += batch * text * a * d  # the projected text context, kept by every block's K/V projection
        if full:  # text embedder input, GELU input and output; the patch embedding's input
            out += batch * text * a * (arch.text_dim + 2 * d)
            if first:
                out += batch * s_loc * a * arch.in_channels * arch.patch_volume
        head = (8 + a) * d if full else 4 * d
        if per_token_t:  # the head's (1 + scale) per token; trained embedders keep per-token inputs
            head += 4 * d
            if full:
                out += batch * s_loc * a * (arch.freq_dim + 3 * d)
    if last:
        out += batch * s_loc * (head + 4 * arch.out_channels * arch.patch_volume)
    return out
