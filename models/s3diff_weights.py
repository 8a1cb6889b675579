"""The S3Diff checkpoint (`s3diff.pkl`) and the network that turns degradation scores into LoRA matrices.

Layout (written by `S3Diff.save_model` in src/s3diff_tile.py, PEFT 0.10 names):
  unet_lora_target_modules  list of suffixes (to_k, ..., conv, conv_out, ff.net.0.proj)
  vae_lora_target_modules   regex r"^encoder\\..*(conv1|conv2|conv_in|...|to_out\\.0)$"
  rank_unet / rank_vae      32 / 16 (alpha is PEFT's default 8 -> scales 0.25 / 0.5)
  state_dict_unet           `<m>.lora_{A,B}.default.weight` + `conv_in.weight/bias` (fully trained)
  state_dict_vae            `<m>.lora_{A,B}.vae_skip.weight`
  state_dict_{unet,vae}_de_mlp     Sequential(Linear(256, 256), ReLU): keys 0.weight, 0.bias
  state_dict_{unet,vae}_block_mlp  Sequential(Linear(64, 64), ReLU):   keys 0.weight, 0.bias
  state_dict_{unet,vae}_fuse_mlp   Linear(320, r*r):                   keys weight, bias
  w                         the fixed Fourier vector (64,), an nn.Parameter
  state_embeddings          {state_dict_vae_block: {weight: (6, 64)}, state_dict_unet_block: {weight: (10, 64)}}

`skip_conv`: save_model also keeps VAE entries containing "skip_conv" and names the VAE adapter
"vae_skip" - both inherited from img2img-turbo, whose VAE decoder had skip_conv_1..4 layers. S3Diff's
VAE is a plain AutoencoderKL without such layers, so the published file has no skip_conv entries (the
official loader assigns every state_dict_vae key into `vae.state_dict()` and loads it strictly, so
it could not even load one). If a file carries them anyway they are ignored: nothing in S3Diff's
inference reads them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .lora import PEFT_DEFAULT_ALPHA, LoRAAdapter, LoRAFormatError, replace_parameters, split_peft_state_dict
from .modulated_lora import (
    UNET_BLOCKS,
    VAE_BLOCKS,
    inject_modulated_lora,
    peft_targets,
    unet_block_index,
    vae_block_index,
)
from .weights_io import WeightsFileError

UNET_ADAPTER = "default"
VAE_ADAPTER = "vae_skip"
FOURIER_DIM = 64  # length of w; 2 scores x (sin, cos) x 64 = 256 inputs to the de_mlps
BLOCK_EMBED_DIM = 64
DE_EMBED_DIM = 256
_MLP_PARTS = ("de_mlp", "block_mlp", "fuse_mlp")
_REQUIRED = (
    "unet_lora_target_modules", "vae_lora_target_modules", "rank_unet", "rank_vae",
    "state_dict_unet", "state_dict_vae", "w", "state_embeddings",
    *(f"state_dict_{model}_{part}" for model in ("vae", "unet") for part in _MLP_PARTS),
)


@dataclass
class S3DiffWeights:
    unet_adapter: LoRAAdapter
    vae_adapter: LoRAAdapter
    unet_trained: dict[str, torch.Tensor]  # conv_in.weight / conv_in.bias
    modulator_state: dict[str, torch.Tensor]  # DegradationModulator.state_dict() layout
    unet_target_modules: list[str] = field(default_factory=list)
    vae_target_modules: str | list[str] = ""

    @property
    def unet_blocks(self) -> int:
        return int(self.modulator_state["unet_block_embeddings.weight"].shape[0])

    @property
    def vae_blocks(self) -> int:
        return int(self.modulator_state["vae_block_embeddings.weight"].shape[0])


def _tensor_dict(value: Any, key: str, filename: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, Mapping) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise WeightsFileError(f"{filename}: entry {key!r} is not a dict of tensors; the file is damaged")
    return {str(k): v.detach() for k, v in value.items()}


def _single_adapter(state: Mapping[str, torch.Tensor], expected: str, rank: int, where: str,
                    filename: str) -> tuple[LoRAAdapter, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    adapters, base, plain = split_peft_state_dict(state)
    if set(adapters) != {expected}:
        raise WeightsFileError(f"{filename}: {where} LoRA adapter(s) {sorted(adapters)}, expected only {expected!r}")
    pairs = adapters[expected]
    for module, pair in pairs.items():
        if pair.down.shape[0] != rank:
            raise LoRAFormatError(f"{where} {module}: LoRA rank {pair.down.shape[0]} but the file says {rank}")
    return LoRAAdapter(name=expected, rank=rank, alpha=PEFT_DEFAULT_ALPHA, pairs=dict(pairs)), base, plain


def parse_s3diff(data: Mapping[str, Any], filename: str = "s3diff.pkl") -> S3DiffWeights:
    """Turn the published S3Diff dict into LoRA adapters, conv_in and modulator weights, checking it."""
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise WeightsFileError(f"{filename} lacks {', '.join(map(repr, missing))}: it is not a complete s3diff.pkl")
    rank_unet, rank_vae = int(data["rank_unet"]), int(data["rank_vae"])
    unet_adapter, unet_base, unet_plain = _single_adapter(
        _tensor_dict(data["state_dict_unet"], "state_dict_unet", filename), UNET_ADAPTER, rank_unet, "UNet", filename)
    vae_adapter, vae_base, vae_plain = _single_adapter(
        _tensor_dict(data["state_dict_vae"], "state_dict_vae", filename), VAE_ADAPTER, rank_vae, "VAE", filename)

    trained = {**unet_base, **unet_plain}
    if set(trained) != {"conv_in.weight", "conv_in.bias"}:
        raise WeightsFileError(
            f"{filename}: state_dict_unet should hold LoRA weights plus conv_in.weight/bias, found "
            f"non-LoRA entries {sorted(trained)[:4]}"
        )
    # skip_conv entries belong to img2img-turbo's decoder skips, which S3Diff's VAE does not have and its
    # inference never reads (see the module docstring): ignore them. Anything else is unexpected.
    others = [key for key in {**vae_base, **vae_plain} if "skip_conv" not in key]
    if others:
        raise WeightsFileError(f"{filename}: unexpected non-LoRA VAE entries, e.g. {others[0]!r}")

    modulator_state: dict[str, torch.Tensor] = {}
    for model in ("unet", "vae"):
        for part in _MLP_PARTS:
            key = f"state_dict_{model}_{part}"
            for name, value in _tensor_dict(data[key], key, filename).items():
                modulator_state[f"{model}_{part}.{name}"] = value
    embeddings = data["state_embeddings"]
    if not isinstance(embeddings, Mapping):
        raise WeightsFileError(f"{filename}: state_embeddings is not a dict; the file is damaged")
    for model in ("unet", "vae"):
        key = f"state_dict_{model}_block"
        if key not in embeddings:
            raise WeightsFileError(f"{filename}: state_embeddings lacks {key!r}; the file is incomplete")
        for name, value in _tensor_dict(embeddings[key], key, filename).items():
            modulator_state[f"{model}_block_embeddings.{name}"] = value
    w = data["w"]
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise WeightsFileError(f"{filename}: 'w' should be a 1-D tensor (the Fourier vector)")
    modulator_state["w"] = w.detach()

    unet_list = data["unet_lora_target_modules"]
    vae_targets = data["vae_lora_target_modules"]
    weights = S3DiffWeights(
        unet_adapter=unet_adapter,
        vae_adapter=vae_adapter,
        unet_trained=trained,
        modulator_state=modulator_state,
        unet_target_modules=list(unet_list) if not isinstance(unet_list, str) else [unet_list],
        vae_target_modules=vae_targets if isinstance(vae_targets, str) else list(vae_targets),
    )
    DegradationModulator.from_weights(weights, filename)  # validates every modulator shape now
    return weights


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x, layer.weight.float(), bias)


class DegradationModulator(nn.Module):
    """(B, 2) degradation scores -> per-sample, per-block LoRA matrices for the UNet and the VAE encoder.

    Fourier features [sin(2 pi s w), cos(2 pi s w)] of each score, concatenated (256), go through
    `*_de_mlp` (Linear+ReLU); the block embedding table goes through `*_block_mlp` (Linear+ReLU); the
    fuse layer maps concat[de (256), block (64)] to r*r numbers, read row-major as M[k, j].
    It stays float32 whatever `.to(dtype)` / `.half()` asks (only devices change) and returns float32:
    it runs once per image and is ~0.6 M parameters, while fp16 `w` and sin(2 pi s w) would shift every
    matrix; the LoRA layers cast the matrices to their own dtype.
    """

    def __init__(self, rank_unet: int = 32, rank_vae: int = 16, unet_blocks: int = UNET_BLOCKS,
                 vae_blocks: int = VAE_BLOCKS, fourier_dim: int = FOURIER_DIM) -> None:
        super().__init__()
        self.rank_unet, self.rank_vae = rank_unet, rank_vae
        in_dim = 4 * fourier_dim  # two scores, sin and cos
        self.unet_de_mlp = nn.Sequential(nn.Linear(in_dim, DE_EMBED_DIM), nn.ReLU())
        self.vae_de_mlp = nn.Sequential(nn.Linear(in_dim, DE_EMBED_DIM), nn.ReLU())
        self.unet_block_mlp = nn.Sequential(nn.Linear(BLOCK_EMBED_DIM, 64), nn.ReLU())
        self.vae_block_mlp = nn.Sequential(nn.Linear(BLOCK_EMBED_DIM, 64), nn.ReLU())
        self.unet_fuse_mlp = nn.Linear(DE_EMBED_DIM + 64, rank_unet**2)
        self.vae_fuse_mlp = nn.Linear(DE_EMBED_DIM + 64, rank_vae**2)
        self.unet_block_embeddings = nn.Embedding(unet_blocks, BLOCK_EMBED_DIM)
        self.vae_block_embeddings = nn.Embedding(vae_blocks, BLOCK_EMBED_DIM)
        self.register_buffer("w", torch.zeros(fourier_dim))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DegradationModulator:
        """Follow device moves only: probe where `fn` sends a float tensor, keep float32."""
        target = fn(torch.zeros(0)).device
        return super()._apply(lambda t: t.to(device=target), recurse)

    @classmethod
    def from_weights(cls, weights: S3DiffWeights, filename: str = "s3diff.pkl") -> DegradationModulator:
        state = weights.modulator_state
        try:
            module = cls(
                rank_unet=weights.unet_adapter.rank, rank_vae=weights.vae_adapter.rank,
                unet_blocks=weights.unet_blocks, vae_blocks=weights.vae_blocks, fourier_dim=state["w"].shape[0],
            )
            module.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
        except (KeyError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0][:300]
            raise WeightsFileError(f"{filename}: the degradation MLP/embedding weights do not fit S3Diff ({first})") \
                from error
        return module.eval().requires_grad_(False)

    def fourier(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, 2) -> (B, 4 * len(w)): [sin, cos] of score 0, then of score 1."""
        projected = scores.float()[..., None] * self.w.float() * (2 * math.pi)
        features = torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)  # (B, 2, 2 * len(w))
        return features.flatten(1)

    def _matrices(self, de: torch.Tensor, de_mlp: nn.Sequential, block_mlp: nn.Sequential, fuse: nn.Linear,
                  table: nn.Embedding, rank: int) -> torch.Tensor:
        de_embed = torch.relu(_linear(de, de_mlp[0]))  # (B, 256)
        block_embed = torch.relu(_linear(table.weight.float(), block_mlp[0]))  # (n, 64)
        batch, blocks = de_embed.shape[0], block_embed.shape[0]
        joint = torch.cat([de_embed[:, None].expand(batch, blocks, -1),
                           block_embed[None].expand(batch, blocks, -1)], dim=-1)
        return _linear(joint, fuse).reshape(batch, blocks, rank, rank)

    def forward(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2) scores -> (unet (B, 10, r_u, r_u), vae (B, 6, r_v, r_v)), float32."""
        if scores.dim() != 2 or scores.shape[1] != 2:
            raise ValueError(f"degradation scores must have shape (B, 2), got {tuple(scores.shape)}")
        de = self.fourier(scores.to(self.w.device))
        unet = self._matrices(de, self.unet_de_mlp, self.unet_block_mlp, self.unet_fuse_mlp,
                              self.unet_block_embeddings, self.rank_unet)
        vae = self._matrices(de, self.vae_de_mlp, self.vae_block_mlp, self.vae_fuse_mlp,
                             self.vae_block_embeddings, self.rank_vae)
        return unet, vae


def _check_coverage(model: nn.Module, adapter: LoRAAdapter, targets: str | list[str], what: str) -> None:
    """Every layer the official target list selects must have weights (else the file is truncated)."""
    if not targets:
        return
    missing = [name for name in peft_targets(model, targets) if name not in adapter.pairs]
    if missing:
        raise WeightsFileError(
            f"s3diff weights lack the {what} LoRA of {len(missing)} targeted layer(s), e.g. {missing[0]}: "
            "the file is incomplete or was made for a different base (S3Diff needs SD-Turbo)"
        )


def apply_s3diff(unet: nn.Module, vae: nn.Module, weights: S3DiffWeights) -> DegradationModulator:
    """Set conv_in, wrap the UNet and VAE-encoder LoRA layers, and return the modulator (on unet's device).

    Afterwards both models need `set_modulation` before every forward (see models/modulated_lora.py).
    """
    _check_coverage(unet, weights.unet_adapter, weights.unet_target_modules, "UNet")
    _check_coverage(vae, weights.vae_adapter, weights.vae_target_modules, "VAE")
    replace_parameters(unet, weights.unet_trained)
    inject_modulated_lora(unet, weights.unet_adapter.pairs, weights.unet_adapter.rank, weights.unet_adapter.alpha,
                          unet_block_index, what="UNet")
    inject_modulated_lora(vae, weights.vae_adapter.pairs, weights.vae_adapter.rank, weights.vae_adapter.alpha,
                          vae_block_index, what="VAE")
    modulator = DegradationModulator.from_weights(weights)
    return modulator.to(next(unet.parameters()).device)
