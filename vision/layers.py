"""Small layers shared by the backbones and heads: frozen batch norm, input normalisation (and the ImageNet
statistics every model defaults to), conv+BN folding, and the CPU training paths of a conv with frozen batch
norm (``conv_norm``) and of a fully connected layer (``linear``).

Shapes: N images, C channels, H x W spatial size.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "FrozenBatchNorm2d", "Normalize", "convert_frozen_batchnorm",
           "fold_conv_bn", "group_norm", "linear", "prepare_for_inference"]

# Per-channel RGB statistics of ImageNet-1k for images in [0, 1]: the normalisation torchvision's published
# weights were trained with, so every model config defaults to them (the one place they are written).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters: ``y = (x - mean) / sqrt(var + eps) * w + b``.

    Detection and segmentation train with one or two images per device, where batch statistics are
    noise; the ImageNet statistics are kept instead. Everything lives in buffers, so an optimizer never
    sees it. The state-dict keys are those of ``nn.BatchNorm2d`` (weight, bias, running_mean,
    running_var); a ``num_batches_tracked`` entry in a loaded state dict is accepted and ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
        """A frozen copy of ``bn`` (its running statistics and affine parameters, detached)."""
        tensors = [*bn.parameters(), *bn.buffers()]
        frozen = cls(bn.num_features, bn.eps).to(tensors[0].device if tensors else None)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.track_running_stats:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # BatchNorm2d state dicts carry a step counter that means nothing once statistics are frozen.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel affine map this layer applies: ``y = x * scale + shift``, both ``[C]``."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, H, W] -> [N, C, H, W]."""
        scale, shift = self.scale_and_shift()
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm over ``channels`` in ``groups`` groups (Wu & He, 2018: 32), fewer where 32 does not divide
    the channels (the greatest common divisor): statistics per sample, so they do not depend on the batch
    size, which is why detection heads (a few images a batch) use it. Works on [N, C, H, W] and on [N, C]."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``. A FrozenBatchNorm2d is applied through the conv instead: weights ``w * scale`` and
    bias ``shift``, computed afresh on every call from the parameters, so training sees the same function
    and the same gradient for ``w`` (equal within float rounding), with one pass less over the feature
    map forward and backward (what it gains is measured by benchmarks/efficiency.py; the README gives the
    figures with their load). Only while training with autograd: evaluation keeps torchvision's
    arithmetic (its models' detections are compared bit-close in tests/test_torchvision_weights.py)."""
    if not (isinstance(norm, FrozenBatchNorm2d) and norm.training and torch.is_grad_enabled()):
        return norm(conv(x))
    scale, shift = norm.scale_and_shift()
    if (conv.bias is None and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and x.dtype == conv.weight.dtype and not torch.is_autocast_enabled(x.device.type)):
        return _FrozenNormConv.apply(x, conv.weight, scale.to(conv.weight.dtype), shift.to(conv.weight.dtype),
                                     conv.stride, conv.padding, conv.dilation, conv.groups)
    weight = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv._conv_forward(x, weight, bias.to(conv.weight.dtype))


class _FrozenNormConv(torch.autograd.Function):
    """``conv(x, w * scale) + shift`` that keeps ``w`` for the backward pass, not the product: autograd's
    own conv would hold a scaled copy of every trainable conv weight until its gradient is computed (41 MB
    for a ResNet-18 trunk, at the step's memory peak); this recomputes it, a pass over the weights, which
    are small beside the maps. The gradients are the ones autograd computes, from the same kernel
    (``aten.convolution_backward``). Under autocast the conv saves a cast copy of its weight anyway, and
    the plain product is used. Measured (README, efficiency): the R18-FPN step's peak 29-39 MB lower; its
    time 4-5% longer on one machine (Zen 5), unchanged within 1% on another (Zen 4), and per layer equal."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> Tensor:
        ctx.save_for_backward(x, weight, scale)
        ctx.geometry = (stride, padding, dilation, groups)
        return torch.nn.functional.conv2d(x, weight * scale.view(-1, 1, 1, 1), shift, stride, padding,
                                          dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        scale = scale.view(-1, 1, 1, 1)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight * scale, None, stride, padding, dilation, False, [0] * len(stride), groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        return grad_x, None if grad_w is None else grad_w * scale, None, None, None, None, None, None


def linear(fc: nn.Module, x: Tensor) -> Tensor:
    """``fc(x)`` for x [R, C]. For an ``nn.Linear`` while training on the CPU in float32, the product is
    computed by oneDNN as a 1x1 convolution with the R rows as its positions (a channels-last view of the
    same memory, no copy): ``nn.Linear`` calls MKL's matrix product, which on these AMD EPYC cores runs below
    oneDNN's rate on the same product (benchmarks/efficiency.py's two float32 probes; README, efficiency).
    The same function and gradients, equal within float rounding. Evaluation keeps ``nn.Linear``'s
    arithmetic, as ``conv_norm`` does; anything else (a compressed fc, autocast, tracing) is ``fc(x)``.
    The R18-FPN training step at torchvision's widths, side by side in one process: 0.79x torchvision's
    time, 0.82x with ``nn.Linear`` (README, efficiency, change 5)."""
    if (not isinstance(fc, nn.Linear) or x.device.type != "cpu" or x.dim() != 2 or x.size(0) == 0
            or x.dtype != torch.float32 or fc.weight.dtype != torch.float32
            or not (fc.training and torch.is_grad_enabled())
            or torch.is_autocast_enabled("cpu") or torch.jit.is_scripting() or torch.jit.is_tracing()):
        return fc(x)
    # the Function returns the convolution's [1, O, R, 1] output and the view to [R, O] is taken out here:
    # autograd forbids in-place ops (the head's ReLU) on a view made inside a custom Function
    return _as_rows(_ConvLinear.apply(x, fc.weight, fc.bias))


def _as_positions(x: Tensor) -> Tensor:
    """[R, C] -> [1, C, R, 1], channels-last: the same memory (when contiguous), the R rows as positions."""
    x = x.contiguous()
    return x.view(1, x.size(0), 1, x.size(1)).permute(0, 3, 1, 2)


def _as_rows(y: Tensor) -> Tensor:
    """[1, O, R, 1] -> [R, O] (a view when ``y`` is channels-last, as oneDNN returns it)."""
    return y.permute(0, 2, 3, 1).reshape(y.size(2), y.size(1))


def _conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for x [R, C], weight [O, C] as a 1x1 convolution: [1, O, R, 1]."""
    return torch.nn.functional.conv2d(_as_positions(x), weight.view(*weight.shape, 1, 1), bias)


