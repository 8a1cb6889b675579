"""Key conversion between the original LDM / single-file Stable Diffusion 2.x layout and diffusers.

Both directions come from one table of renaming rules per model, built from the diffusers config,
so they cannot drift apart. A rule maps an LDM module prefix to a diffusers module prefix, with
optional renames of the leaf modules below it (resnet internals, VAE attention), and marks the VAE
attention projections that are 1x1 convolutions in LDM but linear layers in diffusers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
HF_CLIP_PREFIX = "cond_stage_model.transformer."

UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


class ConversionError(ValueError):
    """A state dict does not have the layout the conversion expects."""


@dataclass(frozen=True)
class Rule:
    ldm: str
    diffusers: str
    inner: Mapping[str, str] = field(default_factory=dict)
    conv_to_linear: bool = False  # VAE attention q/k/v/proj: (C, C, 1, 1) <-> (C, C)


@dataclass
class SingleFileParts:
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    text_format: str  # "open_clip" (SD-2) or "hf" (SD-1)


# -- rule tables ---------------------------------------------------------------------------------------

def unet_rules(config: Mapping) -> list[Rule]:
    """Rules for the UNet; LDM numbers all down/up sub-blocks in one flat list each."""
    layers = int(config["layers_per_block"])
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    rules = [Rule("time_embed.0", "time_embedding.linear_1"), Rule("time_embed.2", "time_embedding.linear_2"),
             Rule("input_blocks.0.0", "conv_in"), Rule("out.0", "conv_norm_out"), Rule("out.2", "conv_out"),
             Rule("middle_block.0", "mid_block.resnets.0", UNET_RESNET),
             Rule("middle_block.1", "mid_block.attentions.0"),
             Rule("middle_block.2", "mid_block.resnets.1", UNET_RESNET)]
    index = 1
    for block, kind in enumerate(down_types):
        for layer in range(layers):
            rules.append(Rule(f"input_blocks.{index}.0", f"down_blocks.{block}.resnets.{layer}", UNET_RESNET))
            if kind.startswith("CrossAttn"):
                rules.append(Rule(f"input_blocks.{index}.1", f"down_blocks.{block}.attentions.{layer}"))
            index += 1
        if block < len(down_types) - 1:
            rules.append(Rule(f"input_blocks.{index}.0.op", f"down_blocks.{block}.downsamplers.0.conv"))
            index += 1
    index = 0
    for block, kind in enumerate(up_types):
        has_attention = kind.startswith("CrossAttn")
        for layer in range(layers + 1):
            rules.append(Rule(f"output_blocks.{index}.0", f"up_blocks.{block}.resnets.{layer}", UNET_RESNET))
            if has_attention:
                rules.append(Rule(f"output_blocks.{index}.1", f"up_blocks.{block}.attentions.{layer}"))
            if layer == layers and block < len(up_types) - 1:
                slot = 2 if has_attention else 1
                rules.append(Rule(f"output_blocks.{index}.{slot}.conv", f"up_blocks.{block}.upsamplers.0.conv"))
            index += 1
    return rules


def vae_rules(config: Mapping) -> list[Rule]:
    """Rules for the VAE; LDM numbers decoder levels from the lowest resolution up, diffusers the reverse."""
    levels = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    rules = [Rule("quant_conv", "quant_conv"), Rule("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [Rule(f"{part}.conv_in", f"{part}.conv_in"), Rule(f"{part}.conv_out", f"{part}.conv_out"),
                  Rule(f"{part}.norm_out", f"{part}.conv_norm_out"),
                  Rule(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET),
                  Rule(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET),
                  Rule(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION, conv_to_linear=True)]
    for level in range(levels):
        for layer in range(layers):
            rules.append(Rule(f"encoder.down.{level}.block.{layer}", f"encoder.down_blocks.{level}.resnets.{layer}",
                              VAE_RESNET))
        if level < levels - 1:
            rules.append(Rule(f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv"))
        up = levels - 1 - level
        for layer in range(layers + 1):
            rules.append(Rule(f"decoder.up.{level}.block.{layer}", f"decoder.up_blocks.{up}.resnets.{layer}", VAE_RESNET))
        if level > 0:
            rules.append(Rule(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv"))
    return rules


# -- applying rules ----------------------------------------------------------------------------------

def _convert(state: Mapping[str, torch.Tensor], rules: list[Rule], to_diffusers: bool, what: str) -> dict:
    source_of = (lambda r: r.ldm) if to_diffusers else (lambda r: r.diffusers)
    target_of = (lambda r: r.diffusers) if to_diffusers else (lambda r: r.ldm)
    by_prefix = sorted(rules, key=lambda r: -len(source_of(r)))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        rule = next((r for r in by_prefix if key.startswith(source_of(r) + ".")), None)
        if rule is None:
            raise ConversionError(f"unexpected {what} key {key!r}: not an SD-2.x {what} in the expected layout")
        rest = key[len(source_of(rule)) + 1 :]
        inner = rule.inner if to_diffusers else {v: k for k, v in rule.inner.items()}
        for old in sorted(inner, key=len, reverse=True):
            if rest.startswith(old + "."):
                rest = inner[old] + rest[len(old) :]
                break
        if rule.conv_to_linear and rest.endswith(".weight") and not rest.startswith(("norm", "group_norm")):
            value = value.reshape(value.shape[0], value.shape[1]) if to_diffusers else value.reshape(*value.shape, 1, 1)
        out[f"{target_of(rule)}.{rest}"] = value
    return out


def convert_ldm_unet(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """LDM UNet keys (no `model.diffusion_model.` prefix) -> diffusers UNet2DConditionModel keys."""
    return _convert(state, unet_rules(config), True, "UNet")


def diffusers_to_ldm_unet(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    return _convert(state, unet_rules(config), False, "UNet")


def convert_ldm_vae(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """LDM VAE keys (no `first_stage_model.` prefix) -> diffusers AutoencoderKL keys."""
    return _convert(state, vae_rules(config), True, "VAE")


def diffusers_to_ldm_vae(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    return _convert(state, vae_rules(config), False, "VAE")


# -- text encoder ------------------------------------------------------------------------------------

_OPEN_CLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_CLIP_LAYER_INNER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                     "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_CLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight",
             "ln_final.bias": "text_model.final_layer_norm.bias"}
_OPEN_CLIP_IGNORED = ("text_projection", "logit_scale", "attn_mask")


def convert_open_clip_text(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (no `cond_stage_model.model.` prefix) -> transformers CLIPTextModel keys.

    SD-2 conditions on the penultimate layer, so only the first `num_hidden_layers` (23 of 24)
    resblocks are kept; the final layer norm is applied on top by CLIPTextModel.
    """
    keep = int(config["num_hidden_layers"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _CLIP_TOP:
            out[_CLIP_TOP[key]] = value
            continue
        match = _OPEN_CLIP_LAYER.match(key)
        if match is None:
            if key.startswith(_OPEN_CLIP_IGNORED) or key.startswith("visual."):
                continue
            raise ConversionError(f"unexpected OpenCLIP text key {key!r}")
        layer, rest = int(match[1]), match[2]
        if layer >= keep:
            continue
        target = f"text_model.encoder.layers.{layer}"
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]  # weight | bias
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"{target}.self_attn.{name}.{kind}"] = chunk.contiguous()
            continue
        for old, new in _CLIP_LAYER_INNER.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        else:
            raise ConversionError(f"unexpected OpenCLIP text key {key!r}")
        out[f"{target}.{rest}"] = value
    return out


