"""VPD-SR's objective on the SD one-step student (OSEDiff's generator and VSD distillation).

VPD-SR (arXiv 2506.02605; no public code, only the abstract) distils a multi-step diffusion prior into
a one-step student and adds (1) Explicit Semantic-aware Supervision from CLIP's visual features,
(2) a High-Frequency Perception loss "on top of the vanilla distillation loss", and (3) an
adversarial extension. On the SD student the distillation is OSEDiff's VSD against the frozen base
(with MSE + LPIPS reconstruction), so the objective here is

  L_G = MSE + w_lpips LPIPS + w_vsd VSD + w_sem ESS(SR, GT) + w_hfp HFP(SR, GT) + w_gan L_adv(D(SR))
  L_D = BCE(D(GT), 0.8) + BCE(D(sg(SR)), 0)   (the DINO multi-level discriminator, S3Diff's loss)

with the fake score trained as in OSEDiff. The student, its layout and its checkpoint are OSEDiff's
unchanged (`osediff.pkl`), so the result loads as OSEDiff weights. Every choice: docs/training.md.
"""

from __future__ import annotations

import torch
from torch import nn

from .osediff import OSEDiffTrainModel, StepRandom


def per_sample_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample (DiffAugment draws per sample: the batch split does not matter)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class VPDSRTrainModel(OSEDiffTrainModel):
    """OSEDiff's training module plus the frozen CLIP ESS loss, the HFP loss and the discriminator."""

    def __init__(self, *args, semantic: nn.Module | None = None, hfp: nn.Module | None = None,
                 discriminator: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.semantic, self.hfp, self.discriminator = semantic, hfp, discriminator

    def extra_losses(self, image: torch.Tensor, gt: torch.Tensor, random: StepRandom) -> dict[str, torch.Tensor]:
        from .losses.dino_discriminator import generator_adversarial_loss

        w = self.weights
        losses = {}
        if w.get("semantic") and self.semantic is not None:
            losses["semantic"] = self.semantic(image, gt) * w["semantic"]
        if w.get("hfp") and self.hfp is not None:
            losses["hfp"] = self.hfp(image, gt) * w["hfp"]
        if w.get("gan") and self.discriminator is not None:
            generators = per_sample_generators(random.stream(5))
            losses["gan"] = generator_adversarial_loss(self.discriminator, image, generators) * w["gan"]
        return losses

    def forward(self, mode: str, **inputs) -> dict[str, torch.Tensor]:
        if mode == "discriminator":
            return {"disc": self.discriminator_loss(**inputs)}
        return super().forward(mode, **inputs)

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor, random: StepRandom) -> torch.Tensor:
        from .losses.dino_discriminator import discriminator_loss

        return discriminator_loss(self.discriminator, real, fake, per_sample_generators(random.stream(6)))


def discriminator_parameters(model: VPDSRTrainModel) -> list[tuple[str, nn.Parameter]]:
    if model.discriminator is None:
        return []
    return [(f"discriminator.{n}", p) for n, p in model.discriminator.named_parameters() if p.requires_grad]
