"""The single pass's speed options: VAE precision, channels-last convolutions and torch.compile.

Why one module: each option is a small decision about the same run (device, precision, layout) that the
CLI, the nodes and the benchmarks must take the same way.

- VAE precision: bf16 where the device computes it natively (CUDA with bf16), like ComfyUI's own VAE;
  its range is fp32's, so the SD VAE's large decoder activations do not overflow as they can in fp16.
  Elsewhere the UNet's precision (fp16 on other GPUs, fp32 on the CPU); an fp16/bf16 decode that gives
  NaN/inf is redone in fp32 by the pipeline.
- channels-last: on CUDA, cuDNN's fastest fp16/bf16 convolutions read NHWC; the tiled VAE keeps the
  layout through its steps (vae_steps._memory_format). Off on the CPU, where it changes the numbers by
  float reordering and gains little.
- torch.compile: the UNet is one call per tile batch, compiled once (`nn.Module.compile`, in place, so
  LoRA modulation and the memory model still see the same module). The tiled VAE is not compiled: it
  runs as generators that stop at every GroupNorm for the cross-tile statistics, which a graph cannot
  span; its elementwise work is fused by the Triton kernels and its convolutions are library calls.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("onestep_sr")


def supports_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return bool(torch.cuda.is_bf16_supported())


def auto_vae_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The VAE's precision when the user left precision on auto and the UNet runs in `dtype`."""
    if dtype == torch.float32:
        return dtype
    return torch.bfloat16 if supports_bf16(device) else dtype


def use_channels_last(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def to_channels_last(*modules: nn.Module) -> None:
    """Convolution weights to NHWC, in place (a no-op when they already are)."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def compile_unet(unet: nn.Module) -> bool:
    """Compile the UNet in place; False (with a warning) where this torch build cannot compile."""
    if getattr(unet, "_compiled_call_impl", None) is not None:
        return True
    try:
        unet.compile()
    except Exception as error:  # no compiler backend on this machine: run eagerly
        log.warning("torch.compile is not available here (%s); running the UNet uncompiled", error)
        return False
    return True
