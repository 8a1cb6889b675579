"""Load OneStep SR: base model (from Load Checkpoint's outputs or a file) + method weights."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..models.base_models import (
    base_from_ldm_state,
    load_diffusers_base,
    load_single_file_base,
    load_tokenizer,
    require_epsilon,
    require_sd2_family,
)
from ..models.ldm_convert import detect_base
from ..pipelines.model import DTYPES, OneStepModel, load_onestep_model
from . import comfy_adapter as comfy
from .handle import MODEL_TYPE, OneStepHandle

log = logging.getLogger("onestep_sr")
MODEL_INPUT_NAME = "the MODEL input (from Load Checkpoint)"

FROM_INPUTS = "(use the MODEL/CLIP/VAE inputs)"
SHIPPED_CONFIG = "(published model sizes)"
CONFIG_SUFFIXES = (".yaml", ".yml")
AUTOENCODER_FILE = "autoencoder_vq_f4.pth"
DIFFUSERS_PREFIX = "diffusers/"


def _by_storage(state: dict) -> dict[tuple[int, tuple[int, ...]], str]:
    return {(t.data_ptr(), tuple(t.shape)): key for key, t in state.items() if isinstance(t, torch.Tensor)}


def host_key_map(modules: dict[str, nn.Module], states: dict[str, dict]) -> dict[int, tuple[nn.Parameter, str, str]]:
    """id(parameter) -> (parameter, ComfyUI part, its key) for the weights built straight from ComfyUI's
    tensors (the LDM -> diffusers conversion only renames or reshapes views: same data pointer and shape).
    Keyed by the Parameter object, which survives the method wrapping a layer (S3Diff) and precision casts,
    while a weight the method replaces (a trained conv_in) is a new object and drops out."""
    lookup = {(ptr, shape): (part, key) for part, state in states.items()
              for (ptr, shape), key in _by_storage(state).items()}
    found = {}
    for module in modules.values():
        for param in module.parameters():
            hit = lookup.get((param.data_ptr(), tuple(param.shape)))
            if hit is not None:
                found[id(param)] = (param, *hit)
    return found


def carried_patches(parts: dict[str, nn.Module], keys: dict[int, tuple[nn.Parameter, str, str]],
                    host_patches: dict[str, dict]) -> dict[str, list]:
    """ComfyUI's patches on the MODEL ("diffusion_model.<key>") and CLIP ("<key>"), re-keyed to our final
    parameter names ("unet.<name>"). A patch on a weight we do not share (one the method replaced) is
    reported, not dropped silently."""
    ours = {}
    for prefix, module in parts.items():
        for name, param in module.named_parameters():
            known = keys.get(id(param))
            if known is None or known[0] is not param:
                continue
            _, part, key = known
            entries = host_patches.get(part, {}).get(f"diffusion_model.{key}" if part == "unet" else key)
            if entries:
                ours[f"{prefix}.{name}"] = list(entries)
    total = sum(len(p) for p in host_patches.values())
    if ours:
        log.info("Load OneStep SR: applying the MODEL/CLIP's patches (LoraLoader) to %d weights", len(ours))
    if total > len(ours):
        log.warning("%d of %d patched weights on the MODEL/CLIP have no counterpart in the one-step model (or "
                    "are weights the method replaces) and are not applied", total - len(ours), total)
    return ours


def shared_tensors(parts: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names -> the host tensor each one shares storage with now (after the method's
    weights and the precision cast: a replaced or re-cast weight shares nothing)."""
    by_ptr = {(t.data_ptr(), tuple(t.shape), t.dtype): t for t in tensors.values() if isinstance(t, torch.Tensor)}
    shared = {}
    for prefix, module in parts.items():
        for name, param in module.named_parameters():
            source = by_ptr.get((param.data_ptr(), tuple(param.shape), param.dtype))
            if source is not None:
                shared[f"{prefix}.{name}"] = source
    return shared


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
                    "tooltip": "Precision of the UNet and VAE. auto: UNet in fp16 where ComfyUI uses fp16 (the "
                               "official OSEDiff precision), else fp32; VAE in bf16 where the GPU supports it "
                               "(as ComfyUI's own VAE), else as the UNet. A VAE that overflows in fp16 falls "
                               "back to fp32 by itself."}),
            },
            "optional": {  # lazy: with a file base, the Load Checkpoint feeding them need not run
                "model": ("MODEL", {"lazy": True, "tooltip": "SD-2.1-base (OSEDiff) or SD-Turbo (S3Diff, Hero-SR) "
                                                             "MODEL from Load Checkpoint (when base is from inputs). "
                                                             "LoRAs applied to it (LoraLoader) count."}),
                "clip": ("CLIP", {"lazy": True, "tooltip": "Its CLIP, from the same Load Checkpoint."}),
                "vae": ("VAE", {"lazy": True, "tooltip": "Its VAE, from the same Load Checkpoint."}),
                "model_config": ([SHIPPED_CONFIG, *(f for f in files if f.lower().endswith(CONFIG_SUFFIXES))], {
                    "default": SHIPPED_CONFIG,
                    "tooltip": "ResShift/SinSR/HF-Diff only: an official-format YAML in models/onestep_sr for a "
                               "model of another size (your own training). Ignored by the SD methods."}),
                "compile": ("BOOLEAN", {  # appended: saved workflows store widgets by position
                    "default": False,
                    "tooltip": "torch.compile the UNet: the first run takes longer (compiling), later runs of the "
                               "same tile size are faster. Needs a working Triton/C++ toolchain."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def check_lazy_status(self, weights, base, dtype, **inputs):
        """Ask ComfyUI for MODEL/CLIP/VAE only when the base comes from them. ComfyUI passes a linked input
        that has not run yet as None and leaves unlinked ones out: asking for an unlinked input is an
        error, and a method without an SD base (HF-Diff, SinSR, ResShift) has none linked."""
        if base != FROM_INPUTS:
            return []
        return [name for name in ("model", "clip", "vae") if name in inputs and inputs[name] is None]

    def load(self, weights: str, base: str, dtype: str, model=None, clip=None, vae=None,
             model_config: str = SHIPPED_CONFIG, compile: bool = False, unique_id=None):
        with comfy.ui_warnings(unique_id):
            weights_path = comfy.full_path(comfy.WEIGHTS_FOLDER, weights)
            de_net = comfy.find_file(comfy.WEIGHTS_FOLDER, "de_net.pth")  # S3Diff's estimator, if present
            config = None if model_config == SHIPPED_CONFIG else comfy.full_path(comfy.WEIGHTS_FOLDER, model_config)
            host: dict = {}  # filled by _load_base when the base is ComfyUI's MODEL/CLIP/VAE
            onestep = load_onestep_model(lambda base_kind: self._load_base(base, model, clip, vae, base_kind, host),
                                         weights_path, de_net_path=de_net, model_config=config,
                                         autoencoder_path=comfy.find_file(comfy.WEIGHTS_FOLDER, AUTOENCODER_FILE),
                                         defer_lora=True)
            device = comfy.torch_device()
            torch_dtype = comfy.default_dtype(device) if dtype == "auto" else DTYPES[dtype]
            if isinstance(onestep, OneStepModel):
                # the text encoder keeps the precision it came in (shared with ComfyUI's CLIP); its placement
                # casts it for the one encoding per prompt
                vae_dtype = comfy.vae_dtype(device, torch_dtype) if dtype == "auto" else torch_dtype
                onestep.to(comfy.offload_device(), torch_dtype, text_dtype=None, vae_dtype=vae_dtype)
                handle = self._handle(onestep, host, model, clip)
                handle.compile = bool(compile)
                return (handle,)
            onestep.to(comfy.offload_device(), torch_dtype)
            return (OneStepHandle(model=onestep, patcher=comfy.make_patcher(onestep.modules())),)

    @staticmethod
    def _handle(onestep: OneStepModel, host: dict, model, clip) -> OneStepHandle:
        """Patchers over our modules: the static LoRA and LoraLoader's patches become ComfyUI weight patches;
        the text encoder gets its own patcher so it is on the device only while it encodes."""
        parts = onestep.modules()
        text_encoder = parts.pop("text_encoder", None)
        shared = shared_tensors(parts, host.get("tensors", {}))
        host_patches = {}
        if host:
            everything = {**parts, **({"text_encoder": text_encoder} if text_encoder is not None else {})}
            host_patches = carried_patches(everything, host["keys"],
                                           {"unet": comfy.patches_of(model), "text": comfy.patches_of(clip)})
        main_patches = {k: v for k, v in host_patches.items() if not k.startswith("text_encoder.")}
        patcher = comfy.make_patcher(parts, onestep.weight_patches, main_patches, shared)
        text_patcher = None
        if text_encoder is not None:
            text_shared = shared_tensors({"text_encoder": text_encoder}, host.get("tensors", {}))
            text_patches = {k: v for k, v in host_patches.items() if k.startswith("text_encoder.")}
            text_patcher = comfy.make_patcher({"text_encoder": text_encoder}, None, text_patches, text_shared)
            onestep.text_encoder_placement = comfy.text_encoder_placement(text_patcher, keep=(patcher,))
        onestep.weight_patches = {}  # ComfyUI owns them now
        return OneStepHandle(model=onestep, patcher=patcher, text_patcher=text_patcher)

    @staticmethod
    def _check_comfy_base(model, clip, state: dict, base_kind: str) -> None:
        """The same one-line refusals as for files."""
        require_sd2_family(comfy_family(state["unet"], state["text"]), MODEL_INPUT_NAME)
        require_epsilon(comfy.model_prediction(model), MODEL_INPUT_NAME, base_kind)

    @staticmethod
    def _load_base(base: str, model, clip, vae, base_kind: str | None = None, host: dict | None = None):
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
            built = base_from_ldm_state(moved["unet"], moved["vae"], moved["text"], "hf", tokenizer,
                                        text_prefix=moved["text_prefix"], source="ComfyUI MODEL/CLIP/VAE")
            if host is not None:  # which of our weights are which of ComfyUI's, before the method changes any
                host["keys"] = host_key_map({"unet": built.unet, "text_encoder": built.text_encoder},
                                            {"unet": moved["unet"], "text": moved["text"]})
                host["tensors"] = {name: tensor for part in ("unet", "vae", "text") for name, tensor in
                                   moved[part].items()}
            return built
        if base.startswith(DIFFUSERS_PREFIX):
            return load_diffusers_base(comfy.diffusers_folder(base[len(DIFFUSERS_PREFIX):]), needs=base_kind)
        return load_single_file_base(comfy.full_path("checkpoints", base), tokenizer_dir=comfy.comfy_tokenizer_dir(),
                                     needs=base_kind)
