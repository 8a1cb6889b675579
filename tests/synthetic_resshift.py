"""Tiny random ResShift-family models saved in the published file layouts.

The published UNet files are `torch.save(state_dict)` of the official `UNetModelSwin`, which also
holds two derived buffers: every window attention's `relative_position_index` and, for shifted
blocks, an `attn_mask` built for the configured resolution. The synthetic files carry them too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from onestep_sr.models.resshift.swin_unet import SwinUNet, SwinUNetConfig, WindowAttention
from onestep_sr.models.resshift.vq_autoencoder import VQAutoencoder, VQConfig
from onestep_sr.models.resshift.weights import published_unet_state

UNET_PARAMS = dict(image_size=64, in_channels=6, model_channels=32, out_channels=3, cond_lq=True,
                   attention_resolutions=[64, 32], dropout=0, channel_mult=[1, 2], num_res_blocks=[1, 1],
                   conv_resample=True, dims=2, use_fp16=False, num_head_channels=16, use_scale_shift_norm=True,
                   resblock_updown=False, swin_depth=2, swin_embed_dim=32, window_size=8, mlp_ratio=2)
VQ_PARAMS = dict(embed_dim=3, n_embed=64, ddconfig=dict(double_z=False, z_channels=3, resolution=256, in_channels=3,
                 out_ch=3, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0))
UNET_CONFIG = SwinUNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
                             attention_resolutions=(64, 32), swin_embed_dim=32, num_head_channels=16, mlp_ratio=2)
VQ_CONFIG = VQConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, n_embed=64)


def tiny_unet(seed: int = 1) -> SwinUNet:
    torch.manual_seed(seed)
    unet = SwinUNet(UNET_CONFIG)
    with torch.no_grad():  # the position-bias tables start at zero: give them something to do
        for module in unet.modules():
            if isinstance(module, WindowAttention):
                module.relative_position_bias_table.normal_(0, 0.5)
    return unet.eval()


def tiny_vq(seed: int = 2) -> VQAutoencoder:
    torch.manual_seed(seed)
    return VQAutoencoder(VQ_CONFIG).eval()


def write_unet(unet: SwinUNet, path: Path, wrap: bool = False, prefix: str = "") -> Path:
    state = {prefix + k: v for k, v in published_unet_state(unet).items()}
    torch.save({"state_dict": state} if wrap else state, path)
    return path


def write_vq(vq: VQAutoencoder, path: Path) -> Path:
    torch.save(vq.state_dict(), path)
    return path


def write_official_yaml(path: Path, steps: int = 15, min_noise: float = 0.04, resshift_style: bool = False) -> Path:
    """The tiny sizes in the official YAML layout (ResShift's newer style writes in_channels 3 + lq_size)."""
    params = dict(UNET_PARAMS, out_channels="${autoencoder.params.embed_dim}")
    if resshift_style:
        params.update(in_channels=3, lq_size=64)
    data = {"model": {"target": "models.unet.UNetModelSwin", "params": params},
            "diffusion": {"target": "models.script_util.create_gaussian_diffusion", "params": dict(
                sf=4, schedule_name="exponential", schedule_kwargs={"power": 0.3}, etas_end=0.99, steps=steps,
                min_noise_level=min_noise, kappa=2.0, weighted_mse=False, predict_type="xstart",
                timestep_respacing=None, scale_factor=1.0, normalize_input=True, latent_flag=True)},
            "autoencoder": {"target": "ldm.models.autoencoder.VQModelTorch", "use_fp16": True, "params": VQ_PARAMS},
            "train": {"lr": 5e-5}}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path
