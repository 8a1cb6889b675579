"""Load OneStep SR: base model (from Load Checkpoint's outputs or a file) + method weights."""

from __future__ import annotations

import logging

from ..models.base_models import (
    base_from_ldm_state,
    load_diffusers_base,
    load_single_file_base,
    load_tokenizer,
    require_epsilon,
    require_sd2_family,
)
from ..models.ldm_convert import detect_base
from ..pipelines.model import DTYPES, load_onestep_model
from . import comfy_adapter as comfy
from .handle import MODEL_TYPE, OneStepHandle

log = logging.getLogger("onestep_sr")
MODEL_INPUT_NAME = "the MODEL input (from Load Checkpoint)"

FROM_INPUTS = "(use the MODEL/CLIP/VAE inputs)"
SHIPPED_CONFIG = "(published model sizes)"
CONFIG_SUFFIXES = (".yaml", ".yml")
AUTOENCODER_FILE = "autoencoder_vq_f4.pth"
DIFFUSERS_PREFIX = "diffusers/"


def comfy_family(unet_state: dict, clip_state: dict) -> str:
    """detect_base on ComfyUI's bare UNet dict; a width it does not know counts as SD-2 when the CLIP is
    SD-2's OpenCLIP-H (ComfyUI keeps it under `clip_h.`; SD-1 under `clip_l.`, SDXL adds `clip_g.`)."""
    family = detect_base(unet_state)
    if family == "unknown" and any(k.startswith("input_blocks.") for k in unet_state):
        prefixes = {key.split(".", 1)[0] for key in clip_state}
        if prefixes & {"clip_h"} and not prefixes & {"clip_g", "clip_l"}:
            return "sd2"
    return family


