"""Synthetic `s3diff.pkl` and `de_net.pth` in the exact published layouts, for the tiny base.

The pkl is produced the way S3Diff's `save_model` produces it: PEFT adapters injected into copies of
the tiny UNet/VAE with the official target list/regex and adapter names, state dicts filtered by key,
MLPs built as `nn.Sequential(nn.Linear, nn.ReLU)` / `nn.Linear`, `w` an nn.Parameter. LoRA B is random
(non-zero) and the MLPs keep PyTorch's default init (not S3Diff's 1e-5 init), so the matrices M are
far from 0 and every modulation path has an effect.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
                "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj"]
VAE_TARGETS = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"


@dataclass
class S3DiffReference:
    """The PEFT models and raw modules the synthetic file was written from."""

    unet: nn.Module  # PEFT-injected UNet (adapter "default"), trained conv_in
    vae: nn.Module  # PEFT-injected VAE (adapter "vae_skip")
    data: dict


def _randomize_lora(model: nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))


def make_s3diff_checkpoint(tiny_base, rank_unet: int = 32, rank_vae: int = 16, seed: int = 5) -> S3DiffReference:
    """PEFT copies of the tiny models plus the dict S3Diff.save_model would write for them."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = copy.deepcopy(tiny_base.unet)
    vae = copy.deepcopy(tiny_base.vae)
    vae.add_adapter(LoraConfig(r=rank_vae, init_lora_weights="gaussian", target_modules=VAE_TARGETS),
                    adapter_name="vae_skip")
    unet.add_adapter(LoraConfig(r=rank_unet, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    _randomize_lora(unet, generator)
    _randomize_lora(vae, generator)
    with torch.no_grad():  # conv_in is fully trained (not a LoRA target)
        unet.conv_in.weight.add_(0.05 * torch.randn(unet.conv_in.weight.shape, generator=generator))
        unet.conv_in.bias.add_(0.05 * torch.randn(unet.conv_in.bias.shape, generator=generator))

    mlps = {}
    for model, rank in (("vae", rank_vae), ("unet", rank_unet)):
        mlps[f"{model}_de_mlp"] = nn.Sequential(nn.Linear(256, 256), nn.ReLU(True))
        mlps[f"{model}_block_mlp"] = nn.Sequential(nn.Linear(64, 64), nn.ReLU(True))
        mlps[f"{model}_fuse_mlp"] = nn.Linear(256 + 64, rank**2)
    w = nn.Parameter(torch.randn(64, generator=generator), requires_grad=False)
    vae_block = nn.Embedding(6, 64)
    unet_block = nn.Embedding(10, 64)

    data = {
        "unet_lora_target_modules": UNET_TARGETS,
        "vae_lora_target_modules": VAE_TARGETS,
        "rank_unet": rank_unet,
        "rank_vae": rank_vae,
        "state_dict_unet": {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v.clone() for k, v in vae.state_dict().items() if "lora" in k or "skip_conv" in k},
        **{f"state_dict_{name}": dict(module.state_dict()) for name, module in mlps.items()},
        "w": w,
        "state_embeddings": {
            "state_dict_vae_block": vae_block.state_dict(),
            "state_dict_unet_block": unet_block.state_dict(),
        },
    }
    return S3DiffReference(unet=unet.eval(), vae=vae.eval(), data=data)


def write_s3diff_pkl(tiny_base, path: Path, **kwargs) -> S3DiffReference:
    reference = make_s3diff_checkpoint(tiny_base, **kwargs)
    torch.save(reference.data, path)
    return reference


def de_net_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the published de_net.pth, spelled out independently of our module."""
    shapes: dict[str, tuple[int, ...]] = {}
    for branch in range(2):
        shapes[f"conv_first.{branch}.weight"] = (64, 3, 3, 3)
        shapes[f"conv_first.{branch}.bias"] = (64,)
        for index in range(9):
            prefix = f"body.{branch}.{index}"
            if index == 6:  # the stride-2 conv between the 64- and 128-channel stages
                shapes[f"{prefix}.weight"] = (128, 64, 3, 3)
                shapes[f"{prefix}.bias"] = (128,)
                continue
            channels = 64 if index < 6 else 128
            for conv in ("conv1", "conv2"):
                shapes[f"{prefix}.{conv}.weight"] = (channels, channels, 3, 3)
                shapes[f"{prefix}.{conv}.bias"] = (channels,)
        shapes[f"fc_degree.{branch}.0.weight"] = (512, 128)
        shapes[f"fc_degree.{branch}.0.bias"] = (512,)
        shapes[f"fc_degree.{branch}.2.weight"] = (1, 512)
        shapes[f"fc_degree.{branch}.2.bias"] = (1,)
    return shapes


def write_de_net(path: Path, seed: int = 7) -> dict[str, torch.Tensor]:
    """Random weights (small, like basicsr's 0.1-scaled init, so the sigmoid is not saturated)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in de_net_layout().items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        std = (2.0 / fan_in) ** 0.5 * (0.1 if ".body." in f".{key}" else 1.0)
        state[key] = torch.randn(shape, generator=generator) * (std if len(shape) > 1 else 0.05)
    torch.save(state, path)
    return state
