"""Run configuration: a YAML recipe plus dotted ``key=value`` overrides, validated into typed sections.

OmegaConf reads and merges (YAML, dotted overrides, ``${...}`` interpolation); the dataclasses below
are the schema. Every mistake a user can make fails here, before any model is built, with a message
that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdmd.core.content import IDENTITY_PATHS, absolute, content_of, get, put, resolve_paths
from pdmd.core.errors import ConfigError
from pdmd.core.schedule import PhasePlan

# model.kind -> the diffusers transformer class of its teacher folders
MODEL_KINDS = {"wan": "WanTransformer3DModel", "qwen-image": "QwenImageTransformer2DModel"}


@dataclass
class TeacherConfig:
    path: str = ""
    subfolders: list[str] = field(default_factory=lambda: ["transformer"])
    boundary: float | None = None  # Wan2.2 A14B: t >= boundary -> subfolders[0] (high noise), else [1]
    # A closed-form real score instead of the teacher networks' (pdmd/bench/exact_teacher.py): the file
    # `pdmd bench toy --teacher exact` writes. The networks at ``path`` still initialise student and fakes.
    exact: str | None = None


FP8_ROLES = ("teacher", "expert", "student", "fake")


@dataclass
class FP8Config:
    """FP8 GEMMs through Transformer Engine (model.spec=te, model.dtype=bf16, CUDA only)."""

    recipe: str = "delayed"  # delayed (amax history) | tensorwise (current scaling); Megatron's names
    roles: list[str] = field(default_factory=lambda: ["teacher", "expert"])  # frozen roles first
    # Trained roles (student, fake) in FP8 only behind a passed parity check: the JSON written by
    # tools/fp8_parity.py for this run's config.
    parity_report: str | None = None


@dataclass
class ModelConfig:
    kind: str = "wan"
    spec: str = "local"
    dtype: str = "fp32"
    # full: every transformer block keeps only its input and is recomputed in the backward (Megatron's
    # checkpoint, TP RNG states included): activation memory of the trained roles drops to one block's
    recompute: str = "none"
    fp8: FP8Config | None = None  # None: bf16/fp32 GEMMs everywhere
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    timeout_minutes: float = 10.0  # collective timeout: a rank stuck this long fails the job (then requeued)
    # blocks per pipeline stage, e.g. [7, 8, 8, 7] for TI2V-5B's 30 at pp=4; null: even, or the middle stages
    # take the extra blocks (pdmd/core/pipeline_split.py)
    pp_layers: list[int] | None = None
    # context-parallel attention: all_gather (every rank gathers K/V) | ulysses (all-to-all over heads; needs
    # heads % (tp*cp) == 0): the same numbers, different communication and K/V memory (docs/training.md)
    cp_comm: str = "all_gather"


@dataclass
class MethodConfig:
    sgts: bool = True  # one randomly chosen step of the phase carries the gradient (else the last)
    # SGTS draws only steps >= this (1-based over the whole sampler): 2 keeps a one-phase student's first
    # step (from pure noise straight to x0, which collapses modes) out of the draw; an ablation of the benchmark
    sgts_min_step: int = 1
    dmd_form: str = "velocity"  # velocity (paper) | x0 (normalised surrogate of DMD2/LightX2V)
    cfg_scale: float = 4.0
    fake_loss: str = "subinterval"  # subinterval (paper Eq. 13) | mse (LightX2V) | naive (ablation)
    fake_max_weight: float = 10.0
    fake_ratio: int = 5  # fake updates per generator update (TTUR)
    # fake updates on the phase's starting generator before its first generator update, so that the
    # fake scores the generator's samples and not the teacher's distribution it was copied from
    fake_warmup: int = 0
    # consecutive fake updates of a generator step that share one rollout (each re-noises it afresh): 1 = a
    # rollout per fake update (the paper); fake_ratio = one per step, fewer generator passes (pdmd plan)
    fake_rollout_reuse: int = 1
    # sequential: phase after phase, earlier experts frozen (the paper); interleaved: every phase's student
    # and fakes resident and trained in turn, iteration i on phase (i mod K) + 1 (LightX2V's release)
    schedule: str = "sequential"


@dataclass
class LoRASection:
    rank: int = 64
    alpha: float = 8.0
    targets: list[str] = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_q", "linear_kv",
                                                          "linear_fc1", "linear_fc2"])


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.0
    beta1: float = 0.0  # DMD2 / the paper: no momentum
    beta2: float = 0.999
    grad_clip: float = 1.0
    # lr over each phase's generator updates: constant, or decayed to 0 at the phase's end (linear /
    # cosine). A decayed student ends where its last updates average out (docs/benchmarks.md, issue 17).
    lr_decay: str = "constant"
    # Students only: the exported expert is an exponential moving average of the student's weights with
    # this decay (0 = the last iterate), DMD2's practice; warmed up as min(ema, (1 + n) / (10 + n)).
    ema: float = 0.0
    lora: LoRASection | None = None  # students only: None trains all parameters


@dataclass
class TrainConfig:
    steps: int = 100  # generator updates per phase
    micro_batch_size: int = 1  # samples per micro-batch (one forward/backward)
    num_micro_batches: int = 1  # micro-batches per optimizer step (gradient accumulation)
    latent_shape: list[int] = field(default_factory=lambda: [16, 21, 60, 104])  # C, F, H, W
    checkpoint_every: int = 50
    keep_last: int = 2
    max_bad_steps: int = 3  # consecutive non-finite losses before stopping
    log_every: int = 1


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "phased-dmd"
    group: str | None = None
    name: str | None = None


@dataclass
class LoggingConfig:
    """What the run shows while it trains; left out of the run's identity (changing it never blocks a resume)."""

    progress: bool = True  # progress bars on the console (rank 0, interactive terminals only)
    console_every: int = 0  # without a terminal (Slurm logs): a step line every N steps; 0 = ~20 a phase
    sample_every: int = 0  # decode preview samples every N generator steps (0 = never; needs vae)
    sample_count: int = 2  # previews per logging step: the first prompts of the data set, fixed noise
    vae: str | None = None  # AutoencoderKLWan folder, or a pipeline folder with vae/ (e.g. the teacher's)
    # every N generator steps: the preview prompts from eval_seeds seeds, their pairwise latent cosine
    # similarity (and pixel distance with vae) logged per phase (docs/eval.md); 0 = never
    eval_every: int = 0
    eval_seeds: int = 3


