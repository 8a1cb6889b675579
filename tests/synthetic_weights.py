"""Synthetic method checkpoints in the exact published layouts, produced the way the official code
produces them (PEFT adapters injected into the models, state dict filtered by key), with random
non-zero LoRA weights so every adapter has an effect."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig

UNET_GREP = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
             "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
VAE_GREP = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]


def osediff_module_lists(unet, vae) -> dict[str, list[str]]:
    """The official recipe: first matching pattern decides; names without '.weight'."""
    encoder, decoder, others = [], [], []
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in UNET_GREP:
            if pattern in name and ("down_blocks" in name or "conv_in" in name):
                encoder.append(name.replace(".weight", ""))
                break
            if pattern in name and ("up_blocks" in name or "conv_out" in name):
                decoder.append(name.replace(".weight", ""))
                break
            if pattern in name:
                others.append(name.replace(".weight", ""))
                break
    vae_modules = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in VAE_GREP:  # no break: the published list has duplicates
            if pattern in name and "encoder" in name:
                vae_modules.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                vae_modules.append(name.replace(".weight", ""))
    return {"encoder": encoder, "decoder": decoder, "others": others, "vae": vae_modules}


def _randomize_lora(model: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))


def make_osediff_peft_models(tiny_base, rank: int = 4, seed: int = 1):
    """Copies of the tiny UNet/VAE carrying OSEDiff's adapters via PEFT (the official structure)."""
    generator = torch.Generator().manual_seed(seed)
    unet = copy.deepcopy(tiny_base.unet)
    vae = copy.deepcopy(tiny_base.vae)
    lists = osediff_module_lists(unet, vae)
    for adapter, key in (("default_encoder", "encoder"), ("default_decoder", "decoder"), ("default_others", "others")):
        unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=lists[key]),
                         adapter_name=adapter)
    unet.set_adapter(["default_encoder", "default_decoder", "default_others"])
    vae.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=lists["vae"]),
                    adapter_name="default_encoder")
    vae.set_adapter(["default_encoder"])
    _randomize_lora(unet, generator)
    _randomize_lora(vae, generator)
    with torch.no_grad():  # conv_in is fully trained in OSEDiff
        conv_in = unet.conv_in.base_layer
        conv_in.weight.add_(0.05 * torch.randn(conv_in.weight.shape, generator=generator))
        conv_in.bias.add_(0.05 * torch.randn(conv_in.bias.shape, generator=generator))
    return unet.eval(), vae.eval(), lists


def osediff_checkpoint_dict(unet, vae, lists, rank: int = 4) -> dict:
    """The dict `OSEDiff_gen.save_model` writes."""
    return {
        "unet_lora_encoder_modules": lists["encoder"],
        "unet_lora_decoder_modules": lists["decoder"],
        "unet_lora_others_modules": lists["others"],
        "vae_lora_encoder_modules": lists["vae"],
        "rank_unet": rank,
        "rank_vae": rank,
        "state_dict_unet": {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v.clone() for k, v in vae.state_dict().items() if "lora" in k},
    }


def write_osediff_pkl(tiny_base, path: Path, rank: int = 4, seed: int = 1):
    unet, vae, lists = make_osediff_peft_models(tiny_base, rank=rank, seed=seed)
    torch.save(osediff_checkpoint_dict(unet, vae, lists, rank), path)
    return unet, vae
