"""Hero-SR's Dynamic Time-Step Module (DTSM): a small CNN that picks the diffusion timestep per image.

The published network (`TimeAdaptive`, W-JG/Hero-SR src/model.py) sees the x4-upscaled input in
[-1, 1] resized to 128x128 with nearest-neighbour sampling and scores 101 candidate timesteps
{1, 9, 19, ..., 989, 999}. The release then draws one candidate with `F.gumbel_softmax(hard=True)`,
i.e. a sample from softmax(logits), from the unseeded global RNG, so the official t changes from run
to run. We keep that distribution but draw from a seeded generator (reproducible), and also offer
argmax and a user-fixed t.

Parameter and buffer names match `state_dict_time_adaptive` exactly (including the `time_list`
buffer and BatchNorm running statistics), so the published state dict loads strictly. The official
test script calls `model.eval()`, so BatchNorm uses its running statistics; we always do the same.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

NUM_TRAIN_TIMESTEPS = 1000
DTSM_INPUT_SIZE = 128
# 1, then 9 + 10k for k = 0..99: the `time_list` default of the published TimeAdaptive.
CANDIDATE_TIMESTEPS = torch.tensor([1] + [9 + 10 * k for k in range(100)], dtype=torch.long)
SELECTION_MODES = ("sample", "argmax", "fixed")
# Loading tolerates the absence of these two: neither affects an eval-mode forward
# (num_batches_tracked only matters when training; time_list defaults to CANDIDATE_TIMESTEPS).
_OPTIONAL_KEYS = ("num_batches_tracked", "time_list")


class DTSMFormatError(ValueError):
    """The DTSM state dict does not have the published TimeAdaptive layout."""


def _conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    # Index 0 conv (with bias), 1 BN, 2 SiLU: the official `conv1`/`conv2` Sequentials.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.SiLU(),
    )


class _BasicBlock(nn.Module):
    """ResNet basic block with an identity shortcut and SiLU (the official `ResNetBlock`, stride 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.silu(out + x)


class TimeStepSelector(nn.Module):
    """The DTSM network: (B, 3, 128, 128) image in [-1, 1] -> (B, num_candidates) LayerNorm'd logits.

    `forward` returns logits, not a timestep, so that selection (sampled, argmax, fixed) is a separate,
    seedable step: see `select_timesteps` and `predict_timesteps`.
    """

    def __init__(self, channels: int = 64, num_blocks: int = 3, pool_size: int = 7,
                 candidates: torch.Tensor = CANDIDATE_TIMESTEPS) -> None:
        super().__init__()
        # float32 like the official buffer, so the state dicts have identical dtypes.
        self.register_buffer("time_list", candidates.to(torch.float32).clone())
        count = int(candidates.numel())
        self.conv1 = _conv_bn(3, channels)
        self.blocks = nn.Sequential(*[_BasicBlock(channels) for _ in range(num_blocks)])
        self.conv2 = _conv_bn(channels, channels)
        self.pool_size = pool_size
        # Indices 0/2/3 carry weights (1 is SiLU), as in the official `fc` Sequential.
        self.fc = nn.Sequential(
            nn.Linear(channels * pool_size * pool_size, 1000),
            nn.SiLU(),
            nn.Linear(1000, count),
            nn.LayerNorm(count),
        )

    @property
    def candidates(self) -> torch.Tensor:
        """The candidate timesteps as int64 (the loaded `time_list`, normally CANDIDATE_TIMESTEPS)."""
        return self.time_list.round().long()

    def forward(self, image_128: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.blocks(self.conv1(image_128)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, self.pool_size), 1)
        return self.fc(x)


def dtsm_input(upscaled: torch.Tensor) -> torch.Tensor:
    """Resize the x4-upscaled batch (B, 3, H, W) in [-1, 1] to 128x128 with nearest sampling, as the
    release does (F.interpolate's default mode), whatever the aspect ratio."""
    if upscaled.dim() != 4 or upscaled.shape[1] != 3:
        raise ValueError(f"DTSM expects a (B, 3, H, W) image batch, got shape {tuple(upscaled.shape)}")
    return F.interpolate(upscaled, size=(DTSM_INPUT_SIZE, DTSM_INPUT_SIZE), mode="nearest")


def load_dtsm_state(state: Mapping[str, torch.Tensor]) -> TimeStepSelector:
    """Build the DTSM from `state_dict_time_adaptive`, checking key names and shapes strictly.

    A `time_list` in the file is honoured (the official loader loads it too) after checking it holds
    integer timesteps in [0, 999]. The module is returned in eval mode without gradients.
    """
    if not isinstance(state, Mapping):
        raise DTSMFormatError(f"the DTSM state must be a dict of tensors, got {type(state).__name__}")
    count = 101
    if "time_list" in state:
        count = int(torch.as_tensor(state["time_list"]).numel())
    elif "fc.2.weight" in state:
        count = int(state["fc.2.weight"].shape[0])
    candidates = CANDIDATE_TIMESTEPS
    if "time_list" in state:
        values = torch.as_tensor(state["time_list"]).double().reshape(-1)
        if (values != values.round()).any() or values.min() < 0 or values.max() >= NUM_TRAIN_TIMESTEPS:
            raise DTSMFormatError("the DTSM time_list must hold integer timesteps in [0, 999]")
        candidates = values.round().long()
    elif count != CANDIDATE_TIMESTEPS.numel():
        raise DTSMFormatError(f"the DTSM scores {count} timesteps but the file has no time_list to name them")
    module = TimeStepSelector(candidates=candidates)
    expected = module.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith(_OPTIONAL_KEYS))
    if unexpected or missing:
        hint = ""
        if any(str(k).startswith("module.") for k in unexpected):
            hint = " (keys carry a 'module.' prefix: the state was saved from a DataParallel wrapper)"
        raise DTSMFormatError(
            f"state_dict_time_adaptive does not have the Hero-SR TimeAdaptive layout{hint}: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise DTSMFormatError(f"DTSM entry {key} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise DTSMFormatError(
                f"DTSM tensor {key}: shape {tuple(value.shape)} in the file, expected {tuple(expected[key].shape)}"
            )
    module.load_state_dict(dict(state), strict=False)
    return module.eval().requires_grad_(False)


def _check_fixed(fixed: int | None) -> int:
    if fixed is None or isinstance(fixed, bool):
        raise ValueError("mode 'fixed' needs an integer timestep (fixed=...)")
    value = int(fixed)
    if value != fixed:
        raise ValueError(f"the fixed timestep must be an integer, got {fixed!r}")
    if not 0 <= value < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"the fixed timestep must lie in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {value}")
    return value


