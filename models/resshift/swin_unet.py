"""ResShift's `UNetModelSwin`: the denoiser of ResShift, SinSR and HF-Diff.

Written here (not taken from a library) because the published files must load by their own key
names and give the official numbers: module names below mirror the published state dicts
(`input_blocks.N.M...`, `middle_block...`, `output_blocks...`, `out...`), so the key mapping is the
identity. Two official details are reproduced on purpose, since the published weights were trained
with them:

- the shifted-window attention mask is recomputed for every input size with the official
  construction, whose region labels come from rows only and are read transposed within each
  window (see `shifted_window_mask`);
- GroupNorm runs in float32 whatever the torso dtype; the timestep embedding and the output head
  stay float32 when the torso runs in fp16 (the official `convert_to_fp16`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Buffers the published files carry but that are derived from the architecture (not learned).
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


@dataclass(frozen=True)
class SwinUNetConfig:
    """`model.params` of the official YAML (only what shapes the network)."""

    image_size: int = 64
    in_channels: int = 6  # latent + LR image (ResShift's newer YAML writes 3 and adds 3 inside)
    model_channels: int = 160
    out_channels: int = 3
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    attention_resolutions: tuple[int, ...] = (64, 32, 16, 8)
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_heads: int = 1
    num_head_channels: int = 32
    use_scale_shift_norm: bool = True
    swin_depth: int = 2
    swin_embed_dim: int = 192
    window_size: int = 8
    mlp_ratio: float = 4.0
    extra: dict = field(default_factory=dict, compare=False)  # keys we read but do not use

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_head_channels == -1 else self.swin_embed_dim // self.num_head_channels


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (the official `normalization`)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the raw step index, cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, scale_shift: bool = True):
        super().__init__()
        out_channels = out_channels or channels
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(windows, N, N) additive mask (0 / -100) exactly as the official `calculate_mask` builds it.

    The official code labels a (1, 1, H, W) tensor with `img_mask[:, h, w, :]`, so only the last
    row-slice hits and the labels follow the rows; it then reads each window transposed. Net
    effect: token (r, c) of window (wr, wc) gets the row label of row wr*window + c.
    """
    rows = torch.arange(height)
    labels = (rows >= height - window).long() + (rows >= height - shift).long()
    per_row_band = labels.view(height // window, 1, window).expand(-1, window, -1).reshape(height // window, -1)
    windows = per_row_band.repeat_interleave(width // window, dim=0)
    differ = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(differ.shape).masked_fill(differ, -100.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.window = window
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        windows, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0).to(attn.dtype)
        if mask is not None:
            count = mask.shape[0]
            attn = (attn.view(windows // count, count, self.heads, tokens, tokens) + mask[None, :, None]).view(
                windows, self.heads, tokens, tokens)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(windows, tokens, channels))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """One (shifted-)window attention block on (B, C, H, W), GroupNorm instead of LayerNorm."""

    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.resolution = resolution  # the configured map size (the published attn_mask is built for it)
        if resolution <= window:  # the window covers the whole (configured) map: no shift
            window, shift = resolution, 0
        self.window, self.shift = window, shift
        self.norm1 = GroupNorm32(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = GroupNorm32(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self._masks: dict[tuple, torch.Tensor] = {}

    def _mask(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor | None:
        if self.shift == 0:
            return None  # the official mask is all zeros here
        key = (height, width, like.device, like.dtype)
        if key not in self._masks:
            self._masks[key] = shifted_window_mask(height, width, self.window, self.shift).to(like.device, like.dtype)
        return self._masks[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        ws = self.window
        if height % ws or width % ws:
            raise ValueError(f"Swin block needs sizes that are multiples of {ws}, got {height}x{width}")
        h = self.norm1(x)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(2, 3))
        windows = (h.view(batch, channels, height // ws, ws, width // ws, ws).permute(0, 2, 4, 3, 5, 1)
                   .reshape(-1, ws * ws, channels))
        windows = self.attn(windows, self._mask(height, width, x))
        h = (windows.view(batch, height // ws, width // ws, ws, ws, channels).permute(0, 5, 1, 3, 2, 4)
             .reshape(batch, channels, height, width))
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(2, 3))
        x = x + h
        return x + self.mlp(self.norm2(x))


class PatchProjection(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class SwinLayer(nn.Module):
    """The official `BasicLayer` with patch size 1: project in, Swin blocks, project out."""

    def __init__(self, channels: int, config: SwinUNetConfig, resolution: int):
        super().__init__()
        dim = config.swin_embed_dim
        self.patch_embed = PatchProjection(channels, dim)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, config.heads, config.window_size,
                      0 if i % 2 == 0 else config.window_size // 2, config.mlp_ratio)
            for i in range(config.swin_depth))
        self.patch_unembed = PatchProjection(dim, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.patch_unembed(x)


class EmbedSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class SwinUNet(nn.Module):
    """x0 predictor f(x_t scaled, t, LR): (B, 3, h, w) latent + (B, 3, h, w) LR in [-1, 1]."""

    def __init__(self, config: SwinUNetConfig):
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_dim = mc * 4
        blocks = _per_level(config.num_res_blocks, len(config.channel_mult))
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = int(config.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        skips = [ch]
        resolution = config.image_size
        for level, mult in enumerate(config.channel_mult):
            for index in range(blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, int(mult * mc), config.use_scale_shift_norm)]
                ch = int(mult * mc)
                if resolution in config.attention_resolutions and index == 0:
                    layers.append(SwinLayer(ch, config, resolution))
                self.input_blocks.append(EmbedSequential(*layers))
                skips.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skips.append(ch)
                resolution //= 2
        self.middle_block = EmbedSequential(ResBlock(ch, emb_dim, None, config.use_scale_shift_norm),
                                            SwinLayer(ch, config, resolution),
                                            ResBlock(ch, emb_dim, None, config.use_scale_shift_norm))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(config.channel_mult))[::-1]:
            for index in range(blocks[level] + 1):
                layers = [ResBlock(ch + skips.pop(), emb_dim, int(mc * mult), config.use_scale_shift_norm)]
                ch = int(mc * mult)
                if resolution in config.attention_resolutions and index == 0:
                    layers.append(SwinLayer(ch, config, resolution))
                if level and index == blocks[level]:
                    layers.append(Upsample(ch))
                    resolution *= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(int(config.channel_mult[0] * mc),
                                                                       config.out_channels, 3, padding=1))

    @property
    def torso_dtype(self) -> torch.dtype:
        return self.input_blocks[0][0].weight.dtype

    @property
    def size_multiple(self) -> int:
        """Inputs must be multiples of this (downsamplings x Swin window)."""
        return 2 ** (len(self.config.channel_mult) - 1) * self.config.window_size

    def set_torso_dtype(self, dtype: torch.dtype) -> SwinUNet:
        """fp16 as the official `convert_to_fp16`: the torso's convs and linears only; norms, the
        position-bias tables, the timestep embedding and the head stay float32."""
        self.float()
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in part.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    module.to(dtype)
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        if lq.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"the LR image ({tuple(lq.shape[-2:])}) and latent ({tuple(x.shape[-2:])}) differ in size")
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels)
                              .to(self.time_embed[0].weight.dtype)).type(self.torso_dtype)
        x = torch.cat([x, lq.to(x.dtype)], dim=1)
        h = x.type(self.torso_dtype)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(self.out[2].weight.dtype))


def _per_level(value: int | Sequence[int], levels: int) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    if len(value) != levels:
        raise ValueError(f"num_res_blocks has {len(value)} entries for {levels} levels")
    return list(value)
