"""What the ResShift-family recipes (HF-Diff, VPD-SR on SinSR) share: loading the teacher, student and
VQ-f4 from the published files, the LR the ResShift UNet works on, per-sample noise, the published
Swin-UNet state dict and validation through the ResShift pipeline.

The loop hands images at GT size (the LR bicubic-upscaled); the ResShift family conditions on the LR
at its own size, so the recipe takes the loop's `extras["lr"]` (paired folders or online degradation).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import discriminator_state, load_discriminator_state
from ..config import TrainConfig
from .base import Phase, PhaseLoss, Recipe, RecipeError, StepInputs

log = logging.getLogger("onestep_sr.training")
NOISE_STREAM = 1


def _read_unet(path: str, config, what: str) -> nn.Module:
    from ...models.resshift.weights import build_unet
    from ...models.weights_io import WeightsFileError, read_weights_file

    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"{what} not found: {file.name} (looked in {file.parent.resolve()})")
    try:
        return build_unet(read_weights_file(file), config, file.name)
    except WeightsFileError as error:
        raise RecipeError(f"{what}: {error}") from None


class ResShiftDistillRecipe(Recipe):
    """Base of the SinSR-student recipes; subclasses add their objectives in `extra_objectives`."""

    progress_keys = ("total", "mse", "mse_gt")

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        from ...models.resshift.config import load_config_file, shipped_config
        from ...models.resshift.diffusion import ResShiftDiffusion
        from ...models.resshift.weights import load_autoencoder
        from ...models.weights_io import WeightsFileError
        from ...pipelines.methods import get_method
        from ...pipelines.resshift import AUTOENCODER_FILE
        from ..losses.sinsr_distill import SinSRDistillationLoss
        from ..resshift_distill import (
            ResShiftDistillModel,
            discriminator_parameters,
            shift_schedule,
            student_parameters,
        )

        super().__init__(config, device)
        rs = config.resshift
        if not rs.teacher:
            raise RecipeError("resshift.teacher is not set: give the ResShift teacher's weights "
                              "(resshift_realsrx4_s15_v1.pth, the teacher SinSR and HF-Diff distil)")
        try:
            self.model_config = load_config_file(rs.model_config) if rs.model_config else shipped_config("sinsr_s15")
            teacher = _read_unet(rs.teacher, self.model_config.unet, "resshift.teacher")
            vq_path = Path(rs.autoencoder) if rs.autoencoder else Path(rs.teacher).parent / AUTOENCODER_FILE
            vq = load_autoencoder(vq_path, self.model_config.vq)
        except WeightsFileError as error:
            raise RecipeError(str(error)) from None
        if config.model.init_weights:
            student = _read_unet(config.model.init_weights, self.model_config.unet, "model.init_weights")
        else:  # SinSR itself: the student starts as a copy of the teacher
            student = copy.deepcopy(teacher)
        student.train().requires_grad_(True)
        if config.data.scale != self.model_config.diffusion.sf:
            raise RecipeError(f"data.scale = {config.data.scale}, but the model is x{self.model_config.diffusion.sf}")
        lr_size = config.data.crop // config.data.scale
        if lr_size % student.size_multiple:
            raise RecipeError(f"data.crop = {config.data.crop} gives {lr_size}-px LR crops; this model needs a multiple "
                              f"of {student.size_multiple} (x{config.data.scale}: crop a multiple of "
                              f"{student.size_multiple * config.data.scale})")
        method = get_method(self.export_method)
        diffusion = ResShiftDiffusion(replace(self.model_config.diffusion, cap_sqrt_001=method.cap_sqrt_001))
        distill = SinSRDistillationLoss(shift_schedule(diffusion), learn_xT=rs.learn_xT,
                                        finetune_use_gt=rs.finetune_use_gt, distill_weight=rs.distill,
                                        hf_loss=self.hf_loss(config))
        image_losses, discriminator, adversarial = self.extra_objectives(config, device)
        self.model = ResShiftDistillModel(student, teacher, vq, diffusion, distill, image_losses, discriminator,
                                          config.loss.gan, adversarial).to(device)
        self.phases = [Phase("generator", student_parameters(self.model), config.optim.lr)]
        self.ema_rate = rs.ema_rate
        if self.ema_rate:  # the release's EMA of the student, from its initial weights
            self.model.ema_student = copy.deepcopy(student).requires_grad_(False).eval()
        if discriminator is not None:
            self.phases.append(Phase("discriminator", discriminator_parameters(self.model),
                                     config.optim.lr_fake or config.optim.lr))

    # -- what subclasses add ---------------------------------------------------------------------
    def hf_loss(self, config: TrainConfig) -> nn.Module | None:
        return None

    def extra_objectives(self, config: TrainConfig, device: torch.device) -> tuple[dict, nn.Module | None, object]:
        return {}, None, None

    # -- one step ----------------------------------------------------------------------------------
    def lr_input(self, inputs: StepInputs) -> torch.Tensor:
        """The LR in [-1, 1] at its own size: the loop's `extras["lr"]` (paired folders or online
        degradation), else the batch's paired LR, else (a custom loop) the upscaled input area-downsampled."""
        lr = inputs.extras.get("lr")
        if lr is None:
            lr = inputs.batch.get("lr")
        if lr is not None:
            return lr.to(inputs.gt.device, torch.float32) * 2 - 1
        sf = self.config.data.scale
        size = (inputs.lq.shape[-2] // sf, inputs.lq.shape[-1] // sf)
        return F.interpolate(inputs.lq, size=size, mode="area")

    def noise(self, inputs: StepInputs, lq: torch.Tensor) -> torch.Tensor:
        """Per-sample latent noise seeded by (run seed, global micro step, image id): resume- and
        process-count-independent, as the other recipes."""
        from ..osediff import per_sample_randn, sample_seed

        shape = (self.model.vq.config.embed_dim, lq.shape[-2] * self.model.sf // self.model.vq.config.downscale,
                 lq.shape[-1] * self.model.sf // self.model.vq.config.downscale)
        seeds = [sample_seed(inputs.seed, inputs.micro_step, int(i), NOISE_STREAM)
                 for i in self.sample_ids(inputs, lq.shape[0])]
        return per_sample_randn(shape, seeds, lq.device)

    @staticmethod
    def sample_ids(inputs: StepInputs, batch_size: int) -> list[int]:
        return inputs.batch["id"].tolist() if "id" in inputs.batch else list(range(batch_size))

    def augment_generators(self, inputs: StepInputs, batch_size: int, stream: int) -> list[torch.Generator]:
        """Per-sample CPU generators for the discriminator's DiffAugment, seeded like the noise."""
        from ..osediff import sample_seed

        return [torch.Generator().manual_seed(sample_seed(inputs.seed, inputs.micro_step, int(i), stream))
                for i in self.sample_ids(inputs, batch_size)]

    def micro_step(self, model: nn.Module, unwrapped: nn.Module, inputs: StepInputs) -> Iterator[PhaseLoss]:
        lq = self.lr_input(inputs)
        adversarial = unwrapped.discriminator is not None
        augment = self.augment_generators(inputs, lq.shape[0], 2) if adversarial else None
        out = model(mode="generator", lq=lq, gt=inputs.gt, noise=self.noise(inputs, lq), augment=augment)
        sr = out.pop("sr", None)
        yield PhaseLoss("generator", out["total"], out)
        accumulation = self.config.train.gradient_accumulation
        if self.ema_rate and inputs.micro_step % accumulation == accumulation - 1:
            update_ema(unwrapped.ema_student, unwrapped.student, self.ema_rate)  # the loop has just stepped
        if adversarial:
            critic = model(mode="discriminator", real=inputs.gt, fake=sr,
                           augment=self.augment_generators(inputs, lq.shape[0], 3))
            yield PhaseLoss("discriminator", critic["discriminator"], critic)

    # -- resume state beyond the trainable weights --------------------------------------------------
    def extra_state(self) -> dict:
        """The EMA weights, and the discriminator heads' buffers (spectral norm's power-iteration
        vectors change every training forward)."""
        state: dict = discriminator_state(self.model.discriminator)
        if self.ema_rate:
            state["ema_student"] = {k: v.detach().cpu().clone() for k, v in self.model.ema_student.state_dict().items()}
        return state

    def load_extra_state(self, state: dict) -> None:
        if self.ema_rate:
            if "ema_student" not in state:
                raise RecipeError("the checkpoint has no EMA weights (resshift.ema_rate was 0 in that run)")
            self.model.ema_student.load_state_dict(state["ema_student"])
        load_discriminator_state(self.model.discriminator, state)

    # -- files -------------------------------------------------------------------------------------
    def published(self, unwrapped: nn.Module) -> dict:
        """The student (its EMA when `resshift.ema_rate` > 0, as the release validates) as the official
        code saves it (HF-Diff.pth / SinSR_v1.pth layout)."""
        from ...models.resshift.weights import published_unet_state

        return published_unet_state(unwrapped.ema_student if self.ema_rate else unwrapped.student)

    def validate(self, unwrapped: nn.Module, step: int) -> dict[str, float]:
        """The held-out set through the ResShift pipeline on the published weights (seeded noise)."""
        from ..resshift_validation import validate_resshift

        return validate_resshift(self.config, self.published(unwrapped), self.export_method, self.model_config,
                                 unwrapped.vq, step, self.device)



@torch.no_grad()
def update_ema(ema: nn.Module, source: nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * source, every tensor (the release's `update_ema_model`)."""
    for target, value in zip(ema.state_dict().values(), source.state_dict().values(), strict=True):
        if target.is_floating_point():
            target.mul_(rate).add_(value.detach().to(target.dtype), alpha=1 - rate)
