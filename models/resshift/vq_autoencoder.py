"""The VQGAN-f4 autoencoder of ResShift/SinSR/HF-Diff (`VQModelTorch`, `autoencoder_vq_f4.pth`).

Module names mirror the published file (`encoder.down.N.block.M...`, `quantize.embedding.weight`),
so it loads without renaming. `encode` stops before quantisation; `decode` quantises to the nearest
codebook entry first, with the official distance formula (|z|^2 + |e|^2 - 2 z.e, argmin), so
near-ties resolve as in the official code. The mid-block attention uses PyTorch's fused attention:
at a 512-px LR patch it attends over 512x512 latent positions, which a plain matmul cannot hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VQConfig:
    """`autoencoder.params` of the official YAML."""

    embed_dim: int = 3
    n_embed: int = 8192
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int | tuple[int, ...] = 2
    z_channels: int = 3
    in_channels: int = 3
    out_ch: int = 3
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (layer(h).reshape(batch, 1, channels, -1).transpose(-1, -2) for layer in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(batch, channels, height, width))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution: res blocks, attention where configured, optional resampling."""

    def __init__(self, channels_in: int, channels_out: int, count: int, attention: bool, resample: type | None):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(count):
            self.block.append(ResnetBlock(channels_in, channels_out))
            channels_in = channels_out
            if attention:
                self.attn.append(AttnBlock(channels_out))
        if resample is not None:
            setattr(self, "downsample" if resample is Downsample else "upsample", resample(channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[index](x)
        return x


def _blocks(value: int | Sequence[int], levels: int) -> list[int]:
    return [value] * levels if isinstance(value, int) else list(value)


class Encoder(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        mult = (1, *config.ch_mult)
        blocks = _blocks(config.num_res_blocks, len(config.ch_mult))
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        resolution = config.resolution
        for level in range(len(config.ch_mult)):
            last = level == len(config.ch_mult) - 1
            self.down.append(_Level(config.ch * mult[level], config.ch * mult[level + 1], blocks[level],
                                    resolution in config.attn_resolutions, None if last else Downsample))
            resolution //= 1 if last else 2
        channels = config.ch * config.ch_mult[-1]
        self.mid = _Mid(channels)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        blocks = _blocks(config.num_res_blocks, len(config.ch_mult))
        channels = config.ch * config.ch_mult[-1]
        resolution = config.resolution // config.downscale
        self.conv_in = nn.Conv2d(config.z_channels, channels, 3, padding=1)
        self.mid = _Mid(channels)
        levels = []
        for level in reversed(range(len(config.ch_mult))):
            out = config.ch * config.ch_mult[level]
            levels.insert(0, _Level(channels, out, blocks[level] + 1, resolution in config.attn_resolutions,
                                    Upsample if level else None))
            channels = out
            resolution *= 2 if level else 1
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    def __init__(self, codes: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codes, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook entry per position of (B, C, H, W)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codebook = self.embedding.weight
        distance = (flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)
                    - 2 * torch.einsum("bd,dn->bn", flat, codebook.t()))
        quantised = self.embedding(distance.argmin(dim=1))
        return quantised.view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2).contiguous()


class VQAutoencoder(nn.Module):
    """Images in [-1, 1] <-> unquantised latents (B, embed_dim, H/f, W/f)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = Quantizer(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self.quantize(z)))
