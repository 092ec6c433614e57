"""Communication time of one generator update at a parallel layout (``pdmd plan``), from a stated bandwidth
model: ring collectives, NVLink within a node and InfiniBand across nodes, and no overlap with compute (an
upper bound: Megatron overlaps some of it, our CPU-tested code paths overlap none). docs/plan.md says where
the numbers come from.

Ranks are ordered as Megatron orders them (tp innermost, then cp, then dp, then pp), so a TP group spans
``tp`` consecutive ranks, a CP group ``tp * cp``, the gradient-reduction group (DP x CP) ``tp * cp * dp``;
a group is inside a node when its span is at most the node's GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdmd.plan.capacity import Arch


@dataclass(frozen=True)
class Network:
    # H100 / H200 SXM: NVLink 4, 900 GB/s bidirectional per GPU -> 450 GB/s each way; one 400 Gb/s NDR
    # InfiniBand HCA per GPU -> 50 GB/s. Both are peaks; ``efficiency`` is what a ring collective gets of them.
    nvlink_gbps: float = 450.0
    ib_gbps: float = 50.0
    gpus_per_node: int = 8
    efficiency: float = 0.8

    def bandwidth(self, span: int) -> float:
        """Bytes per second one GPU moves in a collective whose group spans ``span`` consecutive ranks."""
        peak = self.nvlink_gbps if span <= self.gpus_per_node else self.ib_gbps
        return peak * 1e9 * self.efficiency


def all_reduce_s(nbytes: float, n: int, bw: float) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` ranks: 2 (n - 1) / n of it through each GPU's link."""
    return 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / bw


def all_gather_s(nbytes_total: float, n: int, bw: float) -> float:
    """Ring all-gather (or reduce-scatter) whose gathered result has ``nbytes_total``."""
    return 0.0 if n == 1 else (n - 1) / n * nbytes_total / bw


def all_to_all_s(nbytes_local: float, n: int, bw: float) -> float:
    """All-to-all of a rank's ``nbytes_local``: it keeps 1/n and sends the rest."""
    return 0.0 if n == 1 else (n - 1) / n * nbytes_local / bw


def layer_forward_comm(arch: Arch, *, tp: int, cp: int, cp_comm: str, tokens: int, text: int, batch: int,
                       act_bytes: int, net: Network) -> dict[str, float]:
    """Seconds of one block's forward for ``batch`` samples, by parallelism (TP: the all-reduce of each
    row-parallel output, or under SP its reduce-scatter + all-gather, the same bytes; CP: the self/joint
    attention's keys and values gathered, or Ulysses' four all-to-alls)."""
    d, s_loc = arch.hidden, tokens / cp
    # row-parallel outputs: Qwen-Image's image and text streams (attention and MLP of each); Wan's
    # self-attention, cross-attention and FFN of the video tokens
    row_tokens = 2 * s_loc + 2 * text if arch.kind == "qwen-image" else 3 * s_loc
    tp_s = all_reduce_s(row_tokens * batch * d * act_bytes, tp, net.bandwidth(tp))
    kv_shard = tokens * batch * (d / tp) * act_bytes  # one of K or V over the whole sequence, one TP rank's heads
    cp_bw = net.bandwidth(tp * cp)
    if cp_comm == "ulysses":  # q, k, v to heads and the output back, each a rank's [s/cp, b, D/tp]
        cp_s = 4 * all_to_all_s(kv_shard / cp, cp, cp_bw)
    else:
        cp_s = all_gather_s(2 * kv_shard, cp, cp_bw)
    return {"tp": tp_s, "cp": cp_s}


def layer_backward_comm(forward: dict[str, float], cp: int, cp_comm: str) -> dict[str, float]:
    """The same block's backward: TP mirrors the forward; CP all-gather's backward all-reduces the gathered
    gradient (our implementation: twice the gather's bytes), Ulysses' all-to-alls mirror the forward."""
    cp_s = forward["cp"] if cp_comm == "ulysses" else 2 * forward["cp"]
    return {"tp": forward["tp"], "cp": cp_s}


def grad_sync_s(trainable_params_per_rank: float, *, tp: int, cp: int, dp: int, param_bytes: int,
                net: Network) -> float:
    """One optimizer step of a trainable role under the distributed optimizer: reduce-scatter of the
    gradients and all-gather of the updated weights over the DP x CP group."""
    n = dp * cp
    bw = net.bandwidth(tp * cp * dp)
    return 2 * all_gather_s(trainable_params_per_rank * param_bytes, n, bw)


def pipeline_p2p_s(*, tokens: int, cp: int, tp: int, sp: bool, batch: int, hidden: int, act_bytes: int, dp: int,
                   net: Network) -> float:
    """One micro-batch's activation (or its gradient) sent to the next pipeline stage."""
    nbytes = tokens / cp / (tp if sp else 1) * batch * hidden * act_bytes
    return nbytes / net.bandwidth(tp * cp * dp + 1)
