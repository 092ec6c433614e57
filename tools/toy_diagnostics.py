"""Diagnostics of the exact-ground-truth benchmark (issue 17, docs/benchmarks.md): the experiments behind
the findings, on the same task, trainer, exporter and metrics as `pdmd bench toy`, one question each.

    python tools/toy_diagnostics.py teacher  --out DIR --network 8x16x512           # fit a teacher network
    python tools/toy_diagnostics.py distill  --out DIR --teacher-dir T [--oracle-fake] [key=value ...]
    python tools/toy_diagnostics.py phases   --out DIR --export E --teacher-dir T     # which phase loses what
    python tools/toy_diagnostics.py shape    --out DIR --export E                     # where the extra spread lies
    python tools/toy_diagnostics.py kd       --out DIR --teacher-dir T --steps 3000   # a 2-step map by regression
    python tools/toy_diagnostics.py commitment [--groups 2]             # when is a mode decided? (prints only)

Each prints one line per result and appends it to DIR/diagnostics.jsonl. DIR caches the task's prompts and
shards (as `pdmd bench toy --out DIR`). Single process, 1 thread; `distill` runs the real `pdmd train`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmd.bench import toy as mb  # noqa: E402
from pdmd.bench.exact_teacher import ExactTeacher  # noqa: E402
from pdmd.bench.mixture import MixtureTask, evaluate  # noqa: E402
from pdmd.core.schedule import few_step_timesteps  # noqa: E402


def _groups_tag(s: mb.BenchSettings) -> str:
    """File-name tag of a grouped task (empty for the default one-group task, so its files keep their names)."""
    return "" if s.groups == 1 else f"_g{s.groups}"


def _setup(args) -> tuple[mb.BenchSettings, MixtureTask, torch.Tensor, Path, Path]:
    torch.set_num_threads(1)
    mb._quiet()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = mb.BenchSettings(task_seed=args.task_seed, groups=args.groups)  # the bench's defaults unless told otherwise
    for name in ("distill_steps", "shift"):
        if getattr(args, name, None) is not None:
            setattr(s, name, getattr(args, name))
    task = s.task()
    _, embeds, negative, shards = mb.prepare_prompts(out, s)
    exact = ExactTeacher(task, embeds, negative).save(out / f"exact_teacher{_groups_tag(s)}_s{args.task_seed}.safetensors")
    return s, task, embeds, shards, exact


def _record(args, name: str, metrics: dict, **extra) -> None:
    row = {"name": name, **extra, **{k: round(float(metrics[k]), 4) for k in ("coverage", "tv", "spread_ratio", "precision")}}
    print(json.dumps(row), flush=True)
    with open(Path(args.out) / "diagnostics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def cmd_teacher(args) -> None:
    """Fit a teacher network by regression on the exact velocity; score its 4-step and converged samples."""
    from data.tiny_encoders import UMT5_DIM
    from megatron_adapters.flow_teacher import FlowTeacherConfig, train_flow_teacher
    from pdmd.bench.tiny_models import write_tiny_wan22_teacher

    s, task, embeds, _, _ = _setup(args)
    heads, head_dim, ffn = (int(v) for v in args.network.split("x"))
    depth = "" if args.layers == 2 else f"_{args.layers}layers"
    shared, expert = args.shared_steps or s.teacher_shared_steps, args.expert_steps or s.teacher_expert_steps
    budget = (s.teacher_shared_steps, s.teacher_expert_steps)
    steps = "" if (shared, expert) == budget else f"_steps{shared}-{expert}"
    folder = Path(args.out) / f"teacher_{args.network}{depth}{_groups_tag(s)}{steps}_s{args.task_seed}"
    shutil.rmtree(folder, ignore_errors=True)
    write_tiny_wan22_teacher(folder, seed=s.task_seed, boundary=mb.BOUNDARY, text_dim=UMT5_DIM, num_layers=args.layers,
                             num_attention_heads=heads, attention_head_dim=head_dim, ffn_dim=ffn)

    def data(batch, gen):
        idx = torch.randint(task.num_prompts, (batch,), generator=gen)
        return task.sample(idx, gen)[0], embeds[idx], idx

    tic = time.time()
    curves = train_flow_teacher(folder, data, FlowTeacherConfig(seed=s.task_seed, shared_steps=shared, expert_steps=expert),
                                boundary=mb.BOUNDARY, exact=lambda x, t, i: task.velocity(x, t, i).float())
    seconds = time.time() - tic
    v = mb.teacher_velocity(folder)
    for name, plan in (("4 steps", mb.few_step_plan(s)), ("200 steps", mb.reference_plan(s))):
        x, idx, _ = mb.draw(v, plan, embeds, s, 0)
        _record(args, f"teacher {args.network} {name}", evaluate(task, x, idx), fit_seconds=round(seconds),
                final_loss={k: round(sum(c[-20:]) / 20, 4) for k, c in curves.items()}, folder=str(folder))


def _install_oracle_fake(task: MixtureTask, exact_file: Path, n_fit: int = 1024) -> None:
    """Phase 2's fake velocity := the closed-form velocity of a Gaussian mixture fitted (per prompt and
    mode: mean and one scale of the true per-dimension profile) to fresh samples of the current generator,
    refit before every generator update. A fake with no lag and no network error."""
    from megatron_adapters.backend import MegatronBackend
    from pdmd.core.method import PhaseTrainer

    lookup, state = ExactTeacher.load(exact_file), {"q": None}
    velocity, generator_step = MegatronBackend.velocity, PhaseTrainer.generator_step

    def oracle_velocity(self, role, x, t, text, cond=None):
        if role == "fake" and state["q"] is not None:
            return state["q"].velocity(x.float(), t, lookup.prompt_index(text)).float()
        return velocity(self, role, x, t, text, cond)

    def refit_then_step(self, step, text, negative, cond=None):
        state["q"] = None
        if self.k == self.plan.num_phases:
            g = torch.Generator().manual_seed(1000 + step)
            pidx = torch.arange(task.num_prompts).repeat_interleave(n_fit // task.num_prompts)
            texts = lookup.prompt_embeds[pidx]
            xs = torch.cat([self.rollout(texts[i:i + 256], g).x_gen for i in range(0, len(pidx), 256)])
            xf, mode = xs.reshape(len(pidx), -1).double(), task.assign(xs, pidx)
            w = torch.full(task.weights.shape, 1e-6, dtype=torch.float64)
            mu, sd = task.means.clone(), task.stds.clone()
            for p in range(task.num_prompts):
                for m in range(task.num_modes):
                    sel = (pidx == p) & (mode == m)
                    if int(sel.sum()) >= 4:
                        w[p, m], mu[p, m] = float(sel.sum()), xf[sel].mean(0)
                        ratio = ((xf[sel] - mu[p, m]).pow(2).mean(0) / task.stds[p, m].pow(2)).mean().sqrt()
                        sd[p, m] = task.stds[p, m] * ratio
            state["q"] = MixtureTask(task.latent_shape, w / w.sum(1, keepdim=True), mu, sd)
        return generator_step(self, step, text, negative, cond)

    MegatronBackend.velocity, PhaseTrainer.generator_step = oracle_velocity, refit_then_step


def cmd_distill(args) -> None:
    """One Phased DMD run (the bench's recipe and overrides, plus yours) from a given teacher network."""
    from pdmd.core.config import load_config
    from pdmd.export.convert import export
    from pdmd.export.layout import ExportOptions
    from pdmd.export.pipelines import ExportedExperts
    from pdmd.train import train

    s, task, embeds, shards, exact = _setup(args)
    method = next(m for m in mb.methods(s) if m.key == args.method)
    overrides = [*method.overrides, *([f"model.teacher.exact={exact}"] if args.real == "exact" else []), *args.overrides]
    if args.oracle_fake:
        _install_oracle_fake(task, exact)
    cfg = load_config(mb.recipe(s, Path(args.teacher_dir), shards, args.seed), overrides)
    name = f"{args.name}_seed{args.seed}_{cfg.hash()[:8]}"
    run_dir, exported = Path(args.out) / "runs" / name, Path(args.out) / "exports" / name
    tic = time.time()
    if train(cfg, str(run_dir)):
        raise SystemExit(f"pdmd train failed; see {run_dir}")
    if not (exported / "pdmd_export.json").is_file():
        export(ExportOptions(run=run_dir, out=exported))
    experts = ExportedExperts(exported)
    x, idx, _ = mb.draw(experts.velocity, experts.plan, embeds, s, args.seed)
    _record(args, args.name, evaluate(task, x, idx), seed=args.seed, real=args.real, overrides=args.overrides,
            oracle_fake=args.oracle_fake, shift=s.shift, distill_steps=s.distill_steps,
            seconds=round(time.time() - tic), export=str(exported))


def _euler(velocity, x, grid):
    for a, b in zip(grid[:-1], grid[1:]):
        x = x + (b - a) * velocity(x, torch.full((x.shape[0],), a))
    return x


def cmd_phases(args) -> None:
    """Each phase's expert before or after the exact flow (fine uniform Euler steps) and the teacher's steps."""
    from pdmd.export.pipelines import ExportedExperts

    s, task, embeds, _, _ = _setup(args)
    experts = ExportedExperts(args.export)
    ts = [*experts.plan.timesteps, 0.0]
    idx = torch.arange(task.num_prompts).repeat_interleave(s.samples)
    text, z = embeds[idx], torch.randn(len(idx), *s.latent_shape, generator=torch.Generator().manual_seed(10_000))
    teacher = mb.teacher_velocity(Path(args.teacher_dir))

    def exact(x, t):
        return task.velocity(x, t, idx).float()

    def expert(k):
        return lambda x, t: experts.velocity(k, x, t, text)

    def net(x, t):
        return teacher(0, x, t, text)

    def fine(a, b, n):
        return [a + (b - a) * u for u in torch.linspace(0, 1, n + 1).tolist()]

    with torch.no_grad():
        x1, xe = _euler(expert(1), z, ts[:3]), _euler(exact, z, fine(1.0, ts[2], 300))
        rows = {"phase-1 expert + exact flow": _euler(exact, x1, fine(ts[2], 0.0, 400)),
                "exact flow + phase-2 expert": _euler(expert(2), xe, ts[2:]),
                "phase-1 + phase-2 experts (the student)": _euler(expert(2), x1, ts[2:]),
                "exact flow to t_3 + phase-2 last step": _euler(expert(2), _euler(exact, xe, fine(ts[2], ts[3], 200)), ts[3:]),
                "teacher steps + phase-2 expert": _euler(expert(2), _euler(net, z, ts[:3]), ts[2:]),
                "exact flow + 2 exact Euler steps": _euler(exact, xe, ts[2:])}
        # Phase 1 replaced by the perfect teacher's own few steps (what a student that learnt nothing in phase 1
        # would do at best), then a perfect or the distilled phase 2: how much of the outcome phase 1 decides.
        xs = _euler(exact, z, ts[:3])
        rows |= {"exact Euler steps + exact flow": _euler(exact, xs, fine(ts[2], 0.0, 400)),
                 "exact Euler steps + phase-2 expert": _euler(expert(2), xs, ts[2:]),
                 "exact flow throughout": _euler(exact, xe, fine(ts[2], 0.0, 400))}
    for name, x in rows.items():
        _record(args, name, evaluate(task, x, idx), export=args.export)


def cmd_shape(args) -> None:
    """Where a student's extra spread lies: per mode, the eigenvalues of the whitened sample covariance and
    the share of its variance along the directions to the prompt's other modes (3 of 64 dimensions)."""
    from pdmd.export.pipelines import ExportedExperts

    s, task, embeds, _, _ = _setup(args)
    experts = ExportedExperts(args.export)
    x, idx, _ = mb.draw(experts.velocity, experts.plan, embeds, s, 0)
    xf, mode = x.reshape(len(idx), -1).double(), task.assign(x, idx)
    for p in range(task.num_prompts):
        for m in range(task.num_modes):
            sel = (idx == p) & (mode == m)
            if int(sel.sum()) < 20:
                continue
            z = (xf[sel] - task.means[p, m]) / task.stds[p, m]
            cov = torch.cov(z.T)
            ev = torch.linalg.eigvalsh(cov)
            others = torch.stack([(task.means[p, o] - task.means[p, m]) / task.stds[p, m]
                                  for o in range(task.num_modes) if o != m], 1)
            q, _ = torch.linalg.qr(others)
            row = {"prompt": p, "mode": m, "n": int(sel.sum()), "mean_bias_sq_per_dim": round(float(z.mean(0).pow(2).mean()), 3),
                   "top_eigs": [round(float(e), 2) for e in ev[-2:].flip(0)], "median_eig": round(float(ev.median()), 2),
                   "share_toward_other_modes": round(float(torch.trace(q.T @ cov @ q) / torch.trace(cov)), 3)}
            print(json.dumps(row), flush=True)


def cmd_kd(args) -> None:
    """Can the network represent a sharp 2-step map at all? Train the low-noise expert as a 2-step generator
    (t = 0.833 -> 0.625 -> 0) by regression onto the exact ODE's endpoint from exact x_0.833 (backprop
    through both steps), then score it from fresh exact x_0.833."""
    from diffusers import WanTransformer3DModel

    s, task, embeds, _, _ = _setup(args)
    net = WanTransformer3DModel.from_pretrained(Path(args.teacher_dir) / "transformer_2")
    ts = list(few_step_timesteps(s.num_steps, 5.0))[2:] + [0.0]  # Wan's shift-5 phase 2

    def ode(x, idx, a, b, n):
        grid = [a + (b - a) * u for u in torch.linspace(0, 1, n + 1).tolist()]
        return _euler(lambda y, t: task.velocity(y, t, idx).float(), x, grid)

    def student(x, text):
        for a, b in zip(ts[:-1], ts[1:]):
            x = x + (b - a) * net(x, torch.full((x.shape[0],), a * 1000.0), text, return_dict=False)[0]
        return x

    g = torch.Generator().manual_seed(0)
    pidx = torch.randint(task.num_prompts, (4096,), generator=g)
    start = ode(torch.randn(4096, *s.latent_shape, generator=g), pidx, 1.0, ts[0], 100)
    target = ode(start, pidx, ts[0], 0.0, 300)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    for _ in range(args.steps):
        b = torch.randint(4096, (64,), generator=g)
        loss = (student(start[b], embeds[pidx[b]]) - target[b]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    idx = torch.arange(task.num_prompts).repeat_interleave(s.samples)
    with torch.no_grad():
        x0 = ode(torch.randn(len(idx), *s.latent_shape, generator=torch.Generator().manual_seed(10_000)), idx, 1.0, ts[0], 100)
        x = student(x0, embeds[idx])
    _record(args, "kd 2-step regression", evaluate(task, x, idx), steps=args.steps, lr=args.lr,
            teacher_dir=args.teacher_dir, final_loss=round(float(loss), 4))


def cmd_commitment(args) -> None:
    """When is a sample's mode decided? For exact x_t = (1 - t) x0 + t eps, the exact posterior over the prompt's
    modes under the law of x_t (`MixtureTask.at_time`): the share of the mode's entropy it removes and how often
    its argmax is the true mode, per t (with groups, also the group's). No network."""
    s = mb.BenchSettings(task_seed=args.task_seed, groups=args.groups)
    task, gen = s.task(), torch.Generator().manual_seed(0)
    idx = torch.arange(task.num_prompts).repeat_interleave(args.samples)
    x0, mode = task.sample(idx, gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    w = task.weights[idx]
    prior_entropy = float(-(w * w.log()).sum(1).mean())
    for t in args.t:
        post = task.at_time(t).posterior((1 - t) * x0 + t * eps, idx)
        entropy = float(-(post * post.clamp_min(1e-300).log()).sum(1).mean())
        row = {"t": t, "groups": args.groups, "task_seed": args.task_seed,
               "mode_information": round(1 - entropy / prior_entropy, 3),
               "mode_accuracy": round(float((post.argmax(1) == mode).double().mean()), 3)}
        if args.groups > 1:  # mode m sits in group m % groups
            group_post = torch.stack([post[:, g::args.groups].sum(1) for g in range(args.groups)], 1)
            row["group_accuracy"] = round(float((group_post.argmax(1) == mode % args.groups).double().mean()), 3)
        print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("teacher", "distill", "phases", "shape", "kd"):
        c = sub.add_parser(name)
        c.add_argument("--out", required=True)
        c.add_argument("--task-seed", type=int, default=0)
        c.add_argument("--groups", type=int, default=1, help="far-apart mode groups per prompt (as pdmd bench toy)")
        if name in ("distill", "phases", "kd"):
            c.add_argument("--teacher-dir", required=True)
        if name in ("phases", "shape"):
            c.add_argument("--export", required=True)
    sub.choices["teacher"].add_argument("--network", default="8x32x1024", help="HEADSxHEAD_DIMxFFN")
    sub.choices["teacher"].add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    sub.choices["teacher"].add_argument("--shared-steps", type=int, help="fit steps on all of t (default: the bench's)")
    sub.choices["teacher"].add_argument("--expert-steps", type=int, help="fit steps per expert (default: the bench's)")
    d = sub.choices["distill"]
    d.add_argument("--name", default="run")
    d.add_argument("--method", default="phased_dmd", choices=["phased_dmd", "dmd2_sgts"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--real", default="exact", choices=["exact", "trained"], help="the real score")
    d.add_argument("--distill-steps", type=int, help="generator updates (default: the bench's)")
    d.add_argument("--shift", type=float, help="time shift of the student's few-step schedule (default: the bench's)")
    d.add_argument("--oracle-fake", action="store_true", help="phase 2's fake := a Gaussian fit of the generator")
    d.add_argument("overrides", nargs="*", help="trainer overrides, e.g. method.fake_ratio=5")
    c = sub.add_parser("commitment")
    c.add_argument("--task-seed", type=int, default=0)
    c.add_argument("--groups", type=int, default=1)
    c.add_argument("--samples", type=int, default=2000, help="per prompt")
    c.add_argument("--t", type=float, nargs="+", default=[0.95, 0.9, 0.833, 0.75, 0.6, 0.5, 0.4, 0.25])
    k = sub.choices["kd"]
    k.add_argument("--steps", type=int, default=3000)
    k.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    {"teacher": cmd_teacher, "distill": cmd_distill, "phases": cmd_phases, "shape": cmd_shape, "kd": cmd_kd,
     "commitment": cmd_commitment}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