def select_timesteps(
    logits: torch.Tensor,
    mode: str,
    seed: int | None = None,
    fixed: int | None = None,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn DTSM logits (B, N) into one timestep per image, (B,) int64 on the logits' device.

    - "sample": the release's rule. gumbel_softmax(hard=True) returns the one-hot of
      argmax(logits + Gumbel noise) (tau > 0 does not move the argmax), i.e. a draw from
      softmax(logits). The Gumbel noise is drawn on the CPU from a torch.Generator seeded with `seed`,
      the same way F.gumbel_softmax draws it (-log of Exponential(1)), so a seed gives the same t on
      any device and equals the release's choice under `torch.manual_seed(seed)` on CPU. Images of a
      batch get independent draws from that one stream. `seed=None` takes a seed from torch's global
      RNG (unseeded, like the release).
    - "argmax": the most likely candidate (deterministic; not what the release does).
    - "fixed": `fixed` for every image; any integer in [0, 999] is allowed, not only a candidate,
      since the UNet and the schedule accept every training timestep.
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"unknown timestep mode {mode!r}; choose one of {', '.join(SELECTION_MODES)}")
    if logits.dim() != 2:
        raise ValueError(f"DTSM logits must be (B, N), got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if mode == "fixed":
        return torch.full((batch,), _check_fixed(fixed), dtype=torch.long, device=logits.device)
    table = (CANDIDATE_TIMESTEPS if candidates is None else candidates).long().reshape(-1)
    if table.numel() != logits.shape[1]:
        raise ValueError(f"{logits.shape[1]} logits for {table.numel()} candidate timesteps")
    scores = logits.detach().float().cpu()
    if mode == "sample":
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        gumbel = -torch.empty(scores.shape, dtype=torch.float32).exponential_(generator=generator).log()
        scores = scores + gumbel
    index = scores.argmax(dim=1)
    return table[index].to(logits.device)


@torch.no_grad()
def predict_timesteps(
    dtsm: TimeStepSelector,
    upscaled: torch.Tensor,
    mode: str = "sample",
    seed: int | None = None,
    fixed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the DTSM on the x4-upscaled batch in [-1, 1]; returns (timesteps (B,) int64, logits (B, N)).

    The network always runs with BatchNorm in eval mode (the release's `model.eval()`), in the
    module's own dtype; the logits are computed even for "fixed" so callers can report them.
    """
    parameter = next(dtsm.parameters())
    was_training = dtsm.training
    dtsm.eval()
    try:
        logits = dtsm(dtsm_input(upscaled.to(parameter.device, parameter.dtype))).float()
    finally:
        dtsm.train(was_training)
    timesteps = select_timesteps(logits, mode, seed=seed, fixed=fixed, candidates=dtsm.candidates)
    return timesteps.to(upscaled.device), logits.to(upscaled.device)
