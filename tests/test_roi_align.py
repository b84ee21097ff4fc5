"""detection.roi_align: torchvision's RoIAlign with its channels on several threads gives torchvision's
numbers bit for bit, forward and backward, and really splits the work."""

import threading

import pytest
import torch
import torchvision

from detection import roi_align as module
from detection.roi_align import roi_align


def regions(seed: int = 0, count: int = 40, images: int = 2, size: float = 60.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g) * size
    wh = torch.rand(count, 2, generator=g) * size / 2 + 1
    index = torch.randint(0, images, (count, 1), generator=g).float()
    return torch.cat([index, xy, xy + wh], dim=1)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # three slices of 10 channels: uneven shares would show as wrong channels
    yield 3
    torch.set_num_threads(before)


@pytest.mark.parametrize("aligned", [False, True])
def test_forward_and_backward_equal_torchvisions_bit_for_bit(threads, aligned):
    features = torch.randn(2, 10, 16, 20, requires_grad=True)
    rois = regions()
    ours = roi_align(features, rois, 7, 0.25, 2, aligned)
    grad_out = torch.randn_like(ours)
    (ours_grad,) = torch.autograd.grad(ours, features, grad_out)
    theirs = torchvision.ops.roi_align(features, rois, 7, 0.25, 2, aligned)
    (theirs_grad,) = torch.autograd.grad(theirs, features, grad_out)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_grad, theirs_grad)
    assert ours_grad.abs().sum() > 0  # the regions reach the map: the comparison compared something


def test_the_channels_are_pooled_in_small_slices_on_several_threads(threads, monkeypatch):
    seen = []
    kernels = torch.ops.torchvision

    def spy(name):
        kernel = getattr(kernels, name)
        # the first slice of each of two threads waits for the other's: a pass that kept every slice on
        # one thread would time out here instead of passing
        meet, arrived = threading.Barrier(2, timeout=30), set()

        def run(part, *args):
            thread = threading.current_thread().name
            seen.append((name, part.size(1), thread))
            if thread not in arrived and len(arrived) < 2:
                arrived.add(thread)
                meet.wait()
            return kernel(part, *args)
        return run

    for name in ("roi_align", "_roi_align_backward"):
        monkeypatch.setattr(module.torch.ops.torchvision, name, spy(name), raising=False)
    channels = 3 * module.SLICES_PER_THREAD * 2
    features = torch.randn(2, channels, 16, 20, requires_grad=True)
    ours = roi_align(features, regions(), 7, 0.25, 2)
    ours.sum().backward()
    assert ours.grad_fn is not None and features.grad is not None
    for name in ("roi_align", "_roi_align_backward"):
        widths = sorted(c for kernel, c, _ in seen if kernel == name)
        # 3 threads x SLICES_PER_THREAD slices of two channels each: no thread ever holds a large part of
        # the map or of its gradient
        assert widths == [2] * (3 * module.SLICES_PER_THREAD) and sum(widths) == channels
        names = {thread for kernel, _, thread in seen if kernel == name}
        assert "MainThread" in names and len(names) >= 2


def test_fewer_channels_than_slices_one_channel_each():
    assert module._slices(5, 3) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def test_per_image_boxes_inference_mode_and_bfloat16_autocast(threads):
    features = torch.randn(2, 8, 16, 20)
    rois = regions(count=12)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    expected = torchvision.ops.roi_align(features, per_image, 5, 0.5, 2)
    with torch.inference_mode():
        assert torch.equal(roi_align(features, per_image, 5, 0.5, 2), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = roi_align(features.bfloat16(), per_image, 5, 0.5, 2)
        theirs = torchvision.ops.roi_align(features.bfloat16(), per_image, 5, 0.5, 2)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


def test_one_thread_is_torchvisions_own_call(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(module, "_by_channel", lambda *a: pytest.fail("split on one thread"))
    features = torch.randn(1, 4, 8, 8)
    rois = regions(count=5, images=1, size=30.0)
    expected = torchvision.ops.roi_align(features, rois, 3, 0.25, 2)
    assert torch.equal(roi_align(features, rois, 3, 0.25, 2), expected)
