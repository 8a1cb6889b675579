"""VPD-SR's Explicit Semantic-aware Supervision (ESS): match CLIP's visual features of the student's
output to those of the target (GT, or the teacher's output in a distillation recipe).

VPD-SR (arXiv 2506.02605) has no public code and its text available to us is the abstract: ESS
"leverages the powerful visual perceptual understanding capabilities of the CLIP model to extract
explicit semantic supervision". Our formula (docs/training.md, "VPD-SR: semantic supervision"):

    L = sum_l w_l * mean_tokens d(h_l(SR), h_l(target)) + embed_weight * (1 - cos(E(SR), E(target)))

with h_l the vision tower's hidden state after layer l (CLS + patch tokens, (B, 1 + P, C)),
d = 1 - cosine per token ("cosine", default) or the mean squared difference ("mse"), and E the
projected image embedding. Token-level features keep the supervision spatial ("explicit"), the
embedding term carries the global semantics. The target side carries no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .feature_nets import FrozenNetLoss, clip_pixels
from .reduction import check_reduction, reduce

DISTANCES = ("cosine", "mse")


def clip_vision_features(clip_model: Any, images: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
    """(hidden states after each layer, index 1..L (index 0 = embeddings), projected embedding (B, D))."""
    out = clip_model.vision_model(pixel_values=clip_pixels(clip_model, images), output_hidden_states=True)
    embeds = clip_model.visual_projection(out.pooler_output)
    return tuple(h.float() for h in out.hidden_states), embeds.float()


def token_distance(a: Tensor, b: Tensor, distance: str) -> Tensor:
    """Per-image distance between token sets (B, T, C): mean over tokens of 1 - cos, or mean squared."""
    if distance == "cosine":
        return (1 - F.cosine_similarity(a, b, dim=-1)).mean(dim=1)
    return ((a - b) ** 2).mean(dim=(1, 2))


class CLIPSemanticSupervisionLoss(FrozenNetLoss):
    """ESS: CLIP token features of chosen layers + the global embedding, student vs target."""

    frozen_names = ("clip",)

    def __init__(self, clip_model: Any, layers: Sequence[int] = (-1,), layer_weights: Sequence[float] | None = None,
                 embed_weight: float = 1.0, distance: str = "cosine", reduction: str = "mean") -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
        depth = int(clip_model.config.vision_config.num_hidden_layers)
        resolved = []
        for layer in layers:
            index = layer if layer > 0 else depth + 1 + layer
            if not 1 <= index <= depth:
                raise ValueError(f"CLIP layer {layer} is outside 1..{depth} (or -1..-{depth})")
            resolved.append(index)
        weights = [1.0] * len(resolved) if layer_weights is None else [float(w) for w in layer_weights]
        if len(weights) != len(resolved):
            raise ValueError(f"{len(weights)} layer weights for {len(resolved)} layers")
        self.clip = clip_model
        self.layers = tuple(resolved)
        self.layer_weights = tuple(weights)
        self.embed_weight = float(embed_weight)
        self.distance = distance
        self.reduction = check_reduction(reduction)

    def per_image(self, student: tuple[tuple[Tensor, ...], Tensor], target: tuple[tuple[Tensor, ...], Tensor]) -> Tensor:
        """The loss of each image from `clip_vision_features` of student and target."""
        (hs_s, emb_s), (hs_t, emb_t) = student, target
        loss = emb_s.new_zeros(emb_s.shape[0])
        for layer, weight in zip(self.layers, self.layer_weights, strict=True):
            loss = loss + weight * token_distance(hs_s[layer], hs_t[layer], self.distance)
        if self.embed_weight:
            loss = loss + self.embed_weight * (1 - F.cosine_similarity(emb_s, emb_t, dim=-1))
        return loss

    def forward(self, sr: Tensor, target: Tensor) -> Tensor:
        """`sr`, `target`: (B, 3, H, W) in [-1, 1]."""
        with torch.no_grad():
            target_features = clip_vision_features(self.clip, target)
        return reduce(self.per_image(clip_vision_features(self.clip, sr), target_features), self.reduction)
