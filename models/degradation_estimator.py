"""S3Diff's degradation estimator (`de_net.pth`, the DEResNet of MM-RealSR).

S3Diff conditions its LoRA on two scores in [0, 1] that this frozen network predicts from the
ORIGINAL-size low-resolution image in [0, 1] (not the upscaled one). The two degradations have fully
independent branches; each is

    conv3x3(3->64) -> 6 x ResBlock(64) -> conv3x3 stride 2 (64->128) -> 2 x ResBlock(128)
    -> global average pool -> Linear(128, 512) -> ReLU -> Linear(512, 1) -> Sigmoid

with ResBlock(x) = x + conv2(relu(conv1(x))) (basicsr ResidualBlockNoBN, res_scale 1, no activation
between conv_first and the body). Module names follow the published state dict exactly
(`conv_first.<i>`, `body.<i>.<j>[.conv1|.conv2]`, `fc_degree.<i>.{0,2}`), so it loads with
`strict=True`: 2 x 1,175,681 = 2,351,362 float32 parameters, i.e. the 9.4 MB of the released file.

Which output is which (the official S3Diff code never names them; MM-RealSR, where de_net comes from,
does):
  * MM-RealSR `mmrealsr/models/mmrealsrnet_model.py`, `optimize_parameters`:
    `self.output, (self.pred_blur, self.pred_noise) = self.net_g(...)`, where `net_g` returns the
    de_net's list of per-branch degrees; the blur ranking loss compares images that differ only in
    blur kernel (kernel1_small vs kernel1_large) and the noise ranking loss images that differ only in
    noise level. So branch 0 learned blur and branch 1 noise.
  * MM-RealSR `inference_mmrealsr_demo.py`: `model(lq, (None, score))` is written to
    `demo_noise.mp4` and `model(lq, (score, None))` to `demo_blur.mp4`: custom degree 0 = blur,
    1 = noise.
  * S3Diff loads that network unchanged (`assets/mm-realsr/de_net.pth`, `DEResNet(num_in_ch=3,
    num_degradation=2)` with `load_state_dict(strict=True)` in src/inference_s3diff.py and
    src/train_s3diff.py, frozen during training), and its docstring says "Default: 2(blur+noise)".
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .weights_io import WeightsFileError, read_weights_file

BLUR_INDEX = 0  # branch 0 is trained with MM-RealSR's blur ranking loss (see the module docstring)
NOISE_INDEX = 1  # branch 1 with the noise ranking loss
NUM_DEGRADATIONS = 2

_STAGE_FEATURES = (64, 64, 64, 128)
_STAGE_BLOCKS = (2, 2, 2, 2)
_STAGE_DOWNSCALE = (1, 1, 2, 1)


class ResidualBlockNoBN(nn.Module):
    """x + conv2(relu(conv1(x))): basicsr's block with res_scale 1 (the value de_net was built with)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


def _branch_body() -> nn.Sequential:
    """One branch's body; the layer order fixes the `body.<i>.<j>` indices of the published file."""
    layers: list[nn.Module] = []
    last = len(_STAGE_FEATURES) - 1
    for stage, (features, blocks, down) in enumerate(zip(_STAGE_FEATURES, _STAGE_BLOCKS, _STAGE_DOWNSCALE,
                                                         strict=True)):
        layers.extend(ResidualBlockNoBN(features) for _ in range(blocks))
        following = _STAGE_FEATURES[min(stage + 1, last)]
        if down == 2:
            layers.append(nn.Conv2d(features, following, 3, 2, 1))
        elif following != features:
            layers.append(nn.Conv2d(features, following, 3, 1, 1))
    return nn.Sequential(*layers)


class DegradationEstimator(nn.Module):
    """DEResNet(num_in_ch=3, num_degradation=2): (B, 3, H, W) in [0, 1] -> (B, 2) scores in [0, 1]."""

    def __init__(self, in_channels: int = 3, num_degradations: int = NUM_DEGRADATIONS) -> None:
        super().__init__()
        self.conv_first = nn.ModuleList(
            nn.Conv2d(in_channels, _STAGE_FEATURES[0], 3, 1, 1) for _ in range(num_degradations)
        )
        self.body = nn.ModuleList(_branch_body() for _ in range(num_degradations))
        self.fc_degree = nn.ModuleList(
            nn.Sequential(nn.Linear(_STAGE_FEATURES[-1], 512), nn.ReLU(), nn.Linear(512, 1), nn.Sigmoid())
            for _ in range(num_degradations)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = []
        for first, body, head in zip(self.conv_first, self.body, self.fc_degree, strict=True):
            pooled = body(first(x)).mean(dim=(2, 3))
            scores.append(head(pooled).squeeze(-1))
        return torch.stack(scores, dim=1)


def _check_layout(state: dict, module: nn.Module, path: Path) -> None:
    """Name the first missing/unexpected/misshapen keys so a wrong file is obvious."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {str(unexpected[0])!r}")
    if not problems:
        for key, value in expected.items():
            found = state[key]
            if not isinstance(found, torch.Tensor) or tuple(found.shape) != tuple(value.shape):
                shape = tuple(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
                problems.append(f"{key} has shape {shape}, expected {tuple(value.shape)}")
                break
    if problems:
        raise WeightsFileError(
            f"{path.name} in {path.parent} is not S3Diff's degradation estimator (de_net.pth, "
            f"MM-RealSR DEResNet): {'; '.join(problems)}"
        )


def load_degradation_estimator(path: str | Path) -> DegradationEstimator:
    """Read de_net.pth (weights_only) or our safetensors export of it; fp32, eval mode, frozen."""
    path = Path(path)
    state = read_weights_file(path)  # raises WeightsFileError naming the file and folder
    module = DegradationEstimator()
    _check_layout(state, module, path)
    module.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
    return module.eval().requires_grad_(False)


@torch.no_grad()
def estimate(module: nn.Module, image_bchw01: torch.Tensor) -> torch.Tensor:
    """(blur, noise) scores, shape (B, 2), float32, for images in [0, 1] at their original LR size.

    The range is checked because a [-1, 1] image would give plausible-looking but wrong scores.
    """
    if image_bchw01.dim() != 4 or image_bchw01.shape[1] != 3:
        raise ValueError(f"the degradation estimator takes (B, 3, H, W) RGB images, got {tuple(image_bchw01.shape)}")
    low, high = float(image_bchw01.min()), float(image_bchw01.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"the degradation estimator takes images in [0, 1], got values in [{low:.3f}, {high:.3f}]")
    weight = next(module.parameters())
    scores = module(image_bchw01.to(device=weight.device, dtype=weight.dtype))
    return scores.float()
