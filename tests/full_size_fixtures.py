"""Full-size random SD-2.1-base weights for the real-ComfyUI integration test.

`ensure_full_size_weights(cache_dir)` writes (once; later calls reuse the files):
  * an fp16 single-file checkpoint in the original LDM layout (model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.model.* with the 24-block OpenCLIP text tower, text_projection and logit_scale), made from
    randomly initialised (seeded) diffusers/transformers modules built from the shipped sd21_base configs;
  * an `osediff.pkl` in the published layout (PEFT adapters on the full-size UNet/VAE), LoRA B kept small so
    the outputs stay finite.
Nothing is downloaded. Building takes a minute or two and about 8 GiB of RAM.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from onestep_sr.models import ldm_convert
from onestep_sr.models.base_models import load_config

# Bump when the way the files are made changes, so a stale cache is not reused.
VERSION = "v1"
CHECKPOINT_NAME = f"sd21_base_random_{VERSION}_fp16.safetensors"
OSEDIFF_NAME = f"osediff_random_{VERSION}.pkl"
LORA_B_STD = 0.01


def _atomic_write(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def _random_modules(seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**load_config("sd21_base", "unet")).eval().requires_grad_(False)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**load_config("sd21_base", "vae")).eval().requires_grad_(False)
    torch.manual_seed(seed + 2)
    text = CLIPTextModel(CLIPTextConfig(**load_config("sd21_base", "text_encoder"))).eval().requires_grad_(False)
    return unet, vae, text


def _write_osediff_pkl(unet, vae, path: Path, seed: int) -> None:
    import synthetic_weights

    peft_unet, peft_vae, lists = synthetic_weights.make_osediff_peft_models(
        SimpleNamespace(unet=unet, vae=vae), rank=4, seed=seed
    )
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for module in (peft_unet, peft_vae):
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(LORA_B_STD * torch.randn(param.shape, generator=generator))
    data = synthetic_weights.osediff_checkpoint_dict(peft_unet, peft_vae, lists, rank=4)
    del peft_unet, peft_vae
    gc.collect()
    _atomic_write(path, lambda target: torch.save(data, target))


def _write_checkpoint(unet, vae, text, path: Path, seed: int) -> None:
    from safetensors.torch import save_file

    def half(state):
        return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}

    unet_ldm = half(ldm_convert.diffusers_to_ldm_unet(unet.state_dict(), load_config("sd21_base", "unet")))
    vae_ldm = half(ldm_convert.diffusers_to_ldm_vae(vae.state_dict(), load_config("sd21_base", "vae")))
    text_config = load_config("sd21_base", "text_encoder")
    text_ldm = ldm_convert.hf_clip_to_open_clip_text(text.state_dict(), text_config, extra_layer=True)
    width = int(text_config["hidden_size"])
    generator = torch.Generator().manual_seed(seed + 3)
    text_ldm["text_projection"] = torch.randn((width, width), generator=generator) * width**-0.5
    text_ldm["logit_scale"] = torch.tensor(4.6052)
    state = ldm_convert.assemble_single_file(unet_ldm, vae_ldm, half(text_ldm))
    _atomic_write(path, lambda target: save_file(state, str(target)))


def ensure_full_size_weights(cache_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """(checkpoint, osediff.pkl) in `cache_dir`, built if missing."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, pkl = cache_dir / CHECKPOINT_NAME, cache_dir / OSEDIFF_NAME
    if checkpoint.is_file() and pkl.is_file():
        return checkpoint, pkl
    unet, vae, text = _random_modules(seed)
    if not pkl.is_file():
        _write_osediff_pkl(unet, vae, pkl, seed)
    if not checkpoint.is_file():
        _write_checkpoint(unet, vae, text, checkpoint, seed)
    del unet, vae, text
    gc.collect()
    return checkpoint, pkl


SD15_NAME = "sd15_zeros_v1_fp16.safetensors"
LORA_NAME = "tiny_unet_lora_v2.safetensors"  # v2: strong enough to change an 8-bit image
# SD-1.5's UNet differs from SD-2.x's only in these (ComfyUI detects the family from the shapes)
SD15_UNET_CHANGES = {"cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False}
SD15_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
             "projection_dim": 768, "hidden_act": "quick_gelu"}


def _zeros_like_meta(state) -> dict:
    return {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in state.items()}


def ensure_sd15_checkpoint(cache_dir: Path) -> Path:
    """A full-size SD-1.5-shaped single file of zeros (ComfyUI's Load Checkpoint detects it as SD-1.5): the
    wrong base users most often wire into Load OneStep SR. Zeros: only the shapes matter here."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(cache_dir) / SD15_NAME
    if path.is_file():
        return path
    unet_config = {**load_config("sd21_base", "unet"), **SD15_UNET_CHANGES}
    vae_config = load_config("sd21_base", "vae")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text = CLIPTextModel(CLIPTextConfig(**{**load_config("sd21_base", "text_encoder"), **SD15_TEXT}))
    unet_ldm = _zeros_like_meta(ldm_convert.diffusers_to_ldm_unet(unet.state_dict(), unet_config))
    vae_ldm = _zeros_like_meta(ldm_convert.diffusers_to_ldm_vae(vae.state_dict(), vae_config))
    text_hf = _zeros_like_meta({k: v for k, v in text.state_dict().items() if "position_ids" not in k})
    state = ldm_convert.assemble_single_file(unet_ldm, vae_ldm, text_hf, text_format="hf")
    _atomic_write(path, lambda target: save_file(state, str(target)))
    return path


def ensure_unet_lora(cache_dir: Path) -> Path:
    """A small kohya-format LoRA on one SD-2 UNet layer (proj_in of the first attention block), for
    LoraLoader: it patches the MODEL, and Load OneStep SR must apply it (the upscaled image changes)."""
    from safetensors.torch import save_file

    path = Path(cache_dir) / LORA_NAME
    if path.is_file():
        return path
    generator = torch.Generator().manual_seed(7)
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    state = {f"{key}.lora_down.weight": torch.randn(4, 320, generator=generator) * 0.5,
             f"{key}.lora_up.weight": torch.randn(320, 4, generator=generator) * 0.5,
             f"{key}.alpha": torch.tensor(4.0)}
    _atomic_write(path, lambda target: save_file(state, str(target)))
    return path
