"""Key conversion between the original LDM / single-file Stable Diffusion layout and diffusers.

Single-file checkpoints (`v2-1_512-ema-pruned.safetensors`, ComfyUI's loaded models) use the
CompVis/Stability LDM module names; our pipelines run diffusers `UNet2DConditionModel`,
`AutoencoderKL` and transformers `CLIPTextModel`. Both layouts hold the same tensors, so a
conversion is a renaming, plus three value changes: the VAE mid-block attention is 1x1 convs in
LDM and linears in diffusers, and OpenCLIP fuses q/k/v into one `in_proj` matrix.

Every conversion is driven by ONE table per model, built from the diffusers config: a list of
`_Module(ldm_prefix, diffusers_prefix, leaves)` rows. The forward and the inverse direction read
the same rows, so they cannot drift apart. A key is converted by finding its longest module
prefix in the table and renaming the rest with the row's leaf table (None: names are the same
below the module, as for the transformer blocks, which both layouts name identically).

Text-encoder keys are produced in the file layout `text_model.…`. transformers >= 5.6 flattened
CLIPTextModel (its keys are `embeddings.…`, `encoder.…`): inputs in either layout are accepted
(`canonical_clip_keys`), and `clip_keys_for` adapts a converted dict to the installed module.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
HF_CLIP_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL = "text_model."  # the canonical (on-disk, transformers < 5.6) CLIPTextModel prefix

LeafMap = Mapping[str, "str | tuple[str, ...]"]


class ConversionError(ValueError):
    """A state dict does not have the layout the conversion expects."""


# --------------------------------------------------------------------------------------------
# The table engine
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Module:
    """One module in both layouts. `leaves` renames what follows the module prefix (longest
    matching dotted prefix wins); None keeps it unchanged. A tuple value fuses several diffusers
    tensors into one LDM tensor along dim 0 (OpenCLIP in_proj = q, k, v). `conv_as_linear`: the
    module's >1-D weights are 1x1 convs in LDM and linears in diffusers."""

    ldm: str
    diffusers: str
    leaves: LeafMap | None = None
    conv_as_linear: bool = False


