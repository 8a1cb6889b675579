"""The OSEDiff recipe (train_osediff.py): generator MSE + LPIPS x2 + VSD, then the fake score's eps-MSE.

The model and the objective's math live in `training/osediff.py`; this module only wires them to the
loop: base loading, the generator and fake-score phases, the published `osediff.pkl` dict.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig
from ..prompts import PromptEncoder
from .base import Phase, PhaseLoss, Recipe, RecipeError, StepInputs


def load_lpips(config: TrainConfig, device: torch.device) -> nn.Module | None:
    """LPIPS(VGG) from `model.feature_networks` when the config weights it, else None."""
    if not config.loss.lpips:
        return None
    from ..losses.lpips import LPIPSVGG

    return LPIPSVGG.from_folder(config.model.feature_networks).to(device)


class OSEDiffRecipe(Recipe):
    method = "osediff"
    published_file = "osediff.pkl"
    export_method = "osediff"
    progress_keys = ("total", "vsd", "fake")

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        from ...models.base_models import load_base
        from ..adapters import add_osediff_adapters, set_osediff_trainable
        from ..osediff import fake_parameters, generator_parameters

        super().__init__(config, device)
        base = load_base(config.model.base, config.model.tokenizer)
        self.prompts = PromptEncoder(base.text_encoder.to(device).float(), base.tokenizer, device)
        lpips = load_lpips(config, device)
        torch.manual_seed(config.seed)  # LoRA A initialisation (peft's "gaussian") draws from the global RNG
        unet, vae = base.unet, base.vae
        self.lists = add_osediff_adapters(unet, vae, config.model.lora_rank, config.model.fake_lora_rank)
        set_osediff_trainable(unet, vae)
        if config.model.init_weights:
            self.load_published(unet, vae, config.model.init_weights)
        if config.model.gradient_checkpointing:  # the VAE's 512 px activations outweigh the UNet's (see
            unet.enable_gradient_checkpointing()  # docs/training.md, Memory and speed)
            vae.enable_gradient_checkpointing()
        weights = {"mse": config.loss.mse, "lpips": config.loss.lpips, "vsd": config.loss.vsd}
        self.model = self.make_model(unet, vae, lpips, weights)
        self.model.to(device)
        self.phases = [Phase("generator", generator_parameters(self.model), config.optim.lr),
                       Phase("fake", fake_parameters(self.model), config.optim.lr_fake or config.optim.lr)]
        self.negative = self.prompts([config.loss.negative_prompt])

    def make_model(self, unet: nn.Module, vae: nn.Module, lpips: nn.Module | None, weights: dict) -> nn.Module:
        """The training module (recipes on the same student, e.g. VPD-SR, add their terms here)."""
        from ..osediff import OSEDiffTrainModel

        config = self.config
        return OSEDiffTrainModel(unet, vae, None, lpips, weights, config.loss.vsd_guidance,
                                 (config.loss.vsd_t_min, config.loss.vsd_t_max))

    @staticmethod
    def load_published(unet: nn.Module, vae: nn.Module, path: str) -> None:
        from ...models.method_weights import detect_method
        from ...models.weights_io import read_weights_file

        data = read_weights_file(Path(path))
        if detect_method(data, Path(path).name) != "osediff":
            raise RecipeError(f"model.init_weights {Path(path).name} is not OSEDiff weights")
        for module, key in ((unet, "state_dict_unet"), (vae, "state_dict_vae")):
            result = module.load_state_dict(data[key], strict=False)
            if result.unexpected_keys:
                raise RecipeError(f"{Path(path).name}: {key} has entries the model lacks, e.g. "
                                  f"{result.unexpected_keys[0]} (different rank or base?)")

    def micro_step(self, model: nn.Module, unwrapped: nn.Module, inputs: StepInputs) -> Iterator[PhaseLoss]:
        from ..osediff import StepRandom

        embeds = self.prompts(inputs.batch["prompt"])
        random = StepRandom.make(inputs.seed, inputs.micro_step, inputs.batch["id"].tolist())
        out = model(mode="generator", lq=inputs.lq, gt=inputs.gt, embeds=embeds,
                    negative=self.negative.expand(inputs.lq.shape[0], -1, -1), random=random)
        z0 = out.pop("z0")
        out.pop("image")
        yield PhaseLoss("generator", out["total"], out)
        fake = model(mode="fake", **unwrapped.fake_inputs(z0, embeds, random))
        yield PhaseLoss("fake", fake["fake"], fake)

    def published(self, unwrapped: nn.Module) -> dict:
        from ..osediff import osediff_checkpoint

        return osediff_checkpoint(unwrapped, self.lists, self.config.model.lora_rank)
