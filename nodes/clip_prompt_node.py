"""CLIP Prompt Extract: an OSEDiff-style tag prompt from ComfyUI's CLIP_VISION + SD-2 CLIP.

Image side: `CLIP_VISION.encode_image(image)` (comfy/clip_vision.py) takes IMAGE (B, H, W, C) in
0..1, drops alpha, resizes the shortest side to 224 (bicubic, antialiased), center-crops, rounds to
8 bits and normalises with the CLIP mean/std; `.image_embeds` is post_layernorm(CLS of the last
layer) @ visual_projection, the projected CLIP image embedding (1024-d for ViT-H/14).

Text side: for SD-2, `CLIP.encode_from_tokens(tokens, return_pooled=True)` returns as pooled output
the EOT token's state after ALL 24 layers and final_layer_norm, through text_projection
(comfy/clip_model.py CLIPTextModel_/CLIPTextModel; SD2ClipHModel keeps return_projected_pooled=True;
the "penultimate" layer setting only affects the cond tensor). That is OpenCLIP's encode_text, the
embedding the ViT-H image tower is trained against. But that path encodes one prompt at a time at
77 tokens, ~5,000 times for the vocabulary. So the same computation runs from the CLIP object's
own weights (`cond_stage_model.state_dict()`, prefix `clip_h.transformer.`, after `load_model()`
so LoRA patches are in) with `models.clip_tags.ClipTextTower`: batched and cut to the prompts'
length. It equals the pooled output (checked against real ComfyUI classes); `encode_from_tokens` is
the fallback when the weights are not plain tensors (scaled fp8) or the layout is unknown.

One IMAGE batch gives one STRING: OneStep Upscale applies one prompt to a whole batch, and a list
output (OUTPUT_IS_LIST) would make ComfyUI run the upscaler once per string on the whole batch.
Tags are ranked by their mean score over the batch, so a batch of one gets exactly its own tags.

ComfyUI is reached only through the small functions at the top (lazy imports).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.clip_tags import (
    DEFAULT_THRESHOLD,
    DEFAULT_TOP_K,
    ClipTagsError,
    ClipTextTower,
    TagScorer,
    format_prompt,
    load_vocabulary,
    text_tower_prefixes,
)
from ..pipelines.validation import check_images
from . import comfy_adapter as comfy

IMAGE_CHUNK = 16
DISK_CACHE_VERSION = 1  # bump when the embedding computation changes
log = logging.getLogger("onestep_sr")

# --------------------------------------------------------------------------------------------
# ComfyUI access (lazy; the lead may move these into comfy_adapter)
# --------------------------------------------------------------------------------------------


def clip_vision_embeds(clip_vision: Any, images_bhwc: Tensor) -> Tensor:
    """Projected image embeddings from a CLIP_VISION object, a few images at a time (encode_image
    moves its whole input to the GPU at full resolution)."""
    chunks = []
    for start in range(0, images_bhwc.shape[0], IMAGE_CHUNK):
        output = clip_vision.encode_image(images_bhwc[start:start + IMAGE_CHUNK])
        chunks.append(output["image_embeds"].float().cpu())
    return torch.cat(chunks)


def clip_pooled_via_comfy(clip: Any, text: str) -> Tensor:
    """ComfyUI's own pooled output for one prompt (1, D): the reference path and the fallback."""
    tokens = clip.tokenize(text)
    _cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    if pooled is None:
        raise ClipTagsError("this CLIP model gives no pooled output")
    return pooled.float()


def clip_weights(clip: Any) -> dict[str, Tensor]:
    """The text encoder's current weights (loaded first, so patches such as LoRAs are applied)."""
    clip.load_model()
    return clip.cond_stage_model.state_dict()


def clip_cache_identity(clip: Any) -> tuple[object, Any]:
    """The module whose lifetime bounds the weights, and the patch set applied to it."""
    return clip.cond_stage_model, getattr(getattr(clip, "patcher", None), "patches_uuid", None)


def clip_text_module(clip: Any, prefix: str) -> Any:
    """The ComfyUI module under `prefix` (e.g. clip_h.transformer), or None."""
    try:
        return clip.cond_stage_model.get_submodule(prefix.rstrip("."))
    except AttributeError:
        return None


def comfy_activation_name(function: Any) -> str | None:
    import comfy.clip_model

    for name, candidate in comfy.clip_model.ACTIVATIONS.items():
        if candidate is function:
            return name
    return None


