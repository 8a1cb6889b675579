"""The vision-aided GAN discriminator on frozen DINO features, as S3Diff trains with it.

S3Diff (src/train_s3diff.py) builds `vision_aided_loss.Discriminator(cv_type='dino',
output_type='conv_multi_level', loss_type='multilevel_sigmoid_s')` with its defaults (DiffAugment on).
What that computes (nupurkmr9/vision-aided-gan, vision_aided_loss/cvmodel.py, cv_discriminator.py,
cv_losses.py, DiffAugment_pytorch.py, blurpool.py):

1. DiffAugment 'color,translation,cutout' on the images in [-1, 1]: brightness + (u - 0.5),
   saturation x (2u), contrast x (u + 0.5), a translation of up to 1/8 of the size (zero fill) and a
   cutout of half the size, each drawn per sample.
2. DINO preprocessing: x * 0.5 + 0.5, area-resize to 224 x 224, mean (0.48145466, 0.4578275,
   0.40821073) and std (0.229, 0.224, 0.225) (the CLIP mean with the ImageNet std, as published).
3. DINO ViT-B/16 (facebookresearch/dino `dino_vitb16`, frozen, eval), `get_intermediate_layers(x, n=8)`:
   the final-LayerNorm'ed tokens after each of the last 8 blocks; levels are items 0, 4 and -1, i.e.
   after blocks 5, 9 and 12 (1-based). Levels 0 and 1 keep the 14 x 14 patch tokens as 768-channel
   maps, level 2 the CLS token.
4. Heads (`MultiLevelDViT(level=3, in_ch1=768, in_ch2=768, out_ch=128, down=2)`), spectral-normalised:
   maps: BlurPool(zero pad 2, stride 1) -> Conv3x3 s2 (768->128) -> LeakyReLU(0.2) ->
         BlurPool(zero pad 1, stride 1) -> Conv1x1 s2 (128->1): 14x14 -> 3x3 logits;
   CLS:  Linear(768->128) -> LeakyReLU(0.2) -> Linear(128->1).
   BlurPool's filter is [1, 3, 3, 1] (x) [1, 3, 3, 1] / 64, depthwise.
5. `multilevel_sigmoid_s`: per level BCE-with-logits against 0.8 (real, and the generator's target)
   or 0 (fake), averaged over the 3 x 3 map, summed over levels; callers take the batch mean.

Why written here instead of depending on `vision_aided_loss`: the package downloads DINO through
torch.hub and a Swin/CLIP/VGG stack at import (clip from git, gdown, timm, antialiased_cnns); this
module reads `dino_vitbase16_pretrain.pth` (the file torch.hub fetches for `dino_vitb16`, DINO's own
key layout) from the feature-network folder, and the ViT is ~40 lines in that exact layout (LayerNorm
eps 1e-6, qkv bias, exact GELU, no fused-attention approximations beyond SDPA).

One deliberate difference from the official training loop: there the generator's GAN loss is
back-propagated into the discriminator's heads as well (their gradients are not cleared before the
discriminator's real step). `generator_adversarial_loss` evaluates the heads with gradients off, so
the discriminator optimiser only ever sees the discriminator's own losses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

from ..feature_networks import find_file, read_state

DINO_FILES = ("dino_vitbase16_pretrain.pth", "dino_vitb16.pth", "dino_vitbase16_pretrain.safetensors")
DINO_MEAN = (0.48145466, 0.4578275, 0.40821073)
DINO_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
INTERMEDIATE = 8  # get_intermediate_layers(x, n=8)
LEVEL_ITEMS = (0, 4, -1)  # of those 8
REAL_TARGET = 0.8  # multilevel_sigmoid_s: alpha = 0.8 (one-sided label smoothing, also the G target)
HEAD_CHANNELS = 128


# -- DINO ViT (facebookresearch/dino vision_transformer.py layout) -----------------------------------------
class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


class DinoViT(nn.Module):
    """DINO's VisionTransformer at its native 224 px (no position interpolation needed there)."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, patch: int = 16, mlp_ratio: int = 4,
                 image_size: int = INPUT_SIZE) -> None:
        super().__init__()
        self.grid = image_size // patch
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, dim * mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def intermediate(self, x: Tensor, n: int) -> list[Tensor]:
        """`get_intermediate_layers`: norm(tokens) after each of the last n blocks, (B, 1 + P, C) each."""
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        out = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if len(self.blocks) - i <= n:
                out.append(self.norm(tokens))
        return out

    @classmethod
    def from_state(cls, state: dict[str, Tensor], heads: int | None = None) -> DinoViT:
        """Build from a DINO state dict (sizes read from its shapes; heads = dim / 64 as in ViT-S/B)."""
        proj = state["patch_embed.proj.weight"]
        dim, patch = int(proj.shape[0]), int(proj.shape[-1])
        depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
        hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
        grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
        model = cls(dim, depth, heads or max(1, dim // 64), patch, hidden // dim, grid * patch)
        model.load_state_dict(state, strict=True)
        return model


# -- heads -----------------------------------------------------------------------------------------------
class BlurPool(nn.Module):
    """Antialiased-CNN BlurPool with filter size 4 and stride 1 (the only use here): depthwise
    [1, 3, 3, 1] (x) [1, 3, 3, 1] / 64 after zero padding of 1 + pad_off on every side."""

    def __init__(self, channels: int, pad_off: int = 0) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("filt", (kernel / kernel.sum())[None, None].repeat(channels, 1, 1, 1))
        self.pad = 1 + pad_off

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, [self.pad] * 4), self.filt.to(x.dtype), groups=x.shape[1])


