"""A loaded one-step SR model: the base modules with the method's weights applied."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.base_models import BaseModels
from ..models.hero_weights import apply_hero_sr, parse_hero_sr
from ..models.lora import WeightPatch, merge_adapters, merge_patches, replace_parameters
from ..models.method_weights import detect_method, parse_osediff
from ..models.modulated_lora import set_modulation
from ..models.s3diff_weights import apply_s3diff, parse_s3diff
from ..models.schedule import alphas_cumprod
from ..models.weights_io import WeightsFileError, read_weights_file
from .methods import MethodSpec, get_method

log = logging.getLogger("onestep_sr")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class OneStepModel:
    method: MethodSpec
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module | None
    tokenizer: Any | None
    weights_name: str = ""
    schedule: torch.Tensor = field(default_factory=alphas_cumprod)
    prompt_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    dtsm: nn.Module | None = None  # Hero-SR: picks t per image
    modulator: nn.Module | None = None  # S3Diff: degradation scores -> per-block LoRA matrices
    degradation_estimator: nn.Module | None = None  # S3Diff: de_net
    # Static LoRA not merged ("unet.<module>.weight" -> updates): a host applies it at load time.
    weight_patches: dict[str, list[WeightPatch]] = field(default_factory=dict, repr=False)
    # Where the text encoder runs: a context manager giving the device (the host moves it there and
    # back); None: wherever its weights are.
    text_encoder_placement: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def modules(self) -> dict[str, nn.Module]:
        named = {"unet": self.unet, "vae": self.vae}
        for name in ("dtsm", "modulator", "degradation_estimator"):
            if getattr(self, name) is not None:
                named[name] = getattr(self, name)
        if self.text_encoder is not None:
            named["text_encoder"] = self.text_encoder
        return named

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           text_dtype: torch.dtype | None = torch.float32, vae_dtype: torch.dtype | None = None) -> OneStepModel:
        """Move every module; the UNet in `dtype`, the VAE in `vae_dtype` (default: `dtype`; see
        pipelines/speed.auto_vae_dtype). The text encoder runs in fp32 by default (once per prompt, cached),
        so a prompt gives the same embedding whatever precision the base file stored it in. text_dtype None
        leaves its precision as it is (a host that shares the weights casts for the run itself)."""
        for name, module in self.modules().items():
            if name == "unet":
                module.to(device=device, dtype=dtype)
            elif name == "vae":
                module.to(device=device, dtype=vae_dtype or dtype)
            elif name == "text_encoder":
                module.to(device=device, dtype=text_dtype)
            else:
                module.to(device=device, dtype=torch.float32)
        return self

    def merge_weight_patches(self) -> None:
        """Merge deferred static LoRA into the weights (as loading without deferral would have)."""
        parts = {"unet": self.unet, "vae": self.vae}
        for part, module in parts.items():
            prefix = part + "."
            merge_patches(module, {k[len(prefix):]: v for k, v in self.weight_patches.items() if k.startswith(prefix)})
        self.weight_patches = {}

    def estimate_degradation(self, images: torch.Tensor) -> torch.Tensor:
        """S3Diff's de_net on images (B, 3, H, W) in [0, 1] at input size: (B, 2) = (blur, noise)."""
        from ..models.degradation_estimator import estimate

        if self.degradation_estimator is None:
            raise ValueError(
                f"{self.method.display_name} has no degradation estimator; it belongs to S3Diff (s3diff.pkl + de_net.pth)"
            )
        return estimate(self.degradation_estimator, images)

    def modulation(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (UNet, VAE) LoRA modulation matrices from (B, 2) degradation scores."""
        return self.modulator(scores.float())

    def set_unet_modulation(self, matrices: torch.Tensor) -> None:
        set_modulation(self.unet, matrices)

    def set_vae_modulation(self, matrices: torch.Tensor) -> None:
        set_modulation(self.vae, matrices)

    def predict_timesteps(self, upscaled: torch.Tensor, mode: str = "sample", seed: int | None = 0,
                          fixed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hero-SR's DTSM on the upscaled batch in [0, 1]: per-image t and the 101 logits."""
        from ..models.dtsm import predict_timesteps

        if self.dtsm is None:
            raise ValueError(
                f"{self.method.display_name} weights have no time-step module (DTSM); "
                "load Hero-SR weights (hero_sr_model.pkl) to choose timesteps per image"
            )
        return predict_timesteps(self.dtsm, upscaled * 2 - 1, mode=mode, seed=seed, fixed=fixed)

    @torch.no_grad()
    def encode_prompt(self, prompt: str, device: torch.device) -> torch.Tensor:
        """CLIP last hidden state for the prompt, padded to 77 tokens as the official code does."""
        if prompt in self.prompt_cache:
            return self.prompt_cache[prompt].to(device)
        if self.tokenizer is None or self.text_encoder is None:
            raise WeightsFileError(
                "no tokenizer is available for this base: load it from a diffusers folder (with tokenizer/), "
                "pass --tokenizer DIR, or use the base through ComfyUI's Load Checkpoint"
            )
        # Pad to the text encoder's 77 positions: tokenizer configs may claim more (ComfyUI's says 8192).
        length = int(self.text_encoder.config.max_position_embeddings)
        ids = self.tokenizer(prompt, max_length=length, padding="max_length", truncation=True,
                             return_tensors="pt").input_ids
        placement = self.text_encoder_placement or (lambda: nullcontext(next(self.text_encoder.parameters()).device))
        with placement() as encoder_device:
            embeds = self.text_encoder(ids.to(encoder_device))[0].float().cpu()
        self.prompt_cache[prompt] = embeds
        return embeds.to(device)


def apply_method_weights(base: BaseModels, data: dict, method_name: str, filename: str,
                         de_net_path: str | Path | None = None, defer_lora: bool = False) -> OneStepModel:
    """Apply a method's weights to the base modules (which become the model's own).

    defer_lora: keep the static LoRA (OSEDiff, Hero-SR) as `weight_patches` instead of merging it, so
    the base tensors stay shared with a host that applies patches at load time (ComfyUI). S3Diff's
    LoRA is modulated per image by the degradation scores: it is never a static patch."""
    method = get_method(method_name)
    if method.base_kind == "sd_turbo" and base.source and "turbo" not in Path(base.source).name.lower():
        log.warning(
            "%s was trained on SD-Turbo; the base %s does not look like SD-Turbo. It has the same architecture "
            "and will run, but results may be worse.", method.display_name, Path(base.source).name or base.source)
    deferred: dict[str, dict[str, list[WeightPatch]]] = {"unet": {}, "vae": {}}
    if method.name == "osediff":
        weights = parse_osediff(data, filename)
        replace_parameters(base.unet, weights.unet_trained)
        merge_adapters(base.unet, weights.unet_adapters, what="UNet", defer=deferred["unet"] if defer_lora else None)
        merge_adapters(base.vae, weights.vae_adapters, what="VAE", defer=deferred["vae"] if defer_lora else None)
    extras: dict[str, nn.Module] = {}
    if method.name == "s3diff":
        if de_net_path is None:
            raise WeightsFileError("S3Diff needs its degradation estimator de_net.pth as well as s3diff.pkl")
        from ..models.degradation_estimator import load_degradation_estimator

        extras["degradation_estimator"] = load_degradation_estimator(de_net_path)
        extras["modulator"] = apply_s3diff(base.unet, base.vae, parse_s3diff(data, filename))
    if method.name == "hero_sr":
        extras["dtsm"] = apply_hero_sr(base.unet, base.vae, parse_hero_sr(data, filename),
                                       defer=deferred if defer_lora else None)
    return OneStepModel(
        method=method, unet=base.unet, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        weights_name=filename, **extras,
        weight_patches={f"{part}.{key}": updates for part, found in deferred.items() for key, updates in found.items()},
    )


def load_onestep_model(base: BaseModels | Callable[[], BaseModels] | None, weights_path: str | Path,
                       method: str = "auto", de_net_path: str | Path | None = None,
                       autoencoder_path: str | Path | None = None, model_config: str | Path | None = None,
                       defer_lora: bool = False):
    """Read a method weights file, check it is the method asked for, and build the model.

    SD methods apply the file to `base` (a BaseModels, or a callable that loads it, given the
    method's base kind, only when needed); S3Diff also needs de_net.pth (default: beside the
    weights file). The ResShift family
    (SinSR, HF-Diff, ResShift) needs no base but the VQ-f4 autoencoder (default:
    autoencoder_vq_f4.pth beside the weights file) and optionally an official-format config for
    models of other sizes.
    """
    from ..models.resshift.weights import FAMILY_METHODS, is_swin_unet

    path = Path(weights_path)
    data = read_weights_file(path)
    if method in FAMILY_METHODS and is_swin_unet(data):
        found = method  # the family shares one layout: an explicit choice wins over the file name
    else:
        found = detect_method(data, path.name)
    if method not in ("auto", found):
        raise WeightsFileError(f"{path.name} holds {found} weights, but method {method!r} was asked for")
    if get_method(found).backbone == "resshift":
        from .resshift import load_resshift_model

        return load_resshift_model(path, data, found, autoencoder_path, model_config)
    if callable(base):
        base = base(get_method(found).base_kind)
    if base is None:
        raise WeightsFileError(f"{path.name} holds {get_method(found).display_name} weights, which need a "
                               "Stable Diffusion 2.x base (--base / the base input)")
    if found == "s3diff" and de_net_path is None:
        de_net_path = path.parent / "de_net.pth"
    return apply_method_weights(base, data, found, path.name, de_net_path, defer_lora=defer_lora)
