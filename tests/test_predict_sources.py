import os

import pytest

from apps.predict.sources import SourceError, find_images, mask_names, shard


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    for rel in ["a.jpg", "B.PNG", "sub/a.jpg", "sub/deep/c.webp", "sub/notes.txt", "sub/x.json",
                "ünï cødé 画像.tif", "out/old.jpg"]:
        touch(root / rel)
    return root


def test_folder_is_searched_recursively_sorted_and_names_are_relative(tree):
    scan = find_images([tree])
    assert [f.name for f in scan.files] == ["B.PNG", "a.jpg", "out/old.jpg", "sub/a.jpg", "sub/deep/c.webp",
                                            "ünï cødé 画像.tif"]
    assert scan.files[3].path == str(tree / "sub" / "a.jpg")
    assert scan.not_images == 2 and scan.folders == [tree]


def test_output_folder_is_never_scanned(tree):
    scan = find_images([tree], exclude=tree / "out")
    assert "out/old.jpg" not in [f.name for f in scan.files]
    scan = find_images([str(tree / "**" / "*.jpg")], exclude=tree / "out")
    assert [f.name for f in scan.files] == ["a.jpg", "sub/a.jpg"]


def test_glob_single_file_and_list_file(tree, tmp_path):
    scan = find_images([str(tree / "sub" / "*")])
    assert [f.name for f in scan.files] == ["a.jpg"]  # relative to the glob's folder; notes.txt skipped
    assert scan.folders == [tree / "sub"] and scan.not_images == 2
    single = find_images([tree / "sub" / "a.jpg"])
    assert [f.name for f in single.files] == ["a.jpg"] and single.folders == []
    listing = touch(tmp_path / "list.txt", "# my images\ndata/a.jpg\n\n{}\ndata/missing.png\n".format(
        tree / "sub" / "deep" / "c.webp").encode())
    files = find_images([listing]).files
    assert [f.name for f in files] == ["a.jpg", "missing.png", "sub/deep/c.webp"]  # missing: fails later


def test_several_sources_named_from_their_common_folder_without_duplicates(tree):
    scan = find_images([tree / "sub", tree / "sub" / "deep", str(tree / "*.jpg")])
    assert [f.name for f in scan.files] == ["a.jpg", "sub/a.jpg", "sub/deep/c.webp"]


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="no such file, folder or glob match"):
        find_images([tmp_path / "nope"])
    with pytest.raises(SourceError, match="matches no image files"):
        find_images([str(tmp_path / "*.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no image files found"):
        find_images([tmp_path / "empty"])
    with pytest.raises(SourceError, match="names no image paths"):
        find_images([touch(tmp_path / "l.txt", b"# nothing\n")])


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinked_folder_loops_are_not_followed(tree):
    os.symlink(tree, tree / "sub" / "loop")
    assert len(find_images([tree]).files) == 6


def test_mask_names_never_collide():
    assert mask_names(["a/b.jpg", "a/b.png", "c.jpg", "d.tif.jpg"]) == [
        "a/b.jpg.png", "a/b.png.png", "c.png", "d.tif.png"]


def test_shards_are_disjoint_cover_everything_and_keep_order():
    items = list(range(11))
    for world in (1, 2, 3, 4, 16):
        parts = [shard(items, r, world) for r in range(world)]
        assert sum(parts, []) == items  # concatenation in rank order: the sorted list, each item once
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard(items, 0, 2) == [0, 1, 2, 3, 4] and shard(items, 1, 2) == [5, 6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="rank 2 outside"):
        shard(items, 2, 2)
