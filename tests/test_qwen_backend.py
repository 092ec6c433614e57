"""The trainer backend driving Qwen-Image (model.kind=qwen-image): at TP=1 its teacher velocity is diffusers'
QwenImageTransformer2DModel on the pipeline's packed latents, sigma timesteps and padded text mask; at
TP=2 + SP, PP=2 and TP=2 + SP with full recomputation the teacher velocity, the student's update loss and every student gradient equal TP=1
(through the schedule, DDP, finalize and the distributed optimizer). Config mistakes of Qwen-Image runs
fail before any model is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdmd.config import ConfigError, load_config
from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny_qwen_image.yaml"
pytestmark = pytest.mark.multirank


def _inputs(cfg):
    from pdmd.model_io import pack_text

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *cfg.train.latent_shape, generator=g)
    embeds = torch.randn(2, 7, 32, generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # the second prompt is 3 tokens shorter: padding, zeros, masked
    embeds = embeds * mask[..., None]
    target = torch.randn(2, *cfg.train.latent_shape, generator=g)
    return x, embeds, mask, pack_text(embeds, mask), target


def _step(rank, world_size, overrides):
    torch.set_num_threads(1)
    from megatron.core import parallel_state

    from megatron_adapters.backend import MegatronBackend

    cfg = load_config(RECIPE, overrides)
    backend = MegatronBackend(cfg)
    backend.setup_phase(2, 0, {}, cfg.phase_plan().renoise_interval(2))
    x, embeds, mask, text, target = _inputs(cfg)
    t = torch.tensor([0.9, 0.3])
    v_teacher = backend.velocity("teacher", x, t, text)
    out = {"v": v_teacher}
    if world_size == 1:  # the family's view of the model against diffusers on what the pipeline feeds it
        from diffusers import QwenImageTransformer2DModel

        from pdmd.model_io import pack_latents, pack_text, unpack_latents

        ref = QwenImageTransformer2DModel.from_pretrained(Path(cfg.model.teacher.path) / "transformer").eval()
        h, w = x.shape[-2:]
        with torch.no_grad():
            v_ref = ref(hidden_states=pack_latents(x), encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                        timestep=t, img_shapes=[[(1, h // 2, w // 2)]] * 2, return_dict=False)[0]
        out["v_diffusers"] = unpack_latents(v_ref, h, w)
        unmasked = pack_text(embeds, torch.ones_like(mask))
        out["v_unmasked"] = backend.velocity("teacher", x, t, unmasked)
    t_in = torch.full((2,), 0.75)

    def loss_fn(v, idx):
        return 0.5 * ((x[idx] + (0.0 - 0.75) * v - target[idx]) ** 2).mean()

    model = backend.trainables["student"].model
    calls = []
    model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    result = backend.train_step("student", x, t_in, text, loss_fn)
    grads = {k: p.main_grad.clone() for k, p in model.named_parameters()}
    return dict(out, pp=parallel_state.get_pipeline_model_parallel_rank(),
                tp=parallel_state.get_tensor_model_parallel_rank(), first=model.layer_offset, count=len(model.blocks),
                loss=result["loss"], grads=grads, block_calls=len(calls))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from pdmd.tiny_models import write_tiny_qwen_image_teacher

    return write_tiny_qwen_image_teacher(tmp_path_factory.mktemp("qwen_backend") / "teacher")


@pytest.fixture(scope="module")
def layouts(teacher):
    # the backend never opens the shards: any path satisfies the config
    base = [f"model.teacher.path={teacher}", "data.shards=unused", "student.lora=null"]
    return {name: run_ranks(_step, world, base + extra)
            for name, (world, extra) in {"tp1": (1, []),
                                         "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
                                         "pp2": (2, ["parallel.pp=2"]),
                                         "tp2_recompute": (2, ["parallel.tp=2", "parallel.sequence_parallel=true",
                                                               "model.recompute=full"])}.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-20)).item()


def _diffusers_grads(ranks):
    from megatron_adapters.conversion import diffusers_from_shards
    from megatron_adapters.qwen_image.config import QwenImageConfig
    from megatron_adapters.qwen_image.convert import qwen_image_rules
    from pdmd.tiny_models import TINY_QWEN_IMAGE

    shards = {(r["pp"], r["tp"]): r["grads"] for r in ranks}
    stages = [next((r["first"], r["count"]) for r in ranks if r["pp"] == s) for s in range(max(r["pp"] for r in ranks) + 1)]
    tp = max(r["tp"] for r in ranks) + 1
    return diffusers_from_shards(shards, qwen_image_rules(QwenImageConfig.from_dict(TINY_QWEN_IMAGE)), stages, tp)


def test_teacher_velocity_is_diffusers_on_the_pipelines_inputs(layouts):
    (r,) = layouts["tp1"]
    assert r["v"].shape == (2, 4, 1, 8, 8)
    assert _rel(r["v"], r["v_diffusers"]) <= 1e-5
    # the mask travels with the text: unmasking the padded prompt changes its velocity, not the other one's
    assert _rel(r["v_unmasked"][0], r["v"][0]) <= 1e-6
    assert _rel(r["v_unmasked"][1], r["v"][1]) > 1e-3


@pytest.mark.parametrize("layout", ["tp2_sp", "pp2", "tp2_recompute"])
def test_qwen_backend_layout_equals_single_rank(layouts, layout):
    ref, other = layouts["tp1"], layouts[layout]
    recomputed = 2 if layout.endswith("recompute") else 1  # the backward runs each block's forward again
    assert {r["block_calls"] for r in other if r["first"] == 0} == {recomputed}
    for r in other:  # every rank gets the velocity and the loss
        assert _rel(r["v"], ref[0]["v"]) <= 1e-5
        assert abs(r["loss"] - ref[0]["loss"]) <= 1e-5 * abs(ref[0]["loss"])
    ref_grads, grads = _diffusers_grads(ref), _diffusers_grads(other)
    assert grads.keys() == ref_grads.keys()
    assert sum(g.norm() for g in ref_grads.values()) > 0
    for name, g in grads.items():
        assert _rel(g, ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("override, key", [
    ("model.teacher.subfolders=[transformer,transformer_2]", "model.teacher.subfolders"),
    ("train.latent_shape=[4,2,8,8]", "train.latent_shape"),
    ("data.model=wan", "data.model"),
    ("model.kind=wan", "model.kind"),
])
def test_bad_qwen_image_configs_fail_naming_the_key(teacher, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RECIPE, [f"model.teacher.path={teacher}", "data.shards=unused", override])


def test_tiny_recipe_and_paper_recipe_load(teacher):
    cfg = load_config(RECIPE, [f"model.teacher.path={teacher}", "data.shards=unused"])
    paper = load_config(ROOT / "configs" / "qwen_image.yaml", [f"model.teacher.path={teacher}", "data.shards=unused"])
    for c in (cfg, paper):  # the paper's Qwen-Image schedule: shift 3 -> 1000, 900, 750, 500; phase 1 in (0.75, 1)
        plan = c.phase_plan()
        assert [round(t * 1000, 6) for t in plan.timesteps] == [1000.0, 900.0, 750.0, 500.0]
        assert plan.renoise_interval(1) == pytest.approx((0.75, 1.0))
    assert paper.model.kind == "qwen-image" and paper.train.latent_shape == [16, 1, 128, 128]
