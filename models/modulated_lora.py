"""S3Diff's degradation-modulated LoRA: y = W x + (alpha / r) * B(h M), h = A x.

Unlike a plain LoRA this cannot be merged into the weights once: M is an r x r matrix that depends on
the image (its degradation scores) and on which UNet/VAE block the layer sits in. The official code
(`my_lora_fwd` in src/model.py) stores M on every PEFT layer (`module.de_mod`, shape (B, r, r)) and
computes `einsum('...khw,...kr->...rhw', A x, M)` for convolutions and `einsum('...lk,...kr->...lr')`
for linear layers, i.e. h'_j = sum_k h_k M_kj per sample, with PEFT's dropout 0 and scaling alpha/r.
Per sample this is the weight W + (alpha / r) * B @ M^T @ A.

Here the matrices for all blocks live in one context per model, set with `set_modulation(model, M)`
where M has shape (B, n_blocks, r, r); each wrapper picks its block's slice.

Batch convention: M's batch must equal the batch of the forward call, or be 1 (then it applies to
every sample - this is also what the official einsum does, and what lets one image's matrices serve
a batch of its tiles). Anything else is an error, never a silent mismatch. When the model runs on a
concatenation of batches (classifier-free guidance: `torch.cat([negative, positive])`), pass
`repeat_modulation(M, 2)`, which concatenates M the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .lora import LoRAFormatError, LoRAPair, resolve_modules

UNET_BLOCKS = 10  # down 0-3, mid 4, up 5-8, conv_out 9
VAE_BLOCKS = 6  # encoder down 0-3, mid 4, conv_in/conv_out 5
_CONTEXT_ATTR = "_onestep_lora_modulation"


class ModulationContext:
    """The per-sample matrices shared by every modulated layer of one model."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.max_block = -1
        self.matrices: torch.Tensor | None = None  # (B, n_blocks, r, r)
        self._converted: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def set(self, matrices: torch.Tensor | None) -> None:
        self.matrices = matrices
        self._converted = {}  # one device/dtype conversion per forward setting, not one per layer

    def matrix(self, block: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        """This block's (batch, r, r) matrices in `like`'s dtype/device, broadcasting a batch of 1."""
        if self.matrices is None:
            raise RuntimeError(
                "S3Diff LoRA layers need the degradation modulation: call set_modulation(model, matrices) first"
            )
        count = self.matrices.shape[0]
        if count not in (1, batch):
            raise RuntimeError(
                f"the modulation was set for {count} sample(s) but the layer runs a batch of {batch}: pass one "
                "matrix set per sample (repeat_modulation for concatenated CFG batches) or a single set"
            )
        key = (like.device, like.dtype)
        if key not in self._converted:
            self._converted[key] = self.matrices.to(device=like.device, dtype=like.dtype)
        return self._converted[key][:, block].expand(batch, -1, -1)


class _ModulatedLoRA(nn.Module):
    """Shared parts: the untouched base layer, A (`lora_down`), B (`lora_up`), scale and block."""

    base_layer: nn.Module
    lora_down: nn.Module
    lora_up: nn.Module

    def __init__(self, scale: float, block: int, context: ModulationContext) -> None:
        super().__init__()
        self.scale = float(scale)
        self.block = int(block)
        self._context = context  # a plain object: not a submodule, not in the state dict

    def extra_repr(self) -> str:
        return f"scale={self.scale}, block={self.block}"


class ModulatedLoRALinear(_ModulatedLoRA):
    """nn.Linear + modulated LoRA; inputs are (B, ..., in) with the batch first."""

    def __init__(self, base: nn.Linear, pair: LoRAPair, scale: float, block: int, context: ModulationContext):
        super().__init__(scale, block, context)
        rank = pair.down.shape[0]
        weight = base.weight
        self.base_layer = base
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.lora_down.weight.copy_(pair.down.reshape(rank, base.in_features))
            self.lora_up.weight.copy_(pair.up.reshape(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        m = self._context.matrix(self.block, h.shape[0], h)
        shaped = h.reshape(h.shape[0], -1, h.shape[-1])  # (B, tokens, r)
        h = torch.bmm(shaped, m).reshape(h.shape)
        return (result + self.lora_up(h) * self.scale).to(result.dtype)


class ModulatedLoRAConv2d(_ModulatedLoRA):
    """nn.Conv2d + modulated LoRA; A repeats the base kernel/stride/padding, B is 1x1 (as in PEFT)."""

    def __init__(self, base: nn.Conv2d, pair: LoRAPair, scale: float, block: int, context: ModulationContext):
        super().__init__(scale, block, context)
        if base.groups != 1:
            raise LoRAFormatError("LoRA on a grouped convolution is not supported")
        rank = pair.down.shape[0]
        weight = base.weight
        self.base_layer = base
        self.lora_down = nn.Conv2d(
            base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode, device=weight.device, dtype=weight.dtype,
        )
        self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.lora_down.weight.copy_(pair.down)
            self.lora_up.weight.copy_(pair.up.reshape(base.out_channels, rank, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        h = self.lora_down(x.to(self.lora_down.weight.dtype))  # (B, r, H, W)
        m = self._context.matrix(self.block, h.shape[0], h)
        batch, rank, height, width = h.shape
        h = torch.bmm(m.transpose(1, 2), h.reshape(batch, rank, height * width)).reshape(h.shape)
        return (result + self.lora_up(h) * self.scale).to(result.dtype)


def unet_block_index(name: str) -> int:
    """The official S3Diff assignment (s3diff_tile.py `forward`) for a UNet module name."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return 4
    if parts[0] == "up_blocks":
        return 5 + int(parts[1])
    return UNET_BLOCKS - 1  # conv_out, the only other LoRA target


def vae_block_index(name: str) -> int:
    """The official assignment for an AutoencoderKL module name ("encoder.down_blocks.2....")."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "down_blocks":
        return int(parts[2])
    if len(parts) > 1 and parts[1] == "mid_block":
        return VAE_BLOCKS - 2
    return VAE_BLOCKS - 1  # encoder.conv_in / encoder.conv_out


def _check_pair(name: str, layer: nn.Module, pair: LoRAPair, rank: int) -> None:
    if isinstance(layer, _ModulatedLoRA):
        raise LoRAFormatError(f"{name} already carries a modulated LoRA")
    if pair.down.shape[0] != rank or pair.up.shape[1] != rank:
        raise LoRAFormatError(
            f"{name}: LoRA A{tuple(pair.down.shape)} / B{tuple(pair.up.shape)} do not have rank {rank}"
        )
    if isinstance(layer, nn.Linear):
        fits = tuple(pair.down.shape) == (rank, layer.in_features) and tuple(pair.up.shape) == (layer.out_features, rank)
    elif isinstance(layer, nn.Conv2d):
        fits = (tuple(pair.down.shape) == (rank, layer.in_channels, *layer.kernel_size)
                and tuple(pair.up.shape) in ((layer.out_channels, rank), (layer.out_channels, rank, 1, 1)))
    else:
        raise LoRAFormatError(f"{name}: LoRA on a {type(layer).__name__} is not supported")
    if not fits:
        raise LoRAFormatError(
            f"{name}: LoRA shapes A{tuple(pair.down.shape)} B{tuple(pair.up.shape)} do not fit the base layer's "
            f"weight {tuple(layer.weight.shape)} - the weights were trained for a different base model"
        )


def inject_modulated_lora(
    model: nn.Module,
    pairs: Mapping[str, LoRAPair],
    rank: int,
    alpha: float,
    block_index: Callable[[str], int],
    what: str = "UNet",
) -> int:
    """Replace each named Linear/Conv2d of `model` by a modulated-LoRA wrapper; returns the count.

    The base layers are wrapped, not modified, so tensors shared with a host application stay intact.
    """
    found = resolve_modules(model, pairs, what)
    context = getattr(model, _CONTEXT_ATTR, None)
    if context is None:
        context = ModulationContext(rank)
        setattr(model, _CONTEXT_ATTR, context)
    elif context.rank != rank:
        raise LoRAFormatError(f"{what} already has modulated LoRA of rank {context.rank}, not {rank}")
    scale = alpha / rank
    for name, pair in pairs.items():
        layer = found[name]
        _check_pair(name, layer, pair, rank)
        block = block_index(name)
        wrapper_type = ModulatedLoRALinear if isinstance(layer, nn.Linear) else ModulatedLoRAConv2d
        wrapper = wrapper_type(layer, pair, scale, block, context)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper)
        context.max_block = max(context.max_block, block)
    return len(pairs)


def _context_of(model: nn.Module) -> ModulationContext:
    context = getattr(model, _CONTEXT_ATTR, None)
    if context is None:
        raise RuntimeError(f"{type(model).__name__} has no modulated LoRA layers (inject_modulated_lora first)")
    return context


def set_modulation(model: nn.Module, matrices: torch.Tensor, keep_graph: bool = False) -> None:
    """Set the (B, n_blocks, r, r) matrices every modulated layer of `model` uses from now on.

    Inference detaches them; training passes keep_graph=True so the loss reaches the MLPs that made them.
    """
    context = _context_of(model)
    if matrices.dim() != 4 or matrices.shape[2:] != (context.rank, context.rank):
        raise ValueError(
            f"modulation matrices must have shape (B, n_blocks, {context.rank}, {context.rank}), "
            f"got {tuple(matrices.shape)}"
        )
    if matrices.shape[1] <= context.max_block:
        raise ValueError(f"modulation has {matrices.shape[1]} blocks but the layers use block {context.max_block}")
    context.set(matrices if keep_graph else matrices.detach())


def clear_modulation(model: nn.Module) -> None:
    """Forget the matrices (the layers then refuse to run instead of using stale ones)."""
    _context_of(model).set(None)


def has_modulated_lora(model: nn.Module) -> bool:
    return getattr(model, _CONTEXT_ATTR, None) is not None


def repeat_modulation(matrices: torch.Tensor, times: int) -> torch.Tensor:
    """Matrices for `torch.cat([batch] * times)`, e.g. times=2 for a [negative, positive] CFG batch."""
    return torch.cat([matrices] * times)


def modulated_lora_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, _ModulatedLoRA)]


def peft_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """The Linear/Conv2d names PEFT's `target_modules` selects (list: the name or a "."-suffix; str:
    re.fullmatch), so a checkpoint can be checked to cover every layer the official code wrapped."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(target_modules, str):
            matched = re.fullmatch(target_modules, name) is not None
        else:
            matched = any(name == target or name.endswith("." + target) for target in target_modules)
        if matched:
            names.append(name)
    return names

