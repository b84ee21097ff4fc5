"""RoIAlign on every CPU thread torch may use.

torchvision's CPU kernels for RoIAlign (forward and backward) loop over the regions on one thread: in a
Faster R-CNN training step on two cores its backward alone was about a quarter of the step
(benchmarks/efficiency.py's operator table), with the second core idle. Every output channel of RoIAlign
depends on that channel of the input alone, so the channels are split into one slice per thread and each
slice runs the very same torchvision kernel: the result is bit for bit torchvision's, on more cores.

Anywhere else (CUDA, one thread, a graph being traced or exported, a single channel) this is
``torchvision.ops.roi_align`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
from torch import Tensor
from torchvision.ops import roi_align as torchvision_roi_align

__all__ = ["roi_align"]


def roi_align(input: Tensor, rois: Tensor | list[Tensor], output_size: int, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align`` (``rois``: one [R, 5] tensor of batch index, x1, y1, x2, y2, or one
    [P_i, 4] tensor per image); on the CPU its channels are pooled on ``torch.get_num_threads()`` threads
    at once."""
    if not isinstance(rois, Tensor):
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(rois)])
    threads = min(torch.get_num_threads(), input.size(1))
    if (input.device.type != "cpu" or threads < 2 or torch.jit.is_scripting() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()):
        return torchvision_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    dtype = input.dtype
    # torchvision's autocast rule for this op: computed in float32, returned in the input's dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    pooled = _ChannelParallelRoIAlign.apply(input.to(compute), rois.to(compute), float(spatial_scale),
                                            int(output_size), int(sampling_ratio), bool(aligned), threads)
    return pooled.to(dtype)


class _ChannelParallelRoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, rois: Tensor, spatial_scale: float, size: int, sampling_ratio: int,
                aligned: bool, threads: int) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.args = (input.shape, spatial_scale, size, sampling_ratio, aligned, threads)

        def pool(part: Tensor) -> Tensor:
            return torch.ops.torchvision.roi_align(part, rois, spatial_scale, size, size, sampling_ratio,
                                                   aligned)

        return _by_channel(pool, input, threads)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        (n, _, h, w), spatial_scale, size, sampling_ratio, aligned, threads = ctx.args

        def spread(part: Tensor) -> Tensor:
            return torch.ops.torchvision._roi_align_backward(part, rois, spatial_scale, size, size, n,
                                                             part.size(1), h, w, sampling_ratio, aligned)

        return _by_channel(spread, grad, threads), None, None, None, None, None, None


def _by_channel(op: Callable[[Tensor], Tensor], x: Tensor, threads: int) -> Tensor:
    """``op`` on ``threads`` channel slices of ``x`` at once, the results joined along the channels.
    (torch's kernels release the GIL, so Python threads run them side by side.)"""
    parts = [part.contiguous() for part in x.tensor_split(threads, dim=1)]
    futures = [_pool(threads).submit(op, part) for part in parts[1:]]
    first = op(parts[0])  # this thread does a share too
    return torch.cat([first, *(f.result() for f in futures)], dim=1)


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="roi_align")
