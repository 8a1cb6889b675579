"""Frozen feature networks for the perceptual objectives: CLIP (transformers `CLIPModel`) and
DINOv2 (`Dinov2Model`), read from local folders only, in eval mode with gradients off.

Gradients still flow through them to the images being scored (the loss needs d loss / d image);
only their own parameters are frozen. Images enter in [-1, 1] (the generators' range) and are
preprocessed in torch so the path stays differentiable:
- CLIP: CLIPImageProcessor's rule (shortest side to the model's image_size, bicubic with
  antialiasing, center crop, CLIP mean/std) via `models.clip_tags.clip_preprocess`.
- DINOv2: resize the whole image to `size` x `size` (bicubic, antialiased; default 224, a multiple of
  the 14-px patch) and ImageNet mean/std. The released processor resizes to 256 and center-crops
  224; for square training crops the crop only drops a border, so we skip it (a parameter would
  change nothing for the recipes, which train on squares).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...models.clip_tags import CLIP_MEAN, CLIP_STD, clip_preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


class FeatureNetworkError(FileNotFoundError):
    """A feature network's folder or one of its files is missing or unreadable."""


def _require_files(folder: str | Path, what: str, tokenizer: bool = False) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FeatureNetworkError(f"{what} folder not found: {path.name} (looked in {path.parent})")
    if not (path / "config.json").is_file():
        raise FeatureNetworkError(f"{what}: config.json not found in {path}")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise FeatureNetworkError(f"{what}: model.safetensors (or pytorch_model.bin) not found in {path}")
    if tokenizer and not ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()
                          or (path / "tokenizer.json").is_file()):
        raise FeatureNetworkError(f"{what}: tokenizer files (vocab.json + merges.txt, or tokenizer.json) "
                                  f"not found in {path}")
    return path


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients (losses holding one keep it in eval: `FrozenNetLoss`)."""
    return module.eval().requires_grad_(False)


class FrozenNetLoss(nn.Module):
    """Base for losses that hold frozen networks: `train()` on the loss (or on a trainer module
    that contains it) leaves every frozen network in eval mode, so BatchNorm/dropout never switch."""

    frozen_names: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> FrozenNetLoss:
        super().train(mode)
        for name in self.frozen_names:
            net = getattr(self, name, None)
            if isinstance(net, nn.Module):
                net.eval()
        return self


def load_clip(folder: str | Path, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, tokenizer: bool = True) -> tuple[Any, Any]:
    """(CLIPModel, CLIPTokenizer or None) from a local transformers folder, frozen, in eval mode.
    A missing folder or file raises FeatureNetworkError naming it and the folder."""
    from transformers import CLIPModel, CLIPTokenizer

    path = _require_files(folder, "CLIP model", tokenizer=tokenizer)
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True) if tokenizer else None
    except Exception as error:  # a corrupt or foreign file: say which folder
        raise FeatureNetworkError(f"could not load the CLIP model in {path}: {error}") from error
    return freeze(model.to(device=device, dtype=dtype)), tok


def load_dinov2(folder: str | Path, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> Any:
    """A transformers `Dinov2Model` from a local folder, frozen, in eval mode."""
    from transformers import Dinov2Model

    path = _require_files(folder, "DINOv2 model")
    try:
        model = Dinov2Model.from_pretrained(str(path), local_files_only=True)
    except Exception as error:
        raise FeatureNetworkError(f"could not load the DINOv2 model in {path}: {error}") from error
    return freeze(model.to(device=device, dtype=dtype))


def to_unit_range(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] (the generators' range to the feature networks')."""
    return (images.float() + 1) / 2


def clip_pixels(clip_model: Any, images: Tensor, mean: Sequence[float] = CLIP_MEAN,
                std: Sequence[float] = CLIP_STD) -> Tensor:
    """Differentiable CLIP preprocessing of (B, 3, H, W) images in [-1, 1]."""
    size = int(clip_model.config.vision_config.image_size)
    dtype = next(clip_model.parameters()).dtype
    return clip_preprocess(to_unit_range(images), size=size, mean=mean, std=std).to(dtype)


def clip_image_embeds(clip_model: Any, images: Tensor) -> Tensor:
    """Projected CLIP image embeddings (B, D), not normalised; differentiable in `images`."""
    pooled = clip_model.vision_model(pixel_values=clip_pixels(clip_model, images)).pooler_output
    return clip_model.visual_projection(pooled).float()


def clip_vision_hidden_states(clip_model: Any, images: Tensor) -> tuple[Tensor, ...]:
    """All hidden states of CLIP's vision tower (embeddings, then each layer), (B, 1 + P, C) each."""
    out = clip_model.vision_model(pixel_values=clip_pixels(clip_model, images), output_hidden_states=True)
    return tuple(h.float() for h in out.hidden_states)


@torch.no_grad()
def clip_text_embeds(clip_model: Any, tokenizer: Any, texts: Sequence[str]) -> Tensor:
    """Projected CLIP text embeddings (len(texts), D), not normalised (EOT pooling, as CLIP)."""
    if not texts:
        raise ValueError("no texts to encode")
    device = next(clip_model.parameters()).device
    batch = tokenizer(list(texts), padding="max_length", truncation=True,
                      max_length=tokenizer.model_max_length, return_tensors="pt")
    out = clip_model.text_model(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device))
    return clip_model.text_projection(out.pooler_output).float()


def dinov2_pixels(images: Tensor, size: int = 224) -> Tensor:
    """Differentiable DINOv2 preprocessing of (B, 3, H, W) images in [-1, 1]: resize to size x size
    (bicubic, antialiased), ImageNet mean/std."""
    x = to_unit_range(images)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def dinov2_embeds(dino_model: Any, images: Tensor, size: int = 224, tokens: str = "cls") -> Tensor:
    """DINOv2 image embeddings (B, C): "cls" = the final-layernormed CLS token (`pooler_output`),
    "mean" = the mean of the final-layernormed patch tokens."""
    dtype = next(dino_model.parameters()).dtype
    out = dino_model(pixel_values=dinov2_pixels(images, size).to(dtype))
    if tokens == "cls":
        return out.pooler_output.float()
    if tokens == "mean":
        return out.last_hidden_state[:, 1:].mean(dim=1).float()
    raise ValueError(f"unknown DINOv2 token choice {tokens!r}; use 'cls' or 'mean'")
