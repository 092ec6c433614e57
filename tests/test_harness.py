"""The multi-rank harness itself: results in rank order, failures carry the rank's traceback, hangs time out."""

import pytest
import torch
import torch.distributed as dist

from tests.multirank import RankFailure, run_ranks


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return rank, world_size, t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 blocks here: the harness must not hang
    return rank


def test_results_in_rank_order():
    assert run_ranks(_all_reduce_rank, 2) == [(0, 2, 3.0), (1, 2, 3.0)]


def test_failure_reports_rank_and_traceback():
    with pytest.raises(RankFailure, match=r"(?s)rank 1 of 2 failed.*ValueError: boom on rank one"):
        run_ranks(_fail_on_rank_one, 2, timeout=60)
