"""VPD-SR's objectives (arXiv 2506.02605) on the SinSR student: the SinSR distillation/reconstruction
loss (vanilla distillation from the ResShift teacher's deterministic sampling, inverse
regularisation, consistency preservation) plus Explicit Semantic-aware Supervision (CLIP visual
features of the decoded SR vs the target) and the High-Frequency Perception loss (Haar detail
bands of SR vs target), and optionally the adversarial extension with the DINO multi-level
discriminator (`training/losses/dino_discriminator.py`, S3Diff's vision-aided discriminator) as a second phase. VPD-SR publishes no code;
the formulas and weights are our choices (docs/training.md), set in the `vpdsr` section shared with the
SD-student recipe (vpdsr_sd); the adversarial weight is `loss.gan`. Saves the student in the SinSR layout
(`VPD-SR_SinSR.pth`, loaded as SinSR by the nodes and `onestep-sr upscale`).
"""

from __future__ import annotations

import torch

from ..config import TrainConfig
from .base import RecipeError
from .resshift_common import ResShiftDistillRecipe


class VPDSRSinSRRecipe(ResShiftDistillRecipe):
    method = "vpdsr_sinsr"
    published_file = "VPD-SR_SinSR.pth"
    export_method = "sinsr"
    progress_keys = ("total", "mse", "semantic", "hfp")

    def extra_objectives(self, config: TrainConfig, device: torch.device):
        """ESS and HFP from the `vpdsr` section (shared with vpdsr_sd), compared with
        `resshift.vpd_target`; the DINO discriminator when `loss.gan` > 0."""
        from ..losses.feature_nets import FeatureNetworkError, load_clip
        from ..losses.high_frequency import HighFrequencyPerceptionLoss
        from ..losses.vpd_semantic import CLIPSemanticSupervisionLoss
        from ..resshift_distill import ImageLoss

        v, target = config.vpdsr, config.resshift.vpd_target
        losses = {}
        if v.semantic:
            try:
                clip, _ = load_clip(v.clip, device, tokenizer=False)
            except FeatureNetworkError as error:
                raise RecipeError(f"vpdsr.clip: {error}") from None
            try:
                semantic = CLIPSemanticSupervisionLoss(clip, layers=v.semantic_layers,
                                                       layer_weights=v.semantic_layer_weights or None,
                                                       embed_weight=v.semantic_embed, distance=v.semantic_distance,
                                                       reduction="none")
            except ValueError as error:
                raise RecipeError(f"vpdsr.semantic_layers: {error}") from None
            losses["semantic"] = ImageLoss(semantic, v.semantic, target)
        if v.hfp:
            losses["hfp"] = ImageLoss(HighFrequencyPerceptionLoss(v.hfp_levels, norm=v.hfp_norm, reduction="none"),
                                      v.hfp, target)
        if not config.loss.gan:
            return losses, None, None
        from ..losses import dino_discriminator as adversarial

        return losses, self.build_discriminator(adversarial, config, device), adversarial

    def build_discriminator(self, adversarial, config: TrainConfig, device: torch.device):
        """S3Diff's vision-aided DINO ViT-B/16 discriminator (DiffAugment on), the ViT read from
        `model.feature_networks` (dino_vitbase16_pretrain.pth); only its heads train."""
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)  # the heads' init and spectral-norm vectors: same every run
                return adversarial.DinoDiscriminator.from_folder(config.model.feature_networks).to(device)
        except (FileNotFoundError, ValueError) as error:
            raise RecipeError(f"loss.gan > 0 needs the DINO discriminator backbone: {error}") from None
