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
    text_patcher: Any = None  # the text encoder's own patcher: on the device only while it encodes
    compile: bool = False  # torch.compile the UNet (Load OneStep SR's option)

    def pipeline(self) -> OneStepPipeline:
        """Bring the modules onto ComfyUI's device (offloading others if needed) and wrap them; free
        memory and cache release go through ComfyUI, the result stays on its intermediate device."""
        device = comfy.load_to_device(self.patcher)
        return OneStepPipeline(self.model, torch.device(device), memory=comfy.ComfyMemory((self.patcher,)),
                               output_device=comfy.intermediate_device(), compile=self.compile)
