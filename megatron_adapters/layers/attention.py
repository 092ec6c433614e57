"""Attention pieces shared by our DiTs: exact context-parallel SDPA and a q/k RMSNorm over all heads.

``SDPAttention`` is the local (torch-only) core attention: bidirectional, with an optional key mask,
through ``F.scaled_dot_product_attention`` (flash/memory-efficient kernels where torch has them, also
on CPU). Under context parallelism (``parallel.cp_comm``) either each rank keeps its queries and
all-gathers keys and values over the CP group (``all_gather``: exact; gradients flow back to the rank that
owns each key), or two all-to-alls trade tokens for heads (``ulysses``: each rank attends over the whole
sequence with 1/cp of the heads; per-rank K/V memory stays at its share). Joint attention (Qwen-Image:
[text; image]) passes the replicated text keys/values as ``prefix_kv``: they are put in front of the
image keys/values and are never gathered themselves (Ulysses cuts them to the rank's heads).

``AllHeadsRMSNorm`` is Wan's q/k norm: RMS over the WHOLE hidden dim (all heads together). Under TP a
rank holds only some heads, so the sum of squares is all-reduced over TP; a per-rank norm would be a
different function (``tests/test_wan_model.py`` shows it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_adapters.runtime.comm import (
    all_gather_for_shared_use,
    all_reduce_sum,
    cp_group,
    heads_to_sequence,
    sequence_to_heads,
    split_for_rank,
    tp_group,
)
from megatron_adapters.runtime.parallel import cp_comm


class SDPAttention(MegatronModule):
    """Core attention on [s, b, heads, head_dim] tensors; returns [s, b, heads * head_dim].

    ``gather_kv_over_cp``: self-attention keys/values are sharded over CP ranks and must be gathered;
    cross-attention keys/values (text, image context) are replicated and must not be.
    ``prefix_kv``: keys/values replicated over CP (joint attention's text) placed before the gathered
    ones; ``key_mask`` then covers [prefix; all gathered keys].
    """

    def __init__(self, config, gather_kv_over_cp: bool = True) -> None:
        super().__init__(config)
        self.gather_kv_over_cp = gather_kv_over_cp

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_mask: torch.Tensor | None = None,
                prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``query`` may start with ``len(prefix_kv[0])`` replicated (text) queries before the sharded ones."""
        group = cp_group() if self.gather_kv_over_cp else None
        if group is not None and cp_comm() == "ulysses":
            return self._ulysses(query, key, value, key_mask, prefix_kv, group)
        if group is not None:
            key = all_gather_for_shared_use(key, 0, group)
            value = all_gather_for_shared_use(value, 0, group)
        if prefix_kv is not None:
            key, value = torch.cat([prefix_kv[0], key]), torch.cat([prefix_kv[1], value])
        return _sdpa(query, key, value, key_mask)

    @staticmethod
    def _ulysses(query, key, value, key_mask, prefix_kv, group) -> torch.Tensor:
        """DeepSpeed-Ulysses: one all-to-all gives each CP rank every token of 1/cp of the heads, attention
        runs there on the whole sequence, a second all-to-all hands each rank its tokens back. Replicated
        (text) queries and keys are cut to the rank's heads, and their outputs gathered over the heads."""
        n = query.shape[0] - key.shape[0]  # replicated (text) queries in front; 0 in self-attention
        q, k, v = (sequence_to_heads(t, group) for t in (query[n:], key, value))
        if prefix_kv is not None:  # this rank's heads of the replicated keys and values
            k, v = (torch.cat([split_for_rank(p, 2, group), t]) for p, t in zip(prefix_kv, (k, v)))
        if n:
            q = torch.cat([split_for_rank(query[:n], 2, group), q])
        s, b, h = q.shape[0], q.shape[1], q.shape[2]
        out = _sdpa(q, k, v, key_mask).view(s, b, h, -1)
        image = heads_to_sequence(out[n:], group).flatten(2)
        if not n:
            return image
        text = all_gather_for_shared_use(out[:n], 2, group).flatten(2)  # each rank's heads, used by all
        return torch.cat([text, image])


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """[s, b, heads, d] in, [s, b, heads * d] out; ``key_mask`` [b, s_k], True = attend."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
    mask = None if key_mask is None else key_mask[:, None, None, :].to(torch.bool)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s, b = query.shape[0], query.shape[1]
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def apply_rope_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2i, 2i+1) of x [s, b, heads, d] by complex64 ``freqs``
    [s, 1, 1, d/2] (unit phasors), in fp32: one complex multiply (diffusers' Qwen-Image form, bit-exact
    with it; the same rotation as Wan's real-arithmetic ``apply_rope`` at a fraction of its cost)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)


class AllHeadsRMSNorm(MegatronModule):
    """RMSNorm over all heads' channels, with this TP rank's slice of the weight.

    Input [..., local_heads * head_dim]; the weight is TP-sharded along its only dim (heads), matching
    how Column-parallel Q/K projections split heads.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if hidden_size % tp:
            raise ValueError(f"q/k norm width {hidden_size} does not split over tp={tp}")
        self.full_size = hidden_size
        self.eps = eps
        # In the model's dtype, as Megatron's own norms: one parameter dtype per model keeps the
        # distributed optimizer's buffers (and its checkpoint format) simple; computed in fp32 anyway.
        self.weight = torch.nn.Parameter(torch.ones(hidden_size // tp, dtype=config.params_dtype))
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        sumsq = all_reduce_sum(x32.pow(2).sum(-1, keepdim=True), tp_group())
        y = x32 * torch.rsqrt(sumsq / self.full_size + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)
