"""The ONESTEP_SR_MODEL value passed between nodes: the model plus its ComfyUI patcher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..pipelines.model import OneStepModel
from ..pipelines.onestep import OneStepPipeline
from . import comfy_adapter as comfy

MODEL_TYPE = "ONESTEP_SR_MODEL"
# Pack-prefixed wire types. Inputs also accept the old names, which saved workflows store on their links.
TIMESTEP_TYPE = "ONESTEP_SR_TIMESTEP"
DEGRADATION_TYPE = "ONESTEP_SR_DEGRADATION"
TIMESTEP_INPUT = f"{TIMESTEP_TYPE},SR_TIMESTEP"
DEGRADATION_INPUT = f"{DEGRADATION_TYPE},SR_DEGRADATION"


@dataclass
class OneStepHandle:
    model: OneStepModel
    patcher: Any

    def pipeline(self) -> OneStepPipeline:
        """Bring the modules onto ComfyUI's device (offloading others if needed) and wrap them."""
        device = comfy.load_to_device(self.patcher)
        return OneStepPipeline(self.model, torch.device(device))
