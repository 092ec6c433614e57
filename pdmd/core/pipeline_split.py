"""How a model's blocks are divided over pipeline stages; shared by the Megatron models
(megatron_adapters/layers/stage.py) and the planner (pdmd/plan), which must agree on it.

An even split when the stages divide the blocks; otherwise the extra blocks go to the middle stages first,
then the last, then the first: the first stage also runs the patch / text / time embedders and the last the
head, so they get the fewer blocks (Megatron-core's ``num_layers_in_first/last_pipeline_stage`` serve the
same purpose). ``parallel.pp_layers`` gives the split by hand.
"""

from __future__ import annotations

from collections.abc import Sequence


def pipeline_split(num_layers: int, pp: int, given: Sequence[int] | None = None) -> list[int]:
    """Blocks per pipeline stage (stage 0 first); ValueError naming the numbers when it cannot work."""
    if given is not None:
        split = [int(n) for n in given]
        if len(split) != pp or any(n < 1 for n in split) or sum(split) != num_layers:
            raise ValueError(f"parallel.pp_layers={list(given)}: give pp={pp} stage sizes, each >= 1, that sum "
                             f"to the model's {num_layers} layers")
        return split
    if num_layers < pp:
        raise ValueError(f"the model's {num_layers} layers cannot fill pp={pp} pipeline stages (at least one each)")
    base, extra = divmod(num_layers, pp)
    split = [base] * pp
    order = [*range(1, pp - 1), pp - 1, 0] if pp > 1 else [0]
    for stage in order[:extra]:
        split[stage] += 1
    return split


def stage_offset(split: Sequence[int], stage: int) -> int:
    """The global index of the first block of ``stage``."""
    return sum(split[:stage])