class _ConvLinear(torch.autograd.Function):
    """``linear``'s forward product as a oneDNN convolution. Backward keeps ``nn.Linear``'s matrix products:
    as a convolution the input's gradient ran no faster, and oneDNN's reordered copy of the weight (51 MB
    for torchvision's fc6) sat on top of the step's memory peak at the start of backward (R18-FPN at
    torchvision's widths: peak 1.08x torchvision's, against 0.99x as it is now)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _conv1x1(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = _as_rows(grad)
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a ``FrozenBatchNorm2d`` with its values.

    Children are replaced in place; the return value is ``module`` itself, or the new frozen layer when
    ``module`` is a batch norm. Module names (and so state-dict keys) are unchanged.
    """
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d.from_batchnorm(module)
    for name, child in module.named_children():
        converted = convert_frozen_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


class Normalize(nn.Module):
    """Map RGB images in ``[0, 1]`` to ``(x - mean) / std`` per channel, inside the model.

    mean and std are non-persistent buffers: they follow ``.to(device)`` but stay out of the state dict,
    because they belong to the model config, not to the weights.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean has {len(mean)} values but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: std must be positive, got {tuple(std)}")
        as_column = lambda values: torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", as_column(mean), persistent=False)
        self.register_buffer("std", as_column(std), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, H, W] in [0, 1] -> [N, C, H, W] normalised."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}"


_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _fused_conv(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    # FrozenBatchNorm2d keeps the same attribute names as BatchNorm2d, so one path serves both.
    if isinstance(norm, nn.BatchNorm2d) and not norm.track_running_stats:
        raise ValueError("fold_conv_bn: a BatchNorm2d without running statistics cannot be folded")
    fused = copy.deepcopy(conv)
    fused.weight, fused.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
    )
    return fused


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Names of (conv, norm) children where the norm reads exactly the conv's output.

    Only two cases are known to be safe without tracing the forward: consecutive entries of an
    ``nn.Sequential`` (which runs its children in order), and pairs a module declares itself in a
    ``conv_bn_pairs`` class attribute (the ResNet blocks and stems do).
    """
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        return [
            (a, b) for a, b in zip(names, names[1:], strict=False)
            if isinstance(module._modules[a], nn.Conv2d) and isinstance(module._modules[b], _NORMS)
        ]
    return list(getattr(module, "conv_bn_pairs", ()))


def fold_conv_bn(module: nn.Module) -> nn.Module:
    """An inference copy of ``module`` with every batch norm that follows a conv folded into the conv.

    ``BN(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(var + eps)`` and
    ``b' = (b - mean) * g / sqrt(var + eps) + beta``: one fewer pass over each feature map. The norm is
    replaced by ``nn.Identity`` so the module tree (and every other state-dict key) is unchanged. The
    copy is in eval mode with gradients off; ``module`` itself is not modified. Batch statistics are
    frozen into the weights, so the copy is for inference only.
    """
    folded = copy.deepcopy(module).eval()
    with torch.no_grad():
        for parent in folded.modules():
            for conv_name, norm_name in _conv_bn_pairs(parent):
                conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
                if isinstance(conv, nn.Conv2d) and isinstance(norm, _NORMS):
                    setattr(parent, conv_name, _fused_conv(conv, norm))
                    setattr(parent, norm_name, nn.Identity())
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """An inference copy of any model with the same outputs (within float rounding): batch norms folded into
    the preceding convs, 4-D weights channels-last (the layout oneDNN's CPU convolutions run fastest in),
    eval mode, no gradients. ``benchmarks/detector_speed.py`` and ``backbones.py`` measure the gain."""
    return fold_conv_bn(model).to(memory_format=torch.channels_last)
