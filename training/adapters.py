"""peft adapters on ONE base UNet, switched per pass, in the published OSEDiff layout.

OSEDiff's official trainer holds three UNets: the generator (LoRA + trained conv_in), the frozen
real-score UNet and the fake-score LoRA UNet. Here they are one base UNet with named peft adapters:
  generator   default_encoder / default_decoder / default_others (the names osediff.pkl stores)
  fake score  fake_encoder / fake_decoder / fake_others (same targets; never saved in osediff.pkl)
  real score  adapters disabled
The generator also trains conv_in's *base* weights while the two score networks must keep the
original ones, so conv_in's base layer becomes a `SwitchableConv2d`: its parameters are the trained
copy (saved as `conv_in.base_layer.*`, the published key) and a non-persistent buffer keeps the
original for the score passes (4 x 320 x 3 x 3 numbers, not a UNet).

Switching writes peft's per-layer `_active_adapter` / `_disable_adapters` directly instead of calling
`set_adapter`, because peft's `set_adapter` also flips `requires_grad` (the trainable set is fixed once).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

UNET_GREP = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
             "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
VAE_GREP = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]
GENERATOR = ("default_encoder", "default_decoder", "default_others")
FAKE = ("fake_encoder", "fake_decoder", "fake_others")
VAE_ADAPTER = "default_encoder"


def osediff_unet_lists(unet: nn.Module) -> dict[str, list[str]]:
    """OSEDiff `initialize_unet`: the first grep pattern found in a (non-bias, non-norm) parameter name
    decides; down_blocks/conv_in -> encoder, up_blocks/conv_out -> decoder, else others."""
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
    return {"encoder": encoder, "decoder": decoder, "others": others}


def osediff_vae_list(vae: nn.Module) -> list[str]:
    """OSEDiff `initialize_vae` (no break: the published list has duplicates, kept as published)."""
    modules = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in VAE_GREP:
            if pattern in name and "encoder" in name:
                modules.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                modules.append(name.replace(".weight", ""))
    return modules


class SwitchableConv2d(nn.Conv2d):
    """A Conv2d with a trained weight (its parameters) and the frozen original (buffers) to switch to."""

    use_original: bool

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> SwitchableConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            new.bias.copy_(conv.bias)
        new.register_buffer("original_weight", conv.weight.detach().clone(), persistent=False)
        new.register_buffer("original_bias", conv.bias.detach().clone(), persistent=False)
        new.use_original = False
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_original:
            return self._conv_forward(x, self.original_weight.to(x.dtype), self.original_bias.to(x.dtype))
        return self._conv_forward(x, self.weight, self.bias)

    def _conv_forward(self, x, weight, bias):  # noqa: D401 - same signature as nn.Conv2d
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def tuner_layers(model: nn.Module) -> Iterable[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (m for m in model.modules() if isinstance(m, BaseTunerLayer))


def activate(model: nn.Module, adapters: tuple[str, ...] | None) -> None:
    """Run `model` with these adapters (None: the base alone), leaving requires_grad untouched."""
    for layer in tuner_layers(model):
        if adapters is None:
            layer._disable_adapters = True
        else:
            layer._disable_adapters = False
            layer._active_adapter = [name for name in adapters if name in layer.lora_A]
    for module in model.modules():
        if isinstance(module, SwitchableConv2d):
            module.use_original = adapters is None or adapters[0].startswith("fake")


def add_osediff_adapters(unet: nn.Module, vae: nn.Module, rank: int, fake_rank: int | None) -> dict[str, list]:
    """Inject the generator (and fake-score) adapters as OSEDiff does; returns the published lists."""
    from peft import LoraConfig

    lists = osediff_unet_lists(unet)
    vae_list = osediff_vae_list(vae)
    for adapter, part in zip(GENERATOR, ("encoder", "decoder", "others"), strict=True):
        unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=lists[part]),
                         adapter_name=adapter)
    if fake_rank is not None:
        for adapter, part in zip(FAKE, ("encoder", "decoder", "others"), strict=True):
            unet.add_adapter(LoraConfig(r=fake_rank, init_lora_weights="gaussian", target_modules=lists[part]),
                             adapter_name=adapter)
    vae.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=vae_list),
                    adapter_name=VAE_ADAPTER)
    conv_in = unet.conv_in
    conv_in.base_layer = SwitchableConv2d.from_conv(conv_in.base_layer)
    return {**lists, "vae": vae_list}


def train_lora_and_conv_in(unet: nn.Module, vae: nn.Module, conv_in_prefix: str) -> None:
    """Freeze both, then train every LoRA tensor of the UNet and VAE and the UNet parameters under
    `conv_in_prefix` (the SD-family one-step students' shared trainable set)."""
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    for name, param in unet.named_parameters():
        if ".lora_" in name or name.startswith(conv_in_prefix):
            param.requires_grad_(True)
    for name, param in vae.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)


def set_osediff_trainable(unet: nn.Module, vae: nn.Module) -> None:
    """Exactly the published trainable set: generator LoRA, conv_in (trained base), VAE-encoder LoRA,
    plus the fake-score LoRA (its own optimiser). Everything else is frozen."""
    train_lora_and_conv_in(unet, vae, "conv_in.base_layer.")


def adapter_of(name: str) -> str | None:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_") and i + 1 < len(parts):
            return parts[i + 1]
    return None