def canonical_clip_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 drops the `text_model.` level of CLIPTextModel's keys; files keep it.
    Put it back so conversions see one layout whatever transformers version made the dict."""
    roots = ("embeddings.", "encoder.", "final_layer_norm.")
    return {("text_model." + k if k.startswith(roots) else k): v for k, v in state.items()}


def clip_keys_for(module_keys: set[str], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical `text_model.*` keys -> the layout of the installed CLIPTextModel."""
    if any(k.startswith("text_model.") for k in module_keys):
        return dict(state)
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def hf_clip_to_open_clip_text(state: Mapping[str, torch.Tensor], config: Mapping,
                              extra_layer: bool = True) -> dict[str, torch.Tensor]:
    """Inverse of convert_open_clip_text. With `extra_layer`, appends one more resblock (a copy of the
    last) so the result has num_hidden_layers + 1 blocks like the real 24-block OpenCLIP tower."""
    state = canonical_clip_keys(state)
    top = {v: k for k, v in _CLIP_TOP.items()}
    inner = {v: k for k, v in _CLIP_LAYER_INNER.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    layer_key = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        match = layer_key.match(key)
        if match is None:
            continue  # position_ids and the like
        layer, rest = int(match[1]), match[2]
        proj = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if proj:
            qkv.setdefault((layer, proj[2]), {})[proj[1]] = value
            continue
        for new, old in inner.items():
            if rest.startswith(new + "."):
                rest = old + rest[len(new) :]
                break
        out[f"transformer.resblocks.{layer}.{rest}"] = value
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if extra_layer:
        last = int(config["num_hidden_layers"]) - 1
        prefix = f"transformer.resblocks.{last}."
        for key in [k for k in out if k.startswith(prefix)]:
            out[f"transformer.resblocks.{last + 1}." + key[len(prefix) :]] = out[key].clone()
    return out


def convert_hf_clip_text(state: Mapping[str, torch.Tensor], config: Mapping, prefix: str = "") -> dict:
    """A transformers-layout CLIP text dict under `prefix` (ComfyUI stores SD-2's as
    `clip_h.transformer.`) -> CLIPTextModel keys, keeping the first num_hidden_layers layers."""
    keep = int(config["num_hidden_layers"])
    layer_key = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    stripped = canonical_clip_keys({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    for key, value in stripped.items():
        if not key.startswith("text_model.") or key.endswith("position_ids"):
            continue
        match = layer_key.match(key)
        if match and int(match[1]) >= keep:
            continue
        out[key] = value
    if not out:
        raise ConversionError(f"no CLIP text-model weights under the prefix {prefix!r}")
    return out


# -- whole checkpoints ---------------------------------------------------------------------------------

def split_single_file(state: Mapping[str, torch.Tensor]) -> SingleFileParts:
    """Split a single-file checkpoint into its UNet, VAE and text-encoder dicts (prefixes removed)."""
    def take(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    text = take(OPEN_CLIP_PREFIX)
    text_format = "open_clip"
    if not text:
        text, text_format = take(HF_CLIP_PREFIX), "hf"
    unet = take(UNET_PREFIX)
    if not unet:
        raise ConversionError("no UNet weights (model.diffusion_model.*) in the checkpoint")
    return SingleFileParts(unet=unet, vae=take(VAE_PREFIX), text=text, text_format=text_format)


def assemble_single_file(unet: Mapping, vae: Mapping, text: Mapping) -> dict[str, torch.Tensor]:
    """LDM UNet + VAE + OpenCLIP text dicts -> one single-file state dict."""
    return {**{UNET_PREFIX + k: v for k, v in unet.items()}, **{VAE_PREFIX + k: v for k, v in vae.items()},
            **{OPEN_CLIP_PREFIX + k: v for k, v in text.items()}}


def detect_base(state: Mapping[str, torch.Tensor]) -> str:
    """'sd2', 'sd1', 'sdxl' or 'unknown', from the cross-attention width of the UNet."""
    if any(k.startswith("conditioner.embedders.") for k in state) or UNET_PREFIX + "label_emb.0.0.weight" in state:
        return "sdxl"
    for key, value in state.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            width = int(value.shape[1])
            if width == 2048:
                return "sdxl"
            if width == 768:
                return "sd1"
            if OPEN_CLIP_PREFIX + "token_embedding.weight" in state or width == 1024:
                return "sd2"
            return "unknown"
    return "unknown"