@dataclass
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    plan: dict[str, Any] = field(default_factory=lambda: {"num_steps": 4, "shift": 5.0, "num_phases": 2})
    method: MethodConfig = field(default_factory=MethodConfig)
    student: OptimConfig = field(default_factory=OptimConfig)
    fake: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-7))
    train: TrainConfig = field(default_factory=TrainConfig)
    data: dict[str, Any] = field(default_factory=dict)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def phase_plan(self) -> PhasePlan:
        return PhasePlan.from_config(self.plan)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def content(self) -> dict[str, str | None]:
        """The content hash of each input path (pdmd/core/content.py), as read when the config was loaded; a
        run read back from its manifest carries the hashes recorded when it started (its data may have moved)."""
        recorded = getattr(self, "_content", None)
        return dict(recorded) if recorded is not None else content_of(self.to_dict())

    def identity(self, by_path: bool = False) -> dict[str, Any]:
        """What makes two runs the same run. The parallel layout and logging are left out: a run may
        resume at another TP/PP/CP layout (checkpoints reshard) or log elsewhere or differently. Input
        paths stand in by their content (a run follows its data to another folder); ``by_path`` keeps the
        path strings instead (how manifests before content identity were compared). Keys added after runs
        were first started are left out while at their defaults (LATER_KEYS), so that a run started
        before they existed still resumes."""
        ident = {k: v for k, v in self.to_dict().items() if k not in ("parallel", "wandb", "logging")}
        content = {} if by_path else self.content()
        for key in IDENTITY_PATHS:
            value = get(ident, key)
            if value:  # unreadable inputs keep their path: the run is then identified by where it looked
                put(ident, key, {"content": content[key]} if content.get(key) else absolute(value, Path.cwd()))
        for path, default in LATER_KEYS.items():
            *parents, key = path
            node = ident
            for name in parents:
                node = node.get(name) or {}
            if isinstance(node, dict) and key in node and node[key] == default:
                del node[key]
        return ident

    def resume_changes(self, saved: dict[str, Any], content: dict[str, str | None] | None = None
                       ) -> dict[str, list[Any]] | None:
        """Against a run directory's saved config and recorded input content (None: a manifest from before
        content identity, compared by path): None if it is another run; else the RESUMABLE_KEYS whose values
        differ, ``{"student.lr": [old, new]}`` (what a diverged run may lower on resume)."""
        try:
            old_cfg = _build(RunConfig, saved, "")
        except (ConfigError, TypeError):
            return None
        old_cfg._content = content
        old, new = old_cfg.identity(by_path=content is None), self.identity(by_path=content is None)
        changes = {}
        for path in RESUMABLE_KEYS:
            values = [_pop(ident, path) for ident in (old, new)]
            if values[0] != values[1]:
                changes[".".join(path)] = values
        return changes if old == new else None

    def hash(self) -> str:
        """Identity of the run for the manifest (:meth:`identity`)."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()


# Config keys added after the first release, with their defaults (see RunConfig.identity).
LATER_KEYS: dict[tuple[str, ...], Any] = {
    ("model", "teacher", "exact"): None,
    ("student", "beta1"): 0.0,
    ("fake", "beta1"): 0.0,
    ("method", "sgts_min_step"): 1,
    ("method", "fake_warmup"): 0,
    ("student", "lr_decay"): "constant",
    ("fake", "lr_decay"): "constant",
    ("student", "ema"): 0.0,
    ("fake", "ema"): 0.0,
    ("method", "fake_rollout_reuse"): 1,
}

# What a run may change when it resumes (recorded in the manifest's history): learning rates (to continue a
# diverged run) and bookkeeping; everything else defines the result and stays fixed.
RESUMABLE_KEYS: tuple[tuple[str, ...], ...] = (
    ("student", "lr"), ("fake", "lr"), ("train", "max_bad_steps"), ("train", "checkpoint_every"),
    ("train", "keep_last"), ("train", "log_every"),
)


def _pop(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    node = tree
    for name in path[:-1]:
        node = node.get(name) or {}
    return node.pop(path[-1], None) if isinstance(node, dict) else None


LR_DECAYS = ("constant", "linear", "cosine")
CP_COMMS = ("all_gather", "ulysses")  # parallel.cp_comm: megatron_adapters/layers/attention.py


def lr_at(optim: OptimConfig, step: int, steps: int) -> float:
    """The learning rate of generator update ``step`` (0-based) of a phase of ``steps`` updates."""
    import math

    frac = step / max(steps, 1)
    if optim.lr_decay == "linear":
        return optim.lr * (1 - frac)
    if optim.lr_decay == "cosine":
        return optim.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return optim.lr


def _build(cls, raw: Any, where: str):
    if not dataclasses.is_dataclass(cls):
        return raw
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {key!r}; known keys here: {sorted(fields)}")
    values = {}
    for name, value in raw.items():
        sub = f"{where}.{name}" if where else name
        ftype = fields[name].type
        nested = {"model": ModelConfig, "teacher": TeacherConfig, "parallel": ParallelConfig, "method": MethodConfig,
                  "student": OptimConfig, "fake": OptimConfig, "train": TrainConfig, "wandb": WandbConfig,
                  "lora": LoRASection, "logging": LoggingConfig, "fp8": FP8Config}.get(name)
        if nested is not None and "dict" not in str(ftype):
            values[name] = None if (name in ("lora", "fp8") and value is None) else _build(nested, value, sub)
        else:
            values[name] = _typed(value, str(ftype), sub)
    return cls(**values)


def _typed(value: Any, ftype: str, key: str) -> Any:
    """``value`` as the field's scalar type (``float``, ``int``, ``bool``, ``str``, optionally ``| None``), or
    a ConfigError naming the key; other types (lists, mappings) are checked by :func:`validate`."""
    optional = ftype.endswith(" | None")
    base = ftype.removesuffix(" | None")
    if value is None and optional:
        return None
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}={value!r} must be a number")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return number if isinstance(value, str) else value  # as given: the run's identity hash keeps it
    if base == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}={value!r} must be a whole number")
    if base == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    if base == "str" and not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_config(path: str | Path | dict | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a recipe (a YAML path, or an already-parsed dict) and apply ``key=value`` overrides (the
    recipe's own dotted key names)."""
    from omegaconf import DictConfig, OmegaConf

    if path is None or isinstance(path, dict):
        base = OmegaConf.create(path or {})
    else:
        if not Path(path).is_file():
            raise ConfigError(f"no recipe at {path}: pass a YAML file such as configs/tiny_wan22.yaml")
        try:
            base = OmegaConf.load(str(path))
        except Exception as exc:  # noqa: BLE001 - YAML syntax errors come as several parser classes
            raise ConfigError(f"{path} is not valid YAML: {_first_line(exc)}") from None
        if not isinstance(base, DictConfig):
            raise ConfigError(f"{path} must hold a mapping of config sections (model:, train:, ...)")
        written = OmegaConf.to_container(base, resolve=False)  # the file's own paths: against its folder
        resolve_paths(written, Path(path).resolve().parent, skip_interpolated=True)
        base = OmegaConf.create(written)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. train.steps=10)")
    try:
        given = OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:  # noqa: BLE001 - OmegaConf's grammar errors
        raise ConfigError(f"an override does not parse ({_first_line(exc)}): write key=value, lists as "
                          "key=[1,2], quoted for the shell") from None
    try:
        raw = OmegaConf.to_container(OmegaConf.merge(base, given), resolve=True)
    except Exception as exc:  # noqa: BLE001 - merge/interpolation errors
        raise ConfigError(f"the recipe and overrides do not merge: {_first_line(exc)}") from None
    if isinstance(raw, dict):
        resolve_paths(raw, Path.cwd())  # overrides and environment values: against the working directory
    cfg = _build(RunConfig, raw, "")
    validate(cfg)
    cfg._content = content_of(cfg.to_dict())  # what the paths hold now: the identity stays this run's
    return cfg


