"""The Megatron implementation of the method's model protocol (see pdmd/core/method.py): roles for a phase,
velocities without grad, one optimizer step of a trainable role on a loss of its velocity, checkpoints.

Roles of phase k (docs/architecture.md "Roles, not copies"): the teacher experts (frozen), the student (trainable:
LoRA adapters on the teacher expert that owns the phase's steps, sharing its backbone, or a full copy),
the experts of earlier phases (frozen, LoRA merged), and one fake score per teacher expert (trainable,
re-initialised from that expert at phase start). Every role has the same TP/PP/CP layout; every call
goes through Megatron's pipeline schedule, so PP, micro-batches and the distributed optimizer are hidden
here. Every rank must make the same calls with the same shapes (the method draws its randomness
identically on all model-parallel peers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_adapters.conversion import check_and_load
from megatron_adapters.families.registry import family_for
from megatron_adapters.layers.lora import LoRAConfig, apply_lora, lora_disabled, lora_modules
from megatron_adapters.runtime.parallel import ParallelContext, ParallelLayout, initialize, validate_layout
from pdmd.core.conditioning import Conditioning
from pdmd.core.tensors import DTYPES


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Backbone weights under plain names (LoRA wrappers' ``.base.`` removed, adapters dropped)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("_extra_state") or ".lora_" in k:
            continue
        out[k.replace(".base.", ".")] = v
    return out


def _merge_lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Backbone weights with each adapter folded in: W + scale * B A (per TP shard)."""
    state = _base_state(model)
    names = {id(m): n for n, m in model.named_modules()}
    for m in lora_modules(model):
        key = f"{names[id(m)]}.weight"
        state[key] = state[key] + m.scale * (m.lora_B.float() @ m.lora_A.float()).to(state[key].dtype)
    return state


def _ensure_adam_state(optimizer) -> None:
    """Give parameters that were never stepped a fresh Adam state (step 0, zero moments).

    Without Apex/TE, Megatron's distributed optimizer reads one shared 'step' from the torch state and
    fails when a role was built but not yet updated (e.g. a fake whose expert no sample has hit yet).
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state.get(p):
                    inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _load_optimizer(optimizer, state) -> None:
    """Megatron's distributed-optimizer load, with the torch-Adam 'step' handled (no Apex/TE).

    Without Apex/TE, Megatron keeps Adam's step in the param groups, gives every parameter state the
    SAME step tensor on load, and then expects a per-parameter 'step' among the saved tensors (there is
    none). We let the parameter-state copy keep the step it has, and un-share the tensors afterwards,
    otherwise torch's Adam would add 1 to the shared step once per parameter.
    """
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in chained:
        setter = opt._set_main_param_and_optimizer_states

        def keep_step(model_param, tensors, _opt=opt, _setter=setter):
            if "step" not in tensors:
                group, order = _opt.model_param_group_index_map[model_param]
                main = _opt.optimizer.param_groups[group]["params"][order]
                tensors = {**tensors, "step": _opt.optimizer.state[main]["step"]}
            return _setter(model_param, tensors)

        opt._set_main_param_and_optimizer_states = keep_step
    try:
        optimizer.load_state_dict(state)
    finally:
        for opt in chained:
            del opt._set_main_param_and_optimizer_states
    for opt in chained:
        for param_state in opt.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = param_state["step"].detach().clone()


class Trainable:
    """A trainable role: its model, DDP wrapper and Megatron optimizer, and (``optim.ema`` > 0) an fp32
    moving average of its trainable parameters, which is what the phase exports."""

    def __init__(self, name: str, model, config, optim) -> None:
        self.name, self.model = name, model
        self.ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True),
                                           module=model)
        oc = OptimizerConfig(optimizer="adam", lr=optim.lr, adam_beta1=optim.beta1, adam_beta2=optim.beta2,
                             weight_decay=optim.weight_decay, clip_grad=optim.grad_clip,
                             bf16=config.bf16, params_dtype=config.params_dtype, use_distributed_optimizer=True)
        self.optimizer = get_megatron_optimizer(oc, [self.ddp])
        self.ema_decay = float(getattr(optim, "ema", 0.0))
        self.ema_updates = 0
        # Keyed by parameter name; only what trains (a LoRA student: its adapters) is averaged.
        self._averaged = ({n: p for n, p in model.named_parameters() if p.requires_grad} if self.ema_decay else {})
        self.ema = {n: p.detach().float().clone() for n, p in self._averaged.items()}

    @torch.no_grad()
    def update_ema(self) -> None:
        """Fold the parameters after an optimizer step into the average (diffusers' EMAModel warm-up: the
        first updates move it fast, so the starting weights do not linger in it)."""
        if not self.ema:
            return
        decay = min(self.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
        for n, p in self._averaged.items():
            self.ema[n].lerp_(p.detach().float(), 1 - decay)
        self.ema_updates += 1

    @contextmanager
    def averaged(self):
        """The model with the average's weights in place of its own (restored after)."""
        saved = {n: p.detach().clone() for n, p in self._averaged.items()}
        with torch.no_grad():
            for n, p in self._averaged.items():
                p.copy_(self.ema[n])
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for n, p in self._averaged.items():
                    p.copy_(saved[n])

    def ema_sharded_state_dict(self, prefix: str) -> dict:
        """The average as the model's own sharded tensors (same keys, layouts and resharding), holding the
        fp32 average instead of the weights; loading fills the average in place."""
        originals = {n: p.data for n, p in self._averaged.items()}
        ours = {t.data_ptr(): t for t in self.ema.values()}
        kept = {}
        try:
            for n, p in self._averaged.items():
                p.data = self.ema[n]
            for key, value in self.model.sharded_state_dict(prefix=prefix).items():
                data = getattr(value, "data", None)
                if torch.is_tensor(data) and data.data_ptr() in ours:
                    value.data = ours[data.data_ptr()]  # the average itself, not the (restored) parameter
                    kept[key] = value
        finally:
            for n, p in self._averaged.items():
                p.data = originals[n]
        if len(kept) != len(self.ema):
            raise RuntimeError(f"{self.name}: {len(self.ema)} averaged parameters but {len(kept)} checkpoint tensors "
                               "hold them; the moving average cannot be checkpointed for this model")
        return kept


