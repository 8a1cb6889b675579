"""The Hero-SR weights layout (`hero_sr_model.pkl`) parsed into LoRA adapters plus the DTSM.

The release (W-JG/Hero-SR src/hero_sr.py) builds one PEFT adapter per model from the file:
`LoraConfig(r=rank_unet, init_lora_weights="gaussian", target_modules=unet_lora_target_modules)`
added to the SD-Turbo UNet under PEFT's default name "default", and the same for the VAE under the
name "vae" (rank_vae, vae_lora_target_modules). No lora_alpha is given, so PEFT's default 8 applies
and the scale is 8 / rank. Every entry of `state_dict_unet` / `state_dict_vae` is then written over
the PEFT-wrapped model's state dict and loaded strictly, so besides LoRA A/B the file may carry
trained base tensors (`<module>.base_layer.weight` or plain `<name>.weight`, e.g. conv_in as in
OSEDiff); we apply whatever is there. `state_dict_time_adaptive` is the DTSM (see models/dtsm.py).

Modules a target list names but the file has no weights for keep PEFT's initial B = 0 in the
release, i.e. no change, so they are not an error here. LoRA is merged statically into the weights
(or, for a host that applies weight patches itself, handed over unmerged: `defer`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .dtsm import TimeStepSelector, load_dtsm_state
from .lora import (
    PEFT_DEFAULT_ALPHA,
    LoRAAdapter,
    LoRAFormatError,
    LoRAPair,
    WeightPatches,
    merge_adapters,
    replace_parameters,
    split_peft_state_dict,
)
from .weights_io import WeightsFileError

HERO_UNET_ADAPTER = "default"
HERO_VAE_ADAPTER = "vae"
HERO_REQUIRED_KEYS = (
    "rank_unet", "unet_lora_target_modules", "state_dict_unet",
    "rank_vae", "vae_lora_target_modules", "state_dict_vae",
    "state_dict_time_adaptive",
)


@dataclass
class HeroSRWeights:
    """Everything `hero_sr_model.pkl` contributes on top of the SD-Turbo base."""

    unet_adapters: list[LoRAAdapter]
    vae_adapters: list[LoRAAdapter]
    dtsm_state: dict[str, torch.Tensor]
    unet_trained: dict[str, torch.Tensor] = field(default_factory=dict)
    vae_trained: dict[str, torch.Tensor] = field(default_factory=dict)
    unet_target_modules: list[str] | str = field(default_factory=list)
    vae_target_modules: list[str] | str = field(default_factory=list)


def _targets(value: Any, key: str, filename: str) -> list[str] | str:
    """PEFT accepts a list (suffix match) or a string (regex full match) of target modules."""
    if isinstance(value, str):
        return value
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        items = list(value)
        if all(isinstance(item, str) for item in items):
            return list(dict.fromkeys(items))
    raise WeightsFileError(f"{filename}: {key} must be a list of module names or a regex string")


def peft_target_matches(module: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must fullmatch; a list entry must equal the name or be a '.'-suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == entry or module.endswith("." + entry) for entry in targets)


def _rank(data: Mapping[str, Any], key: str, filename: str) -> int:
    value = data[key]
    try:
        rank = int(value)
    except (TypeError, ValueError):
        rank = 0
    if rank <= 0 or rank != value:
        raise WeightsFileError(f"{filename}: {key} must be a positive integer, got {value!r}")
    return rank


def _one_adapter(
    state: Any, expected: str, rank: int, targets: list[str] | str, where: str, filename: str
) -> tuple[LoRAAdapter, dict[str, torch.Tensor]]:
    """The single named adapter of one model plus the base tensors the file overwrites."""
    if not isinstance(state, Mapping):
        raise WeightsFileError(f"{filename}: the {where} state dict is a {type(state).__name__}, not a dict")
    found, base, plain = split_peft_state_dict(state)
    others = sorted(set(found) - {expected})
    if others:
        raise WeightsFileError(
            f"{filename}: {where} LoRA adapter(s) {others} where Hero-SR has only {expected!r}; "
            "this is not a hero_sr_model.pkl"
        )
    pairs: dict[str, LoRAPair] = found.get(expected, {})
    if not pairs:
        raise WeightsFileError(f"{filename}: state_dict for the {where} holds no LoRA weights; the file is incomplete")
    for module, pair in pairs.items():
        if pair.down.shape[0] != rank or pair.up.shape[1] != rank:
            raise LoRAFormatError(
                f"{where} {module}: LoRA rank {pair.down.shape[0]}/{pair.up.shape[1]} but the file says {rank}"
            )
    if not any(peft_target_matches(module, targets) for module in pairs):
        raise WeightsFileError(f"{filename}: none of the {where} LoRA modules matches its target module list")
    trained = {**base, **plain}
    for name, value in trained.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsFileError(f"{filename}: {where} entry {name} is a {type(value).__name__}, not a tensor")
    adapter = LoRAAdapter(name=expected, rank=rank, alpha=PEFT_DEFAULT_ALPHA, pairs=dict(pairs))
    return adapter, trained


def parse_hero_sr(data: Mapping[str, Any], filename: str = "hero_sr_model.pkl") -> HeroSRWeights:
    """Turn the published Hero-SR dict (or our safetensors export of it) into adapters and the DTSM
    state, checking it is complete and consistent before any model is touched."""
    missing = [key for key in HERO_REQUIRED_KEYS if key not in data]
    if missing:
        raise WeightsFileError(f"{filename} lacks the entr{'y' if len(missing) == 1 else 'ies'} "
                               f"{', '.join(map(repr, missing))}: it is not a complete hero_sr_model.pkl")
    unet_targets = _targets(data["unet_lora_target_modules"], "unet_lora_target_modules", filename)
    vae_targets = _targets(data["vae_lora_target_modules"], "vae_lora_target_modules", filename)
    unet_adapter, unet_trained = _one_adapter(
        data["state_dict_unet"], HERO_UNET_ADAPTER, _rank(data, "rank_unet", filename), unet_targets, "UNet", filename
    )
    vae_adapter, vae_trained = _one_adapter(
        data["state_dict_vae"], HERO_VAE_ADAPTER, _rank(data, "rank_vae", filename), vae_targets, "VAE", filename
    )
    dtsm_state = data["state_dict_time_adaptive"]
    if not isinstance(dtsm_state, Mapping) or not dtsm_state:
        raise WeightsFileError(f"{filename}: state_dict_time_adaptive is empty or not a dict")
    return HeroSRWeights(
        unet_adapters=[unet_adapter], vae_adapters=[vae_adapter], dtsm_state=dict(dtsm_state),
        unet_trained=unet_trained, vae_trained=vae_trained,
        unet_target_modules=unet_targets, vae_target_modules=vae_targets,
    )


def _check_modules_exist(model: nn.Module, names: Iterable[str], what: str) -> None:
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    absent = [name for name in names if name not in modules and name not in params]
    if absent:
        raise LoRAFormatError(
            f"{len(absent)} {what} module(s) named in the Hero-SR weights do not exist in the base model "
            f"(e.g. {', '.join(absent[:3])}); Hero-SR was trained on SD-Turbo (SD-2.1 architecture)"
        )


def apply_hero_sr(unet: nn.Module, vae: nn.Module, weights: HeroSRWeights,
                  defer: dict[str, WeightPatches] | None = None) -> TimeStepSelector:
    """Write the trained base tensors, merge the LoRA adapters into `unet`/`vae` (new tensors, the
    originals are not mutated) and return the DTSM, in eval mode, on the UNet's device in float32.
    With `defer` ({"unet": {}, "vae": {}}), the LoRA is checked and collected there as weight patches
    instead of merged (a host applies it at load time)."""
    for model, adapters, trained, what in (
        (unet, weights.unet_adapters, weights.unet_trained, "UNet"),
        (vae, weights.vae_adapters, weights.vae_trained, "VAE"),
    ):
        _check_modules_exist(model, [name for a in adapters for name in a.pairs], what)
        _check_modules_exist(model, trained, what)
    dtsm = load_dtsm_state(weights.dtsm_state)
    replace_parameters(unet, weights.unet_trained, what="UNet")
    merge_adapters(unet, weights.unet_adapters, what="UNet", defer=None if defer is None else defer["unet"])
    replace_parameters(vae, weights.vae_trained, what="VAE")
    merge_adapters(vae, weights.vae_adapters, what="VAE", defer=None if defer is None else defer["vae"])
    device = next(unet.parameters()).device
    return dtsm.to(device=device, dtype=torch.float32)
