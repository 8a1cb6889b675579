"""LPIPS with the VGG16 backbone (Zhang et al. 2018, v0.1), as `lpips.LPIPS(net='vgg')` computes it.

Written here rather than depending on the `lpips` package because that package pulls torchvision
(a CUDA build on PyPI) and downloads its backbone at construction; this module reads both weight
files locally (feature_networks.py) and builds the VGG from the state dict's shapes, so tests can use a
tiny random VGG in the same key layout.

  x in [-1, 1] -> (x - shift) / scale -> VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
  per level: unit-normalise over channels (eps 1e-10), squared difference, 1x1 conv (lin_k, no bias),
  spatial mean; LPIPS = sum over levels. Result shape (B, 1, 1, 1).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..feature_networks import LPIPS_FILES, VGG_FILES, find_file, read_state

# torchvision vgg16().features indices of the conv layers, and where LPIPS taps (after the ReLU).
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
POOL_AFTER = (2, 7, 14, 21)  # a max-pool follows these conv indices (at index + 2)
TAPS = (2, 7, 14, 21, 28)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 follow these convs
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """torchvision's `vgg16().features` (conv+ReLU, max-pools) with widths read from the state dict."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.convs = nn.ModuleDict()
        for index in VGG16_CONVS:
            key = f"features.{index}.weight"
            if key not in state:
                raise ValueError(f"the VGG16 weights lack {key}; expected torchvision's vgg16 state dict")
            weight = state[key]
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1)
            conv.weight.data.copy_(weight)
            conv.bias.data.copy_(state[f"features.{index}.bias"])
            self.convs[str(index)] = conv

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index in VGG16_CONVS:
            x = F.relu(self.convs[str(index)](x))
            if index in TAPS:
                taps.append(x)
            if index in POOL_AFTER:
                x = F.max_pool2d(x, 2, 2)
        return taps


class LPIPSVGG(nn.Module):
    """Frozen LPIPS(VGG); call with two batches in [-1, 1], returns (B, 1, 1, 1)."""

    def __init__(self, vgg_state: dict[str, torch.Tensor], lin_state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.features = VGG16Features(vgg_state)
        self.lins = nn.ModuleList()
        for level in range(5):
            key = f"lin{level}.model.1.weight"
            if key not in lin_state:
                raise ValueError(f"the LPIPS weights lack {key}; expected the lpips v0.1 vgg.pth layout")
            weight = lin_state[key]
            lin = nn.Conv2d(weight.shape[1], 1, 1, bias=False)
            lin.weight.data.copy_(weight)
            self.lins.append(lin)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    @classmethod
    def from_folder(cls, folder: str | Path) -> LPIPSVGG:
        vgg = read_state(find_file(folder, VGG_FILES, "LPIPS(VGG) backbone"))
        lin = read_state(find_file(folder, LPIPS_FILES, "LPIPS(VGG) linear heads"))
        return cls(vgg, lin)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        feats_a = self.features((a - self.shift) / self.scale)
        feats_b = self.features((b - self.shift) / self.scale)
        total = 0
        for lin, fa, fb in zip(self.lins, feats_a, feats_b, strict=True):
            na = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((na - nb) ** 2).mean(dim=(2, 3), keepdim=True)
        return total
