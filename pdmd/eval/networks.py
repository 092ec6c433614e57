"""The networks `pdmd eval` judges frames with, each from a local path (no hub download at run time):

- DINO: a DINOv2 / DINOv3 vision model in a transformers folder (``--dino DIR``: ``config.json`` +
  weights, e.g. facebook/dinov2-base downloaded once); the image embedding is its CLS token.
- LPIPS (v0.1, AlexNet): the original's network written out in torch (the ``lpips`` package needs
  torchvision, which has no CPU build for every torch); its weights are one safetensors file (``--lpips
  FILE``) with torchvision's AlexNet ``features.*`` and the lpips package's ``lin{0..4}.model.1.weight``,
  made once by :func:`convert_lpips_weights` from the two published files.
- RAFT: torchvision's ``raft_large`` with its weights from a file (``--raft FILE``); torchvision is
  imported only here, and its absence is a clear error (``--no-motion`` skips motion).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pdmd.core.errors import UserError


class EvalError(UserError):
    """A missing or unusable network file for `pdmd eval`."""


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _need(path: str | Path | None, flag: str, what: str) -> Path:
    if not path:
        raise EvalError(f"{flag} is needed for {what} (a local path: docs/eval.md says where to get it once)")
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{flag} {path}: no such file or folder ({what}; docs/eval.md says where to get it once)")
    return path


class DinoFeatures:
    """CLS embeddings of frames ([n, 3, H, W] in [0, 1]) from a local DINOv2/v3 transformers folder."""

    def __init__(self, folder: str | Path | None, size: int = 224, device: str = "cpu") -> None:
        from transformers import AutoModel

        folder = _need(folder, "--dino", "the diversity metric (DINO similarity)")
        if not (folder / "config.json").is_file():
            raise EvalError(f"--dino {folder}: no config.json: give a transformers DINOv2/DINOv3 model folder")
        self.model = AutoModel.from_pretrained(folder).to(device).eval()
        self.size, self.device = size, device

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(frames.float().to(self.device), size=(self.size, self.size), mode="bicubic",
                          align_corners=False).clamp(0, 1)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        out = self.model(pixel_values=(x - mean) / std)
        return out.last_hidden_state[:, 0].float().cpu()


class LPIPS(torch.nn.Module):
    """LPIPS v0.1 with AlexNet (Zhang et al. 2018): channel-normalised AlexNet activations at its five ReLUs,
    squared differences weighted by learned 1x1 convolutions, averaged over space, summed over layers."""

    SHIFT, SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)
    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(  # torchvision's alexnet().features, layer for layer (same state keys)
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
        self.taps = (1, 4, 7, 9, 11)  # after each ReLU
        for i, c in enumerate(self.CHANNELS):  # lpips' NetLinLayer: Dropout, then a 1x1 conv without bias
            setattr(self, f"lin{i}", nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False)))
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1))

    @classmethod
    def from_file(cls, path: str | Path | None) -> LPIPS:
        from safetensors.torch import load_file

        path = _need(path, "--lpips", "the diversity metric (LPIPS distance)")
        model = cls()
        state = load_file(str(path))
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise EvalError(f"--lpips {path}: not LPIPS AlexNet weights ({str(exc).splitlines()[0]})") from None
        missing = sorted(set(model.state_dict()) - set(state) - {"shift", "scale"})
        if missing:
            raise EvalError(f"--lpips {path}: no {missing[0]!r}: make the file with pdmd.eval.networks."
                            "convert_lpips_weights (docs/eval.md)")
        return model.eval()

    def _activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x * 2 - 1 - self.shift) / self.scale  # [0, 1] -> lpips' [-1, 1], then its scaling
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):  # lpips stops at the fifth ReLU
            h = layer(h)
            if i in self.taps:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] in [0, 1] each -> [n] distances (0 for identical images)."""
        total = torch.zeros(a.shape[0])
        for i, (fa, fb) in enumerate(zip(self._activations(a.float()), self._activations(b.float()))):
            total += getattr(self, f"lin{i}")((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total


def convert_lpips_weights(alexnet_pth: str | Path, lin_pth: str | Path, out: str | Path) -> Path:
    """torchvision's AlexNet file (``alexnet-owt-7be5be79.pth``) and the lpips package's
    ``weights/v0.1/alex.pth`` -> one safetensors file for ``--lpips`` (tensors only: weights_only loading)."""
    from safetensors.torch import save_file

    alexnet = torch.load(alexnet_pth, map_location="cpu", weights_only=True)
    lin = torch.load(lin_pth, map_location="cpu", weights_only=True)
    state = {k: v for k, v in alexnet.items() if k.startswith("features.")}
    state.update({k: v for k, v in lin.items() if k.startswith("lin")})
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return Path(out)


class RaftFlow:
    """Optical flow [pairs, 2, H, W] in pixels between frame pairs, by torchvision's RAFT (large)."""

    def __init__(self, weights: str | Path | None, iters: int = 20, device: str = "cpu") -> None:
        path = _need(weights, "--raft", "the motion metrics (RAFT optical flow)")
        try:
            from torchvision.models.optical_flow import raft_large
        except Exception as exc:  # noqa: BLE001 - torchvision missing, or a build that does not match torch
            raise EvalError(f"the motion metrics need torchvision's RAFT, which does not import here "
                            f"({str(exc).splitlines()[0]}); install torchvision for this torch, or pass --no-motion") from None
        self.model = raft_large(weights=None, progress=False)
        if path.suffix in (".pth", ".pt"):  # torchvision's published file: tensors only
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(str(path))
        self.model.load_state_dict(state)
        self.model = self.model.to(device).eval()
        self.iters, self.device = iters, device

    @torch.no_grad()
    def __call__(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        h, w = first.shape[-2:]
        pad_h, pad_w = (-h) % 8, (-w) % 8  # RAFT needs sides divisible by 8
        a, b = (F.pad(t.float().to(self.device) * 2 - 1, (0, pad_w, 0, pad_h), mode="replicate") for t in (first, second))
        flow = self.model(a, b, num_flow_updates=self.iters)[-1]
        return flow[..., :h, :w].cpu()
