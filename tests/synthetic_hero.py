"""A synthetic hero_sr_model.pkl in the published layout, produced the way the release consumes it:
PEFT adapters injected with `add_adapter` (UNet adapter "default", VAE adapter "vae", PEFT's default
alpha), random non-zero LoRA weights, and a DTSM state dict written key by key from the official
`TimeAdaptive` layout (independently of our module, so a naming mismatch fails the strict load)
with random weights and non-trivial BatchNorm running statistics."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig

# The training code is unreleased, so the real target lists are unknown: the UNet uses PEFT's
# suffix patterns, the VAE full module names, so both list styles are exercised.
HERO_UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "conv_in",
                     "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
HERO_RANK_UNET = 8  # scale 8 / 8 = 1
HERO_RANK_VAE = 2  # scale 8 / 2 = 4: distinct scales catch a swapped rank


def vae_encoder_targets(vae) -> list[str]:
    return [name.removesuffix(".weight") for name, _ in vae.named_parameters()
            if name.endswith(".weight") and "norm" not in name
            and (name.startswith("encoder.") or name.startswith("quant_conv."))]


def _randomize_lora(model: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))


def make_hero_peft_models(tiny_base, seed: int = 5, train_conv_in: bool = True):
    """Copies of the tiny UNet/VAE carrying Hero-SR-style adapters exactly as the release adds them."""
    generator = torch.Generator().manual_seed(seed)
    unet = copy.deepcopy(tiny_base.unet)
    vae = copy.deepcopy(tiny_base.vae)
    vae_targets = vae_encoder_targets(vae)
    unet.add_adapter(LoraConfig(r=HERO_RANK_UNET, init_lora_weights="gaussian", target_modules=HERO_UNET_TARGETS))
    vae.add_adapter(LoraConfig(r=HERO_RANK_VAE, init_lora_weights="gaussian", target_modules=vae_targets),
                    adapter_name="vae")
    _randomize_lora(unet, generator)
    _randomize_lora(vae, generator)
    if train_conv_in:  # unknown for the release; exercise the trained-base-tensor path like OSEDiff
        with torch.no_grad():
            conv_in = unet.conv_in.base_layer
            conv_in.weight.add_(0.05 * torch.randn(conv_in.weight.shape, generator=generator))
            conv_in.bias.add_(0.05 * torch.randn(conv_in.bias.shape, generator=generator))
    return unet.eval(), vae.eval(), vae_targets


def dtsm_official_shapes(channels: int = 64, blocks: int = 3, candidates: int = 101) -> dict[str, tuple]:
    """Key -> shape of the official TimeAdaptive().state_dict(), written out by hand."""
    shapes: dict[str, tuple] = {"time_list": (candidates,)}

    def bn(prefix: str) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.0.weight"] = (channels, 3, 3, 3)
    shapes["conv1.0.bias"] = (channels,)
    bn("conv1.1")
    for i in range(blocks):
        shapes[f"blocks.{i}.conv1.weight"] = (channels, channels, 3, 3)
        bn(f"blocks.{i}.bn1")
        shapes[f"blocks.{i}.conv2.weight"] = (channels, channels, 3, 3)
        bn(f"blocks.{i}.bn2")
    shapes["conv2.0.weight"] = (channels, channels, 3, 3)
    shapes["conv2.0.bias"] = (channels,)
    bn("conv2.1")
    shapes["fc.0.weight"] = (1000, channels * 49)
    shapes["fc.0.bias"] = (1000,)
    shapes["fc.2.weight"] = (candidates, 1000)
    shapes["fc.2.bias"] = (candidates,)
    shapes["fc.3.weight"] = (candidates,)
    shapes["fc.3.bias"] = (candidates,)
    return shapes


def dtsm_state_dict(seed: int = 7) -> dict[str, torch.Tensor]:
    """Random DTSM weights with BN running stats far from (0, 1) and LayerNorm affine != (1, 0)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in dtsm_official_shapes().items():
        if key == "time_list":
            state[key] = torch.tensor([1] + [9 + 10 * k for k in range(100)], dtype=torch.float32)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(12345, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator) * 2.0
        elif key.endswith("running_mean"):
            state[key] = 0.3 * torch.randn(shape, generator=generator)
        elif key.startswith(("conv1.1", "conv2.1", "fc.3")) or ".bn" in key:
            base = 1.0 if key.endswith("weight") else 0.0
            state[key] = base + 0.2 * torch.randn(shape, generator=generator)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1000
            state[key] = torch.randn(shape, generator=generator) / fan_in**0.5
    return state


def hero_checkpoint_dict(unet, vae, vae_targets, dtsm_state, include_conv_in: bool = True) -> dict:
    """The dict layout hero_sr.py reads (the saving code is unreleased; filtered like OSEDiff's)."""
    def keep(key: str) -> bool:
        return "lora" in key or (include_conv_in and key.startswith("conv_in."))

    return {
        "rank_unet": HERO_RANK_UNET,
        "unet_lora_target_modules": list(HERO_UNET_TARGETS),
        "state_dict_unet": {k: v.clone() for k, v in unet.state_dict().items() if keep(k)},
        "rank_vae": HERO_RANK_VAE,
        "vae_lora_target_modules": list(vae_targets),
        "state_dict_vae": {k: v.clone() for k, v in vae.state_dict().items() if "lora" in k},
        "state_dict_time_adaptive": {k: v.clone() for k, v in dtsm_state.items()},
    }


def write_hero_pkl(tiny_base, path: Path, seed: int = 5):
    """Write the pkl; returns the PEFT models and the DTSM state it was made from."""
    unet, vae, vae_targets = make_hero_peft_models(tiny_base, seed=seed)
    dtsm_state = dtsm_state_dict(seed + 2)
    torch.save(hero_checkpoint_dict(unet, vae, vae_targets, dtsm_state), path)
    return unet, vae, dtsm_state
