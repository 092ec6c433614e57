"""`pdmd train CONFIG --run-dir DIR [--phase all|auto|K] [key=value ...]`: run the phases of a distillation.

All phases in order in one process (default), or one phase per invocation (``--phase auto`` = the next
pending one; what one Slurm job per phase runs). Resumable: rerun the same command after any stop.
SIGTERM/SIGUSR1 save a checkpoint at the next step boundary and exit with code 75 (EX_TEMPFAIL), which
the Slurm scripts treat as "requeue me"; Ctrl-C (SIGINT) saves the same way and exits 130 (75 under Slurm);
a second Ctrl-C stops at once. Exit codes (docs/training.md): 0 done, 2 a mistake in the config, the
command, the data or the run directory (retrying cannot help), 3 training diverged (non-finite steps;
retrying from the same checkpoint would diverge again), 75 preempted, 130 interrupted, 1 anything else
(possibly transient: retried).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

from data.loader import PromptDataConfig, PromptLoader
from data.reader import CorruptShard
from pdmd.core.conditioning import Conditioning
from pdmd.core.config import ConfigError, RunConfig, load_config, lr_at
from pdmd.core.distributed import barrier, is_rank0
from pdmd.core.errors import UserError, last_line
from pdmd.core.method import PhaseTrainer
from pdmd.eval.metrics import mean_pairwise, mean_pairwise_cosine
from pdmd.export.pipelines import decode, save_media, vae_folder
from pdmd.run.console import progress_bar, report_user_error
from pdmd.run.metrics import MetricsLogger
from pdmd.run.rundir import RunDir, tree_hash, tree_size

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130


class TrainingDiverged(RuntimeError):
    """Too many steps in a row with a non-finite DMD target, loss or gradient."""


class NoReadableCheckpoint(UserError):
    """Every kept checkpoint of a phase fails to load."""


class _StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGINT (installed before anything slow is built); the loop checks it between
    steps. A second Ctrl-C interrupts at once (KeyboardInterrupt), without the checkpoint."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._set)
                          for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def _set(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and is_rank0():
            print("pdmd train: Ctrl-C: saving a checkpoint at the end of this step (Ctrl-C again to stop now)",
                  file=sys.stderr, flush=True)
        self.signal = signum

    def agreed(self, device: torch.device) -> int | None:
        """The signal if ANY rank got one. A signal can reach ranks on either side of a step boundary;
        without agreement one rank would start the (collective) save while another starts the next step."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return self.signal
        flag = torch.tensor([self.signal or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML recipe (configs/*.yaml)")
    p.add_argument("--run-dir", required=True, help="run directory: manifest, checkpoints, metrics")
    p.add_argument("--phase", default="all", help="all (default), auto (next pending), or a phase number")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 parallel.tp=2")


def student_experts(cfg: RunConfig, backend) -> list[int]:
    """The teacher expert each phase's student starts from: the one owning the phase's first step."""
    plan = cfg.phase_plan()
    return [int(backend.expert_of(torch.tensor([plan.phase_start(k)]))[0]) for k in plan.phases]


def _phase_loop(cfg: RunConfig, backend, run: RunDir, phases: list[int], logger: MetricsLogger,
                stop: _StopFlag) -> int:
    """Train ``phases``: one phase (the paper's sequential schedule), or all of them interleaved
    (iteration i trains phases[i mod K]; LightX2V). Checkpoints and the resume point live in the
    first phase's manifest entry."""
    manifest = run.read()
    owner = phases[0]
    entry = manifest["phases"][owner - 1]
    plan = cfg.phase_plan()
    label = "+".join(map(str, phases))
    tic = time.perf_counter()
    roles: list[str] = []
    with progress_bar(None, f"phase {label}: building roles", unit="role", enabled=cfg.logging.progress) as bar:
        backend.on_built = lambda name: (roles.append(name), bar.set_postfix_str(name, refresh=False), bar.update(1))
        try:
            if len(phases) == 1:
                earlier = {e["index"]: (e["student_expert"], str(run.path / e["expert"]))
                           for e in manifest["phases"][: owner - 1]}
                backend.setup_phase(owner, entry["student_expert"], earlier, plan.renoise_interval(owner))
            else:
                backend.setup_interleaved({k: (manifest["phases"][k - 1]["student_expert"], plan.renoise_interval(k))
                                           for k in phases})
        finally:
            backend.on_built = None
    if is_rank0():
        print(f"phase {label}: roles {', '.join(roles)} built in {time.perf_counter() - tic:.1f}s", flush=True)
    data_cfg = PromptDataConfig.from_dict({**cfg.data, "batch_size": cfg.train.micro_batch_size * cfg.train.num_micro_batches,
                                           "seed": cfg.seed, "text_dim": backend.text_dim})
    loader = PromptLoader(data_cfg, dp_rank=backend.dp_rank, dp_size=backend.dp_size)
    start, bad_saved = 0, {}
    if entry["checkpoints"]:
        state = _load_newest_intact(backend, run, entry["checkpoints"])
        loader.load_state_dict(state["loader"])
        start, bad_saved = state["step"], state.get("bad_steps", {})
    logger.rewind((owner - 1) * cfg.train.steps + start)  # the steps after the resume point run again
    for k in phases:
        run.update_phase(k, status="running")
    trainers = {k: PhaseTrainer(backend, plan, k, cfg.method, cfg.train.latent_shape, cfg.seed) for k in phases}
    previews = _Previews(cfg, run, data_cfg, backend) if cfg.logging.sample_every or cfg.logging.eval_every else None
    negative_single = _text(backend, loader.negative)
    batches = loader.forever()
    warmup: dict[int, float] = {}  # each phase's mean fake loss over its warm-up, logged with its first step
    if start == 0 and cfg.method.fake_warmup:  # a fresh phase: the fakes first learn the starting generator
        for k in phases:
            backend.activate(k)
            losses = []
            for i in range(cfg.method.fake_warmup):
                batch = next(batches)
                cond = Conditioning.from_batch(batch, backend.device)
                losses.append(trainers[k].fake_step(-1 - i, 0, _text(backend, batch), cond)["fake_loss"])
            warmup[k] = sum(losses) / len(losses)
    bad = {k: int(bad_saved.get(str(k), 0)) for k in phases}  # steps in a row skipped; survives a resume
    steps, n = cfg.train.steps, len(phases)
    total = steps * n  # iterations; each phase gets train.steps generator updates
    bar = _progress(cfg, label, start, total)
    console_every = cfg.logging.console_every or max(1, steps // 20)  # batch logs: ~20 lines a phase
    loop_start = time.perf_counter()
    try:
        for it in range(start, total):
            k, step = phases[it % n], it // n
            backend.activate(k)
            trainer = trainers[k]
            tic = time.perf_counter()
            batch = next(batches)
            text = _text(backend, batch)
            negative = negative_single.expand(text.shape[0], *negative_single.shape[1:])
            cond = Conditioning.from_batch(batch, backend.device)  # image-to-video shards; None for text only
            lrs = {"student": lr_at(cfg.student, step, steps), "fake": lr_at(cfg.fake, step, steps)}
            backend.set_lr(lrs)
            fake = [trainer.fake_step(step, i, text, cond) for i in range(cfg.method.fake_ratio)]
            gen = trainer.generator_step(step, text, negative, cond)
            skipped = bool(gen.get("skipped")) or any(f.get("skipped") for f in fake)
            bad[k] = bad[k] + 1 if skipped else 0
            if bad[k] >= cfg.train.max_bad_steps:
                run.update_phase(k, status="failed")
                kept = run.read()["phases"][owner - 1]["checkpoints"]
                raise TrainingDiverged(
                    f"phase {k}: {bad[k]} steps in a row had a non-finite DMD target, loss or gradient (each was "
                    f"skipped for every role); the last good checkpoint is {kept[0] if kept else 'none (the phase start)'}. "
                    "Rerun the same command with a lower student.lr / fake.lr (learning rates may change on resume; "
                    "the manifest records it) or method.cfg_scale in a new --run-dir, or model.dtype=fp32")
            elapsed = time.perf_counter() - tic
            scalars = {f"phase{k}/{name}": value for name, value in gen.items()}
            scalars[f"phase{k}/fake_loss"] = sum(f["fake_loss"] for f in fake) / len(fake)
            scalars[f"phase{k}/fake_grad_norm"] = max(f["fake_grad_norm"] for f in fake)
            scalars[f"phase{k}/samples_per_s"] = text.shape[0] * backend.dp_size / elapsed
            scalars[f"phase{k}/step_time_s"] = elapsed
            scalars[f"phase{k}/bad_steps_in_a_row"] = float(bad[k])
            scalars[f"phase{k}/student_lr"] = lrs["student"]
            scalars[f"phase{k}/fake_lr"] = lrs["fake"]
            scalars[f"phase{k}/peak_memory_gb"] = _peak_memory_gb()
            if k in warmup:
                scalars[f"phase{k}/fake_warmup_loss"] = warmup.pop(k)
            done, global_step = it + 1, (owner - 1) * steps + it + 1
            eval_due = bool(cfg.logging.eval_every) and (step + 1) % cfg.logging.eval_every == 0
            if eval_due:  # every rank: the preview passes are collective
                scalars.update(previews.diversity(trainer, k, cfg.logging.eval_seeds))
            if (step + 1) % cfg.train.log_every == 0 or eval_due:
                logger.log(global_step, scalars)
                logger.log_histogram(global_step, f"phase{k}/t", trainer.last_t)
            if bar is not None or (step + 1) % console_every == 0 or step + 1 == steps:
                eta = (time.perf_counter() - loop_start) / (it + 1 - start) * (total - it - 1)
                line = (f"phase {k} step {step + 1}/{steps} generator_loss={gen['generator_loss']:.4g} "
                        f"fake_loss={scalars[f'phase{k}/fake_loss']:.4g} ({elapsed:.2f}s; eta {_duration(eta)})")
                if bar is not None:
                    bar.set_postfix_str(line, refresh=False)
                elif is_rank0():
                    print(line, flush=True)
            if bar is not None:
                bar.update(1)
            if cfg.logging.sample_every and (step + 1) % cfg.logging.sample_every == 0:
                previews.log(trainer, logger, k, step + 1, global_step)
            signalled = stop.agreed(backend.device)
            due = done % cfg.train.checkpoint_every == 0 or done == total or signalled is not None
            # never from a state that is not known good: after a skipped step the save waits for a good one
            # (a signal saves anyway: the counter travels with it); never with a non-finite parameter or moment
            save = due and (bad[k] == 0 or signalled is not None)
            if save and not backend.params_finite():
                run.update_phase(k, status="failed")
                raise TrainingDiverged(f"phase {k}: a parameter or optimizer moment became non-finite at step {done}; "
                                       "no checkpoint was written from it. Resume from the last good checkpoint "
                                       "with a lower student.lr / fake.lr")
            if save:
                backend.save(run.step_dir(owner, done), {"step": done, "loader": loader.state_dict(), "phase": owner,
                                                         "phases": phases,
                                                         "bad_steps": {str(j): n for j, n in bad.items()}})
                if is_rank0():
                    run.record_checkpoint(owner, done, cfg.train.keep_last)
                    for j in phases if n > 1 else []:  # interleaved: each phase's own updates so far
                        run.update_phase(j, step=sum(1 for i in range(done) if phases[i % n] == j))
                barrier()
            if signalled is not None and done < total:  # every rank says so: Slurm logs show each task
                counted = " (iterations over all phases)" if n > 1 else ""
                print(f"phase {k}: signal {signalled} received, checkpoint at step {done} saved{counted}; exiting",
                      flush=True)
                interactive = signalled == signal.SIGINT and "SLURM_JOB_ID" not in os.environ
                return EXIT_INTERRUPTED if interactive else EXIT_PREEMPTED
    finally:
        if bar is not None:
            bar.close()
    digests = {}
    for k in phases:  # every expert written before any phase is marked done (interleaved: all or none)
        tic = time.perf_counter()
        backend.activate(k)
        backend.save_expert(run.expert_dir(k))
        barrier()
        if is_rank0():
            saved = time.perf_counter() - tic
            digests[k] = tree_hash(run.expert_dir(k), desc=f"phase {k}: hashing the expert")
            print(f"phase {k}: expert saved to {run.expert_dir(k)} ({_size(tree_size(run.expert_dir(k)))}) "
                  f"in {saved:.1f}s, hashed in {time.perf_counter() - tic - saved:.1f}s", flush=True)
    if is_rank0():
        for k in phases:
            run.update_phase(k, status="done", step=steps, expert=str(run.expert_dir(k).relative_to(run.path)),
                             expert_hash=digests[k])
    barrier()
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _load_newest_intact(backend, run: RunDir, checkpoints: list[str]) -> dict:
    """The newest kept checkpoint that loads (newest first), naming each one that does not."""
    for rel in checkpoints:
        try:
            return backend.load(run.path / rel)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            if is_rank0():
                print(f"pdmd train: checkpoint {run.path / rel} does not load ({last_line(exc)}); trying the one before it",
                      file=sys.stderr, flush=True)
    raise NoReadableCheckpoint(f"none of the kept checkpoints of {run.path} loads ({', '.join(checkpoints)}): restore "
                               "one, or remove the phase's 'checkpoints' entries in manifest.json to restart the phase")


def _text(backend, batch: dict) -> torch.Tensor:
    """The text tensor the method passes around, on the device: the backend decides what travels with the
    embeddings (Qwen-Image: its padding mask, packed in as a last channel, pdmd/core/packing.py; Wan: nothing)."""
    return backend.text_input(batch["text_embeds"], batch["text_mask"]).to(backend.device)


def _progress(cfg: RunConfig, k: int | str, start: int, steps: int):
    """A tqdm bar on rank 0 when the console is a terminal; batch logs (Slurm) get a line every
    ``logging.console_every`` steps instead."""
    if not (cfg.logging.progress and is_rank0() and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=steps, initial=start, desc=f"phase {k}", unit="step", dynamic_ncols=True)


class _Previews:
    """Preview samples every ``logging.sample_every`` steps: fixed prompts (the data set's first) and fixed
    noise, so that successive previews show the generator changing, decoded through the VAE on rank 0."""

    def __init__(self, cfg: RunConfig, run: RunDir, data_cfg, backend) -> None:
        first = next(iter(PromptLoader(data_cfg, dp_rank=0, dp_size=1).forever()))
        self.text = _text(backend, first)[: cfg.logging.sample_count]
        cond = Conditioning.from_batch(first, backend.device)
        self.cond = None if cond is None else cond.index(slice(0, len(self.text)))
        self.prompts = list(first.get("prompt", []))[: cfg.logging.sample_count]
        self.vae = vae_folder(cfg.logging.vae)
        self.seed, self.dir = cfg.seed, run.path / "samples"

    def log(self, trainer: PhaseTrainer, logger: MetricsLogger, k: int, done: int, global_step: int) -> None:
        latents = trainer.preview(self.text, self.seed, self.cond)  # every rank: the passes are collective
        if not is_rank0():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        paths = save_media(decode(latents.cpu(), self.vae), self.dir / f"phase{k}_step{done}", "gif")
        logger.log_media(global_step, f"phase{k}/samples", paths, caption=" | ".join(self.prompts))

    def diversity(self, trainer: PhaseTrainer, k: int, seeds: int) -> dict[str, float]:
        """``logging.eval_every``: the preview prompts from ``seeds`` noise seeds; per prompt the mean pairwise
        cosine similarity of the latents (and, with ``logging.vae``, the mean pairwise RMS distance of the
        decoded frames), averaged over prompts: diversity collapse shows while the run can still be stopped."""
        latents = [trainer.preview(self.text, self.seed + 1 + j, self.cond).float().cpu() for j in range(seeds)]
        if not is_rank0():
            return {}
        prompts = range(latents[0].shape[0])
        out = {f"phase{k}/diversity_latent_cosine":
               sum(mean_pairwise_cosine(torch.stack([z[b] for z in latents])) for b in prompts) / len(prompts)}
        if self.vae is not None:
            frames = [torch.from_numpy(decode(z, self.vae)).float() for z in latents]  # [B, F, H, W, 3] each
            out[f"phase{k}/diversity_pixel_rms"] = sum(
                mean_pairwise([f[b] for f in frames], lambda a, c: float((a - c).pow(2).mean().sqrt())) for b in prompts
            ) / len(prompts)
        return out


def _peak_memory_gb() -> float:
    """Peak GPU memory of this rank, or the process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def build_backend(cfg: RunConfig, ctx=None):
    """The trainer's Megatron backend for ``cfg``; ``model.teacher.exact`` (the toy benchmark's closed-form
    teacher) becomes its real score."""
    # lazy: Megatron loads in seconds; --help stays fast
    from megatron_adapters.backend import MegatronBackend

    real_score = None
    if cfg.model.teacher.exact is not None:
        from pdmd.bench.exact_teacher import ExactTeacher  # lazy: only the toy benchmark's recipe sets it

        real_score = ExactTeacher.load(cfg.model.teacher.exact).velocity
    return MegatronBackend(cfg, ctx, real_score=real_score)


def train(cfg: RunConfig, run_dir: str, phase: str = "all") -> int:
    """Run the requested phases; returns the process exit code."""
    stop = _StopFlag()  # before the backend: building 14B of roles takes minutes, and a signal may come
    logger = None
    try:
        backend = build_backend(cfg)
        run = RunDir(run_dir)
        plan = cfg.phase_plan()
        if is_rank0():
            run.create_or_check(plan.to_config(), cfg.hash(), student_experts(cfg, backend), cfg.to_dict(),
                                cfg.content(), resume_changes=cfg.resume_changes)
        barrier()
        manifest = run.read()
        if phase == "all":
            todo = [e["index"] for e in manifest["phases"] if e["status"] != "done"]
        elif phase == "auto":
            nxt = run.next_pending()
            todo = [] if nxt is None else [nxt]
        else:
            todo = [int(phase)]
        if cfg.method.schedule == "interleaved":  # the phases train together: auto and all mean the same
            if phase not in ("all", "auto"):
                raise ConfigError(f"--phase {phase}: method.schedule=interleaved trains all phases together; "
                                  "use --phase all or auto (one job runs the whole distillation)")
            groups = [[e["index"] for e in manifest["phases"] if e["status"] != "done"]]
            groups = [g for g in groups if g]
        else:
            groups = [[k] for k in todo]
        for group in groups:
            run.check_phase_ready(group[0])
            if logger is None:  # only a run with work to do opens a W&B run
                logger = MetricsLogger(run.metrics, cfg.wandb, manifest["wandb_id"], cfg.to_dict(),
                                       rank=0 if is_rank0() else 1)
            code = _phase_loop(cfg, backend, run, group, logger, stop)
            if code:
                return code
        if is_rank0():
            print(f"run {run.path}: phases done: {[e['index'] for e in run.read()['phases'] if e['status'] == 'done']}")
        return 0
    finally:
        if logger is not None:
            logger.close()
        stop.restore()


def check_before_build(cfg: RunConfig, run_dir: str | Path, phase: str) -> None:
    """What can be refused in a second, before minutes of model building: the phase index, the run directory."""
    num = cfg.phase_plan().num_phases
    if phase not in ("all", "auto") and not (phase.isdigit() and 1 <= int(phase) <= num):
        raise ConfigError(f"--phase {phase}: use all, auto or a phase number 1..{num} (the recipe has {num} phases)")
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--run-dir {path} is a file: give a directory (it will hold manifest.json, checkpoints/)")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--run-dir {path}: {parent} is not writable by this user; choose another place")
    RunDir(path).check_trusted()


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        check_before_build(cfg, args.run_dir, args.phase)
        return train(cfg, args.run_dir, args.phase)
    except TrainingDiverged as exc:
        print(f"pdmd train: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except (UserError, ValueError, FileNotFoundError, CorruptShard) as exc:
        # Mistakes a user can act on (bad layout, unfinished earlier phase, changed run, a truncated shard).
        return report_user_error("pdmd train", exc)
