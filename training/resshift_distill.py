"""The ResShift-family student in training: SinSR distillation from a frozen ResShift teacher, plus
image-space objectives on the student's decoded output (HF-Diff's DINOv2 JS term, VPD-SR's CLIP
semantic supervision and high-frequency perception, an optional discriminator).

One `nn.Module` holds the trainable student, the frozen teacher and VQ-f4 and the loss modules, so
accelerate wraps one unit and every student call goes through its forward (DDP syncs gradients).
The math of the SinSR terms lives in `training/losses/sinsr_distill.py`; this module only feeds it
the latents the release feeds it (`training_losses_distill` in wyf0912/SinSR):

- LR `lq` in [-1, 1] at its own size (the UNet's condition), z_y = VQ-encode(bicubic x sf(lq)),
  z_gt = VQ-encode(gt), both without gradient and without quantisation;
- x_T = z_y + kappa sqrt(eta_T) noise, the teacher's deterministic T-step x0 from x_T as target.

The student's x0 from x_T (what inference returns) is decoded with gradient for the image-space
terms: the VQ quantises straight-through, as the release's `decode(..., grad_forward=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.resshift.diffusion import ResShiftDiffusion
from ..models.resshift.swin_unet import SwinUNet
from ..models.resshift.vq_autoencoder import VQAutoencoder
from .losses.sinsr_distill import (
    SinSRDistillationLoss,
    ToySchedule,
    deterministic_sample,
    prior_sample,
    scale_input,
)
from .losses.sinsr_distill import num_timesteps as schedule_steps


def shift_schedule(diffusion: ResShiftDiffusion) -> ToySchedule:
    """The (eta_1..eta_T, kappa) the SinSR losses need, from the pipeline's own schedule (float64)."""
    return ToySchedule(etas=torch.from_numpy(diffusion.etas.copy()), kappa=float(diffusion.kappa))


def straight_through_decode(vq: VQAutoencoder, z: Tensor) -> Tensor:
    """VQ decode whose forward value is the quantised decode and whose gradient passes the quantiser
    unchanged (the release's `decode(z, grad_forward=True)`)."""
    with torch.no_grad():
        quantised = vq.quantize(z)
    quantised = (quantised - z).detach() + z
    return vq.decoder(vq.post_quant_conv(quantised))


@dataclass
class ImageLoss:
    """An objective on the decoded student output: `module(sr, target)` per image, its weight, and
    which image it compares with ("gt", or "teacher" = the teacher's decoded output)."""

    module: nn.Module
    weight: float
    target: str = "gt"


