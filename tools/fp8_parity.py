#!/usr/bin/env python
"""FP8 parity check for trained roles: a few phase-1 steps in bf16 and again with FP8 student and fake.

``torchrun --nproc-per-node N tools/fp8_parity.py CONFIG --out REPORT.json [--steps 5] [--rtol 0.05] [key=value ...]``

Both runs start from the same weights, data and randomness (the trainer's randomness depends only on
seed, phase, step and data-parallel rank), so every difference is FP8's. Per step it compares the
generator loss, the student's gradient norm, the fake loss and the fake's gradient norm; the check
passes when every relative difference is within ``--rtol`` (default 5%: FP8's e4m3 has a 3-bit
mantissa, so single GEMMs differ by ~2-6%, and a loss over many GEMMs by less). The report, keyed by the
config without its FP8 section (pdmd.core.config.parity_key), is what ``model.fp8.parity_report`` must name
before ``model.fp8.roles`` may contain student or fake. Needs CUDA and Transformer Engine; elsewhere it
says why and exits 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METRICS = ("generator_loss", "student_grad_norm", "fake_loss", "fake_grad_norm")


def run_steps(cfg, steps: int) -> list[dict[str, float]]:
    """``steps`` fake + generator steps of phase 1 from a fresh backend; the scalars of each step."""
    from data.loader import PromptDataConfig, PromptLoader
    from megatron_adapters.backend import MegatronBackend
    from pdmd.core.method import PhaseTrainer
    from pdmd.train import student_experts

    def batch_text(backend, batch):  # as pdmd/train.py: the backend decides what travels with the embeddings
        return backend.text_input(batch["text_embeds"], batch["text_mask"]).to(backend.device)

    backend = MegatronBackend(cfg)
    plan = cfg.phase_plan()
    backend.setup_phase(1, student_experts(cfg, backend)[0], {}, plan.renoise_interval(1))
    loader = PromptLoader(PromptDataConfig.from_dict({**cfg.data, "seed": cfg.seed,
                                                      "batch_size": cfg.train.micro_batch_size * cfg.train.num_micro_batches}),
                          dp_rank=backend.dp_rank, dp_size=backend.dp_size)
    trainer = PhaseTrainer(backend, plan, 1, cfg.method, cfg.train.latent_shape, cfg.seed)
    negative = batch_text(backend, loader.negative)
    batches = loader.forever()
    rows = []
    for step in range(steps):
        batch = next(batches)
        text = batch_text(backend, batch)
        fake = trainer.fake_step(step, 0, text)
        gen = trainer.generator_step(step, text, negative.expand(text.shape[0], *negative.shape[1:]))
        rows.append({"generator_loss": gen["generator_loss"], "student_grad_norm": gen["student_grad_norm"],
                     "fake_loss": fake["fake_loss"], "fake_grad_norm": fake["fake_grad_norm"]})
    return rows


def compare(reference: list[dict[str, float]], fp8: list[dict[str, float]], rtol: float) -> dict:
    """Worst relative difference per metric over the steps, and whether all are within ``rtol``."""
    worst = {m: max(abs(b[m] - a[m]) / max(abs(a[m]), 1e-12) for a, b in zip(reference, fp8)) for m in METRICS}
    return {"worst_relative_difference": worst, "passed": all(v <= rtol for v in worst.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--out", required=True, help="the parity report (JSON) to write")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rtol", type=float, default=0.05)
    p.add_argument("--recipe", choices=["delayed", "tensorwise"], default="delayed")
    p.add_argument("overrides", nargs="*")
    args, extra = p.parse_known_args(argv)
    if any("=" not in e or e.startswith("-") for e in extra):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*args.overrides, *extra]  # key=value overrides may come after the options

    from megatron_adapters.layers.specs import te_available
    from pdmd.core.config import ConfigError, FP8Config, load_config, parity_key

    ok, why = te_available()
    if not ok:
        print(f"fp8_parity: {why}: the check needs a GPU with Transformer Engine", file=sys.stderr)
        return 2
    try:
        reference_cfg = load_config(args.config, [*args.overrides, "model.spec=te", "model.dtype=bf16", "model.fp8=null"])
    except ConfigError as exc:
        print(f"fp8_parity: {exc}", file=sys.stderr)
        return 2
    # The FP8 run's config is built here, not validated: a trained role in FP8 needs the report this writes.
    fp8_cfg = copy.deepcopy(reference_cfg)
    fp8_cfg.model.fp8 = FP8Config(recipe=args.recipe, roles=["student", "fake"])
    reference = run_steps(reference_cfg, args.steps)
    fp8 = run_steps(fp8_cfg, args.steps)
    result = compare(reference, fp8, args.rtol)
    report = {"config_hash": parity_key(reference_cfg), "recipe": args.recipe, "steps": args.steps, "rtol": args.rtol,
              "bf16": reference, "fp8": fp8, **result}
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"fp8_parity: {'PASSED' if result['passed'] else 'FAILED'} (worst relative differences "
              f"{ {k: round(v, 4) for k, v in result['worst_relative_difference'].items()} }, rtol {args.rtol}); "
              f"report {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