def _validate_qwen_image(cfg: RunConfig) -> None:
    """What a Qwen-Image run needs beyond the common checks (one teacher transformer, one latent frame,
    Qwen2.5-VL prompt shards, no image conditioning)."""
    m, t = cfg.model, cfg.train
    if len(m.teacher.subfolders) != 1:
        raise ConfigError(f"model.teacher.subfolders={m.teacher.subfolders}: Qwen-Image has one transformer "
                          "(model.teacher.subfolders=[transformer])")
    if len(t.latent_shape) == 4 and t.latent_shape[1] != 1:
        raise ConfigError(f"train.latent_shape={t.latent_shape}: Qwen-Image makes images, one latent frame "
                          "([16, 1, H, W]; 1024 px -> [16, 1, 128, 128])")
    if cfg.data.get("model") != "qwen-image":
        raise ConfigError(f"data.model={cfg.data.get('model')!r}: a Qwen-Image run reads shards encoded with "
                          "Qwen2.5-VL (data.model=qwen-image; tools/make_prompt_shards.py --encoder qwen2.5-vl)")
    if cfg.data.get("conditioning") not in (None, "none"):
        raise ConfigError(f"data.conditioning={cfg.data['conditioning']!r}: Qwen-Image runs are text-to-image")
    if cfg.logging.sample_every:
        raise ConfigError("logging.sample_every: previews decode with the Wan VAE; Qwen-Image runs have no previews "
                          "yet (set logging.sample_every=0 and sample the exported pipeline)")


