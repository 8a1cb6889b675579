"""Hero-SR's Open-World Multi-modality Supervision (OWMS): two CLIP losses on the SR image.

The training code and the paper's loss equations are not public (W-JG/Hero-SR ships test code
only; the abstract names a "Text-Domain Perceptual Alignment Loss" and an "Image-Domain Semantic
Alignment Loss" through CLIP). The formulas below are our choices, each a parameter, and are
explained in docs/training.md ("Hero-SR: OWMS"):

- Text-domain perceptual alignment, `TextPerceptualAlignmentLoss`. With e = CLIP image embedding
  of SR, P_k / N_k = positive / negative quality texts (all L2-normalised):
  * mode "antonym" (default, the CLIP-IQA rule): p_k = softmax(s * [e.P_k, e.N_k])[0],
    L = mean_k (1 - p_k), s = CLIP's logit scale (or 1 / temperature);
  * mode "cosine": L = mean_k (1 - e.P_k) (negatives unused).
  Optional per-image content texts c_b (e.g. a caption or the tags of the GT):
  L += content_weight * (1 - e_b.c_b).
- Image-domain semantic alignment, `ImageSemanticAlignmentLoss`: L = 1 - cos(E(SR), E(GT)), the
  GT embedding without gradient.
Both give one value per image and reduce with `reduction`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .feature_nets import FrozenNetLoss, clip_image_embeds, clip_text_embeds
from .reduction import check_reduction, reduce

# CLIP-IQA's antonym prompt pairs (Wang et al. 2023, the "quality" attributes), used by default.
DEFAULT_QUALITY_PAIRS: tuple[tuple[str, str], ...] = (
    ("Good photo.", "Bad photo."),
    ("Sharp photo.", "Blurry photo."),
    ("Clean photo.", "Noisy photo."),
    ("High resolution photo.", "Low resolution photo."),
    ("Natural photo.", "Unnatural photo."),
)
TEXT_MODES = ("antonym", "cosine")


class TextPerceptualAlignmentLoss(FrozenNetLoss):
    """Pull the SR image's CLIP embedding towards quality (and optional content) texts."""

    frozen_names = ("clip",)

    def __init__(self, clip_model: Any, positive_embeds: Tensor, negative_embeds: Tensor | None = None,
                 mode: str = "antonym", temperature: float | None = None, content_weight: float = 1.0,
                 reduction: str = "mean") -> None:
        super().__init__()
        if mode not in TEXT_MODES:
            raise ValueError(f"unknown text-alignment mode {mode!r}; choose one of {', '.join(TEXT_MODES)}")
        if mode == "antonym" and (negative_embeds is None or negative_embeds.shape != positive_embeds.shape):
            raise ValueError("mode 'antonym' needs one negative text per positive text")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"the temperature must be positive, got {temperature}")
        self.clip = clip_model
        self.mode = mode
        self.temperature = temperature
        self.content_weight = float(content_weight)
        self.reduction = check_reduction(reduction)
        self.register_buffer("positive", F.normalize(positive_embeds.detach().float(), dim=-1))
        negatives = negative_embeds if negative_embeds is not None else positive_embeds
        self.register_buffer("negative", F.normalize(negatives.detach().float(), dim=-1))

    @classmethod
    def from_texts(cls, clip_model: Any, tokenizer: Any,
                   pairs: Sequence[tuple[str, str]] = DEFAULT_QUALITY_PAIRS, **kwargs: Any
                   ) -> TextPerceptualAlignmentLoss:
        """Encode (positive, negative) text pairs once with the frozen CLIP text tower."""
        positive = clip_text_embeds(clip_model, tokenizer, [p for p, _ in pairs])
        negative = clip_text_embeds(clip_model, tokenizer, [n for _, n in pairs])
        return cls(clip_model, positive, negative, **kwargs)

    def scale(self) -> Tensor:
        if self.temperature is not None:
            return torch.tensor(1.0 / self.temperature)
        return self.clip.logit_scale.detach().float().exp().cpu()

    def per_image(self, image_embeds: Tensor, content_embeds: Tensor | None = None) -> Tensor:
        """The loss of each image from its (unnormalised) CLIP embedding (B, D)."""
        e = F.normalize(image_embeds.float(), dim=-1)
        positive, negative = self.positive.to(e), self.negative.to(e)
        cos_pos = e @ positive.T  # (B, K)
        if self.mode == "cosine":
            loss = (1 - cos_pos).mean(dim=1)
        else:
            logits = self.scale().to(e.device) * torch.stack([cos_pos, e @ negative.T], dim=-1)
            loss = (1 - logits.softmax(dim=-1)[..., 0]).mean(dim=1)
        if content_embeds is not None and self.content_weight:
            if content_embeds.shape != image_embeds.shape:
                raise ValueError(f"content embeddings {tuple(content_embeds.shape)} for images {tuple(e.shape)}")
            content = F.normalize(content_embeds.detach().float(), dim=-1)
            loss = loss + self.content_weight * (1 - (e * content).sum(dim=-1))
        return loss

    def forward(self, sr: Tensor, content_embeds: Tensor | None = None) -> Tensor:
        """`sr`: (B, 3, H, W) in [-1, 1]; `content_embeds`: optional (B, D) text embeddings."""
        return reduce(self.per_image(clip_image_embeds(self.clip, sr), content_embeds), self.reduction)


class ImageSemanticAlignmentLoss(FrozenNetLoss):
    """1 - cos(CLIP(SR), CLIP(GT)) per image; the GT side carries no gradient."""

    frozen_names = ("clip",)

    def __init__(self, clip_model: Any, reduction: str = "mean") -> None:
        super().__init__()
        self.clip = clip_model
        self.reduction = check_reduction(reduction)

    @staticmethod
    def from_embeds(sr_embeds: Tensor, gt_embeds: Tensor) -> Tensor:
        """Per-image loss from CLIP embeddings (B, D) already computed (a recipe sharing one CLIP pass
        of SR between the OWMS terms); the GT side is detached."""
        return 1 - F.cosine_similarity(sr_embeds.float(), gt_embeds.detach().float(), dim=-1)

    def forward(self, sr: Tensor, gt: Tensor) -> Tensor:
        with torch.no_grad():
            target = clip_image_embeds(self.clip, gt)
        return reduce(self.from_embeds(clip_image_embeds(self.clip, sr), target), self.reduction)