@dataclass
class _Table:
    modules: list[_Module]
    what: str
    ignore_ldm: Callable[[str], bool] = lambda key: False
    ignore_diffusers: Callable[[str], bool] = lambda key: False
    _by_side: dict[bool, dict[str, _Module]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._by_side = {
            True: {m.ldm: m for m in self.modules},
            False: {m.diffusers: m for m in self.modules},
        }

    def to_diffusers(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._convert(state, from_ldm=True)

    def to_ldm(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._convert(state, from_ldm=False)

    def _convert(self, state: Mapping[str, Tensor], from_ldm: bool) -> dict[str, Tensor]:
        index = self._by_side[from_ldm]
        ignore = self.ignore_ldm if from_ldm else self.ignore_diffusers
        out: dict[str, Tensor] = {}
        fused: dict[str, dict[int, Tensor]] = {}
        fused_sizes: dict[str, int] = {}
        unknown: list[str] = []
        for key, value in state.items():
            if ignore(key):
                continue
            found = _longest_prefix(key, index)
            if found is None:
                unknown.append(key)
                continue
            module, rest = found
            target = module.diffusers if from_ldm else module.ldm
            renamed = _rename_leaf(rest, module.leaves, from_ldm)
            if renamed is None:
                unknown.append(key)
                continue
            if from_ldm and isinstance(renamed, tuple):  # split a fused tensor
                for name, part in zip(renamed, value.chunk(len(renamed), dim=0), strict=True):
                    out[_join(target, name)] = part.clone()
                continue
            if not from_ldm and isinstance(renamed, tuple):  # one part of a fused tensor
                name, position, count = renamed
                fused.setdefault(_join(target, name), {})[position] = value
                fused_sizes[_join(target, name)] = count
                continue
            if module.conv_as_linear and value.ndim > 1:
                value = _conv_to_linear(value) if from_ldm else _linear_to_conv(value)
            out[_join(target, renamed)] = value
        if unknown:
            raise ConversionError(
                f"unexpected {self.what} key(s) {unknown[:4]} ({len(unknown)} in all): not the "
                f"{self.what} structure the config describes"
            )
        for key, parts in fused.items():
            if len(parts) != fused_sizes[key]:
                raise ConversionError(f"{self.what}: {key} needs {fused_sizes[key]} parts, got {sorted(parts)}")
            out[key] = torch.cat([parts[i] for i in range(len(parts))], dim=0)
        return out


def _join(prefix: str, rest: str) -> str:
    return f"{prefix}.{rest}" if rest else prefix


def _longest_prefix(key: str, index: Mapping[str, Any]) -> tuple[Any, str] | None:
    """The entry whose name is the longest dotted prefix of `key` (or `key` itself), and the rest."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        entry = index.get(".".join(parts[:cut]))
        if entry is not None:
            return entry, ".".join(parts[cut:])
    return None


def _rename_leaf(rest: str, leaves: LeafMap | None, from_ldm: bool) -> Any:
    """Forward: new leaf name, or a tuple of names to split into. Inverse: new leaf name, or
    (fused name, position, count) for one part of a fused tensor. None: not in the table."""
    if leaves is None:
        return rest
    if from_ldm:
        found = _longest_prefix(rest, leaves)
        if found is None:
            return None
        new, tail = found
        if isinstance(new, tuple):
            return None if tail else new
        return _join(new, tail)
    inverse = _inverse_leaves(tuple(leaves.items()))
    found = _longest_prefix(rest, inverse)
    if found is None:
        return None
    (old, position, count), tail = found
    if position is None:
        return _join(old, tail)
    return None if tail else (old, position, count)


@functools.lru_cache(maxsize=32)
def _inverse_leaves(items: tuple[tuple[str, Any], ...]) -> dict[str, tuple[str, int | None, int]]:
    inverse: dict[str, tuple[str, int | None, int]] = {}
    for old, new in items:
        if isinstance(new, tuple):
            for position, name in enumerate(new):
                inverse[name] = (old, position, len(new))
        else:
            inverse[new] = (old, None, 1)
    return inverse


def _conv_to_linear(value: Tensor) -> Tensor:
    if value.ndim == 2:
        return value
    if any(size != 1 for size in value.shape[2:]):
        raise ConversionError(f"expected a 1x1 convolution weight, got shape {tuple(value.shape)}")
    return value.reshape(value.shape[:2])


def _linear_to_conv(value: Tensor) -> Tensor:
    return value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value


def _get(config: Any, name: str, default: Any = ...) -> Any:
    """Read a config entry from a dict-like config or a config object (transformers)."""
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    if value is ...:
        raise KeyError(f"config has no {name!r}")
    return value


def _per_block(value: int | Iterable[int], count: int) -> list[int]:
    values = [int(value)] * count if isinstance(value, int) else [int(v) for v in value]
    if len(values) != count:
        raise ValueError(f"layers_per_block {value!r} does not match {count} blocks")
    return values


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------

_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_UNET_TOP = [
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
]


def _unet_table(config: Mapping) -> _Table:
    """LDM numbers UNet children sequentially: input_blocks = [conv_in, (resnet[, attention])
    x layers, downsample] per level (no downsample on the last level), output_blocks = (resnet[,
    attention][, upsample]) x (layers + 1) per level; SpatialTransformer and diffusers'
    Transformer2DModel name their insides identically."""
    downs, ups = list(config["down_block_types"]), list(config["up_block_types"])
    count = len(config["block_out_channels"])
    if len(downs) != count or len(ups) != count:
        raise ValueError("UNet config: block types and block_out_channels differ in length")
    layers = _per_block(config["layers_per_block"], count)
    mid_type = _get(config, "mid_block_type", "UNetMidBlock2DCrossAttn") or "UNetMidBlock2DCrossAttn"
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"UNet config: mid block {mid_type!r} is not the SD-2 cross-attention mid block")

    modules = [_Module(ldm, diff) for ldm, diff in _UNET_TOP]
    index = 1
    for level, (kind, n) in enumerate(zip(downs, layers, strict=True)):
        for j in range(n):
            modules.append(_Module(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", _UNET_RESNET))
            if "CrossAttn" in kind:
                modules.append(_Module(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}"))
            index += 1
        if level < count - 1:
            modules.append(_Module(f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            index += 1
    modules += [
        _Module("middle_block.0", "mid_block.resnets.0", _UNET_RESNET),
        _Module("middle_block.1", "mid_block.attentions.0"),
        _Module("middle_block.2", "mid_block.resnets.1", _UNET_RESNET),
    ]
    index = 0
    for level, (kind, n) in enumerate(zip(ups, reversed(layers), strict=True)):
        attention = "CrossAttn" in kind
        for j in range(n + 1):
            modules.append(_Module(f"output_blocks.{index}.0", f"up_blocks.{level}.resnets.{j}", _UNET_RESNET))
            if attention:
                modules.append(_Module(f"output_blocks.{index}.1", f"up_blocks.{level}.attentions.{j}"))
            if j == n and level < count - 1:
                slot = 2 if attention else 1
                modules.append(_Module(f"output_blocks.{index}.{slot}.conv", f"up_blocks.{level}.upsamplers.0.conv"))
            index += 1
    return _Table(modules, "UNet")


def convert_ldm_unet(state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """LDM UNet keys (without `model.diffusion_model.`) -> diffusers UNet2DConditionModel keys,
    for the block layout in `config` (a diffusers UNet config). Tensors are not copied."""
    return _unet_table(config).to_diffusers(state)


def diffusers_to_ldm_unet(state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """The inverse of `convert_ldm_unet` (to write single-file checkpoints)."""
    return _unet_table(config).to_ldm(state)


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _vae_table(config: Mapping) -> _Table:
    """LDM numbers decoder levels from the bottom (`up.0` is the full-resolution level) while
    diffusers numbers them in execution order, hence the reversal; the decoder has one more
    resnet per level than the encoder."""
    count = len(config["block_out_channels"])
    if len(config["down_block_types"]) != count or len(config["up_block_types"]) != count:
        raise ValueError("VAE config: block types and block_out_channels differ in length")
    layers = int(config["layers_per_block"])
    mid_attention = bool(_get(config, "mid_block_add_attention", True))

    modules = [
        _Module("encoder.conv_in", "encoder.conv_in"),
        _Module("encoder.norm_out", "encoder.conv_norm_out"),
        _Module("encoder.conv_out", "encoder.conv_out"),
        _Module("decoder.conv_in", "decoder.conv_in"),
        _Module("decoder.norm_out", "decoder.conv_norm_out"),
        _Module("decoder.conv_out", "decoder.conv_out"),
        _Module("quant_conv", "quant_conv"),
        _Module("post_quant_conv", "post_quant_conv"),
    ]
    for part in ("encoder", "decoder"):
        modules += [
            _Module(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET),
            _Module(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET),
        ]
        if mid_attention:
            modules.append(_Module(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION,
                                   conv_as_linear=True))
    for level in range(count):
        for j in range(layers):
            modules.append(_Module(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}",
                                   _VAE_RESNET))
        if level < count - 1:
            modules.append(_Module(f"encoder.down.{level}.downsample.conv",
                                   f"encoder.down_blocks.{level}.downsamplers.0.conv"))
        ldm_level = count - 1 - level
        for j in range(layers + 1):
            modules.append(_Module(f"decoder.up.{ldm_level}.block.{j}", f"decoder.up_blocks.{level}.resnets.{j}",
                                   _VAE_RESNET))
        if level < count - 1:
            modules.append(_Module(f"decoder.up.{ldm_level}.upsample.conv",
                                   f"decoder.up_blocks.{level}.upsamplers.0.conv"))
    # Some VAE files still carry the training loss (LPIPS, discriminator): never model weights.
    return _Table(modules, "VAE", ignore_ldm=lambda key: key.startswith("loss."))


def convert_ldm_vae(state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """LDM VAE keys (without `first_stage_model.`) -> diffusers AutoencoderKL keys; mid-block
    attention 1x1 conv weights become linear weights (reshaped views, no copy)."""
    return _vae_table(config).to_diffusers(state)


def diffusers_to_ldm_vae(state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """The inverse of `convert_ldm_vae`; attention linears become 1x1 conv weights."""
    return _vae_table(config).to_ldm(state)


# --------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------

_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
    "attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
}
_OPEN_CLIP_EXTRAS = {"text_projection", "logit_scale", "attn_mask"}
_HF_EXTRAS = {"text_projection.weight", "logit_scale", f"{TEXT_MODEL}embeddings.position_ids"}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")
_HF_LAYER = re.compile(rf"^{re.escape(TEXT_MODEL)}encoder\.layers\.(\d+)\.")


def _text_table(config: Any) -> _Table:
    """Keeps the first num_hidden_layers blocks: SD-2 conditions on OpenCLIP's penultimate layer,
    so its CLIPTextModel has 23 of the file's 24 resblocks."""
    layers = int(_get(config, "num_hidden_layers"))
    modules = [
        _Module("token_embedding", f"{TEXT_MODEL}embeddings.token_embedding"),
        _Module("positional_embedding", f"{TEXT_MODEL}embeddings.position_embedding.weight"),
        _Module("ln_final", f"{TEXT_MODEL}final_layer_norm"),
    ]
    modules += [_Module(f"transformer.resblocks.{i}", f"{TEXT_MODEL}encoder.layers.{i}", _CLIP_LAYER)
                for i in range(layers)]

    def ignore_ldm(key: str) -> bool:
        match = _RESBLOCK.match(key)
        return key in _OPEN_CLIP_EXTRAS or (match is not None and int(match[1]) >= layers)

    return _Table(modules, "OpenCLIP text encoder", ignore_ldm=ignore_ldm,
                  ignore_diffusers=lambda key: key in _HF_EXTRAS)


def canonical_clip_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers >= 5.6 drops the `text_model.` level of CLIPTextModel's keys; files keep it.
    Put it back so conversions see one layout whatever transformers version made the dict."""
    roots = ("embeddings.", "encoder.", "final_layer_norm.")
    return {(TEXT_MODEL + k if k.startswith(roots) else k): v for k, v in state.items()}


def clip_keys_for(module_keys: Iterable[str], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Canonical `text_model.*` keys -> the layout of the installed CLIPTextModel, given its keys."""
    if any(k.startswith(TEXT_MODEL) for k in module_keys):
        return dict(state)
    return {k.removeprefix(TEXT_MODEL): v for k, v in state.items()}


def convert_open_clip_text(state: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    """OpenCLIP text-tower keys (without `cond_stage_model.model.`) -> CLIPTextModel keys
    (`text_model.…`): in_proj split into q/k/v, only the first `num_hidden_layers` resblocks
    kept, text_projection / logit_scale / attn_mask dropped."""
    return _text_table(config).to_diffusers(state)


def convert_hf_clip_text(state: Mapping[str, Tensor], config: Any, prefix: str = "") -> dict[str, Tensor]:
    """A transformers-layout CLIP dict stored under `prefix` (ComfyUI: `clip_h.transformer.`;
    SD-1 files: `cond_stage_model.transformer.`) -> CLIPTextModel keys (`text_model.…`). Keys
    outside `prefix` are skipped; layers beyond `num_hidden_layers` (ComfyUI keeps all 24 of
    OpenCLIP's) and text_projection / logit_scale / position_ids are dropped."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    inner = canonical_clip_keys({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    layers = int(_get(config, "num_hidden_layers"))
    kept: dict[str, Tensor] = {}
    for key, value in inner.items():
        match = _HF_LAYER.match(key)
        if key in _HF_EXTRAS or not key.startswith(TEXT_MODEL) or (match and int(match[1]) >= layers):
            continue
        kept[key] = value
    if not kept:
        raise ConversionError(f"no CLIP text-model weights under the prefix {prefix!r}")
    return kept


def hf_clip_to_open_clip_text(
    state: Mapping[str, Tensor], config: Any, extra_layer: bool = True, text_projection: bool = True
) -> dict[str, Tensor]:
    """CLIPTextModel keys (either layout) -> OpenCLIP text-tower keys with fused in_proj.

    A real SD-2 file holds all 24 OpenCLIP resblocks while SD-2 uses 23, so with `extra_layer`
    one more resblock (a copy of the last; never used) is appended, and with `text_projection`
    an identity-like [hidden, projection_dim] `text_projection` is written: synthetic files then
    look like real ones, and the forward conversion must drop both.
    """
    ldm = _text_table(config).to_ldm(canonical_clip_keys(state))
    if extra_layer:
        layers = int(_get(config, "num_hidden_layers"))
        last, copy = f"transformer.resblocks.{layers - 1}.", f"transformer.resblocks.{layers}."
        ldm.update({copy + k[len(last):]: v.clone() for k, v in list(ldm.items()) if k.startswith(last)})
    if text_projection:
        embedding = ldm["token_embedding.weight"]
        width = int(_get(config, "projection_dim", embedding.shape[1]))
        ldm["text_projection"] = torch.eye(embedding.shape[1], width, dtype=embedding.dtype)
    return ldm


# --------------------------------------------------------------------------------------------
# Single-file checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class SingleFileParts:
    """A single-file checkpoint split by prefix; each dict is stripped of its prefix.
    text_format: 'open_clip' (SD-2, `cond_stage_model.model.`), 'hf' (SD-1, keys `text_model.…`
    after stripping `cond_stage_model.transformer.`) or None when the file has no text encoder."""

    unet: dict[str, Tensor]
    vae: dict[str, Tensor]
    text: dict[str, Tensor]
    text_format: str | None


def _strip(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def split_single_file(state: Mapping[str, Tensor]) -> SingleFileParts:
    """Split a whole LDM checkpoint into UNet / VAE / text dicts. EMA copies (`model_ema.`) and
    anything else are left out."""
    unet = _strip(state, UNET_PREFIX)
    if not unet:
        raise ConversionError(f"no UNet weights ({UNET_PREFIX}*) in the checkpoint")
    open_clip = _strip(state, OPEN_CLIP_PREFIX)
    hf = _strip(state, HF_CLIP_PREFIX)
    text, text_format = (open_clip, "open_clip") if open_clip else (hf, "hf") if hf else ({}, None)
    return SingleFileParts(unet=unet, vae=_strip(state, VAE_PREFIX), text=text, text_format=text_format)


def assemble_single_file(
    unet: Mapping[str, Tensor], vae: Mapping[str, Tensor], text: Mapping[str, Tensor], text_format: str = "open_clip"
) -> dict[str, Tensor]:
    """LDM-layout parts -> one single-file state dict with the standard prefixes (the inverse of
    `split_single_file`)."""
    text_prefix = {"open_clip": OPEN_CLIP_PREFIX, "hf": HF_CLIP_PREFIX}[text_format]
    out = {UNET_PREFIX + k: v for k, v in unet.items()}
    out.update({VAE_PREFIX + k: v for k, v in vae.items()})
    out.update({text_prefix + k: v for k, v in text.items()})
    return out


def detect_base(state: Mapping[str, Tensor]) -> str:
    """'sd2', 'sd1', 'sdxl' or 'unknown', from the UNet's cross-attention width (1024 / 768 /
    2048) and the text-encoder prefixes, so a wrong base fails with a clear message instead of
    a shape error deep in loading. Accepts a full checkpoint or a bare LDM UNet dict. Another
    width counts as SD-2 only when an OpenCLIP text tower of that width conditions it (the tiny
    test models). (SD-2 512-base and 768-v cannot be told apart from the weights.)"""
    keys = list(state)
    if any(k.startswith("conditioner.embedders.") or k.removeprefix(UNET_PREFIX).startswith("label_emb.")
           for k in keys):
        return "sdxl"
    width = None
    for key in keys:
        body = key.removeprefix(UNET_PREFIX)
        if body.startswith(("input_blocks.", "middle_block.", "output_blocks.")) and body.endswith(
            ".attn2.to_k.weight"
        ):
            width = int(state[key].shape[1])
            break
    open_clip = state.get(OPEN_CLIP_PREFIX + "token_embedding.weight")
    if width is None:
        if open_clip is not None:
            return "sd2"
        return "sd1" if any(k.startswith(HF_CLIP_PREFIX) for k in keys) else "unknown"
    known = {1024: "sd2", 768: "sd1", 2048: "sdxl"}
    if width in known:
        return known[width]
    return "sd2" if open_clip is not None and open_clip.shape[1] == width else "unknown"