def _positive(value: Any, key: str, fix: str = "") -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive number" + (f": {fix}" if fix else ""))


def validate_fp8(cfg: RunConfig) -> None:
    """FP8 needs TE linears in bf16; trained roles need a passed parity report for this very config."""
    f = cfg.model.fp8
    if cfg.model.spec != "te" or cfg.model.dtype != "bf16":
        raise ConfigError("model.fp8 needs model.spec=te and model.dtype=bf16 (FP8 GEMMs are Transformer Engine's)")
    if f.recipe not in ("delayed", "tensorwise"):
        raise ConfigError(f"model.fp8.recipe={f.recipe!r}: choose delayed or tensorwise (current scaling)")
    bad = sorted(set(f.roles) - set(FP8_ROLES))
    if bad or not f.roles:
        raise ConfigError(f"model.fp8.roles={f.roles}: choose from {list(FP8_ROLES)}")
    trained = sorted(set(f.roles) & {"student", "fake"})
    if trained:
        if not f.parity_report or not Path(f.parity_report).is_file():
            raise ConfigError(f"model.fp8.roles has {trained}: trained roles run FP8 only after a passed parity check; "
                              "run tools/fp8_parity.py with this config and set model.fp8.parity_report to its JSON")
        report = json.loads(Path(f.parity_report).read_text())
        key = parity_key(cfg)
        if not report.get("passed") or report.get("config_hash") != key or report.get("recipe") != f.recipe:
            raise ConfigError(f"model.fp8.parity_report={f.parity_report}: not a passed check of this config "
                              f"(passed={report.get('passed')}, recipe={report.get('recipe')}, config hash "
                              f"{str(report.get('config_hash'))[:12]} vs {key[:12]}); rerun tools/fp8_parity.py")


