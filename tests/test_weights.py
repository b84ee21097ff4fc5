"""Weight sources: file:// download with hash check, offline message, safe loading, key mapping."""

from __future__ import annotations

import hashlib
import pathlib

import pytest
import torch
import torchvision

from vision import weights as W
from vision.backbones import build_backbone, build_network
from vision.checkpoint import save_checkpoint
from vision.weights import (
    WeightsError,
    WeightSource,
    load_weights,
    resolve_weights,
    to_torchvision_state_dict,
)


@pytest.fixture(scope="module")
def tv_resnet18(tmp_path_factory) -> tuple[torchvision.models.ResNet, pathlib.Path]:
    """A random-init torchvision ResNet-18 and its state dict saved the torchvision way."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tv") / "resnet18-random.pth"
    torch.save(net.state_dict(), path)
    return net, path


def tv_c5(net: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_source(monkeypatch, arch: str, name: str, entry: WeightSource) -> None:
    monkeypatch.setitem(W.WEIGHT_SOURCES, arch, {**W.WEIGHT_SOURCES.get(arch, {}), name: entry})


def test_table_has_imagenet_for_every_network_with_torchvision_file_names():
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg11_bn", "vgg13",
                 "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"):
        entry = W.WEIGHT_SOURCES[arch]["imagenet"]
        assert entry.url == "https://download.pytorch.org/models/" + entry.file_name
        # torchvision names files <arch>-<first 8 hex digits of the sha256>.pth
        assert entry.file_name == f"{arch}-{entry.sha256[:8]}.pth"
    assert W.WEIGHT_SOURCES["resnet50"]["imagenet"].file_name == "resnet50-0676ba61.pth"
    assert W.WEIGHT_SOURCES["vgg16"]["imagenet"].file_name == "vgg16-397923af.pth"


def test_digests_are_full_sha256_where_published():
    entries = [(arch, name, e) for arch, sources in W.WEIGHT_SOURCES.items() for name, e in sources.items()]
    for arch, name, entry in entries:
        assert all(c in "0123456789abcdef" for c in entry.sha256), (arch, name)
        assert len(entry.sha256) in (8, 64), (arch, name)
    # the files with no full digest on public record (see vision/weights.py) are the only prefixes
    prefixes = {(arch, name) for arch, name, entry in entries if not entry.full_hash}
    assert prefixes <= {("vgg11", "imagenet"), ("vgg11_bn", "imagenet"), ("vgg13", "imagenet"),
                        ("vgg13_bn", "imagenet"), ("resnet152", "imagenet-v2")}
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "vgg16_bn", "vgg19",
                 "vgg19_bn"):
        assert W.WEIGHT_SOURCES[arch]["imagenet"].full_hash, arch


def test_download_file_url_verifies_hash_and_loads(tmp_path, monkeypatch, tv_resnet18):
    net, src = tv_resnet18
    entry = WeightSource("resnet18-mirror.pth", src.as_uri(), sha256(src))
    add_source(monkeypatch, "resnet18", "mirror", entry)
    weights_dir = tmp_path / "weights"
    got = resolve_weights("resnet18", "mirror", weights_dir, progress=False)
    assert got == weights_dir / "resnet18-mirror.pth"
    assert got.read_bytes() == src.read_bytes()
    assert [p.name for p in weights_dir.iterdir()] == ["resnet18-mirror.pth"]  # no temporary left over

    # A named source by the default weights/ folder, through the backbone builder.
    monkeypatch.chdir(tmp_path)
    backbone = build_backbone("resnet18", weights="mirror", out_features=["c5"]).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert (backbone(x)["c5"] - tv_c5(net, x)).abs().max().item() <= 1e-5


def test_hash_prefix_is_enough_when_the_full_digest_is_unknown(tmp_path, monkeypatch):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"visiondet weights")
    add_source(monkeypatch, "resnet18", "short", WeightSource("b.pth", src.as_uri(), sha256(src)[:8]))
    got = resolve_weights("resnet18", "short", tmp_path / "w", progress=False)
    assert got.read_bytes() == b"visiondet weights"


def test_bad_hash_is_refused_and_nothing_is_left_behind(tmp_path, monkeypatch):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"tampered")
    add_source(monkeypatch, "resnet18", "bad", WeightSource("resnet18-bad.pth", src.as_uri(), "0" * 64))
    weights_dir = tmp_path / "w"
    with pytest.raises(WeightsError, match="sha256.*refused and deleted"):
        resolve_weights("resnet18", "bad", weights_dir, progress=False)
    assert list(weights_dir.iterdir()) == []


def test_existing_file_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    add_source(monkeypatch, "resnet18", "x", WeightSource("resnet18-x.pth", "file:///nowhere", "ab" * 32))
    (tmp_path / "resnet18-x.pth").write_bytes(b"something else")
    with pytest.raises(WeightsError, match="resnet18-x.pth has sha256"):
        resolve_weights("resnet18", "x", tmp_path, progress=False)


def test_offline_error_says_which_file_to_put_where(tmp_path, monkeypatch):
    missing = tmp_path / "not-served.pth"
    entry = WeightSource("resnet50-off.pth", missing.as_uri(), "1234abcd")
    add_source(monkeypatch, "resnet50", "offline", entry)
    with pytest.raises(WeightsError) as info:
        resolve_weights("resnet50", "offline", tmp_path / "weights", progress=False)
    text = str(info.value)
    assert missing.as_uri() in text
    assert str((tmp_path / "weights" / "resnet50-off.pth").resolve()) in text
    assert list((tmp_path / "weights").iterdir()) == []


def test_unknown_names_and_missing_paths(tmp_path):
    with pytest.raises(WeightsError, match="imagenet"):
        resolve_weights("resnet18", "imagenet-22k", tmp_path)
    with pytest.raises(WeightsError, match="no such weights file"):
        resolve_weights("resnet18", str(tmp_path / "nope.pth"), tmp_path)
    with pytest.raises(WeightsError, match="known"):
        resolve_weights("alexnet", "imagenet", tmp_path)


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_code_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": _Payload(marker)}, path)
    model = build_network("resnet18")
    with pytest.raises(WeightsError, match="refused for safety"):
        load_weights(model, path)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_visiondet_checkpoint_and_wrapped_keys_load(tmp_path, tv_resnet18):
    net, src = tv_resnet18
    state = torch.load(src, weights_only=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        expected = tv_c5(net, x)
    ckpt = save_checkpoint({"format": "visiondet", "version": 1, "task": "classification",
                            "state_dict": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "c.pt")
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, ddp)
    for path in (ckpt, ddp):
        backbone = build_backbone("resnet18", out_features=["c5"]).eval()
        load_weights(backbone, path)
        with torch.inference_mode():
            assert (backbone(x)["c5"] - expected).abs().max().item() <= 1e-5


def test_strict_mismatch_names_the_file_and_changes_nothing(tv_resnet18):
    _, src = tv_resnet18
    model = build_network("resnet34")
    before = model.layer1[0].conv1.weight.clone()
    with pytest.raises(WeightsError, match=r"resnet18-random\.pth.*missing: layer1\.2\."):
        load_weights(model, src)
    assert torch.equal(model.layer1[0].conv1.weight, before)
    report = load_weights(model, src, strict=False)
    assert "layer1.2.conv1.weight" in report.missing and not report.unexpected
    assert torch.equal(model.layer1[0].conv1.weight, torch.load(src)["layer1.0.conv1.weight"])


def test_new_head_keeps_fresh_init_and_trunk_loads(tv_resnet18):
    net, src = tv_resnet18
    model = build_network("resnet18", num_classes=10, weights=src)
    assert model.fc.out_features == 10
    assert torch.equal(model.layer4[1].conv2.weight, net.layer4[1].conv2.weight)


def test_frozen_bn_backbone_exports_to_torchvision(tv_resnet18):
    net, src = tv_resnet18
    backbone = build_backbone("resnet18", weights=src, frozen_bn=True, freeze_at=5).eval()
    fresh = torchvision.models.resnet18(weights=None).eval()
    result = fresh.load_state_dict(to_torchvision_state_dict(backbone), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert (tv_c5(fresh, x) - tv_c5(net, x)).abs().max().item() <= 1e-5


def test_files_that_are_not_state_dicts_are_clear_errors(tmp_path):
    model = build_network("resnet18")
    plain = tmp_path / "plain.pth"
    torch.save({"epoch": 3, "note": "no tensors"}, plain)  # loads under weights_only, but is no state dict
    with pytest.raises(WeightsError, match=r"plain\.pth: not a state dict"):
        load_weights(model, plain)
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(WeightsError, match=r"truncated\.pth: cannot load checkpoint"):
        load_weights(model, truncated)