def _map_head(channels: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        BlurPool(channels, pad_off=1),
        spectral_norm(nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=0)),
        nn.LeakyReLU(0.2),
        BlurPool(out),
        spectral_norm(nn.Conv2d(out, 1, kernel_size=1, stride=2)),
    )


class MultiLevelHeads(nn.Module):
    """MultiLevelDViT(level=3, down=2): two map heads and one CLS head."""

    def __init__(self, channels: int, out: int = HEAD_CHANNELS) -> None:
        super().__init__()
        self.maps = nn.ModuleList(_map_head(channels, out) for _ in range(len(LEVEL_ITEMS) - 1))
        self.cls = nn.Sequential(spectral_norm(nn.Linear(channels, out)), nn.LeakyReLU(0.2))
        self.out = spectral_norm(nn.Linear(out, 1))

    def forward(self, levels: Sequence[Tensor]) -> list[Tensor]:
        logits = [head(level).squeeze(1) for head, level in zip(self.maps, levels[:-1], strict=True)]
        logits.append(self.out(self.cls(levels[-1].float())))
        return logits


# -- DiffAugment, drawn per sample ----------------------------------------------------------------------------
def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(low, high, (), generator=generator))


def _shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """out[i, j] = x[i + dy, j + dx], zero outside (DiffAugment's rand_translation)."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, yd = slice(max(dy, 0), min(h + dy, h)), slice(max(-dy, 0), min(h - dy, h))
    xs, xd = slice(max(dx, 0), min(w + dx, w)), slice(max(-dx, 0), min(w - dx, w))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[..., yd, xd] = x[..., ys, xs]
    return out


def diff_augment(images: Tensor, generators: Sequence[torch.Generator | None] | None = None) -> Tensor:
    """'color,translation,cutout' on (B, 3, H, W) images, each sample with its own generator (so a
    batch split over processes draws what one process would)."""
    b, _, h, w = images.shape
    generators = list(generators) if generators is not None else [None] * b
    if len(generators) != b:
        raise ValueError(f"diff_augment: {len(generators)} generators for a batch of {b}")
    shift_y, shift_x = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    cut_h, cut_w = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    out = []
    for x, g in zip(images, generators, strict=True):
        x = x + (_uniform(g) - 0.5)
        mean = x.mean(dim=0, keepdim=True)
        x = (x - mean) * (_uniform(g) * 2) + mean
        mean = x.mean()
        x = (x - mean) * (_uniform(g) + 0.5) + mean
        x = _shift(x, _randint(-shift_y, shift_y + 1, g), _randint(-shift_x, shift_x + 1, g))
        top = _randint(0, h + (1 - cut_h % 2), g) - cut_h // 2
        left = _randint(0, w + (1 - cut_w % 2), g) - cut_w // 2
        mask = torch.ones(h, w, dtype=x.dtype, device=x.device)
        mask[max(top, 0):max(top + cut_h, 0), max(left, 0):max(left + cut_w, 0)] = 0
        out.append(x * mask)
    return torch.stack(out)


# -- the discriminator ------------------------------------------------------------------------------------------
class DinoDiscriminator(nn.Module):
    """images in [-1, 1] -> [logits (B, 3, 3), logits (B, 3, 3), logits (B, 1)] (one per level).

    The DINO backbone is frozen and stays in eval mode whatever `train()` asks; only `heads` train.
    """

    def __init__(self, backbone: DinoViT, diffaug: bool = True) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.heads = MultiLevelHeads(backbone.norm.normalized_shape[0])
        self.diffaug = diffaug
        self.register_buffer("mean", torch.tensor(DINO_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(DINO_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_folder(cls, folder: str | Path, diffaug: bool = True) -> DinoDiscriminator:
        """DINO ViT-B/16 weights from the feature-network folder (missing file: a clear error)."""
        path = find_file(folder, DINO_FILES, "the S3Diff GAN discriminator's DINO ViT-B/16")
        state = read_state(path)
        try:
            backbone = DinoViT.from_state(state)
        except (KeyError, RuntimeError) as error:
            raise ValueError(f"{path.name} in {path.parent} is not a DINO ViT state dict "
                             f"(facebookresearch/dino layout): {str(error).splitlines()[0][:200]}") from error
        return cls(backbone, diffaug)

    @classmethod
    def tiny(cls, dim: int = 16, depth: int = 12, heads: int = 2, seed: int = 0, diffaug: bool = True
             ) -> DinoDiscriminator:
        """A random-weight stand-in with the real structure (for tests)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = DinoViT(dim, depth, heads)
            for name, param in backbone.named_parameters():
                if name.endswith("weight") and param.dim() > 1 or name in ("cls_token", "pos_embed"):
                    nn.init.normal_(param, std=0.2)
            return cls(backbone, diffaug)

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, images: Tensor, generators: Sequence[torch.Generator | None] | None = None
                 ) -> list[Tensor]:
        """The three DINO levels of (augmented) images: two (B, C, 14, 14) maps and the CLS (B, C)."""
        x = images.float()
        if self.diffaug:
            x = diff_augment(x, generators)
        x = F.interpolate(x * 0.5 + 0.5, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
        x = (x - self.mean) / self.std
        layers = self.backbone.intermediate(x.to(self.backbone.pos_embed.dtype), INTERMEDIATE)
        picked = [layers[i] for i in LEVEL_ITEMS]
        grid = self.backbone.grid
        maps = [t[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, grid, grid) for t in picked[:-1]]
        return [*maps, picked[-1][:, 0]]

    def forward(self, images: Tensor, generators: Sequence[torch.Generator | None] | None = None
                ) -> list[Tensor]:
        return self.heads(self.features(images, generators))


# -- multilevel_sigmoid_s ---------------------------------------------------------------------------------------
def multilevel_sigmoid_loss(logits: Sequence[Tensor], target: float) -> Tensor:
    """Per sample (B,): sum over levels of the BCE-with-logits against `target`, averaged over a level's map."""
    total = 0
    for level in logits:
        loss = F.binary_cross_entropy_with_logits(level.float(), torch.full_like(level.float(), target),
                                                  reduction="none")
        total = total + loss.flatten(1).mean(1)  # a (B, 1) CLS logit: itself; a (B, 3, 3) map: its mean
    return total


@contextmanager
def _no_head_gradients(discriminator: nn.Module) -> Iterator[None]:
    params = [p for p in discriminator.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def generator_adversarial_loss(discriminator: nn.Module, fake: Tensor,
                               generators: Sequence[torch.Generator | None] | None = None) -> Tensor:
    """Batch mean of the generator's loss (target 0.8); gradients reach `fake` but not the heads."""
    with _no_head_gradients(discriminator):
        return multilevel_sigmoid_loss(discriminator(fake, generators), REAL_TARGET).mean()


def discriminator_real_loss(discriminator: nn.Module, real: Tensor,
                            generators: Sequence[torch.Generator | None] | None = None) -> Tensor:
    return multilevel_sigmoid_loss(discriminator(real.detach(), generators), REAL_TARGET).mean()


def discriminator_fake_loss(discriminator: nn.Module, fake: Tensor,
                            generators: Sequence[torch.Generator | None] | None = None) -> Tensor:
    return multilevel_sigmoid_loss(discriminator(fake.detach(), generators), 0.0).mean()


def discriminator_loss(discriminator: nn.Module, real: Tensor, fake: Tensor,
                       generators: Sequence[torch.Generator | None] | None = None) -> Tensor:
    """Real (target 0.8) plus fake (target 0) losses; both inputs are detached."""
    return (discriminator_real_loss(discriminator, real, generators)
            + discriminator_fake_loss(discriminator, fake, generators))