class MegatronBackend:
    """The protocol of pdmd/core/method.py over Megatron models of one family (``model.kind``:
    megatron_adapters/families/registry.py says how each family is built, loaded and called)."""

    def __init__(self, cfg, ctx: ParallelContext | None = None,
                 real_score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        """``real_score`` (x, t, text) -> v replaces the teacher role's velocities (a closed-form teacher, as
        the toy benchmark's exact mixture); the teacher networks are still built, to start students and fakes."""
        self.cfg = cfg
        self.family = family_for(cfg.model.kind, cfg.model.teacher.path, cfg.model.teacher.subfolders)
        self.configs = self.family.configs  # per-expert architecture configs
        self.boundary = cfg.model.teacher.boundary
        layout = ParallelLayout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp,
                                sequence_parallel=cfg.parallel.sequence_parallel,
                                pp_layers=None if cfg.parallel.pp_layers is None else tuple(cfg.parallel.pp_layers),
                                cp_comm=cfg.parallel.cp_comm)
        self.tokens = self.family.tokens(cfg.train.latent_shape)
        self.family.check_conditioning(cfg.data.get("conditioning"))
        heads, layers = self.family.num_heads, self.family.num_layers
        world = dist.get_world_size() if dist.is_initialized() else None
        if world is not None:  # the layout must fit the model before anything is built
            validate_layout(layout, world, num_heads=heads, num_layers=layers, seq_len=self.tokens)
        self.ctx = ctx or initialize(layout, seed=cfg.seed, timeout_minutes=cfg.parallel.timeout_minutes,
                                     num_heads=heads, num_layers=layers)
        validate_layout(layout, dist.get_world_size(), num_heads=heads, num_layers=layers, seq_len=self.tokens)
        self.dtype = DTYPES[cfg.model.dtype]
        recompute = ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
                     if cfg.model.recompute == "full" else {})
        self.tconfig = self.family.transformer_config(self.ctx.model_parallel_kwargs(), params_dtype=self.dtype,
                                                      **recompute)
        self.spec = self.family.layer_spec(cfg.model.spec)
        fp8 = cfg.model.fp8
        # Roles in FP8 (TE linears under Megatron's FP8 autocast with this recipe) get their own config.
        self.tconfig_fp8 = None if fp8 is None else self.family.transformer_config(
            self.ctx.model_parallel_kwargs(), params_dtype=self.dtype, fp8="hybrid", fp8_recipe=fp8.recipe, **recompute)
        self.fp8_roles = set() if fp8 is None else set(fp8.roles)
        self.teachers: dict[int, torch.nn.Module] = {}
        self.experts: dict[int, torch.nn.Module] = {}
        self.trainables: dict[str, Trainable] = {}  # the active region's
        self.regions: dict[int, dict] = {}  # k -> that region's trainables, student expert, checkpoint prefix
        self.frozen: dict[int, torch.nn.Module] = {}  # finished earlier phases' experts (sequential schedule)
        self.student_expert = 0
        self.real_score = real_score
        self.on_built: Callable[[str], None] | None = None  # told each role's name once it is built and loaded

    # -- protocol: who we are ---------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self.ctx.dp_rank

    @property
    def dp_size(self) -> int:
        return self.ctx.dp_size

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def text_dim(self) -> int:
        return self.family.text_dim

    def text_input(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The text tensor the method passes for a batch's ``text_embeds`` and ``text_mask`` (pdmd/core/packing.py):
        Wan's embeddings as they are; Qwen-Image's with the mask packed in."""
        return self.family.text_input(embeds, mask)

    def experts_touching(self, lo: float, hi: float) -> list[int]:
        """Teacher experts whose time range meets the interval (lo, hi]."""
        if len(self.configs) == 1:
            return [0]
        return [e for e, hit in ((0, hi >= self.boundary), (1, lo < self.boundary)) if hit]

    def expert_of(self, t: torch.Tensor) -> torch.Tensor:
        """Which teacher expert owns each time (0 = high noise); Wan2.2 A14B: t >= boundary -> 0."""
        if len(self.configs) == 1:
            return torch.zeros_like(t, dtype=torch.long)
        return (t < self.boundary).long()

    # -- roles ------------------------------------------------------------------------------------
    def build_model(self, expert: int, fp8: bool = False) -> torch.nn.Module:
        """This rank's stage of teacher expert ``expert``'s architecture, random weights, on the device
        (its blocks under FP8 autocast when ``fp8``)."""
        return self.family.build(self.tconfig_fp8 if fp8 else self.tconfig, expert, self.spec).to(self.device)

    def _new_model(self, expert: int, fp8: bool = False) -> torch.nn.Module:
        model = self.build_model(expert, fp8)
        self.family.load_teacher(model, expert)
        return model

    def setup_phase(self, k: int, student_expert: int, earlier: dict[int, tuple[int, str]],
                    renoise_interval: tuple[float, float]) -> None:
        """Build phase k's roles, and only those: teachers and fakes for the experts whose range the
        phase's re-noise interval touches, the student, and the frozen experts of earlier phases
        (``earlier[j] = (teacher expert, checkpoint dir)``)."""
        self.teachers, self.regions, self.frozen = {}, {}, {}
        for e in self._teacher_set({k: (student_expert, renoise_interval)}):
            self.teachers[e] = self._built(f"teacher{e}", _frozen(self._new_model(e, self._teacher_fp8(e, [student_expert]))))
        self.regions[k] = self._region_roles(k, student_expert, renoise_interval, prefix="")
        self.frozen = {j: self._built(f"expert:{j}", _frozen(self.load_expert(e, ckpt, fp8="expert" in self.fp8_roles)))
                       for j, (e, ckpt) in earlier.items()}
        self.activate(k)

    def _built(self, name: str, model: torch.nn.Module) -> torch.nn.Module:
        if self.on_built is not None:
            self.on_built(name)
        return model

    def setup_interleaved(self, regions: dict[int, tuple[int, tuple[float, float]]]) -> None:
        """LightX2V's arrangement: every region's student and fakes resident and trained in turn;
        ``regions[k] = (teacher expert of its student, re-noise interval)``. Region k's rollout runs the
        LIVE students of regions < k (no grad) instead of frozen finished experts."""
        lora = self.cfg.student.lora
        experts = [e for e, _ in regions.values()]
        if lora is not None and len(set(experts)) < len(experts):
            raise ValueError("method.schedule=interleaved with LoRA students needs each region on its own teacher "
                             f"expert (students start from experts {experts}); set student.lora=null")
        self.teachers, self.regions, self.frozen = {}, {}, {}
        for e in self._teacher_set(regions):
            self.teachers[e] = self._built(f"teacher{e}", _frozen(self._new_model(e, self._teacher_fp8(e, experts))))
        for k, (e, interval) in regions.items():
            self.regions[k] = self._region_roles(k, e, interval, prefix=f"region{k}.")
        self.activate(min(regions))

    def activate(self, k: int) -> None:
        """Make region k's roles the ones ``student`` / ``fake{e}`` / ``expert:j`` name."""
        region = self.regions[k]
        self.trainables = region["trainables"]
        self.student_expert = region["student_expert"]
        live = {j: r["trainables"]["student"].ddp for j, r in self.regions.items() if j < k}
        self.experts = {**self.frozen, **live}

    def _teacher_fp8(self, expert: int, student_experts: list[int]) -> bool:
        """A teacher runs FP8 if configured, except the backbone a LoRA student trains on (unless the
        student itself is an FP8 role: it IS that backbone)."""
        if "teacher" not in self.fp8_roles:
            return False
        shared = self.cfg.student.lora is not None and expert in student_experts
        return not shared or "student" in self.fp8_roles

    def _teacher_set(self, regions: dict[int, tuple[int, tuple[float, float]]]) -> list[int]:
        lora = self.cfg.student.lora is not None
        wanted: set[int] = set()
        for e, interval in regions.values():
            wanted |= set(self.experts_touching(*interval)) | ({e} if lora else set())
        return sorted(wanted)

    def _region_roles(self, k: int, student_expert: int, renoise_interval: tuple[float, float], prefix: str) -> dict:
        """One region's trainable student (LoRA on the teacher expert's backbone, or a full copy) and its
        fakes, one per teacher expert the re-noise interval touches, initialised from that expert."""
        lora = self.cfg.student.lora
        if lora is not None:
            student = self.teachers[student_expert]
            apply_lora(student, LoRAConfig(rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets),
                                           seed=self.cfg.seed + k))
        else:
            student = self._new_model(student_expert, "student" in self.fp8_roles)
        trainables = {"student": Trainable(f"{prefix}student", student.train(), student.config, self.cfg.student)}
        self._built(f"{prefix}student", student)
        for e in self.experts_touching(*renoise_interval):
            fake = self.build_model(e, "fake" in self.fp8_roles)
            check_and_load(fake, _base_state(self.teachers[e]), f"initialising fake{e} from teacher expert {e}")
            trainables[f"fake{e}"] = Trainable(f"{prefix}fake{e}", fake.train(), fake.config, self.cfg.fake)
            self._built(f"{prefix}fake{e}", fake)
        return {"trainables": trainables, "student_expert": student_expert, "prefix": prefix}

    def _module(self, role: str, e: int):
        if role == "teacher":  # a teacher carrying a LoRA student's adapters runs with them off
            return self.teachers[e], bool(lora_modules(self.teachers[e]))
        if role == "fake":
            return self.trainables[f"fake{e}"].ddp, False
        if role == "student":
            return self.trainables["student"].ddp, False
        return self.experts[int(role.split(":")[1])], False

    # -- protocol: velocities and updates ---------------------------------------------------------
    def _run(self, module, x, t, text, loss_fn=None, cond: Conditioning | None = None):
        """One pass through the schedule over ``train.num_micro_batches`` equal micro-batches (fewer when
        the batch does not divide); returns the velocity on every rank. With ``loss_fn(v, idx)`` (idx =
        the micro-batch's sample indices) it also runs the backward; the schedule averages the
        micro-batch losses, so the gradients are those of the whole batch's mean loss. ``cond`` (image
        conditioning) changes the model's input and, for TI2V, gives per-token timesteps."""
        b = x.shape[0]
        chunks = list(torch.arange(b, device=x.device).tensor_split(math.gcd(b, self.cfg.train.num_micro_batches)))
        outputs = []
        shape = x.shape
        inputs = self.family.inputs(module, x, t, text, cond)  # the model's own view of the batch

        def forward_step(data_iterator, m):
            idx = next(data_iterator)
            out = inputs.call(m, idx)

            def collect(o):
                o = inputs.to_velocity(o)
                outputs.append(o.detach())
                loss = loss_fn(o, idx) if loss_fn is not None else o.float().sum() * 0.0
                return loss, {"loss": loss.detach()}

            return out, collect

        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(chunks), model=[module],
                                    num_microbatches=len(chunks), seq_length=inputs.seq_length,
                                    micro_batch_size=len(chunks[0]), forward_only=loss_fn is None)
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        out = torch.cat(outputs) if outputs else torch.empty(b, self.family.out_channels, *shape[2:],
                                                            dtype=x.dtype, device=x.device)
        if pp > 1:  # the last stage has the velocity; every stage needs it for the next rollout step
            src = parallel_state.get_pipeline_model_parallel_last_rank()
            dist.broadcast(out, src, group=parallel_state.get_pipeline_model_parallel_group())
        return out

    @torch.no_grad()
    def velocity(self, role: str, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                 cond: Conditioning | None = None) -> torch.Tensor:
        """v(x, t) of ``role`` (teacher / fake / student / expert:j), routed per sample to the expert owning t."""
        if role == "teacher" and self.real_score is not None:
            return self.real_score(x, t, text)
        x, text = x.to(self.dtype), text.to(self.dtype)
        if role in ("teacher", "fake"):
            experts = self.expert_of(t)
            out = torch.empty_like(x)
            for e in experts.unique().tolist():
                idx = (experts == e).nonzero().flatten()
                module, adapters_off = self._module(role, e)
                cond_e = None if cond is None else cond.index(idx)
                if adapters_off:
                    with lora_disabled(module):
                        out[idx] = self._run(module, x[idx], t[idx], text[idx], cond=cond_e)
                else:
                    out[idx] = self._run(module, x[idx], t[idx], text[idx], cond=cond_e)
            return out.float()
        module, _ = self._module(role, 0)
        return self._run(module, x, t, text, cond=cond).float()

    def set_lr(self, lrs: dict[str, float]) -> None:
        """The active region's learning rates for the next updates: ``{"student": lr, "fake": lr}``
        (every fake gets the fake's). Set before every step, so a resumed run needs no schedule state."""
        for name, tr in self.trainables.items():
            lr = lrs["student" if name == "student" else "fake"]
            for group in tr.optimizer.param_groups:
                group["lr"] = lr

    def train_step(self, role: str, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   cond: Conditioning | None = None) -> dict[str, float]:
        """One optimizer step of a trainable role (``student`` or ``fake{e}``) on the batch-mean loss;
        ``loss_fn(v, idx)`` is the mean loss of the samples ``idx`` whose velocities are ``v``."""
        trainable = self.trainables[role]
        trainable.ddp.zero_grad_buffer()
        trainable.optimizer.zero_grad()
        losses = []

        def wrapped(v, idx):
            loss = loss_fn(v.float(), idx)
            losses.append(loss.detach().clone())  # the schedule rescales the returned loss in place
            return loss

        self._run(trainable.ddp, x.to(self.dtype), t, text.to(self.dtype), wrapped, cond)
        finalize_model_grads([trainable.ddp])
        loss = torch.stack(losses).mean() if losses else torch.zeros((), device=self.device)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(loss, parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        # A non-finite loss or gradient on ANY rank skips the update on every rank (the optimizer step is
        # collective), so no parameter or Adam moment ever becomes non-finite.
        grads = (getattr(p, "main_grad", None) for p in trainable.model.parameters() if p.requires_grad)
        ok = torch.isfinite(loss).all() & _all_finite((g for g in grads if g is not None), self.device)
        bad = (~ok).float().reshape(1)  # one device flag: no host sync per tensor on the step's hot path
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            trainable.ddp.zero_grad_buffer()
            trainable.optimizer.zero_grad()
            return {"loss": loss.item(), "grad_norm": float("nan"), "skipped": 1.0}
        ok, grad_norm, _ = trainable.optimizer.step()
        if ok:
            trainable.update_ema()
        return {"loss": loss.item(), "grad_norm": float(grad_norm or 0.0),
                "skipped": float(not ok)}

    def params_finite(self) -> bool:
        """Whether every trainable role's parameters and Adam moments are finite on every rank (checked before
        a checkpoint is written: a non-finite state is never saved)."""
        tensors = []
        for tr in self._all_trainables().values():
            inner = getattr(tr.optimizer, "optimizer", tr.optimizer)  # Megatron wraps the torch optimizer
            tensors += list(tr.model.parameters())
            tensors += [v for state in inner.state.values() for v in state.values()
                        if torch.is_tensor(v) and v.is_floating_point()]  # Adam moments, fp32 main params
        flag = (~_all_finite(tensors, self.device)).float().reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not flag.item()

    # -- checkpoints ------------------------------------------------------------------------------
    def _all_trainables(self) -> dict[str, Trainable]:
        """Every trainable role of every resident region, under its checkpoint name (sequential phases:
        ``student``, ``fake0``, ...; interleaved: ``region1.student``, ...)."""
        return {f"{r['prefix']}{name}": tr for r in self.regions.values() for name, tr in r["trainables"].items()}

    def _sharded(self, is_loading: bool) -> dict:
        state = {}
        for name, tr in self._all_trainables().items():
            _ensure_adam_state(tr.optimizer)
            model_sd = tr.model.sharded_state_dict(prefix=f"{name}.model.")
            state[f"{name}.model"] = model_sd
            state[f"{name}.optim"] = tr.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
            if tr.ema:
                state[f"{name}.ema"] = tr.ema_sharded_state_dict(prefix=f"{name}.ema.")
        return state

    def save(self, path: str | Path, extra: dict) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(self._sharded(is_loading=False), str(path))
        ema = {name: tr.ema_updates for name, tr in self._all_trainables().items() if tr.ema}
        if dist.get_rank() == 0:
            (path / "trainer_state.json").write_text(json.dumps({**extra, "ema_updates": ema} if ema else extra,
                                                                sort_keys=True))
        dist.barrier()

    def load(self, path: str | Path) -> dict:
        path = Path(path)
        trainables = self._all_trainables()
        extra = json.loads((path / "trainer_state.json").read_text())
        missing = [name for name, tr in trainables.items() if tr.ema and name not in extra.get("ema_updates", {})]
        if missing:  # student.ema is part of the run's identity, so only a hand-edited run gets here
            raise ValueError(f"checkpoint {path} has no moving average for {', '.join(missing)}")
        sharded = self._sharded(is_loading=True)
        loaded = dist_checkpointing.load(sharded, str(path))
        for name, tr in trainables.items():
            prefix = f"{name}.model."
            tr.model.load_state_dict({k[len(prefix):]: v for k, v in loaded[f"{name}.model"].items()}, strict=True)
            _load_optimizer(tr.optimizer, loaded[f"{name}.optim"])
            if tr.ema:
                by_ptr = {t.data_ptr(): t for t in tr.ema.values()}
                with torch.no_grad():
                    for key, target in sharded[f"{name}.ema"].items():
                        by_ptr[target.data.data_ptr()].copy_(loaded[f"{name}.ema"][key])
                tr.ema_updates = extra["ema_updates"][name]
        return {k: v for k, v in extra.items() if k != "ema_updates"}

    def save_expert(self, path: str | Path) -> None:
        """The phase's final student (its moving average when ``student.ema`` > 0) as a plain (LoRA-merged)
        model checkpoint, at any later layout."""
        with self.trainables["student"].averaged() as student:
            merged = _merge_lora(student) if lora_modules(student) else None
            if merged is not None:
                plain = self.build_model(self.student_expert)
                check_and_load(plain, merged, "merging the LoRA student")
                student = plain
            Path(path).mkdir(parents=True, exist_ok=True)
            dist_checkpointing.save(student.sharded_state_dict(prefix="model."), str(path))

    def load_expert(self, expert: int, path: str | Path, fp8: bool = False) -> torch.nn.Module:
        model = self.build_model(expert, fp8)
        loaded = dist_checkpointing.load(model.sharded_state_dict(prefix="model."), str(path))
        model.load_state_dict({k[len("model."):]: v for k, v in loaded.items()}, strict=True)
        return model


def _all_finite(tensors, device: torch.device) -> torch.Tensor:
    """Whether every tensor is finite, as one boolean tensor on ``device`` (read once by the caller)."""
    ok = torch.ones((), dtype=torch.bool, device=device)
    for t in tensors:
        ok &= torch.isfinite(t).all().to(device)
    return ok
