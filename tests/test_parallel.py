"""Launch environments and layout validation (no processes started)."""

from __future__ import annotations

import pytest

from megatron_adapters.runtime.parallel import (
    LayoutError,
    ParallelLayout,
    expand_first_host,
    read_launch_env,
    validate_layout,
)


def test_torchrun_environment():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1",
                           "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3, 8, 3, "n1", 1234, "torchrun")


def test_slurm_environment_takes_master_from_node_list():
    env = read_launch_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "gpu[012-013]", "SLURM_JOB_ID": "41"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (9, 16, 1, "gpu012", "slurm")
    assert env.master_port == 20041


def test_single_process_default():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    assert 0 < env.master_port < 65536  # a free port, so that two single-process runs can share a machine


@pytest.mark.parametrize(
    "nodelist, first",
    [("node1", "node1"), ("gpu[003-005,9]", "gpu003"), ("a[7],b[1-2]", "a7"), ("x-1,y", "x-1"), ("h[01,03]", "h01")],
)
def test_first_host_of_slurm_node_list(nodelist, first):
    assert expand_first_host(nodelist) == first


def test_inconsistent_rank_is_an_error():
    with pytest.raises(ValueError, match="rank 4 of world size 4"):
        read_launch_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_valid_layout_gives_data_parallel_size():
    assert validate_layout(ParallelLayout(tp=2, pp=2, cp=2), 16, num_heads=40, num_layers=40, seq_len=32760) == 2
    assert validate_layout(ParallelLayout(pp=4), 8, num_layers=30) == 2  # TI2V-5B: [7, 8, 8, 7]


def test_pipeline_splits_give_the_extra_blocks_to_the_middle_stages():
    from pdmd.core.pipeline_split import pipeline_split, stage_offset

    assert pipeline_split(40, 4) == [10, 10, 10, 10]
    assert pipeline_split(30, 4) == [7, 8, 8, 7]  # Wan2.2 TI2V-5B
    assert pipeline_split(60, 8) == [7, 8, 8, 8, 8, 7, 7, 7]  # Qwen-Image
    assert pipeline_split(3, 2) == [1, 2] and pipeline_split(5, 1) == [5]
    assert pipeline_split(30, 4, [8, 7, 7, 8]) == [8, 7, 7, 8]
    assert [stage_offset([7, 8, 8, 7], s) for s in range(4)] == [0, 7, 15, 23]


@pytest.mark.parametrize(
    "layout, world, kwargs, message",
    [
        (ParallelLayout(tp=4, pp=2), 12, {}, "world size 12 is not divisible by tp\\*pp\\*cp = 4\\*2\\*1 = 8"),
        (ParallelLayout(tp=3), 3, {"num_heads": 40}, "tp=3 does not divide the model's 40 attention heads"),
        (ParallelLayout(pp=4, vpp=3), 4, {"num_layers": 30}, "30 layers do not split evenly over pp\\*vpp = 12"),
        (ParallelLayout(pp=4), 4, {"num_layers": 3}, "3 layers cannot fill pp=4 pipeline stages"),
        (ParallelLayout(pp=3, pp_layers=(10, 10, 10)), 3, {"num_layers": 40},
         "pp_layers=\\[10, 10, 10\\]: give pp=3 stage sizes, each >= 1, that sum to the model's 40 layers"),
        (ParallelLayout(cp=2, tp=2, sequence_parallel=True), 4, {"seq_len": 30},
         "30 tokens do not split evenly over cp=2 x tp=2"),
        (ParallelLayout(tp=0), 1, {}, "parallel.tp=0"),
        (ParallelLayout(tp=4, cp=4, cp_comm="ulysses"), 16, {"num_heads": 40},
         "cp_comm=ulysses needs tp\\*cp = 16 to divide the model's 40 attention heads"),
        (ParallelLayout(vpp=2), 1, {}, "vpp=2 needs parallel.pp >= 2"),
    ],
)
def test_bad_layouts_name_the_numbers(layout, world, kwargs, message):
    with pytest.raises(LayoutError, match=message):
        validate_layout(layout, world, **kwargs)
