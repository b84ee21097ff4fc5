"""One cache root (vision/cache.py) for every cache: ``$VISIONDET_CACHE``, else
``$XDG_CACHE_HOME/visiondet``, else ``~/.cache/visiondet``; COCO tables, proposals and exported files in named
folders under it."""

from __future__ import annotations

import pytest

from apps.tasks import get_task
from detection.proposals import CachedSource, ProposalConfig
from vision.cache import cache_dir, cache_root


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.delenv("VISIONDET_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_the_root_comes_from_visiondet_cache_then_xdg_then_home(tmp_path, env):
    assert cache_root() == tmp_path / "home" / ".cache" / "visiondet"
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "visiondet"
    env.setenv("VISIONDET_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert cache_dir("export") == tmp_path / "mine" / "export"
    env.setenv("VISIONDET_CACHE", "")  # set but empty: as if unset
    assert cache_root() == tmp_path / "xdg" / "visiondet"


def test_selective_search_caches_under_the_root(tmp_path, env):
    # (the COCO tables: tests/test_data_cocotable.py; the exported files: tests/test_export_backend.py)
    env.setenv("VISIONDET_CACHE", str(tmp_path / "mine"))
    source = get_task("detection")._proposal_source(ProposalConfig(method="selective_search"))
    assert isinstance(source, CachedSource) and source.cache_dir == tmp_path / "mine" / "proposals"
