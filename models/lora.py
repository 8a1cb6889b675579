"""Static LoRA: parse PEFT-style adapter weights and merge them into a module's base weights.

PEFT stores an adapter as `<module>.lora_A.<adapter>.weight` / `<module>.lora_B.<adapter>.weight`;
the effective weight is W + (alpha / r) * B @ A (for convolutions A carries the kernel and B is
1x1, so the update is B composed with A). Merging once at load time makes inference exactly as
fast as the base model, which is what a one-step method wants.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

PEFT_DEFAULT_ALPHA = 8.0
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")
_BASE_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")


class LoRAFormatError(ValueError):
    """The weights do not have the LoRA layout the method expects, or do not fit the base."""


@dataclass
class LoRAPair:
    down: torch.Tensor  # A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)


@dataclass
class LoRAAdapter:
    """One named PEFT adapter: its rank, alpha and the per-module A/B pairs."""

    name: str
    rank: int
    alpha: float = PEFT_DEFAULT_ALPHA
    pairs: dict[str, LoRAPair] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def split_peft_state_dict(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, dict[str, LoRAPair]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a PEFT model state dict into {adapter: {module: pair}}, trained base-layer weights
    (`<module>.base_layer.weight` -> `<module>.weight`) and any other plain entries."""
    halves: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    base: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if match := _LORA_KEY.match(key):
            slot = halves.setdefault(match["adapter"], {}).setdefault(match["module"], {})
            slot[match["which"]] = value
        elif match := _BASE_KEY.match(key):
            base[f"{match['module']}.{match['param']}"] = value
        elif "lora_" in key:
            raise LoRAFormatError(f"unrecognised LoRA key {key!r}")
        else:
            plain[key] = value
    adapters: dict[str, dict[str, LoRAPair]] = {}
    for adapter, modules in halves.items():
        for module, parts in modules.items():
            if set(parts) != {"A", "B"}:
                missing = "lora_B" if "A" in parts else "lora_A"
                raise LoRAFormatError(f"{module}: adapter {adapter!r} has no {missing} weight (truncated file?)")
            adapters.setdefault(adapter, {})[module] = LoRAPair(down=parts["A"], up=parts["B"])
    return adapters, base, plain


def lora_delta(pair: LoRAPair, scale: float, weight_shape: torch.Size) -> torch.Tensor:
    """(alpha/r) * B @ A reshaped to the base weight's shape, computed in float32."""
    down = pair.down.float()
    up = pair.up.float()
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise LoRAFormatError(f"LoRA A has rank {rank} but B has {up.shape[1]}")
    delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    if delta.numel() != torch.Size(weight_shape).numel():
        raise LoRAFormatError(f"LoRA update of shape {tuple(delta.shape)} does not fit weight {tuple(weight_shape)}")
    return (scale * delta).reshape(weight_shape)


def _check_pair_fits(name: str, layer: nn.Module, pair: LoRAPair) -> None:
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        expected_down = (pair.down.shape[0], weight.shape[1])
    elif isinstance(layer, nn.Conv2d):
        expected_down = (pair.down.shape[0], weight.shape[1], *weight.shape[2:])
    else:
        raise LoRAFormatError(f"{name}: LoRA on a {type(layer).__name__} is not supported")
    if tuple(pair.down.shape) != expected_down or pair.up.shape[0] != weight.shape[0]:
        raise LoRAFormatError(
            f"{name}: LoRA shapes A{tuple(pair.down.shape)} B{tuple(pair.up.shape)} do not fit the base "
            f"layer's weight {tuple(weight.shape)} - the weights were trained for a different base model"
        )


def resolve_modules(model: nn.Module, names: Iterable[str], what: str) -> dict[str, nn.Module]:
    """Look up modules by name; a missing one means the weights belong to another architecture."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        preview = ", ".join(missing[:3])
        raise LoRAFormatError(
            f"{len(missing)} {what} module(s) named in the weights do not exist in the base model "
            f"(e.g. {preview}); the weights were trained for a different base (OSEDiff needs SD-2.1-base)"
        )
    return {name: modules[name] for name in names}


@dataclass
class WeightPatch:
    """A static low-rank update of one weight, W + scale * up @ down, kept unmerged.

    A host that manages weights itself (ComfyUI's ModelPatcher) applies it on the device at load
    time, so the base tensors stay shared with the host instead of being copied into merged ones."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float


WeightPatches = dict[str, list[WeightPatch]]  # "<module>.weight" -> updates, in order


def adapter_patches(model: nn.Module, adapters: Iterable[LoRAAdapter], what: str = "UNet") -> WeightPatches:
    """The adapters as per-weight patches, checked against `model` (names and shapes) but not applied."""
    patches: WeightPatches = {}
    for adapter in adapters:
        found = resolve_modules(model, adapter.pairs, what)
        for name, pair in adapter.pairs.items():
            _check_pair_fits(name, found[name], pair)
            patches.setdefault(f"{name}.weight", []).append(WeightPatch(pair.down, pair.up, adapter.scale))
    return patches


def merge_patches(model: nn.Module, patches: WeightPatches) -> int:
    """Merge per-weight patches into `model`; returns the number of weights changed.

    Weights are replaced by new tensors rather than updated in place, so a base whose tensors are
    shared with someone else (ComfyUI's own loaded checkpoint) is never modified.
    """
    for key, updates in patches.items():
        module_name, _, attr = key.rpartition(".")
        layer = model.get_submodule(module_name)
        weight = getattr(layer, attr)
        delta = None
        for update in updates:
            term = lora_delta(LoRAPair(update.down, update.up), update.scale, weight.shape).to(weight.device)
            delta = term if delta is None else delta + term
        # Kept in float32: a base stored in fp16 must not round the merged weight before the caller
        # picks the run precision (model.to(dtype) casts once), or fp32 runs would differ by source.
        setattr(layer, attr, nn.Parameter(weight.detach().float() + delta, requires_grad=False))
    return len(patches)


def merge_adapters(model: nn.Module, adapters: Iterable[LoRAAdapter], what: str = "UNet",
                   defer: WeightPatches | None = None) -> int:
    """Merge the adapters into `model`'s weights (new tensors; see merge_patches); returns the number
    of layers changed. With `defer`, the checked patches are added to that dict instead of merged."""
    patches = adapter_patches(model, adapters, what)
    if defer is None:
        return merge_patches(model, patches)
    for key, updates in patches.items():
        defer.setdefault(key, []).extend(updates)
    return len(patches)


def replace_parameters(model: nn.Module, tensors: Mapping[str, torch.Tensor], what: str = "UNet") -> None:
    """Set fully trained parameters (e.g. OSEDiff's conv_in) by name, checking their shapes."""
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if name not in params:
            raise LoRAFormatError(f"{what} parameter {name!r} from the weights does not exist in the base model")
        if params[name].shape != value.shape:
            raise LoRAFormatError(
                f"{what} parameter {name}: weights have shape {tuple(value.shape)}, the base has "
                f"{tuple(params[name].shape)} - a different base architecture"
            )
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        current = getattr(module, attr)
        dtype = torch.promote_types(value.dtype, current.dtype)  # never lose the trained precision
        setattr(module, attr, nn.Parameter(value.to(current.device, dtype), requires_grad=False))
