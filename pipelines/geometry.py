"""Pre-processing geometry of the official OSEDiff / Hero-SR / S3Diff test scripts.

OSEDiff's script, on a PIL image of size (W, H) with `upscale` and `process_size`:
  1. if W or H < process_size // upscale: s = (process_size // upscale) / min(W, H) and resize to
     (int(s*W), int(s*H)) (BICUBIC in OSEDiff, LANCZOS in Hero-SR);
  2. resize to (W'*upscale, H'*upscale) with BICUBIC;
  3. snap down to multiples of 8 with LANCZOS (Pillow skips same-size resizes, so do we);
  4. run the model. The intended resize back to (int(upscale*W), int(upscale*H)) is computed but
     never applied in the official code; we still record it as `target_hw`.
The float arithmetic is kept exactly as written there, quirks included: for short sides 49, 98,
103 and 107 at min_short_side=128, int(128/x*x) is 127, so the "enlarged" short side is 127.

S3Diff does not snap; it reflect-pads to a multiple of 64 and crops the output back, hence
`reflect_pad_to_multiple` and `crop_to`. All sizes here are (height, width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .resize import FILTERS, resize_image


@dataclass(frozen=True)
class ResizePlan:
    """Every size the pre-processing passes through, so callers can check limits before resizing."""

    input_hw: tuple[int, int]
    enlarged_hw: tuple[int, int] | None  # None when the input was large enough
    upscaled_hw: tuple[int, int]
    model_hw: tuple[int, int]  # after snapping: what the model sees
    target_hw: tuple[int, int]  # (int(scale*H), int(scale*W)) of the original input
    scale: float
    enlarge_filter: str
    upscale_filter: str
    snap_filter: str

    @property
    def enlarged(self) -> bool:
        """Whether step 1 ran (the official `resize_flag`)."""
        return self.enlarged_hw is not None


def _check_filter(name: str) -> None:
    """Fail early (at planning time) on a filter name `resize_image` would reject."""
    if name not in FILTERS:
        raise ValueError(f"unknown resize filter {name!r}; valid filters: {', '.join(FILTERS)}")


def _snap_down(n: int, snap: int) -> int:
    """n rounded down to a multiple of `snap`, but never below `snap` itself.

    The official code would produce a 0-sized image for n < snap (it cannot happen there because
    of the enlargement step); we round such tiny sizes up to one `snap` instead.
    """
    return max(n - n % snap, snap)


def plan_resize(
    input_hw: tuple[int, int],
    scale: float,
    min_short_side: int,
    snap: int,
    enlarge_filter: str,
    upscale_filter: str,
    snap_filter: str,
) -> ResizePlan:
    """Compute the official pre-processing sizes for an input of `input_hw`, generalised to float scales.

    `min_short_side` is process_size // upscale for OSEDiff (0 disables the enlargement); `snap` is
    8 for OSEDiff/Hero-SR and 1 (no snapping) for S3Diff. Sizes can get very large for thin inputs
    (1x300 enlarges to 128x38400): the caller enforces its pixel limit on the returned plan.
    """
    h, w = int(input_hw[0]), int(input_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"input size must be at least 1x1, got {h}x{w}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if min_short_side < 0:
        raise ValueError(f"min_short_side must be >= 0, got {min_short_side}")
    if snap < 1:
        raise ValueError(f"snap must be >= 1 (1 = no snapping), got {snap}")
    for name in (enlarge_filter, upscale_filter, snap_filter):
        _check_filter(name)

    enlarged_hw: tuple[int, int] | None = None
    cur_h, cur_w = h, w
    if w < min_short_side or h < min_short_side:
        s = min_short_side / min(w, h)  # same float expression as the official script
        cur_w, cur_h = int(s * w), int(s * h)
        enlarged_hw = (cur_h, cur_w)

    # For integer scales int(H'*scale) == H'*upscale exactly, as in the official code.
    upscaled_hw = (int(cur_h * scale), int(cur_w * scale))
    target_hw = (int(scale * h), int(scale * w))
    if min(upscaled_hw) < 1 or min(target_hw) < 1:
        raise ValueError(f"scale {scale} shrinks a {h}x{w} input to nothing")

    model_hw = upscaled_hw
    if snap > 1:
        model_hw = (_snap_down(upscaled_hw[0], snap), _snap_down(upscaled_hw[1], snap))

    return ResizePlan(
        input_hw=(h, w),
        enlarged_hw=enlarged_hw,
        upscaled_hw=upscaled_hw,
        model_hw=model_hw,
        target_hw=target_hw,
        scale=float(scale),
        enlarge_filter=enlarge_filter,
        upscale_filter=upscale_filter,
        snap_filter=snap_filter,
    )


def apply_resize_plan(x: torch.Tensor, plan: ResizePlan) -> torch.Tensor:
    """Run the plan's resizes in order on a (B, C, H, W) image, skipping same-size steps like Pillow."""
    if tuple(x.shape[-2:]) != plan.input_hw:
        raise ValueError(f"image is {tuple(x.shape[-2:])} but the plan was made for {plan.input_hw}")
    steps = (
        (plan.enlarged_hw, plan.enlarge_filter),
        (plan.upscaled_hw, plan.upscale_filter),
        (plan.model_hw, plan.snap_filter),
    )
    for size, filt in steps:
        if size is not None and tuple(x.shape[-2:]) != size:
            x = resize_image(x, size, filt)
    return x


def _reflect_indices(n: int, total: int, device: torch.device) -> torch.Tensor:
    """Indices 0..total-1 folded back into 0..n-1 by repeated mirror reflection (edge not repeated)."""
    idx = torch.arange(total, device=device)
    if n == 1:
        return torch.zeros_like(idx)  # nothing to reflect: replicate the single row/column
    period = 2 * (n - 1)
    idx = idx % period
    return torch.where(idx >= n, period - idx, idx)


def reflect_pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad bottom/right with reflection so H and W become multiples of `multiple`, as S3Diff does.

    Returns the padded image and the (pad_h, pad_w) amounts; `crop_to(y, original_hw)` undoes it.
    torch's reflect mode needs pad < dim; for smaller images (e.g. 40 px padded to 64) we reflect
    repeatedly (the same mirror-without-edge rule, continued periodically), which agrees with
    torch wherever torch works. A dimension of 1 has nothing to mirror and is replicated.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    h, w = x.shape[-2:]
    pad_h = -h % multiple
    pad_w = -w % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (0, 0)
    if pad_h < h and pad_w < w and x.is_floating_point():
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect"), (pad_h, pad_w)
    rows = _reflect_indices(h, h + pad_h, x.device)
    cols = _reflect_indices(w, w + pad_w, x.device)
    return x.index_select(-2, rows).index_select(-1, cols), (pad_h, pad_w)


def crop_to(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Keep the top-left `hw` of an image (removes bottom/right padding)."""
    h, w = int(hw[0]), int(hw[1])
    if h < 1 or w < 1 or h > x.shape[-2] or w > x.shape[-1]:
        raise ValueError(f"cannot crop a {tuple(x.shape[-2:])} image to {(h, w)}")
    return x[..., :h, :w]