# --------------------------------------------------------------------------------------------
# Encoders built on those
# --------------------------------------------------------------------------------------------


def _tower_settings(clip: Any, prefix: str) -> tuple[int | None, str]:
    """Heads and activation of ComfyUI's text model (not recoverable from tensor shapes)."""
    module = clip_text_module(clip, prefix)
    try:
        layer = module.text_model.encoder.layers[0]
        heads = int(layer.self_attn.heads)
        activation = comfy_activation_name(layer.mlp.activation) or "gelu"
        return heads, activation
    except (AttributeError, IndexError, TypeError):
        return None, "gelu"


def _plain_weights(state: dict[str, Tensor], prefix: str) -> bool:
    """Scaled-fp8 (or otherwise wrapped) weights need ComfyUI's own ops."""
    return not any(k.startswith(prefix) and ("scale_weight" in k or "scale_input" in k) for k in state)


def comfy_text_encoder(clip: Any, image_dim: int, tokenizer_dir: Any,
                       state: dict[str, Tensor] | None = None) -> Callable[[Sequence[str]], Tensor]:
    """encode_texts for the CLIP object; builds the tower lazily (only on a cache miss)."""
    tower: list[Any] = []

    def build() -> Any:
        state_ = state if state is not None else clip_weights(clip)
        return _build_tower(state_)

    def _build_tower(state: dict[str, Tensor]) -> Any:
        prefixes = [p for p in text_tower_prefixes(state) if _plain_weights(state, p)]
        fitting = [p for p in prefixes if state[p + "text_projection.weight"].shape[0] == image_dim]
        if fitting:
            heads, activation = _tower_settings(clip, fitting[0])
            return ClipTextTower(state, tokenizer_dir, prefix=fitting[0], num_heads=heads, activation=activation)
        if prefixes:
            dims = ", ".join(str(state[p + "text_projection.weight"].shape[0]) for p in prefixes)
            raise ClipTagsError(
                f"the CLIP text encoder projects to {dims} dims but the CLIP Vision model to {image_dim}: use an "
                "SD-2.x checkpoint's CLIP with CLIP-ViT-H-14-laion2B-s32B-b79K (both 1024)"
            )
        return None  # unknown layout: ComfyUI's own pooled output, one prompt at a time

    def encode(texts: Sequence[str]) -> Tensor:
        if not tower:
            tower.append(build())
        if tower[0] is not None:
            return tower[0](texts)
        pooled = torch.cat([clip_pooled_via_comfy(clip, text) for text in texts])
        if pooled.shape[-1] != image_dim:
            raise ClipTagsError(
                f"the CLIP pooled output has {pooled.shape[-1]} dims but the CLIP Vision model {image_dim}; "
                "use an SD-2.x checkpoint's CLIP with CLIP-ViT-H-14-laion2B-s32B-b79K"
            )
        return pooled

    return encode


def _bhwc_rgb(image: Tensor) -> Tensor:
    """IMAGE (B, H, W, C) -> RGB, as CLIP_VISION expects (gray repeated, alpha dropped)."""
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 4:
        return image[..., :3]
    if channels in (1, 2):
        return image[..., :1].expand(*image.shape[:-1], 3)
    raise ClipTagsError(f"IMAGE needs 1-4 channels, got {channels}")


