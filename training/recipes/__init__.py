"""Training recipes: one module per paper's objective, looked up by the config's `method`.

Each entry is imported only when chosen, so a recipe's extra dependencies (DINO, CLIP, ResShift, ...)
are never needed by another.
"""

from __future__ import annotations

import importlib

import torch

from ..config import TrainConfig
from .base import Phase, PhaseLoss, Recipe, RecipeError, StepInputs

RECIPES: dict[str, str] = {
    "osediff": "osediff:OSEDiffRecipe",
    "s3diff": "s3diff:S3DiffRecipe",
    "hero_sr": "herosr:HeroSRRecipe",
    "vpdsr_sd": "vpdsr_sd:VPDSRSDRecipe",
    "hf_diff": "hfdiff:HFDiffRecipe",
    "vpdsr_sinsr": "vpdsr_sinsr:VPDSRSinSRRecipe",
}

__all__ = ["RECIPES", "Phase", "PhaseLoss", "Recipe", "RecipeError", "StepInputs", "build_recipe"]


def build_recipe(config: TrainConfig, device: torch.device) -> Recipe:
    """The configured method's recipe, built on `device`."""
    if config.method not in RECIPES:
        raise RecipeError(f"method {config.method!r} has no training recipe in this version; "
                          f"trainable methods: {', '.join(RECIPES)}")
    module_name, class_name = RECIPES[config.method].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)(config, device)
