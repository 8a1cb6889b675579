"""Load OneStep SR: base model (from Load Checkpoint's outputs or a file) + method weights."""

from __future__ import annotations

from ..models.base_models import (
    base_from_ldm_state,
    load_diffusers_base,
    load_single_file_base,
    load_tokenizer,
)
from ..pipelines.model import DTYPES, load_onestep_model
from . import comfy_adapter as comfy
from .handle import MODEL_TYPE, OneStepHandle

FROM_INPUTS = "(use the MODEL/CLIP/VAE inputs)"
SHIPPED_CONFIG = "(published model sizes)"
CONFIG_SUFFIXES = (".yaml", ".yml")
AUTOENCODER_FILE = "autoencoder_vq_f4.pth"
DIFFUSERS_PREFIX = "diffusers/"


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
            "optional": {
                "model": ("MODEL", {"tooltip": "SD-2.1-base MODEL from Load Checkpoint (when base is from inputs)."}),
                "clip": ("CLIP", {"tooltip": "Its CLIP, from the same Load Checkpoint."}),
                "vae": ("VAE", {"tooltip": "Its VAE, from the same Load Checkpoint."}),
                "model_config": ([SHIPPED_CONFIG, *(f for f in files if f.lower().endswith(CONFIG_SUFFIXES))], {
                    "default": SHIPPED_CONFIG,
                    "tooltip": "ResShift/SinSR/HF-Diff only: an official-format YAML in models/onestep_sr for a "
                               "model of another size (your own training). Ignored by the SD methods."}),
            },
        }

    def load(self, weights: str, base: str, dtype: str, model=None, clip=None, vae=None,
             model_config: str = SHIPPED_CONFIG):
        weights_path = comfy.full_path(comfy.WEIGHTS_FOLDER, weights)
        de_net = comfy.find_file(comfy.WEIGHTS_FOLDER, "de_net.pth")  # S3Diff's estimator, if present
        config = None if model_config == SHIPPED_CONFIG else comfy.full_path(comfy.WEIGHTS_FOLDER, model_config)
        onestep = load_onestep_model(lambda: self._load_base(base, model, clip, vae), weights_path,
                                     de_net_path=de_net, model_config=config,
                                     autoencoder_path=comfy.find_file(comfy.WEIGHTS_FOLDER, AUTOENCODER_FILE))
        device = comfy.torch_device()
        torch_dtype = comfy.default_dtype(device) if dtype == "auto" else DTYPES[dtype]
        onestep.to(comfy.offload_device(), torch_dtype)
        return (OneStepHandle(model=onestep, patcher=comfy.make_patcher(onestep.modules())),)

    @staticmethod
    def _load_base(base: str, model, clip, vae):
        if base == FROM_INPUTS:
            missing = [name for name, value in (("model", model), ("clip", clip), ("vae", vae)) if value is None]
            if missing:
                raise ValueError(
                    f"Load OneStep SR: connect {', '.join(missing)} from a Load Checkpoint node with SD-2.1-base, "
                    "or choose a base checkpoint file in the 'base' widget"
                )
            state = comfy.comfy_base_state(model, clip, vae)
            offload = comfy.offload_device()
            moved = {k: {n: t.to(offload) for n, t in v.items()} if isinstance(v, dict) else v
                     for k, v in state.items()}
            tokenizer = load_tokenizer(comfy.comfy_tokenizer_dir(), pad_token="!")
            return base_from_ldm_state(moved["unet"], moved["vae"], moved["text"], "hf", tokenizer,
                                       text_prefix=moved["text_prefix"], source="ComfyUI MODEL/CLIP/VAE")
        if base.startswith(DIFFUSERS_PREFIX):
            return load_diffusers_base(comfy.diffusers_folder(base[len(DIFFUSERS_PREFIX):]))
        return load_single_file_base(comfy.full_path("checkpoints", base), tokenizer_dir=comfy.comfy_tokenizer_dir())