def weights_digest(state: dict[str, Tensor]) -> str:
    """Content hash of the text encoder's weights (names, shapes, dtypes, bytes): the disk cache key, so a
    LoRA-patched or different CLIP never reuses another's embeddings."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _disk_cache_file(state: dict[str, Tensor], scorer: TagScorer, image_dim: int) -> Path | None:
    folder = comfy.cache_folder()
    if folder is None:
        return None
    name = f"clip_tags_v{DISK_CACHE_VERSION}_{weights_digest(state)}_{scorer.vocabulary_key[:16]}_{image_dim}"
    return folder / f"{name}.safetensors"


def _load_or_compute(scorer: TagScorer, clip: Any, image_dim: int) -> None:
    """Fill the scorer's vocabulary embeddings: memory, else the disk cache, else encode (then save)."""
    from safetensors.torch import load_file, save_file

    if scorer.has_text_embeddings():
        return
    state = clip_weights(clip)
    scorer.encode_texts = comfy_text_encoder(clip, image_dim, comfy.comfy_tokenizer_dir(), state=state)
    path = _disk_cache_file(state, scorer, image_dim)
    if path is not None and path.is_file():
        try:
            scorer.set_text_embeddings(load_file(str(path))["embeddings"])
            return
        except (OSError, KeyError, ValueError, ClipTagsError) as error:
            log.warning("ignoring the unreadable tag-embedding cache %s (%s)", path.name, error)
    embeddings = scorer.text_embeddings()
    if path is not None:
        partial = path.with_name(path.name + ".partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"embeddings": embeddings.contiguous()}, str(partial))
            os.replace(partial, path)
        except OSError as error:
            log.warning("could not save the tag-embedding cache %s (%s)", path, error)
            partial.unlink(missing_ok=True)


def extract_prompt(image: Tensor, clip_vision: Any, clip: Any, top_k: int, threshold: float,
                   user_prompt: str, vocabulary: Sequence[str] | None = None) -> str:
    """The batch's tag prompt, 'tag1, tag2, ..., user prompt,' (OSEDiff's format without empty parts)."""
    rgb = _bhwc_rgb(image)
    image_embeds = clip_vision_embeds(clip_vision, rgb)
    owner, patches = clip_cache_identity(clip)
    image_dim = int(image_embeds.shape[-1])
    bar = comfy.progress_bar(1)

    def report(done: int, total: int) -> None:
        comfy.check_interrupt()
        bar(done, total)

    scorer = TagScorer(None, None, vocabulary if vocabulary is not None else load_vocabulary(),
                       cache_owner=owner, cache_tag=("comfy-clip", patches, image_dim), on_text_batch=report)
    _load_or_compute(scorer, clip, image_dim)
    tags = scorer.rank_batch(scorer.score_embeddings(image_embeds), top_k=top_k, threshold=threshold)
    return format_prompt([t.tag for t in tags], user_prompt, drop_empty=True)


class OneStepSRCLIPPromptExtract:
    DESCRIPTION = (
        "Tags the image by zero-shot CLIP scoring against the pack's tag vocabulary and writes an "
        "OSEDiff-style prompt 'tag1, tag2, ..., user prompt,' for OneStep Upscale's prompt. Needs the SD-2.x "
        "CLIP (Load Checkpoint) and the CLIP Vision model of the same OpenCLIP model, "
        "CLIP-ViT-H-14-laion2B-s32B-b79K (Load CLIP Vision). The first run per CLIP model encodes the whole "
        "vocabulary (progress bar; about 17 minutes on a CPU for the full-size ViT-H text tower, much less on a "
        "GPU); the result is cached on disk (ComfyUI's user folder, keyed by a hash of the CLIP weights)."
    )
    CATEGORY = "image/upscaling/OneStep SR"
    FUNCTION = "extract"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    OUTPUT_TOOLTIPS = (
        "'tag1, tag2, ..., user prompt,' (OSEDiff's format). One prompt for the whole batch: tags ranked by their "
        "mean score over the images.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Image(s) to tag. A batch gets one shared prompt."}),
                "clip_vision": ("CLIP_VISION", {
                    "tooltip": "From Load CLIP Vision: CLIP-ViT-H-14-laion2B-s32B-b79K, the image tower of the "
                               "OpenCLIP model whose text tower SD-2.x uses."}),
                "clip": ("CLIP", {"tooltip": "The SD-2.x CLIP from Load Checkpoint (its full text tower and "
                                             "projection are used, not the conditioning layer). First use per "
                                             "CLIP model: the vocabulary is encoded once (about 17 min on a "
                                             "CPU for SD-2's ViT-H, much less on a GPU), then read from a disk "
                                             "cache."}),
                "top_k": ("INT", {"default": DEFAULT_TOP_K, "min": 1, "max": 64,
                                  "tooltip": "At most this many tags, best first."}),
                "threshold": ("FLOAT", {
                    "default": DEFAULT_THRESHOLD, "min": 0.0, "max": 20.0, "step": 0.1,
                    "tooltip": "Minimum tag score in standard deviations above the image's average similarity to "
                               "the whole vocabulary. 3 keeps tags that clearly stand out; lower gives more tags."}),
                "user_prompt": ("STRING", {"default": "", "multiline": False,
                                           "tooltip": "Appended after the tags as OSEDiff does: "
                                                      "'tags, user prompt,'. Empty is fine (no empty part "
                                                      "is written)."}),
            },
        }

    def extract(self, image, clip_vision, clip, top_k, threshold, user_prompt):
        image = check_images(image, "CLIP Prompt Extract input 'image'")
        return (extract_prompt(image, clip_vision, clip, top_k, threshold, user_prompt),)