class OneStepSRLoader:
    DESCRIPTION = (
        "Loads a one-step diffusion SR model: an SD-2.x base (SD-2.1-base for OSEDiff, SD-Turbo for S3Diff and "
        "Hero-SR) plus the method's weights from models/onestep_sr (osediff.pkl, s3diff.pkl + de_net.pth, "
        "hero_sr_model.pkl). The base comes from the MODEL/CLIP/VAE of a Load Checkpoint node, or from a "
        "checkpoint file / diffusers folder chosen here. SinSR, HF-Diff and ResShift (SinSR_v1.pth, HF-Diff.pth, "
        "resshift_realsrx4_s15_v2.pth, ...) need no base: they use autoencoder_vq_f4.pth from models/onestep_sr."
    )
    CATEGORY = "image/upscaling/OneStep SR"
    FUNCTION = "load"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("onestep_model",)
    OUTPUT_TOOLTIPS = ("The base with the method's weights applied; connect it to OneStep Upscale.",)

    @classmethod
    def INPUT_TYPES(cls):
        comfy.register_weights_folder()
        files = comfy.list_files(comfy.WEIGHTS_FOLDER)
        bases = [FROM_INPUTS, *comfy.list_files("checkpoints"),
                 *(DIFFUSERS_PREFIX + name for name in comfy.list_diffusers_folders())]
        return {
            "required": {
                "weights": ([f for f in files if not f.lower().endswith(CONFIG_SUFFIXES)], {
                    "tooltip": "Method weights in models/onestep_sr: osediff.pkl, s3diff.pkl (with de_net.pth "
                               "in the same folder) or hero_sr_model.pkl, or their .safetensors exports "
                               "(onestep-sr convert); HF-Diff.pth, SinSR_v1/_v2.pth or resshift_realsrx4_*.pth "
                               "(with autoencoder_vq_f4.pth in the same folder; keep the published names). "
                               "The method is recognised from the file."}),
                "base": (bases, {
                    "tooltip": "The SD-2.x base: a single-file checkpoint in models/checkpoints, a diffusers "
                               "folder in models/diffusers, or the MODEL/CLIP/VAE inputs of this node."}),
                "dtype": (["auto", "fp16", "bf16", "fp32"], {
                    "default": "auto",
                    "tooltip": "Precision of the UNet and VAE. auto: fp16 where ComfyUI uses fp16 (the "
                               "official OSEDiff precision), else fp32. A VAE that overflows in fp16 falls "
                               "back to fp32 by itself."}),
            },
            "optional": {  # lazy: with a file base, the Load Checkpoint feeding them need not run
                "model": ("MODEL", {"lazy": True, "tooltip": "SD-2.1-base (OSEDiff) or SD-Turbo (S3Diff, Hero-SR) "
                                                             "MODEL from Load Checkpoint (when base is from inputs). "
                                                             "LoRA patches on it are not applied (a warning says so)."}),
                "clip": ("CLIP", {"lazy": True, "tooltip": "Its CLIP, from the same Load Checkpoint."}),
                "vae": ("VAE", {"lazy": True, "tooltip": "Its VAE, from the same Load Checkpoint."}),
                "model_config": ([SHIPPED_CONFIG, *(f for f in files if f.lower().endswith(CONFIG_SUFFIXES))], {
                    "default": SHIPPED_CONFIG,
                    "tooltip": "ResShift/SinSR/HF-Diff only: an official-format YAML in models/onestep_sr for a "
                               "model of another size (your own training). Ignored by the SD methods."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def check_lazy_status(self, weights, base, dtype, model=None, clip=None, vae=None,
                          model_config=SHIPPED_CONFIG, unique_id=None):
        """Ask ComfyUI for MODEL/CLIP/VAE only when the base comes from them."""
        if base != FROM_INPUTS:
            return []
        return [name for name, value in (("model", model), ("clip", clip), ("vae", vae)) if value is None]

    def load(self, weights: str, base: str, dtype: str, model=None, clip=None, vae=None,
             model_config: str = SHIPPED_CONFIG, unique_id=None):
        with comfy.ui_warnings(unique_id):
            weights_path = comfy.full_path(comfy.WEIGHTS_FOLDER, weights)
            de_net = comfy.find_file(comfy.WEIGHTS_FOLDER, "de_net.pth")  # S3Diff's estimator, if present
            config = None if model_config == SHIPPED_CONFIG else comfy.full_path(comfy.WEIGHTS_FOLDER, model_config)
            onestep = load_onestep_model(lambda base_kind: self._load_base(base, model, clip, vae, base_kind),
                                         weights_path, de_net_path=de_net, model_config=config,
                                         autoencoder_path=comfy.find_file(comfy.WEIGHTS_FOLDER, AUTOENCODER_FILE))
        device = comfy.torch_device()
        torch_dtype = comfy.default_dtype(device) if dtype == "auto" else DTYPES[dtype]
        onestep.to(comfy.offload_device(), torch_dtype)
        return (OneStepHandle(model=onestep, patcher=comfy.make_patcher(onestep.modules())),)

    @staticmethod
    def _check_comfy_base(model, clip, state: dict, base_kind: str) -> None:
        """The same one-line refusals as for files, and a visible warning for patches we cannot honour."""
        require_sd2_family(comfy_family(state["unet"], state["text"]), MODEL_INPUT_NAME)
        require_epsilon(comfy.model_prediction(model), MODEL_INPUT_NAME, base_kind)
        patched = {name: comfy.patch_count(value) for name, value in (("MODEL", model), ("CLIP", clip))}
        patched = {name: count for name, count in patched.items() if count}
        if patched:
            what = " and ".join(f"the {name} ({count} patched weights)" for name, count in patched.items())
            log.warning("LoRAs/patches on %s (e.g. from LoraLoader) are not applied by Load OneStep SR; the "
                        "one-step model uses the checkpoint's own weights", what)

    @staticmethod
    def _load_base(base: str, model, clip, vae, base_kind: str | None = None):
        if base == FROM_INPUTS:
            missing = [name for name, value in (("model", model), ("clip", clip), ("vae", vae)) if value is None]
            if missing:
                raise ValueError(
                    f"Load OneStep SR: connect {', '.join(missing)} from a Load Checkpoint node with SD-2.1-base, "
                    "or choose a base checkpoint file in the 'base' widget"
                )
            state = comfy.comfy_base_state(model, clip, vae)
            OneStepSRLoader._check_comfy_base(model, clip, state, base_kind)
            offload = comfy.offload_device()
            moved = {k: {n: t.to(offload) for n, t in v.items()} if isinstance(v, dict) else v
                     for k, v in state.items()}
            tokenizer = load_tokenizer(comfy.comfy_tokenizer_dir(), pad_token="!")
            return base_from_ldm_state(moved["unet"], moved["vae"], moved["text"], "hf", tokenizer,
                                       text_prefix=moved["text_prefix"], source="ComfyUI MODEL/CLIP/VAE")
        if base.startswith(DIFFUSERS_PREFIX):
            return load_diffusers_base(comfy.diffusers_folder(base[len(DIFFUSERS_PREFIX):]), needs=base_kind)
        return load_single_file_base(comfy.full_path("checkpoints", base), tokenizer_dir=comfy.comfy_tokenizer_dir(),
                                     needs=base_kind)
