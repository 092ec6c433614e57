"""The trainer backend computes at TP=2 (+ SP), at PP=2 (even, and uneven: 3 blocks over 2 stages, split
automatically or by parallel.pp_layers), with 2 micro-batches and with full activation recomputation
(TP=2 + SP) what it computes at TP=1 with one, for both model families: teacher velocities,
the student's update loss and every student gradient (through the schedule, DDP, finalize and the
distributed optimizer). For Qwen-Image (model.kind=qwen-image) the TP=1 teacher velocity is also diffusers'
QwenImageTransformer2DModel on the pipeline's packed latents, sigma timesteps and padded text mask. A student
checkpoint written at one pipeline split loads at another."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdmd.core.tensors import rel_err
from tests.conftest import ROOT
from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank
RECIPES = {"wan": ROOT / "configs" / "tiny_wan22.yaml", "qwen": ROOT / "configs" / "tiny_qwen_image.yaml"}
# family -> layout -> (world size, overrides); "tp1" is the reference of its family
LAYOUTS = {
    "wan": {"tp1": (1, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"]),
            "cp2_ulysses": (2, ["parallel.cp=2", "parallel.cp_comm=ulysses"]),
            "tp1_mb2": (1, ["train.num_micro_batches=2"]),
            "tp2_recompute": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "model.recompute=full"])},
    "qwen": {"tp1": (1, []), "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
             "pp2": (2, ["parallel.pp=2"]), "cp2_ulysses": (2, ["parallel.cp=2", "parallel.cp_comm=ulysses"]),
             "tp2_recompute": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "model.recompute=full"])},
    # 3-block teachers: pipeline stages of unequal size (pdmd/core/pipeline_split.py), automatic or given
    "wan3": {"tp1": (1, []), "pp2_uneven": (2, ["parallel.pp=2"])},
    "qwen3": {"tp1": (1, []), "pp2_given": (2, ["parallel.pp=2", "parallel.pp_layers=[2,1]"])},
}
STAGES = {("wan3", "pp2_uneven"): [(0, 1), (1, 2)], ("qwen3", "pp2_given"): [(0, 2), (2, 1)]}
CASES = [(family, layout) for family, layouts in LAYOUTS.items() for layout in layouts if layout != "tp1"]


def _inputs(family, cfg):
    """Latents, the text tensor the backend takes, a regression target; for Qwen-Image also the prompt
    embeddings and mask (the second prompt 3 tokens shorter: padding, zeros, masked)."""
    from pdmd.core.packing import pack_text

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *cfg.train.latent_shape, generator=g)
    if family == "wan":
        return x, torch.randn(2, 32, 24, generator=g), torch.randn(2, *cfg.train.latent_shape, generator=g), None
    embeds = torch.randn(2, 7, 32, generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    embeds = embeds * mask[..., None]
    target = torch.randn(2, *cfg.train.latent_shape, generator=g)
    return x, pack_text(embeds, mask), target, (embeds, mask)


def _qwen_diffusers_velocity(cfg, x, t, embeds, mask):
    """The teacher as QwenImagePipeline calls it: packed latents, sigma timesteps, the padded mask."""
    from diffusers import QwenImageTransformer2DModel

    from pdmd.core.packing import pack_latents, unpack_latents

    ref = QwenImageTransformer2DModel.from_pretrained(Path(cfg.model.teacher.path) / "transformer").eval()
    h, w = x.shape[-2:]
    with torch.no_grad():
        v = ref(hidden_states=pack_latents(x), encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                timestep=t, img_shapes=[[(1, h // 2, w // 2)]] * 2, return_dict=False)[0]
    return unpack_latents(v, h, w)


def _step(rank, world_size, family, overrides, save_to=None):
    from megatron.core import parallel_state

    from megatron_adapters.backend import MegatronBackend
    from pdmd.core.config import load_config
    from pdmd.core.packing import pack_text

    torch.set_num_threads(1)
    cfg = load_config(RECIPES[family], overrides)
    backend = MegatronBackend(cfg)
    # phase 2 of the tiny recipes: Wan's low-noise expert (and its t < 0.875 range), Qwen-Image's one transformer
    backend.setup_phase(2, 1 if family == "wan" else 0, {}, cfg.phase_plan().renoise_interval(2))
    x, text, target, prompt = _inputs(family, cfg)
    t = torch.tensor([0.95, 0.3] if family == "wan" else [0.9, 0.3])  # Wan: one sample per teacher expert
    out = {"v": backend.velocity("teacher", x, t, text)}
    if family == "qwen" and world_size == 1:  # the family's view of the model against diffusers
        embeds, mask = prompt
        out["v_diffusers"] = _qwen_diffusers_velocity(cfg, x, t, embeds, mask)
        out["v_unmasked"] = backend.velocity("teacher", x, t, pack_text(embeds, torch.ones_like(mask)))
    t_end = {"wan": 0.625, "qwen": 0.75}[family]  # the phase's first step: t_in = its start, updated to 0
    t_in = torch.full((2,), t_end)

    def loss_fn(v, idx):
        return 0.5 * ((x[idx] + (0.0 - t_end) * v - target[idx]) ** 2).mean()

    model = backend.trainables["student"].model
    calls = []
    model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    import megatron_adapters.backend as backend_module

    finalize, local = backend_module.finalize_model_grads, {}

    def keep_local_grads(models, *args, **kwargs):  # before the distributed optimizer's reduce-scatter
        local.update({k: p.main_grad.clone() for k, p in model.named_parameters()})
        return finalize(models, *args, **kwargs)

    backend_module.finalize_model_grads = keep_local_grads
    try:
        result = backend.train_step("student", x, t_in, text, loss_fn)
    finally:
        backend_module.finalize_model_grads = finalize
    grads = {k: p.main_grad.clone() for k, p in model.named_parameters()}
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:  # each CP rank's own tokens' share (its loss scaled by cp); the test sums them over CP
        grads = {k: g / cp for k, g in local.items()}
    if save_to is not None:  # the updated student, to be read back at another split
        from megatron.core import dist_checkpointing

        dist_checkpointing.save(model.sharded_state_dict(prefix="student."), save_to)
        out["state"] = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return dict(out, pp=parallel_state.get_pipeline_model_parallel_rank(),
                tp=parallel_state.get_tensor_model_parallel_rank(), cp_rank=parallel_state.get_context_parallel_rank(),
                first=model.layer_offset, count=len(model.blocks),
                loss=result["loss"], grads=grads, block_calls=len(calls))


def _load(rank, world_size, family, overrides, ckpt):
    """Phase 2's student built at this layout, loaded from a checkpoint another split wrote."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_adapters.backend import MegatronBackend
    from pdmd.core.config import load_config

    cfg = load_config(RECIPES[family], overrides)
    backend = MegatronBackend(cfg)
    backend.setup_phase(2, 1 if family == "wan" else 0, {}, cfg.phase_plan().renoise_interval(2))
    model = backend.trainables["student"].model
    loaded = dist_checkpointing.load(model.sharded_state_dict(prefix="student."), ckpt)
    model.load_state_dict({k.removeprefix("student."): v for k, v in loaded.items()}, strict=False)
    return dict(pp=parallel_state.get_pipeline_model_parallel_rank(), tp=parallel_state.get_tensor_model_parallel_rank(),
                first=model.layer_offset, count=len(model.blocks),
                grads={k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")})


@pytest.fixture(scope="module")
def three_block_teachers(tmp_path_factory):
    from pdmd.bench.tiny_models import write_tiny_qwen_image_teacher, write_tiny_wan22_teacher

    root = tmp_path_factory.mktemp("three_blocks")
    return {"wan3": write_tiny_wan22_teacher(root / "wan", num_layers=3),
            "qwen3": write_tiny_qwen_image_teacher(root / "qwen", num_layers=3)}


@pytest.fixture(scope="module")
def layouts(request, tmp_path_factory):
    """(family, layout) -> every rank's result, run on first use (a family's teacher is built only then).
    The uneven split's run also saves its updated student (``ckpt``) for the resharding test."""
    cache = {}
    ckpt = str(tmp_path_factory.mktemp("uneven_ckpt"))

    def overrides(family, layout):
        base_family = family.rstrip("3")
        tiny = request.getfixturevalue("wan_tiny" if base_family == "wan" else "qwen_tiny")
        teacher = request.getfixturevalue("three_block_teachers")[family] if family.endswith("3") else tiny.teacher
        # a full student: every parameter's gradient is compared; the backend never opens the shards
        base = [f"model.teacher.path={teacher}", f"data.shards={tiny.shards}", "student.lora=null"]
        return base_family, base + LAYOUTS[family][layout][1]

    def get(family, layout):
        if (family, layout) not in cache:
            base_family, argv = overrides(family, layout)
            save = ckpt if (family, layout) == ("wan3", "pp2_uneven") else None
            cache[family, layout] = run_ranks(_step, LAYOUTS[family][layout][0], base_family, argv, save)
        return cache[family, layout]

    get.ckpt, get.overrides = ckpt, overrides
    return get


def _diffusers_grads(family, ranks):
    from megatron_adapters.conversion import diffusers_from_shards
    from megatron_adapters.families.qwen_image.config import QwenImageConfig
    from megatron_adapters.families.qwen_image.convert import qwen_image_rules
    from megatron_adapters.families.wan.config import WanConfig
    from megatron_adapters.families.wan.convert import wan_rules
    from pdmd.bench.tiny_models import TINY_QWEN_IMAGE, TINY_WAN

    rules = (wan_rules(WanConfig.from_dict({**TINY_WAN, "text_dim": 24})) if family.startswith("wan")
             else qwen_image_rules(QwenImageConfig.from_dict(TINY_QWEN_IMAGE)))
    shards: dict = {}
    for r in ranks:  # CP ranks: their tokens' shares summed (the distributed optimizer keeps only a slice reduced)
        key = (r["pp"], r["tp"])
        shards[key] = ({k: shards[key][k] + g for k, g in r["grads"].items()} if key in shards and r.get("cp_rank")
                       else r["grads"])
    pp = max(r["pp"] for r in ranks) + 1
    stages = [next((r["first"], r["count"]) for r in ranks if r["pp"] == s) for s in range(pp)]
    return diffusers_from_shards(shards, rules, stages, max(r["tp"] for r in ranks) + 1)


@pytest.mark.parametrize("family, layout", CASES, ids=[f"{f}-{lay}" for f, lay in CASES])
def test_backend_layout_equals_single_rank(layouts, family, layout):
    ref, other = layouts(family, "tp1"), layouts(family, layout)
    if (family, layout) in STAGES:  # (first block, blocks) of each pipeline stage
        assert sorted({(r["first"], r["count"]) for r in other}) == STAGES[family, layout]
    passes = 2 if layout.endswith("mb2") else 1  # micro-batches
    recomputed = 2 if layout.endswith("recompute") else 1  # the backward runs each block's forward again
    assert {r["block_calls"] for r in other if r["first"] == 0} == {passes * recomputed}
    for r in other:  # every rank gets the velocity and the loss
        assert torch.allclose(r["v"], ref[0]["v"], rtol=1e-5, atol=1e-6) and rel_err(r["v"], ref[0]["v"]) <= 1e-5
        assert abs(r["loss"] - ref[0]["loss"]) <= 1e-5 * abs(ref[0]["loss"])
    ref_grads, grads = _diffusers_grads(family, ref), _diffusers_grads(family, other)
    assert grads.keys() == ref_grads.keys()
    assert sum(g.norm() for g in ref_grads.values()) > 0
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= 1e-5, name


def test_qwen_teacher_velocity_is_diffusers_on_the_pipelines_inputs(layouts):
    (r,) = layouts("qwen", "tp1")
    assert r["v"].shape == (2, 4, 1, 8, 8)
    assert rel_err(r["v"], r["v_diffusers"]) <= 1e-5
    # the mask travels with the text: unmasking the padded prompt changes its velocity, not the other one's
    assert rel_err(r["v_unmasked"][0], r["v"][0]) <= 1e-6
    assert rel_err(r["v_unmasked"][1], r["v"][1]) > 1e-3


def test_a_checkpoint_of_one_pipeline_split_loads_at_another(layouts):
    """The student updated at blocks [1 | 2] over two stages, read back at [2 | 1] and at one stage: the
    same tensors (checkpoints name blocks by their global index)."""
    saved = layouts("wan3", "pp2_uneven")
    want = _diffusers_grads("wan3", [dict(r, grads=r["state"]) for r in saved])
    for layout_overrides, world in ((["parallel.pp=2", "parallel.pp_layers=[2,1]"], 2), ([], 1)):
        family, argv = layouts.overrides("wan3", "tp1")
        ranks = run_ranks(_load, world, family, argv + layout_overrides, layouts.ckpt)
        if world == 2:
            assert sorted((r["first"], r["count"]) for r in ranks) == [(0, 2), (2, 1)]
        got = _diffusers_grads("wan3", ranks)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