class ResShiftDistillModel(nn.Module):
    """Student (trainable), teacher and VQ (frozen), SinSR losses and optional image-space losses."""

    def __init__(self, student: SwinUNet, teacher: SwinUNet, vq: VQAutoencoder, diffusion: ResShiftDiffusion,
                 distill: SinSRDistillationLoss, image_losses: Mapping[str, ImageLoss] | None = None,
                 discriminator: nn.Module | None = None, gan_weight: float = 0.0, adversarial=None) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.vq = vq.eval().requires_grad_(False)
        self.diffusion = diffusion
        self.schedule = shift_schedule(diffusion)
        self.distill = distill
        self.image_losses = nn.ModuleDict({name: loss.module for name, loss in (image_losses or {}).items()})
        self.image_weights = {name: (loss.weight, loss.target) for name, loss in (image_losses or {}).items()}
        self.discriminator = discriminator
        self.gan_weight = float(gan_weight)
        self.adversarial = adversarial  # the module with discriminator_loss / generator_adversarial_loss

    def train(self, mode: bool = True) -> ResShiftDistillModel:
        super().train(mode)
        self.teacher.eval()
        self.vq.eval()
        if hasattr(self, "ema_student"):  # the recipe's EMA copy (never trained directly)
            self.ema_student.eval()
        return self

    @property
    def sf(self) -> int:
        return int(self.diffusion.config.sf)

    @property
    def last_timestep(self) -> int:
        return schedule_steps(self.schedule) - 1

    # -- latents --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Unquantised VQ latent of images in [-1, 1], times the config's scale factor (1.0 for the
        released models)."""
        dtype = self.vq.dtype
        return self.vq.encode(images.to(dtype)).float() * self.diffusion.config.scale_factor

    def condition(self, lq: Tensor) -> Tensor:
        """z_y: the latent of the bicubic x sf upsample of the LR (as the release and the pipeline)."""
        return self.encode(F.interpolate(lq, scale_factor=self.sf, mode="bicubic"))

    def prior(self, z_y: Tensor, noise: Tensor) -> Tensor:
        return prior_sample(self.schedule, z_y, noise.to(z_y))

    def student_x0(self, x_T: Tensor, lq: Tensor) -> Tensor:
        """The one-step student: f(s(x_T, T-1), T-1, lq), exactly what inference computes."""
        t = torch.full((x_T.shape[0],), self.last_timestep, device=x_T.device, dtype=torch.long)
        return self.student(scale_input(self.schedule, x_T, t), t, lq=lq).float()

    def decode(self, z: Tensor) -> Tensor:
        """Quantised VQ decode in [-1, 1] (unclamped), with straight-through gradient."""
        return straight_through_decode(self.vq, (z / self.diffusion.config.scale_factor).to(self.vq.dtype)).float()

    @torch.no_grad()
    def super_resolve(self, lq: Tensor, noise: Tensor) -> Tensor:
        """The student's SR image for LR `lq` (sizes already multiples of the model's) in [-1, 1],
        clamped: the trainer's own forward, to compare with what the saved file gives at inference."""
        x0 = self.student_x0(self.prior(self.condition(lq), noise), lq)
        return self.decode(x0).clamp(-1, 1)

    # -- the two phases -------------------------------------------------------------------------
    def forward(self, mode: str = "generator", **kwargs) -> dict[str, Tensor]:
        if mode == "generator":
            return self.generator_step(**kwargs)
        if mode == "discriminator":
            return self.discriminator_step(**kwargs)
        raise ValueError(f"unknown mode {mode!r}")

    def generator_step(self, lq: Tensor, gt: Tensor, noise: Tensor, augment=None) -> dict[str, Tensor]:
        """`augment`: per-sample generators for the discriminator's DiffAugment (None: global RNG)."""
        kwargs = {"lq": lq}
        z_y = self.condition(lq)
        x_T = self.prior(z_y, noise)
        z_teacher = deterministic_sample(self.teacher, self.schedule, z_y, x_T, kwargs).float()
        z_gt = self.encode(gt) if self.distill.finetune_use_gt else None
        terms = self.distill(self.student, x_T, z_teacher, z_gt, kwargs)
        total = terms["loss"].mean()
        out = {key: terms[key].mean().detach() for key in ("mse", "mse_xT", "mse_gt", "hf") if key in terms}
        needs_image = bool(self.image_losses) or self.discriminator is not None
        if needs_image:
            sr = self.decode(terms["prediction"])
            teacher_image = None
            for name, module in self.image_losses.items():
                weight, target_name = self.image_weights[name]
                if target_name == "teacher":
                    if teacher_image is None:
                        with torch.no_grad():
                            teacher_image = self.decode(z_teacher).clamp(-1, 1)
                    target = teacher_image
                else:
                    target = gt
                value = module(sr, target).mean()
                out[name] = value.detach()
                total = total + weight * value
            if self.discriminator is not None and self.gan_weight:
                adversarial = self.adversarial.generator_adversarial_loss(self.discriminator, sr, augment)
                out["gan"] = adversarial.detach()
                total = total + self.gan_weight * adversarial
            out["sr"] = sr.detach()
        out["total"] = total
        return out

    def discriminator_step(self, real: Tensor, fake: Tensor, augment=None) -> dict[str, Tensor]:
        loss = self.adversarial.discriminator_loss(self.discriminator, real, fake.detach(), augment)
        return {"discriminator": loss}


def student_parameters(model: ResShiftDistillModel) -> list[tuple[str, nn.Parameter]]:
    return [(f"student.{n}", p) for n, p in model.student.named_parameters() if p.requires_grad]


def discriminator_parameters(model: ResShiftDistillModel) -> list[tuple[str, nn.Parameter]]:
    if model.discriminator is None:
        return []
    return [(f"discriminator.{n}", p) for n, p in model.discriminator.named_parameters() if p.requires_grad]
