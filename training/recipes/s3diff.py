"""The S3Diff recipe (train_s3diff.py): 2 MSE + 5 LPIPS, then the GAN generator step, then the
DINO discriminator on the real GT and on the detached output.

The model and the objective's math live in `training/s3diff.py`; this module wires them to the loop:
base loading, the frozen de_net, the "generator" and "discriminator" phases (each yielded twice per
micro step, as the official loop steps each optimiser twice), and the published `s3diff.pkl` dict.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import discriminator_state, load_discriminator_state
from ..config import TrainConfig
from ..prompts import PromptEncoder
from .base import Phase, PhaseLoss, Recipe, RecipeError, StepInputs
from .osediff import load_lpips

log = logging.getLogger("onestep_sr.training")


class S3DiffRecipe(Recipe):
    method = "s3diff"
    published_file = "s3diff.pkl"
    export_method = "s3diff"
    progress_keys = ("rec", "gan_g", "d_real", "d_fake")

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        from ...models.base_models import load_base
        from ...models.degradation_estimator import load_degradation_estimator
        from ...models.weights_io import WeightsFileError
        from ..s3diff import (
            S3DiffTrainModel,
            add_s3diff_lora,
            discriminator_parameters,
            generator_parameters,
            new_modulator,
            set_s3diff_trainable,
        )

        super().__init__(config, device)
        if not config.model.de_net:
            raise RecipeError("S3Diff training needs model.de_net (the degradation estimator de_net.pth)")
        try:
            de_net = load_degradation_estimator(config.model.de_net)
        except WeightsFileError as error:
            raise RecipeError(str(error)) from None
        self.de_net_path = Path(config.model.de_net)
        if "turbo" not in Path(config.model.base).name.lower():
            log.warning("S3Diff is trained from SD-Turbo; the base %s does not look like SD-Turbo (same architecture, "
                        "so it runs, but the published setup starts from sd-turbo)", Path(config.model.base).name)
        base = load_base(config.model.base, config.model.tokenizer)
        self.prompts = PromptEncoder(base.text_encoder.to(device).float(), base.tokenizer, device)
        lpips = load_lpips(config, device)
        torch.manual_seed(config.seed)  # the discriminator heads' init and spectral-norm vectors draw from it
        discriminator = None
        if config.loss.gan:
            from ..losses.dino_discriminator import DinoDiscriminator

            discriminator = DinoDiscriminator.from_folder(config.model.feature_networks)
        unet, vae = base.unet, base.vae
        rank_unet, rank_vae = config.model.rank_unet, config.model.rank_vae
        add_s3diff_lora(unet, vae, rank_unet, rank_vae, seed=config.seed)
        modulator = new_modulator(rank_unet, rank_vae, seed=config.seed + 1)
        set_s3diff_trainable(unet, vae, modulator)
        if config.model.gradient_checkpointing:  # the VAE's 512 px activations outweigh the UNet's
            unet.enable_gradient_checkpointing()
            vae.enable_gradient_checkpointing()
        weights = {"mse": config.loss.mse, "lpips": config.loss.lpips, "gan": config.loss.gan}
        self.model = S3DiffTrainModel(unet, vae, modulator, de_net, lpips, discriminator, weights)
        if config.model.init_weights:
            self.load_published(config.model.init_weights)
        self.model.to(device)
        self.phases = [Phase("generator", generator_parameters(self.model), config.optim.lr)]
        if discriminator is not None:
            self.phases.append(Phase("discriminator", discriminator_parameters(self.model),
                                     config.optim.lr_fake or config.optim.lr))
        self.negative = self.prompts([config.loss.negative_prompt])

    def load_published(self, path: str) -> None:
        from ...models.method_weights import detect_method
        from ...models.weights_io import WeightsFileError, read_weights_file
        from ..s3diff import load_published

        data = read_weights_file(Path(path))
        if detect_method(data, Path(path).name) != "s3diff":
            raise RecipeError(f"model.init_weights {Path(path).name} is not S3Diff weights")
        try:
            load_published(self.model, data, Path(path).name)
        except WeightsFileError as error:
            raise RecipeError(str(error)) from None

    def extra_state(self) -> dict:
        """The discriminator's buffers: spectral norm's power-iteration vectors change every training forward."""
        return discriminator_state(self.model.discriminator)

    def load_extra_state(self, state: dict) -> None:
        load_discriminator_state(self.model.discriminator, state)

    @property
    def extra_files(self) -> dict[str, Path]:
        """de_net.pth beside s3diff.pkl, where the CLI and the loader node look for it."""
        return {"de_net.pth": self.de_net_path}

    def positive_prompts(self, batch_prompts: list[str]) -> list[str]:
        """loss.positive_prompt (published: one fixed sentence), after the per-image prompt if any."""
        fixed = self.config.loss.positive_prompt
        if not fixed:
            return list(batch_prompts)
        return [f"{p}, {fixed}" if p else fixed for p in batch_prompts]

    def micro_step(self, model: nn.Module, unwrapped: nn.Module, inputs: StepInputs) -> Iterator[PhaseLoss]:
        from ..osediff import StepRandom
        from ..s3diff import AUG_FAKE, AUG_REAL, augment_generators, mix, negative_mask

        random = StepRandom.make(inputs.seed, inputs.micro_step, inputs.batch["id"].tolist())
        positive = self.prompts(self.positive_prompts(inputs.batch["prompt"]))
        lr = inputs.extras.get("lr")
        if lr is None:  # no original-size LR was handed over: the x4-down GT-size input
            scale = self.config.data.scale
            lr = F.interpolate((inputs.lq + 1) / 2, scale_factor=1 / scale, mode="bicubic",
                               align_corners=False).clamp(0, 1)
        scores = unwrapped.degradation_scores(lr)
        negative = negative_mask(random, self.config.loss.negative_sample_prob, inputs.lq.device)
        embeds = mix(negative, self.negative.expand_as(positive), positive)
        target = mix(negative, inputs.lq, inputs.gt)
        rec = model(mode="reconstruction", lq=inputs.lq, target=target, embeds=embeds, scores=scores, random=random)
        yield PhaseLoss("generator", rec["rec"], {**rec, "negative": negative.float().mean()})
        if not self.config.loss.gan:
            return
        adv = model(mode="adversarial", lq=inputs.lq, embeds=positive, scores=scores, random=random)
        fake = adv.pop("image")
        yield PhaseLoss("generator", adv["gan_g"], adv)
        real = model(mode="disc_real", gt=inputs.gt, augment=augment_generators(random, AUG_REAL))
        yield PhaseLoss("discriminator", real["d_real"], real)
        fake = model(mode="disc_fake", fake=fake, augment=augment_generators(random, AUG_FAKE))
        yield PhaseLoss("discriminator", fake["d_fake"], fake)

    def published(self, unwrapped: nn.Module) -> dict:
        from ..s3diff import s3diff_checkpoint

        return s3diff_checkpoint(unwrapped)
