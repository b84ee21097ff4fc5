"""RoIAlign on every CPU thread torch may use.

torchvision's CPU kernels for RoIAlign (forward and backward) loop over the regions on one thread: in a
Faster R-CNN training step on two cores its backward alone was about a quarter of the step
(benchmarks/efficiency.py's operator table), with the second core idle. Every output channel of RoIAlign
depends on that channel of the input alone, so the channels are split into slices that the threads take in
turn, and each slice runs the very same torchvision kernel: the result is bit for bit torchvision's, on more
cores. Many small slices, each copied into one preallocated result as soon as it is done: two halves joined at
the end would hold the map's gradient twice, and two contiguous halves of the input the map twice. Small,
too, because glibc gives the pool thread a malloc arena of its own, and the main thread cannot reuse what is
freed there: what the pool thread held at once stays resident for the rest of the step. One-off probes of
benchmarks/efficiency.py's R18-FPN training step (torchvision's widths, 2 threads, commit 7d5f2d5, median
of 5 peaks, beside a 2-process study, load about 4; a peak does not depend on the load): 4 slices per
thread peaked at 550 MB, 8 at 541, 16 at 511, 32 at 507; torchvision's single-threaded RoIAlign in the same
step 508, torchvision's own step 503. Alone (load 1.7, median of 7) 16 and 4 slices took the same time,
0.764x torchvision's step (README, efficiency).

Anywhere else (CUDA, one thread, a graph being traced or exported, a single channel) this is
``torchvision.ops.roi_align`` itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
from torch import Tensor
from torchvision.ops import roi_align as torchvision_roi_align

__all__ = ["roi_align"]

SLICES_PER_THREAD = 16  # 256 FPN channels on 2 threads: slices of 8, each 1/32 of the map


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

        return _by_channel(pool, input, threads, (rois.size(0), input.size(1), size, size))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        (n, _, h, w), spatial_scale, size, sampling_ratio, aligned, threads = ctx.args

        def spread(part: Tensor) -> Tensor:
            return torch.ops.torchvision._roi_align_backward(part, rois, spatial_scale, size, size, n,
                                                             part.size(1), h, w, sampling_ratio, aligned)

        return _by_channel(spread, grad, threads, (n, grad.size(1), h, w)), None, None, None, None, None, None


def _by_channel(op: Callable[[Tensor], Tensor], x: Tensor, threads: int, shape: tuple[int, ...]) -> Tensor:
    """``op`` on channel slices of ``x`` on ``threads`` threads, each result written into its channels of
    one ``shape`` tensor. (torch's kernels release the GIL, so Python threads run them side by side.)"""
    out = x.new_empty(shape)
    todo = deque(_slices(x.size(1), threads))  # shared: a thread that is free takes the next slice
    inference = torch.is_inference_mode_enabled()  # thread-local like grad mode: the pool needs both set

    def run() -> None:
        with torch.inference_mode(inference), torch.no_grad():
            while todo:
                try:
                    lo, hi = todo.popleft()
                except IndexError:  # another thread took the last one
                    return
                out[:, lo:hi] = op(x[:, lo:hi].contiguous())

    futures = [_pool(threads).submit(run) for _ in range(threads - 1)]
    run()  # this thread does a share too
    for future in futures:
        future.result()
    return out


def _slices(channels: int, threads: int) -> list[tuple[int, int]]:
    """[lo, hi) channel ranges, as even as integers allow, ``SLICES_PER_THREAD`` per thread (fewer when
    there are fewer channels)."""
    count = min(channels, threads * SLICES_PER_THREAD)
    edges = [k * channels // count for k in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="roi_align")
