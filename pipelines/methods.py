"""Method descriptions: everything that differs between one-step SR methods, as data.

The pipeline reads these fields and nothing else, so adding a method never touches it. Defaults
reproduce each official implementation (see docs/methods.md for sources and deviations).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    display_name: str
    base_kind: str  # which shipped config family the base must be: "sd21_base" or "sd_turbo"
    timestep: int = 999
    prompt: str = ""
    negative_prompt: str = ""
    guidance: float = 1.0
    process_size: int = 512  # inputs whose short side is below process_size/scale are enlarged first
    enlarge_filter: str = "pil_bicubic"
    upscale_filter: str = "pil_bicubic"
    snap_filter: str = "pil_lanczos"
    snap: int = 8  # model size is snapped down to this multiple by a resize
    pad_multiple: int = 1  # or reflect-padded up to this multiple and cropped back (S3Diff: 64)
    color_fix: str = "adain"
    official_dtype: str = "fp16"
    latent_tile: int = 96
    latent_overlap: int = 32
    vae_encoder_tile: int = 1024
    vae_decoder_tile: int = 224


OSEDIFF = MethodSpec(
    name="osediff",
    display_name="OSEDiff",
    base_kind="sd21_base",
    timestep=999,
    prompt="",
    color_fix="adain",
    official_dtype="fp16",
)

HERO_SR = MethodSpec(
    name="hero_sr",
    display_name="Hero-SR",
    base_kind="sd_turbo",
    timestep=999,  # used only when no timestep is given and the DTSM is bypassed
    prompt=" ",
    enlarge_filter="pil_lanczos",
    color_fix="adain",
    official_dtype="fp32",
)

S3DIFF = MethodSpec(
    name="s3diff",
    display_name="S3Diff",
    base_kind="sd_turbo",
    timestep=999,
    prompt="A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, and natural lighting.",
    negative_prompt="oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, oversmooth",
    guidance=1.07,
    process_size=0,  # no enlargement of small inputs
    upscale_filter="bilinear",  # torch bilinear, align_corners=False, no antialias
    snap=1,
    pad_multiple=64,  # reflect-padded bottom/right, cropped back after decoding
    color_fix="wavelet",
    official_dtype="fp32",
)

METHODS: dict[str, MethodSpec] = {OSEDIFF.name: OSEDIFF, S3DIFF.name: S3DIFF, HERO_SR.name: HERO_SR}
SUPPORTED_SOON: dict[str, str] = {}


def get_method(name: str) -> MethodSpec:
    if name in METHODS:
        return METHODS[name]
    if name in SUPPORTED_SOON:
        raise NotImplementedError(
            f"{SUPPORTED_SOON[name]} weights were recognised, but this version of OneStep SR supports only "
            f"{', '.join(m.display_name for m in METHODS.values())}; update the pack for {SUPPORTED_SOON[name]}"
        )
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
