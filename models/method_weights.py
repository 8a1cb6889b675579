"""Which method a weights file belongs to, and the OSEDiff layout parsed into adapters.

`osediff.pkl` (torch.save of a dict): rank_unet, rank_vae, unet_lora_{encoder,decoder,others}_modules,
vae_lora_encoder_modules, state_dict_unet (LoRA A/B for adapters default_encoder/_decoder/_others plus
conv_in.base_layer.* - conv_in is a LoRA target whose base weights were also trained) and
state_dict_vae (LoRA A/B of the single VAE-encoder adapter default_encoder). alpha is PEFT's default 8.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .lora import PEFT_DEFAULT_ALPHA, LoRAAdapter, LoRAFormatError, split_peft_state_dict
from .weights_io import WeightsFileError

KNOWN_METHODS = ("osediff", "s3diff", "hero_sr", "sinsr", "hf_diff", "resshift", "resshift_s4")
OSEDIFF_UNET_ADAPTERS = {
    "default_encoder": "unet_lora_encoder_modules",
    "default_decoder": "unet_lora_decoder_modules",
    "default_others": "unet_lora_others_modules",
}


def detect_method(data: Mapping[str, Any], filename: str = "weights") -> str:
    """Name the method a weights dict belongs to, from its characteristic keys (for the ResShift
    family, whose files share one layout, from the file name)."""
    from .resshift.weights import is_swin_unet, is_vq_autoencoder, method_from_name

    if is_swin_unet(data):
        return method_from_name(filename)
    if is_vq_autoencoder(data):
        raise WeightsFileError(
            f"{filename} is the VQ-f4 autoencoder of ResShift/SinSR/HF-Diff: choose the model file (HF-Diff.pth, "
            "SinSR_v1.pth, resshift_realsrx4_s15_v2.pth, ...) as the weights and keep the autoencoder beside it"
        )
    if "state_dict_time_adaptive" in data:
        return "hero_sr"
    if "state_dict_unet_de_mlp" in data or "state_dict_unet_fuse_mlp" in data:
        return "s3diff"
    if "unet_lora_encoder_modules" in data and "state_dict_unet" in data:
        return "osediff"
    if any(str(key).startswith(("conv_first.", "fc_degree.")) for key in data):
        raise WeightsFileError(
            f"{filename} is S3Diff's degradation estimator (de_net.pth): choose s3diff.pkl as the weights and "
            "keep de_net.pth in the same folder"
        )
    if any(str(key).startswith(("model.diffusion_model.", "first_stage_model.")) for key in data):
        raise WeightsFileError(
            f"{filename} is a Stable Diffusion base checkpoint, not method weights: use it as the base "
            "(models/checkpoints, --base) and give the method file (e.g. osediff.pkl) as the weights"
        )
    preview = ", ".join(sorted(map(str, data))[:6])
    raise WeightsFileError(
        f"{filename} is not a recognised OneStep SR weights file (OSEDiff, S3Diff, Hero-SR, SinSR, HF-Diff or "
        f"ResShift); its keys are: {preview}"
    )


@dataclass
class OSEDiffWeights:
    unet_adapters: list[LoRAAdapter]
    vae_adapters: list[LoRAAdapter]
    unet_trained: dict[str, torch.Tensor] = field(default_factory=dict)


def _require(data: Mapping[str, Any], key: str, filename: str) -> Any:
    if key not in data:
        raise WeightsFileError(f"{filename} lacks the entry {key!r}: it is not a complete osediff.pkl")
    return data[key]


def _build_adapter(
    name: str, pairs: Mapping, rank: int, listed: list[str] | None, where: str
) -> LoRAAdapter:
    if listed is not None:
        missing = sorted(set(listed) - set(pairs))
        if missing:
            raise WeightsFileError(
                f"{where} adapter {name!r} lists {len(missing)} target module(s) without weights "
                f"(e.g. {missing[0]}): the file is incomplete"
            )
    for module, pair in pairs.items():
        if pair.down.shape[0] != rank:
            raise LoRAFormatError(f"{where} {module}: LoRA rank {pair.down.shape[0]} but the file says {rank}")
    return LoRAAdapter(name=name, rank=rank, alpha=PEFT_DEFAULT_ALPHA, pairs=dict(pairs))


def parse_osediff(data: Mapping[str, Any], filename: str = "osediff.pkl") -> OSEDiffWeights:
    """Turn the published OSEDiff dict into adapters, checking it is complete and consistent."""
    rank_unet = int(_require(data, "rank_unet", filename))
    rank_vae = int(_require(data, "rank_vae", filename))
    unet_adapters_found, unet_base, unet_plain = split_peft_state_dict(_require(data, "state_dict_unet", filename))
    vae_adapters_found, _, _ = split_peft_state_dict(_require(data, "state_dict_vae", filename))
    unknown = set(unet_adapters_found) - set(OSEDIFF_UNET_ADAPTERS)
    if unknown:
        raise WeightsFileError(f"{filename}: unexpected UNet adapter name(s) {sorted(unknown)}")
    unet_adapters = [
        _build_adapter(name, unet_adapters_found.get(name, {}), rank_unet, list(data.get(list_key, [])), "UNet")
        for name, list_key in OSEDIFF_UNET_ADAPTERS.items()
    ]
    vae_list = list(dict.fromkeys(data.get("vae_lora_encoder_modules", [])))  # the list has duplicates
    vae_adapters = [
        _build_adapter(name, pairs, rank_vae, vae_list if name == "default_encoder" else None, "VAE")
        for name, pairs in vae_adapters_found.items()
    ]
    trained = {**unet_base, **{k: v for k, v in unet_plain.items() if k.startswith("conv_in.")}}
    if not trained:
        raise WeightsFileError(f"{filename}: no trained conv_in weights in state_dict_unet; the file is incomplete")
    return OSEDiffWeights(unet_adapters=unet_adapters, vae_adapters=vae_adapters, unet_trained=trained)
