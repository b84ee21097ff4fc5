"""Forward time of our ResNet/VGG against torchvision's, in one run, on the same weights and input.

    nice -n 10 .venv/bin/python benchmarks/backbones.py            # ResNet-50, VGG-16, VGG-16-BN
    .venv/bin/python benchmarks/backbones.py --models resnet18 --runs 3

For each network: torchvision, ours, ours with conv+BN folded, and folded + channels_last, all in
eval mode under ``torch.inference_mode``. The variants are timed in rotation (one call of each per
round) so that load from other processes on a shared machine hits them alike; the table gives the
median over rounds after warm-up, and each variant's speed relative to torchvision (>1 = faster).
Each variant's max abs difference from torchvision's logits, divided by their largest magnitude, is
printed too, so the timings are known to be of the same computation. (VGG-16 has no batch norm, so
folding leaves it unchanged; VGG-16-BN shows what folding does for VGG.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn

from vision.backbones import build_network
from vision.layers import fold_conv_bn
from vision.weights import to_torchvision_state_dict


def randomize_bn_statistics(model: nn.Module) -> None:
    # Fresh BNs are identities in eval mode; give them real statistics like trained weights have.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)


def variants(name: str) -> dict[str, Callable[[Tensor], Tensor]]:
    torch.manual_seed(0)
    ours = build_network(name).eval()
    with torch.no_grad():
        randomize_bn_statistics(ours)
    theirs = getattr(torchvision.models, name)(weights=None).eval()
    theirs.load_state_dict(to_torchvision_state_dict(ours))
    folded = fold_conv_bn(ours)
    folded_cl = fold_conv_bn(ours).to(memory_format=torch.channels_last)
    return {
        "torchvision": theirs,
        "ours": ours,
        "ours + BN folded": folded,
        "ours + folded + channels_last": lambda x: folded_cl(x.contiguous(memory_format=torch.channels_last)),
    }


def benchmark(name: str, batch: int, size: int, warmup: int, runs: int) -> None:
    models = variants(name)
    x = torch.rand(batch, 3, size, size)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        reference = models["torchvision"](x)
        scale = reference.abs().max().item()
        diffs = {k: (m(x) - reference).abs().max().item() / scale for k, m in models.items()}
        for round_ in range(warmup + runs):
            for label, model in models.items():
                start = time.perf_counter()
                model(x)
                if round_ >= warmup:
                    times[label].append(time.perf_counter() - start)
    base = statistics.median(times["torchvision"])
    print(f"\n{name}: batch {batch}, {size}x{size}, CPU, {torch.get_num_threads()} threads, "
          f"median of {runs} after {warmup} warm-up")
    print(f"  {'variant':32s} {'median s':>9s} {'min s':>8s} {'vs torchvision':>15s} {'rel. diff':>10s}")
    for label, ts in times.items():
        median = statistics.median(ts)
        print(f"  {label:32s} {median:9.3f} {min(ts):8.3f} {base / median:14.2f}x {diffs[label]:10.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16", "vgg16_bn"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {os.cpu_count()} CPUs")
    for name in args.models:
        benchmark(name, args.batch, args.size, args.warmup, args.runs)


if __name__ == "__main__":
    main()
