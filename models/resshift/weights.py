"""Reading the ResShift-family files: `HF-Diff.pth`, `SinSR_v1/_v2.pth`, `resshift_realsrx4_s15_v1/_v2.pth`,
`resshift_realsrx4_s4_v3.pth` (Swin UNet state dicts) and `autoencoder_vq_f4.pth` (the VQ-f4).

The files are plain state dicts, possibly under 'state_dict', with or without DataParallel's
`module.` prefix; read with `torch.load(weights_only=True)` only (weights_io). All five UNet files
have the same keys, so which method a file holds is told by its name (the published names).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..weights_io import WeightsFileError, read_weights_file
from .swin_unet import DERIVED_BUFFERS, SwinUNet, SwinUNetConfig
from .vq_autoencoder import VQAutoencoder, VQConfig

UNET_MARKERS = ("input_blocks.0.0.weight", "middle_block.1.patch_embed.proj.weight")
VQ_MARKERS = ("quantize.embedding.weight", "encoder.conv_in.weight", "post_quant_conv.weight")
# Published names -> method; checked in order, lower-case substrings.
NAME_RULES = (
    (("hf-diff", "hf_diff", "hfdiff"), "hf_diff"),
    (("sinsr",), "sinsr"),
    (("_s4", "-s4", "s4_", "v3"), "resshift_s4"),
    (("resshift",), "resshift"),
)
FAMILY_METHODS = ("sinsr", "hf_diff", "resshift", "resshift_s4")


def plain_state_dict(data: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap 'state_dict' and strip a `module.` prefix (the official `reload_model` accepts both)."""
    if "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    return {(k[7:] if str(k).startswith("module.") else str(k)): v for k, v in data.items()
            if isinstance(v, torch.Tensor)}


def is_swin_unet(data: Mapping[str, Any]) -> bool:
    keys = plain_state_dict(data)
    return all(marker in keys for marker in UNET_MARKERS)


def is_vq_autoencoder(data: Mapping[str, Any]) -> bool:
    keys = plain_state_dict(data)
    return all(marker in keys for marker in VQ_MARKERS)


def method_from_name(filename: str) -> str:
    """Which ResShift-family method a Swin-UNet file holds, from its (published) name."""
    lower = Path(filename).name.lower()
    for needles, method in NAME_RULES:
        if any(needle in lower for needle in needles):
            if method == "resshift_s4" and "resshift" not in lower:
                continue
            return method
    raise WeightsFileError(
        f"{filename} is a ResShift-family Swin UNet, but its name does not say which model it is (the "
        "files share one layout): keep the published name (HF-Diff.pth, SinSR_v1.pth, SinSR_v2.pth, "
        "resshift_realsrx4_s15_v2.pth, resshift_realsrx4_s4_v3.pth) or choose the method explicitly"
    )


def published_unet_state(unet: SwinUNet) -> dict[str, torch.Tensor]:
    """The state dict as the official `UNetModelSwin` saves it (what `HF-Diff.pth` / `SinSR_v1.pth` hold):
    our parameters plus the derived buffers the official modules keep, every window attention's
    `relative_position_index` and each shifted block's `attn_mask` for its configured resolution.
    Float32 on the CPU."""
    from .swin_unet import SwinBlock, WindowAttention, relative_position_index, shifted_window_mask

    state = {k: v.detach().float().cpu().clone() for k, v in unet.state_dict().items()}
    for name, module in unet.named_modules():
        if isinstance(module, WindowAttention):
            state[f"{name}.relative_position_index"] = relative_position_index(module.window)
        if isinstance(module, SwinBlock) and module.shift:
            state[f"{name}.attn_mask"] = shifted_window_mask(module.resolution, module.resolution, module.window,
                                                             module.shift)
    return state


def _load_into(module: nn.Module, state: Mapping[str, torch.Tensor], filename: str, what: str) -> None:
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise WeightsFileError(f"{filename} does not match the {what} architecture: {', '.join(detail)}; "
                               "a model of another size needs its config (--model-config / the config input)")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise WeightsFileError(f"{filename}: {key} has shape {tuple(value.shape)}, the {what} expects "
                                   f"{tuple(expected[key].shape)}; a model of another size needs its config "
                                   "(--model-config / the config input)")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def build_unet(data: Mapping[str, Any], config: SwinUNetConfig, filename: str) -> SwinUNet:
    state = plain_state_dict(data)
    if not is_swin_unet(state):
        if is_vq_autoencoder(state):
            raise WeightsFileError(f"{filename} is the VQ autoencoder (autoencoder_vq_f4.pth): choose the model "
                                   "file (HF-Diff.pth, SinSR_v1.pth, ...) as the weights and keep the autoencoder beside it")
        raise WeightsFileError(f"{filename} is not a ResShift/SinSR/HF-Diff Swin UNet state dict")
    with torch.device("meta"):
        unet = SwinUNet(config)
    unet = unet.to_empty(device="cpu")
    _reset_derived_buffers(unet)
    _load_into(unet, state, filename, "Swin UNet")
    return unet.eval().requires_grad_(False)


def _reset_derived_buffers(module: nn.Module) -> None:
    from .swin_unet import WindowAttention, relative_position_index

    for sub in module.modules():
        if isinstance(sub, WindowAttention):
            sub.relative_position_index = relative_position_index(sub.window)


def load_autoencoder(path: str | Path, config: VQConfig) -> VQAutoencoder:
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(
            f"the VQ autoencoder {path.name} was not found in {path.parent}: ResShift, SinSR and HF-Diff need "
            "autoencoder_vq_f4.pth (ResShift release v2.0) beside the model file or in models/onestep_sr "
            "(--autoencoder PATH)")
    state = plain_state_dict(read_weights_file(path))
    if not is_vq_autoencoder(state):
        hint = " (it is a Swin UNet: give it as the weights)" if is_swin_unet(state) else ""
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in state):
            hint = " (it is a Stable Diffusion checkpoint)"
        raise WeightsFileError(f"{path.name} in {path.parent} is not the VQ-f4 autoencoder{hint}")
    with torch.device("meta"):
        vq = VQAutoencoder(config)
    vq = vq.to_empty(device="cpu")
    _load_into(vq, state, path.name, "VQ-f4 autoencoder")
    return vq.eval().requires_grad_(False)
