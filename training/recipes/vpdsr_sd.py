"""The VPD-SR recipe on the SD one-step student: OSEDiff's generator, VSD distillation and checkpoint,
plus VPD-SR's CLIP semantic supervision, high-frequency perception loss and (with loss.gan > 0) the
adversarial extension with the DINO multi-level discriminator as a third phase.

The model's math lives in `training/vpdsr.py`; the student and its published `osediff.pkl` layout are
OSEDiff's, so the trained file loads in the nodes and `onestep-sr upscale` as OSEDiff weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from ..checkpoints import discriminator_state, load_discriminator_state
from ..config import TrainConfig
from .base import Phase, PhaseLoss, RecipeError, StepInputs
from .osediff import OSEDiffRecipe


class VPDSRSDRecipe(OSEDiffRecipe):
    method = "vpdsr_sd"
    published_file = "osediff.pkl"
    export_method = "osediff"
    progress_keys = ("total", "semantic", "hfp", "gan", "disc")

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        from ..vpdsr import discriminator_parameters

        super().__init__(config, device)
        discriminator = discriminator_parameters(self.model)
        if discriminator:
            self.phases.append(Phase("discriminator", discriminator, config.optim.lr_fake or config.optim.lr))

    def make_model(self, unet: nn.Module, vae: nn.Module, lpips: nn.Module | None, weights: dict) -> nn.Module:
        from ..feature_networks import FeatureNetworkMissing
        from ..losses.feature_nets import FeatureNetworkError, load_clip
        from ..losses.high_frequency import HighFrequencyPerceptionLoss
        from ..losses.vpd_semantic import CLIPSemanticSupervisionLoss
        from ..vpdsr import VPDSRTrainModel

        config, v = self.config, self.config.vpdsr
        semantic = hfp = discriminator = None
        if v.semantic:
            try:
                clip, _ = load_clip(v.clip, device=self.device, tokenizer=False)
            except FeatureNetworkError as error:
                raise RecipeError(f"vpdsr.clip: {error}") from None
            semantic = CLIPSemanticSupervisionLoss(clip, layers=v.semantic_layers,
                                                   layer_weights=v.semantic_layer_weights or None,
                                                   embed_weight=v.semantic_embed, distance=v.semantic_distance)
        if v.hfp:
            hfp = HighFrequencyPerceptionLoss(levels=v.hfp_levels, norm=v.hfp_norm)
        if config.loss.gan:
            from ..losses.dino_discriminator import DinoDiscriminator

            try:
                discriminator = DinoDiscriminator.from_folder(config.model.feature_networks)
            except FeatureNetworkMissing as error:
                raise RecipeError(f"loss.gan > 0 needs the DINO discriminator backbone: {error}") from None
        weights = {**weights, "semantic": v.semantic, "hfp": v.hfp, "gan": config.loss.gan}
        return VPDSRTrainModel(unet, vae, None, lpips, weights, config.loss.vsd_guidance,
                               (config.loss.vsd_t_min, config.loss.vsd_t_max),
                               semantic=semantic, hfp=hfp, discriminator=discriminator)

    def micro_step(self, model: nn.Module, unwrapped: nn.Module, inputs: StepInputs) -> Iterator[PhaseLoss]:
        from ..osediff import StepRandom

        embeds = self.prompts(inputs.batch["prompt"])
        random = StepRandom.make(inputs.seed, inputs.micro_step, inputs.batch["id"].tolist())
        out = model(mode="generator", lq=inputs.lq, gt=inputs.gt, embeds=embeds,
                    negative=self.negative.expand(inputs.lq.shape[0], -1, -1), random=random)
        z0, image = out.pop("z0"), out.pop("image")
        yield PhaseLoss("generator", out["total"], out)
        fake = model(mode="fake", **unwrapped.fake_inputs(z0, embeds, random))
        yield PhaseLoss("fake", fake["fake"], fake)
        if unwrapped.discriminator is not None:
            disc = model(mode="discriminator", real=inputs.gt, fake=image, random=random)
            yield PhaseLoss("discriminator", disc["disc"], disc)

    def extra_state(self) -> dict:
        """The discriminator heads' buffers (spectral norm's power-iteration vectors), as S3Diff's recipe."""
        return discriminator_state(self.model.discriminator)

    def load_extra_state(self, state: dict) -> None:
        load_discriminator_state(self.model.discriminator, state)

    def validate(self, unwrapped: nn.Module, step: int) -> dict[str, float]:
        """The student is OSEDiff's: validate its osediff.pkl through the OSEDiff pipeline."""
        from ..validation import validate

        return validate(dataclasses.replace(self.config, method="osediff"), self.published(unwrapped), step,
                        self.device)
