"""VPD-SR's objectives (arXiv 2506.02605) on the SinSR student: the SinSR distillation/reconstruction
loss (vanilla distillation from the ResShift teacher's deterministic sampling, inverse
regularisation, consistency preservation) plus Explicit Semantic-aware Supervision (CLIP visual
features of the decoded SR vs the target) and the High-Frequency Perception loss (Haar detail
bands of SR vs target), and optionally the adversarial extension with the DINO multi-level
discriminator (`training/losses/dino_discriminator.py`, S3Diff's vision-aided discriminator) as a second phase. VPD-SR publishes no code;
the formulas and weights are our choices (docs/training.md). Saves the student in the SinSR layout
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
        from ..losses.feature_nets import FeatureNetworkError, load_clip
        from ..losses.high_frequency import HighFrequencyPerceptionLoss
        from ..losses.vpd_semantic import CLIPSemanticSupervisionLoss
        from ..resshift_distill import ImageLoss

        rs = config.resshift
        losses = {}
        if rs.semantic:
            if not rs.clip:
                raise RecipeError("resshift.clip is not set: VPD-SR's semantic supervision needs a CLIP folder "
                                  "(transformers CLIPModel, e.g. openai/clip-vit-large-patch14; or set "
                                  "resshift.semantic: 0)")
            try:
                clip, _ = load_clip(rs.clip, device, tokenizer=False)
            except FeatureNetworkError as error:
                raise RecipeError(f"resshift.clip: {error}") from None
            try:
                semantic = CLIPSemanticSupervisionLoss(clip, layers=[int(x) for x in rs.semantic_layers],
                                                       embed_weight=rs.semantic_embed, reduction="none")
            except (ValueError, TypeError) as error:
                raise RecipeError(f"resshift.semantic_layers: {error}") from None
            losses["semantic"] = ImageLoss(semantic, rs.semantic, rs.vpd_target)
        if rs.hfp:
            losses["hfp"] = ImageLoss(HighFrequencyPerceptionLoss(rs.hfp_levels, reduction="none"), rs.hfp,
                                      rs.vpd_target)
        if not rs.gan:
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
            raise RecipeError(f"resshift.gan > 0: {error}") from None
