"""Tiny random models with the exact module structure of SD-2.x (block types, linear projections,
attention layout), small enough for CPU tests. Used by tests and by nothing at run time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": [2, 4, 4, 4],
    "block_out_channels": [16, 32, 32, 32],
    "center_input_sample": False,
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 32,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}

TINY_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [16, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "out_channels": 3,
    "sample_size": 256,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

TINY_TEXT_CONFIG = {
    "hidden_act": "gelu",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "vocab_size": 1000,
    "projection_dim": 32,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


@dataclass
class TinyBase:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer


def _perturb_norms(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random init leaves norm affine params at 1/0; perturb them so conversions that swap
    weight/bias or drop a norm cannot pass by accident."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name or "ln" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2/CLIP convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = 0
    mapping = {}
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return list(mapping.values())


def write_tiny_tokenizer(folder: Path) -> None:
    """A character-level CLIP BPE tokenizer (no merges) so CLIPTokenizer loads offline."""
    chars = _byte_level_alphabet()
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "pad_token": "!", "tokenizer_class": "CLIPTokenizer"})
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
                    "unk_token": "<|endoftext|>"})
    )


def build_tiny_base(seed: int = 0, tokenizer_dir: Path | None = None) -> TinyBase:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)).eval()
    for module in (unet, vae, text_encoder):
        _perturb_norms(module, generator)
    # diffusers zero-inits some output convs; give them weights so every path carries signal.
    with torch.no_grad():
        for module in (unet, vae):
            for _name, param in module.named_parameters():
                if param.abs().sum() == 0 and param.dim() > 1:
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    if tokenizer_dir is None:
        import tempfile

        tokenizer_dir = Path(tempfile.mkdtemp(prefix="tiny_tok_"))
    write_tiny_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return TinyBase(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def save_diffusers_folder(base: TinyBase, path: Path) -> None:
    path = Path(path)
    base.unet.save_pretrained(path / "unet")
    base.vae.save_pretrained(path / "vae")
    base.text_encoder.save_pretrained(path / "text_encoder")
    base.tokenizer.save_pretrained(path / "tokenizer")
    DDPMScheduler(**SCHEDULER_CONFIG).save_config(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
