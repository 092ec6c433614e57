"""A perfect teacher: the closed-form velocity of a known Gaussian mixture, served as the teacher role.

With it a distillation can be judged without a trained teacher's errors in the way: the real score is
exact, so whatever the student gets wrong is the distillation's doing (``model.teacher.exact`` in a
recipe; `pdmd bench toy --teacher exact`). It knows a prompt by its text embedding: the file holds each
prompt's padded embedding (as the shards carry it) and the negative prompt's, whose branch is the
prompt-marginal mixture (the unconditional velocity a CFG teacher needs). Tensors travel in a
safetensors file, the task's parameters as JSON in its metadata: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from pdmd.bench.mixture import MixtureTask

MATCH_TOL = 1e-2  # max |difference| / max |embedding| for a text to be a known prompt (bf16-safe)


class ExactTeacher:
    """``velocity(x, t, text)`` = MixtureTask.velocity for the prompt whose embedding ``text`` is."""

    def __init__(self, task: MixtureTask, prompt_embeds: Tensor, negative_embeds: Tensor | None = None) -> None:
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != task.num_prompts:
            raise ValueError(f"prompt_embeds must be [P={task.num_prompts}, L, D]; got {list(prompt_embeds.shape)}")
        if negative_embeds is not None and negative_embeds.shape != prompt_embeds.shape[1:]:
            raise ValueError(f"negative_embeds must be [L, D] = {list(prompt_embeds.shape[1:])}; "
                             f"got {list(negative_embeds.shape)}")
        self.task = task
        self.prompt_embeds = prompt_embeds.float().cpu()
        self.negative_embeds = None if negative_embeds is None else negative_embeds.float().cpu()

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors = {"prompt_embeds": self.prompt_embeds.contiguous()}
        if self.negative_embeds is not None:
            tensors["negative_embeds"] = self.negative_embeds.contiguous()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"task": json.dumps(self.task.to_dict(include_params=True))})
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExactTeacher:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no exact-teacher file at {path} (written by `pdmd bench toy --teacher exact`)")
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, set(f.keys())  # noqa: SIM118 - safe_open has no __contains__
            if "task" not in meta or "prompt_embeds" not in names:
                raise ValueError(f"{path} is not an exact-teacher file: it lacks the task metadata or prompt_embeds")
            embeds = f.get_tensor("prompt_embeds")
            negative = f.get_tensor("negative_embeds") if "negative_embeds" in names else None
        return cls(MixtureTask.from_dict(json.loads(meta["task"])), embeds, negative)

    def prompt_index(self, text: Tensor) -> Tensor:
        """[B] each row's prompt index, -1 for the negative prompt (the marginal); unknown text raises."""
        rows = text.detach().float().cpu()
        if rows.shape[1:] != self.prompt_embeds.shape[1:]:
            raise ValueError(f"text embeddings {list(rows.shape[1:])} do not have the exact teacher's shape "
                             f"{list(self.prompt_embeds.shape[1:])}: were the shards written with the same encoder?")
        table = self.prompt_embeds
        if self.negative_embeds is not None:
            table = torch.cat([table, self.negative_embeds[None]])
        scale = table.abs().amax().clamp(min=1e-12)
        dist = (rows[:, None] - table[None]).abs().flatten(2).amax(-1) / scale  # [B, P(+1)]
        best, idx = dist.min(-1)
        if bool((best > MATCH_TOL).any()):
            bad = int((best > MATCH_TOL).nonzero()[0])
            raise ValueError(f"text embedding {bad} of the batch is none of the exact teacher's {self.task.num_prompts} "
                             f"prompts (nearest differs by {float(best[bad]):.3g} of the embeddings' scale): the "
                             "shards and the exact-teacher file must come from the same prompts and encoder")
        return torch.where(idx == self.task.num_prompts, torch.full_like(idx, -1), idx)

    @torch.no_grad()
    def velocity(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        """The exact velocity at (x, t) for each row's prompt; fp32, on x's device."""
        idx = self.prompt_index(text).to(x.device)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        cond = idx >= 0
        if bool(cond.any()):
            out[cond] = self.task.velocity(x[cond].float(), t[cond], idx[cond]).float()
        if bool((~cond).any()):
            out[~cond] = self.task.velocity(x[~cond].float(), t[~cond], None).float()
        return out
