"""The HF-Diff recipe (arXiv 2411.13548; MGHF release `configs/HF-Diff.yaml`, `gaussian_diffusion.py`):
SinSR distillation from the ResShift teacher (deterministic teacher sampling, vanilla distillation,
inverse regularisation with learn_xT, consistency preservation with finetune_use_gt), HF-Diff's INN
high-frequency perceptual loss on the consistency branch's VQ latents (0.2 x MSE, times
finetune_use_gt), and the Jensen-Shannon distribution matching of SR and GT in DINOv2 space;
the student starts from SinSR's weights (`model.init_weights`). Saves `HF-Diff.pth`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TrainConfig
from .base import RecipeError
from .resshift_common import ResShiftDistillRecipe


class HFDiffRecipe(ResShiftDistillRecipe):
    method = "hf_diff"
    published_file = "HF-Diff.pth"
    export_method = "hf_diff"
    progress_keys = ("total", "mse", "mse_gt", "hf", "js")

    def hf_loss(self, config: TrainConfig) -> nn.Module | None:
        from ...models.hf_inn import HFInnFormatError, load_hf_extractor
        from ..losses.hf_perceptual import HighFrequencyPerceptualLoss

        rs = config.resshift
        if not rs.hf:
            return None
        if not rs.finetune_use_gt:
            raise RecipeError("resshift.hf > 0 needs resshift.finetune_use_gt > 0: HF-Diff's INN loss sits on the "
                              "consistency branch and is scaled by finetune_use_gt, as in the release")
        if not rs.hf_inn:
            raise RecipeError("resshift.hf_inn is not set: HF-Diff's high-frequency loss needs the INN checkpoint "
                              "that `onestep-sr train-inn` writes (or set resshift.hf: 0)")
        try:
            extractor = load_hf_extractor(rs.hf_inn, self.device)
        except (FileNotFoundError, HFInnFormatError) as error:
            raise RecipeError(f"resshift.hf_inn: {error}") from None
        if extractor.config.in_channels != self.model_config.vq.embed_dim:
            raise RecipeError(f"resshift.hf_inn: the INN takes {extractor.config.in_channels} channels, but the VQ "
                              f"latent has {self.model_config.vq.embed_dim}")
        return HighFrequencyPerceptualLoss(extractor, weight=rs.hf, reduction="none")

    def extra_objectives(self, config: TrainConfig, device: torch.device):
        from ..losses.feature_nets import FeatureNetworkError, load_dinov2
        from ..losses.js_distribution import DinoJSDistributionLoss
        from ..resshift_distill import ImageLoss

        rs = config.resshift
        if not rs.js:
            return {}, None, None
        if not rs.dino:
            raise RecipeError("resshift.dino is not set: HF-Diff's distribution matching needs a DINOv2 folder "
                              "(transformers Dinov2Model, e.g. facebook/dinov2-base; or set resshift.js: 0)")
        try:
            dino = load_dinov2(rs.dino, device)
        except FeatureNetworkError as error:
            raise RecipeError(f"resshift.dino: {error}") from None
        loss = DinoJSDistributionLoss(dino, rs.js_temperature, rs.js_tokens, rs.feature_size, reduction="none")
        return {"js": ImageLoss(loss, rs.js, "gt")}, None, None
