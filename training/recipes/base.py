"""What the training loop needs from a recipe (one paper's objective), and nothing more.

A recipe owns its model (one `nn.Module`, the unit accelerate wraps for DDP), its optimiser groups
("phases": generator, fake score, discriminator, ...) and one micro step. The loop in `trainer.py`
stays method-agnostic: it runs the phases a micro step yields in order, back-propagates each phase's
loss, and at the accumulation boundary clips and steps that phase's optimiser before the next phase
runs (the order the official trainers use: generator first, then the critic on the updated
generator's detached output).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig


class RecipeError(ValueError):
    """The recipe cannot be built as configured (wrong base for the method, missing file, ...)."""


@dataclass
class Phase:
    """One optimiser: its name (the key of its losses in logs and of its state in checkpoints), its
    named trainable parameters, and its learning rate."""

    name: str
    parameters: list[tuple[str, nn.Parameter]]
    lr: float


@dataclass
class StepInputs:
    """One micro-batch as the loop hands it to the recipe: images in [-1, 1] at GT size on the device."""

    lq: torch.Tensor
    gt: torch.Tensor
    batch: dict[str, Any]
    micro_step: int
    seed: int
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class PhaseLoss:
    """What a phase contributes to a micro step: the loss to back-propagate and the values to log."""

    phase: str
    loss: torch.Tensor
    logs: dict[str, torch.Tensor]


class Recipe:
    """Base class; subclasses set `method`, `published_file`, `export_method`, `model`, `phases`."""

    method: str = ""
    published_file: str = ""  # the file name the official code writes, e.g. osediff.pkl
    export_method: str = ""  # the method name of the pack's safetensors export
    model: nn.Module
    phases: list[Phase]
    progress_keys: tuple[str, ...] = ("total",)

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config, self.device = config, device

    def micro_step(self, model: nn.Module, unwrapped: nn.Module, inputs: StepInputs) -> Iterator[PhaseLoss]:
        """Yield the phases of one micro step in order; the loop back-propagates (and, at the
        accumulation boundary, steps) each before asking for the next."""
        raise NotImplementedError

    def published(self, unwrapped: nn.Module) -> dict:
        """The checkpoint dict in the official code's layout (float32, CPU)."""
        raise NotImplementedError

    def validate(self, unwrapped: nn.Module, step: int) -> dict[str, float]:
        """Run the held-out set through the inference pipeline on the published weights."""
        from ..validation import validate

        return validate(self.config, self.published(unwrapped), step, self.device)

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state a resumed run needs (e.g. spectral norm's power-iteration vectors)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    def load_state(self, trainable: dict[str, torch.Tensor], source: Path) -> None:
        """Copy resumed trainable tensors into the model (names as in `phases`)."""
        named = {n: p for phase in self.phases for n, p in phase.parameters}
        missing = sorted(set(named) - set(trainable))
        if missing:
            raise RecipeError(f"the checkpoint in {source} lacks trainable weights, e.g. {missing[0]}")
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(trainable[name])
