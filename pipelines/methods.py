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
    base_kind: str  # which shipped config family the base must be: "sd21_base", "sd_turbo"; "" for none
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
    # The backbone that runs it: "sd" (SD-2.x UNet + VAE, one pass at `timestep`) or "resshift"
    # (ResShift's Swin UNet + VQ-f4, see models/resshift). The fields below are for "resshift".
    backbone: str = "sd"
    model_config: str = ""  # shipped config (models/resshift/configs/NAME.json)
    sampler_steps: int = 1  # default steps; 1 with one_step = x0 from x_T in one call
    one_step: bool = False
    cap_sqrt_001: bool = False  # SinSR's copy of the schedule caps sqrt(eta_1) at sqrt(0.001)


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

_RESSHIFT_COMMON = dict(
    base_kind="", backbone="resshift", process_size=0, snap=1, pad_multiple=64, color_fix="none",
    upscale_filter="bicubic", official_dtype="fp16",
)
SINSR = MethodSpec(name="sinsr", display_name="SinSR", model_config="sinsr_s15", one_step=True,
                   cap_sqrt_001=True, **_RESSHIFT_COMMON)
HF_DIFF = MethodSpec(name="hf_diff", display_name="HF-Diff", model_config="sinsr_s15", one_step=True,
                     cap_sqrt_001=True, **_RESSHIFT_COMMON)
RESSHIFT = MethodSpec(name="resshift", display_name="ResShift (15 steps)", model_config="resshift_s15",
                      sampler_steps=15, **_RESSHIFT_COMMON)
RESSHIFT_S4 = MethodSpec(name="resshift_s4", display_name="ResShift v3 (4 steps)", model_config="resshift_s4",
                         sampler_steps=4, **_RESSHIFT_COMMON)

METHODS: dict[str, MethodSpec] = {m.name: m for m in (OSEDIFF, S3DIFF, HERO_SR, SINSR, HF_DIFF, RESSHIFT, RESSHIFT_S4)}
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
