"""HF-Diff's invertible high-frequency feature extractor (the network behind the HF perceptual loss).

HF-Diff (arXiv 2411.13548, sec. 3.3 and 4.1) describes it; its file `inn_model.py` is not in the
released code, so the architecture follows the paper's text and the design it cites (CDDFuse,
Zhao et al. CVPR 2023, "DetailFeatureExtraction"):

1. Stem: a shallow residual block expands the 3 input channels to N (conv3x3 3->N, then
   x + conv3x3(LeakyReLU(conv3x3(x)))).
2. K invertible affine-coupling layers (paper eq. 5). The N channels split into the first c = N/2
   (x1) and the rest (x2):
       y2 = x2 + phi(x1)
       y1 = x1 * exp(s(rho(y2))) + eta(y2)
   with phi, rho, eta each a two-layer CNN (conv3x3, LeakyReLU(0.2), conv3x3) and s a soft clamp
   s(u) = clamp * tanh(u / clamp) that keeps exp() finite (clamp = 0 disables it). Exact inverse:
       x1 = (y1 - eta(y2)) * exp(-s(rho(y2)));  x2 = y2 - phi(x1).
   Between layers the halves swap places (a fixed permutation, so both halves get transformed;
   CDDFuse mixes with a learned 1x1 conv, which is not guaranteed invertible, so we do not).
3. The output, (B, N, H, W) at the input's spatial size, is the feature map the HF loss compares.

For pretraining (the paper: "an INN-based classifier ... alongside convolutional and fully-connected
layers", ImageNet) a small head (conv3x3 stride 2, LeakyReLU, global average pool, linear) maps
the features to class logits; it is saved with the extractor but the loss uses only the extractor.

The released HF-Diff code applies the extractor to the 3-channel VQ latents; `in_channels` is 3
for both images and those latents.

Checkpoint: one safetensors file, keys `extractor.*` (and `head.*` when saved by pretraining),
metadata `format` = "onestep_sr.hf_inn", `version` = "1", `config` = JSON of HFInnConfig, plus
`classes` (JSON list) and `num_classes` when a head is present. Written atomically (temporary file,
then rename). See docs/training.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

CHECKPOINT_FORMAT = "onestep_sr.hf_inn"
CHECKPOINT_VERSION = "1"


class HFInnFormatError(ValueError):
    """The file is not an HF-INN checkpoint of this layout."""


@dataclass(frozen=True)
class HFInnConfig:
    in_channels: int = 3
    channels: int = 64
    num_layers: int = 3
    hidden_channels: int = 64
    clamp: float = 2.0

    def __post_init__(self) -> None:
        if self.channels < 2 or self.channels % 2:
            raise ValueError(f"the INN needs an even channel count >= 2, got {self.channels}")
        if self.in_channels < 1 or self.num_layers < 1 or self.hidden_channels < 1:
            raise ValueError(f"invalid HF-INN config {self}")
        if self.clamp < 0:
            raise ValueError(f"clamp must be >= 0, got {self.clamp}")


def two_layer_cnn(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """The paper's "two-layer CNN" mapping used for phi, rho and eta."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(hidden, out_channels, 3, padding=1),
    )