def parity_key(cfg: RunConfig) -> str:
    """What an FP8 parity check vouches for: the run's identity without its FP8 settings."""
    ident = cfg.identity()
    ident["model"] = {k: v for k, v in ident["model"].items() if k != "fp8"}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def validate(cfg: RunConfig) -> None:
    """Everything that can be checked without building a model."""
    m = cfg.model
    if m.kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind={m.kind!r}: choose one of {sorted(MODEL_KINDS)}")
    if m.spec not in ("local", "te"):
        raise ConfigError(f"model.spec={m.spec!r}: choose local or te")
    if m.recompute not in ("none", "full"):
        raise ConfigError(f"model.recompute={m.recompute!r}: choose none or full (docs/training.md, Memory)")
    if m.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"model.dtype={m.dtype!r}: choose fp32 or bf16")
    if m.fp8 is not None:
        validate_fp8(cfg)
    if not m.teacher.path:
        raise ConfigError("model.teacher.path is empty: point it at the teacher's diffusers folder")
    teacher = Path(m.teacher.path)
    for sub in m.teacher.subfolders:
        if not (teacher / sub / "config.json").is_file():
            raise ConfigError(f"model.teacher.path: no {sub}/config.json under {teacher} (model.teacher.subfolders="
                              f"{m.teacher.subfolders}); is this a diffusers {MODEL_KINDS[m.kind]} folder?")
        found = json.loads((teacher / sub / "config.json").read_text()).get("_class_name")
        if found is not None and found != MODEL_KINDS[m.kind]:
            raise ConfigError(f"model.kind={m.kind!r} but {teacher / sub} holds a {found}: set model.kind to "
                              f"{next((k for k, c in MODEL_KINDS.items() if c == found), 'the matching kind')!r} "
                              "or point model.teacher.path at the right teacher")
    if m.teacher.exact is not None and not Path(m.teacher.exact).is_file():
        raise ConfigError(f"model.teacher.exact={m.teacher.exact}: no such file (an exact-teacher file written by "
                          "`pdmd bench toy --teacher exact`; null = the teacher networks are the real score)")
    if m.kind == "qwen-image":
        _validate_qwen_image(cfg)
    if len(m.teacher.subfolders) not in (1, 2):
        raise ConfigError("model.teacher.subfolders lists one expert, or two (high noise first) for Wan2.2 A14B")
    if len(m.teacher.subfolders) == 2 and not (m.teacher.boundary and 0 < m.teacher.boundary < 1):
        raise ConfigError("model.teacher.boundary must lie in (0, 1) with two experts (0.875 T2V, 0.9 I2V)")
    for key in ("tp", "pp", "cp"):
        value = getattr(cfg.parallel, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"parallel.{key}={value!r} must be an integer >= 1")
    if cfg.parallel.cp_comm not in CP_COMMS:
        hint = (" (Transformer Engine's CP attention is not wired in yet: docs/training.md)"
                if cfg.parallel.cp_comm == "te" else "")
        raise ConfigError(f"parallel.cp_comm={cfg.parallel.cp_comm!r}: choose {' or '.join(CP_COMMS)}{hint}")
    given = cfg.parallel.pp_layers
    if given is not None and (not isinstance(given, list) or len(given) != cfg.parallel.pp
                              or any(not isinstance(n, int) or n < 1 for n in given)):
        raise ConfigError(f"parallel.pp_layers={given!r}: one block count >= 1 per pipeline stage "
                          f"(parallel.pp={cfg.parallel.pp} of them), or null for an automatic split")
    _positive(cfg.parallel.timeout_minutes, "parallel.timeout_minutes",
              "minutes a collective may wait before the job fails (checkpoint saves of 14B models need several)")
    try:
        plan = cfg.phase_plan()
    except ValueError as exc:
        raise ConfigError(f"plan: {exc}") from exc
    meth = cfg.method
    if meth.dmd_form not in ("velocity", "x0"):
        raise ConfigError(f"method.dmd_form={meth.dmd_form!r}: choose velocity or x0")
    if meth.fake_loss not in ("subinterval", "mse", "naive"):
        raise ConfigError(f"method.fake_loss={meth.fake_loss!r}: choose subinterval, mse or naive")
    if meth.schedule not in ("sequential", "interleaved"):
        raise ConfigError(f"method.schedule={meth.schedule!r}: choose sequential (the paper) or interleaved (LightX2V)")
    if meth.schedule == "interleaved" and plan.num_phases < 2:
        raise ConfigError("method.schedule=interleaved needs plan.num_phases >= 2 (it alternates between phases)")
    if not isinstance(meth.sgts_min_step, int) or not 1 <= meth.sgts_min_step <= plan.num_steps:
        raise ConfigError(f"method.sgts_min_step={meth.sgts_min_step!r} must be a step of the sampler, "
                          f"1..{plan.num_steps} (1 = every step may carry the gradient)")
    if not isinstance(meth.fake_warmup, int) or meth.fake_warmup < 0:
        raise ConfigError(f"method.fake_warmup={meth.fake_warmup!r} must be an integer >= 0 (0 = none)")
    if not isinstance(meth.fake_rollout_reuse, int) or meth.fake_rollout_reuse < 1:
        raise ConfigError(f"method.fake_rollout_reuse={meth.fake_rollout_reuse!r} must be an integer >= 1 (1 = a "
                          "rollout per fake update)")
    if not isinstance(meth.fake_ratio, int) or meth.fake_ratio < 1:
        raise ConfigError(f"method.fake_ratio={meth.fake_ratio!r} must be an integer >= 1 (the paper uses 5)")
    if meth.cfg_scale < 0:
        raise ConfigError(f"method.cfg_scale={meth.cfg_scale} must be >= 0 (1 = no guidance)")
    for section in ("student", "fake"):
        _positive(getattr(cfg, section).lr, f"{section}.lr")
        if getattr(cfg, section).lr_decay not in LR_DECAYS:
            raise ConfigError(f"{section}.lr_decay={getattr(cfg, section).lr_decay!r}: choose one of {list(LR_DECAYS)}")
    if not isinstance(cfg.student.ema, (int, float)) or not 0 <= cfg.student.ema < 1:
        raise ConfigError(f"student.ema={cfg.student.ema!r} must be in [0, 1) (0 = export the last iterate)")
    if cfg.fake.ema:
        raise ConfigError("fake.ema: only the student keeps a moving average (set fake.ema=0)")
    if cfg.fake.lora is not None:
        raise ConfigError("fake.lora: the fake score trains all parameters (set fake.lora=null)")
    t = cfg.train
    for key in ("steps", "micro_batch_size", "num_micro_batches", "checkpoint_every", "keep_last", "max_bad_steps", "log_every"):
        if not isinstance(getattr(t, key), int) or getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)!r} must be an integer >= 1")
    if len(t.latent_shape) != 4 or any(not isinstance(v, int) or v < 1 for v in t.latent_shape):
        raise ConfigError(f"train.latent_shape={t.latent_shape} must be [channels, frames, height, width]")
    if not cfg.data.get("shards"):
        raise ConfigError("data.shards is empty: point it at a folder written by tools/make_prompt_shards.py")
    log = cfg.logging
    if not isinstance(log.sample_every, int) or log.sample_every < 0:
        raise ConfigError(f"logging.sample_every={log.sample_every!r} must be an integer >= 0 (0 = no previews)")
    if not isinstance(log.eval_every, int) or log.eval_every < 0:
        raise ConfigError(f"logging.eval_every={log.eval_every!r} must be an integer >= 0 (0 = no diversity checks)")
    if not isinstance(log.eval_seeds, int) or log.eval_seeds < 2:
        raise ConfigError(f"logging.eval_seeds={log.eval_seeds!r} must be an integer >= 2 (pairs of seeds are compared)")
    if not isinstance(log.console_every, int) or log.console_every < 0:
        raise ConfigError(f"logging.console_every={log.console_every!r} must be an integer >= 0 (0 = about 20 lines "
                          "a phase)")
    if not isinstance(log.sample_count, int) or log.sample_count < 1:
        raise ConfigError(f"logging.sample_count={log.sample_count!r} must be an integer >= 1")
    if log.sample_every and not log.vae:
        raise ConfigError("logging.sample_every needs logging.vae: a pipeline folder with vae/ (e.g. the teacher's)")
    if log.vae and not ((Path(log.vae) / "vae" / "config.json").is_file() or (Path(log.vae) / "config.json").is_file()):
        raise ConfigError(f"logging.vae={log.vae}: neither an AutoencoderKLWan folder nor a pipeline folder with vae/")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r}: choose offline, online or disabled")
    if plan.num_phases < 1:
        raise ConfigError("plan: at least one phase")
