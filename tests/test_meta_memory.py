"""The memory counters behind the training benchmarks' --estimate modes, against hand counts."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from meta_memory import BF16Autocast, SavedBytes  # noqa: E402


def _block() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())


def test_saved_bytes_counts_inputs_and_outputs_autograd_keeps_but_not_parameters():
    block, x = _block(), torch.randn(3, 8)
    saved = SavedBytes(block)
    with saved:
        block(x)
    # addmm keeps x (for the weight's gradient) and the weight (excluded); ReLU keeps its 3 x 4 output
    assert saved.total == 3 * 8 * 4 + 3 * 4 * 4
    with saved:
        with torch.no_grad():
            block(x)
    assert saved.total == 0


def test_checkpoint_keeps_the_inputs_and_reports_the_recomputed_block():
    block, x = _block(), torch.randn(3, 8)
    saved = SavedBytes(block)
    with saved:
        out = saved.checkpoint(block, x)
    assert out.requires_grad
    assert saved.total == 3 * 8 * 4
    assert saved.recompute == 3 * 8 * 4 + 3 * 4 * 4


def test_bf16_autocast_casts_as_cuda_autocast_does():
    block, x = _block(), torch.randn(3, 8, requires_grad=True)
    saved = SavedBytes(block)
    with BF16Autocast(), saved:
        out = block(x)
        normed = F.group_norm(out, 2)
        assert out.dtype == torch.bfloat16 and normed.dtype == torch.float32
        assert (out * 2).dtype == torch.bfloat16
    # bf16 copies of x and of the weight (each kept for the other's gradient), ReLU's bf16 output, group norm's
    # fp32 input and its fp32 mean and rstd (3 x 2 groups)
    assert saved.total == 3 * 8 * 2 + 4 * 8 * 2 + 3 * 4 * 2 + 3 * 4 * 4 + 2 * 3 * 2 * 4