class ResidualStem(nn.Module):
    """Shallow residual block expanding the input to N channels."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.body = two_layer_cnn(channels, channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.expand(x)
        return h + self.body(h)


class AffineCoupling(nn.Module):
    """One invertible layer (HF-Diff eq. 5 / CDDFuse's DetailNode without the 1x1 shuffle conv)."""

    def __init__(self, channels: int, hidden: int, clamp: float) -> None:
        super().__init__()
        half = channels // 2
        self.phi = two_layer_cnn(half, hidden, half)
        self.rho = two_layer_cnn(half, hidden, half)
        self.eta = two_layer_cnn(half, hidden, half)
        self.clamp = clamp

    def _log_scale(self, y2: Tensor) -> Tensor:
        raw = self.rho(y2)
        return self.clamp * torch.tanh(raw / self.clamp) if self.clamp > 0 else raw

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        y2 = x2 + self.phi(x1)
        y1 = x1 * torch.exp(self._log_scale(y2)) + self.eta(y2)
        return torch.cat([y1, y2], dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        y1, y2 = y.chunk(2, dim=1)
        x1 = (y1 - self.eta(y2)) * torch.exp(-self._log_scale(y2))
        x2 = y2 - self.phi(x1)
        return torch.cat([x1, x2], dim=1)


def _swap_halves(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.cat([b, a], dim=1)


class HFFeatureExtractor(nn.Module):
    """Residual stem + K affine couplings: (B, in_channels, H, W) -> (B, N, H, W) features."""

    def __init__(self, config: HFInnConfig | None = None) -> None:
        super().__init__()
        self.config = config or HFInnConfig()
        c = self.config
        self.stem = ResidualStem(c.in_channels, c.channels)
        self.layers = nn.ModuleList(AffineCoupling(c.channels, c.hidden_channels, c.clamp)
                                    for _ in range(c.num_layers))

    def inn_forward(self, h: Tensor) -> Tensor:
        """The invertible part alone: (B, N, H, W) -> (B, N, H, W)."""
        for index, layer in enumerate(self.layers):
            if index:
                h = _swap_halves(h)
            h = layer(h)
        return h

    def inn_inverse(self, z: Tensor) -> Tensor:
        """Exact inverse of `inn_forward`."""
        for index in reversed(range(len(self.layers))):
            z = self.layers[index].inverse(z)
            if index:
                z = _swap_halves(z)
        return z

    def forward(self, x: Tensor) -> Tensor:
        return self.inn_forward(self.stem(x))


class HFClassifierHead(nn.Module):
    """Pretraining head: conv3x3 stride 2, LeakyReLU, global average pool, linear to the classes."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"the pretraining classifier needs at least 2 classes, got {num_classes}")
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.act = nn.LeakyReLU(0.2)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.act(self.conv(features)).mean(dim=(2, 3)))


class HFInnClassifier(nn.Module):
    """Extractor + head, the network pretrained with cross-entropy on an image folder."""

    def __init__(self, config: HFInnConfig, num_classes: int) -> None:
        super().__init__()
        self.extractor = HFFeatureExtractor(config)
        self.head = HFClassifierHead(config.channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.extractor(x))


def save_hf_inn(path: str | Path, extractor: HFFeatureExtractor, head: HFClassifierHead | None = None,
                classes: list[str] | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint atomically; refuses to replace an existing file unless `overwrite`."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path.name} already exists in {path.parent}; pass overwrite to replace it")
    state = {f"extractor.{k}": v.detach().cpu().contiguous() for k, v in extractor.state_dict().items()}
    metadata = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "config": json.dumps(asdict(extractor.config))}
    if head is not None:
        state.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
        metadata["num_classes"] = str(head.fc.out_features)
        metadata["classes"] = json.dumps(list(classes or []))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(state, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def read_hf_inn(path: str | Path) -> tuple[HFInnConfig, dict[str, Tensor], dict[str, str]]:
    """(config, tensors, metadata) of a checkpoint, with clear errors for a missing or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HF-INN checkpoint not found: {path.name} (looked in {path.parent})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise HFInnFormatError(f"{path.name} in {path.parent} is not a readable safetensors file: {error}") from error
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise HFInnFormatError(
            f"{path.name} in {path.parent} is not an HF-INN checkpoint (format {metadata.get('format')!r}); "
            "the official inn_pretrained.pt has an unpublished architecture and cannot be read")
    if metadata.get("version") != CHECKPOINT_VERSION:
        raise HFInnFormatError(f"{path.name}: HF-INN checkpoint version {metadata.get('version')!r} is not supported")
    try:
        config = HFInnConfig(**json.loads(metadata["config"]))
    except (KeyError, TypeError, ValueError) as error:
        raise HFInnFormatError(f"{path.name}: bad HF-INN config in the metadata: {error}") from error
    return config, tensors, metadata


def load_hf_extractor(path: str | Path, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> HFFeatureExtractor:
    """The frozen feature extractor (eval mode, no gradients) from a checkpoint."""
    config, tensors, _ = read_hf_inn(path)
    extractor = HFFeatureExtractor(config)
    state = {k[len("extractor."):]: v for k, v in tensors.items() if k.startswith("extractor.")}
    try:
        extractor.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise HFInnFormatError(f"{Path(path).name}: extractor weights do not match its config: {error}") from error
    return extractor.to(device=device, dtype=dtype).eval().requires_grad_(False)
