"""Memory of a training step counted on meta tensors, shared by the `--estimate` modes of the training
benchmarks (no GPU needed: full-size modules cost nothing on the meta device).

`SavedBytes` counts what autograd saves for backward (saved-tensor hooks; views counted once; the
excluded tensors, i.e. parameters and buffers, not at all). diffusers' default gradient checkpointing is
non-reentrant: it keeps the block inputs alive outside the hooks, so pass `saved.checkpoint` as the
checkpointing function to count those inputs and the largest block's recomputed activations.

`BF16Autocast` imitates CUDA autocast's casting policy, which does not run on meta tensors: the ops
autocast runs in bf16 (convolutions, linear, matmuls, attention) get bf16 inputs, the ones it keeps in
fp32 (group/layer norm, softmax, MSE) get fp32 inputs, everything else follows its inputs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

GIB = 2**30

BF16_FUNCTIONS = {F.conv1d, F.conv2d, F.linear, F.scaled_dot_product_attention, torch.matmul, torch.mm,
                  torch.bmm, torch.baddbmm, torch.addmm, torch.Tensor.matmul, torch.Tensor.__matmul__,
                  torch.Tensor.bmm}
FP32_FUNCTIONS = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.mse_loss}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: torch.nn.Module) -> int:
    return tensor_bytes([*module.parameters(), *module.buffers()])


def meta_x0_from_eps(z: torch.Tensor, eps: torch.Tensor, t, schedule) -> torch.Tensor:
    """A stand-in for x0_from_eps (which checks its timesteps with .item()): memory only, not values."""
    return (z - 0.997 * eps.float()) / 0.068


class SavedBytes:
    """Bytes autograd saves for backward while active (`with saved:`); `checkpoint` for checkpointed blocks."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.exclude = {id(t) for t in [*module.parameters(), *module.buffers()]}
        self.seen: dict[int, int] = {}
        self.recompute = 0  # the largest checkpointed block's activations, alive while it is recomputed

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def _record(self, seen: dict[int, int], t: torch.Tensor) -> None:
        base = t._base if t._base is not None else t
        if id(t) not in self.exclude and id(base) not in self.exclude:
            seen[id(base)] = base.numel() * base.element_size()

    def _hooks(self, seen: dict[int, int]):
        def pack(t: torch.Tensor) -> torch.Tensor:
            self._record(seen, t)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def __enter__(self) -> SavedBytes:
        self.seen.clear()
        self.recompute = 0
        self._active = self._hooks(self.seen)
        self._active.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._active.__exit__(*exc)

    def checkpoint(self, function, *args):
        """A gradient-checkpointing function: the inputs stay saved, the block's activations only transiently."""
        for arg in args:
            if isinstance(arg, torch.Tensor) and torch.is_grad_enabled():
                self._record(self.seen, arg)
        block: dict[int, int] = {}
        with self._hooks(block):
            out = function(*args)
        self.recompute = max(self.recompute, sum(block.values()))
        return out


class BF16Autocast(TorchFunctionMode):
    """CUDA autocast's bf16/fp32 casting policy for meta tensors (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in BF16_FUNCTIONS else torch.float32 if func in FP32_FUNCTIONS else None
        if dtype is not None:
            def cast(x):
                return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)
